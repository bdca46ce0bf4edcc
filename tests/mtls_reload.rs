//! mTLS and reload: a connection admitted under client-certificate rules that a reload
//! replaces (a CRL that now revokes its certificate, another CA bundle) serves nothing more
//! and is closed - HTTP/1.1 after the request in flight, HTTP/2 and HTTP/3 with GOAWAY -
//! while reloads that keep the rules (routes, the server certificate) leave it alone.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::quic::{Groups, H3Client};
use common::*;
use http_body_util::BodyExt;
use hyper::client::conn::{http1, http2};
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::{mpsc, Notify};

const LOG_WAIT: Duration = Duration::from_secs(20);
/// How long a connection or a request may take to succeed or fail.
const ANSWER_WAIT: Duration = Duration::from_secs(30);

/// The reload's line about a listener whose client-certificate rules changed.
const RULES_CHANGED: &str = "client authentication settings changed";

/// An echo upstream that counts requests; `/held` requests are announced on the channel and
/// wait for the `Notify` before they are answered.
async fn holding_echo() -> (
    Upstream,
    Arc<AtomicUsize>,
    mpsc::UnboundedReceiver<()>,
    Arc<Notify>,
) {
    let hits = Arc::new(AtomicUsize::new(0));
    let release = Arc::new(Notify::new());
    let (held_tx, held_rx) = mpsc::unbounded_channel();
    let (h, r) = (hits.clone(), release.clone());
    let upstream = Upstream::start(move |req: Request<hyper::body::Incoming>| {
        h.fetch_add(1, Ordering::SeqCst);
        let (release, held) = (r.clone(), held_tx.clone());
        async move {
            if req.uri().path() == "/held" {
                let _ = held.send(());
                release.notified().await;
            }
            echo_response(req).await
        }
    })
    .await;
    (upstream, hits, held_rx, release)
}

/// The client certificate every test here connects with (SPIFFE ID `spiffe://test.local/svc`).
fn svc_client(setup: &Setup) -> ClientCert {
    setup
        .pki
        .client_with("svc", client_params("svc", Some("spiffe://test.local/svc")))
}

/// The standard listeners with `tls_extra` on the https one, the upstream, `routes` and a
/// catch-all route to the upstream.
fn config(setup: &Setup, tls_extra: &str, upstream: SocketAddr, routes: &str) -> String {
    config_on(
        &setup.listeners_with(tls_extra, ALLOW_ALL_POLICY),
        upstream,
        routes,
    )
}

/// `listeners` (the `[server]`, `[[listener]]` and `[policy]` text), the upstream, `routes`
/// and a catch-all route to the upstream.
fn config_on(listeners: &str, upstream: SocketAddr, routes: &str) -> String {
    format!(
        r#"{listeners}
[[upstream]]
name = "app"
endpoints = ["{upstream}"]
{routes}
[[route]]
name = "app"
upstream = "app"
"#
    )
}

/// Which protocol a `OneConnection` speaks.
#[derive(Clone, Copy, Debug)]
enum Alpn {
    H1,
    H2,
}

impl Alpn {
    fn protocol(self) -> &'static [u8] {
        match self {
            Alpn::H1 => b"http/1.1",
            Alpn::H2 => b"h2",
        }
    }
}

enum Sender {
    H1(http1::SendRequest<TestBody>),
    H2(http2::SendRequest<TestBody>),
}

/// Exactly one TLS connection with a client certificate: every request goes over it (no pool
/// that would quietly open another), and `closed` tells when the server has closed it.
struct OneConnection {
    sender: Sender,
    ended: Option<tokio::task::JoinHandle<()>>,
}

impl OneConnection {
    /// Connects and completes the handshake (as far as the client can tell: with TLS 1.3 the
    /// server checks the client certificate after the client is done, and a refusal arrives
    /// with the first read).
    async fn open(
        addr: SocketAddr,
        ca: &Path,
        client: &ClientCert,
        alpn: Alpn,
    ) -> Result<OneConnection, String> {
        let tls = tls_client_config(ca, &[alpn.protocol()], Some(client.pair()));
        OneConnection::open_with(addr, tls, alpn).await
    }

    /// The same with a client config of the caller's (other TLS versions, no certificate).
    async fn open_with(
        addr: SocketAddr,
        tls: rustls::ClientConfig,
        alpn: Alpn,
    ) -> Result<OneConnection, String> {
        tokio::time::timeout(ANSWER_WAIT, OneConnection::connect(addr, tls, alpn))
            .await
            .unwrap_or_else(|_| panic!("connecting to {addr}: no outcome within {ANSWER_WAIT:?}"))
    }

    async fn connect(
        addr: SocketAddr,
        tls: rustls::ClientConfig,
        alpn: Alpn,
    ) -> Result<OneConnection, String> {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
            .connect("localhost".try_into().unwrap(), tcp)
            .await
            .map_err(|e| e.to_string())?;
        let io = TokioIo::new(stream);
        let (sender, ended) = match alpn {
            Alpn::H1 => {
                let (send, conn) = http1::handshake(io).await.map_err(|e| e.to_string())?;
                (
                    Sender::H1(send),
                    tokio::spawn(async move { drop(conn.await) }),
                )
            }
            Alpn::H2 => {
                let (send, conn) = http2::handshake(TokioExecutor::new(), io)
                    .await
                    .map_err(|e| e.to_string())?;
                (
                    Sender::H2(send),
                    tokio::spawn(async move { drop(conn.await) }),
                )
            }
        };
        Ok(OneConnection {
            sender,
            ended: Some(ended),
        })
    }

