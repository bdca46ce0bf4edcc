//! The TLS posture of the https listeners, as a scanner nobody here wrote sees it:
//! testssl.sh (Debian's `testssl.sh` package, binary `testssl`), run against a Wraith started
//! by the test, its findings read from the JSON it writes. Also, with a rustls client, what
//! testssl.sh 3.0 cannot see: the post-quantum group (it knows no ML-KEM). (Resumed sessions
//! on mTLS listeners, which testssl.sh cannot test either, are in tests/mtls_reload.rs.)
//!
//! testssl.sh is installed by `.ci/install-deps.sh`; a missing testssl.sh fails these tests,
//! it never passes them silently.
//!
//! Only the checks that assert something run (`-p -E -f -H -I -C -R -h`, plus `-P` on the
//! TLS 1.2 listener): about 20 s and 30 s on the CI machine. Not run here: `-S` (certificate
//! and chain: the test CA is not trusted by testssl.sh, and a test certificate has neither
//! CRL nor OCSP URI, which testssl.sh rates CRITICAL and HIGH), `-U` beyond the checks above
//! (POODLE, SWEET32, FREAK, DROWN, LOGJAM, BEAST, LUCKY13, RC4, ROBOT are all about protocols
//! or cipher suites that `-p` and `-E` already show are not offered) and `-c` (client
//! simulations).

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use rustls::pki_types::ServerName;
use rustls::NamedGroup;
use serde_json::Value;

/// The https listener answers `/` itself: testssl.sh's header check (`-h`) reads it.
fn start(setup: Setup, tls_extra: &str) -> Wraith {
    let cfg = format!(
        r#"{base}
[[route]]
name = "home"
respond = {{ status = 200, body = "ok\n" }}
"#,
        base = setup.listeners_with(tls_extra, ALLOW_ALL_POLICY)
    );
    setup.start(&cfg)
}

/// Runs `cmd` with a deadline, its output going to `out` (a file: a pipe read only after
/// the exit would fill up and stall a talkative child); returns (exit code, output). `None`
/// when it could not be started at all.
fn run(mut cmd: Command, out: &Path, deadline: Duration) -> Option<(Option<i32>, String)> {
    let file = std::fs::File::create(out).unwrap();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .ok()?;
    let end = Instant::now() + deadline;
    let status = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break Some(status);
        }
        if Instant::now() >= end {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let output = std::fs::read_to_string(out).unwrap_or_default();
    Some((status.and_then(|s| s.code()), output))
}

/// What one testssl.sh run found: every finding of its (single) target, flattened.
struct Scan {
    findings: Vec<Value>,
    /// testssl.sh's console output, for failure messages.
    output: String,
}

impl Scan {
    /// The finding `id` (the first of `ids` present: testssl.sh 3.2 renamed some, e.g.
    /// `PFS_ECDHE_curves` to `FS_ECDHE_curves`).
    fn get(&self, ids: &[&str]) -> &Value {
        ids.iter()
            .find_map(|id| self.findings.iter().find(|f| f["id"] == *id))
            .unwrap_or_else(|| panic!("testssl.sh reported none of {ids:?}:\n{}", self.output))
    }

    fn finding(&self, ids: &[&str]) -> &str {
        self.get(ids)["finding"].as_str().unwrap_or("")
    }

    fn severity(&self, ids: &[&str]) -> &str {
        self.get(ids)["severity"].as_str().unwrap_or("")
    }

    /// The cipher suites testssl.sh found (`-E`), as (testssl id, IANA name).
    fn ciphers(&self) -> Vec<(String, String)> {
        self.findings
            .iter()
            .filter_map(|f| {
                let id = f["id"].as_str()?;
                id.starts_with("cipher-").then(|| {
                    // "TLS 1.2   xc02c   ECDHE-ECDSA-AES256-GCM-SHA384   ECDH 253   AESGCM   256
                    //  TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": the IANA name comes last.
                    let iana = f["finding"]
                        .as_str()
                        .unwrap_or("")
                        .split_whitespace()
                        .last()
                        .unwrap_or("")
                        .to_string();
                    (id.to_string(), iana)
                })
            })
            .collect()
    }

