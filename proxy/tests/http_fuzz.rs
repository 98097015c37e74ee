//! A structure-aware HTTP/1 fuzzer on real sockets against the running edge. Requests are built
//! from HTTP's grammar (method, target, version, Host, credentials, framing, body, trailers,
//! line endings, pipelining, writes split with pauses) and then bent where framing lives; the
//! oracle holds for every exchange:
//!
//! - what the edge sends parses strictly as HTTP/1 answers (status line, headers, and a body
//!   framed by its Content-Length, valid chunked coding, or the connection's close);
//! - never a 5xx; every answer carries an `x-request-id` and every error a JSON body (also a
//!   head that Pingora's parser refuses, which the edge answers in its stead; only when that
//!   head came pipelined behind another may the answer be bodiless, `Content-Length: 0`);
//! - the edge ends the connection within its configured deadlines: nothing is held;
//! - the runtime never sees more requests than clients were answered 2xx (no smuggling);
//! - afterwards the edge is alive, serving, and holds no connection.
//!
//! CI runs a few hundred cases from a fixed seed. `scripts/http-fuzz.sh` runs it for minutes
//! (`HTTP_FUZZ_SECONDS`, `HTTP_FUZZ_SEED`); `HTTP_FUZZ_CASE` replays one case of a seed.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::Stack;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The edge's deadlines in this test, short so that a held connection shows quickly.
const LIMITS: &str = "[limits]\nheader_timeout = \"2s\"\nbody_timeout = \"2s\"\n\
    keepalive_idle = \"1s\"\nsend_timeout = \"2s\"\nmax_body_bytes = 262144\n\
    [[plans]]\nname = \"default\"\nrequests_per_minute = 1000000\ntokens_per_month = 1000000000000\nconcurrent_streams = 1000\n";
/// After the client's last byte, the edge must have closed within this (the longest deadline
/// above, keep-alive idle plus header time, with room for a loaded machine).
const HELD: Duration = Duration::from_secs(12);
/// Cases in flight at once.
const PARALLEL: usize = 24;

/// Headers a hostile request may add: internal ones, expectations, connection options, upgrades.
const EXTRA_HEADERS: &[&str] = &[
    "X-Moltghost-Identity: forged",
    "X-Request-Id: bad id",
    "X-Forwarded-For: 6.6.6.6",
    "Expect: 100-continue",
    "Connection: close",
    "Connection: keep-alive",
    "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA",
    "Connection: Upgrade\r\nUpgrade: websocket",
    "Content-Type: text/plain",
];

const CHAT: &str = r#"{"messages":[{"role":"user","content":"Hello"}]}"#;
const STREAM: &str = r#"{"messages":[{"role":"user","content":"Hello"}],"stream":true}"#;

/// One generated exchange: the bytes in the parts they are written in, the pause before each
/// part, and what the oracle needs to know about the requests.
struct Case {
    parts: Vec<(Duration, Vec<u8>)>,
    /// The request methods in order (a HEAD's answer has no body).
    methods: Vec<String>,
    /// Some request was HTTP/1.0 (a chunked answer to it would be wrong).
    http10: Vec<bool>,
}

/// Picks one of `options`.
fn one<'a, T: ?Sized>(rng: &mut StdRng, options: &[&'a T]) -> &'a T {
    options.choose(rng).unwrap()
}