    /// Another handle on the same HTTP/2 connection (for a request alongside others).
    fn another_stream(&self) -> OneConnection {
        let Sender::H2(send) = &self.sender else {
            panic!("only an HTTP/2 connection carries requests side by side");
        };
        OneConnection {
            sender: Sender::H2(send.clone()),
            ended: None,
        }
    }

    /// `GET path`: the status and body, or why no response came. A response that neither
    /// comes nor fails within `ANSWER_WAIT` is a failure of the test (a server that stopped
    /// answering must not pass as a connection refused).
    async fn get(&mut self, path: &str) -> Result<(u16, String), String> {
        tokio::time::timeout(ANSWER_WAIT, self.exchange(path))
            .await
            .unwrap_or_else(|_| {
                panic!("GET {path}: neither a response nor an error within {ANSWER_WAIT:?}")
            })
    }

    async fn exchange(&mut self, path: &str) -> Result<(u16, String), String> {
        // HTTP/1.1 names the host in a header, HTTP/2 in the target (`:authority`).
        let req = match self.sender {
            Sender::H1(_) => Request::get(path).header("host", "localhost"),
            Sender::H2(_) => Request::get(format!("https://localhost{path}")),
        }
        .body(full(""))
        .unwrap();
        let resp = match &mut self.sender {
            Sender::H1(send) => {
                send.ready().await.map_err(|e| e.to_string())?;
                send.send_request(req).await
            }
            Sender::H2(send) => {
                send.ready().await.map_err(|e| e.to_string())?;
                send.send_request(req).await
            }
        }
        .map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }

    /// Whether the connection is still open after `wait`.
    async fn open_after(&mut self, wait: Duration) -> bool {
        let ended = self.ended.as_mut().expect("the connection's own handle");
        tokio::time::timeout(wait, ended).await.is_err()
    }

    /// Waits until the server has closed the connection; false if it is still open after
    /// `LOG_WAIT`.
    async fn closed(&mut self) -> bool {
        self.closed_within(LOG_WAIT).await
    }

    /// The same, with a wait of the caller's (shorter than the connection's own timers).
    async fn closed_within(&mut self, wait: Duration) -> bool {
        let ended = self.ended.take().expect("the connection's own handle");
        tokio::time::timeout(wait, ended).await.is_ok()
    }
}

/// Whether a connection admitted before the reload was refused its next request: it found the
/// connection closed (or going away), or got 421 because it sent the request before the
/// server could stop reading.
async fn refused_next_request(conn: &mut OneConnection) -> Result<(), String> {
    match conn.get("/after").await {
        Err(_) => Ok(()),
        Ok((421, body)) if body.contains("client_auth_changed") => Ok(()),
        Ok((status, body)) => Err(format!("served with {status}: {body}")),
    }
}

/// Whether a new connection with `client`'s certificate is refused.
async fn new_connection_refused(addr: SocketAddr, ca: &Path, client: &ClientCert) -> bool {
    match OneConnection::open(addr, ca, client, Alpn::H1).await {
        Err(_) => true,
        Ok(mut c) => c.get("/fresh").await.is_err(),
    }
}

