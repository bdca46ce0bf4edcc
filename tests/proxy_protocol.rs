//! Listeners behind a layer-4 load balancer (`proxy_protocol = true`): Debian's HAProxy in
//! TCP mode passing mTLS through with `send-proxy-v2` and plain HTTP with `send-proxy`, the
//! header read to its exact end whatever follows it and however it arrives, refused when
//! missing, malformed, slow or sent by a peer not in `server.trusted_proxies`, and the client
//! it names banned and limited as a direct client is.

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use http::Method;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// The standard listeners, both taking PROXY headers from 127.0.0.1, routed to `upstream`,
/// with a JSON access log; `limits` goes on the http listener.
fn config(setup: &Setup, upstream: SocketAddr, trusted: &str, limits: &str) -> String {
    let listeners = setup
        .listeners_with(
            "client_auth = \"optional\", client_ca = \"ca.pem\"",
            ALLOW_ALL_POLICY,
        )
        .replace(
            "[server]\n",
            &format!("[server]\ntrusted_proxies = [\"{trusted}\"]\n"),
        )
        .replace(
            "protocol = \"http\"\n",
            &format!("protocol = \"http\"\nproxy_protocol = true\n{limits}\n"),
        )
        .replace(
            "protocol = \"https\"\n",
            "protocol = \"https\"\nproxy_protocol = true\n",
        );
    format!(
        r#"{listeners}
[log.json]
path = "access.json"

[log.combined]
path = "access.log"
vhost = true

[[upstream]]
name = "echo"
endpoints = ["{upstream}"]

[[route]]
name = "all"
path = {{ prefix = "/" }}
upstream = "echo"
"#
    )
}

/// Debian's HAProxy in TCP mode: one front end per `(name, target, option)`, each passing
/// connections to `target` with `send-proxy` or `send-proxy-v2`. Killed on drop.
struct Haproxy {
    child: Child,
    ports: Vec<u16>,
    _dir: tempfile::TempDir,
}

impl Haproxy {
    fn start(backends: &[(SocketAddr, &str)]) -> Haproxy {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = String::from(
            "global\n  maxconn 100\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n",
        );
        let mut ports = Vec::new();
        for (i, (target, option)) in backends.iter().enumerate() {
            let port = unused_port();
            ports.push(port);
            cfg.push_str(&format!(
                "frontend f{i}\n  bind 127.0.0.1:{port}\n  default_backend b{i}\nbackend b{i}\n  server wraith {target} {option}\n"
            ));
        }
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, &cfg).unwrap();
        let child = Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("haproxy (Debian's package; .ci/install-deps.sh installs it)");
        let deadline = Instant::now() + Duration::from_secs(10);
        for port in &ports {
            while std::net::TcpStream::connect(("127.0.0.1", *port)).is_err() {
                assert!(Instant::now() < deadline, "haproxy did not listen:\n{cfg}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Haproxy {
            child,
            ports,
            _dir: dir,
        }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A connection to `to` from the loopback address `from`.
async fn connect_from(from: &str, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from.parse().unwrap(), 0))?;
    socket.connect(to).await
}

const GET: &[u8] = b"GET /who HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";

/// What the server sends on `s` until it closes (at most 10 s of it), as text; empty when
/// it closed (or reset) without an answer.
async fn answer(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => panic!("no answer, no close within 10 s"),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The echo upstream's JSON from an HTTP/1.1 answer.
fn echoed(answer: &str) -> serde_json::Value {
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    let body = answer.split_once("\r\n\r\n").unwrap().1;
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {answer}"))
}

fn forwarded_for(echo: &serde_json::Value) -> String {
    echo["headers"]["x-forwarded-for"][0]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// `GET /who` sent right after `header`, in the same write: the upstream's view.
async fn through(addr: SocketAddr, header: &[u8]) -> serde_json::Value {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&[header, GET].concat()).await.unwrap();
    echoed(&answer(&mut s).await)
}

fn v2(command: u8, family: u8, body: &[u8]) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.push(0x20 | command);
    h.push(family);
    h.extend_from_slice(&(body.len() as u16).to_be_bytes());
    h.extend_from_slice(body);
    h
}

fn v2_inet6(src: &str, sport: u16) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&src.parse::<std::net::Ipv6Addr>().unwrap().octets());
    body.extend_from_slice(
        &"2001:db8::1"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets(),
    );
    body.extend_from_slice(&sport.to_be_bytes());
    body.extend_from_slice(&443u16.to_be_bytes());
    // A TLV the balancer adds (AWS: 0xEA, the VPC endpoint id).
    body.extend_from_slice(&[0xea, 0, 5, 1, b'v', b'p', b'c', b'e']);
    v2(1, 0x21, &body)
}