/// A request built from HTTP's grammar. One in three is clean; in the others each part is bent
/// now and then (so that most cases still reach the pipeline, and its stages see odd input).
fn request(rng: &mut StdRng, key: &str) -> (String, bool, Vec<u8>) {
    let hostile = rng.gen_ratio(2, 3);
    // A rare bend, and a choice among arms whose last one is the clean default.
    let odd = |rng: &mut StdRng, n: u32| hostile && rng.gen_ratio(1, n);
    let arm = |rng: &mut StdRng, k: u32| if hostile { rng.gen_range(0..k) } else { k - 1 };
    let bend = |rng: &mut StdRng| odd(rng, 4);
    let method = if bend(rng) {
        one(
            rng,
            &[
                "GET", "HEAD", "OPTIONS", "PUT", "DELETE", "post", "P@ST", "", "GET POST",
                "CONNECT",
            ],
        )
        .to_owned()
    } else {
        "POST".to_owned()
    };
    let target = if bend(rng) {
        match rng.gen_range(0..12) {
            0 => "/".into(),
            1 => "*".into(),
            2 => "http://abc123.agent.localhost/v1/chat".into(),
            3 => "/v1/chat/completions?x=1&y".into(),
            4 => "/v1/%2e%2e/admin".into(),
            5 => "/v1/models".into(),
            6 => "/healthz".into(),
            7 => "/v1/ws".into(),
            8 => "//v1/chat".into(),
            9 => format!("/v1/chat?{}", "a".repeat(rng.gen_range(1_000..40_000))),
            10 => "/v1/ch at".into(),
            _ => "/v1/chat\0".into(),
        }
    } else {
        one(rng, &["/v1/chat", "/v1/chat/completions"]).to_owned()
    };
    let version = if bend(rng) {
        one(
            rng,
            &[
                "HTTP/1.0",
                "HTTP/2.0",
                "HTTP/1.2",
                "http/1.1",
                "HTTP/1.1 ",
                "",
                "HTTP/1",
            ],
        )
        .to_owned()
    } else {
        "HTTP/1.1".to_owned()
    };
    let http10 = version == "HTTP/1.0";
    let sep = if odd(rng, 20) {
        one(rng, &["  ", "\t"])
    } else {
        " "
    };

    let mut headers: Vec<String> = Vec::new();
    let host = if bend(rng) {
        one(
            rng,
            &[
                "",
                "abc123.agent.localhost:80",
                "ABC123.AGENT.LOCALHOST",
                "nobody.agent.localhost",
                "abc123.agent.localhost.",
                "127.0.0.1",
                "abc123.agent.localhost, other",
            ],
        )
        .to_owned()
    } else {
        "abc123.agent.localhost".to_owned()
    };
    match arm(rng, 20) {
        0 => {}
        1 => {
            headers.push(format!("Host: {host}"));
            headers.push("Host: other.agent.localhost".into());
        }
        _ => headers.push(format!("Host: {host}")),
    }
    let auth = format!("Bearer {key}");
    match arm(rng, 16) {
        0 => {}
        1 => headers.push(format!("Authorization: bearer {key}")),
        2 => headers.push(format!("Authorization: Bearer  {key}")),
        3 => headers.push("Authorization: Bearer mg_wrong".into()),
        4 => {
            headers.push(format!("Authorization: {auth}"));
            headers.push("Authorization: Bearer mg_wrong".into());
        }
        5 => headers.push(format!("Authorization: Basic {key}")),
        6 => headers.push(format!("Authorization: Bearer {}", "k".repeat(9_000))),
        _ => headers.push(format!("Authorization: {auth}")),
    }
    if odd(rng, 6) {
        headers.push(one(rng, EXTRA_HEADERS).to_owned());
    }
    if odd(rng, 10) {
        headers.push(match rng.gen_range(0..8) {
            0 => "Foo : bar".into(),
            1 => "Fo\u{1}o: bar".into(),
            2 => ": empty".into(),
            3 => "NoColon".into(),
            4 => "X-Folded: a\r\n b".into(),
            5 => format!("X-Long: {}", "v".repeat(rng.gen_range(1_000..120_000))),
            6 => (0..rng.gen_range(50..1_200))
                .map(|i| format!("X-H{i}: v"))
                .collect::<Vec<_>>()
                .join("\r\n"),
            _ => "X-Nul: a\0b".into(),
        });
    }
    headers.push("Content-Type: application/json".into());

    let json = if bend(rng) {
        match rng.gen_range(0..7) {
            0 => b"{\"messages\":[{\"role\":\"user\",\"content\":\"Hel".to_vec(),
            1 => b"{\"messages\":[{\"role\":\"user\",\"content\":\"\xff\xfe\"}]}".to_vec(),
            2 => format!("{}{}", "[".repeat(5_000), "]".repeat(5_000)).into_bytes(),
            3 => b"{\"messages\":[{\"role\":\"user\",\"content\":\"Hi\"}],\"max_tokens\":1e999999}"
                .to_vec(),
            4 => b"{\"messages\":\"not a list\"}".to_vec(),
            5 => Vec::new(),
            _ => {
                b"{\"messages\":[{\"role\":\"user\",\"content\":\"Hi\"}],\"messages\":[]}".to_vec()
            }
        }
    } else if rng.gen_ratio(1, 3) {
        STREAM.as_bytes().to_vec()
    } else {
        CHAT.as_bytes().to_vec()
    };

    // Framing: the heart of it.
    let mut body = json.clone();
    let len = json.len();
    let framing = if hostile {
        rng.gen_range(0..24)
    } else if rng.gen_ratio(1, 3) {
        9
    } else {
        23
    };
    match framing {
        0 => headers.push(format!("Content-Length: {}", len + rng.gen_range(1..50))),
        1 => headers.push(format!(
            "Content-Length: {}",
            len.saturating_sub(rng.gen_range(1..10))
        )),
        2 => headers.push("Content-Length: 99999999999999999999".into()),
        3 => headers.push("Content-Length: -1".into()),
        4 => headers.push(format!("Content-Length: +{len}")),
        5 => headers.push(format!("Content-Length: {len}, {len}")),
        6 => {
            headers.push(format!("Content-Length: {len}"));
            headers.push(format!("Content-Length: {}", len + 1));
        }
        7 => headers.push(format!("Content-Length: 0x{len:x}")),
        8 => {} // a body with no framing: it reads as the next request
        9..=15 => {
            let te = if !hostile || rng.gen_ratio(1, 2) {
                "chunked".to_owned()
            } else {
                one(
                    rng,
                    &[
                        "Chunked",
                        "chunked, identity",
                        "identity",
                        "gzip, chunked",
                        " chunked",
                        "chunked\u{b}",
                        "chunked\r\n ",
                    ],
                )
                .to_owned()
            };
            headers.push(format!("Transfer-Encoding: {te}"));
            if odd(rng, 6) {
                headers.push(format!("Content-Length: {len}"));
            }
            body = chunks(rng, hostile, &json);
        }
        _ => headers.push(format!("Content-Length: {len}")),
    }
    headers.shuffle(rng);

    let eol = |rng: &mut StdRng| -> &'static str {
        match arm(rng, 60) {
            0 => "\n",
            1 => "\r",
            _ => "\r\n",
        }
    };
    let mut out = format!("{method}{sep}{target}{sep}{version}").into_bytes();
    out.extend_from_slice(eol(rng).as_bytes());
    for h in headers {
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(eol(rng).as_bytes());
    }
    out.extend_from_slice(eol(rng).as_bytes());
    out.extend_from_slice(&body);
    if odd(rng, 30) {
        // Cut short anywhere: the edge must still end the connection in time.
        out.truncate(rng.gen_range(0..out.len()));
    }
    (method, http10, out)
}

