//! The spec's examples as a conformance suite, against `moltghost dev` (the README's first
//! command), with the clients users already have: curl (streamed and not), the official `openai`
//! Python and npm packages, the `ws` example, the `@moltghost/sdk` example and its `node --test`
//! suite, the CLI's commands, every row of the error table provoked for real, and a schemathesis
//! run against `api/openapi.yaml`. In CI every client must be present; elsewhere a missing one
//! skips with a printed reason.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{free_port, run};
use serde_json::{json, Value};

/// The stack `moltghost dev` runs, stopped (Ctrl-C) when dropped.
struct Dev {
    child: Child,
    dir: tempfile::TempDir,
    port: u16,
    runtime_port: u16,
    endpoint: String,
    agent: String,
    key: String,
}

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

impl Dev {
    fn start() -> Option<Self> {
        let cli = &common::bin("moltghost");
        if !cli.with_file_name("agent-runtime").exists() {
            assert!(std::env::var("CI").is_err(), "CI builds agent-runtime");
            eprintln!("skipping: build agent-runtime first (cargo build --workspace --bins)");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let (port, admin, runtime_port) = (free_port(), free_port(), free_port());
        let mut child = Command::new(cli)
            .args(["--data-dir", dir.path().to_str().unwrap(), "dev", "--json"])
            .args(["--port", &port.to_string()])
            .args(["--admin-port", &admin.to_string()])
            .args(["--runtime-port", &runtime_port.to_string()])
            .args(["--pod-port", &common::free_udp_port().to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let info: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
        Some(Self {
            child,
            dir,
            port,
            runtime_port,
            endpoint: info["endpoint"].as_str().unwrap().to_owned(),
            agent: info["agent"].as_str().unwrap().to_owned(),
            key: info["api_key"].as_str().unwrap().to_owned(),
        })
    }

    /// Runs the CLI against this stack; its stdout, or a panic with its stderr.
    fn cli(&self, args: &[&str]) -> String {
        let (code, out, err) = run(Command::new(common::bin("moltghost"))
            .args(["--data-dir", self.dir.path().to_str().unwrap()])
            .args(args));
        assert_eq!(code, 0, "moltghost {args:?}: {err}");
        out
    }

    /// `http://<id>.agent.localhost:PORT`: curl resolves `*.localhost` to loopback by itself.
    fn url(&self, id: &str) -> String {
        format!("http://{id}.agent.localhost:{}", self.port)
    }

    fn loopback(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

/// A curl answer: status, headers (lower-case names), body.
struct Answer {
    status: u16,
    headers: HashMap<String, String>,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }

    /// Checks an error answer against the table: status, code, type, `x-request-id` and the
    /// row's extra headers.
    fn is_error(&self, status: u16, code: &str, kind: &str, headers: &[(&str, &str)]) {
        assert_eq!(self.status, status, "{code}: {}", self.body);
        let e = self.json();
        assert_eq!(e["error"]["code"], code, "{}", self.body);
        assert_eq!(e["error"]["type"], kind, "{}", self.body);
        assert!(e["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
        assert!(self.headers.contains_key("x-request-id"), "{code}");
        for (k, v) in headers {
            assert_eq!(
                self.headers.get(*k).map(String::as_str),
                Some(*v),
                "{code}: {k}"
            );
        }
    }
}

/// Runs curl with `args` (plus `-sS -i`) and splits its answer.
fn curl(args: &[&str]) -> Answer {
    let (code, out, err) = run(Command::new("curl").args(["-sS", "-i"]).args(args));
    assert_eq!(code, 0, "curl {args:?}: {err}");
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Answer {
        status,
        headers,
        body: body.to_owned(),
    }
}

/// Whether `program --version` runs; in CI it must.
fn have(program: &str, why: &str) -> bool {
    let ok = Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var("CI").is_err(),
            "CI must have {program} ({why}; run scripts/setup.sh)"
        );
        eprintln!("skipping: no {program} ({why}; run scripts/setup.sh)");
    }
    ok
}

fn sdk_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../sdk/js")
}

/// Whether the SDK's packages are installed and it is built (`scripts/setup.sh` does both).
fn have_sdk() -> bool {
    let dir = sdk_dir();
    let ok = have("node", "the JavaScript clients")
        && dir.join("node_modules/ws").exists()
        && dir.join("node_modules/openai").exists()
        && dir.join("dist/index.js").exists();
    if !ok {
        assert!(
            std::env::var("CI").is_err(),
            "CI must have sdk/js installed and built (scripts/setup.sh)"
        );
        eprintln!("skipping the JavaScript clients: run scripts/setup.sh (npm ci, npm run build in sdk/js)");
    }
    ok
}

/// Runs a Node script of sdk/js with `env`; its stdout.
fn node(script: &str, env: &[(&str, &str)]) -> String {
    let (code, out, err) = run(Command::new("node")
        .current_dir(sdk_dir())
        .arg(script)
        .envs(env.iter().copied()));
    assert_eq!(code, 0, "node {script}: {out}\n{err}");
    out
}

const CHAT: &str =
    r#"{"messages": [{"role": "user", "content": "Hello, agent!"}], "stream": false}"#;

#[test]
fn the_spec_examples_work_as_printed() {
    let Some(dev) = Dev::start() else { return };
    let (endpoint, key) = (dev.endpoint.clone(), dev.key.clone());
    let bearer = format!("Authorization: Bearer {key}");

    // Quick start: `moltghost status my-agent --url`, then the test connection.
    assert_eq!(dev.cli(&["status", "demo", "--url"]).trim(), endpoint);
    let a = curl(&[
        "-X",
        "POST",
        &format!("{endpoint}/v1/chat"),
        "-H",
        &bearer,
        "-H",
        "Content-Type: application/json",
        "-d",
        CHAT,
    ]);
    assert_eq!(a.status, 200, "{}", a.body);
    let v = a.json();
    assert_eq!(v["object"], "chat.completion");
    assert!(v["id"].as_str().is_some_and(|id| !id.is_empty()));
    assert!(v["content"].as_str().unwrap().starts_with("Hello!"));
    assert_eq!(v["model"], "llama3.1-70b");
    assert_eq!(v["finish_reason"], "stop");
    let u = &v["usage"];
    assert_eq!(
        u["total_tokens"].as_u64().unwrap(),
        u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap()
    );

    // "4. Direct HTTP/cURL": streaming, as printed (no Content-Type), --no-buffer.
    let a = curl(&[
        "-X",
        "POST",
        &format!("{endpoint}/v1/chat"),
        "-H",
        &bearer,
        "-d",
        r#"{"messages": [{"role": "user", "content": "..."}], "stream": true}"#,
        "--no-buffer",
    ]);
    assert_eq!(a.status, 200, "{}", a.body);
    assert!(a.headers["content-type"].starts_with("text/event-stream"));
    let events = common::sse_data(&a.body);
    assert!(events.len() > 3, "{}", a.body);
    assert_eq!(events.last().unwrap(), "[DONE]");
    let done: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(done["done"], true);
    assert!(done["usage"]["total_tokens"].as_u64().unwrap() > 0);
    let first: Value = serde_json::from_str(&events[0]).unwrap();
    assert_eq!(first, json!({"content": "Hello!", "done": false}));

    // The spec's endpoints table: /v1/completions streams, /v1/tools, /v1/models, /v1/health.
    let a = curl(&[
        "-X",
        "POST",
        &format!("{endpoint}/v1/completions"),
        "-H",
        &bearer,
        "-d",
        r#"{"prompt": "Once", "stream": true}"#,
    ]);
    assert!(
        a.status == 200 && a.body.ends_with("data: [DONE]\n\n"),
        "{}",
        a.body
    );
    let a = curl(&[
        "-X",
        "POST",
        &format!("{endpoint}/v1/tools"),
        "-H",
        &bearer,
        "-d",
        r#"{"tool": "crm_query", "arguments": {"top": 3}}"#,
    ]);
    assert_eq!(a.json()["result"]["echo"]["top"], 3, "{}", a.body);
    let a = curl(&[&format!("{endpoint}/v1/models"), "-H", &bearer]);
    assert_eq!(a.json()["data"][0]["id"], "llama3.1-70b", "{}", a.body);
    let a = curl(&[&format!("{endpoint}/v1/health"), "-H", &bearer]);
    assert_eq!(a.json()["state"], "running", "{}", a.body);
    assert_eq!(a.json()["pod"]["reachable"], true, "{}", a.body);

    // "Getting API Keys": create, list, revoke (safe for rotation).
    let new_key = dev.cli(&[
        "auth",
        "create-key",
        "--agent",
        "demo",
        "--name",
        "Production API",
    ]);
    let new_key = new_key.trim();
    assert!(new_key.starts_with("molti_"), "{new_key}");
    assert!(dev.cli(&["auth", "list-keys"]).contains("Production API"));
    let with = |k: &str| {
        curl(&[
            "-X",
            "POST",
            &format!("{endpoint}/v1/chat"),
            "-H",
            &format!("Authorization: Bearer {k}"),
            "-d",
            CHAT,
        ])
        .status
    };
    assert_eq!(with(new_key), 200);
    assert!(dev
        .cli(&["auth", "revoke-key", new_key])
        .starts_with("revoked"));
    assert_eq!(with(new_key), 401);

    // The official openai Python package: the spec's example as printed.
    let base_url = format!("{}/v1", dev.loopback());
    if common::have_openai_python() {
        let (code, out, err) = run(Command::new("python3")
            .arg(common::client_script("spec_openai.py"))
            .env("MOLTGHOST_BASE_URL", &base_url)
            .env("MOLTGHOST_KEY", &key));
        assert_eq!(code, 0, "{err}");
        assert!(out.starts_with("Hello! I'm ready to help."), "{out}");
    }

    // The JavaScript clients: `ws` (the spec's example), the SDK's example, the openai npm
    // package, and the SDK's own suite.
    if have_sdk() {
        let ws_url = format!("ws://127.0.0.1:{}/ws", dev.port);
        let out = node(
            "examples/spec-ws.cjs",
            &[("MOLTGHOST_WS_URL", &ws_url), ("MOLTGHOST_KEY", &key)],
        );
        assert!(out.starts_with("Hello! I'm ready to help."), "{out}");
        let env = [
            ("MOLTGHOST_AGENT", dev.agent.as_str()),
            ("MOLTGHOST_KEY", key.as_str()),
            ("MOLTGHOST_ENDPOINT", &dev.loopback()),
        ];
        let out = node("examples/spec-sdk.mjs", &env);
        assert!(out.starts_with("Hello!\n"), "{out}");
        let total: u64 = out
            .lines()
            .last()
            .and_then(|l| l.strip_prefix("Total tokens: "))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{out}"));
        assert!(total > 0);
        let out = node(
            "examples/openai-npm.mjs",
            &[("MOLTGHOST_BASE_URL", &base_url), ("MOLTGHOST_KEY", &key)],
        );
        let summary: Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
        assert!(
            summary["streamed"].as_str().unwrap().starts_with("Hello!"),
            "{summary}"
        );
        assert!(
            summary["usage"]["total_tokens"].as_u64().unwrap() > 0,
            "{summary}"
        );
        assert!(
            summary["whole"].as_str().unwrap().starts_with("Hello!"),
            "{summary}"
        );
        assert_eq!(
            summary["refused"],
            json!({"status": 401, "code": "invalid_api_key", "type": "authentication_error"})
        );
        let (code, out, err) = run(Command::new("node")
            .current_dir(sdk_dir())
            .args(["--test", "test/"])
            .envs(env.iter().copied()));
        assert_eq!(code, 0, "node --test: {out}\n{err}");
        assert!(
            out.contains("# fail 0") && out.contains("# skipped 0"),
            "{out}"
        );
    }
}

#[test]
fn every_error_of_the_table_is_what_the_spec_says() {
    let Some(dev) = Dev::start() else { return };
    let (endpoint, key) = (dev.endpoint.clone(), dev.key.clone());
    let bearer = format!("Authorization: Bearer {key}");
    let chat_at = |url: &str, auth: &str, extra: &[&str]| {
        let mut args = vec!["-X", "POST", url, "-H", auth];
        args.extend_from_slice(extra);
        if !extra.contains(&"-d") {
            args.extend_from_slice(&["-d", CHAT]);
        }
        curl(&args)
    };
    let chat = format!("{endpoint}/v1/chat");

    // 401: a missing, malformed or unknown key, one answer for all.
    for auth in [
        "X-Nothing: 1",
        "Authorization: Bearer nope",
        "Authorization: Bearer molti_abc_xyz",
    ] {
        chat_at(&chat, auth, &[]).is_error(401, "invalid_api_key", "authentication_error", &[]);
    }
    // 400, 404, 405, 413.
    chat_at(&chat, &bearer, &["-d", "{not json"]).is_error(
        400,
        "invalid_request",
        "invalid_request_error",
        &[],
    );
    chat_at(
        &chat,
        &bearer,
        &["-d", r#"{"messages": [], "temperature": 9}"#],
    )
    .is_error(400, "invalid_request", "invalid_request_error", &[]);
    chat_at(&format!("{endpoint}/v1/nothing"), &bearer, &[]).is_error(
        404,
        "not_found",
        "invalid_request_error",
        &[],
    );
    chat_at(&format!("{}/v1/chat", dev.url("nosuch")), &bearer, &[]).is_error(
        404,
        "not_found",
        "invalid_request_error",
        &[],
    );
    curl(&[&chat, "-H", &bearer]).is_error(
        405,
        "method_not_allowed",
        "invalid_request_error",
        &[("allow", "POST")],
    );
    let big = format!(
        r#"{{"messages": [{{"role": "user", "content": "{}"}}]}}"#,
        "x".repeat(9 << 20)
    );
    let body_file = dev.dir.path().join("big.json");
    std::fs::write(&body_file, big).unwrap();
    chat_at(
        &chat,
        &bearer,
        &["-d", &format!("@{}", body_file.display())],
    )
    .is_error(413, "request_too_large", "invalid_request_error", &[]);
    // 504: `timeout_seconds` shorter than the agent's answer.
    chat_at(
        &chat,
        &bearer,
        &[
            "-H",
            "x-mock-ttft-ms: 3000",
            "-d",
            r#"{"messages": [{"role": "user", "content": "x"}], "timeout_seconds": 1}"#,
        ],
    )
    .is_error(504, "timeout", "timeout_error", &[]);

    // Agents in every state, on the same runtime (and one whose runtime is down: 502).
    let runtime = format!("http://127.0.0.1:{}", dev.runtime_port);
    let dead = format!("http://127.0.0.1:{}", free_port());
    for (name, upstream, state) in [
        ("starting", runtime.as_str(), "initializing"),
        ("retired", runtime.as_str(), "running"),
        ("broken", dead.as_str(), "running"),
    ] {
        dev.cli(&[
            "agent",
            "create",
            name,
            "--upstream",
            upstream,
            "--state",
            state,
        ]);
    }
    dev.cli(&["agent", "terminate", "retired"]);
    let account_key = dev.cli(&[
        "auth",
        "create-key",
        "--account",
        "default",
        "--name",
        "errors",
    ]);
    let account_bearer = format!("Authorization: Bearer {}", account_key.trim());
    let id_of = |name: &str| {
        let v: Value = serde_json::from_str(&dev.cli(&["status", name, "--json"])).unwrap();
        v["endpoint_id"].as_str().unwrap().to_owned()
    };
    std::thread::sleep(Duration::from_millis(1500)); // the edge polls the store
    let at = |name: &str| format!("{}/v1/chat", dev.url(&id_of(name)));
    chat_at(&at("starting"), &account_bearer, &[]).is_error(
        202,
        "agent_initializing",
        "service_unavailable",
        &[("retry-after", "60")],
    );
    chat_at(&at("retired"), &account_bearer, &[]).is_error(
        410,
        "agent_terminated",
        "gone",
        &[("x-should-retry", "false")],
    );
    chat_at(&at("broken"), &account_bearer, &[]).is_error(
        502,
        "upstream_unavailable",
        "upstream_error",
        &[],
    );
    dev.cli(&["agent", "pause", "demo"]);
    std::thread::sleep(Duration::from_millis(1500));
    let paused = chat_at(&chat, &bearer, &[]);
    paused.is_error(503, "agent_paused", "service_unavailable", &[]);
    assert!(paused.headers.contains_key("retry-after"));
    dev.cli(&["agent", "start", "demo"]);

    // The `trial` plan's limits: 20 requests a minute (403), 1000 tokens a month (429).
    dev.cli(&["account", "create", "small", "--plan", "trial"]);
    dev.cli(&[
        "agent",
        "create",
        "small-agent",
        "--upstream",
        &runtime,
        "--account",
        "small",
    ]);
    let small_key = |name: &str| {
        let k = dev.cli(&[
            "auth",
            "create-key",
            "--agent",
            "small-agent",
            "--name",
            name,
        ]);
        format!("Authorization: Bearer {}", k.trim())
    };
    let (rate_key, quota_key) = (small_key("rate"), small_key("quota"));
    std::thread::sleep(Duration::from_millis(1500));
    let small = format!("{}/v1", dev.url(&id_of("small-agent")));
    let models = format!("{small}/models");
    let refused = (0..25)
        .map(|_| curl(&[&models, "-H", &rate_key]))
        .find(|a| a.status != 200)
        .expect("the plan's rate is enforced");
    refused.is_error(403, "rate_limited", "rate_limit_error", &[]);
    assert!(refused.headers["retry-after"].parse::<u64>().unwrap() <= 60);
    // A stream longer than the quota is cut at the quota with an error event, then 429.
    let cut = chat_at(
        &format!("{small}/chat"),
        &quota_key,
        &[
            "-H",
            "x-mock-tokens: 1500",
            "-d",
            r#"{"messages": [{"role": "user", "content": "x"}], "stream": true}"#,
        ],
    );
    assert!(
        cut.body.contains("event: error") && cut.body.contains("quota_exceeded"),
        "{}",
        cut.body
    );
    chat_at(&format!("{small}/chat"), &quota_key, &[]).is_error(
        429,
        "quota_exceeded",
        "rate_limit_error",
        &[("x-should-retry", "false")],
    );

    // The WebSocket refuses a bad key before the upgrade, with the same JSON.
    curl(&[
        &format!("{}/ws", dev.loopback()),
        "-H",
        "Authorization: Bearer molti_abc_xyz",
        "-H",
        "Connection: Upgrade",
        "-H",
        "Upgrade: websocket",
        "-H",
        "Sec-WebSocket-Version: 13",
        "-H",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
    ])
    .is_error(401, "invalid_api_key", "authentication_error", &[]);

    // The published description holds: schemathesis finds no 5xx and no answer outside it.
    if have("schemathesis", "the OpenAPI conformance run") {
        let spec = Path::new(env!("CARGO_MANIFEST_DIR")).join("../api/openapi.yaml");
        let (code, out, err) = run(Command::new("schemathesis")
            .current_dir(dev.dir.path())
            .args(["run", spec.to_str().unwrap(), "--url", &dev.loopback()])
            .args([
                "-H",
                &bearer,
                "-H",
                "x-mock-interval-ms: 0",
                "-H",
                "x-mock-ttft-ms: 0",
            ])
            .args([
                "--checks",
                "all",
                "--max-examples",
                "40",
                "--seed",
                "1",
                "--no-color",
            ])
            .args([
                "--exclude-operation-id",
                "websocket",
                "--output-sanitize",
                "false",
            ]));
        assert_eq!(code, 0, "schemathesis found problems:\n{out}\n{err}");
        assert!(out.contains(" passed"), "{out}");
    }
}
