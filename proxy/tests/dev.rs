//! `moltghost dev`: the whole local stack from one command, as the README's first command runs it.

mod common;

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, run};
use serde_json::Value;

#[test]
fn moltghost_dev_runs_the_stack_and_stops_on_ctrl_c() {
    let cli = &common::bin("moltghost");
    if !cli.with_file_name("agent-runtime").exists() {
        assert!(
            std::env::var("CI").is_err(),
            "CI builds the whole workspace: agent-runtime must be there"
        );
        eprintln!("skipping: build agent-runtime first (cargo build --workspace --bins)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (port, admin, runtime) = (free_port(), free_port(), free_port());
    let mut dev = Command::new(cli)
        .args(["--data-dir", dir.path().to_str().unwrap(), "dev", "--json"])
        .args([
            "--port",
            &port.to_string(),
            "--admin-port",
            &admin.to_string(),
            "--runtime-port",
            &runtime.to_string(),
            "--pod-port",
            &common::free_udp_port().to_string(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // One JSON line once the stack answers.
    let mut line = String::new();
    BufReader::new(dev.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let info: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
    let (endpoint, key) = (
        info["endpoint"].as_str().unwrap(),
        info["api_key"].as_str().unwrap(),
    );
    assert_eq!(
        endpoint,
        format!(
            "http://{}.agent.localhost:{port}",
            info["agent"].as_str().unwrap()
        )
    );
    assert_eq!(info["admin_url"], format!("http://127.0.0.1:{admin}"));
    // The demo agent is a pod, reached through a WireGuard tunnel to the sidecar.
    assert!(
        info["upstream"].as_str().unwrap().starts_with("wg://"),
        "{info}"
    );

    // The printed curl works, streaming.
    let (code, out, err) = run(Command::new("curl").args([
        "-sS",
        "-N",
        "-X",
        "POST",
        &format!("{endpoint}/v1/chat"),
        "-H",
        &format!("Authorization: Bearer {key}"),
        "-H",
        "Content-Type: application/json",
        "-d",
        r#"{"messages": [{"role": "user", "content": "Hello, agent!"}], "stream": true}"#,
    ]));
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("\"done\":true") && out.ends_with("data: [DONE]\n\n"),
        "{out}"
    );

    // The CLI finds the stack by itself, through the file dev wrote.
    let (code, keys, err) = run(Command::new(cli).args([
        "--data-dir",
        dir.path().to_str().unwrap(),
        "auth",
        "list-keys",
    ]));
    assert_eq!(code, 0, "{err}");
    assert!(keys.contains("moltghost dev"), "{keys}");
    let (_, url, _) = run(Command::new(cli).args([
        "--data-dir",
        dir.path().to_str().unwrap(),
        "status",
        "demo",
        "--url",
    ]));
    assert_eq!(url.trim(), endpoint);
    let (_, status, _) =
        run(Command::new(cli).args(["--data-dir", dir.path().to_str().unwrap(), "status", "demo"]));
    assert!(status.contains("tunnel up"), "{status}");
    let (_, edge, _) =
        run(Command::new(cli).args(["--data-dir", dir.path().to_str().unwrap(), "status"]));
    assert!(
        edge.contains("WireGuard public key") && edge.contains("demo"),
        "{edge}"
    );

    // Ctrl-C stops everything.
    Command::new("kill")
        .args(["-INT", &dev.id().to_string()])
        .status()
        .unwrap();
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = dev.try_wait().unwrap() {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "moltghost dev did not stop"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
    for p in [port, admin, runtime] {
        assert!(
            TcpStream::connect(("127.0.0.1", p)).is_err(),
            "port {p} still open after Ctrl-C"
        );
    }
}
