//! TLS termination: SNI for two domains, HTTP/2 by ALPN, the openai client over HTTPS with a
//! test CA, plain HTTP redirected, and certificates reloaded without a restart.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{run, Options, Stack};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};

/// A test CA that signs leaf certificates into files.
struct Ca {
    params: CertificateParams,
    key: KeyPair,
    pem: PathBuf,
}

impl Ca {
    fn new(dir: &Path, name: &str) -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).unwrap();
        let pem = dir.join(format!("{name}.pem"));
        std::fs::write(&pem, cert.pem()).unwrap();
        Self { params, key, pem }
    }

    /// Signs a certificate for `names` and writes it to `<stem>.crt` and `<stem>.key`.
    fn leaf(&self, dir: &Path, stem: &str, names: &[&str]) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.distinguished_name.push(DnType::CommonName, names[0]);
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer).unwrap();
        let (crt, k) = (
            dir.join(format!("{stem}.crt")),
            dir.join(format!("{stem}.key")),
        );
        // Write the key first: the edge reloads when it sees the certificate change.
        std::fs::write(&k, key.serialize_pem()).unwrap();
        std::fs::write(&crt, cert.pem()).unwrap();
        (crt, k)
    }
}

fn curl(args: &[&str]) -> (i32, String, String) {
    run(Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .args(args))
}

async fn tls_stack(certs: &Path, plain_http: &str) -> (Stack, Ca, Ca) {
    tls_stack_with(certs, plain_http, "").await
}

