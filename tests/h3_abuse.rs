//! HTTP/3 abuse that costs the upstream, against the real gateway and an upstream that counts
//! the requests it receives: "rapid reset" (request streams opened and cancelled at once,
//! CVE-2023-44487 over QUIC) is cut off per connection (`listener/quic/cancels.rs`), and a
//! client that cancels some of its requests, as browsers do, is never cut.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::quic::{frame, read_status, request_section, RawH3, H3_REQUEST_CANCELLED, HEADERS};
use common::*;

/// Bound on every wait for the gateway.
const WAIT: Duration = Duration::from_secs(30);
const H3_EXCESSIVE_LOAD: u64 = 0x107;
/// Request streams ended before the gateway judges a connection's cancellations (Envoy's
/// number, `cancels::MIN_STREAMS`).
const MIN_STREAMS: usize = 500;
/// The listener's default `max_concurrent_streams`: request streams open at once.
const MAX_STREAMS: usize = 128;

fn config(base: &str, upstream: SocketAddr) -> String {
    format!(
        r#"{base}
[[upstream]]
name = "app"
endpoints = ["{upstream}"]

[[route]]
name = "app"
upstream = "app"
"#
    )
}

/// An upstream that counts the requests it receives (from their head), reads each body and
/// answers `delay` later with `body_len` bytes, as an application that takes its time.
async fn counting_upstream(delay: Duration, body_len: usize) -> (Upstream, Arc<AtomicUsize>) {
    use http_body_util::BodyExt;
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = seen.clone();
    let upstream = Upstream::start(move |req| {
        counter.fetch_add(1, Ordering::SeqCst);
        async move {
            let _ = req.into_body().collect().await;
            tokio::time::sleep(delay).await;
            hyper::Response::new(full(vec![b'x'; body_len]))
        }
    })
    .await;
    (upstream, seen)
}

/// The gateway with HTTP/3 in front of `upstream`, and a raw client with `transport` settings
/// connected to it with its control stream open.
async fn gateway(upstream: &Upstream, transport: quinn::TransportConfig) -> (Wraith, RawH3) {
    let setup = Setup::new();
    let cfg = config(&setup.listeners_h3("", "", ALLOW_ALL_POLICY), upstream.addr);
    let wraith = setup.start(&cfg);
    let ca = wraith.pki().ca_pem.clone();
    let mut client = RawH3::connect_with(&ca, wraith.addr("https"), transport).await;
    client.open_control().await;
    (wraith, client)
}

/// Opens a request stream for a POST whose body never comes (its head goes upstream at
/// once), to be cancelled.
async fn post_to_cancel(client: &RawH3) -> Option<(quinn::SendStream, quinn::RecvStream)> {
    let head = frame(
        HEADERS,
        &request_section("POST", "/", &[("content-length", "10")]),
    );
    let (mut send, recv) = tokio::time::timeout(WAIT, client.conn.open_bi())
        .await
        .ok()?
        .ok()?;
    send.write_all(&head).await.ok()?;
    Some((send, recv))
}

/// Cancels a request as a client does: RESET_STREAM and STOP_SENDING.
fn cancel((mut send, mut recv): (quinn::SendStream, quinn::RecvStream)) {
    let code = quinn::VarInt::from_u32(H3_REQUEST_CANCELLED as u32);
    let _ = send.reset(code);
    let _ = recv.stop(code);
}

/// The listener's `wraith_connections_refused_total{reason="h3_rapid_reset"}`.
async fn rapid_reset_closes(wraith: &Wraith) -> u64 {
    let (status, metrics) = wraith.admin_get("/v1/metrics").await;
    assert_eq!(status, 200);
    String::from_utf8_lossy(&metrics)
        .lines()
        .find_map(|l| {
            l.strip_prefix(
                "wraith_connections_refused_total{listener=\"https\",reason=\"h3_rapid_reset\"} ",
            )
        })
        .map_or(0, |v| v.trim().parse().unwrap())
}

// ---------------------------------------------------------------------------------------------
// Tests