async fn refused_total(wraith: &Wraith, listener: &str, reason: &str) -> u64 {
    let (status, metrics) = wraith.admin_get("/v1/metrics").await;
    assert_eq!(status, 200);
    let prefix =
        format!("wraith_connections_refused_total{{listener=\"{listener}\",reason=\"{reason}\"}} ");
    String::from_utf8_lossy(&metrics)
        .lines()
        .find_map(|l| l.strip_prefix(&prefix).map(|n| n.trim().parse().unwrap()))
        .unwrap_or(0)
}

/// Real HAProxy in front: mTLS passes through it (the client certificate reaches Wraith,
/// which knows the client by it), and both header versions name the client's own address
/// (127.0.0.2, not HAProxy's 127.0.0.1) in X-Forwarded-For and the access log.
#[tokio::test]
async fn haproxy_passes_mtls_through_and_names_the_client_with_either_version() {
    let upstream = Upstream::echo().await;
    let setup = Setup::new();
    let cfg = config(&setup, upstream.addr, "127.0.0.1/32", "");
    let wraith = setup.start(&cfg);
    let pki = wraith.pki();
    let (cert, key) = pki.client("billing", Some("spiffe://corp.test/billing"));
    let haproxy = Haproxy::start(&[
        (wraith.addr("https"), "send-proxy-v2"),
        (wraith.addr("http"), "send-proxy"),
    ]);

    for alpn in [&b"h2"[..], b"http/1.1"] {
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(tls_client_config(&pki.ca_pem, &[alpn], Some((&cert, &key))))
            .local_address("127.0.0.2".parse::<std::net::IpAddr>().unwrap())
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap();
        let resp = client
            .get(format!("https://localhost:{}/who", haproxy.ports[0]))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
        let echo: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(forwarded_for(&echo), "127.0.0.2", "{echo}");
        assert_eq!(echo["headers"]["x-real-ip"][0], "127.0.0.2", "{echo}");
        let record = wraith.access_record("access.json", &id);
        assert_eq!(record["client_ip"], "127.0.0.2", "{record}");
        assert_eq!(record["identity"], "spiffe://corp.test/billing", "{record}");
        let protocol = if alpn == b"h2" { "h2" } else { "h1" };
        assert_eq!(record["protocol"], protocol, "{record}");
    }

    let mut s = connect_from(
        "127.0.0.2",
        SocketAddr::from(([127, 0, 0, 1], haproxy.ports[1])),
    )
    .await
    .unwrap();
    s.write_all(GET).await.unwrap();
    assert_eq!(forwarded_for(&echoed(&answer(&mut s).await)), "127.0.0.2");
}

/// The header is consumed to its exact end: the request in the same write, or a header that
/// comes a byte at a time, is served; a header that names no client (a balancer's health
/// check) leaves the connection the balancer's. Missing, malformed, cut-off or slow headers
/// close the connection unanswered and are counted; a connection that sends nothing at all
/// (a TCP health check) is not.
#[tokio::test]
async fn headers_are_read_to_their_exact_end_and_bad_ones_closed_unanswered() {
    let upstream = Upstream::echo().await;
    let setup = Setup::new();
    let cfg = config(
        &setup,
        upstream.addr,
        "127.0.0.1/32",
        "limits = { header_read_timeout = \"1s\" }",
    );
    let wraith = setup.start(&cfg);
    let addr = wraith.addr("http");

    let echo = through(addr, b"PROXY TCP4 192.0.2.7 198.51.100.1 50000 443\r\n").await;
    assert_eq!(forwarded_for(&echo), "192.0.2.7", "{echo}");
    // The address the client connected to is the balancer's front end: the virtual host
    // of a route that names none.
    let id = echo["headers"]["x-request-id"][0]
        .as_str()
        .unwrap()
        .to_string();
    wraith.access_record("access.json", &id);
    let combined = std::fs::read_to_string(wraith.path("access.log")).unwrap();
    assert!(
        combined.starts_with("198.51.100.1 192.0.2.7 - - ["),
        "{combined}"
    );
    let echo = through(addr, &v2_inet6("2001:db8::7", 50000)).await;
    assert_eq!(forwarded_for(&echo), "2001:db8::7", "{echo}");
    // LOCAL, and v1 UNKNOWN: the balancer's own connection.
    let echo = through(addr, &v2(0, 0x00, &[])).await;
    assert_eq!(forwarded_for(&echo), "127.0.0.1", "{echo}");
    let echo = through(addr, b"PROXY UNKNOWN\r\n").await;
    assert_eq!(forwarded_for(&echo), "127.0.0.1", "{echo}");

    // A byte at a time, the request after a pause.
    let mut s = TcpStream::connect(addr).await.unwrap();
    for b in v2_inet6("2001:db8::8", 1) {
        s.write_all(&[b]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    s.write_all(GET).await.unwrap();
    assert_eq!(forwarded_for(&echoed(&answer(&mut s).await)), "2001:db8::8");

    // Nothing at all: no refusal counted.
    drop(TcpStream::connect(addr).await.unwrap());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(refused_total(&wraith, "http", "proxy_header").await, 0);

    let bad: [&[u8]; 5] = [
        GET,
        b"PROXY TCP4 192.0.2.7 198.51.100.1 050000 443\r\n",
        b"PROXY TCP4 192.0.2.7 198.51.100.1 1 443\n",
        &v2(2, 0x11, &[0; 12]),
        &v2(1, 0x12, &[0; 12]),
    ];
    for header in bad {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&[header, GET].concat()).await.unwrap();
        let got = answer(&mut s).await;
        assert_eq!(
            got,
            "",
            "{:?} was answered",
            String::from_utf8_lossy(header)
        );
    }
    // Cut off, and too slow (header_read_timeout = 1s).
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"PROXY TCP4 192.0.2.7").await.unwrap();
    s.shutdown().await.unwrap();
    assert_eq!(answer(&mut s).await, "");
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"PROXY TCP4 192.0.2.7").await.unwrap();
    let started = Instant::now();
    assert_eq!(answer(&mut s).await, "");
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert_eq!(refused_total(&wraith, "http", "proxy_header").await, 7);
    wraith
        .wait_log(Duration::from_secs(5), |v| {
            v["level"] == "WARN"
                && v["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("PROXY protocol header refused"))
        })
        .unwrap_or_else(|| panic!("no warning:\n{}", wraith.log()));
}

