//! `moltghost dev`: the whole local stack in one command. Starts the reference runtime, the edge
//! and the pod sidecar in front of the runtime (the real binaries, beside this one), makes sure
//! an agent `demo` exists and is reached through a real WireGuard tunnel to the sidecar, creates
//! a key, prints how to call it, and stops everything on Ctrl-C.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::{json, Value};
use tokio::process::{Child, Command};

use crate::client::{seg, Admin, Failure, DEV_FILE};

/// Options of `moltghost dev`.
#[derive(Args)]
pub struct DevArgs {
    /// Public port of the edge.
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Port of the admin API.
    #[arg(long, default_value_t = 9901)]
    admin_port: u16,
    /// Port of the reference runtime.
    #[arg(long, default_value_t = 9100)]
    runtime_port: u16,
    /// UDP port of the pod sidecar (the tunnel's far end).
    #[arg(long, default_value_t = 51820)]
    pod_port: u16,
    /// Reach the runtime directly over plain HTTP instead of through the tunnel and sidecar.
    #[arg(long)]
    no_tunnel: bool,
    /// Print one JSON line (endpoint, agent, api_key, admin_url) once the stack answers.
    #[arg(long)]
    json: bool,
    /// Also serve HTTPS, with a local CA and certificate generated in the data directory.
    #[arg(long)]
    tls: bool,
    /// Port of the HTTPS listener (with --tls).
    #[arg(long, default_value_t = 8443)]
    https_port: u16,
}

/// A local CA (`dev-ca.pem`) and a certificate it signed for `*.agent.localhost`, `localhost`
/// and `127.0.0.1`, made once and kept in the data directory. Returns (cert, key, ca).
fn local_certificate(dir: &Path) -> Result<(PathBuf, PathBuf, PathBuf), Failure> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };
    let (crt, key, ca_pem) = (
        dir.join("dev-tls.crt"),
        dir.join("dev-tls.key"),
        dir.join("dev-ca.pem"),
    );
    if crt.exists() && key.exists() && ca_pem.exists() {
        return Ok((crt, key, ca_pem));
    }
    let fail =
        |e: rcgen::Error| Failure::Unreachable(format!("generating the local certificate: {e}"));
    let ca_key = KeyPair::generate().map_err(fail)?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(fail)?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "MoltGhost dev CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key).map_err(fail)?;
    let leaf_key = KeyPair::generate().map_err(fail)?;
    let names = vec![
        "*.agent.localhost".to_string(),
        "localhost".into(),
        "127.0.0.1".into(),
    ];
    let mut leaf = CertificateParams::new(names).map_err(fail)?;
    leaf.distinguished_name
        .push(DnType::CommonName, "*.agent.localhost");
    let leaf_cert = leaf
        .signed_by(&leaf_key, &Issuer::from_params(&ca, &ca_key))
        .map_err(fail)?;
    let write = |p: &Path, text: String| {
        std::fs::write(p, text).map_err(|e| Failure::Unreachable(format!("{}: {e}", p.display())))
    };
    write(&ca_pem, ca_cert.pem())?;
    moltghost_common::secrets::write_private(&key, &leaf_key.serialize_pem())
        .map_err(|e| Failure::Unreachable(format!("{}: {e}", key.display())))?;
    write(&crt, leaf_cert.pem())?;
    Ok((crt, key, ca_pem))
}

fn sibling(name: &str) -> Result<PathBuf, Failure> {
    let exe = std::env::current_exe().map_err(|e| Failure::Unreachable(e.to_string()))?;
    let path = exe.with_file_name(name);
    if path.exists() {
        Ok(path)
    } else {
        Err(Failure::Unreachable(format!(
            "{} is missing: build everything with `cargo build --release --workspace --bins` (or run `make dev`)",
            path.display()
        )))
    }
}

fn free(port: u16) -> Result<(), Failure> {
    if TcpStream::connect(("127.0.0.1", port)).is_ok() {
        return Err(Failure::Unreachable(format!(
            "port {port} is taken: choose another with the matching --*port flag"
        )));
    }
    Ok(())
}

