//! HTTP/3 abuse that costs the upstream, against the real gateway and an upstream that counts
//! the requests it receives: "rapid reset" (request streams opened and cancelled at once,
//! CVE-2023-44487 over QUIC) is cut off per connection (`listener/quic/cancels.rs`), and a
//! client that cancels some of its requests, as browsers do, is never cut; a 0-RTT first
//! flight replayed by someone who recorded it is not served a second time; handshakes that
//! never finish (an Initial flood from forged addresses) hold no more than `retry_threshold`
//! connections, each until `handshake_timeout`, and the rest get a stateless Retry; streams
//! of unknown types are let go of as they come, and a second control stream is an error.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::quic::{
    frame, frame_head, read_status, request_section, Groups, H3Client, HoldingRelay, RawH3,
    H3_REQUEST_CANCELLED, HEADERS, SETTINGS,
};
use common::*;

/// Bound on every wait for the gateway.
const WAIT: Duration = Duration::from_secs(30);
const H3_EXCESSIVE_LOAD: u64 = 0x107;
/// The streams the gateway judges a connection's cancellations over at least (Envoy's
/// number, `listener::resets::MIN_STREAMS`; four times `MAX_STREAMS` is more: 512).
const MIN_STREAMS: usize = 512;
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

[log.json]
path = "access.json"
[log.events]
path = "events.json"
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
/// in 7 s this way and was never closed. Now it is closed with H3_EXCESSIVE_LOAD once more
/// than half of at least 512 streams were cancelled before their response (the rule HTTP/2
/// has), the upstream sees at most those and the streams open at that moment, and the close
/// is recorded, reported and counted as HTTP/2's is.
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
    wraith.assert_closed_connection_recorded("h3", WAIT).await;
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

