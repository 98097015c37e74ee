//! Keys, accounts and agents end to end: the store (SQLite and PostgreSQL), the admin API, the
//! `moltghost` CLI with the spec's commands verbatim, and a fleet of edges on one PostgreSQL.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{admin_token, run, PgBouncer, PgDb, Relay, Stack};
use futures_util::StreamExt;
use serde_json::{json, Value};

const CHAT: &str = r#"{"messages": [{"role": "user", "content": "Hello, agent!"}]}"#;

/// Status and body of a chat call with `auth` as the Authorization header.
async fn chat(s: &Stack, agent: &str, auth: Option<&str>) -> (u16, Value) {
    let mut req = s.post_as(agent, "/v1/chat", None).body(CHAT);
    if let Some(a) = auth {
        req = req.header("authorization", a);
    }
    let r = req.send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_key_gets_the_same_401_on_every_route() {
    let s = Stack::start("").await;
    let scoped = s
        .admin_post(
            "/v1/admin/keys",
            json!({"name": "scoped", "agents": ["abc123"]}),
        )
        .await;
    let scoped = scoped["key"].as_str().unwrap();
    let revoked = s
        .admin_post("/v1/admin/keys", json!({"name": "r", "account": "default"}))
        .await;
    s.admin_post("/v1/admin/keys/revoke", json!({"id": revoked["id"]}))
        .await;
    let expiring = s
        .admin_post(
            "/v1/admin/keys",
            json!({"name": "e", "account": "default", "expires_in_seconds": 1}),
        )
        .await;
    assert_eq!(
        chat(
            &s,
            "abc123",
            Some(&bearer(expiring["key"].as_str().unwrap()))
        )
        .await
        .0,
        200
    );
    tokio::time::sleep(Duration::from_millis(2100)).await;

    let unknown = format!("molti_default_{}", "A".repeat(40));
    let wrong_account = s.key.replace("molti_default_", "molti_other_");
    let bad: Vec<(&str, Option<String>)> = vec![
        ("missing", None),
        ("malformed", Some("Bearer not-a-key".into())),
        ("wrong scheme", Some(format!("Basic {}", s.key))),
        ("unknown", Some(bearer(&unknown))),
        ("wrong account", Some(bearer(&wrong_account))),
        ("revoked", Some(bearer(revoked["key"].as_str().unwrap()))),
        ("expired", Some(bearer(expiring["key"].as_str().unwrap()))),
    ];
    let expected = json!({"error": {"code": "invalid_api_key", "message": "Invalid API key: check the key in the Authorization header", "type": "authentication_error"}});
    for (what, auth) in &bad {
        let (status, body) = chat(&s, "abc123", auth.as_deref()).await;
        assert_eq!((status, &body), (401, &expected), "{what}");
    }
    // Out of scope: a key for abc123 used on another agent, whatever that agent's state.
    for agent in ["paused1", "down1"] {
        assert_eq!(
            chat(&s, agent, Some(&bearer(scoped))).await,
            (401, expected.clone()),
            "scope {agent}"
        );
    }
    // Every route checks, /v1/health included.
    let c = reqwest::Client::builder().no_proxy().build().unwrap();
    for (m, path) in [
        ("GET", "/v1/health"),
        ("GET", "/v1/models"),
        ("POST", "/v1/tools"),
        ("POST", "/v1/completions"),
        ("POST", "/v1/chat/completions"),
    ] {
        let r = c
            .request(
                m.parse().unwrap(),
                format!("http://127.0.0.1:{}{path}", s.port),
            )
            .header("host", format!("abc123.agent.localhost:{}", s.port))
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{path}");
    }
    assert_eq!(chat(&s, "abc123", Some(&bearer(scoped))).await.0, 200);
}

/// Runs the CLI against `s`.
fn cli(s: &Stack, args: &[&str]) -> (i32, String, String) {
    run(Command::new(common::bin("moltghost"))
        .args(args)
        .env("MOLTGHOST_ADMIN_URL", s.admin_url())
        .env("MOLTGHOST_ADMIN_TOKEN", admin_token())
        .env("MOLTGHOST_DATA_DIR", s.dir.path()))
}

fn curl_chat(url: &str, key: &str) -> u16 {
    let (_, out, _) = run(Command::new("curl").args([
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-X",
        "POST",
        &format!("{url}/v1/chat"),
        "-H",
        &format!("Authorization: Bearer {key}"),
        "-H",
        "Content-Type: application/json",
        "-d",
        CHAT,
    ]));
    out.parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_spec_cli_commands_work_verbatim() {
    let s = Stack::start("").await;
    let upstream = format!("http://{}", s.runtime);
    let (code, out, err) = cli(
        &s,
        &["agent", "create", "my-agent", "--upstream", &upstream],
    );
    assert_eq!(code, 0, "{out}{err}");

    // moltghost status my-agent --url
    let (code, url, err) = cli(&s, &["status", "my-agent", "--url"]);
    assert_eq!(code, 0, "{err}");
    let url = url.trim().to_owned();
    assert!(
        url.starts_with("http://") && url.ends_with(&format!(".agent.localhost:{}", s.port)),
        "{url}"
    );

    // moltghost auth create-key --agent my-agent --name "Production API": the key alone on stdout.
    let (code, key, err) = cli(
        &s,
        &[
            "auth",
            "create-key",
            "--agent",
            "my-agent",
            "--name",
            "Production API",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let key = key.trim().to_owned();
    assert!(moltghost::keys::parse_key(&key).is_some(), "{key:?}");
    assert_eq!(curl_chat(&url, &key), 200);

    // moltghost auth list-keys
    let (code, list, _) = cli(&s, &["auth", "list-keys"]);
    assert_eq!(code, 0);
    assert!(
        list.contains("Production API") && list.contains("active"),
        "{list}"
    );
    assert!(!list.contains(&key), "list-keys shows a key: {list}");
    let (_, json_list, _) = cli(&s, &["auth", "list-keys", "--json"]);
    let v: Value = serde_json::from_str(&json_list).unwrap();
    assert!(v["keys"]
        .as_array()
        .unwrap()
        .iter()
        .all(|k| k.get("hash").is_none() && k.get("key").is_none()));

    // moltghost auth revoke-key molti_...: refused at once.
    let (code, out, _) = cli(&s, &["auth", "revoke-key", &key]);
    assert_eq!(code, 0);
    assert!(out.starts_with("revoked key_"), "{out}");
    assert_eq!(curl_chat(&url, &key), 401);
    let (_, list, _) = cli(&s, &["auth", "list-keys"]);
    assert!(list.contains("revoked"), "{list}");

    // moltghost agent pause / start my-agent
    let (code, key2, _) = cli(
        &s,
        &[
            "auth",
            "create-key",
            "--agent",
            "my-agent",
            "--name",
            "second",
        ],
    );
    assert_eq!(code, 0);
    let key2 = key2.trim();
    assert_eq!(cli(&s, &["agent", "pause", "my-agent"]).0, 0);
    assert_eq!(curl_chat(&url, key2), 503);
    let (code, out, _) = cli(&s, &["agent", "start", "my-agent"]);
    assert_eq!(code, 0);
    assert!(out.contains("running"), "{out}");
    assert_eq!(curl_chat(&url, key2), 200);
    // By endpoint id too, and revocation by key id.
    let id = url.trim_start_matches("http://").split('.').next().unwrap();
    let (_, st, _) = cli(&s, &["status", id, "--json"]);
    assert_eq!(
        serde_json::from_str::<Value>(&st).unwrap()["name"],
        "my-agent"
    );
    let keys: Value = serde_json::from_str(&cli(&s, &["auth", "list-keys", "--json"]).1).unwrap();
    let second = keys["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["name"] == "second")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (code, _, err) = cli(&s, &["auth", "revoke-key", &second]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(curl_chat(&url, key2), 401);

    // Terminate is final.
    assert_eq!(cli(&s, &["agent", "terminate", "my-agent"]).0, 0);
    let (code, _, err) = cli(&s, &["agent", "start", "my-agent"]);
    assert_eq!(code, 1);
    assert!(err.contains("terminated"), "{err}");

    // Accounts and plans.
    let (code, out, _) = cli(&s, &["account", "create", "acme"]);
    assert_eq!(code, 0, "{out}");
    assert!(cli(&s, &["account", "list"]).1.contains("acme"));
    assert!(cli(&s, &["plan", "list"]).1.contains("default"));
    let (code, _, err) = cli(&s, &["account", "set-plan", "acme", "platinum"]);
    assert_eq!(code, 1);
    assert!(err.contains("unknown plan"), "{err}");

    // Meaningful errors and exit codes.
    let (code, _, err) = cli(&s, &["status", "nope"]);
    assert_eq!((code, err.contains("not found")), (1, true), "{err}");
    let (code, _, err) = run(Command::new(common::bin("moltghost")).args([
        "status",
        "x",
        "--admin-url",
        "http://127.0.0.1:1",
        "--token",
        "t",
    ]));
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("cannot reach"), "{err}");
    let (code, _, _) = run(Command::new(common::bin("moltghost")).args(["auth", "bogus"]));
    assert_eq!(code, 2);
    let (code, help, _) = run(Command::new(common::bin("moltghost")).arg("--help"));
    assert_eq!(code, 0);
    assert!(
        help.contains("moltghost auth create-key --agent demo --name \"Production API\""),
        "{help}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_key_is_stored_in_plain_text() {
    let s = Stack::start("").await;
    let mut keys = vec![s.key.clone()];
    for i in 0..3 {
        let k = s
            .admin_post(
                "/v1/admin/keys",
                json!({"name": format!("k{i}"), "agents": ["abc123"]}),
            )
            .await;
        keys.push(k["key"].as_str().unwrap().to_owned());
    }
    for k in &keys {
        assert_eq!(chat(&s, "abc123", Some(&bearer(k))).await.0, 200);
    }
    tokio::time::sleep(Duration::from_millis(600)).await; // a last-used flush
    let mut scanned = 0;
    for entry in std::fs::read_dir(s.dir.path()).unwrap() {
        let entry = entry.unwrap();
        // The tunnel bridge's Unix socket holds nothing to read.
        if !entry.file_type().unwrap().is_file() {
            continue;
        }
        let path = entry.path();
        let bytes = std::fs::read(&path).unwrap();
        scanned += bytes.len();
        for k in &keys {
            let token = k.rsplit('_').next().unwrap();
            let hay = String::from_utf8_lossy(&bytes);
            assert!(
                !hay.contains(token),
                "{} holds a key in plain text",
                path.display()
            );
        }
    }
    assert!(scanned > 10_000, "scanned only {scanned} bytes");
    // The log names keys by id only.
    assert!(keys
        .iter()
        .all(|k| !s.log().contains(k.rsplit('_').next().unwrap())));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_admin_input_gets_a_clear_4xx() {
    let s = Stack::start("").await;
    let c = reqwest::Client::new();
    let write = admin_token();
    let read = moltghost::admin::mint_token(common::ADMIN_SECRET, "r", "read", 60).unwrap();
    let forged = moltghost::admin::mint_token("another-secret", "x", "write", 60).unwrap();
    let expired = moltghost::admin::mint_token(common::ADMIN_SECRET, "x", "write", -120).unwrap();
    // (method, path, token, body, expected status)
    type Case<'a> = (&'a str, &'a str, Option<&'a str>, Option<&'a str>, u16);
    let cases: Vec<Case> = vec![
        ("GET", "/v1/admin/agents", None, None, 401),
        ("GET", "/v1/admin/agents", Some(&forged), None, 401),
        ("GET", "/v1/admin/agents", Some(&expired), None, 401),
        ("GET", "/v1/admin/agents", Some("not.a.jwt"), None, 401),
        (
            "POST",
            "/v1/admin/agents",
            Some(&read),
            Some(r#"{"name":"x","upstream":"http://127.0.0.1:1"}"#),
            403,
        ),
        (
            "POST",
            "/v1/admin/agents",
            Some(&write),
            Some("{not json"),
            400,
        ),
        (
            "POST",
            "/v1/admin/agents",
            Some(&write),
            Some(r#"{"name":"x"}"#),
            400,
        ),
        (
            "POST",
            "/v1/admin/agents",
            Some(&write),
            Some(r#"{"name":"Bad Name","upstream":"http://127.0.0.1:1"}"#),
            400,
        ),
        (
            "POST",
            "/v1/admin/agents",
            Some(&write),
            Some(r#"{"name":"x","upstream":"ftp://nope"}"#),
            400,
        ),
        (
            "POST",
            "/v1/admin/agents",
            Some(&write),
            Some(r#"{"name":"x","upstream":"http://127.0.0.1:1","bogus":1}"#),
            400,
        ),
        (
            "POST",
            "/v1/admin/agents",
            Some(&write),
            Some(r#"{"name":"x","upstream":"http://127.0.0.1:1","state":"dancing"}"#),
            400,
        ),
        (
            "POST",
            "/v1/admin/agents",
            Some(&write),
            Some(r#"{"name":"abc123x","upstream":"http://127.0.0.1:1","endpoint_id":"abc123"}"#),
            409,
        ),
        (
            "PATCH",
            "/v1/admin/agents/abc123",
            Some(&write),
            Some(r#"{"upstream":"nonsense"}"#),
            400,
        ),
        ("GET", "/v1/admin/agents/nope", Some(&write), None, 404),
        (
            "POST",
            "/v1/admin/agents/abc123/dance",
            Some(&write),
            Some("{}"),
            404,
        ),
        (
            "POST",
            "/v1/admin/agents/gone1/start",
            Some(&write),
            Some("{}"),
            409,
        ),
        (
            "POST",
            "/v1/admin/accounts",
            Some(&write),
            Some(r#"{"name":"default"}"#),
            409,
        ),
        (
            "POST",
            "/v1/admin/accounts",
            Some(&write),
            Some(r#"{"name":"z","plan":"gold"}"#),
            400,
        ),
        (
            "POST",
            "/v1/admin/accounts",
            Some(&write),
            Some(r#"{"name":"z","id":"Has_Underscore"}"#),
            400,
        ),
        (
            "PATCH",
            "/v1/admin/accounts/nope",
            Some(&write),
            Some(r#"{"plan":"default"}"#),
            404,
        ),
        (
            "POST",
            "/v1/admin/keys",
            Some(&write),
            Some(r#"{"name":""}"#),
            400,
        ),
        (
            "POST",
            "/v1/admin/keys",
            Some(&write),
            Some(r#"{"name":"k","agents":["nope"]}"#),
            404,
        ),
        (
            "POST",
            "/v1/admin/keys",
            Some(&write),
            Some(r#"{"name":"k","expires_in_seconds":-5}"#),
            400,
        ),
        (
            "POST",
            "/v1/admin/keys/revoke",
            Some(&write),
            Some(r#"{"id":"a","key":"b"}"#),
            400,
        ),
        (
            "POST",
            "/v1/admin/keys/revoke",
            Some(&write),
            Some(r#"{"id":"key_nope"}"#),
            404,
        ),
        (
            "GET",
            "/v1/admin/keys?account=nope",
            Some(&write),
            None,
            404,
        ),
        ("GET", "/v1/admin/nothing", Some(&write), None, 404),
    ];
    for (m, path, token, body, want) in cases {
        let mut req = c.request(m.parse().unwrap(), format!("{}{path}", s.admin_url()));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req
                .header("content-type", "application/json")
                .body(b.to_owned());
        }
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        let v: Value = r.json().await.unwrap_or(Value::Null);
        assert_eq!(status, want, "{m} {path} {body:?}: {v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{m} {path}: {v}"
        );
    }
    // Unauthenticated health and JWKS.
    let v: Value = c
        .get(format!("{}/v1/admin/health", s.admin_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["status"], "ok");
    let v: Value = c
        .get(format!("{}/.well-known/jwks.json", s.admin_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["keys"][0]["crv"], "Ed25519");
}

/// Opens a slow stream and returns its body stream after the first chunk.
async fn open_stream(
    s: &Stack,
    key: &str,
) -> impl futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> {
    let r = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .post(format!("http://127.0.0.1:{}/v1/chat", s.port))
        .header("host", format!("abc123.agent.localhost:{}", s.port))
        .header("authorization", bearer(key))
        .header("x-mock-interval-ms", "100")
        .header("x-mock-tokens", "200")
        .body(r#"{"messages":[{"role":"user","content":"hi"}],"stream":true}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut body = r.bytes_stream();
    body.next().await.unwrap().unwrap();
    body
}

/// Reads the rest of a stream; returns what arrived and how long it took.
async fn drain(
    body: impl futures_util::Stream<Item = reqwest::Result<bytes::Bytes>>,
) -> (String, Duration) {
    let t0 = Instant::now();
    let all = tokio::time::timeout(
        Duration::from_secs(10),
        body.fold(String::new(), |mut acc, c| async move {
            acc.push_str(&String::from_utf8_lossy(&c.unwrap_or_default()));
            acc
        }),
    )
    .await
    .expect("the stream was not ended");
    (all, t0.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_streams_end_when_their_key_is_revoked_or_their_agent_paused() {
    let s = Stack::start("").await;
    let k = s
        .admin_post(
            "/v1/admin/keys",
            json!({"name": "stream", "agents": ["abc123"]}),
        )
        .await;
    let body = open_stream(&s, k["key"].as_str().unwrap()).await;
    s.admin_post("/v1/admin/keys/revoke", json!({"id": k["id"]}))
        .await;
    let (text, took) = drain(body).await;
    assert!(
        text.contains("event: error") && text.contains("invalid_api_key"),
        "{text}"
    );
    assert!(took < Duration::from_secs(1), "ended after {took:?}");

    let body = open_stream(&s, &s.key).await;
    s.admin_post("/v1/admin/agents/abc123/pause", json!({}))
        .await;
    let (text, _) = drain(body).await;
    assert!(text.contains("agent_paused"), "{text}");
    s.admin_post("/v1/admin/agents/abc123/start", json!({}))
        .await;
    assert_eq!(chat(&s, "abc123", Some(&bearer(&s.key))).await.0, 200);

    // Last-used times are written in batches (every 200ms in tests).
    tokio::time::sleep(Duration::from_millis(700)).await;
    let v: Value = s.admin_get("/v1/admin/keys").await;
    let tests_key = v["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["name"] == "tests")
        .unwrap();
    assert!(tests_key["last_used_at"].as_i64().is_some(), "{tests_key}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_backend_serves_and_follows_changes() {
    let Some(db) = PgDb::create().await else {
        return;
    };
    let s = Stack::on_store(&db.url, "").await;
    assert_eq!(chat(&s, "abc123", Some(&bearer(&s.key))).await.0, 200);
    assert_eq!(chat(&s, "paused1", Some(&bearer(&s.key))).await.0, 503);
    let k = s
        .admin_post(
            "/v1/admin/keys",
            json!({"name": "pg", "agents": ["abc123"]}),
        )
        .await;
    assert_eq!(
        chat(&s, "abc123", Some(&bearer(k["key"].as_str().unwrap())))
            .await
            .0,
        200
    );
    s.admin_post("/v1/admin/keys/revoke", json!({"key": k["key"]}))
        .await;
    assert_eq!(
        chat(&s, "abc123", Some(&bearer(k["key"].as_str().unwrap())))
            .await
            .0,
        401
    );
    // The key is not in the database in plain text either.
    let (_, dump, _) = run(Command::new("psql").args([
        db.url.as_str(),
        "-At",
        "-c",
        "SELECT hash, prefix FROM api_keys",
    ]));
    assert!(
        !dump.contains(k["key"].as_str().unwrap().rsplit('_').next().unwrap()),
        "{dump}"
    );
}

/// Polls `edges` until each refuses (or accepts) `key`; returns each edge's delay.
async fn until_all(edges: &[&Stack], key: &str, want: u16, t0: Instant) -> Vec<Duration> {
    // One kept-alive client per edge, as a real client polls. A fresh connection every 2 ms
    // churns through loopback ports, and one lost SYN costs TCP's one-second retransmit: the
    // likely cause of the 1.003 s tail this test once measured in CI.
    let clients: Vec<_> = edges.iter().map(|e| e.client()).collect();
    let mut delays = vec![None; edges.len()];
    while delays.iter().any(Option::is_none) {
        for (i, e) in edges.iter().enumerate() {
            if delays[i].is_some() {
                continue;
            }
            let r = clients[i]
                .post(e.url("abc123", "/v1/chat"))
                .header("authorization", bearer(key))
                .body(CHAT)
                .send()
                .await
                .unwrap();
            let status = r.status();
            let _ = r.bytes().await; // read whole, so that the connection is kept
            if status == want {
                delays[i] = Some(t0.elapsed());
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "edges never agreed on {want}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    delays.into_iter().map(Option::unwrap).collect()
}

/// A fleet whose pool goes through PgBouncer in transaction mode: `store.url` names the pooler,
/// `store.session_url` PostgreSQL itself, for LISTEN and the migrations' lock. Keys
/// made on one edge work on the other, revocation reaches both, and metered traffic (quota
/// leases, the ledger) is billed exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_works_through_pgbouncer_in_transaction_mode() {
    let Some(db) = PgDb::create().await else {
        return;
    };
    let Some(bouncer) = PgBouncer::start() else {
        return;
    };
    let pooled = db
        .url
        .replace("127.0.0.1:5432", &format!("127.0.0.1:{}", bouncer.port));
    // Lands in the harness's [store] section.
    let extra = format!("session_url = \"{}\"\n", db.url);
    let a = Stack::on_store(&pooled, &extra).await;
    let b = a.another_edge(&pooled, &extra).await;
    let edges = [&a, &b];

    let k = a
        .admin_post(
            "/v1/admin/keys",
            json!({"name": "bounced", "agents": ["abc123"]}),
        )
        .await;
    let key = k["key"].as_str().unwrap();
    until_all(&edges, key, 200, Instant::now()).await;
    for i in 0..40 {
        let (status, body) = chat(edges[i % 2], "abc123", Some(&bearer(key))).await;
        assert_eq!(status, 200, "{body}");
    }
    // Forty, and one per edge while waiting for both to know the key.
    let line = a.ledger_for("bounced", 42).await;
    assert!(line["total_tokens"].as_u64().unwrap() > 0, "{line}");

    let t0 = Instant::now();
    b.admin_post("/v1/admin/keys/revoke", json!({"id": k["id"]}))
        .await;
    let delays = until_all(&edges, key, 401, t0).await;
    println!("through PgBouncer: revocation reached both edges in {delays:?}");
    let carried = bouncer.transactions(&db.name);
    assert!(
        carried > 50,
        "PgBouncer carried {carried} transactions:\n{}",
        bouncer.log()
    );
}

/// A new edge joining a running fleet serves the fleet's keys and agents as soon as it listens:
/// it loads the store's snapshot before it opens its ports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_edge_joins_a_running_fleet_within_seconds() {
    let Some(db) = PgDb::create().await else {
        return;
    };
    let a = Stack::on_store(&db.url, "").await;
    let t0 = Instant::now();
    let b = a.another_edge(&db.url, "").await;
    let listening = t0.elapsed();
    let served = until_all(&[&b], &a.key, 200, t0).await[0];
    println!("a new edge listened after {listening:?} and served the fleet's key after {served:?}");
    assert!(served < Duration::from_secs(5), "{served:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_of_three_edges_agrees_within_a_second() {
    let Some(db) = PgDb::create().await else {
        return;
    };
    let a = Stack::on_store(&db.url, "").await;
    let b = a.another_edge(&db.url, "").await;
    let c = a.another_edge(&db.url, "").await;
    let edges = [&a, &b, &c];

    let mut delays = Vec::new();
    for round in 0..15 {
        let k = edges[round % 3]
            .admin_post(
                "/v1/admin/keys",
                json!({"name": format!("r{round}"), "agents": ["abc123"]}),
            )
            .await;
        let key = k["key"].as_str().unwrap();
        until_all(&edges, key, 200, Instant::now()).await;
        let t0 = Instant::now();
        edges[(round + 1) % 3]
            .admin_post("/v1/admin/keys/revoke", json!({"id": k["id"]}))
            .await;
        delays.extend(until_all(&edges, key, 401, t0).await);
    }
    delays.sort();
    let p50 = delays[delays.len() / 2];
    let p99 = delays[(delays.len() * 99).div_ceil(100) - 1];
    println!(
        "revocation reached all 3 edges: p50 {p50:?}, p99 {p99:?}, max {:?} over {} samples",
        delays.last().unwrap(),
        delays.len()
    );
    assert!(p99 < Duration::from_secs(1), "p99 {p99:?}");

    // Pausing through one edge is refused by all, and a stream open on another edge is ended.
    let body = open_stream(&c, &a.key).await;
    let t0 = Instant::now();
    b.admin_post("/v1/admin/agents/abc123/pause", json!({}))
        .await;
    let (text, _) = drain(body).await;
    assert!(text.contains("agent_paused"), "{text}");
    let delays = until_all(&edges, &a.key, 503, t0).await;
    assert!(
        delays.iter().all(|d| *d < Duration::from_secs(1)),
        "{delays:?}"
    );
    a.admin_post("/v1/admin/agents/abc123/start", json!({}))
        .await;
    until_all(&edges, &a.key, 200, Instant::now()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_that_loses_postgres_serves_from_its_snapshot_and_catches_up() {
    let Some(db) = PgDb::create().await else {
        return;
    };
    let a = Stack::on_store(&db.url, "").await;
    let relay = Relay::start("127.0.0.1:5432").await;
    let via_relay = db
        .url
        .replace("127.0.0.1:5432", &format!("127.0.0.1:{}", relay.port));
    let b = a.another_edge(&via_relay, "").await;
    let k = a
        .admin_post(
            "/v1/admin/keys",
            json!({"name": "doomed", "agents": ["abc123"]}),
        )
        .await;
    let doomed = k["key"].as_str().unwrap();
    until_all(&[&b], doomed, 200, Instant::now()).await;

    relay.cut();
    a.admin_post("/v1/admin/keys/revoke", json!({"id": k["id"]}))
        .await;
    let health = |s: &Stack| {
        let url = format!("http://127.0.0.1:{}/v1/health", s.port);
        let host = format!("abc123.agent.localhost:{}", s.port);
        let key = a.key.clone();
        async move {
            let r = reqwest::Client::new()
                .get(url)
                .header("host", host)
                .bearer_auth(key)
                .send()
                .await
                .unwrap();
            r.json::<Value>().await.unwrap()
        }
    };
    let t0 = Instant::now();
    loop {
        let h = health(&b).await;
        if h["edge"]["store"] == "unreachable" {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "health never said the store is gone: {h}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Still serving from the snapshot (which has not heard of the revocation yet).
    assert_eq!(chat(&b, "abc123", Some(&bearer(&a.key))).await.0, 200);
    assert_eq!(chat(&b, "abc123", Some(&bearer(doomed))).await.0, 200);
    // The log is written in batches (every 200 ms).
    let t0 = Instant::now();
    while !b.log().contains("store unreachable") {
        assert!(t0.elapsed() < Duration::from_secs(2), "{}", b.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    relay.restore();
    let delays = until_all(&[&b], doomed, 401, Instant::now()).await;
    println!("caught up {:?} after PostgreSQL came back", delays[0]);
    assert_eq!(health(&b).await["edge"]["store"], "ok");
}

/// A fleet's edges restart together after a reboot, all declaring the same `[[agents]]` on one
/// PostgreSQL: every declaration succeeds, and each account and agent exists once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edges_starting_together_declare_the_same_agents_once() {
    use moltghost::config::Config;
    use moltghost::store::Store;
    for _ in 0..3 {
        let Some(db) = PgDb::create().await else {
            return;
        };
        let cfg = Config::from_toml(&format!(
            "[store]\nurl = \"{}\"\n\
             [[agents]]\nid = \"shared1\"\nupstream = \"http://127.0.0.1:9\"\naccount = \"acme\"\n\
             [[agents]]\nid = \"shared2\"\nupstream = \"http://127.0.0.1:9\"\naccount = \"acme\"\n\
             [[agents]]\nid = \"other1\"\nupstream = \"http://127.0.0.1:9\"\naccount = \"globex\"\n",
            db.url
        ))
        .unwrap();
        let cfg = std::sync::Arc::new(cfg);
        let start = std::sync::Arc::new(tokio::sync::Barrier::new(6));
        let edges: Vec<_> = (0..6)
            .map(|_| {
                let (cfg, start, url) = (cfg.clone(), start.clone(), db.url.clone());
                tokio::spawn(async move {
                    let store = Store::open(&url, std::path::Path::new(".")).await.unwrap();
                    start.wait().await;
                    moltghost::control::seed(&store, &cfg).await
                })
            })
            .collect();
        for e in edges {
            e.await.unwrap().expect("a concurrent declaration succeeds");
        }
        let store = Store::open(&db.url, std::path::Path::new("."))
            .await
            .unwrap();
        let mut accounts: Vec<_> = store
            .accounts()
            .await
            .unwrap()
            .into_iter()
            .map(|a| a.name)
            .collect();
        accounts.sort();
        assert_eq!(accounts, ["acme", "default", "globex"]);
        let agents = store.agents().await.unwrap();
        assert_eq!(agents.len(), 3, "{agents:?}");
        let acme = agents.iter().find(|a| a.endpoint_id == "shared2").unwrap();
        assert_eq!(
            agents
                .iter()
                .find(|a| a.endpoint_id == "shared1")
                .unwrap()
                .account_id,
            acme.account_id
        );
    }
}
