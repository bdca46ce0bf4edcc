//! HTTP/3 end to end: a quinn + h3 client over rustls talks to the real gateway's QUIC
//! listener, which forwards to real upstreams. Key-exchange groups per connection, streamed
//! bodies, 0-RTT, Alt-Svc, reload and drain.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::quic::{
    read_status, request_section, stream_end, Groups, H3Client, H3Conn, HoldingRelay, RawH3,
    StreamEnd,
};
use common::*;
use http_body_util::BodyExt;
use hyper::{Request, Response};

/// An upstream that answers POSTs with the length and SHA-256 of the body it streamed in,
/// and everything else with the JSON echo.
async fn hashing_upstream() -> Upstream {
    Upstream::start(|req: Request<hyper::body::Incoming>| async move {
        if req.method() != http::Method::POST {
            return echo_response(req).await;
        }
        let early = req.headers().get("early-data").is_some();
        let mut body = req.into_body();
        let mut hash = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
        let mut len = 0u64;
        while let Some(frame) = body.frame().await {
            match frame.map(|f| f.into_data()) {
                Ok(Ok(data)) => {
                    len += data.len() as u64;
                    hash.update(&data);
                }
                Ok(Err(_)) => {}
                // The gateway gave up on the body: say so (nobody should be listening).
                Err(_) => {
                    let mut resp = Response::new(full("incomplete body"));
                    *resp.status_mut() = http::StatusCode::BAD_REQUEST;
                    return resp;
                }
            }
        }
        let json = serde_json::json!({
            "len": len,
            "sha256": hex(hash.finish().as_ref()),
            "early_data": early,
        });
        Response::new(full(serde_json::to_vec(&json).unwrap()))
    })
    .await
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn config(base: &str, upstream: std::net::SocketAddr, routes: &str) -> String {
    format!(
        r#"{base}
[log.json]
path = "access.json"

[[upstream]]
name = "app"
endpoints = ["{upstream}"]

{routes}
"#
    )
}

const APP_ROUTE: &str = "[[route]]\nname = \"app\"\nupstream = \"app\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_and_a_streamed_50_mib_post_with_the_group_of_each_connection() {
    let upstream = hashing_upstream().await;
    let setup = Setup::new();
    let ca = setup.pki.ca_pem.clone();
    let cfg = h3_config(&setup, upstream.addr);
    let wraith = setup.start(&cfg);
    let addr = wraith.addr("https");

    // A default rustls client offers X25519MLKEM768 first: that is what is negotiated.
    let client = H3Client::new(&ca, None, Groups::Default);
    let mut conn = client.connect(addr).await.unwrap();
    let resp = conn.get("/hello?x=1").await.unwrap();
    assert_eq!(resp.status(), 200);
    let echo = resp.json();
    assert_eq!(echo["uri"], "/hello?x=1");
    assert_eq!(echo["headers"]["via"][0], "3 wraith");
    let rid = resp.header("x-request-id").unwrap().to_string();
    let record = wraith.access_record("access.json", &rid);
    assert_eq!(record["protocol"], "h3");
    assert_eq!(record["tls_version"], "TLSv1.3");
    assert_eq!(record["tls_group"], "X25519MLKEM768");

    // 50 MiB streamed up in 64 KiB chunks, generated as they are sent.
    const TOTAL: usize = 50 << 20;
    const CHUNK: usize = 64 << 10;
    let mut expected = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    let mut sent = 0usize;
    let mut seed = 7u8;
    let rss_before = wraith.rss_kib();
    let req = Request::post("https://localhost/upload")
        .header("content-length", TOTAL.to_string())
        .body(())
        .unwrap();
    let resp = conn
        .request_streamed(req, || {
            if sent == TOTAL {
                return None;
            }
            let chunk: Vec<u8> = (0..CHUNK)
                .map(|i| seed.wrapping_add((i % 251) as u8))
                .collect();
            seed = seed.wrapping_add(1);
            sent += CHUNK;
            expected.update(&chunk);
            Some(Bytes::from(chunk))
        })
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        200,
        "{:?}",
        String::from_utf8_lossy(&resp.body)
    );
    let got = resp.json();
    assert_eq!(got["len"], TOTAL as u64);
    assert_eq!(got["sha256"], hex(expected.finish().as_ref()).as_str());
    assert_eq!(got["early_data"], false);
    // Streamed, not buffered: the gateway did not grow by anything like the body's size.
    let grown_mib = wraith.rss_kib().saturating_sub(rss_before) / 1024;
    assert!(grown_mib < 30, "gateway RSS grew by {grown_mib} MiB");
    let rid = resp.header("x-request-id").unwrap().to_string();
    let record = wraith.access_record("access.json", &rid);
    assert_eq!(record["bytes_in"], TOTAL as u64);
    assert_eq!(record["protocol"], "h3");

    // A classical-only client gets X25519, recorded for its own connection.
    let classical = H3Client::new(&ca, None, Groups::Classical);
    let mut conn2 = classical.connect(addr).await.unwrap();
    let resp = conn2.get("/classical").await.unwrap();
    assert_eq!(resp.status(), 200);
    let rid = resp.header("x-request-id").unwrap().to_string();
    assert_eq!(
        wraith.access_record("access.json", &rid)["tls_group"],
        "X25519"
    );

    // The first connection is still post-quantum.
    let resp = conn.get("/again").await.unwrap();
    let rid = resp.header("x-request-id").unwrap().to_string();
    assert_eq!(
        wraith.access_record("access.json", &rid)["tls_group"],
        "X25519MLKEM768"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_download_and_a_policy_that_requires_post_quantum() {
    // 20 MiB down, streamed by the upstream in 256 KiB pieces.
    let upstream = Upstream::start(|_req: Request<hyper::body::Incoming>| async move {
        let chunks = (0..80u8).map(|i| {
            Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(Bytes::from(vec![
                i;
                256 << 10
            ])))
        });
        let body = http_body_util::StreamBody::new(futures_util::stream::iter(chunks));
        Response::new(body.map_err(|e| match e {}).boxed())
    })
    .await;
    let setup = Setup::new();
    setup.write_policies(
        "pq",
        &[(
            "pq.cedar",
            r#"
@id("everyone")
permit (principal, action, resource);

@id("post-quantum-only")
forbid (principal, action, resource) when { context.tls.group != "X25519MLKEM768" };
"#,
        )],
    );
    let ca = setup.pki.ca_pem.clone();
    let cfg = config(
        &setup.listeners_h3("", "", "[policy]\ndir = \"pq\"\n"),
        upstream.addr,
        APP_ROUTE,
    );
    let wraith = setup.start(&cfg);
    let addr = wraith.addr("https");

    let mut pq = H3Client::new(&ca, None, Groups::Default)
        .connect(addr)
        .await
        .unwrap();
    let resp = pq.get("/big").await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.body.len(), 80 * (256 << 10));
    assert!(resp
        .body
        .chunks(256 << 10)
        .enumerate()
        .all(|(i, c)| c.iter().all(|b| *b == i as u8)));

    let mut classical = H3Client::new(&ca, None, Groups::Classical)
        .connect(addr)
        .await
        .unwrap();
    let resp = classical.get("/big").await.unwrap();
    assert_eq!(
        resp.status(),
        403,
        "a classical key exchange is refused by the policy"
    );
    let rid = resp.header("x-request-id").unwrap().to_string();
    let record = wraith.access_record("access.json", &rid);
    assert_eq!(record["tls_group"], "X25519");
    assert_eq!(record["decision"], "deny");
    assert_eq!(record["policies"][0], "post-quantum-only");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_listeners_advertise_http3_and_http3_responses_are_proper() {
    let upstream = Upstream::echo().await;
    let setup = Setup::new();
    let ca = setup.pki.ca_pem.clone();
    let cfg = config(
        &setup.listeners_h3(
            "",
            "alt_svc_max_age = \"1h\", congestion = \"bbr\"",
            ALLOW_ALL_POLICY,
        ),
        upstream.addr,
        &format!(
            "[[route]]\nname = \"static\"\npath = {{ exact = \"/static\" }}\n\
             respond = {{ status = 200, body = \"a body HEAD must not carry\" }}\n\n{APP_ROUTE}"
        ),
    );
    let wraith = setup.start(&cfg);
    let port = wraith.addr("https").port();

    for client in [https_client_h1(&ca, None), https_client_h2(&ca, None)] {
        let resp = client.get(wraith.url("https", "/")).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(
            resp.headers()["alt-svc"],
            format!("h3=\":{port}\"; ma=3600").as_str()
        );
    }
    // Plain HTTP listeners do not advertise it.
    let resp = http_client()
        .get(wraith.url("http", "/"))
        .send()
        .await
        .unwrap();
    assert!(resp.headers().get("alt-svc").is_none());

    // BBR as configured still serves; an unknown route is the pipeline's JSON 404.
    let mut conn = H3Client::new(&ca, None, Groups::Default)
        .connect(wraith.addr("https"))
        .await
        .unwrap();
    assert_eq!(conn.get("/x").await.unwrap().status(), 200);
    // HEAD gets the head only, whatever answered (RFC 9110 §9.3.2): the upstream, or the
    // pipeline itself (a `respond` route).
    assert_eq!(conn.get("/static").await.unwrap().body.len(), 26);
    for path in ["/x", "/static"] {
        let req = Request::head(format!("https://localhost{path}"))
            .body(())
            .unwrap();
        let resp = conn.request(req, None).await.unwrap();
        assert!(resp.body.is_empty(), "HEAD {path}: {:?}", resp.body);
    }
    let status = wraith.status().await;
    let https = status["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == "https")
        .unwrap()
        .clone();
    assert_eq!(https["http3"], true);
    assert_eq!(https["quic_connections"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_rtt_early_get_is_served_and_marked_early_other_early_requests_get_425() {
    let upstream = hashing_upstream().await;
    let setup = Setup::new();
    let ca = setup.pki.ca_pem.clone();
    let cfg = config(
        &setup.listeners_h3("", "zero_rtt = true", ALLOW_ALL_POLICY),
        upstream.addr,
        r#"
[[route]]
name = "cacheable"
path = { prefix = "/static/" }
upstream = "app"
early_data = true

[[route]]
name = "app"
upstream = "app"
"#,
    );
    let wraith = setup.start(&cfg);
    // The server's handshake flight is held 2 s: the early requests must reach the server
    // before the handshake completes even if the client stalls (well inside the 10 s
    // handshake timeout).
    let relay = HoldingRelay::start(wraith.addr("https"), Duration::from_secs(2)).await;
    let client = H3Client::new(&ca, None, Groups::Default);

    // First visit: a full handshake, which leaves the client a session ticket.
    let mut first = client.connect(relay.addr).await.unwrap();
    assert_eq!(first.get("/static/a").await.unwrap().status(), 200);
    first.conn.close(quinn::VarInt::from_u32(0), b"done");

    // Second visit: the requests go out as 0-RTT, together, before the handshake completes.
    let (conn, accepted) = client.connect_0rtt_soon(relay.addr).await;
    let (mut a, mut b, mut c) = (conn.clone(), conn.clone(), conn.clone());
    let post = Request::post("https://localhost/static/a")
        .body(())
        .unwrap();
    let (get, post, other) = tokio::join!(
        a.get("/static/page"),
        b.request(post, Some(Bytes::from_static(b"form=1"))),
        c.get("/elsewhere"),
    );
    assert!(accepted.await, "the server accepted the early data");

    let get = get.unwrap();
    assert_eq!(get.status(), 200);
    let echo = get.json();
    assert_eq!(
        echo["headers"]["early-data"][0], "1",
        "marked early toward the upstream"
    );
    let rid = get.header("x-request-id").unwrap().to_string();
    let record = wraith.access_record("access.json", &rid);
    assert_eq!(record["early_data"], true);
    assert_eq!(record["protocol"], "h3");

    let post = post.unwrap();
    assert_eq!(post.status(), 425, "an early POST is Too Early");
    assert_eq!(post.json()["error"], "too_early");
    let other = other.unwrap();
    assert_eq!(
        other.status(),
        425,
        "a route without early_data refuses early requests"
    );

    // After the handshake, the same POST on the same connection is an ordinary request.
    let mut d = conn.clone();
    let post = Request::post("https://localhost/static/a")
        .body(())
        .unwrap();
    let resp = d
        .request(post, Some(Bytes::from_static(b"form=1")))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.json()["early_data"], false);
    let rid = resp.header("x-request-id").unwrap().to_string();
    assert!(wraith
        .access_record("access.json", &rid)
        .get("early_data")
        .is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_rtt_on_an_mtls_listener_waits_for_the_verified_identity() {
    let upstream = Upstream::echo().await;
    let setup = Setup::new();
    let client_cert = setup
        .pki
        .client_with("svc", client_params("svc", Some("spiffe://test.local/svc")));
    let ca = setup.pki.ca_pem.clone();
    let cfg = config(
        &setup.listeners_h3(
            r#"client_auth = "require", client_ca = "ca.pem""#,
            "zero_rtt = true",
            ALLOW_ALL_POLICY,
        ),
        upstream.addr,
        "[[route]]\nname = \"app\"\nupstream = \"app\"\nearly_data = true\n",
    );
    let wraith = setup.start(&cfg);
    // The server's handshake flight is held 2 s: the early requests must reach the server
    // before the handshake completes even if the client stalls (well inside the 10 s
    // handshake timeout).
    let relay = HoldingRelay::start(wraith.addr("https"), Duration::from_secs(2)).await;
    let client = H3Client::new(&ca, Some(client_cert.pair()), Groups::Default);
    let mut first = client.connect(relay.addr).await.unwrap();
    assert_eq!(first.get("/warm").await.unwrap().status(), 200);
    first.conn.close(quinn::VarInt::from_u32(0), b"done");

    let (mut conn, accepted) = client.connect_0rtt_soon(relay.addr).await;
    let resp = conn.get("/whoami").await.unwrap();
    assert!(accepted.await);
    assert_eq!(resp.status(), 200);
    let echo = resp.json();
    let xfcc = echo["headers"]["x-forwarded-client-cert"][0]
        .as_str()
        .unwrap();
    assert!(xfcc.contains("URI=spiffe://test.local/svc"), "{xfcc}");
    assert!(
        echo["headers"].get("early-data").is_none(),
        "it waited for the handshake: no longer early"
    );
    let rid = resp.header("x-request-id").unwrap().to_string();
    let record = wraith.access_record("access.json", &rid);
    assert_eq!(record["identity"], "spiffe://test.local/svc");
    assert!(record.get("early_data").is_none());
}

/// Early data only from a validated address: a client resuming from an address its token
/// was not issued to (as one that forged a victim's address would) has its early requests
/// wait for the handshake, which an off-path sender could never finish. They are then
/// served as ordinary requests: nothing marked early, no 425.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_rtt_waits_for_the_handshake_from_an_address_not_validated() {
    let upstream = hashing_upstream().await;
    let setup = Setup::new();
    let ca = setup.pki.ca_pem.clone();
    let cfg = config(
        &setup.listeners_h3("", "zero_rtt = true", ALLOW_ALL_POLICY),
        upstream.addr,
        "[[route]]\nname = \"cacheable\"\nupstream = \"app\"\nearly_data = true\n",
    );
    let wraith = setup.start(&cfg);
    let client = H3Client::new(&ca, None, Groups::Default);
    let mut first = client.connect(wraith.addr("https")).await.unwrap();
    assert_eq!(first.get("/a").await.unwrap().status(), 200);
    first.conn.close(quinn::VarInt::from_u32(0), b"done");

    // From 127.0.0.2 (its token names 127.0.0.1), the server's flight held 2 s.
    let relay = HoldingRelay::start_from(
        wraith.addr("https"),
        Duration::from_secs(2),
        "127.0.0.2".parse().unwrap(),
    )
    .await;
    let (conn, _accepted) = client.connect_0rtt_soon(relay.addr).await;
    let (mut a, mut b) = (conn.clone(), conn.clone());
    let post = Request::post("https://localhost/form").body(()).unwrap();
    let (get, post) = tokio::join!(
        a.get("/page"),
        b.request(post, Some(Bytes::from_static(b"form=1")))
    );
    let get = get.unwrap();
    assert_eq!(get.status(), 200);
    assert!(
        get.json()["headers"].get("early-data").is_none(),
        "{}",
        get.json()
    );
    let rid = get.header("x-request-id").unwrap().to_string();
    let record = wraith.access_record("access.json", &rid);
    assert!(record.get("early_data").is_none(), "{record}");
    assert_eq!(record["client_ip"], "127.0.0.2", "{record}");
    assert_eq!(post.unwrap().status(), 200, "not Too Early: not early");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_gives_new_connections_the_new_certificate_and_keeps_live_ones() {
    let upstream = Upstream::echo().await;
    let setup = Setup::new();
    let ca = setup.pki.ca_pem.clone();
    let cfg = h3_config(&setup, upstream.addr);
    let wraith = setup.start(&cfg);
    let addr = wraith.addr("https");
    let client = H3Client::new(&ca, None, Groups::Default);
    let mut live = client.connect(addr).await.unwrap();
    let old_leaf = leaf_of(&live.conn);

    let new_pem = wraith.pki().rotate_server_cert();
    wraith.reload().unwrap();

    // The live connection goes on.
    assert_eq!(live.get("/still").await.unwrap().status(), 200);
    assert_eq!(leaf_of(&live.conn), old_leaf);
    // A new one gets the new certificate: one from a client without a session (a client that
    // resumes its session, which the reload keeps, is not sent a certificate at all).
    let fresh_client = H3Client::new(&ca, None, Groups::Default);
    let mut fresh = fresh_client.connect(addr).await.unwrap();
    assert_eq!(fresh.get("/new").await.unwrap().status(), 200);
    use rustls_pki_types::pem::PemObject;
    let new_der = rustls_pki_types::CertificateDer::from_pem_slice(new_pem.as_bytes()).unwrap();
    assert_eq!(leaf_of(&fresh.conn), new_der.to_vec());
    assert_ne!(old_leaf, new_der.to_vec());
}

fn leaf_of(conn: &quinn::Connection) -> Vec<u8> {
    let chain = conn
        .peer_identity()
        .unwrap()
        .downcast::<Vec<rustls_pki_types::CertificateDer<'static>>>()
        .unwrap();
    chain[0].to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_sends_goaway_and_drains_requests_in_flight() {
    let upstream = Upstream::start(|req: Request<hyper::body::Incoming>| async move {
        if req.uri().path() == "/slow" {
            tokio::time::sleep(Duration::from_millis(1500)).await;
        }
        echo_response(req).await
    })
    .await;
    let setup = Setup::new();
    let ca = setup.pki.ca_pem.clone();
    let cfg = h3_config(&setup, upstream.addr);
    let mut wraith = setup.start(&cfg);
    let client = H3Client::new(&ca, None, Groups::Default);
    let conn = client.connect(wraith.addr("https")).await.unwrap();
    let mut slow = conn.clone();
    let in_flight = tokio::spawn(async move { slow.get("/slow").await });
    // The request is at the upstream when the signal comes.
    wraith
        .wait_log(Duration::from_secs(10), |v| {
            v["message"] == "policy decision"
        })
        .expect("request reached the pipeline");
    wraith.signal(libc::SIGTERM);

    let resp = in_flight.await.unwrap().unwrap();
    assert_eq!(resp.status(), 200, "the request in flight finished");
    let code = tokio::task::spawn_blocking(move || {
        let code = wraith.wait_exit(Duration::from_secs(15));
        (code, wraith)
    })
    .await
    .unwrap();
    assert_eq!(code.0, Some(0), "{}", code.1.log());
    assert!(
        code.1.log().contains("all connections finished"),
        "{}",
        code.1.log()
    );
    // Nothing answers on the port any more.
    let again = tokio::time::timeout(Duration::from_secs(3), client.connect(code.1.addr("https")));
    assert!(!matches!(again.await, Ok(Ok(_))));
}

/// `holding_upstream`: the server, what releases a held request, what says one is held.
type HoldingUpstream = (
    Upstream,
    std::sync::Arc<tokio::sync::Notify>,
    tokio::sync::mpsc::UnboundedReceiver<()>,
);

/// An upstream that holds each request to `/held` until `release` is notified (once per
/// request), and says on the receiver when it has one; anything else gets the JSON echo.
async fn holding_upstream() -> HoldingUpstream {
    let release = std::sync::Arc::new(tokio::sync::Notify::new());
    let (held_tx, held) = tokio::sync::mpsc::unbounded_channel();
    let r = release.clone();
    let upstream = Upstream::start(move |req: Request<hyper::body::Incoming>| {
        let (release, held_tx) = (r.clone(), held_tx.clone());
        async move {
            if req.uri().path() == "/held" {
                let _ = held_tx.send(());
                release.notified().await;
            }
            echo_response(req).await
        }
    })
    .await;
    (upstream, release, held)
}

/// The QUIC connections `wraith status` counts for listener `name`.
async fn quic_connections(wraith: &Wraith, name: &str) -> serde_json::Value {
    let status = wraith.status().await;
    status["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == name)
        .unwrap_or_else(|| panic!("no listener {name} in {status}"))["quic_connections"]
        .clone()
}

/// Starts Wraith on `first` with an HTTP/3 request held by the upstream, reloads to `away`
/// (HTTP/3 gone from that address: its connection drains, the request still running on the
/// endpoint's UDP socket) and back to `first` meanwhile (the port is held by Wraith itself,
/// which must not fail the reload); then new connections are served, the held request
/// completes and its connection closes as drains do.
async fn http3_comes_back_while_a_request_drains(
    setup: Setup,
    upstream: HoldingUpstream,
    first: &str,
    away: &str,
    expect_port: Option<u16>,
) {
    let (_upstream, release, mut held) = upstream;
    let ca = setup.pki.ca_pem.clone();
    let wraith = setup.start(first);
    let addr = wraith.addr("https");
    if let Some(port) = expect_port {
        assert_eq!(addr.port(), port);
    }
    let client = H3Client::new(&ca, None, Groups::Default);
    let old = client.connect(addr).await.unwrap();
    let mut request = old.clone();
    let in_flight = tokio::spawn(async move { request.get("/held").await });
    tokio::time::timeout(Duration::from_secs(10), held.recv())
        .await
        .expect("the request reached the upstream");

    wraith.write_config(away);
    wraith.reload().unwrap();
    wraith.write_config(first);
    wraith
        .reload()
        .expect("HTTP/3 back on an address whose QUIC connections drain");
    let mut fresh = client.connect(addr).await.unwrap();
    assert_eq!(fresh.get("/new").await.unwrap().status(), 200);
    // The draining connection is not the new listener's.
    assert_eq!(quic_connections(&wraith, "https").await, 1);

    // The old request completes; its connection, told to finish by the first reload, then
    // closes as drains do, and the new one goes on.
    release.notify_one();
    assert_eq!(in_flight.await.unwrap().unwrap().status(), 200);
    closed_by_gateway_quietly(&old.conn, Duration::from_secs(10)).await;
    assert_eq!(fresh.get("/after").await.unwrap().status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http3_turned_back_on_while_a_request_drains_serves_again_and_the_request_finishes() {
    let upstream = holding_upstream().await;
    let setup = Setup::new();
    let on = h3_config(&setup, upstream.0.addr);
    let off = on.replace("http3 = true", "http3 = false");
    http3_comes_back_while_a_request_drains(setup, upstream, &on, &off, None).await;
}

/// The listener moves to another port (the one here is removed and drains), and back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http3_listener_re_added_while_its_connections_drain_serves_again() {
    let upstream = holding_upstream().await;
    let setup = Setup::new();
    let (here, elsewhere) = (unused_port(), unused_port());
    let port_0 = "address = \"127.0.0.1:0\"\nprotocol = \"https\"";
    let at = |port: u16| {
        let cfg = h3_config(&setup, upstream.0.addr);
        assert!(cfg.contains(port_0));
        cfg.replacen(
            port_0,
            &format!("address = \"127.0.0.1:{port}\"\nprotocol = \"https\""),
            1,
        )
    };
    let (cfg_here, cfg_elsewhere) = (at(here), at(elsewhere));
    http3_comes_back_while_a_request_drains(setup, upstream, &cfg_here, &cfg_elsewhere, Some(here))
        .await;
}

/// quinn fixes the largest datagram an endpoint accepts when it is made: a reload that
/// changes `quic.max_udp_payload` on a kept socket says it waits for a restart, and still
/// serves (a reload that keeps it says nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_changing_max_udp_payload_warns_that_it_waits_for_a_restart() {
    let upstream = Upstream::echo().await;
    let setup = Setup::new();
    let ca = setup.pki.ca_pem.clone();
    let cfg = |quic: &str| {
        config(
            &setup.listeners_h3("", quic, ALLOW_ALL_POLICY),
            upstream.addr,
            APP_ROUTE,
        )
    };
    let (before, after) = (cfg("max_udp_payload = 1400"), cfg("max_udp_payload = 1300"));
    let wraith = setup.start(&before);
    let warned = |wraith: &Wraith| {
        wraith.log_json().iter().any(|l| {
            l["level"] == "WARN"
                && l["message"].as_str().is_some_and(|m| {
                    m.contains("max_udp_payload changed from 1400 to 1300")
                        && m.contains("until the next restart")
                })
        })
    };
    wraith.reload().unwrap();
    assert!(!warned(&wraith), "{}", wraith.log());
    wraith.write_config(&after);
    wraith.reload().unwrap();
    assert!(warned(&wraith), "{}", wraith.log());
    let client = H3Client::new(&ca, None, Groups::Default);
    let mut conn = client.connect(wraith.addr("https")).await.unwrap();
    assert_eq!(conn.get("/after").await.unwrap().status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_quic_endpoint_frees_its_port_and_a_port_taken_meanwhile_fails_the_reload() {
    let upstream = Upstream::echo().await;
    let setup = Setup::new();
    let ca = setup.pki.ca_pem.clone();
    let on = h3_config(&setup, upstream.addr);
    let off = on.replace("http3 = true", "http3 = false");
    let wraith = setup.start(&on);
    let addr = wraith.addr("https");
    let client = H3Client::new(&ca, None, Groups::Default);
    let mut idle = client.connect(addr).await.unwrap();
    assert_eq!(idle.get("/one").await.unwrap().status(), 200);

    wraith.write_config(&off);
    wraith.reload().unwrap();
    closed_by_gateway_quietly(&idle.conn, Duration::from_secs(10)).await;
    // Its last connection gone, the endpoint lets go of the port.
    let mut taken = None;
    let freed = Wraith::eventually(Duration::from_secs(10), || {
        taken = std::net::UdpSocket::bind(addr).ok();
        std::future::ready(taken.is_some())
    })
    .await;
    assert!(
        freed,
        "UDP {addr} still bound after its QUIC connections drained"
    );

    // Another socket on the port now: turning HTTP/3 on fails the reload, as documented.
    wraith.write_config(&on);
    let refused = wraith.reload().unwrap_err();
    assert!(refused.contains("Address already in use"), "{refused}");
    drop(taken);
    wraith.reload().unwrap();
    let mut fresh = client.connect(addr).await.unwrap();
    assert_eq!(fresh.get("/new").await.unwrap().status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_errors_for_http3_name_the_key() {
    let setup = Setup::new();
    let dir = setup.dir.path().to_path_buf();
    let cfg = r#"
[[listener]]
name = "plain"
address = "127.0.0.1:0"
protocol = "http"
http3 = true

[[listener]]
name = "tuned"
address = "127.0.0.1:0"
protocol = "https"
tls = { cert = "server.pem", key = "server-key.pem" }
quic = { congestion = "vegas", retry = "sometimes", max_udp_payload = 100 }

[[route]]
name = "r"
respond = { status = 200 }
"#;
    std::fs::write(dir.join("bad.toml"), cfg).unwrap();
    let (code, out, err) = wraith_cmd(&["test", "-c", "bad.toml"], &dir);
    assert_ne!(code, 0, "{out}");
    let err = out + &err;
    for needle in [
        "listener[0].http3",
        "needs protocol = \"https\"",
        "listener[1].quic",
        "quic settings without http3 = true",
    ] {
        assert!(err.contains(needle), "missing {needle:?} in:\n{err}");
    }

    let cfg = cfg.replace("quic = {", "http3 = true\nquic = {");
    std::fs::write(dir.join("bad.toml"), cfg).unwrap();
    let (_, out, err) = wraith_cmd(&["test", "-c", "bad.toml"], &dir);
    let err = out + &err;
    for needle in [
        "listener[1].quic.congestion",
        "listener[1].quic.retry",
        "listener[1].quic.max_udp_payload",
    ] {
        assert!(err.contains(needle), "missing {needle:?} in:\n{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn address_validation_with_retry_always_and_new_reno() {
    let upstream = Upstream::echo().await;
    let setup = Setup::new();
    let ca = setup.pki.ca_pem.clone();
    let cfg = config(
        &setup.listeners_h3(
            "",
            "retry = \"always\", congestion = \"new_reno\", max_udp_payload = 1350",
            ALLOW_ALL_POLICY,
        ),
        upstream.addr,
        APP_ROUTE,
    );
    let wraith = setup.start(&cfg);
    // A new client is sent a Retry first (its integrity tag is checked by the client); the
    // connection then completes on the validated address, and the NEW_TOKEN it receives lets
    // its next connection skip the Retry.
    let relay = HoldingRelay::start(wraith.addr("https"), Duration::ZERO).await;
    let client = H3Client::new(&ca, None, Groups::Default);
    for i in 1..=2 {
        let mut conn = client.connect(relay.addr).await.unwrap();
        assert_eq!(
            relay.retries.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "connection {i}"
        );
        assert_eq!(conn.get("/validated").await.unwrap().status(), 200);
        assert!(
            conn.conn.stats().path.current_mtu <= 1350,
            "MTU discovery stays under max_udp_payload"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_breaks_its_content_length_is_not_forwarded_as_complete() {
    let upstream = hashing_upstream().await;
    let setup = Setup::new();
    let ca = setup.pki.ca_pem.clone();
    let cfg = h3_config(&setup, upstream.addr);
    let wraith = setup.start(&cfg);
    let client = H3Client::new(&ca, None, Groups::Default);
    for (declared, sent) in [(10usize, 5usize), (5, 10)] {
        let mut conn = client.connect(wraith.addr("https")).await.unwrap();
        let req = Request::post("https://localhost/upload")
            .header("content-length", declared.to_string())
            .body(())
            .unwrap();
        let result = conn.request(req, Some(Bytes::from(vec![b'x'; sent]))).await;
        // Either the request fails or the gateway answers with an error; the upstream never
        // acknowledges a complete body of the declared length.
        if let Ok(resp) = result {
            assert_ne!(
                resp.status(),
                200,
                "declared {declared}, sent {sent}: {:?}",
                String::from_utf8_lossy(&resp.body)
            );
        }
    }
    // Lengths that are no length, or two of them (RFC 9114 §4.1.2: malformed), and DATA
    // after `content-length: 0`: refused, never served with the body cut or guessed.
    // A malformed length is a malformed message: the stream is reset with H3_MESSAGE_ERROR
    // before anything is forwarded. DATA after a declared 0 is found once the request is
    // under way: the client's error, 400 (or the same reset, if it is seen first).
    for declared in [&["+5"][..], &["abc"], &["5", "500"], &["5, 6"], &["0"]] {
        let mut conn = client.connect(wraith.addr("https")).await.unwrap();
        let mut req = Request::post("https://localhost/upload");
        for d in declared {
            req = req.header("content-length", *d);
        }
        let result = conn
            .request(req.body(()).unwrap(), Some(Bytes::from_static(b"xxxxx")))
            .await;
        match (declared, result) {
            (["0"], Ok(resp)) => assert_eq!(
                resp.status(),
                400,
                "declared 0: {:?}",
                String::from_utf8_lossy(&resp.body)
            ),
            (_, Err(e)) if e.contains("H3_MESSAGE_ERROR") => {}
            (_, other) => panic!(
                "declared {declared:?}: {:?}",
                other.map(|r| (r.status(), String::from_utf8_lossy(&r.body).to_string()))
            ),
        }
    }
    // A correct one on the same gateway still works, and so does a list of one length.
    for declared in ["5, 5", "5"] {
        let mut conn = client.connect(wraith.addr("https")).await.unwrap();
        let req = Request::post("https://localhost/upload")
            .header("content-length", declared)
            .body(())
            .unwrap();
        let resp = conn
            .request(req, Some(Bytes::from_static(b"xxxxx")))
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "declared {declared:?}");
        assert_eq!(resp.json()["len"], 5, "declared {declared:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_connection_whose_request_body_was_cut_short_is_never_reused() {
    // The upstream answers 413 on the head and then waits for the declared body before it
    // reads the next request, as nginx does. A body that ends short must not leave the
    // gateway's pooled connection in the middle of that body.
    let (addr, seen) = answers_before_the_body().await;
    let setup = Setup::new();
    let ca = setup.pki.ca_pem.clone();
    let cfg = h3_config(&setup, addr);
    let wraith = setup.start(&cfg);
    let client = H3Client::new(&ca, None, Groups::Default);
    let mut conn = client.connect(wraith.addr("https")).await.unwrap();
    let req = Request::post("https://localhost/upload")
        .header("content-length", "100")
        .body(())
        .unwrap();
    // Ten bytes, a pause (the gateway has written the head and the bytes upstream and
    // waits for more; the upstream has answered), then the end of the stream: short by 90.
    let mut sent = 0;
    let _ = conn
        .request_streamed(req, move || {
            sent += 1;
            match sent {
                1 => Some(Bytes::from_static(b"0123456789")),
                _ => {
                    std::thread::sleep(Duration::from_millis(300));
                    None
                }
            }
        })
        .await;
    for _ in 0..3 {
        let resp = conn.get("/next").await.unwrap();
        assert_eq!(
            resp.status(),
            200,
            "{:?}",
            String::from_utf8_lossy(&resp.body)
        );
        assert_eq!(&resp.body[..], b"ok");
    }
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen.iter().filter(|l| l.starts_with("GET /next")).count(),
        3,
        "{seen:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Connection timers: requests count as activity, QUIC PINGs do not.

/// Client PINGs (quinn keep-alive) far more often than any timeout below: quinn's own idle
/// timeout never fires on these connections.
const PING_EVERY: Duration = Duration::from_millis(200);

/// The standard listeners with HTTP/3 on the https one, every request allowed, and
/// `APP_ROUTE` to `upstream`.
fn h3_config(setup: &Setup, upstream: std::net::SocketAddr) -> String {
    config(
        &setup.listeners_h3("", "", ALLOW_ALL_POLICY),
        upstream,
        APP_ROUTE,
    )
}

/// The gateway's config with an HTTP/3 listener under these `[listener.limits]`.
fn with_limits(setup: &Setup, upstream: std::net::SocketAddr, limits: &str) -> String {
    h3_config(setup, upstream).replacen(
        "http3 = true",
        &format!("http3 = true\nlimits = {{ {limits} }}"),
        1,
    )
}

/// Waits (at most `within`) for the gateway to close `conn`, and checks that it was the
/// gateway's HTTP/3 close (H3_NO_ERROR) rather than a QUIC idle timeout.
async fn closed_by_gateway(conn: &quinn::Connection, within: Duration) {
    let reason = tokio::time::timeout(within, conn.closed())
        .await
        .unwrap_or_else(|_| panic!("connection still open after {within:?}"));
    match reason {
        quinn::ConnectionError::ApplicationClosed(c) => {
            assert_eq!(c.error_code, quinn::VarInt::from_u32(0x100), "{c:?}")
        }
        other => panic!("closed otherwise than by the gateway's H3_NO_ERROR: {other:?}"),
    }
    assert!(conn.stats().frame_tx.ping > 0, "the client sent PINGs");
}

/// A gateway with listener `limits` in front of an echo upstream, and an HTTP/3 connection
/// to it from a client that PINGs every `PING_EVERY` (handshake and HTTP/3 setup done).
async fn pinging_connection(limits: &str) -> (Wraith, Upstream, H3Conn) {
    let upstream = Upstream::echo().await;
    let setup = Setup::new();
    let ca = setup.pki.ca_pem.clone();
    let cfg = with_limits(&setup, upstream.addr, limits);
    let wraith = setup.start(&cfg);
    let client = H3Client::new(&ca, None, Groups::Default).keep_alive(PING_EVERY);
    let conn = client.connect(wraith.addr("https")).await.unwrap();
    (wraith, upstream, conn)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_sends_no_request_is_closed_after_header_read_timeout_despite_pings() {
    // idle_timeout (also quinn's idle timeout) far beyond the wait below: only the first
    // request's timer can close this connection in time.
    let (_wraith, _upstream, conn) =
        pinging_connection(r#"header_read_timeout = "1s", idle_timeout = "60s""#).await;
    // Nothing but PINGs from here.
    closed_by_gateway(&conn.conn, Duration::from_secs(20)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_idle_after_a_request_is_closed_after_idle_timeout_despite_pings() {
    // header_read_timeout far beyond the wait below: only the idle timer can close it.
    let (_wraith, _upstream, mut conn) =
        pinging_connection(r#"header_read_timeout = "60s", idle_timeout = "2s""#).await;
    assert_eq!(conn.get("/one").await.unwrap().status(), 200);
    closed_by_gateway(&conn.conn, Duration::from_secs(20)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_in_flight_longer_than_idle_timeout_keeps_its_connection() {
    let (upstream, release, mut held) = holding_upstream().await;
    let setup = Setup::new();
    let ca = setup.pki.ca_pem.clone();
    let cfg = with_limits(
        &setup,
        upstream.addr,
        r#"header_read_timeout = "1s", idle_timeout = "1s""#,
    );
    let wraith = setup.start(&cfg);
    let client = H3Client::new(&ca, None, Groups::Default).keep_alive(PING_EVERY);
    let conn = client.connect(wraith.addr("https")).await.unwrap();
    let mut long = conn.clone();
    let in_flight = tokio::spawn(async move { long.get("/held").await });
    tokio::time::timeout(Duration::from_secs(10), held.recv())
        .await
        .expect("the request reached the upstream");

    // Several idle timeouts pass with the request in flight: the connection stays.
    let closed = tokio::time::timeout(Duration::from_secs(4), conn.conn.closed()).await;
    assert!(
        closed.is_err(),
        "closed with a request in flight: {closed:?}"
    );
    release.notify_one();
    let resp = in_flight.await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);

    // Once it is done, the idle time counts from its end.
    closed_by_gateway(&conn.conn, Duration::from_secs(20)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_refused_before_the_pipeline_are_logged_and_reported_as_over_http1() {
    let upstream = Upstream::echo().await;
    let setup = Setup::new();
    let ca = setup.pki.ca_pem.clone();
    let cfg = format!(
        "{}\n[log.events]\npath = \"events.json\"\n",
        h3_config(&setup, upstream.addr)
    );
    let wraith = setup.start(&cfg);
    let addr = wraith.addr("https");
    const WAIT: Duration = Duration::from_secs(10);

    // Two lengths that differ: malformed, the stream is reset (H3_MESSAGE_ERROR) unanswered,
    // and the refusal is accounted as HTTP/1.1's codec accounts for one.
    let mut conn = H3Client::new(&ca, None, Groups::Default)
        .connect(addr)
        .await
        .unwrap();
    let req = Request::post("https://localhost/upload")
        .header("content-length", "5")
        .header("content-length", "500")
        .body(())
        .unwrap();
    let err = conn
        .request(req, Some(Bytes::from_static(b"xxxxx")))
        .await
        .err()
        .expect("a request with two lengths was served");
    assert!(err.contains("H3_MESSAGE_ERROR"), "{err}");
    let record = wraith
        .wait_json_line("access.json", WAIT, |v| v["status"] == 400)
        .await
        .expect("no record of the refused request");
    assert_eq!(record["error"], "malformed_request", "{record}");
    assert_eq!(record["protocol"], "h3", "{record}");
    assert_eq!(record["method"], "POST", "{record}");
    assert_eq!(record["path"], "/upload", "{record}");

    // A head declared over max_header_size (64 KiB): h3 answers 431 without reading it.
    let mut raw = RawH3::connect(&ca, addr).await;
    raw.open_control().await;
    let big = "x".repeat(70 << 10);
    let section = request_section("GET", "/big", &[("x-big", &big)]);
    let (_send, mut recv) = raw.send(&section, None, true).await;
    let status = tokio::time::timeout(WAIT, read_status(&mut recv)).await;
    assert_eq!(status, Ok(Some(431)));
    let record = wraith
        .wait_json_line("access.json", WAIT, |v| v["status"] == 431)
        .await
        .expect("no record of the 431");
    assert_eq!(record["error"], "malformed_request", "{record}");
    assert_eq!(record["protocol"], "h3", "{record}");
    assert_eq!(record["method"], "-", "{record}");

    // Each one a security event for the SIEM.
    let deadline = std::time::Instant::now() + WAIT;
    let mut events = wraith.json_lines("events.json");
    while events.len() < 2 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        events = wraith.json_lines("events.json");
    }
    assert_eq!(events.len(), 2, "{events:?}");
    assert!(
        events
            .iter()
            .all(|e| e["wraith"]["event"] == "malformed_request" && e["srcip"] == "127.0.0.1"),
        "{events:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_asterisk_target_is_refused_for_every_method_but_options() {
    let upstream = Upstream::echo().await;
    let setup = Setup::new();
    let ca = setup.pki.ca_pem.clone();
    let cfg = h3_config(&setup, upstream.addr);
    let wraith = setup.start(&cfg);
    let mut raw = RawH3::connect(&ca, wraith.addr("https")).await;
    raw.open_control().await;
    let status_of = |method: &'static str| {
        let raw = &raw;
        async move {
            let (_send, mut recv) = raw
                .send(&request_section(method, "*", &[]), None, true)
                .await;
            tokio::time::timeout(Duration::from_secs(10), read_status(&mut recv))
                .await
                .ok()
                .flatten()
        }
    };

    // `:path *` is for OPTIONS only (RFC 9114 §4.3.1), as HTTP/1.1's codec has it.
    for method in ["GET", "POST", "DELETE"] {
        assert_eq!(status_of(method).await, Some(400), "{method} *");
    }
    let record = wraith
        .wait_json_line("access.json", Duration::from_secs(10), |v| {
            v["method"] == "GET" && v["status"] == 400
        })
        .await
        .expect("no record of GET *");
    assert_eq!(record["protocol"], "h3", "{record}");
    // `OPTIONS *` is a request about the server: the catch-all route forwards it.
    assert_eq!(status_of("OPTIONS").await, Some(200));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_on_the_stream_the_goaway_names_is_rejected_and_never_forwarded() {
    // `/slow` is held at the upstream until released; every other request is counted.
    let release = std::sync::Arc::new(tokio::sync::Notify::new());
    let (held_tx, mut held) = tokio::sync::mpsc::unbounded_channel();
    let others = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (r, o) = (release.clone(), others.clone());
    let upstream = Upstream::start(move |req: Request<hyper::body::Incoming>| {
        let (release, held_tx, others) = (r.clone(), held_tx.clone(), o.clone());
        async move {
            if req.uri().path() == "/slow" {
                let _ = held_tx.send(());
                release.notified().await;
            } else {
                others.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            echo_response(req).await
        }
    })
    .await;
    let setup = Setup::new();
    let ca = setup.pki.ca_pem.clone();
    let cfg = h3_config(&setup, upstream.addr);
    let wraith = setup.start(&cfg);
    const WAIT: Duration = Duration::from_secs(10);
    let mut client = RawH3::connect(&ca, wraith.addr("https")).await;
    client.open_control().await;

    // Stream 0: a request in flight when the drain starts.
    let (_s0, mut slow) = client
        .send(&request_section("GET", "/slow", &[]), None, true)
        .await;
    tokio::time::timeout(WAIT, held.recv())
        .await
        .expect("the request reached the upstream");
    wraith.signal(libc::SIGTERM);
    let goaway = tokio::time::timeout(WAIT, client.goaway())
        .await
        .expect("no GOAWAY")
        .expect("no GOAWAY");
    // Past the last request accepted: the next stream's ID.
    assert_eq!(goaway, 4);

    // A POST on exactly that stream, as a client sends when the GOAWAY crossed it: RFC 9114
    // §5.2 says it is not processed (so the client may send it again elsewhere). Processing
    // it anyway would run it twice.
    let (s4, mut rejected) = client
        .send(
            &request_section("POST", "/once", &[("content-length", "2")]),
            Some(b"hi"),
            true,
        )
        .await;
    assert_eq!(u64::from(s4.id()), goaway);
    let end = tokio::time::timeout(WAIT, stream_end(&mut rejected)).await;
    assert_eq!(end, Ok(StreamEnd::Reset(common::quic::H3_REQUEST_REJECTED)));

    // The request in flight still finishes; the rejected one never reached the upstream.
    release.notify_one();
    let status = tokio::time::timeout(WAIT, read_status(&mut slow)).await;
    assert_eq!(status, Ok(Some(200)));
    assert_eq!(others.load(std::sync::atomic::Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_client_waiting_longer_than_idle_timeout_gets_its_response() {
    // The upstream takes three idle timeouts to answer; the client sends nothing meanwhile
    // (no keep-alive: quinn's default).
    let upstream = Upstream::start(|req: Request<hyper::body::Incoming>| async move {
        tokio::time::sleep(Duration::from_secs(3)).await;
        echo_response(req).await
    })
    .await;
    let setup = Setup::new();
    let ca = setup.pki.ca_pem.clone();
    let cfg = with_limits(&setup, upstream.addr, r#"idle_timeout = "1s""#);
    let wraith = setup.start(&cfg);
    let client = H3Client::new(&ca, None, Groups::Default);
    let mut conn = client.connect(wraith.addr("https")).await.unwrap();
    // The request in flight keeps the connection, as over HTTP/1.1 and HTTP/2: QUIC's own
    // idle timeout (1 s, the lower of the two sides') does not end it under the request.
    let resp = conn.get("/slow").await.unwrap();
    assert_eq!(resp.status(), 200);
    // Idle once it is done: closed by the gateway, not by QUIC's timer.
    closed_by_gateway_quietly(&conn.conn, Duration::from_secs(20)).await;
}

/// As `closed_by_gateway`, for a client that sends no PINGs.
async fn closed_by_gateway_quietly(conn: &quinn::Connection, within: Duration) {
    let reason = tokio::time::timeout(within, conn.closed())
        .await
        .unwrap_or_else(|_| panic!("connection still open after {within:?}"));
    match reason {
        quinn::ConnectionError::ApplicationClosed(c) => {
            assert_eq!(c.error_code, quinn::VarInt::from_u32(0x100), "{c:?}")
        }
        other => panic!("closed otherwise than by the gateway's H3_NO_ERROR: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_moves_to_another_address_is_not_served_from_there() {
    let upstream = Upstream::echo().await;
    let setup = Setup::new();
    let ca = setup.pki.ca_pem.clone();
    let cfg = with_limits(&setup, upstream.addr, r#"idle_timeout = "2s""#);
    let wraith = setup.start(&cfg);
    let client = H3Client::new(&ca, None, Groups::Default);
    let mut conn = client.connect(wraith.addr("https")).await.unwrap();
    let resp = conn.get("/here").await.unwrap();
    assert_eq!(resp.status(), 200);
    let rid = resp.header("x-request-id").unwrap().to_string();
    let record = wraith.access_record("access.json", &rid);
    assert_eq!(record["client_port"], client.local_addr().port());

    // Another port: the connection's address (what bans, rate limits, policies and the log
    // go by) would no longer be the client's. Its packets from there are not taken.
    client.rebind();
    let moved = tokio::time::timeout(Duration::from_secs(10), conn.get("/moved")).await;
    assert!(
        !matches!(moved, Ok(Ok(_))),
        "served after moving: {:?}",
        moved.map(|r| r.map(|r| r.status()))
    );
    assert!(
        wraith
            .json_lines("access.json")
            .iter()
            .all(|r| r["path"] != "/moved"),
        "the moved request reached the pipeline"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_the_upstream_cuts_short_is_reset_not_ended() {
    // A chunked body (no content-length) whose upstream goes away after the first chunk:
    // only the stream's end could tell the client that the body is not complete.
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_addr = upstream.local_addr().unwrap();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut sock, _)) = upstream.accept().await {
            let mut head = Vec::new();
            let mut buf = [0u8; 4096];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match sock.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let _ = sock
                .write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
                .await;
            // Gone mid-body.
        }
    });
    let setup = Setup::new();
    let ca = setup.pki.ca_pem.clone();
    let cfg = h3_config(&setup, upstream_addr);
    let wraith = setup.start(&cfg);
    let mut client = RawH3::connect(&ca, wraith.addr("https")).await;
    client.open_control().await;
    let (_send, mut recv) = client
        .send(&request_section("GET", "/cut", &[]), None, true)
        .await;
    let end = tokio::time::timeout(Duration::from_secs(10), stream_end(&mut recv)).await;
    assert_eq!(end, Ok(StreamEnd::Reset(common::quic::H3_INTERNAL_ERROR)));
}

// ---------------------------------------------------------------------------------------------
// Security events name only addresses that QUIC validated.

/// `wraith_tls_handshakes_total` on the https listener for `result`, summed over the other
/// labels.
async fn handshakes(wraith: &Wraith, result: &str) -> u64 {
    let (_, text) = wraith.admin_get("/v1/metrics").await;
    String::from_utf8_lossy(&text)
        .lines()
        .filter(|l| {
            l.starts_with("wraith_tls_handshakes_total{")
                && l.contains("listener=\"https\"")
                && l.contains(&format!("result=\"{result}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// A QUIC source address is anyone's until validated: an off-path sender can put any on an
/// Initial packet. Such a sender (here a relay that drops every answer) puts nothing in the
/// SIEM's feed: a failed or timed-out handshake from it is only counted, and a banned
/// address gets a Retry. A banned client that answers the Retry, and a failed handshake
/// from a validated address, are reported as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_security_events_name_only_validated_addresses() {
    let upstream = Upstream::echo().await;
    let setup = Setup::new();
    let ca = setup.pki.ca_pem.clone();
    let events = "\n[log.events]\npath = \"events.json\"\n";
    let base = setup.listeners_h3("handshake_timeout = \"1s\"", "", ALLOW_ALL_POLICY);
    let wraith = setup.start(&format!(
        "{}{events}",
        config(&base, upstream.addr, APP_ROUTE)
    ));
    let addr = wraith.addr("https");
    const WAIT: Duration = Duration::from_secs(10);
    let eventually = |what: &'static str, n: u64| {
        let wraith = &wraith;
        async move {
            let ok =
                Wraith::eventually(WAIT, || async { handshakes(wraith, what).await >= n }).await;
            assert!(ok, "no handshake counted as {what}");
        }
    };

    // A ClientHello the listener refuses (no h3 in ALPN), from an address not validated.
    let refused = H3Client::offering(&ca, None, Groups::Default, b"h2");
    assert!(refused.connect(addr).await.is_err());
    eventually("failed", 1).await;

    // A handshake that never completes: the client never hears from the server.
    let relay = HoldingRelay::one_way(addr, "127.0.0.3".parse().unwrap()).await;
    let silent = H3Client::new(&ca, None, Groups::Default);
    let attempt = tokio::spawn(async move { silent.connect(relay.addr).await.is_ok() });
    eventually("timeout", 1).await;
    attempt.abort();

    // A banned address that does not answer the Retry is not refused, nor reported.
    let (st, v) = wraith
        .admin(
            http::Method::POST,
            "/v1/decisions",
            Some(serde_json::json!({"ip": "127.0.0.2", "reason": "test"})),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    let relay = HoldingRelay::one_way(addr, "127.0.0.2".parse().unwrap()).await;
    let retries = relay.retries.clone();
    let banned = H3Client::new(&ca, None, Groups::Default);
    let attempt = tokio::spawn(async move { banned.connect(relay.addr).await.is_ok() });
    let retried = Wraith::eventually(WAIT, || async {
        retries.load(std::sync::atomic::Ordering::SeqCst) > 0
    })
    .await;
    assert!(retried, "the banned address got no Retry");
    attempt.abort();

    // The same address, answering the Retry: refused and reported.
    let client = H3Client::new(&ca, None, Groups::Default);
    client.rebind_to("127.0.0.2".parse().unwrap());
    assert!(
        client.connect(addr).await.is_err(),
        "a banned client connected"
    );
    let event = wraith
        .wait_json_line("events.json", WAIT, |e| e["wraith"]["event"] == "banned")
        .await
        .expect("no banned event");
    assert_eq!(event["srcip"], "127.0.0.2", "{event}");
    // Events are written in order: whatever the first three had caused would be there.
    let all = wraith.json_lines("events.json");
    assert_eq!(all.len(), 1, "{all:?}");

    // Once validated (a Retry for every new client), a failed handshake is reported.
    let setup = Setup::new();
    let ca = setup.pki.ca_pem.clone();
    let base = setup.listeners_h3("", "retry = \"always\"", ALLOW_ALL_POLICY);
    let wraith = setup.start(&format!(
        "{}{events}",
        config(&base, upstream.addr, APP_ROUTE)
    ));
    let refused = H3Client::offering(&ca, None, Groups::Default, b"h2");
    assert!(refused.connect(wraith.addr("https")).await.is_err());
    let event = wraith
        .wait_json_line("events.json", WAIT, |e| {
            e["wraith"]["event"] == "tls_failure"
        })
        .await
        .expect("no tls_failure event from a validated address");
    assert_eq!(event["srcip"], "127.0.0.1", "{event}");
}

/// A `host` field other than `:authority` is malformed over HTTP/3 too (RFC 9114 §4.3.1:
/// they must be the same): refused (h3 resets the stream with H3_MESSAGE_ERROR before the
/// pipeline sees it), never served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_field_other_than_the_authority_is_refused_over_http3() {
    let upstream = Upstream::echo().await;
    let setup = Setup::new();
    let ca = setup.pki.ca_pem.clone();
    let cfg = h3_config(&setup, upstream.addr);
    let wraith = setup.start(&cfg);
    let mut raw = RawH3::connect(&ca, wraith.addr("https")).await;
    raw.open_control().await;
    for (host, expected) in [("admin.internal", None), ("localhost", Some(200))] {
        let (_send, mut recv) = raw
            .send(&request_section("GET", "/", &[("host", host)]), None, true)
            .await;
        let status = tokio::time::timeout(Duration::from_secs(10), read_status(&mut recv))
            .await
            .ok()
            .flatten();
        assert_eq!(status, expected, "host {host}");
    }
}

/// `Alt-Svc` follows a reload on connections already open: HTTP/3 turned off stops being
/// advertised at their next response, and turned on again is advertised (it was built once
/// per connection, so a keep-alive connection advertised what its listener had when it was
/// accepted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alt_svc_follows_a_reload_on_open_connections() {
    let upstream = Upstream::echo().await;
    let setup = Setup::new();
    let ca = setup.pki.ca_pem.clone();
    let on = config(
        &setup.listeners_h3("", "", ALLOW_ALL_POLICY),
        upstream.addr,
        APP_ROUTE,
    );
    let off = on.replacen("http3 = true", "http3 = false", 1);
    assert_ne!(on, off);
    let wraith = setup.start(&on);
    let port = wraith.addr("https").port();
    // One HTTP/2 connection, kept open throughout.
    let client = https_client_h2(&ca, None);
    let alt_svc = || async {
        let resp = client.get(wraith.url("https", "/")).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        resp.headers()
            .get("alt-svc")
            .map(|v| v.to_str().unwrap().to_string())
    };
    let advertised = format!("h3=\":{port}\"; ma=86400");
    assert_eq!(alt_svc().await.as_deref(), Some(advertised.as_str()));
    wraith.write_config(&off);
    wraith.reload().unwrap();
    assert_eq!(
        alt_svc().await,
        None,
        "HTTP/3 advertised after it was turned off"
    );
    wraith.write_config(&on);
    wraith.reload().unwrap();
    assert_eq!(alt_svc().await.as_deref(), Some(advertised.as_str()));
}

/// Asserts that a connection attempt was closed with H3_EXCESSIVE_LOAD, before the client's
/// HTTP/3 set-up was done (`Err`) or after.
async fn closed_for_excessive_load(attempt: Result<H3Conn, String>) {
    match attempt {
        Err(e) => assert!(e.contains("H3_EXCESSIVE_LOAD"), "{e}"),
        Ok(c) => match tokio::time::timeout(Duration::from_secs(10), c.conn.closed())
            .await
            .expect("the connection was closed")
        {
            quinn::ConnectionError::ApplicationClosed(close) => {
                assert_eq!(close.error_code.into_inner(), 0x107, "{close:?}");
            }
            other => panic!("closed with {other:?}"),
        },
    }
}

/// `max_connections_per_client` over QUIC: counted once the handshake has proven the
/// client's address (a spoofed Initial cannot use up someone's places); the connection past
/// the limit is closed with H3_EXCESSIVE_LOAD, and the first one goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quic_connection_past_max_connections_per_client_is_closed_with_excessive_load() {
    let upstream = Upstream::echo().await;
    let setup = Setup::new();
    let cfg = with_limits(&setup, upstream.addr, "max_connections_per_client = 1");
    let wraith = setup.start(&cfg);
    let client = H3Client::new(&wraith.pki().ca_pem, None, Groups::Default);
    let mut first = client.connect(wraith.addr("https")).await.unwrap();
    assert_eq!(first.get("/one").await.unwrap().status(), 200);
    closed_for_excessive_load(client.connect(wraith.addr("https")).await).await;
    assert_eq!(first.get("/two").await.unwrap().status(), 200);

    // One count for the listener's TCP and QUIC sides: a TCP connection holding the place
    // (in its TLS handshake) keeps a QUIC one out.
    first.conn.close(quinn::VarInt::from_u32(0x100), b"");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let _tcp = loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the QUIC connection's place never came back"
        );
        let Ok(mut tcp) = tokio::net::TcpStream::connect(wraith.addr("https")).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let mut buf = [0u8; 16];
        // Reset at once while the QUIC connection still holds the place; kept otherwise.
        if tokio::time::timeout(
            Duration::from_millis(300),
            tokio::io::AsyncReadExt::read(&mut tcp, &mut buf),
        )
        .await
        .is_err()
        {
            break tcp;
        }
    };
    closed_for_excessive_load(client.connect(wraith.addr("https")).await).await;
}