/// `data` in chunked coding, with sizes, extensions and the end bent now and then.
fn chunks(rng: &mut StdRng, hostile: bool, data: &[u8]) -> Vec<u8> {
    let odd = |rng: &mut StdRng, n: u32| hostile && rng.gen_ratio(1, n);
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        let n = rng.gen_range(1..=rest.len().min(64));
        let size = if odd(rng, 12) {
            one(
                rng,
                &[
                    "ffffffffffffffffffff",
                    "-1",
                    "zz",
                    "0x5",
                    "",
                    " 5",
                    "5 ",
                    "5;a=\"b\"",
                    "5;;;",
                    "05",
                    "5\0",
                ],
            )
            .to_owned()
        } else if rng.gen_ratio(1, 8) {
            format!("{n:X};ext=1")
        } else {
            format!("{n:x}")
        };
        out.extend_from_slice(size.as_bytes());
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&rest[..n]);
        out.extend_from_slice(if odd(rng, 25) { b"\n" } else { b"\r\n" });
        rest = &rest[n..];
    }
    match if hostile { rng.gen_range(0..12) } else { 11 } {
        0 => {} // no last chunk
        1 => out.extend_from_slice(b"0\r\nX-Trailer: t\r\n\r\n"),
        2 => out.extend_from_slice(b"0\r\nContent-Length: 5\r\n\r\n"),
        3 => out.extend_from_slice(format!("0\r\nX-T: {}\r\n\r\n", "t".repeat(70_000)).as_bytes()),
        4 => out.extend_from_slice(b"0\r\n"),
        _ => out.extend_from_slice(b"0\r\n\r\n"),
    }
    out
}

