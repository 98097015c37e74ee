//! Test harness: the real `moltghost-proxy` binary on loopback, in front of the reference agent
//! runtime (started in this process so tests can read its counters).

#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use moltghost_loadtest::runtime::{self, RuntimeConfig, Stats};

/// A free loopback port (bound, then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
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

/// A running edge and runtime.
pub struct Stack {
    /// The edge's public port.
    pub port: u16,
    /// The edge's admin port.
    pub admin_port: u16,
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
    /// Starts a runtime and an edge with `extra` appended to the config.
    pub async fn start(extra: &str) -> Self {
        let (runtime, stats) = runtime::spawn(RuntimeConfig::default()).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let admin_port = free_port();
        let dead_port = free_port();
        let mut cfg = format!(
            "[listen]\nhttp = [\"127.0.0.1:{port}\"]\nadmin = \"127.0.0.1:{admin_port}\"\n\
             [edge]\ndata_dir = \"{}\"\ngrace_period = \"1s\"\nshutdown_timeout = \"1s\"\n{extra}\n",
            dir.path().display()
        );
        for (id, state) in AGENTS {
            cfg += &format!(
                "[[agents]]\nid = \"{id}\"\nupstream = \"http://{runtime}\"\nstate = \"{state}\"\n"
            );
        }
        cfg +=
            &format!("[[agents]]\nid = \"down1\"\nupstream = \"http://127.0.0.1:{dead_port}\"\n");
        let conf_path = dir.path().join("edge.toml");
        std::fs::write(&conf_path, cfg).unwrap();
        let log = dir.path().join("edge.log");
        let child = spawn_edge(&conf_path, &log);
        wait_port(port, Duration::from_secs(20));
        Self {
            port,
            admin_port,
            runtime,
            stats,
            child,
            dir,
            log,
        }
    }

    /// URL of `path` on agent `agent`'s endpoint.
    pub fn url(&self, agent: &str, path: &str) -> String {
        format!("http://{agent}.agent.localhost:{}{path}", self.port)
    }

    /// An HTTP client that resolves every test agent's host to loopback (glibc does not).
    pub fn client(&self) -> reqwest::Client {
        let addr: SocketAddr = ([127, 0, 0, 1], self.port).into();
        let mut b = reqwest::Client::builder().no_proxy();
        for (id, _) in AGENTS.iter().chain([("down1", ""), ("nosuch", "")].iter()) {
            b = b.resolve(&format!("{id}.agent.localhost"), addr);
        }
        b.build().unwrap()
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