/// The reload's "rules changed" line for `listener`, if there is one.
fn rules_changed(wraith: &Wraith, listener: &str) -> Option<serde_json::Value> {
    wraith.log_json().into_iter().find(|v| {
        v["listener"] == listener
            && v["message"]
                .as_str()
                .is_some_and(|m| m.starts_with(RULES_CHANGED))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crl_that_revokes_a_certificate_closes_the_connections_it_opened() {
    let (upstream, hits, mut held, release) = holding_echo().await;
    let setup = Setup::new();
    let client = svc_client(&setup);
    setup.pki.write_crl("ca.crl", &[]);
    let ca = setup.pki.ca_pem.clone();
    let cfg = config(
        &setup,
        r#"client_auth = "require", client_ca = "ca.pem", client_crl = "ca.crl""#,
        upstream.addr,
        "",
    );
    let wraith = setup.start(&cfg);
    let addr = wraith.addr("https");

    // An idle HTTP/1.1 keep-alive connection, and an HTTP/2 one with a request in flight.
    let mut h1 = OneConnection::open(addr, &ca, &client, Alpn::H1)
        .await
        .unwrap();
    assert_eq!(h1.get("/before").await.unwrap().0, 200);
    let mut h2 = OneConnection::open(addr, &ca, &client, Alpn::H2)
        .await
        .unwrap();
    assert_eq!(h2.get("/before").await.unwrap().0, 200);
    let mut stream = h2.another_stream();
    let in_flight = tokio::spawn(async move { stream.get("/held").await });
    held.recv()
        .await
        .expect("the held request reached the upstream");
    let served = hits.load(Ordering::SeqCst);

    // The CA revokes the certificate; the config file itself is unchanged.
    wraith.pki().write_crl("ca.crl", &[&client]);
    wraith.reload().unwrap();
    let line = rules_changed(&wraith, "https")
        .unwrap_or_else(|| panic!("no {RULES_CHANGED:?} line:\n{}", wraith.log()));
    assert_eq!(line["connections"], 2, "{line}");
    assert!(
        rules_changed(&wraith, "http").is_none(),
        "the plain listener has no client rules to change"
    );

    // Neither connection serves another request.
    refused_next_request(&mut h1).await.expect("HTTP/1.1");
    refused_next_request(&mut h2).await.expect("HTTP/2");
    assert!(h1.closed().await, "the HTTP/1.1 connection is still open");

    // The request in flight finishes; then the HTTP/2 connection is closed too.
    release.notify_one();
    let (status, _) = in_flight.await.unwrap().expect("the request in flight");
    assert_eq!(status, 200);
    assert!(h2.closed().await, "the HTTP/2 connection is still open");
    assert_eq!(
        hits.load(Ordering::SeqCst),
        served,
        "a request after the reload reached the upstream"
    );

    // And a new connection with the revoked certificate fails its handshake.
    assert!(new_connection_refused(addr, &ca, &client).await);
    assert!(wraith
        .wait_log(LOG_WAIT, |v| v["reason"] == "certificate_revoked")
        .is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_outlive_reloads_of_routes_and_certificate_and_close_when_the_ca_changes() {
    let upstream = Upstream::echo().await;
    let setup = Setup::new();
    let client = svc_client(&setup);
    // The client CA bundle in a file of its own, so it can change while the CA the clients
    // verify the server with stays.
    std::fs::copy(&setup.pki.ca_pem, setup.dir.path().join("clients-ca.pem")).unwrap();
    let ca = setup.pki.ca_pem.clone();
    let tls = r#"client_auth = "require", client_ca = "clients-ca.pem""#;
    let version = |v: &str| {
        format!("[[route]]\nname = \"version\"\npath = {{ exact = \"/version\" }}\nrespond = {{ status = 200, body = \"{v}\" }}\n")
    };
    let v1 = config(&setup, tls, upstream.addr, &version("v1"));
    let v2 = config(&setup, tls, upstream.addr, &version("v2"));
    let wraith = setup.start(&v1);
    let addr = wraith.addr("https");
    let mut h1 = OneConnection::open(addr, &ca, &client, Alpn::H1)
        .await
        .unwrap();
    let mut h2 = OneConnection::open(addr, &ca, &client, Alpn::H2)
        .await
        .unwrap();
    for conn in [&mut h1, &mut h2] {
        assert_eq!(conn.get("/version").await.unwrap(), (200, "v1".into()));
    }

    // 1. A route changes: the same connections serve the new one.
    wraith.write_config(&v2);
    wraith.reload().unwrap();
    for conn in [&mut h1, &mut h2] {
        assert_eq!(conn.get("/version").await.unwrap(), (200, "v2".into()));
    }

    // 2. The server certificate is replaced: they go on as well.
    wraith.pki().rotate_server_cert();
    wraith.reload().unwrap();
    for conn in [&mut h1, &mut h2] {
        assert_eq!(conn.get("/app").await.unwrap().0, 200);
    }
    assert!(
        rules_changed(&wraith, "https").is_none(),
        "{}",
        wraith.log()
    );

    // 3. The client CA bundle now holds another CA, under the same file name: the
    //    connections the old CA let in are closed.
    let other = wraith::certs::Ca::new("Another client CA").unwrap();
    std::fs::write(wraith.path("clients-ca.pem"), &other.cert_pem).unwrap();
    wraith.reload().unwrap();
    let line = rules_changed(&wraith, "https")
        .unwrap_or_else(|| panic!("no {RULES_CHANGED:?} line:\n{}", wraith.log()));
    assert_eq!(line["connections"], 2, "{line}");
    for (what, conn) in [("HTTP/1.1", &mut h1), ("HTTP/2", &mut h2)] {
        refused_next_request(conn).await.expect(what);
        assert!(conn.closed().await, "the {what} connection is still open");
    }
    assert!(new_connection_refused(addr, &ca, &client).await);
    assert!(wraith
        .wait_log(LOG_WAIT, |v| v["reason"] == "untrusted_issuer")
        .is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crl_that_revokes_a_certificate_sends_goaway_on_its_http3_connections() {
    let upstream = Upstream::echo().await;
    let setup = Setup::new();
    let client = svc_client(&setup);
    setup.pki.write_crl("ca.crl", &[]);
    let ca = setup.pki.ca_pem.clone();
    let cfg = config_on(
        &setup.listeners_h3(
            r#"client_auth = "require", client_ca = "ca.pem", client_crl = "ca.crl""#,
            "",
            ALLOW_ALL_POLICY,
        ),
        upstream.addr,
        "",
    );
    let wraith = setup.start(&cfg);
    let addr = wraith.addr("https");
    let h3 = H3Client::new(&ca, Some(client.pair()), Groups::Default);
    let mut live = h3.connect(addr).await.unwrap();
    assert_eq!(live.get("/before").await.unwrap().status(), 200);

    wraith.pki().write_crl("ca.crl", &[&client]);
    wraith.reload().unwrap();
    let line = rules_changed(&wraith, "https")
        .unwrap_or_else(|| panic!("no {RULES_CHANGED:?} line:\n{}", wraith.log()));
    assert_eq!(line["connections"], 1, "{line}");

    // The old connection serves nothing more, and is closed.
    match live.get("/after").await {
        Err(_) => {}
        Ok(r) => assert_eq!(r.status(), 421, "served: {:?}", r.body),
    }
    assert!(
        tokio::time::timeout(LOG_WAIT, live.conn.closed())
            .await
            .is_ok(),
        "the HTTP/3 connection is still open"
    );
    // A new one fails its handshake.
    let refused = match h3.connect(addr).await {
        Err(_) => true,
        Ok(mut fresh) => fresh.get("/fresh").await.is_err(),
    };
    assert!(
        refused,
        "a new HTTP/3 connection with the revoked certificate"
    );
    assert!(wraith
        .wait_log(LOG_WAIT, |v| v["reason"] == "certificate_revoked"
            && v["transport"] == "quic")
        .is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_opened_with_a_revoked_certificate_is_closed_after_the_drain_time() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    // A WebSocket echo upstream.
    let ws_upstream = websocket_echo().await;
    let setup = Setup::new();
    let client = svc_client(&setup);
    setup.pki.write_crl("ca.crl", &[]);
    let ca = setup.pki.ca_pem.clone();
    // The drain time is 1 s; the tunnel's own idle limit (the upstream's response timeout,
    // 60 s) is far beyond the wait below.
    let cfg = config(
        &setup,
        r#"client_auth = "require", client_ca = "ca.pem", client_crl = "ca.crl""#,
        ws_upstream,
        "",
    )
    .replace("shutdown_timeout = \"10s\"", "shutdown_timeout = \"1s\"");
    let wraith = setup.start(&cfg);
    let addr = wraith.addr("https");

    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(tls_client_config(
        &ca,
        &[b"http/1.1"],
        Some(client.pair()),
    )))
    .connect("localhost".try_into().unwrap(), tcp)
    .await
    .unwrap();
    let url = format!("wss://localhost:{}/ws", addr.port());
    let (mut ws, resp) = tokio_tungstenite::client_async(url, tls).await.unwrap();
    assert_eq!(resp.status(), 101);
    ws.send(Message::text("before")).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap().into_text().unwrap(),
        "before"
    );

    wraith.pki().write_crl("ca.crl", &[&client]);
    // Taken before the reload: the drain clock starts inside it, so however slowly the
    // reload and the log check below run, the tunnel cannot end sooner than this plus 1 s.
    let revoked = std::time::Instant::now();
    wraith.reload().unwrap();
    assert!(
        rules_changed(&wraith, "https").is_some(),
        "{}",
        wraith.log()
    );
    // Keep the tunnel busy: it is closed for the revocation, not for being idle.
    let ended = tokio::time::timeout(Duration::from_secs(20), async {
        let mut i = 0;
        loop {
            if ws.send(Message::text(format!("after {i}"))).await.is_err() {
                return;
            }
            match tokio::time::timeout(Duration::from_millis(200), ws.next()).await {
                Ok(Some(Ok(_))) | Err(_) => i += 1,
                Ok(None) | Ok(Some(Err(_))) => return,
            }
        }
    })
    .await;
    assert!(
        ended.is_ok(),
        "the tunnel is still open 20 s after the reload"
    );
    assert!(
        revoked.elapsed() >= Duration::from_millis(900),
        "closed before the drain time: {:?}",
        revoked.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_listener_turned_into_https_closes_its_plaintext_connections() {
    let upstream = Upstream::echo().await;
    let setup = Setup::new();
    let ca = setup.pki.ca_pem.clone();
    let plain = config(&setup, "", upstream.addr, "");
    // The same listener (same name, same address) now with TLS and no client certificates.
    let tls = plain.replacen(
        "name = \"http\"\naddress = \"127.0.0.1:0\"\nprotocol = \"http\"\n",
        "name = \"http\"\naddress = \"127.0.0.1:0\"\nprotocol = \"https\"\n\
         tls = { cert = \"server.pem\", key = \"server-key.pem\" }\n",
        1,
    );
    assert_ne!(plain, tls, "the http listener was not rewritten");
    let wraith = setup.start(&plain);
    let addr = wraith.addr("http");

    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) = http1::handshake(TokioIo::new(tcp)).await.unwrap();
    let mut ended = tokio::spawn(async move { drop(conn.await) });
    let req = || {
        Request::get("/before")
            .header("host", "localhost")
            .body(full(""))
            .unwrap()
    };
    let resp = send.send_request(req()).await.unwrap();
    assert_eq!(resp.status(), 200);
    resp.into_body().collect().await.unwrap();

    wraith.write_config(&tls);
    wraith.reload().unwrap();
    assert!(
        tokio::time::timeout(LOG_WAIT, &mut ended).await.is_ok(),
        "the plaintext connection stayed open after its listener switched to TLS"
    );
    assert!(rules_changed(&wraith, "http").is_some(), "{}", wraith.log());
    // The address now speaks TLS only.
    let resp = https_client_h1(&ca, None)
        .get(format!("https://localhost:{}/after", addr.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

/// An HTTP/1.1 connection over TLS `version` only, without a client certificate.
async fn h1_over(
    addr: SocketAddr,
    ca: &Path,
    version: &'static rustls::SupportedProtocolVersion,
) -> Result<OneConnection, String> {
    let tls = tls_client_config_with(ca, &[Alpn::H1.protocol()], None, &[version]);
    OneConnection::open_with(addr, tls, Alpn::H1).await
}

/// The reload's "TLS versions or key-exchange groups withdrawn" lines.
fn withdrawals(wraith: &Wraith) -> Vec<serde_json::Value> {
    wraith
        .log_json()
        .into_iter()
        .filter(|v| {
            v["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("TLS versions or key-exchange groups withdrawn"))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn withdrawing_tls_1_2_closes_only_the_connections_that_negotiated_it_and_allowing_it_again_closes_none(
) {
    use rustls::version::{TLS12, TLS13};
    let upstream = Upstream::echo().await;
    let setup = Setup::new();
    let ca = setup.pki.ca_pem.clone();
    let both = config(&setup, r#"versions = ["1.2", "1.3"]"#, upstream.addr, "");
    let only_13 = config(&setup, r#"versions = ["1.3"]"#, upstream.addr, "");
    let classical_13 = config(
        &setup,
        r#"versions = ["1.3"], key_exchange = ["X25519"]"#,
        upstream.addr,
        "",
    );
    let wraith = setup.start(&both);
    let addr = wraith.addr("https");

    let mut old = h1_over(addr, &ca, &TLS12).await.unwrap();
    assert_eq!(old.get("/before").await.unwrap().0, 200);
    let mut tls13 = h1_over(addr, &ca, &TLS13).await.unwrap();
    assert_eq!(tls13.get("/before").await.unwrap().0, 200);

    // TLS 1.2 withdrawn: the connection that negotiated it is closed, new ones are refused;
    // the TLS 1.3 connection is not touched.
    wraith.write_config(&only_13);
    wraith.reload().unwrap();
    assert!(
        old.closed().await,
        "the TLS 1.2 connection stayed open after TLS 1.2 was withdrawn"
    );
    let lines = withdrawals(&wraith);
    assert_eq!(lines.len(), 1, "{}", wraith.log());
    assert_eq!(lines[0]["listener"], "https", "{}", lines[0]);
    assert_eq!(lines[0]["versions"], r#"["TLSv1.2"]"#, "{}", lines[0]);
    assert_eq!(lines[0]["groups"], "[]", "{}", lines[0]);
    assert!(
        rules_changed(&wraith, "https").is_none(),
        "the client-certificate rules did not change:\n{}",
        wraith.log()
    );
    assert_eq!(tls13.get("/after").await.unwrap().0, 200);
    assert!(
        tls13.open_after(Duration::from_millis(200)).await,
        "the TLS 1.3 connection was closed when TLS 1.2 was withdrawn"
    );
    match h1_over(addr, &ca, &TLS12).await {
        Err(_) => {}
        Ok(mut c) => assert!(c.get("/fresh").await.is_err()),
    }

    // Allowing it again takes nothing away: the TLS 1.3 connection stays and is served.
    wraith.write_config(&both);
    wraith.reload().unwrap();
    assert_eq!(tls13.get("/b").await.unwrap().0, 200);
    assert!(
        tls13.open_after(Duration::from_millis(200)).await,
        "the TLS 1.3 connection was closed by a reload that allowed more"
    );
    assert_eq!(withdrawals(&wraith).len(), 1, "{}", wraith.log());
    let mut again = h1_over(addr, &ca, &TLS12).await.unwrap();
    assert_eq!(again.get("/c").await.unwrap().0, 200);

    // Withdrawn a second time: the new TLS 1.2 connection goes, the TLS 1.3 one still stays.
    wraith.write_config(&only_13);
    wraith.reload().unwrap();
    assert!(
        again.closed().await,
        "the second TLS 1.2 connection stayed open after TLS 1.2 was withdrawn again"
    );
    assert_eq!(withdrawals(&wraith).len(), 2, "{}", wraith.log());
    assert_eq!(tls13.get("/d").await.unwrap().0, 200);

    // The TLS 1.3 connection has been passed over by two withdrawals; one that covers it
    // (its post-quantum group withdrawn) still closes it, without waiting for its timers.
    wraith.write_config(&classical_13);
    wraith.reload().unwrap();
    assert!(
        tls13.closed_within(Duration::from_secs(3)).await,
        "the connection that negotiated X25519MLKEM768 stayed open"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn withdrawing_the_classical_groups_closes_only_the_http3_connections_that_negotiated_one() {
    let upstream = Upstream::echo().await;
    let setup = Setup::new();
    let ca = setup.pki.ca_pem.clone();
    let h3_with = |groups: &str| {
        config_on(
            &setup.listeners_h3(&format!("key_exchange = [{groups}]"), "", ALLOW_ALL_POLICY),
            upstream.addr,
            "",
        )
    };
    let (both, pq_only) = (
        h3_with(r#""X25519MLKEM768", "X25519""#),
        h3_with(r#""X25519MLKEM768""#),
    );
    let wraith = setup.start(&both);
    let addr = wraith.addr("https");
    let mut classical = H3Client::new(&ca, None, Groups::Classical)
        .connect(addr)
        .await
        .unwrap();
    assert_eq!(classical.get("/before").await.unwrap().status(), 200);
    let mut pq = H3Client::new(&ca, None, Groups::Default)
        .connect(addr)
        .await
        .unwrap();
    assert_eq!(pq.get("/before").await.unwrap().status(), 200);

    // Post-quantum key exchange required from now on.
    wraith.write_config(&pq_only);
    wraith.reload().unwrap();
    assert!(
        tokio::time::timeout(LOG_WAIT, classical.conn.closed())
            .await
            .is_ok(),
        "the HTTP/3 connection that negotiated X25519 is still open"
    );
    let lines = withdrawals(&wraith);
    assert_eq!(lines.len(), 1, "{}", wraith.log());
    assert_eq!(lines[0]["groups"], r#"["X25519"]"#, "{}", lines[0]);
    assert_eq!(pq.get("/after").await.unwrap().status(), 200);
    assert!(
        pq.conn.close_reason().is_none(),
        "the post-quantum HTTP/3 connection was closed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_ends_when_its_client_certificate_expires() {
    let upstream = Upstream::echo().await;
    let setup = Setup::new();
    let lasting = svc_client(&setup);
    // Valid for a few seconds from now.
    let mut params = client_params("brief", Some("spiffe://test.local/brief"));
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::minutes(1);
    params.not_after = now + time::Duration::seconds(3);
    let brief = setup.pki.client_with("brief", params);
    let ca = setup.pki.ca_pem.clone();
    let cfg = config(
        &setup,
        r#"client_auth = "require", client_ca = "ca.pem""#,
        upstream.addr,
        "",
    );
    let wraith = setup.start(&cfg);
    let addr = wraith.addr("https");
    let mut expiring = OneConnection::open(addr, &ca, &brief, Alpn::H2)
        .await
        .unwrap();
    assert_eq!(expiring.get("/before").await.unwrap().0, 200);
    // HTTP/1.1 too, idle after one request: nothing but the expiry wakes its connection.
    let mut expiring_h1 = OneConnection::open(addr, &ca, &brief, Alpn::H1)
        .await
        .unwrap();
    assert_eq!(expiring_h1.get("/before").await.unwrap().0, 200);
    let mut other = OneConnection::open(addr, &ca, &lasting, Alpn::H1)
        .await
        .unwrap();
    assert_eq!(other.get("/before").await.unwrap().0, 200);

    // Past its notAfter the connection is asked to finish (GOAWAY) and closes; it serves
    // nothing more meanwhile.
    assert!(
        expiring.closed().await,
        "the connection outlived its client certificate"
    );
    assert!(
        expiring_h1.closed().await,
        "the idle HTTP/1.1 connection outlived its client certificate"
    );
    // A new handshake with it fails; the other client's connection stays.
    assert!(new_connection_refused(addr, &ca, &brief).await);
    assert_eq!(other.get("/after").await.unwrap().0, 200);
    assert!(other.open_after(Duration::from_millis(200)).await);
}

/// A client certificate valid for `secs` more seconds.
fn brief_client(setup: &Setup, name: &str, secs: i64) -> ClientCert {
    let mut params = client_params(name, Some(&format!("spiffe://test.local/{name}")));
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::minutes(1);
    params.not_after = now + time::Duration::seconds(secs);
    setup.pki.client_with(name, params)
}

/// One HTTP/1.1 GET on a new TLS connection made with `tls` (whose session store the calls
/// share): how the handshake went, and what came back (empty when the server closed).
async fn get_resuming(
    addr: SocketAddr,
    tls: &Arc<rustls::ClientConfig>,
) -> (Option<rustls::HandshakeKind>, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let Ok(mut stream) = tokio_rustls::TlsConnector::from(tls.clone())
        .connect("localhost".try_into().unwrap(), tcp)
        .await
    else {
        return (None, String::new());
    };
    let kind = stream.get_ref().1.handshake_kind();
    let _ = stream
        .write_all(b"GET /resumed HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out)).await;
    (kind, String::from_utf8_lossy(&out).into_owned())
}

/// A resumed TLS session (a TLS 1.3 ticket, a TLS 1.2 session ID) skips certificate
/// verification in rustls: a client that kept resuming went on being served, with its
/// identity, after its certificate expired (found with testssl.sh and faketime: still at
/// +1200 days). The chain of a resumed session is now checked again: before the expiry the
/// resumption is served, after it the connection is refused as a new handshake would be.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_resumed_after_its_client_certificate_expired_is_refused() {
    let upstream = Upstream::echo().await;
    let setup = Setup::new();
    let brief = brief_client(&setup, "brief", 3);
    let ca = setup.pki.ca_pem.clone();
    let cfg = config(
        &setup,
        r#"client_auth = "require", client_ca = "ca.pem", versions = ["1.2", "1.3"]"#,
        upstream.addr,
        "",
    );
    let wraith = setup.start(&cfg);
    let addr = wraith.addr("https");
    let expires = std::time::Instant::now() + Duration::from_secs(3);
    let mut clients = Vec::new();
    for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
        let tls = Arc::new(tls_client_config_with(
            &ca,
            &[b"http/1.1"],
            Some(brief.pair()),
            &[version],
        ));
        let (kind, resp) = get_resuming(addr, &tls).await;
        assert_eq!(kind, Some(rustls::HandshakeKind::Full), "{version:?}");
        assert!(resp.starts_with("HTTP/1.1 200 "), "{version:?}: {resp}");
        // Resumption works here: the check lets a valid certificate through.
        let (kind, resp) = get_resuming(addr, &tls).await;
        assert_eq!(kind, Some(rustls::HandshakeKind::Resumed), "{version:?}");
        assert!(resp.starts_with("HTTP/1.1 200 "), "{version:?}: {resp}");
        clients.push((version, tls));
    }
    tokio::time::sleep_until((expires + Duration::from_millis(1500)).into()).await;
    for (version, tls) in &clients {
        let (kind, resp) = get_resuming(addr, tls).await;
        assert!(
            !resp.contains(" 200 "),
            "{version:?}: a session resumed past the certificate's expiry was served ({kind:?}): {resp}"
        );
    }
    // Accounted for as the refusal of an expired certificate (one per TLS version).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let refusals = loop {
        let n = wraith
            .log_json()
            .into_iter()
            .filter(|v| v["reason"] == "certificate_expired")
            .count();
        if n >= 2 || std::time::Instant::now() > deadline {
            break n;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(refusals >= 2, "{}", wraith.log());
}

/// The same over QUIC, with and without 0-RTT (the two ways a handshake completes there).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quic_session_resumed_after_its_client_certificate_expired_is_refused() {
    for quic in ["", "zero_rtt = true"] {
        let upstream = Upstream::echo().await;
        let setup = Setup::new();
        let brief = brief_client(&setup, "brief", 3);
        let expires = std::time::Instant::now() + Duration::from_secs(3);
        let ca = setup.pki.ca_pem.clone();
        let cfg = config_on(
            &setup.listeners_h3(
                r#"client_auth = "require", client_ca = "ca.pem""#,
                quic,
                ALLOW_ALL_POLICY,
            ),
            upstream.addr,
            "",
        );
        let wraith = setup.start(&cfg);
        let addr = wraith.addr("https");
        let client = H3Client::new(&ca, Some(brief.pair()), Groups::Default);
        for _ in 0..2 {
            let mut conn = client.connect(addr).await.unwrap();
            assert_eq!(conn.get("/before").await.unwrap().status(), 200, "{quic}");
            conn.conn.close(quinn::VarInt::from_u32(0), b"done");
        }
        tokio::time::sleep_until((expires + Duration::from_millis(1500)).into()).await;
        let served = match client.connect(addr).await {
            Err(_) => None,
            Ok(mut conn) => conn.get("/after").await.ok().map(|r| r.status()),
        };
        assert_eq!(served, None, "{quic}: served past the certificate's expiry");
        assert!(
            wraith
                .wait_log(Duration::from_secs(10), |v| v["reason"]
                    == "certificate_expired"
                    && v["transport"] == "quic")
                .is_some(),
            "{quic}: {}",
            wraith.log()
        );
    }
}

/// A client resumes for 24 hours after it authenticated with a full handshake, not longer:
/// rustls issues new tickets on every TLS 1.3 resumption, and stamped anew each would let a
/// client that resumes once a day go on without ever proving its key again (BoringSSL's
/// `auth_timeout` bounds the same thing). The gateway's wall clock is moved by libfaketime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumption_ends_24_hours_after_the_full_handshake_however_often_it_resumes() {
    let upstream = Upstream::echo().await;
    let setup = Setup::new();
    let client_cert = brief_client(&setup, "daily", 30 * 24 * 3600);
    let ca = setup.pki.ca_pem.clone();
    let clock = setup.dir.path().join("clock");
    std::fs::write(&clock, "+0\n").unwrap();
    let cfg = config(
        &setup,
        r#"client_auth = "require", client_ca = "ca.pem""#,
        upstream.addr,
        "",
    );
    let wraith = setup.start_with_env(&cfg, &faketime_env(&clock));
    let addr = wraith.addr("https");
    let tls = Arc::new(tls_client_config(
        &ca,
        &[b"http/1.1"],
        Some(client_cert.pair()),
    ));
    let mut handshakes = Vec::new();
    for offset in ["+0", "+0", "+43200", "+82800", "+90000", "+90000"] {
        std::fs::write(&clock, format!("{offset}\n")).unwrap();
        let (kind, resp) = get_resuming(addr, &tls).await;
        assert!(resp.starts_with("HTTP/1.1 200 "), "at {offset}: {resp}");
        handshakes.push((offset, kind.unwrap()));
    }
    use rustls::HandshakeKind::{Full, Resumed};
    assert_eq!(
        handshakes,
        [
            ("+0", Full),
            ("+0", Resumed),
            ("+43200", Resumed),
            // A ticket issued 23 hours on, by a resumption of the first handshake's session.
            ("+82800", Resumed),
            // Its tickets were issued at +23 h, but the client authenticated at +0.
            ("+90000", Full),
            ("+90000", Resumed),
        ]
    );
}

/// Operators reload many times a day; a reload that admits the same clients the same way
/// (routes, the server certificate) must not cost every client a full handshake, on TLS 1.3
/// and 1.2: the listener's sessions are kept. One that changes the client-certificate rules
/// (here `client_max_chain_depth`) or withdraws a TLS version empties them, so nobody resumes
/// past the new rules.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_outlive_a_reload_that_keeps_the_rules_and_end_with_one_that_changes_them() {
    use rustls::HandshakeKind::{Full, Resumed};
    let upstream = Upstream::echo().await;
    let setup = Setup::new();
    let client = svc_client(&setup);
    let ca = setup.pki.ca_pem.clone();
    let tls = |depth: u32, versions: &str| {
        format!(
            r#"client_auth = "require", client_ca = "ca.pem", client_max_chain_depth = {depth}, versions = [{versions}]"#
        )
    };
    let route = |v: &str| {
        format!("[[route]]\nname = \"version\"\npath = {{ exact = \"/version\" }}\nrespond = {{ status = 200, body = \"{v}\" }}\n")
    };
    let both = r#""1.2", "1.3""#;
    let configs = [
        config(&setup, &tls(4, both), upstream.addr, &route("v1")),
        config(&setup, &tls(4, both), upstream.addr, &route("v2")),
        config(&setup, &tls(3, both), upstream.addr, &route("v2")),
        config(&setup, &tls(3, r#""1.3""#), upstream.addr, &route("v2")),
    ];
    let wraith = setup.start(&configs[0]);
    let addr = wraith.addr("https");
    let clients: Vec<_> = [&rustls::version::TLS13, &rustls::version::TLS12]
        .into_iter()
        .map(|v| {
            let tls = tls_client_config_with(&ca, &[b"http/1.1"], Some(client.pair()), &[v]);
            (v, Arc::new(tls))
        })
        .collect();
    for (version, tls) in &clients {
        assert_eq!(get_resuming(addr, tls).await.0, Some(Full), "{version:?}");
        assert_eq!(
            get_resuming(addr, tls).await.0,
            Some(Resumed),
            "{version:?}"
        );
    }

    // 1. A route changes, and the server certificate is replaced: clients resume.
    wraith.write_config(&configs[1]);
    wraith.pki().rotate_server_cert();
    wraith.reload().unwrap();
    for (version, tls) in &clients {
        let (kind, resp) = get_resuming(addr, tls).await;
        assert_eq!(kind, Some(Resumed), "{version:?}: {}", wraith.log());
        assert!(resp.starts_with("HTTP/1.1 200 "), "{version:?}: {resp}");
    }

    // 2. The client-certificate rules change: a full handshake, under the new ones.
    wraith.write_config(&configs[2]);
    wraith.reload().unwrap();
    for (version, tls) in &clients {
        let (kind, resp) = get_resuming(addr, tls).await;
        assert_eq!(kind, Some(Full), "{version:?}");
        assert!(resp.starts_with("HTTP/1.1 200 "), "{version:?}: {resp}");
    }

    // 3. TLS 1.2 is withdrawn: a TLS 1.3 session made before does not resume either.
    let (_, tls13) = &clients[0];
    assert_eq!(get_resuming(addr, tls13).await.0, Some(Resumed));
    wraith.write_config(&configs[3]);
    wraith.reload().unwrap();
    assert_eq!(get_resuming(addr, tls13).await.0, Some(Full));
}

/// The same over QUIC: a client that resumes sends 0-RTT data after a reload of the routes
/// (its session kept), not after one that changes the client-certificate rules.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_sessions_outlive_a_reload_that_keeps_the_rules() {
    let upstream = Upstream::echo().await;
    let setup = Setup::new();
    let client = svc_client(&setup);
    let ca = setup.pki.ca_pem.clone();
    let cfg = |depth: u32, v: &str| {
        config_on(
            &setup.listeners_h3(
                &format!(
                    r#"client_auth = "require", client_ca = "ca.pem", client_max_chain_depth = {depth}"#
                ),
                "zero_rtt = true",
                ALLOW_ALL_POLICY,
            ),
            upstream.addr,
            &format!("[[route]]\nname = \"version\"\npath = {{ exact = \"/version\" }}\nrespond = {{ status = 200, body = \"{v}\" }}\nearly_data = true\n"),
        )
    };
    let configs = [cfg(4, "v1"), cfg(4, "v2"), cfg(3, "v2")];
    let wraith = setup.start(&configs[0]);
    let addr = wraith.addr("https");
    let h3 = H3Client::new(&ca, Some(client.pair()), Groups::Default);
    // Whether a connection offering the session resumed it (its early request served; one
    // the server turned away is rejected with the early data).
    // Each connection is closed once its own ticket has come, for the next one to offer.
    let resumes = || async {
        let seen = h3.tickets();
        let (mut conn, accepted) = h3.connect_0rtt(addr).await.expect("no session to offer");
        let served = conn.get("/version").await.map(|r| r.status());
        let accepted = accepted.await;
        if accepted {
            assert_eq!(served, Ok(200));
        }
        h3.ticket_after(seen).await;
        conn.conn.close(quinn::VarInt::from_u32(0), b"done");
        accepted
    };
    let mut conn = h3.connect(addr).await.unwrap();
    assert_eq!(conn.get("/version").await.unwrap().status(), 200);
    h3.ticket_after(0).await;
    conn.conn.close(quinn::VarInt::from_u32(0), b"done");
    assert!(resumes().await, "no resumption before any reload");

    wraith.write_config(&configs[1]);
    wraith.reload().unwrap();
    assert!(
        resumes().await,
        "the session did not outlive a reload of the routes"
    );

    wraith.write_config(&configs[2]);
    wraith.reload().unwrap();
    assert!(
        !resumes().await,
        "a session outlived a change of the client-certificate rules"
    );
}