/// The same, with `more` appended to the edge's configuration.
async fn tls_stack_with(certs: &Path, plain_http: &str, more: &str) -> (Stack, Ca, Ca) {
    let ca = Ca::new(certs, "ca-one");
    let other_ca = Ca::new(certs, "ca-two");
    let (a_crt, a_key) = ca.leaf(
        certs,
        "agent-localhost",
        &["*.agent.localhost", "127.0.0.1"],
    );
    let (b_crt, b_key) = other_ca.leaf(certs, "agents-test", &["*.agents.test"]);
    let extra = format!(
        "[tls]\nplain_http = \"{plain_http}\"\nreload_interval = \"200ms\"\n\
         [[tls.certificates]]\nnames = [\"*.agent.localhost\", \"127.0.0.1\"]\ncert = \"{}\"\nkey = \"{}\"\n\
         [[tls.certificates]]\nnames = [\"*.agents.test\"]\ncert = \"{}\"\nkey = \"{}\"\n",
        a_crt.display(),
        a_key.display(),
        b_crt.display(),
        b_key.display()
    ) + more;
    let s = Stack::start_with(Options {
        extra,
        https: true,
        ..Options::default()
    })
    .await;
    (s, ca, other_ca)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_sni_http2_and_reload() {
    let certs = tempfile::tempdir().unwrap();
    let (s, ca, other_ca) = tls_stack(certs.path(), "redirect").await;
    let port = s.https_port;
    let auth = format!("Authorization: Bearer {}", s.key);
    let url = format!("https://abc123.agent.localhost:{port}/v1/models");

    // SNI: each name gets its own certificate (each signed by its own CA here).
    let (code, out, err) = curl(&[
        "--cacert",
        ca.pem.to_str().unwrap(),
        "-H",
        &auth,
        "-w",
        " %{http_version}",
        "--http2",
        &url,
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("llama3.1-70b") && out.ends_with(" 2"), "{out}");
    let (code, out, _) = curl(&[
        "--cacert",
        ca.pem.to_str().unwrap(),
        "-H",
        &auth,
        "-w",
        " %{http_version}",
        "--http1.1",
        &url,
    ]);
    assert_eq!(code, 0);
    assert!(out.ends_with(" 1.1"), "{out}");
    let other = format!("https://abc123.agents.test:{port}/v1/models");
    let resolve = format!("abc123.agents.test:{port}:127.0.0.1");
    let (code, out, err) = curl(&[
        "--cacert",
        other_ca.pem.to_str().unwrap(),
        "--resolve",
        &resolve,
        "-H",
        &auth,
        "-w",
        " %{http_code}",
        &other,
    ]);
    assert_eq!(
        code, 0,
        "the second domain's certificate was not served: {err}"
    );
    assert!(
        out.ends_with(" 404"),
        "agents.test is not the agents domain: {out}"
    );
    let (code, _, _) = curl(&[
        "--cacert",
        ca.pem.to_str().unwrap(),
        "--resolve",
        &resolve,
        &other,
    ]);
    assert_ne!(
        code, 0,
        "the first certificate must not be served for agents.test"
    );

    // Streaming over HTTP/2.
    let (code, out, err) = curl(&[
        "--cacert",
        ca.pem.to_str().unwrap(),
        "--http2",
        "-N",
        "-H",
        &auth,
        "-X",
        "POST",
        &format!("https://abc123.agent.localhost:{port}/v1/chat"),
        "-d",
        r#"{"messages": [{"role": "user", "content": "hi"}], "stream": true}"#,
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("\"done\":true") && out.ends_with("data: [DONE]\n\n"),
        "{out}"
    );

    // Plain HTTP is redirected to HTTPS.
    let (code, out, _) = curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{redirect_url}",
        &format!("http://abc123.agent.localhost:{}/v1/models?x=1", s.port),
    ]);
    assert_eq!(code, 0);
    assert_eq!(
        out,
        format!("308 https://abc123.agent.localhost:{port}/v1/models?x=1")
    );

    // The openai client over HTTPS, trusting the test CA.
    if common::have_openai_python() {
        let scoped = s
            .admin_post(
                "/v1/admin/keys",
                serde_json::json!({"name": "https", "agents": ["abc123"]}),
            )
            .await;
        let script = format!(
            "import httpx\nfrom openai import OpenAI\n\
             c = OpenAI(api_key='{}', base_url='https://127.0.0.1:{port}/v1', max_retries=0, http_client=httpx.Client(verify='{}'))\n\
             r = c.chat.completions.create(model='m', messages=[{{'role': 'user', 'content': 'hi'}}])\n\
             s = ''.join(ch.choices[0].delta.content or '' for ch in c.chat.completions.create(model='m', messages=[{{'role': 'user', 'content': 'hi'}}], stream=True) if ch.choices)\n\
             assert r.choices[0].message.content.startswith('Hello!') and s.startswith('Hello!'), (r, s)\nprint('ok https')\n",
            scoped["key"].as_str().unwrap(),
            ca.pem.display()
        );
        let (code, out, err) = run(Command::new("python3").arg("-c").arg(script));
        assert_eq!(code, 0, "{out}{err}");
        assert!(out.contains("ok https"));
    }

    // Certificates reload without a restart: re-issue the first name from the other CA.
    std::thread::sleep(Duration::from_millis(1100)); // a different mtime, even on coarse clocks
    other_ca.leaf(
        certs.path(),
        "agent-localhost",
        &["*.agent.localhost", "127.0.0.1"],
    );
    let t0 = Instant::now();
    loop {
        let (code, _, _) = curl(&[
            "--cacert",
            other_ca.pem.to_str().unwrap(),
            "-H",
            &auth,
            &url,
        ]);
        if code == 0 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "the new certificate was never served"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (code, _, _) = curl(&["--cacert", ca.pem.to_str().unwrap(), &url]);
    assert_ne!(code, 0, "the old certificate is still served");
    // The log is written in batches (every 200 ms).
    let t0 = Instant::now();
    while !s.log().contains("TLS certificates reloaded") {
        assert!(t0.elapsed() < Duration::from_secs(2), "{}", s.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_can_be_refused() {
    let certs = tempfile::tempdir().unwrap();
    let (s, _, _) = tls_stack(certs.path(), "refuse").await;
    let (_, out, _) = curl(&[
        "-w",
        " %{http_code}",
        &format!("http://abc123.agent.localhost:{}/v1/models", s.port),
    ]);
    assert!(
        out.ends_with(" 403") && out.contains("use https://"),
        "{out}"
    );
}

#[test]
fn a_missing_certificate_is_refused_at_load_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("tls.toml");
    std::fs::write(&p, "[listen]\nhttps = [\"127.0.0.1:8443\"]\n[[tls.certificates]]\nnames = [\"x\"]\ncert = \"/nope.crt\"\nkey = \"/nope.key\"\n").unwrap();
    let (code, _, err) = run(Command::new(env!("CARGO_BIN_EXE_moltghost-proxy"))
        .arg("--config")
        .arg(&p)
        .arg("--check"));
    assert_eq!(code, 2);
    assert!(err.contains("tls.certificates[0].cert"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugins_see_the_tls_version_and_server_name_as_envoy_names_them() {
    let certs = tempfile::tempdir().unwrap();
    let plugin = format!(
        "[[plugins]]\nname = \"go\"\npath = \"{}\"\n",
        common::go_plugin_wasm("go_headers").display()
    );
    let (s, ca, _) = tls_stack_with(certs.path(), "redirect", &plugin).await;
    let url = format!(
        "https://abc123.agent.localhost:{}/v1/chat/completions",
        s.https_port
    );
    for (version, want) in [("--tlsv1.3", "TLSv1.3"), ("--tls-max", "TLSv1.2")] {
        let mut args = vec![
            "--cacert",
            ca.pem.to_str().unwrap(),
            "-H",
            "x-go-question: props",
            "-H",
            "content-type: application/json",
            "-d",
            r#"{"messages":[{"role":"user","content":"hi"}]}"#,
        ];
        let auth = format!("Authorization: Bearer {}", s.key);
        args.extend(["-H", auth.as_str()]);
        args.push(version);
        if version == "--tls-max" {
            args.push("1.2");
        }
        args.push(&url);
        let (code, out, err) = curl(&args);
        assert_eq!(code, 0, "{err}");
        assert!(
            out.contains(&format!("connection.tls_version={want}\n")),
            "{version}: {out}"
        );
        assert!(out.contains("request.scheme=https\n"), "{out}");
        assert!(
            out.contains("connection.requested_server_name=abc123.agent.localhost\n"),
            "{out}"
        );
    }
}
