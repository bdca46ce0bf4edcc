//! HTTP/3 with clients nobody here wrote: aioquic's HTTP/3 client (PyPI) and headless
//! Chromium (Debian). Each fetches a page through Wraith; the access log must show protocol
//! h3 and the key-exchange group that client negotiated. Both tools are installed by
//! `.ci/install-deps.sh`; a missing tool fails the test (it never passes silently).

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use hyper::{Request, Response};

const PAGE: &str = "<!doctype html><html><head><title>wraith-h3</title></head><body><p id=\"m\">served over HTTP/3 by the upstream</p></body></html>";

async fn page_upstream() -> Upstream {
    Upstream::start(|_req: Request<hyper::body::Incoming>| async move {
        Response::builder()
            .header("content-type", "text/html; charset=utf-8")
            .body(full(PAGE))
            .unwrap()
    })
    .await
}

fn start(setup: Setup, upstream: std::net::SocketAddr) -> Wraith {
    let cfg = format!(
        r#"{base}
[log.json]
path = "access.json"

[[upstream]]
name = "app"
endpoints = ["{upstream}"]

[[route]]
name = "app"
upstream = "app"
"#,
        base = setup.listeners_h3("", "", ALLOW_ALL_POLICY)
    );
    setup.start(&cfg)
}

/// Every access record so far whose user agent contains `agent`.
fn records_of(wraith: &Wraith, agent: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(wraith.path("access.json"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["user_agent"].as_str().unwrap_or("").contains(agent))
        .collect()
}

/// Runs `cmd` with a deadline; returns (exit code, stdout, stderr).
fn run(mut cmd: Command, deadline: Duration, what: &str) -> (Option<i32>, String, String) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("{what} could not be started ({e}): run .ci/install-deps.sh to install it")
        });
    let end = Instant::now() + deadline;
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        if Instant::now() >= end {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aioquic_fetches_a_page_over_http3() {
    let upstream = page_upstream().await;
    let setup = Setup::new();
    let ca = setup.pki.ca_pem.clone();
    let wraith = start(setup, upstream.addr);
    let port = wraith.addr("https").port();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/aioquic_get.py");
    let mut cmd = Command::new("python3");
    cmd.arg(&script)
        .arg("127.0.0.1")
        .arg(port.to_string())
        .arg("/index.html")
        .arg(&ca);
    let (code, out, err) = tokio::task::spawn_blocking(move || {
        run(cmd, Duration::from_secs(60), "python3 with aioquic")
    })
    .await
    .unwrap();
    assert!(
        !err.contains("No module named 'aioquic'"),
        "aioquic is not installed: run .ci/install-deps.sh ({err})"
    );
    assert_eq!(code, Some(0), "aioquic client failed:\n{out}\n{err}");
    let got: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(got["status"], 200, "{got}");
    assert_eq!(got["body"], PAGE);
    assert!(got["headers"]["x-request-id"].is_string());

    let rid = got["headers"]["x-request-id"].as_str().unwrap();
    let record = wraith.access_record("access.json", rid);
    assert_eq!(record["protocol"], "h3");
    assert_eq!(record["user_agent"], "aioquic");
    // aioquic has no ML-KEM: it gets a classical group, recorded per connection.
    let group = record["tls_group"].as_str().unwrap_or("");
    assert!(
        ["X25519", "secp256r1"].contains(&group),
        "unexpected group {group:?}: {record}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headless_chromium_fetches_a_page_over_http3_with_x25519mlkem768() {
    let upstream = page_upstream().await;
    let setup = Setup::new();
    let spki = spki_sha256_base64(&setup.pki.server_cert);
    let wraith = start(setup, upstream.addr);
    let port = wraith.addr("https").port();
    let profile = tempfile::tempdir().unwrap();
    let mut cmd = Command::new("chromium");
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ])
    .arg(format!("--user-data-dir={}", profile.path().display()))
    // HTTP/3 from the first request (no Alt-Svc round over TCP first), to this origin only.
    .arg(format!("--origin-to-force-quic-on=localhost:{port}"))
    .arg("--host-resolver-rules=MAP localhost 127.0.0.1")
    // Trust the test server's key without touching any system trust store.
    .arg(format!("--ignore-certificate-errors-spki-list={spki}"))
    .arg("--dump-dom")
    .arg(format!("https://localhost:{port}/index.html"));
    let (code, out, err) =
        tokio::task::spawn_blocking(move || run(cmd, Duration::from_secs(90), "chromium"))
            .await
            .unwrap();
    assert!(
        out.contains("served over HTTP/3 by the upstream"),
        "chromium did not render the page (exit {code:?}):\n{out}\n{err}"
    );
    // The JSON sink writes in batches (every 100 ms): wait for the record.
    let deadline = Instant::now() + Duration::from_secs(10);
    let page = loop {
        let records = records_of(&wraith, "Chrome");
        if let Some(page) = records.iter().find(|r| r["path"] == "/index.html") {
            break page.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no access record from Chromium: {records:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(page["protocol"], "h3", "{page}");
    assert_eq!(page["status"], 200);
    assert_eq!(page["tls_group"], "X25519MLKEM768", "{page}");
}

/// `base64(sha256(SubjectPublicKeyInfo))` of the first certificate in a PEM file: what
/// Chromium's `--ignore-certificate-errors-spki-list` takes.
fn spki_sha256_base64(cert_pem: &Path) -> String {
    use rustls_pki_types::pem::PemObject;
    let der = rustls_pki_types::CertificateDer::from_pem_file(cert_pem).unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    let digest = aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        cert.tbs_certificate.subject_pki.raw,
    );
    base64(digest.as_ref())
}

fn base64(data: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ABC[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}