/// Rapid reset: HEADERS, then RESET_STREAM and STOP_SENDING, in batches, as fast as stream
/// credit comes back. Each cancelled stream returns its credit at once while its upstream
/// request was already sent; before the guard one connection made 5,000 upstream requests
/// in 7 s this way and was never closed. Now it is closed with H3_EXCESSIVE_LOAD once 500 of
/// its streams have ended, half or more of them cancelled, and the upstream sees at most
/// those and the streams open at that moment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_reset_closes_the_connection_with_excessive_load() {
    const ATTEMPTS: usize = 5_000;
    const BATCH: usize = 50;
    let (upstream, seen) = counting_upstream(Duration::from_millis(500), 2).await;
    let (wraith, client) = gateway(&upstream, quinn::TransportConfig::default()).await;
    assert_eq!(rapid_reset_closes(&wraith).await, 0);

    let mut opened = 0;
    'attack: while opened < ATTEMPTS {
        let mut batch = Vec::new();
        for _ in 0..BATCH {
            match post_to_cancel(&client).await {
                Some(s) => batch.push(s),
                None => break 'attack,
            }
            opened += 1;
        }
        // Long enough for the gateway to read the heads and send them upstream.
        tokio::time::sleep(Duration::from_millis(20)).await;
        batch.into_iter().for_each(cancel);
        if client.conn.close_reason().is_some() {
            break;
        }
    }

    let reason = tokio::time::timeout(WAIT, client.conn.closed())
        .await
        .unwrap_or_else(|_| panic!("{opened} cancelled requests and the connection is open"));
    match reason {
        quinn::ConnectionError::ApplicationClosed(close) => {
            assert_eq!(
                close.error_code.into_inner(),
                H3_EXCESSIVE_LOAD,
                "{close:?}"
            )
        }
        other => panic!("closed with {other:?}, not H3_EXCESSIVE_LOAD"),
    }
    assert!(opened < ATTEMPTS, "closed only after all {opened} streams");
    let upstream_requests = seen.load(Ordering::SeqCst);
    assert!(
        upstream_requests <= MIN_STREAMS + MAX_STREAMS + BATCH,
        "{upstream_requests} upstream requests for {opened} cancelled streams"
    );
    // At least some went upstream: what was cut off was the attack the guard is for.
    assert!(upstream_requests > 0);
    assert_eq!(rapid_reset_closes(&wraith).await, 1);
}

/// A client that cancels two in five of its requests before their response (a page left
/// before it loaded), and stops reading half of the others after their response head (a
/// download cancelled, a video seek), over five times the streams the guard needs to judge,
/// keeps its connection and gets every response it waits for. Only cancellations before the
/// response head count, and only half or more of the streams make a connection excessive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_cancels_some_requests_keeps_its_connection() {
    const BATCHES: usize = 65;
    const CANCELLED: usize = 16;
    const ANSWERED: usize = 24;
    let (upstream, seen) = counting_upstream(Duration::from_millis(10), 256 << 10).await;
    // A stream window of a quarter of the body: the gateway cannot have written a response
    // whole when its client stops reading it after the head.
    let mut transport = quinn::TransportConfig::default();
    transport.stream_receive_window(quinn::VarInt::from_u32(64 << 10));
    let (wraith, client) = gateway(&upstream, transport).await;

    for round in 0..BATCHES {
        let mut cancelled = Vec::new();
        for _ in 0..CANCELLED {
            cancelled.push(post_to_cancel(&client).await.expect("stream credit"));
        }
        let mut answered = Vec::new();
        for _ in 0..ANSWERED {
            answered.push(
                client
                    .send(&request_section("GET", "/", &[]), None, true)
                    .await,
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        cancelled.into_iter().for_each(cancel);
        for (i, (_send, mut recv)) in answered.into_iter().enumerate() {
            let status = tokio::time::timeout(WAIT, read_status(&mut recv)).await;
            assert_eq!(
                status,
                Ok(Some(200)),
                "round {round}, request {i}: {:?}",
                client.conn.close_reason()
            );
            if i % 2 == 0 {
                // Stopped after the head, with most of the 256 KiB still to be sent.
                let _ = recv.stop(quinn::VarInt::from_u32(H3_REQUEST_CANCELLED as u32));
            } else {
                let body = tokio::time::timeout(WAIT, recv.read_to_end(1 << 20)).await;
                assert!(
                    matches!(body, Ok(Ok(_))),
                    "round {round}, request {i}: {body:?}"
                );
            }
        }
    }
    assert!(
        client.conn.close_reason().is_none(),
        "{:?}",
        client.conn.close_reason()
    );
    assert_eq!(client.get().await, Some(200));
    assert!(seen.load(Ordering::SeqCst) >= BATCHES * ANSWERED);
    assert_eq!(rapid_reset_closes(&wraith).await, 0);
}