    /// Nothing HIGH or CRITICAL, and no check that testssl.sh could not carry out.
    fn assert_no_serious_findings(&self) {
        let bad: Vec<&Value> = self
            .findings
            .iter()
            .filter(|f| {
                matches!(
                    f["severity"].as_str(),
                    Some("HIGH" | "CRITICAL" | "WARN" | "FATAL")
                )
            })
            .collect();
        assert!(
            bad.is_empty(),
            "testssl.sh: HIGH/CRITICAL findings, or checks it could not run: {bad:#?}\n{}",
            self.output
        );
    }
}

/// Runs testssl.sh with `checks` against `https://127.0.0.1:<port>/`, writing its JSON into
/// `dir`. Panics when testssl.sh is not installed, did not finish, or wrote no usable JSON.
fn testssl(dir: &Path, port: u16, checks: &[&str], name: &str) -> Scan {
    let json = dir.join(format!("testssl-{name}.json"));
    // Debian installs it as `testssl`; the upstream tarball as `testssl.sh`.
    let mut result = None;
    for bin in ["testssl", "testssl.sh"] {
        let mut cmd = Command::new(bin);
        cmd.current_dir(dir)
            .args(["--quiet", "--color", "0", "--warnings", "off"])
            .arg("--jsonfile-pretty")
            .arg(&json)
            .args(checks)
            .arg(format!("https://127.0.0.1:{port}/"));
        if let Some(r) = run(
            cmd,
            &dir.join(format!("testssl-{name}.out")),
            Duration::from_secs(300),
        ) {
            result = Some(r);
            break;
        }
    }
    let (code, output) = result.unwrap_or_else(|| {
        panic!("testssl.sh is not installed (Debian package testssl.sh): run .ci/install-deps.sh")
    });
    // testssl.sh 3.0 exits with the sum of its checks' return values (non-zero is no
    // failure in itself); its own errors are 242..=255, and None means it was killed.
    assert!(
        matches!(code, Some(c) if c < 240),
        "testssl.sh failed or timed out (exit {code:?}):\n{output}"
    );
    let text = std::fs::read_to_string(&json)
        .unwrap_or_else(|e| panic!("no JSON from testssl.sh ({e}):\n{output}"));
    let v: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("testssl.sh JSON unreadable ({e}):\n{text}\n{output}"));
    let target = &v["scanResult"][0];
    assert_eq!(
        target["port"].as_str().unwrap_or(""),
        port.to_string(),
        "testssl.sh scanned something else: {target}\n{output}"
    );
    let findings: Vec<Value> = target
        .as_object()
        .unwrap_or_else(|| panic!("no scan result:\n{text}\n{output}"))
        .values()
        .filter_map(|s| s.as_array())
        .flatten()
        .cloned()
        .collect();
    Scan { findings, output }
}

/// Protocol, ALPN, forward-secrecy, heartbleed-class, renegotiation, compression and header
/// findings that hold on every https listener.
fn assert_common(scan: &Scan) {
    for old in ["SSLv2", "SSLv3", "TLS1", "TLS1_1"] {
        assert!(
            scan.finding(&[old]).starts_with("not offered"),
            "{old}: {}",
            scan.finding(&[old])
        );
    }
    assert!(scan.finding(&["TLS1_3"]).starts_with("offered"));
    assert!(scan.finding(&["NPN"]).starts_with("not offered"));
    assert_eq!(scan.finding(&["ALPN_HTTP2"]), "h2");
    assert!(scan.finding(&["ALPN"]).contains("http/1.1"));

    assert_eq!(scan.finding(&["PFS", "FS"]), "offered");
    let groups = scan.finding(&["PFS_ECDHE_curves", "FS_ECDHE_curves"]);
    assert!(groups.contains("X25519"), "groups: {groups}");
    // testssl.sh 3.0 knows no ML-KEM group (`pq_group_is_preferred` checks it instead); a
    // version that does must find the hybrid.
    if groups.contains("MLKEM") {
        assert!(groups.contains("X25519MLKEM768"), "groups: {groups}");
    }

    for check in [
        "heartbleed",
        "CCS",
        "secure_renego",
        "secure_client_renego",
        "CRIME_TLS",
    ] {
        assert_eq!(
            scan.severity(&[check]),
            "OK",
            "{check}: {}",
            scan.finding(&[check])
        );
    }

    // Wraith names itself nowhere: no Server header on the responses it makes.
    let banner = scan.finding(&["banner_server"]);
    assert!(
        banner.to_ascii_lowercase().starts_with("no server banner"),
        "Server header: {banner}"
    );
    // Only what a test certificate and a bare `respond` route cannot avoid: no HSTS (LOW)
    // and no security headers (MEDIUM), both up to the route's `response_headers`.
    scan.assert_no_serious_findings();
}