/// A UDP relay between one client and `target` that keeps a copy of what the client sends
/// while `recording`, and sends it to `target` again (`replay`) from the relay's own address,
/// as an attacker on the path replays a client's first flight.
struct RecordingRelay {
    addr: SocketAddr,
    back: Arc<tokio::net::UdpSocket>,
    recording: Arc<AtomicBool>,
    recorded: Arc<Mutex<Vec<Vec<u8>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl RecordingRelay {
    async fn start(target: SocketAddr) -> RecordingRelay {
        let front = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let back = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
        back.connect(target).await.unwrap();
        let addr = front.local_addr().unwrap();
        let recording = Arc::new(AtomicBool::new(false));
        let recorded: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
        let (b, r, rec) = (back.clone(), recording.clone(), recorded.clone());
        let task = tokio::spawn(async move {
            let mut client = None;
            let (mut up, mut down) = (vec![0u8; 65536], vec![0u8; 65536]);
            loop {
                tokio::select! {
                    got = front.recv_from(&mut up) => {
                        let Ok((n, from)) = got else { break };
                        client = Some(from);
                        if r.load(Ordering::SeqCst) {
                            rec.lock().unwrap().push(up[..n].to_vec());
                        }
                        let _ = b.send(&up[..n]).await;
                    }
                    got = b.recv(&mut down) => {
                        let Ok(n) = got else { break };
                        if let Some(client) = client {
                            let _ = front.send_to(&down[..n], client).await;
                        }
                    }
                }
            }
        });
        RecordingRelay {
            addr,
            back,
            recording,
            recorded,
            task,
        }
    }

    /// Starts keeping what the client sends, forgetting what was kept before.
    fn record(&self) {
        self.recorded.lock().unwrap().clear();
        self.recording.store(true, Ordering::SeqCst);
    }

    /// Stops keeping what the client sends.
    fn stop_recording(&self) {
        self.recording.store(false, Ordering::SeqCst);
    }

    /// Sends everything recorded to the target again, in order.
    async fn replay(&self) {
        let recorded = self.recorded.lock().unwrap().clone();
        for d in recorded {
            self.back.send(&d).await.unwrap();
        }
    }
}

impl Drop for RecordingRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `wraith_tls_handshakes_total` on the https listener whose `result` is `result`, or (with
/// `"!ok"`) anything but `ok`, summed over the other labels.
async fn handshakes(wraith: &Wraith, result: &str) -> u64 {
    let (_, text) = wraith.admin_get("/v1/metrics").await;
    let (negate, result) = match result.strip_prefix('!') {
        Some(r) => (true, r),
        None => (false, result),
    };
    let label = format!("result=\"{result}\"");
    String::from_utf8_lossy(&text)
        .lines()
        .filter(|l| {
            l.starts_with("wraith_tls_handshakes_total{")
                && l.contains("listener=\"https\"")
                && l.contains(&label) != negate
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// 0-RTT replay (RFC 9001 §9.2, RFC 8446 §8): an attacker on the path records a client's
/// first flight, a resumed handshake with an early GET to a route that takes early data, and
/// sends it again once the client's connection is over. The gateway starts a handshake for
/// the copy, but the copy's early request never reaches the upstream: the
/// session it resumes was taken by the original (resumable once), and its address token was
/// spent too. The copy's handshake, which only the real client could finish, times out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_0rtt_first_flight_is_not_served_again() {
    let (upstream, seen) = counting_upstream(Duration::ZERO, 2).await;
    let setup = Setup::new();
    let ca = setup.pki.ca_pem.clone();
    let base = setup.listeners_h3(
        "handshake_timeout = \"2s\"",
        "zero_rtt = true",
        ALLOW_ALL_POLICY,
    );
    let cfg = format!(
        r#"{base}
[[upstream]]
name = "app"
endpoints = ["{}"]

[[route]]
name = "static"
path = {{ prefix = "/static/" }}
upstream = "app"
early_data = true
"#,
        upstream.addr
    );
    let wraith = setup.start(&cfg);
    let relay = RecordingRelay::start(wraith.addr("https")).await;
    let client = H3Client::new(&ca, None, Groups::Default);

    // First visit: a full handshake leaves the client a session ticket and an address token.
    let mut first = client.connect(relay.addr).await.unwrap();
    assert_eq!(first.get("/static/a").await.unwrap().status(), 200);
    first.conn.close(quinn::VarInt::from_u32(0), b"done");

    // Second visit, recorded: the GET goes out as 0-RTT and is served early.
    let (mut conn, accepted) = loop {
        relay.record();
        if let Some(c) = client.connect_0rtt(relay.addr).await {
            break c;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(conn.get("/static/page").await.unwrap().status(), 200);
    assert!(accepted.await, "the server accepted the early data");
    relay.stop_recording();
    conn.conn.close(quinn::VarInt::from_u32(0), b"done");
    assert_eq!(seen.load(Ordering::SeqCst), 2);
    let failed_before = handshakes(&wraith, "!ok").await;

    // The replay, sent again until a handshake for it has ended: while the original
    // connection drains, the gateway takes the copy for late packets of it. Once the copy's
    // handshake is over (timed out: only the real client could finish it), anything early it
    // carried would have been served.
    let over = Wraith::eventually(WAIT, || async {
        relay.replay().await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        handshakes(&wraith, "!ok").await > failed_before
    })
    .await;
    assert!(over, "the replayed handshake never ended");
    assert_eq!(
        seen.load(Ordering::SeqCst),
        2,
        "the replayed early GET reached the upstream"
    );
}

/// The QUIC connections `wraith status` counts on the https listener (handshakes in progress
/// among them: each holds its `max_connections` slot from its first packet).
async fn quic_connections(wraith: &Wraith) -> u64 {
    let status = wraith.status().await;
    status["listeners"]
        .as_array()
        .and_then(|ls| ls.iter().find(|l| l["name"] == "https"))
        .and_then(|l| l["quic_connections"].as_u64())
        .unwrap_or_else(|| panic!("no https quic_connections in {status}"))
}

/// A client whose handshake never finishes: its Initial goes to `target` from a relay that
/// drops every answer, as a flood from forged source addresses looks to the server. The
/// relay counts the Retries sent to it; the client gives up when the task is aborted.
async fn half_open(
    ca: &std::path::Path,
    target: SocketAddr,
) -> (HoldingRelay, tokio::task::JoinHandle<()>) {
    let relay = HoldingRelay::one_way(target, "127.0.0.1".parse().unwrap()).await;
    let client = H3Client::new(ca, None, Groups::Default);
    let addr = relay.addr;
    let task = tokio::spawn(async move {
        let _ = client.connect(addr).await;
    });
    (relay, task)
}

/// An Initial flood (`retry = "under_load"`): the first `retry_threshold` handshakes that never
/// finish are taken on and hold a connection each, but only until `handshake_timeout`; while
/// they are in progress the next client without a token gets a Retry (stateless: it holds
/// nothing, and a forged address never answers it) instead of a connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_that_never_finish_get_retry_past_retry_threshold_and_end_at_handshake_timeout()
{
    const THRESHOLD: u64 = 3;
    let (upstream, _seen) = counting_upstream(Duration::ZERO, 2).await;
    let setup = Setup::new();
    let ca = setup.pki.ca_pem.clone();
    let base = setup.listeners_h3(
        "handshake_timeout = \"3s\"",
        &format!("retry_threshold = {THRESHOLD}"),
        ALLOW_ALL_POLICY,
    );
    let wraith = setup.start(&config(&base, upstream.addr));
    let target = wraith.addr("https");

    let mut taken = Vec::new();
    for i in 1..=THRESHOLD {
        taken.push(half_open(&ca, target).await);
        let held =
            Wraith::eventually(WAIT, || async { quic_connections(&wraith).await == i }).await;
        assert!(held, "half-open handshake {i} not taken on");
    }
    let (flood, flood_task) = half_open(&ca, target).await;
    let retried =
        Wraith::eventually(WAIT, || async { flood.retries.load(Ordering::SeqCst) > 0 }).await;
    assert!(retried, "no Retry with {THRESHOLD} handshakes in progress");
    assert_eq!(quic_connections(&wraith).await, THRESHOLD);
    for (relay, _) in &taken {
        assert_eq!(
            relay.retries.load(Ordering::SeqCst),
            0,
            "a Retry below the threshold"
        );
    }

    // The flood stops. The half-open handshakes, whose clients are still there but never
    // answer, end at handshake_timeout (their clients' retransmitted Initials do not extend it).
    flood_task.abort();
    let timed_out = Wraith::eventually(WAIT, || async {
        handshakes(&wraith, "timeout").await >= THRESHOLD
    })
    .await;
    assert!(timed_out, "half-open handshakes outlived handshake_timeout");
    for (_, task) in &taken {
        task.abort();
    }
    let freed = Wraith::eventually(WAIT, || async { quic_connections(&wraith).await == 0 }).await;
    assert!(freed, "half-open connections kept their slots");
    let ca = wraith.pki().ca_pem.clone();
    let mut client = H3Client::new(&ca, None, Groups::Default)
        .connect(target)
        .await
        .unwrap();
    assert_eq!(client.get("/").await.unwrap().status(), 200);
}

/// Unidirectional streams of a reserved type (RFC 9114 §6.2.3: 0x1f * N + 0x21), each with a
/// KiB on it, far more than the 8 the gateway allows open at once: it stops each as its type
/// arrives and lets it go, so the client's stream credit comes back (were they kept, the 9th
/// could not be opened) and the connection goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unidirectional_streams_of_unknown_types_are_let_go_as_they_come() {
    const STREAMS: usize = 2_000;
    let (upstream, _seen) = counting_upstream(Duration::ZERO, 2).await;
    let (_wraith, client) = gateway(&upstream, quinn::TransportConfig::default()).await;
    // A request first: from its end the connection has idle_timeout, not header_read_timeout.
    assert_eq!(client.get().await, Some(200));
    let mut payload = vec![0x21]; // a reserved stream type
    payload.extend_from_slice(&[0x5a; 1024]);
    for i in 0..STREAMS {
        let mut uni = tokio::time::timeout(WAIT, client.conn.open_uni())
            .await
            .unwrap_or_else(|_| panic!("no credit for unidirectional stream {i}"))
            .unwrap();
        // Stopped by the gateway: a write may fail, which is what it should do.
        let _ = uni.write_all(&payload).await;
        let _ = uni.finish();
    }
    assert_eq!(client.get().await, Some(200));
}

/// Only one control stream per peer (RFC 9114 §6.2.1): a second is a connection error,
/// H3_STREAM_CREATION_ERROR.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_control_stream_closes_the_connection() {
    const H3_STREAM_CREATION_ERROR: u64 = 0x103;
    let (upstream, _seen) = counting_upstream(Duration::ZERO, 2).await;
    let (_wraith, client) = gateway(&upstream, quinn::TransportConfig::default()).await;
    assert_eq!(client.get().await, Some(200));
    let mut second = client.conn.open_uni().await.unwrap();
    let mut head = vec![0x00]; // stream type: control
    head.extend(frame_head(SETTINGS, 0));
    second.write_all(&head).await.unwrap();
    let reason = tokio::time::timeout(WAIT, client.conn.closed())
        .await
        .expect("a second control stream and the connection is open");
    match reason {
        quinn::ConnectionError::ApplicationClosed(close) => assert_eq!(
            close.error_code.into_inner(),
            H3_STREAM_CREATION_ERROR,
            "{close:?}"
        ),
        other => panic!("closed with {other:?}"),
    }
}