/// One case: one to three requests, written at once or split with pauses.
fn case(seed: u64, key: &str) -> Case {
    let mut rng = StdRng::seed_from_u64(seed);
    let n = if rng.gen_ratio(1, 4) {
        rng.gen_range(2..=3)
    } else {
        1
    };
    let mut bytes = Vec::new();
    let (mut methods, mut http10) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let (m, old, b) = request(&mut rng, key);
        methods.push(m);
        http10.push(old);
        bytes.extend_from_slice(&b);
    }
    let mut parts = Vec::new();
    if rng.gen_ratio(3, 5) || bytes.len() < 2 {
        parts.push((Duration::ZERO, bytes));
    } else {
        let mut cuts: Vec<usize> = (0..rng.gen_range(1..8))
            .map(|_| rng.gen_range(1..bytes.len()))
            .collect();
        cuts.sort_unstable();
        cuts.dedup();
        let mut from = 0;
        for cut in cuts.into_iter().chain([bytes.len()]) {
            let pause = Duration::from_millis(rng.gen_range(0..300));
            parts.push((pause, bytes[from..cut].to_vec()));
            from = cut;
        }
    }
    Case {
        parts,
        methods,
        http10,
    }
}

/// What one exchange showed.
#[derive(Default)]
struct Seen {
    statuses: Vec<u16>,
}

/// Runs one case and checks the oracle; the error says what broke.
async fn exchange(port: u16, case: &Case) -> Result<Seen, String> {
    let mut conn = TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (mut rd, mut wr) = conn.split();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut closed = false;
    // Write and read at once: an edge that answers early and closes must not block the writer.
    let write = async {
        for (pause, part) in &case.parts {
            tokio::time::sleep(*pause).await;
            if wr.write_all(part).await.is_err() {
                break;
            }
        }
    };
    let read = async {
        let deadline = Instant::now() + HELD + case.parts.iter().map(|p| p.0).sum::<Duration>();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, rd.read(&mut buf)).await {
                Err(_) => return,
                Ok(Ok(0)) | Ok(Err(_)) => {
                    closed = true;
                    return;
                }
                Ok(Ok(n)) => {
                    got.extend_from_slice(&buf[..n]);
                    if upgraded(&got) {
                        closed = true;
                        return;
                    }
                }
            }
        }
    };
    tokio::join!(write, read);
    let seen = parse_answers(&got, case).map_err(|e| format!("{e}; got {}", preview(&got)))?;
    if !closed {
        return Err(format!(
            "connection held open {HELD:?} after the last byte; got {}",
            preview(&got)
        ));
    }
    Ok(seen)
}

/// The edge switched protocols: a WebSocket has its own rules (tested elsewhere).
fn upgraded(got: &[u8]) -> bool {
    got.starts_with(b"HTTP/1.1 101 ") || got.windows(15).any(|w| w == b"\r\n\r\nHTTP/1.1 101")
}

