//! Test harness: the real `moltghost-proxy` binary on loopback, in front of the reference agent
//! runtime (started in this process so tests can read its counters).

#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use moltghost_loadtest::runtime::{self, RuntimeConfig, Stats};

/// A free loopback port (bound, then released), never one this process handed out before:
/// the tests of one binary start edges in parallel, and a port released by one call could
/// otherwise come back from the next, so that one stack would wait on, and talk to, another's
/// listener.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// Waits until something listens on `port`.
pub fn wait_port(port: u16, within: Duration) {
    let deadline = Instant::now() + within;
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on port {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The agents every test stack has: one per lifecycle state, and one whose runtime is down.
pub const AGENTS: &[(&str, &str)] = &[
    ("abc123", "running"),
    ("paused1", "paused"),
    ("init1", "initializing"),
    ("gone1", "terminated"),
];

/// Shared by every test edge (a fleet must share these).
pub const ADMIN_SECRET: &str = "test-admin-secret-0123456789abcdef";
/// Keys the API-key HMAC of every test edge.
pub const KEY_SECRET: &str = "test-key-secret-0123456789abcdef";

/// A write-scope admin token for the test edges.
pub fn admin_token() -> String {
    moltghost::admin::mint_token(ADMIN_SECRET, "tests", "write", 3600).unwrap()
}

/// How to start a stack.
#[derive(Default, Clone)]
pub struct Options {
    /// Appended to the config.
    pub extra: String,
    /// Store URL (SQLite in the data directory when `None`).
    pub store_url: Option<String>,
    /// Do not declare the test agents (a fleet's later edges find them in the store).
    pub no_agents: bool,
    /// Use this runtime instead of starting one.
    pub runtime: Option<(SocketAddr, Arc<Stats>)>,
    /// The edge's data directory (its own temporary one when `None`).
    pub data_dir: Option<PathBuf>,
    /// Also listen for TLS (the `[tls]` section goes in `extra`).
    pub https: bool,
    /// Files written into the data directory before the edge starts (name, contents).
    pub files: Vec<(&'static str, String)>,
}

/// A running edge and runtime.
pub struct Stack {
    /// An account-wide API key for the test agents.
    pub key: String,
    /// The edge's public port.
    pub port: u16,
    /// The edge's admin port.
    pub admin_port: u16,
    /// The edge's TLS port (0 without TLS).
    pub https_port: u16,
    /// The runtime's address.
    pub runtime: SocketAddr,
    /// What the runtime saw.
    pub stats: Arc<Stats>,
    /// The edge process.
    pub child: Child,
    /// Data directory and config.
    pub dir: tempfile::TempDir,
    /// The edge's log file.
    pub log: PathBuf,
}

impl Stack {
    /// Starts a runtime and an edge with `extra` appended to the config, and makes a key.
    pub async fn start(extra: &str) -> Self {
        Self::start_with(Options {
            extra: extra.into(),
            ..Options::default()
        })
        .await
    }

    /// Starts a stack on the store at `url` (a fleet's PostgreSQL), `extra` appended to the
    /// config.
    pub async fn on_store(url: &str, extra: &str) -> Self {
        Self::start_with(Options {
            store_url: Some(url.to_owned()),
            extra: extra.to_owned(),
            ..Options::default()
        })
        .await
    }

    /// Starts a stack as `opts` says.
    pub async fn start_with(opts: Options) -> Self {
        let (runtime, stats) = match opts.runtime {
            Some(r) => r,
            None => runtime::spawn(RuntimeConfig::default()).await.unwrap(),
        };
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let admin_port = free_port();
        let dead_port = free_port();
        let https_port = if opts.https { free_port() } else { 0 };
        let https = if opts.https {
            format!("https = [\"127.0.0.1:{https_port}\"]\n")
        } else {
            String::new()
        };
        let store = opts
            .store_url
            .clone()
            .unwrap_or_else(|| "sqlite://moltghost.db".into());
        let mut cfg = format!(
            "[listen]\nhttp = [\"127.0.0.1:{port}\"]\n{https}admin = \"127.0.0.1:{admin_port}\"\n\
             [edge]\ndata_dir = \"{}\"\ngrace_period = \"1s\"\nshutdown_timeout = \"1s\"\n\
             [store]\nurl = \"{store}\"\npoll_interval = \"200ms\"\nlast_used_flush = \"200ms\"\n{}\n",
            opts.data_dir.as_deref().unwrap_or(dir.path()).display(),
            opts.extra
        );
        if !opts.no_agents {
            for (id, state) in AGENTS {
                cfg += &format!("[[agents]]\nid = \"{id}\"\nupstream = \"http://{runtime}\"\nstate = \"{state}\"\n");
            }
            cfg += &format!(
                "[[agents]]\nid = \"down1\"\nupstream = \"http://127.0.0.1:{dead_port}\"\n"
            );
        }
        let conf_path = dir.path().join("edge.toml");
        std::fs::write(&conf_path, cfg).unwrap();
        for (name, contents) in &opts.files {
            std::fs::write(dir.path().join(name), contents).unwrap();
        }
        let log = dir.path().join("edge.log");
        let child = spawn_edge(&conf_path, &log);
        let mut s = Self {
            key: String::new(),
            port,
            admin_port,
            https_port,
            runtime,
            stats,
            child,
            dir,
            log,
        };
        s.wait_ready();
        if !opts.no_agents {
            let k = s
                .admin_post(
                    "/v1/admin/keys",
                    serde_json::json!({"name": "tests", "account": "default"}),
                )
                .await;
            s.key = k["key"]
                .as_str()
                .unwrap_or_else(|| panic!("no key: {k}"))
                .to_owned();
        }
        s
    }

    fn wait_ready(&mut self) {
        // Generous: under a loaded CI machine an edge with several plugins compiles them first.
        let deadline = Instant::now() + Duration::from_secs(90);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err()
            || TcpStream::connect(("127.0.0.1", self.admin_port)).is_err()
        {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("the edge exited ({status}):\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "the edge did not start:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Another edge of the same fleet: on `store_url`, in front of this stack's runtime, finding
    /// the agents this one declared in the store.
    pub async fn another_edge(&self, store_url: &str, extra: &str) -> Stack {
        Stack::start_with(Options {
            store_url: Some(store_url.to_owned()),
            extra: extra.to_owned(),
            no_agents: true,
            runtime: Some((self.runtime, self.stats.clone())),
            ..Options::default()
        })
        .await
    }

    /// The admin API's base URL.
    pub fn admin_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.admin_port)
    }

    /// GETs an admin API path and returns its JSON.
    pub async fn admin_get(&self, path: &str) -> serde_json::Value {
        reqwest::Client::new()
            .get(format!("{}{path}", self.admin_url()))
            .bearer_auth(admin_token())
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Asks the edge to reload its config file (`POST /v1/admin/reload`).
    pub async fn reload(&self) -> reqwest::Response {
        reqwest::Client::new()
            .post(format!("{}/v1/admin/reload", self.admin_url()))
            .bearer_auth(admin_token())
            .send()
            .await
            .unwrap()
    }

    /// The edge's Prometheus text (`/metrics` on the admin listener).
    pub async fn metrics(&self) -> String {
        reqwest::get(format!("{}/metrics", self.admin_url()))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Calls the admin API and returns the JSON answer, panicking on a non-2xx.
    pub async fn admin_post(&self, path: &str, body: serde_json::Value) -> serde_json::Value {
        let r = reqwest::Client::new()
            .post(format!("{}{path}", self.admin_url()))
            .bearer_auth(admin_token())
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status();
        let v: serde_json::Value = r.json().await.unwrap();
        assert!(status.is_success(), "{path}: {status} {v}");
        v
    }

    /// URL of `path` on agent `agent`'s endpoint.
    pub fn url(&self, agent: &str, path: &str) -> String {
        format!("http://{agent}.agent.localhost:{}{path}", self.port)
    }

    /// An HTTP client that resolves every test agent's host to loopback (glibc does not).
    pub fn client(&self) -> reqwest::Client {
        let addr: SocketAddr = ([127, 0, 0, 1], self.port).into();
        let mut headers = reqwest::header::HeaderMap::new();
        if !self.key.is_empty() {
            headers.insert(
                "authorization",
                format!("Bearer {}", self.key).parse().unwrap(),
            );
        }
        let mut b = reqwest::Client::builder()
            .no_proxy()
            .default_headers(headers);
        for (id, _) in AGENTS.iter().chain([("down1", ""), ("nosuch", "")].iter()) {
            b = b.resolve(&format!("{id}.agent.localhost"), addr);
        }
        b.build().unwrap()
    }

    /// A POST to `path` on `agent`'s endpoint through loopback (the Host names the agent), with
    /// `key` as the bearer when given, on a fresh client.
    pub fn post_as(&self, agent: &str, path: &str, key: Option<&str>) -> reqwest::RequestBuilder {
        let r = reqwest::Client::builder()
            .no_proxy()
            .build()
            .unwrap()
            .post(format!("http://127.0.0.1:{}{path}", self.port))
            .header("host", format!("{agent}.agent.localhost:{}", self.port));
        match key {
            Some(k) => r.bearer_auth(k),
            None => r,
        }
    }

    /// The ledger's lines grouped by key.
    pub async fn usage_by_key(&self) -> Vec<serde_json::Value> {
        let v = self.admin_get("/v1/admin/usage?by=key").await;
        v["usage"].as_array().unwrap().clone()
    }

    /// The id of the key named `name`.
    pub async fn key_id(&self, name: &str) -> String {
        let keys = self.admin_get("/v1/admin/keys").await;
        keys["keys"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["name"] == name)
            .unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// The ledger's line for the key named `name`, once it counts `want_requests` requests.
    pub async fn ledger_for(&self, name: &str, want_requests: u64) -> serde_json::Value {
        let id = self.key_id(name).await;
        let t0 = Instant::now();
        loop {
            let lines = self.usage_by_key().await;
            if let Some(line) = lines.iter().find(|l| l["group"] == id.as_str()) {
                if line["requests"].as_u64() == Some(want_requests) {
                    return line.clone();
                }
            }
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "no ledger line for {name} with {want_requests} requests: {lines:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The edge's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `moltghost-proxy --config conf`, logging to `log`.
pub fn spawn_edge(conf: &Path, log: &Path) -> Child {
    let out = std::fs::File::create(log).unwrap();
    Command::new(env!("CARGO_BIN_EXE_moltghost-proxy"))
        .arg("--config")
        .arg(conf)
        .env("RUST_LOG", "info")
        .env("MOLTGHOST_ADMIN_SECRET", ADMIN_SECRET)
        .env("MOLTGHOST_KEY_SECRET", KEY_SECRET)
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .stdin(Stdio::null())
        .spawn()
        .expect("start moltghost-proxy")
}

/// Runs a command and returns (status, stdout, stderr).
pub fn run(cmd: &mut Command) -> (i32, String, String) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The `data:` payloads of an SSE body.
pub fn sse_data(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|ev| {
            ev.lines()
                .find_map(|l| l.strip_prefix("data: "))
                .map(str::to_owned)
        })
        .collect()
}

/// Whether python3 can import the official `openai` package. In CI it must.
pub fn have_openai_python() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import openai"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var("CI").is_err(),
            "CI must have the openai Python package (run scripts/setup.sh)"
        );
        eprintln!("skipping: python3 cannot import openai (run scripts/setup.sh)");
    }
    ok
}

/// The path of a client script in tests/clients.
pub fn client_script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/clients")
        .join(name)
}

/// A fresh PostgreSQL database for one test, dropped with it. `None` (and a printed reason) where
/// there is no PostgreSQL, except in CI, which must have one.
pub struct PgDb {
    /// Its URL.
    pub url: String,
    /// Its name.
    pub name: String,
    admin: String,
}

impl PgDb {
    /// Creates the database, or skips.
    pub async fn create() -> Option<Self> {
        use sqlx::Connection;
        let admin = std::env::var("MOLTGHOST_TEST_PG")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
        let mut conn = match sqlx::PgConnection::connect(&admin).await {
            Ok(c) => c,
            Err(e) => {
                assert!(
                    std::env::var("CI").is_err(),
                    "CI must reach PostgreSQL at {admin}: {e}"
                );
                eprintln!("skipping: no PostgreSQL at {admin} ({e})");
                return None;
            }
        };
        let name = format!("mg_test_{}", moltghost::secrets::short_id(10));
        sqlx::raw_sql(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .unwrap();
        let base = admin.rsplit_once('/').unwrap().0;
        Some(Self {
            url: format!("{base}/{name}"),
            name,
            admin,
        })
    }
}

impl Drop for PgDb {
    fn drop(&mut self) {
        let _ = Command::new("psql")
            .args([
                self.admin.as_str(),
                "-q",
                "-c",
                &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// A PostgreSQL server of a test's own (`initdb` in a temporary directory, run as the `postgres`
/// user), that the test can stop and start again: a real restart, not a cut connection.
pub struct PgServer {
    /// Its URL (database `postgres`, trust authentication).
    pub url: String,
    bin: PathBuf,
    dir: tempfile::TempDir,
}

impl PgServer {
    /// Initializes and starts one, or `None` (and a printed reason) where this machine has no
    /// PostgreSQL server binaries or no `postgres` user, except in CI, which must have both.
    pub fn start() -> Option<Self> {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .and_then(|d| d.flatten().map(|e| e.path().join("bin")).max())
            .filter(|b| b.join("pg_ctl").exists());
        let Some(bin) = bin else {
            assert!(
                std::env::var("CI").is_err(),
                "CI must have PostgreSQL's server binaries"
            );
            eprintln!("skipping: no PostgreSQL server binaries");
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        Command::new("chown")
            .args(["-R", "postgres"])
            .arg(dir.path())
            .status()
            .unwrap();
        let s = Self {
            url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
            bin,
            dir,
        };
        let data = s.data();
        s.as_postgres(&["initdb", "-A", "trust", "-U", "postgres", "-D", &data]);
        std::fs::write(
            s.dir.path().join("data/postgresql.auto.conf"),
            format!(
                "port = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = ''\n"
            ),
        )
        .unwrap();
        s.pg_ctl("start");
        Some(s)
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    fn as_postgres(&self, args: &[&str]) {
        let out = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join(args[0]))
            .args(&args[1..])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `pg_ctl start|stop|restart`, fast, waiting until it is done.
    pub fn pg_ctl(&self, what: &str) {
        let log = self.dir.path().join("server.log").display().to_string();
        let data = self.data();
        self.as_postgres(&["pg_ctl", what, "-w", "-m", "fast", "-D", &data, "-l", &log]);
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let data = self.data();
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .args(["stop", "-m", "immediate", "-D", &data])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// PgBouncer in transaction mode in front of the PostgreSQL at 127.0.0.1:5432 (every
/// database), with a small pool, so that the edges' transactions really share server
/// connections.
pub struct PgBouncer {
    /// The port clients connect to.
    pub port: u16,
    child: Child,
    dir: tempfile::TempDir,
}

impl PgBouncer {
    /// Starts one, or `None` (and a printed reason) where this machine has no PgBouncer,
    /// except in CI, where `scripts/setup.sh` installs it.
    pub fn start() -> Option<Self> {
        let bin = ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"]
            .into_iter()
            .find(|b| Path::new(b).exists());
        let Some(bin) = bin else {
            assert!(
                std::env::var("CI").is_err(),
                "CI must have PgBouncer (scripts/setup.sh)"
            );
            eprintln!("skipping: no PgBouncer");
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let d = dir.path().display();
        std::fs::write(dir.path().join("users.txt"), "\"postgres\" \"\"\n").unwrap();
        std::fs::write(
            dir.path().join("pgbouncer.ini"),
            format!(
                "[databases]\n* = host=127.0.0.1 port=5432\n[pgbouncer]\nlisten_addr = 127.0.0.1\n\
                 listen_port = {port}\nunix_socket_dir =\nauth_type = trust\nauth_file = {d}/users.txt\n\
                 admin_users = postgres\npool_mode = transaction\ndefault_pool_size = 3\n\
                 max_client_conn = 200\nlogfile = {d}/pgbouncer.log\npidfile = {d}/pgbouncer.pid\n\
                 ignore_startup_parameters = extra_float_digits,options\n"
            ),
        )
        .unwrap();
        Command::new("chown")
            .args(["-R", "postgres"])
            .arg(dir.path())
            .status()
            .unwrap();
        // It refuses to run as root.
        let child = Command::new("runuser")
            .args(["-u", "postgres", "--", bin])
            .arg(dir.path().join("pgbouncer.ini"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_port(port, Duration::from_secs(10));
        Some(Self { port, child, dir })
    }

    /// Transactions PgBouncer has carried to database `db` (`SHOW STATS`).
    pub fn transactions(&self, db: &str) -> u64 {
        let out = Command::new("psql")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
            ])
            .args(["-At", "-d", "pgbouncer", "-c", "SHOW STATS"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.split('|').collect::<Vec<_>>())
            .find(|cols| cols[0] == db)
            .and_then(|cols| cols.get(1)?.parse().ok())
            .unwrap_or(0)
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("pgbouncer.log")).unwrap_or_default()
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        // runuser passes SIGTERM on to PgBouncer.
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}

/// A TCP relay to PostgreSQL that a test can cut and restore, to take the store away from one
/// edge while the rest of the machine keeps it.
pub struct Relay {
    /// The port edges connect to.
    pub port: u16,
    up: Arc<tokio::sync::watch::Sender<bool>>,
}

impl Relay {
    /// A relay to `target` (host:port), up.
    pub async fn start(target: &str) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, _) = tokio::sync::watch::channel(true);
        let up = Arc::new(tx);
        let target = target.to_owned();
        let up2 = up.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                let mut down = up2.subscribe();
                if !*down.borrow() {
                    continue; // dropped: the store is "gone"
                }
                let target = target.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = down.wait_for(|up| !*up) => {}
                    }
                });
            }
        });
        Self { port, up }
    }

    /// Cuts every connection and refuses new ones.
    pub fn cut(&self) {
        self.up.send_replace(false);
    }

    /// Lets connections through again.
    pub fn restore(&self) {
        self.up.send_replace(true);
    }
}

/// A WireGuard key pair for a test edge: the config lines that give it, its public key, and
/// its private key (base64).
pub fn edge_tunnel_key() -> (String, String, String) {
    let secret = moltghost::tunnel::keys::generate();
    let public = moltghost::tunnel::keys::public_of(&secret);
    let b64 = moltghost::tunnel::keys::encode(&secret.to_bytes());
    (format!("[tunnel]\nprivate_key = \"{b64}\"\n"), public, b64)
}

/// A free loopback UDP port (bound, then released).
pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `moltghost-pod` sidecar process in front of a runtime.
pub struct PodProc {
    /// The process.
    pub child: Child,
    /// The pod's public key.
    pub key: String,
    /// Its UDP address.
    pub addr: SocketAddr,
    /// State directory (its private key) and log.
    pub dir: tempfile::TempDir,
    args: Vec<String>,
}

impl PodProc {
    /// Starts a sidecar on `addr` accepting `edge_key`, forwarding to `runtime`, checking
    /// identities against the JWKS of the edge whose admin API is `admin_url`.
    pub fn start(addr: SocketAddr, edge_key: &str, runtime: SocketAddr, admin_url: &str) -> Self {
        Self::start_with(addr, edge_key, runtime, admin_url, &[])
    }

    /// As [`PodProc::start`], with more `run` arguments.
    pub fn start_with(
        addr: SocketAddr,
        edge_key: &str,
        runtime: SocketAddr,
        admin_url: &str,
        more: &[&str],
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (code, key, err) = run(Command::new(bin("moltghost-pod"))
            .arg("--state-dir")
            .arg(dir.path())
            .arg("keygen"));
        assert_eq!(code, 0, "{err}");
        let args: Vec<String> = vec![
            "--state-dir".to_string(),
            dir.path().display().to_string(),
            "run".into(),
            "--listen".into(),
            addr.to_string(),
            "--edge-key".into(),
            edge_key.into(),
            "--upstream".into(),
            format!("http://{runtime}"),
            "--jwks".into(),
            format!("{admin_url}/.well-known/jwks.json"),
        ]
        .into_iter()
        .chain(more.iter().map(|m| m.to_string()))
        .collect();
        let mut p = Self {
            child: Command::new("true").spawn().unwrap(),
            key: key.trim().to_owned(),
            addr,
            dir,
            args,
        };
        p.restart();
        p
    }

    /// (Re)starts the process with the same key and address, and waits until it is up.
    pub fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let log = self.dir.path().join("pod.log");
        let out = std::fs::File::create(&log).unwrap();
        self.child = Command::new(bin("moltghost-pod"))
            .args(&self.args)
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .stdin(Stdio::null())
            .spawn()
            .expect("start moltghost-pod");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.log().contains("pod sidecar up") {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("the pod exited ({status}):\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "the pod did not start:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the process.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The upstream an agent on this pod has.
    pub fn upstream(&self) -> String {
        format!("wg://{}@{}", self.key, self.addr)
    }

    /// The pod's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("pod.log")).unwrap_or_default()
    }
}

impl Drop for PodProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The example plugin `name` (`allowlist`, `tool_policy`, `redact`, `misbehave`), built from
/// `plugins/` for wasm32-wasip1 with the public proxy-wasm SDK (once per test binary; cargo
/// makes concurrent builds wait for each other).
pub fn plugin_wasm(name: &str) -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        let plugins = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins");
        let target = std::env::var("CARGO_TARGET_DIR")
            .map(|d| PathBuf::from(d).join("plugins"))
            .unwrap_or_else(|_| plugins.join("target"));
        let (code, out, err) = run(Command::new(env!("CARGO"))
            .current_dir(&plugins)
            .args(["build", "--release", "--target", "wasm32-wasip1"])
            .env("CARGO_TARGET_DIR", &target));
        assert_eq!(code, 0, "building the example plugins failed:\n{out}{err}");
        target.join("wasm32-wasip1/release")
    });
    dir.join(format!("{name}.wasm"))
}

/// The Go plugin `plugins/<name>` built with the Go toolchain scripts/setup.sh installs
/// (`GOOS=wasip1 GOARCH=wasm -buildmode=c-shared`), once per test process.
pub fn go_plugin_wasm(name: &str) -> PathBuf {
    let plugins = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins");
    let out = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| plugins.join("target"))
        .join(format!("plugins/go/{name}.wasm"));
    let (_, scripts, _) = run(Command::new("python3").args([
        "-c",
        "import sysconfig; print(sysconfig.get_path('scripts'))",
    ]));
    let go = Path::new(scripts.trim()).join("go");
    let (code, stdout, stderr) = run(Command::new(&go)
        .current_dir(plugins.join(name))
        .args(["build", "-buildmode=c-shared", "-o"])
        .arg(&out)
        .arg(".")
        .env("GOOS", "wasip1")
        .env("GOARCH", "wasm"));
    assert_eq!(
        code, 0,
        "building the Go plugin {name} with {} failed (scripts/setup.sh installs Go):\n{stdout}{stderr}",
        go.display()
    );
    out
}

/// The AssemblyScript plugin `plugins/<name>` built with its locked npm packages (the SDK
/// `@solo-io/proxy-runtime` and the `asc` compiler), once per test process.
pub fn as_plugin_wasm(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../plugins")
        .join(name);
    let out = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| dir.join("../target"))
        .join(format!("plugins/as/{name}.wasm"));
    if !dir.join("node_modules").exists() {
        let (code, stdout, stderr) = run(Command::new("npm").current_dir(&dir).args([
            "ci",
            "--no-audit",
            "--no-fund",
            "--loglevel=error",
        ]));
        assert_eq!(
            code, 0,
            "npm ci in plugins/{name} failed:\n{stdout}{stderr}"
        );
    }
    let (code, stdout, stderr) = run(Command::new("npm")
        .current_dir(&dir)
        .args(["run", "--silent", "build", "--"])
        .arg(&out));
    assert_eq!(
        code, 0,
        "building the AssemblyScript plugin {name} failed:\n{stdout}{stderr}"
    );
    out
}

/// A binary of the workspace (`moltghost`, `moltghost-pod`, `agent-runtime`), built beside the
/// edge's: `cargo test --workspace` builds every package's binaries before any test runs.
pub fn bin(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_BIN_EXE_moltghost-proxy")).with_file_name(name)
}

/// A `[[plugins]]` entry for the example plugin `wasm` (see [`plugin_wasm`]), named `name`,
/// with `extra` TOML lines.
pub fn plugin(name: &str, wasm: &str, extra: &str) -> String {
    format!(
        "[[plugins]]\nname = \"{name}\"\npath = \"{}\"\n{extra}\n",
        plugin_wasm(wasm).display()
    )
}

/// A chat completion to `agent` with the stack's key and extra headers: status and body.
pub async fn chat(
    s: &Stack,
    agent: &str,
    body: serde_json::Value,
    headers: &[(&str, &str)],
) -> (u16, String) {
    let mut r = s
        .post_as(agent, "/v1/chat/completions", Some(&s.key))
        .json(&body);
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    let resp = r.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap())
}

/// A one-message chat request, streamed or not.
pub fn hi(stream: bool) -> serde_json::Value {
    serde_json::json!({"model": "m", "stream": stream, "messages": [{"role": "user", "content": "hi"}]})
}