async fn wait_for(port: u16, what: &str, child: &mut Child, log: &Path) -> Result<(), Failure> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            let tail = std::fs::read_to_string(log).unwrap_or_default();
            let tail: Vec<&str> = tail.lines().rev().take(5).collect();
            return Err(Failure::Unreachable(format!(
                "{what} exited ({status}):\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            )));
        }
        if Instant::now() > deadline {
            return Err(Failure::Unreachable(format!(
                "{what} did not start listening on port {port}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

fn spawn(program: &Path, args: &[&str], log: &Path) -> Result<Child, Failure> {
    let out = std::fs::File::create(log)
        .map_err(|e| Failure::Unreachable(format!("{}: {e}", log.display())))?;
    let err = out
        .try_clone()
        .map_err(|e| Failure::Unreachable(e.to_string()))?;
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| Failure::Unreachable(format!("cannot start {}: {e}", program.display())))
}

/// Asks a child to stop (SIGTERM), then insists.
async fn stop(child: &mut Child) {
    if let Some(pid) = child.id() {
        // A graceful stop first: both binaries drain on SIGTERM. A stale pid only fails quietly.
        let _ = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status();
    }
    if tokio::time::timeout(Duration::from_secs(5), child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
}

/// Runs the stack until Ctrl-C.
pub async fn run(args: DevArgs, data_dir: &Path) -> Result<(), Failure> {
    let edge_bin = sibling("moltghost-proxy")?;
    let runtime_bin = sibling("agent-runtime")?;
    let pod_bin = sibling("moltghost-pod")?;
    for p in [args.port, args.admin_port, args.runtime_port] {
        free(p)?;
    }
    if args.tls {
        free(args.https_port)?;
    }
    std::fs::create_dir_all(data_dir)
        .map_err(|e| Failure::Unreachable(format!("{}: {e}", data_dir.display())))?;
    let data_dir = data_dir
        .canonicalize()
        .map_err(|e| Failure::Unreachable(e.to_string()))?;
    let secret = moltghost_common::secrets::load_or_create(
        None,
        "MOLTGHOST_ADMIN_SECRET",
        &data_dir,
        "admin_secret",
    )
    .map_err(|e| Failure::Unreachable(format!("admin secret: {e}")))?;

    let conf_path = write_config(&args, &data_dir)?;

    let runtime_listen = format!("127.0.0.1:{}", args.runtime_port);
    let runtime_log = data_dir.join("runtime.log");
    let mut runtime = spawn(
        &runtime_bin,
        &[
            "--listen",
            &runtime_listen,
            "--ttft-ms",
            "150",
            "--interval-ms",
            "60",
            "--tokens",
            "24",
        ],
        &runtime_log,
    )?;
    let edge_log = data_dir.join("edge.log");
    let mut edge = spawn(
        &edge_bin,
        &["--config", &conf_path.to_string_lossy()],
        &edge_log,
    )?;
    let started = async {
        wait_for(
            args.runtime_port,
            "the reference runtime",
            &mut runtime,
            &runtime_log,
        )
        .await?;
        wait_for(args.admin_port, "the edge", &mut edge, &edge_log).await?;
        wait_for(args.port, "the edge", &mut edge, &edge_log).await?;
        let admin_url = format!("http://127.0.0.1:{}", args.admin_port);
        let token = moltghost_common::admin_token::mint_token(
            &secret,
            "moltghost-dev",
            "write",
            30 * 24 * 3600,
        )
        .map_err(Failure::Unreachable)?;
        let admin = Admin::locate(Some(admin_url.clone()), Some(token.clone()), &data_dir)?;
        let (pod, upstream) = if args.no_tunnel {
            (None, format!("http://{runtime_listen}"))
        } else {
            let (pod, upstream) =
                start_pod(&pod_bin, &args, &data_dir, &admin, &runtime_listen).await?;
            (Some(pod), upstream)
        };
        let info = setup(&args, &data_dir, &admin, &token, &upstream).await?;
        Ok::<_, Failure>((info, pod))
    };
    let (info, mut pod) = match started.await {
        Ok(started) => started,
        Err(e) => {
            stop(&mut edge).await;
            stop(&mut runtime).await;
            return Err(e);
        }
    };
    let pod_log = data_dir.join("pod.log");
    announce(&args, &info);

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| Failure::Unreachable(e.to_string()))?;
    let why = tokio::select! {
        _ = tokio::signal::ctrl_c() => "stopping".to_string(),
        _ = term.recv() => "stopping".to_string(),
        s = edge.wait() => format!("the edge exited ({s:?}); see {}", edge_log.display()),
        s = runtime.wait() => format!("the runtime exited ({s:?}); see {}", runtime_log.display()),
        s = async { match pod.as_mut() { Some(p) => p.wait().await, None => std::future::pending().await } } =>
            format!("the pod sidecar exited ({s:?}); see {}", pod_log.display()),
    };
    eprintln!("moltghost dev: {why}");
    stop(&mut edge).await;
    if let Some(p) = pod.as_mut() {
        stop(p).await;
    }
    stop(&mut runtime).await;
    Ok(())
}

/// Writes the dev stack's edge config (`dev.toml` in the data directory), with TLS on a local
/// certificate when asked for. Returns its path.
fn write_config(args: &DevArgs, data_dir: &Path) -> Result<PathBuf, Failure> {
    let (https, public_url, tls) = if args.tls {
        let (crt, key, _) = local_certificate(data_dir)?;
        (
            format!("https = [\"127.0.0.1:{}\"]\n", args.https_port),
            format!("public_url = \"https://{{id}}.agent.localhost:{}\"\n", args.https_port),
            format!(
                "\n[tls]\n[[tls.certificates]]\nnames = [\"*.agent.localhost\", \"localhost\", \"127.0.0.1\"]\ncert = \"{}\"\nkey = \"{}\"\n",
                crt.display(),
                key.display()
            ),
        )
    } else {
        (String::new(), String::new(), String::new())
    };
    let config = format!(
        "# Written by `moltghost dev`.\n[listen]\nhttp = [\"127.0.0.1:{}\"]\n{https}admin = \"127.0.0.1:{}\"\n\n\
         [edge]\ndata_dir = \"{}\"\n{public_url}grace_period = \"1s\"\nshutdown_timeout = \"2s\"\n\n\
         [store]\nurl = \"sqlite://moltghost.db\"\n\n\
         [[plans]]\nname = \"dev\"\nrequests_per_minute = 6000\ntokens_per_month = 100000000\nconcurrent_streams = 64\n\n\
         # A small plan, to see the limits at work: `moltghost account create NAME --plan trial`.\n\
         [[plans]]\nname = \"trial\"\nrequests_per_minute = 20\ntokens_per_month = 1000\nconcurrent_streams = 2\n{tls}",
        args.port,
        args.admin_port,
        data_dir.display()
    );
    let conf_path = data_dir.join("dev.toml");
    std::fs::write(&conf_path, config).map_err(|e| Failure::Unreachable(e.to_string()))?;
    Ok(conf_path)
}

/// Starts the pod sidecar in front of the runtime, accepting this edge's WireGuard key and
/// checking identities against its JWKS. Returns it and the demo agent's upstream.
async fn start_pod(
    pod_bin: &Path,
    args: &DevArgs,
    data_dir: &Path,
    admin: &Admin,
    runtime_listen: &str,
) -> Result<(Child, String), Failure> {
    let state = data_dir.join("pod");
    let state_arg = state.to_string_lossy();
    let out = std::process::Command::new(pod_bin)
        .args(["--state-dir", &state_arg, "keygen"])
        .output()
        .map_err(|e| Failure::Unreachable(format!("moltghost-pod keygen: {e}")))?;
    let pod_key = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if !out.status.success() || pod_key.is_empty() {
        return Err(Failure::Unreachable(format!(
            "moltghost-pod keygen failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    let status = admin.get("/v1/admin/status").await?;
    let edge_key = status["tunnel"]["public_key"].as_str().unwrap_or_default();
    let listen = format!("127.0.0.1:{}", args.pod_port);
    let jwks = format!("http://127.0.0.1:{}/.well-known/jwks.json", args.admin_port);
    let upstream = format!("http://{runtime_listen}");
    let log = data_dir.join("pod.log");
    let mut pod = spawn(
        pod_bin,
        &[
            "--state-dir",
            &state_arg,
            "run",
            "--listen",
            &listen,
            "--edge-key",
            edge_key,
            "--upstream",
            &upstream,
            "--jwks",
            &jwks,
        ],
        &log,
    )?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("pod sidecar up") {
            break;
        }
        let exited = pod.try_wait().ok().flatten();
        if exited.is_some() || Instant::now() > deadline {
            let _ = pod.kill().await;
            let tail: Vec<&str> = text.lines().rev().take(5).collect();
            return Err(Failure::Unreachable(format!(
                "the pod sidecar did not start (is UDP port {} free? choose another with --pod-port):\n{}",
                args.pod_port,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok((pod, format!("wg://{pod_key}@{listen}")))
}

/// Makes sure the demo agent exists and points at this runtime, creates a key, and writes the
/// file the CLI reads.
async fn setup(
    args: &DevArgs,
    data_dir: &Path,
    admin: &Admin,
    token: &str,
    upstream: &str,
) -> Result<Value, Failure> {
    let admin_url = format!("http://127.0.0.1:{}", args.admin_port);
    let agent = match admin.get("/v1/admin/agents/demo").await {
        Ok(a) if a["upstream"] == upstream => a,
        Ok(_) => {
            admin
                .patch("/v1/admin/agents/demo", json!({"upstream": upstream}))
                .await?
        }
        // The edge seeds one account, `default`: the demo agent and its key live there.
        Err(Failure::Refused(_)) => {
            admin
                .post(
                    "/v1/admin/agents",
                    json!({"name": "demo", "upstream": upstream}),
                )
                .await?
        }
        Err(e) => return Err(e),
    };
    if agent["state"] != "running" {
        admin
            .post(
                &format!("/v1/admin/agents/{}/start", seg("demo")),
                json!({}),
            )
            .await?;
    }
    let key = admin
        .post(
            "/v1/admin/keys",
            json!({"name": "moltghost dev", "agents": ["demo"]}),
        )
        .await?;
    let info = json!({
        "endpoint": agent["url"],
        "agent": agent["endpoint_id"],
        "api_key": key["key"],
        "admin_url": admin_url,
        "admin_token": token,
        "port": args.port,
        "upstream": upstream,
    });
    let path = data_dir.join(DEV_FILE);
    moltghost_common::secrets::write_private(&path, &info.to_string())
        .map_err(|e| Failure::Unreachable(format!("{}: {e}", path.display())))?;
    Ok(info)
}

fn announce(args: &DevArgs, info: &Value) {
    let (endpoint, key, agent) = (
        info["endpoint"].as_str().unwrap_or(""),
        info["api_key"].as_str().unwrap_or(""),
        info["agent"].as_str().unwrap_or(""),
    );
    if args.json {
        let line = json!({"endpoint": endpoint, "agent": agent, "api_key": key, "admin_url": info["admin_url"], "upstream": info["upstream"]});
        println!("{line}");
        return;
    }
    let port = args.port;
    println!(
        r#"
MoltGhost dev stack is up.

  endpoint   {endpoint}
  agent      demo ({agent})
  API key    {key}
  admin API  {admin}   (the CLI finds it by itself: try `moltghost auth list-keys`)

Try it (streams tokens as they are generated):

  curl -N{cacert} -X POST {endpoint}/v1/chat \
    -H "Authorization: Bearer {key}" \
    -H "Content-Type: application/json" \
    -d '{{"messages": [{{"role": "user", "content": "Hello, agent!"}}], "stream": true}}'

Or with the openai Python package (the key is scoped to demo, so no Host is needed):

  from openai import OpenAI
  client = OpenAI(api_key="{key}", base_url="http://127.0.0.1:{port}/v1")
  for chunk in client.chat.completions.create(model="llama3.1-70b", stream=True,
          messages=[{{"role": "user", "content": "Analyze Q4 sales"}}]):
      print(chunk.choices[0].delta.content or "", end="", flush=True)

The edge reaches the agent through {path}.
Ctrl-C stops everything. Logs: .moltghost/edge.log, .moltghost/pod.log, .moltghost/runtime.log"#,
        path = if info["upstream"]
            .as_str()
            .is_some_and(|u| u.starts_with("wg://"))
        {
            "a WireGuard tunnel to its pod sidecar (moltghost status demo shows it)"
        } else {
            "plain HTTP (--no-tunnel)"
        },
        admin = info["admin_url"].as_str().unwrap_or(""),
        cacert = if endpoint.starts_with("https") {
            " --cacert .moltghost/dev-ca.pem"
        } else {
            ""
        },
    );
}
