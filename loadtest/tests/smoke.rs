//! A few seconds of each scenario against the reference runtime: the harness runs, its JSON is
//! well-formed and counts what it should. No latency gates (these machines are shared).

use std::process::Command;

use moltghost_loadtest::runtime::{spawn, RuntimeConfig};
use serde_json::Value;

fn loadtest(args: &[&str]) -> (Value, String) {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("out.json");
    let svg = dir.path().join("plots");
    let out = Command::new(env!("CARGO_BIN_EXE_loadtest"))
        .args(args)
        .args([
            "--quiet",
            "--json",
            json.to_str().unwrap(),
            "--svg-dir",
            svg.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    if !v["runs"].as_array().unwrap().is_empty() {
        let plots: Vec<_> = std::fs::read_dir(&svg).unwrap().collect();
        assert!(plots.len() >= 2, "plots: {plots:?}");
    }
    (v, stdout)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_runs_and_reports() {
    let (addr, stats) = spawn(RuntimeConfig::default()).await.unwrap();
    let url = format!("http://{addr}");
    let a = format!("a={url}");
    let b = format!("b={url}");

    let (v, out) = loadtest(&[
        "--target",
        &a,
        "--target",
        &b,
        "--scenario",
        "chat",
        "--rates",
        "100,200",
        "--duration",
        "1s",
        "--warmup",
        "200ms",
        "--round",
        "100ms",
    ]);
    assert_eq!(v["runs"].as_array().unwrap().len(), 2);
    let run = &v["runs"][0];
    for t in run["targets"].as_array().unwrap() {
        assert!(t["ok"].as_u64().unwrap() > 20, "{t}");
        assert!(t["errors"].as_object().unwrap().is_empty(), "{t}");
        let l = &t["latency_us"];
        assert!(l["p50"].as_u64().unwrap() <= l["p99"].as_u64().unwrap());
    }
    assert!(run["targets"][1]["added"]["cycles"].as_u64().unwrap() > 0);
    assert!(v["definitions"]["ttft"].is_string());
    assert!(out.contains("highest rate with p99"), "{out}");

    let (v, _) = loadtest(&[
        "--target",
        &a,
        "--scenario",
        "sse",
        "--tokens",
        "8",
        "--interval-ms",
        "10",
        "--rate",
        "20",
        "--duration",
        "1s",
        "--warmup",
        "100ms",
    ]);
    let t = &v["runs"][0]["targets"][0];
    assert_eq!(
        t["tokens"].as_u64().unwrap(),
        8 * t["ok"].as_u64().unwrap(),
        "{t}"
    );
    assert!(t["itl_us"]["p50"].as_u64().unwrap() >= 5_000, "{t}");
    assert!(t["ttft_us"]["count"].as_u64().unwrap() > 0);

    let before = stats
        .streams_cancelled
        .load(std::sync::atomic::Ordering::Relaxed);
    let stats_url = format!("{url}/mock/stats");
    let (v, out) = loadtest(&[
        "--target",
        &a,
        "--scenario",
        "cancel",
        "--rate",
        "20",
        "--duration",
        "1s",
        "--warmup",
        "100ms",
        "--runtime-stats",
        &stats_url,
    ]);
    assert!(v["runs"][0]["targets"][0]["ok"].as_u64().unwrap() > 5);
    assert!(out.contains("runtime saw"), "{out}");
    assert!(
        stats
            .streams_cancelled
            .load(std::sync::atomic::Ordering::Relaxed)
            > before
    );

    let (v, _) = loadtest(&[
        "--target",
        &a,
        "--scenario",
        "churn",
        "--rate",
        "50",
        "--duration",
        "1s",
        "--warmup",
        "100ms",
    ]);
    assert!(v["runs"][0]["targets"][0]["ok"].as_u64().unwrap() > 20);

    let pid = std::process::id().to_string();
    let (v, _) = loadtest(&[
        "--target",
        &a,
        "--pid",
        &format!("a={pid}"),
        "--scenario",
        "idle",
        "--streams",
        "50",
        "--hold",
        "100ms",
    ]);
    let h = &v["held_streams"][0];
    assert_eq!(h["opened"], 50, "{h}");
    assert!(h["rss_open"].as_u64().is_some());
}

#[test]
fn bad_arguments_are_refused_clearly() {
    let out = Command::new(env!("CARGO_BIN_EXE_loadtest"))
        .args(["--target", "nourl"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("NAME=URL"));
    let out = Command::new(env!("CARGO_BIN_EXE_loadtest"))
        .args(["--target", "a=http://x", "--key", "b=k"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("no --target named"));
}
