//! Faults an operator will meet, each with what the README promises: a runtime killed in the
//! middle of a stream, PostgreSQL taken away (or restarted) under load and brought back, the usage journal's
//! disk filling up, and a broken configuration reloaded under load.

mod common;

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{free_port, wait_port, Options, PgDb, PgServer, Relay, Stack};
use futures_util::StreamExt;
use serde_json::{json, Value};

/// A key of its own for `name`, so its ledger line counts only this test's requests.
async fn key(s: &Stack, name: &str) -> String {
    s.admin_post(
        "/v1/admin/keys",
        json!({"name": name, "account": "default"}),
    )
    .await["key"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// A native chat through `s` on `agent`; its status.
async fn chat(s: &Stack, agent: &str, key: &str) -> u16 {
    s.post_as(agent, "/v1/chat", None)
        .bearer_auth(key)
        .body(r#"{"messages":[{"role":"user","content":"Hello"}]}"#)
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runtime_killed_mid_stream_ends_it_with_an_error_and_bills_what_was_delivered() {
    let port = free_port();
    let mut runtime = Command::new(common::bin("agent-runtime"))
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_port(port, Duration::from_secs(10));
    let s = Stack::start(&format!(
        "[[agents]]\nid = \"mortal1\"\nupstream = \"http://127.0.0.1:{port}\"\n"
    ))
    .await;
    let k = key(&s, "killed").await;
    let resp = s
        .post_as("mortal1", "/v1/chat/completions", None)
        .bearer_auth(&k)
        .header("x-mock-tokens", "1000")
        .header("x-mock-interval-ms", "20")
        .body(r#"{"model":"m","messages":[{"role":"user","content":"Hello"}],"stream":true}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    let mut text = String::new();
    while text.matches("\"content\":\"").count() < 11 {
        text.push_str(&String::from_utf8_lossy(
            &body.next().await.unwrap().unwrap(),
        ));
    }
    runtime.kill().unwrap();
    runtime.wait().unwrap();
    while let Some(Ok(chunk)) = body.next().await {
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(
        text.contains("event: error") && text.contains("upstream_unavailable"),
        "{text}"
    );
    assert!(!text.contains("[DONE]"), "{text}");
    // The ledger holds what the client got, counted as the edge counts a stream without usage:
    // the larger of the text events and their bytes / 4.
    let (events, bytes) = common::sse_data(&text)
        .iter()
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| v["choices"][0]["delta"]["content"].as_str().map(str::len))
        .filter(|n| *n > 0)
        .fold((0u64, 0u64), |(e, b), n| (e + 1, b + n as u64));
    let line = s.ledger_for("killed", 1).await;
    assert_eq!(
        line["completion_tokens"].as_u64().unwrap(),
        events.max(bytes.div_ceil(4)),
        "{line}"
    );
    assert_eq!(line["estimated_requests"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_lost_under_load_loses_and_doubles_nothing() {
    let Some(db) = PgDb::create().await else {
        return;
    };
    let relay = Relay::start("127.0.0.1:5432").await;
    let url = db
        .url
        .replace("127.0.0.1:5432", &format!("127.0.0.1:{}", relay.port));
    store_fault_under_load(&url, || relay.cut(), || relay.restore()).await;
}

/// A real restart: the server ends every session (`57P01`), refuses connections while it is
/// down, then takes them again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_restart_under_load_loses_and_doubles_nothing() {
    let Some(pg) = PgServer::start() else {
        return;
    };
    store_fault_under_load(&pg.url, || pg.pg_ctl("stop"), || pg.pg_ctl("start")).await;
}

/// Four clients hammer an edge on the store at `url` for 9 s; 2 s in, `fault` takes the store
/// away, and 4 s later `heal` brings it back. No request may fail, and every answer served
/// reaches the ledger exactly once.
async fn store_fault_under_load(url: &str, fault: impl FnOnce(), heal: impl FnOnce()) {
    let extra = "[limits]\nfleet_sync = \"100ms\"\n[[plans]]\nname = \"big\"\nrequests_per_minute = 100000\n\
                 tokens_per_month = 100000000\nconcurrent_streams = 100\n";
    let s = Stack::on_store(url, extra).await;
    let k = key(&s, "load").await;
    let served = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + Duration::from_secs(9);
    let s = Arc::new(s);
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (s, k, served, failed) = (s.clone(), k.clone(), served.clone(), failed.clone());
            tokio::spawn(async move {
                while Instant::now() < until {
                    match chat(&s, "abc123", &k).await {
                        200 => served.fetch_add(1, Ordering::Relaxed),
                        _ => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    tokio::task::block_in_place(fault);
    // A store that refuses connections is known gone once a poll's connection attempts give
    // up (the pool's 3 s acquire timeout); one whose connections break, at once.
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    let health = s.admin_get("/v1/admin/health").await;
    assert_eq!(health["status"], "degraded", "the store is gone: {health}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    tokio::task::block_in_place(heal);
    for c in clients {
        c.await.unwrap();
    }
    let served = served.load(Ordering::Relaxed);
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "requests failed while the store was gone"
    );
    assert!(served > 20, "{served}");
    // Everything served while the store was gone reaches the ledger once.
    let t0 = Instant::now();
    loop {
        let billed = billed(&s, "load").await;
        if billed == served {
            break;
        }
        assert!(
            billed < served,
            "counted twice: {billed} billed, {served} served"
        );
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "the ledger never caught up: {billed} of {served}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The requests the ledger holds for the key named `name`.
async fn billed(s: &Stack, name: &str) -> u64 {
    let id = s.key_id(name).await;
    s.usage_by_key()
        .await
        .iter()
        .find(|l| l["group"] == id)
        .and_then(|l| l["requests"].as_u64())
        .unwrap_or(0)
}

/// Waits (up to 5 s: the gauge follows the shipper's rounds) until the metrics contain `line`.
async fn until_metric(s: &Stack, line: &str) {
    let t0 = Instant::now();
    while !s.metrics().await.contains(line) {
        assert!(t0.elapsed() < Duration::from_secs(5), "never saw {line}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A small tmpfs, unmounted when dropped.
struct SmallDisk(tempfile::TempDir);

impl SmallDisk {
    fn mount(size: &str) -> Option<Self> {
        let dir = tempfile::tempdir().unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            assert!(
                std::env::var("CI").is_err(),
                "CI runs as root and can mount a tmpfs"
            );
            eprintln!("skipping: cannot mount a tmpfs (not root?)");
            return None;
        }
        Some(Self(dir))
    }

    /// Fills what is left with a file; returns its path.
    fn fill(&self) -> std::path::PathBuf {
        use std::io::Write;
        let path = self.0.path().join("filler");
        let mut f = std::fs::File::create(&path).unwrap();
        let block = vec![0u8; 4096];
        while f.write_all(&block).is_ok() {}
        let _ = f.write_all(&[0u8]);
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0.path()).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_journal_disk_refuses_metered_requests_and_loses_nothing() {
    let Some(disk) = SmallDisk::mount("4m") else {
        return;
    };
    let Some(db) = PgDb::create().await else {
        return;
    };
    let s = Stack::start_with(Options {
        store_url: Some(db.url.clone()),
        data_dir: Some(disk.0.path().join("edge")),
        extra: "[limits]\nfleet_sync = \"100ms\"\n".into(),
        ..Options::default()
    })
    .await;
    let k = key(&s, "disk").await;
    for _ in 0..3 {
        assert_eq!(chat(&s, "abc123", &k).await, 200);
    }
    let filler = disk.fill();
    // Answers go on while the journal's last page has room; the first whose row the journal
    // cannot take is still served (the row kept in memory), and from then on metered requests
    // are refused.
    let mut served = 3;
    let refused = loop {
        let r = s
            .post_as("abc123", "/v1/chat", None)
            .bearer_auth(&k)
            .body(r#"{"messages":[{"role":"user","content":"Hello"}]}"#)
            .send()
            .await
            .unwrap();
        if r.status() != 200 {
            break r;
        }
        served += 1;
        assert!(served < 100, "the journal never filled up");
    };
    assert_eq!(refused.status(), 503);
    assert_eq!(refused.headers()["retry-after"], "5");
    let v: Value = refused.json().await.unwrap();
    assert_eq!(v["error"]["code"], "ledger_unavailable");
    // What costs no tokens is still served.
    let models = s
        .client()
        .get(s.url("abc123", "/v1/models"))
        .bearer_auth(&k)
        .send()
        .await
        .unwrap();
    assert_eq!(models.status(), 200);
    until_metric(&s, "moltghost_journal_writable 0").await;
    // The kept row reaches the store meanwhile.
    s.ledger_for("disk", served).await;

    std::fs::remove_file(filler).unwrap();
    let t0 = Instant::now();
    while chat(&s, "abc123", &k).await != 200 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "metered requests never came back:\n{}",
            s.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    until_metric(&s, "moltghost_journal_writable 1").await;
    // Every answer served is billed once: none lost, none twice.
    served += 1;
    s.ledger_for("disk", served).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    s.ledger_for("disk", served).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_config_reloaded_under_load_is_refused_and_serving_goes_on() {
    let s = Arc::new(
        Stack::start(
            "[[plans]]\nname = \"big\"\nrequests_per_minute = 100000\ntokens_per_month = 100000000\n\
             concurrent_streams = 100\n",
        )
        .await,
    );
    let k = key(&s, "reload").await;
    let statuses = Arc::new(std::sync::Mutex::new(Vec::new()));
    let until = Instant::now() + Duration::from_secs(4);
    let clients: Vec<_> = (0..3)
        .map(|_| {
            let (s, k, statuses) = (s.clone(), k.clone(), statuses.clone());
            tokio::spawn(async move {
                while Instant::now() < until {
                    let status = chat(&s, "abc123", &k).await;
                    statuses.lock().unwrap().push(status);
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let conf = s.dir.path().join("edge.toml");
    let good = std::fs::read_to_string(&conf).unwrap();
    std::fs::write(
        &conf,
        good.replace("[store]", "[limits]\nrequest_timeout = \"soon\"\n[store]"),
    )
    .unwrap();
    let r = s.reload().await;
    let status = r.status().as_u16();
    let v: Value = r.json().await.unwrap();
    assert!(
        (400..500).contains(&status) && v.to_string().contains("request_timeout"),
        "{status} {v}"
    );
    for c in clients {
        c.await.unwrap();
    }
    let statuses = statuses.lock().unwrap();
    let ok = statuses.iter().filter(|s| **s == 200).count();
    assert!(statuses.len() > 10, "{}", statuses.len());
    assert_eq!(
        ok,
        statuses.len(),
        "{} of {} answered 200",
        ok,
        statuses.len()
    );
}