/// Parses `got` strictly as a sequence of answers and checks each.
fn parse_answers(mut got: &[u8], case: &Case) -> Result<Seen, String> {
    let mut seen = Seen::default();
    let mut index = 0;
    while !got.is_empty() {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut res = httparse::Response::new(&mut headers);
        let head_len = match res.parse(got) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return Err("an answer's head cut short".into()),
            Err(e) => return Err(format!("a malformed answer head: {e}")),
        };
        let status = res.code.unwrap_or(0);
        let header = |name: &str| {
            res.headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(name))
                .map(|h| String::from_utf8_lossy(h.value).to_ascii_lowercase())
        };
        if status == 101 {
            return Ok(seen);
        }
        if (500..600).contains(&status) {
            return Err(format!("a {status}"));
        }
        let chunked = header("transfer-encoding").is_some_and(|v| v.contains("chunked"));
        let length = header("content-length");
        let method = case.methods.get(index).map_or("", String::as_str);
        let rest = &got[head_len..];
        let (body, used) = if status == 100 || method == "HEAD" || status == 204 || status == 304 {
            (Vec::new(), 0)
        } else if chunked {
            if *case.http10.get(index).unwrap_or(&false) {
                return Err("chunked coding in an answer to HTTP/1.0".into());
            }
            if length.is_some() {
                return Err("both Content-Length and chunked coding".into());
            }
            dechunk(rest)?
        } else if let Some(l) = &length {
            let n: usize = l
                .trim()
                .parse()
                .map_err(|_| format!("Content-Length {l:?}"))?;
            if rest.len() < n {
                return Err(format!(
                    "a body of {} bytes where {n} were announced",
                    rest.len()
                ));
            }
            (rest[..n].to_vec(), n)
        } else {
            // Close-delimited: the rest of the connection.
            (rest.to_vec(), rest.len())
        };
        if status != 100 && header("x-request-id").is_none() {
            return Err(format!("a {status} without x-request-id"));
        }
        // A refusal of a head pipelined behind another request's may be bodiless: the edge
        // answers it in Pingora's stead without having seen whether it was a HEAD.
        let unseen = index > 0 && length.as_deref() == Some("0");
        if status >= 400 && method != "HEAD" && !unseen {
            let v: serde_json::Value = serde_json::from_slice(&body)
                .map_err(|_| format!("a {status} whose body is not JSON"))?;
            if !v["error"]["code"].is_string() {
                return Err(format!("a {status} without error.code"));
            }
            if header("content-type").as_deref() != Some("application/json") {
                return Err(format!("a {status} JSON error not typed application/json"));
            }
        }
        got = &rest[used..];
        if status != 100 {
            seen.statuses.push(status);
            index += 1;
        }
    }
    Ok(seen)
}

/// Decodes a chunked body strictly: its bytes and how many bytes of `data` it used.
fn dechunk(data: &[u8]) -> Result<(Vec<u8>, usize), String> {
    let mut body = Vec::new();
    let mut at = 0;
    loop {
        let line_end = find_crlf(&data[at..]).ok_or("a chunk size line cut short")?;
        let line =
            std::str::from_utf8(&data[at..at + line_end]).map_err(|_| "a chunk size line")?;
        let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| format!("a chunk size {line:?}"))?;
        at += line_end + 2;
        if size == 0 {
            // Trailers, then the empty line.
            loop {
                let end = find_crlf(&data[at..]).ok_or("chunked trailers cut short")?;
                at += end + 2;
                if end == 0 {
                    return Ok((body, at));
                }
            }
        }
        if data.len() < at + size + 2 {
            return Err("a chunk cut short".into());
        }
        body.extend_from_slice(&data[at..at + size]);
        if &data[at + size..at + size + 2] != b"\r\n" {
            return Err("a chunk without its CRLF".into());
        }
        at += size + 2;
    }
}

fn find_crlf(data: &[u8]) -> Option<usize> {
    data.windows(2).position(|w| w == b"\r\n")
}