/// A header that names no client leaves the connection the balancer's address, not its
/// trust: what it carries may be any client's (HAProxy relays one on a Unix socket as
/// `UNKNOWN`), so an `X-Forwarded-For` in it names no one, to the upstream or in the log.
#[tokio::test]
async fn a_header_that_names_no_client_does_not_make_its_requests_trusted() {
    let upstream = Upstream::echo().await;
    let setup = Setup::new();
    let cfg = config(&setup, upstream.addr, "127.0.0.1/32", "");
    let wraith = setup.start(&cfg);
    let addr = wraith.addr("http");
    let spoofed = b"GET /who HTTP/1.1\r\nHost: localhost\r\nX-Forwarded-For: 203.0.113.9\r\nConnection: close\r\n\r\n";
    // v1 UNKNOWN, v2 LOCAL, v2 PROXY over AF_UNSPEC.
    for header in [
        &b"PROXY UNKNOWN\r\n"[..],
        &v2(0, 0x00, &[]),
        &v2(1, 0x00, &[]),
    ] {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&[header, &spoofed[..]].concat()).await.unwrap();
        let echo = echoed(&answer(&mut s).await);
        assert_eq!(forwarded_for(&echo), "127.0.0.1", "{echo}");
        let id = echo["headers"]["x-request-id"][0]
            .as_str()
            .unwrap()
            .to_string();
        let record = wraith.access_record("access.json", &id);
        assert_eq!(record["client_ip"], "127.0.0.1", "{record}");
    }
}

/// Only peers in `server.trusted_proxies` may send the header: from anyone else the
/// connection is reset at accept, header or not. A reload changes both for new connections.
#[tokio::test]
async fn a_header_from_a_peer_not_trusted_is_refused() {
    let upstream = Upstream::echo().await;
    let setup = Setup::new();
    let cfg = config(&setup, upstream.addr, "127.0.0.3/32", "");
    let wraith = setup.start(&cfg);
    let addr = wraith.addr("http");
    let header = b"PROXY TCP4 192.0.2.7 198.51.100.1 50000 443\r\n";
    let status = wraith.status().await;
    assert_eq!(status["listeners"][0]["proxy_protocol"], true, "{status}");

    if let Ok(mut s) = connect_from("127.0.0.1", addr).await {
        // The reset may come before the write or after it.
        let _ = s.write_all(&[&header[..], GET].concat()).await;
        assert_eq!(answer(&mut s).await, "");
    }
    assert_eq!(refused_total(&wraith, "http", "proxy_untrusted").await, 1);

    let mut s = connect_from("127.0.0.3", addr).await.unwrap();
    s.write_all(&[&header[..], GET].concat()).await.unwrap();
    assert_eq!(forwarded_for(&echoed(&answer(&mut s).await)), "192.0.2.7");

    // A reload applies new trusted_proxies, and turns the header off, for new connections.
    wraith.write_config(&cfg.replace("127.0.0.3/32", "127.0.0.1/32"));
    wraith.reload().unwrap();
    let echo = through(addr, header).await;
    assert_eq!(forwarded_for(&echo), "192.0.2.7");
    wraith.write_config(&cfg.replace("proxy_protocol = true\n", ""));
    wraith.reload().unwrap();
    let mut s = connect_from("127.0.0.1", addr).await.unwrap();
    s.write_all(GET).await.unwrap();
    assert_eq!(forwarded_for(&echoed(&answer(&mut s).await)), "127.0.0.1");
}

