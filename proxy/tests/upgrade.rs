//! Zero-downtime binary upgrade (listening sockets handed over on SIGQUIT) and a reload, under
//! streaming load: no request fails and no stream is cut.

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::Stack;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_and_reload_under_streaming_load_lose_nothing() {
    let mut s = Stack::start("[[plans]]\nname = \"p\"\nrequests_per_minute = 10000000\ntokens_per_month = 100000000000\nconcurrent_streams = 1000\n").await;
    let (port, key) = (s.port, s.key.clone());
    let stop = Arc::new(AtomicBool::new(false));
    let (ok_streams, ok_calls, failures) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let mut tasks = Vec::new();
    for w in 0..8 {
        let (stop, ok_streams, ok_calls, failures, key) = (
            stop.clone(),
            ok_streams.clone(),
            ok_calls.clone(),
            failures.clone(),
            key.clone(),
        );
        tasks.push(tokio::spawn(async move {
            // A new connection per request: a client's idle pooled connection may be closed by
            // a draining edge at any time, as by any HTTP server.
            let c = reqwest::Client::builder()
                .no_proxy()
                .pool_max_idle_per_host(0)
                .build()
                .unwrap();
            while !stop.load(Ordering::Relaxed) {
                let stream = w % 2 == 0;
                let r = c
                    .post(format!("http://127.0.0.1:{port}/v1/chat/completions"))
                    .header("host", format!("abc123.agent.localhost:{port}"))
                    .bearer_auth(&key)
                    .header("x-mock-interval-ms", if stream { "40" } else { "0" })
                    .header("x-mock-tokens", if stream { "12" } else { "4" })
                    .json(
                        &json!({"messages": [{"role": "user", "content": "hi"}], "stream": stream}),
                    )
                    .send()
                    .await;
                let whole = match r {
                    Ok(r) if r.status() == 200 => match r.text().await {
                        Ok(t) if stream => t.ends_with("data: [DONE]\n\n"),
                        Ok(t) => t.contains("\"usage\""),
                        Err(e) => {
                            eprintln!("body: {e:?}");
                            false
                        }
                    },
                    Ok(r) => {
                        eprintln!(
                            "status {}: {}",
                            r.status(),
                            r.text().await.unwrap_or_default()
                        );
                        false
                    }
                    Err(e) => {
                        eprintln!("send: {e:?}");
                        false
                    }
                };
                match (whole, stream) {
                    (true, true) => ok_streams.fetch_add(1, Ordering::Relaxed),
                    (true, false) => ok_calls.fetch_add(1, Ordering::Relaxed),
                    (false, _) => failures.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1200)).await;

    // The new binary takes over the listening sockets; the old one drains and exits.
    let conf = s.dir.path().join("edge.toml");
    let log = s.dir.path().join("edge-new.log");
    let out = std::fs::File::create(&log).unwrap();
    let mut new = Command::new(env!("CARGO_BIN_EXE_moltghost-proxy"))
        .args(["--config", conf.to_str().unwrap(), "--upgrade"])
        .env("MOLTGHOST_ADMIN_SECRET", common::ADMIN_SECRET)
        .env("MOLTGHOST_KEY_SECRET", common::KEY_SECRET)
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    let sock = s.dir.path().canonicalize().unwrap().join("upgrade.sock");
    let t0 = Instant::now();
    while !sock.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the new edge never opened {}",
            sock.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Command::new("kill")
        .args(["-QUIT", &s.child.id().to_string()])
        .status()
        .unwrap();
    let old_exit = tokio::task::spawn_blocking(move || {
        let t0 = Instant::now();
        loop {
            if let Some(st) = s.child.try_wait().unwrap() {
                return (st, t0.elapsed(), s);
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "the old edge did not exit"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // And a reload of the new one, still under load.
    Command::new("kill")
        .args(["-HUP", &new.id().to_string()])
        .status()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let (status, took, s) = old_exit.await.unwrap();
    let (streams, calls, failed) = (
        ok_streams.load(Ordering::Relaxed),
        ok_calls.load(Ordering::Relaxed),
        failures.load(Ordering::Relaxed),
    );
    println!("upgrade + reload under load: {streams} streams and {calls} requests whole, {failed} failed; old edge exited in {took:?}");
    let new_log = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = new.kill();
    let _ = new.wait();
    assert!(status.success(), "old edge: {status}");
    assert_eq!(failed, 0, "old log:\n{}\nnew log:\n{new_log}", s.log());
    assert!(
        streams > 20 && calls > 50,
        "{streams} streams, {calls} calls"
    );
    assert!(new_log.contains("configuration reloaded"), "{new_log}");
}