fn preview(bytes: &[u8]) -> String {
    format!(
        "{:?}",
        String::from_utf8_lossy(&bytes[..bytes.len().min(4000)])
    )
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// A request that must always be served, on a fresh connection.
async fn served(s: &Stack) -> bool {
    let r = s
        .post_as("abc123", "/v1/chat", Some(&s.key))
        .header("content-type", "application/json")
        .body(CHAT)
        .send()
        .await;
    matches!(r, Ok(r) if r.status() == 200)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn framing_fuzzed_over_a_socket_never_breaks_the_edge() {
    let s = Arc::new(Stack::start(LIMITS).await);
    let seed = env_u64("HTTP_FUZZ_SEED").unwrap_or(15);
    let seconds = env_u64("HTTP_FUZZ_SECONDS");
    let only = env_u64("HTTP_FUZZ_CASE");
    let cases = env_u64("HTTP_FUZZ_CASES").unwrap_or(360);
    let until = seconds.map(|n| Instant::now() + Duration::from_secs(n));
    let runtime_before = s.stats.requests.load(Ordering::Relaxed);

    let mut failures = Vec::new();
    let mut ran = 0u64;
    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
    let mut next = only.unwrap_or(0);
    'batches: loop {
        let mut batch = tokio::task::JoinSet::new();
        for _ in 0..PARALLEL {
            let done = match (only, until) {
                (Some(i), _) => next > i,
                (None, Some(t)) => Instant::now() >= t,
                (None, None) => next >= cases,
            };
            if done {
                break;
            }
            let (i, s) = (next, s.clone());
            next += 1;
            batch.spawn(async move {
                let c = case(seed.wrapping_mul(1_000_003).wrapping_add(i), &s.key);
                let sent: Vec<u8> = c.parts.iter().flat_map(|p| p.1.clone()).collect();
                let r = exchange(s.port, &c).await;
                (i, r.map_err(|e| format!("{e}\n  sent {}", preview(&sent))))
            });
        }
        if batch.is_empty() {
            break;
        }
        while let Some(r) = batch.join_next().await {
            let (i, r) = r.unwrap();
            ran += 1;
            match r {
                Ok(seen) => {
                    for status in seen.statuses {
                        *statuses.entry(status).or_default() += 1;
                    }
                }
                Err(e) => failures.push(format!(
                    "case {i} (HTTP_FUZZ_SEED={seed} HTTP_FUZZ_CASE={i}): {e}"
                )),
            }
        }
        if !served(&s).await {
            failures.push(format!(
                "after case {}: a plain request was not served",
                next - 1
            ));
            break 'batches;
        }
        if failures.len() >= 10 {
            break;
        }
    }
    let reached = s.stats.requests.load(Ordering::Relaxed) - runtime_before;
    let ok_2xx: usize = statuses.range(200..300).map(|(_, n)| n).sum();
    eprintln!(
        "http fuzz: seed {seed}, {ran} cases, answers by status {statuses:?}, {reached} reached the runtime, {} failures",
        failures.len()
    );
    for f in &failures {
        eprintln!("{f}");
    }
    // Every request the runtime saw was one the edge admitted and answered (the plain probes
    // above are 2xx on their own connections and counted here too).
    let probes = ran.div_ceil(PARALLEL as u64) as usize;
    assert!(
        reached as usize <= ok_2xx + probes,
        "the runtime saw {reached} requests, clients got {ok_2xx} 2xx (+{probes} probes): smuggled"
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // Nothing held: every connection of the campaign is gone.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = s.metrics().await;
        if m.lines().any(|l| l == "moltghost_connections_open 0") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "connections still open:\n{}",
            m.lines()
                .filter(|l| l.starts_with("moltghost_connections"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut s = Arc::try_unwrap(s).unwrap_or_else(|_| panic!("a case still holds the stack"));
    assert!(s.child.try_wait().unwrap().is_none(), "the edge exited");
}