/// A balancer left out of `server.trusted_proxies` (or reaching Wraith from another address
/// than the one listed) shows in the log at the default level, not only in a counter.
#[tokio::test]
async fn a_peer_not_trusted_is_logged_as_a_warning() {
    let upstream = Upstream::echo().await;
    let setup = Setup::new();
    let cfg = config(&setup, upstream.addr, "127.0.0.3/32", "");
    let wraith = setup.start(&cfg);
    if let Ok(mut s) = connect_from("127.0.0.1", wraith.addr("http")).await {
        let _ = s
            .write_all(b"PROXY TCP4 192.0.2.7 198.51.100.1 50000 443\r\n")
            .await;
        assert_eq!(answer(&mut s).await, "");
    }
    wraith
        .wait_log(Duration::from_secs(5), |v| {
            v["level"] == "WARN"
                && v["peer"]
                    .as_str()
                    .is_some_and(|p| p.starts_with("127.0.0.1:"))
                && v["error"]
                    .as_str()
                    .is_some_and(|e| e.contains("not in server.trusted_proxies"))
        })
        .unwrap_or_else(|| panic!("no warning:\n{}", wraith.log()));
}

/// The client a header names is the client: a ban on its address refuses its connections
/// (the balancer's others go on), and `max_connections_per_client` counts its connections,
/// not the balancer's.
#[tokio::test]
async fn bans_and_per_client_limits_apply_to_the_client_the_header_names() {
    let upstream = Upstream::echo().await;
    let setup = Setup::new();
    let cfg = config(
        &setup,
        upstream.addr,
        "127.0.0.1/32",
        "limits = { max_connections_per_client = 1 }",
    );
    let wraith = setup.start(&cfg);
    let addr = wraith.addr("http");
    let (status, v) = wraith
        .admin(
            Method::POST,
            "/v1/decisions",
            Some(json!({"ip": "192.0.2.66", "duration": "1h", "reason": "test"})),
        )
        .await;
    assert_eq!(status, 201, "{v}");

    let mut s = TcpStream::connect(addr).await.unwrap();
    let _ = s
        .write_all(&[&b"PROXY TCP4 192.0.2.66 198.51.100.1 1 443\r\n"[..], GET].concat())
        .await;
    assert_eq!(answer(&mut s).await, "", "a banned client was served");
    let echo = through(addr, b"PROXY TCP4 192.0.2.67 198.51.100.1 1 443\r\n").await;
    assert_eq!(forwarded_for(&echo), "192.0.2.67");

    // One connection for 192.0.2.8, held open.
    let mut held = TcpStream::connect(addr).await.unwrap();
    held.write_all(
        b"PROXY TCP4 192.0.2.8 198.51.100.1 1 443\r\nGET /who HTTP/1.1\r\nHost: localhost\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = [0u8; 1024];
    let n = held.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200 "));
    let mut second = TcpStream::connect(addr).await.unwrap();
    let _ = second
        .write_all(&[&b"PROXY TCP4 192.0.2.8 198.51.100.1 2 443\r\n"[..], GET].concat())
        .await;
    assert_eq!(
        answer(&mut second).await,
        "",
        "a second connection was served"
    );
    assert_eq!(refused_total(&wraith, "http", "per_client_limit").await, 1);
    // Another client behind the same balancer is served.
    let echo = through(addr, b"PROXY TCP4 192.0.2.9 198.51.100.1 1 443\r\n").await;
    assert_eq!(forwarded_for(&echo), "192.0.2.9");
    drop(held);
}

#[test]
fn proxy_protocol_without_trusted_proxies_is_a_config_error() {
    let setup = Setup::new();
    let cfg = format!(
        "{}\n[[route]]\nname = \"r\"\npath = {{ prefix = \"/\" }}\nrespond = {{ status = 200 }}\n",
        setup.listeners().replace(
            "protocol = \"http\"\n",
            "protocol = \"http\"\nproxy_protocol = true\n"
        )
    );
    let path = setup.dir.path().join("wraith.toml");
    std::fs::write(&path, &cfg).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_wraith"))
        .args(["test", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("listener[0].proxy_protocol")
            && stderr.contains("needs server.trusted_proxies"),
        "{stderr}"
    );
    let line = cfg
        .lines()
        .position(|l| l.starts_with("proxy_protocol"))
        .unwrap()
        + 1;
    assert!(stderr.contains(&format!("wraith.toml:{line}:")), "{stderr}");
}