/// Starts Wraith with `tls_extra` on its https listener and scans that with `checks`.
async fn scan_listener(
    tls_extra: &str,
    checks: &'static [&'static str],
    name: &'static str,
) -> Scan {
    let wraith = start(Setup::new(), tls_extra);
    let port = wraith.addr("https").port();
    let dir = wraith.dir.path().to_path_buf();
    tokio::task::spawn_blocking(move || testssl(&dir, port, checks, name))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn testssl_default_listener_offers_tls13_only() {
    let checks = &["-p", "-E", "-f", "-H", "-I", "-C", "-R", "-h"];
    let scan = scan_listener("", checks, "default").await;

    assert_common(&scan);
    assert!(
        scan.finding(&["TLS1_2"]).starts_with("not offered"),
        "TLS 1.2 is opt-in: {}",
        scan.finding(&["TLS1_2"])
    );
    let mut suites: Vec<String> = scan.ciphers().into_iter().map(|(_, iana)| iana).collect();
    suites.sort();
    assert_eq!(
        suites,
        [
            "TLS_AES_128_GCM_SHA256",
            "TLS_AES_256_GCM_SHA384",
            "TLS_CHACHA20_POLY1305_SHA256"
        ],
        "{}",
        scan.output
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn testssl_tls12_listener_offers_only_ecdhe_aead_suites() {
    let checks = &["-p", "-E", "-P", "-f", "-H", "-I", "-C", "-R", "-h"];
    let scan = scan_listener(r#"versions = ["1.2", "1.3"]"#, checks, "tls12").await;

    assert_common(&scan);
    assert!(scan.finding(&["TLS1_2"]).starts_with("offered"));
    let ciphers = scan.ciphers();
    for (id, iana) in &ciphers {
        assert!(
            id.starts_with("cipher-tls1_2_") || id.starts_with("cipher-tls1_3_"),
            "a suite of another protocol: {id} {iana}"
        );
        if id.starts_with("cipher-tls1_2_") {
            assert!(
                iana.starts_with("TLS_ECDHE_")
                    && (iana.contains("_GCM_") || iana.contains("CHACHA20_POLY1305")),
                "TLS 1.2 suite that is not ECDHE with an AEAD: {id} {iana}"
            );
        }
    }
    // The test certificate is ECDSA (rcgen's default key): the three ECDHE-ECDSA AEAD suites.
    let mut tls12: Vec<&str> = ciphers
        .iter()
        .filter(|(id, _)| id.starts_with("cipher-tls1_2_"))
        .map(|(_, iana)| iana.as_str())
        .collect();
    tls12.sort();
    assert_eq!(
        tls12,
        [
            "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
            "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
            "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256"
        ],
        "{}",
        scan.output
    );
    // The server's order, not the client's (`ignore_client_order`).
    assert_eq!(scan.finding(&["cipher_order"]), "server");
    let order = scan.finding(&["cipherorder_TLSv1_2"]);
    assert_eq!(
        order.split_whitespace().count(),
        3,
        "TLS 1.2 order: {order}"
    );
}

/// testssl.sh 3.0 cannot name X25519MLKEM768: a rustls client (the aws-lc-rs provider with
/// `prefer-post-quantum`, which offers it first) must get it, on a listener that also
/// allows TLS 1.2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pq_group_is_preferred() {
    let setup = Setup::new();
    let ca = setup.pki.ca_pem.clone();
    let wraith = start(setup, r#"versions = ["1.2", "1.3"]"#);
    let addr = wraith.addr("https");
    let config = tls_client_config(&ca, &[b"h2", b"http/1.1"], None);
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let (_, conn) = tls.get_ref();
    assert_eq!(
        conn.negotiated_key_exchange_group().map(|g| g.name()),
        Some(NamedGroup::X25519MLKEM768)
    );
    assert_eq!(
        conn.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
}
