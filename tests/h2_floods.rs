//! HTTP/2 floods against the real gateway over TLS, with a real upstream that counts the
//! requests it receives: what one connection can make the gateway (and its upstreams) do
//! is bounded, and a client that only looks like an attacker (a browser cancelling what it
//! no longer needs) is served as usual. Frames are hand-written (`common::h2frames`).

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::h2frames::*;
use common::*;
use tokio::io::AsyncWriteExt;

/// Bound on every wait.
const WAIT: Duration = Duration::from_secs(10);

/// An upstream that counts the requests it receives; it answers those for `/slow...` after
/// two seconds (a slow application: the request is still in flight when the client resets
/// it), the others at once.
async fn counting_upstream() -> (Upstream, Arc<AtomicUsize>) {
    let count = Arc::new(AtomicUsize::new(0));
    let counted = count.clone();
    let upstream = Upstream::start(move |req| {
        counted.fetch_add(1, Ordering::SeqCst);
        let slow = req.uri().path().starts_with("/slow");
        async move {
            if slow {
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            hyper::Response::new(full("ok"))
        }
    })
    .await;
    (upstream, count)
}

fn config(setup: &Setup, upstream: SocketAddr, extra: &str) -> String {
    format!(
        "{}\n[[upstream]]\nname = \"app\"\nendpoints = [\"{upstream}\"]\n\n\
         [[route]]\nname = \"all\"\nupstream = \"app\"\n{extra}",
        setup.listeners()
    )
}

/// A GET of `/slow` on `https://localhost`, as a header block.
fn get_block() -> Vec<u8> {
    header_block(&[
        (":method", "GET"),
        (":scheme", "https"),
        (":path", "/slow"),
        (":authority", "localhost"),
    ])
}

/// What the server did to an attacking connection.
#[derive(Debug, Default)]
struct Outcome {
    /// The error code of the server's GOAWAY, if it sent one.
    goaway: Option<u32>,
    /// Response heads received.
    heads: usize,
    /// Rounds the client completed (each acknowledged by the server's PING ACK).
    rounds: usize,
}

/// Plays `rounds` rounds of a rapid-reset attack on one TLS connection: each round opens
/// `per_round` streams (HEADERS with END_STREAM); with `held` (the upstream's request
/// count), they are reset in the next round, once the server has taken them (they have
/// reached the upstream: a stream h2 still holds for hyper to accept is one h2's own budget
/// of resets counts), otherwise each is reset (RST_STREAM CANCEL) right behind its HEADERS.
/// A round is answered before the next is sent (the PING ACK), so no write waits on a full
/// socket. Ends early when the server closes the connection.
async fn rapid_reset(
    wraith: &Wraith,
    rounds: usize,
    per_round: u32,
    held_until: Option<&AtomicUsize>,
) -> Outcome {
    let hold = held_until.is_some();
    let tls = h2_raw_tls(wraith).await;
    let (mut rd, mut wr) = tokio::io::split(tls);
    let (acks, mut acked) = tokio::sync::mpsc::unbounded_channel();
    let (settings, mut settings_acks) = tokio::sync::mpsc::unbounded_channel();
    let going_away = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let gone = going_away.clone();
    let reader = tokio::spawn(async move {
        let mut outcome = Outcome::default();
        while let Some((ty, flags, _, payload)) = read_frame(&mut rd).await {
            match ty {
                1 => outcome.heads += 1,
                4 if flags & 1 == 0 => {
                    let _ = settings.send(());
                }
                6 if flags & 1 == 1 => {
                    let _ = acks.send(());
                }
                7 => {
                    outcome.goaway = Some(u32::from_be_bytes(payload[4..8].try_into().unwrap()));
                    gone.store(true, Ordering::SeqCst);
                }
                _ => {}
            }
        }
        gone.store(true, Ordering::SeqCst);
        outcome
    });
    let upstream_before = held_until.map_or(0, |c| c.load(Ordering::SeqCst));
    let block = get_block();
    let mut next = 1u32;
    let mut held: Vec<u32> = Vec::new();
    let mut done = 0;
    for round in 0..rounds {
        let mut out = Vec::new();
        while settings_acks.try_recv().is_ok() {
            out.extend_from_slice(&frame(4, 1, 0, &[]));
        }
        for id in held.drain(..) {
            out.extend_from_slice(&rst_stream(id, 8));
        }
        for _ in 0..per_round {
            out.extend_from_slice(&headers_frames(next, &block));
            if hold {
                held.push(next);
            } else {
                out.extend_from_slice(&rst_stream(next, 8));
            }
            next += 2;
        }
        out.extend_from_slice(&ping((round as u64).to_be_bytes()));
        if wr.write_all(&out).await.is_err() {
            break;
        }
        match tokio::time::timeout(WAIT, acked.recv()).await {
            Ok(Some(())) => done += 1,
            Ok(None) => break,
            Err(_) => panic!("round {round} not acknowledged"),
        }
        if let Some(count) = held_until {
            let opened = (next / 2) as usize;
            let taken = Wraith::eventually(WAIT, || async {
                count.load(Ordering::SeqCst) - upstream_before >= opened
                    || going_away.load(Ordering::SeqCst)
            })
            .await;
            assert!(
                taken,
                "round {round}: its streams did not reach the upstream"
            );
        }
    }
    let _ = wr.shutdown().await;
    drop(wr);
    let mut outcome = tokio::time::timeout(WAIT, reader)
        .await
        .expect("the connection did not end")
        .unwrap();
    outcome.rounds = done;
    outcome
}

async fn refused_total(wraith: &Wraith, reason: &str) -> u64 {
    let (status, metrics) = wraith.admin_get("/v1/metrics").await;
    assert_eq!(status, 200);
    let prefix =
        format!("wraith_connections_refused_total{{listener=\"https\",reason=\"{reason}\"}} ");
    String::from_utf8_lossy(&metrics)
        .lines()
        .find_map(|l| l.strip_prefix(&prefix).map(|n| n.trim().parse().unwrap()))
        .unwrap_or(0)
}

/// CVE-2023-44487 (rapid reset), in the form h2 cannot see: streams are reset only once
/// hyper has taken them (the round after they were opened), so h2's budget of resets
/// pending accept never fills, and each started its request, upstream included. Without a
/// limit, one connection made thousands of upstream requests for two frames each; now the
/// connection is closed with GOAWAY ENHANCE_YOUR_CALM after a few hundred, and that is
/// recorded, reported and counted like h2's own flood closures.
#[tokio::test]
async fn streams_reset_once_taken_cut_the_connection_off() {
    let (upstream, count) = counting_upstream().await;
    let setup = Setup::new();
    let cfg = config(
        &setup,
        upstream.addr,
        "\n[log.json]\npath = \"access.json\"\n[log.events]\npath = \"events.json\"\n",
    );
    let wraith = setup.start(&cfg);
    // 5,000 streams, 50 a round trip.
    let outcome = rapid_reset(&wraith, 100, 50, Some(&count)).await;
    assert_eq!(outcome.goaway, Some(0xb), "{outcome:?}");
    assert!(outcome.rounds < 20, "{outcome:?}");
    // (More than 256 of at least 512 streams reset: the limit with 128 concurrent
    // streams, and those opened before the GOAWAY was read.)
    tokio::time::sleep(Duration::from_millis(300)).await;
    let requests = count.load(Ordering::SeqCst);
    assert!(
        requests <= 600,
        "{requests} upstream requests from one connection"
    );
    assert_eq!(refused_total(&wraith, "h2_rapid_reset").await, 1);
    wraith.assert_closed_connection_recorded("h2", WAIT).await;
    // The gateway still serves, a new connection from the same client included.
    let mut h2 = h2_connect(&wraith).await;
    let req = http::Request::get(format!(
        "https://localhost:{}/",
        wraith.addr("https").port()
    ))
    .body(())
    .unwrap();
    let (resp, _) = h2.send_request(req, true).unwrap();
    let resp = tokio::time::timeout(WAIT, resp).await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);
}

/// The classic form, each HEADERS followed at once by its RST_STREAM. Two streams a round
/// trip stay far below h2's budget of resets pending accept (100), so h2 never closes the
/// connection; each stream still ran the pipeline (routing, policy) before hyper saw the
/// reset. The premature-reset limit closes it. With 50 a round trip, h2's budget or the
/// limit closes it, whichever comes first: either way few upstream requests.
#[tokio::test]
async fn streams_reset_at_once_cut_the_connection_off() {
    let (upstream, count) = counting_upstream().await;
    let setup = Setup::new();
    let cfg = config(&setup, upstream.addr, "");
    let wraith = setup.start(&cfg);
    // 800 streams, 2 a round trip.
    let outcome = rapid_reset(&wraith, 400, 2, None).await;
    assert_eq!(outcome.goaway, Some(0xb), "{outcome:?}");
    assert!(outcome.rounds < 200, "{outcome:?}");
    assert_eq!(refused_total(&wraith, "h2_rapid_reset").await, 1);

    let outcome = rapid_reset(&wraith, 100, 50, None).await;
    assert_eq!(outcome.goaway, Some(0xb), "{outcome:?}");
    assert!(outcome.rounds < 20, "{outcome:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let requests = count.load(Ordering::SeqCst);
    assert!(
        requests <= 1200,
        "{requests} upstream requests from two connections"
    );
}

/// A browser leaving pages before they have loaded: it cancels every stream it has open
/// (128, the concurrency the gateway grants), twice, between page loads that complete.
/// That is a lot of premature resets, and the connection is never cut for them.
#[tokio::test]
async fn a_client_cancelling_what_it_no_longer_needs_is_never_cut() {
    let (upstream, count) = counting_upstream().await;
    let setup = Setup::new();
    let cfg = config(&setup, upstream.addr, "");
    let wraith = setup.start(&cfg);
    let mut h2 = h2_connect(&wraith).await;
    let port = wraith.addr("https").port();
    let get = |path: String| {
        http::Request::get(format!("https://localhost:{port}{path}"))
            .body(())
            .unwrap()
    };
    for page in 0..3 {
        // The page itself loads.
        let (resp, _) = h2.send_request(get(format!("/page{page}")), true).unwrap();
        let resp = tokio::time::timeout(WAIT, resp).await.unwrap().unwrap();
        assert_eq!(resp.status(), 200, "page {page}");
        h2 = h2.ready().await.unwrap();
        if page == 2 {
            break;
        }
        // Its slow resources, every stream the connection may have open...
        let before = count.load(Ordering::SeqCst);
        let mut pending = Vec::new();
        for i in 0..128 {
            h2 = h2.ready().await.unwrap();
            let (resp, _) = h2
                .send_request(get(format!("/slow/{page}/{i}")), true)
                .unwrap();
            pending.push(resp);
        }
        // ...all of them on their way upstream, then cancelled as the user moves on.
        let started = Wraith::eventually(WAIT, || async {
            count.load(Ordering::SeqCst) >= before + 128
        })
        .await;
        assert!(started, "the resources did not reach the upstream");
        drop(pending);
    }
    // And the next page loads in full on the same connection.
    let mut pending = Vec::new();
    for i in 0..50 {
        h2 = h2.ready().await.unwrap();
        let (resp, _) = h2.send_request(get(format!("/asset/{i}")), true).unwrap();
        pending.push(resp);
    }
    for resp in pending {
        let resp = tokio::time::timeout(WAIT, resp)
            .await
            .unwrap()
            .expect("the connection was cut");
        assert_eq!(resp.status(), 200);
    }
    assert_eq!(refused_total(&wraith, "h2_rapid_reset").await, 0);
}

/// Sends a HEADERS frame for stream 1 without END_HEADERS, then `frames` CONTINUATION
/// frames of `size` bytes, none with END_HEADERS, while reading what the server sends:
/// the error code and last stream id of its GOAWAY, and how many upstream requests it
/// made.
async fn continuation_flood(frames: usize, size: usize) -> (Option<(u32, u32)>, usize) {
    let (upstream, count) = counting_upstream().await;
    let setup = Setup::new();
    let cfg = config(&setup, upstream.addr, "");
    let wraith = setup.start(&cfg);
    let tls = h2_raw_tls(&wraith).await;
    let (mut rd, mut wr) = tokio::io::split(tls);
    let reader = tokio::spawn(async move {
        while let Some((ty, _, _, payload)) = read_frame(&mut rd).await {
            if ty == 7 {
                let last = u32::from_be_bytes(payload[..4].try_into().unwrap());
                let code = u32::from_be_bytes(payload[4..8].try_into().unwrap());
                return Some((code, last));
            }
        }
        None
    });
    // The request's fields, then a field whose 16 MiB value never ends.
    let mut block = get_block();
    block.push(0x10);
    hpack_string(b"x-endless", &mut block);
    block.extend_from_slice(&[0x7f, 0x81, 0xff, 0xff, 0x07]);
    let writer = tokio::spawn(async move {
        wr.write_all(&frame(1, 0x1, 1, &block)).await?;
        let chunk = frame(9, 0, 1, &vec![b'a'; size]);
        for _ in 0..frames {
            wr.write_all(&chunk).await?;
        }
        std::io::Result::Ok(())
    });
    let goaway = tokio::time::timeout(WAIT, reader)
        .await
        .expect("no GOAWAY, and the connection did not end")
        .unwrap();
    writer.abort();
    tokio::time::sleep(Duration::from_millis(200)).await;
    (goaway, count.load(Ordering::SeqCst))
}

/// CVE-2024-27316 class: a header block that never ends, in full-size CONTINUATION frames
/// (16 MiB of them offered). h2 counts the CONTINUATION frames of a block against what
/// `max_header_size` needs (64 KiB: 5 frames of 16 KiB, `calc_max_continuation_frames`) and
/// closes the connection with ENHANCE_YOUR_CALM past that; no request is made.
#[tokio::test]
async fn a_header_block_that_never_ends_is_cut_off() {
    let (goaway, requests) = continuation_flood(1024, 16 << 10).await;
    assert_eq!(
        goaway,
        Some((0xb, 0)),
        "GOAWAY ENHANCE_YOUR_CALM, no stream taken"
    );
    assert_eq!(requests, 0);
}

/// The same in tiny CONTINUATION frames (one byte each, 100,000 offered): the count is of
/// frames, not bytes, so the connection is closed just as early.
#[tokio::test]
async fn a_header_block_in_endless_tiny_frames_is_cut_off() {
    let (goaway, requests) = continuation_flood(100_000, 1).await;
    assert_eq!(
        goaway,
        Some((0xb, 0)),
        "GOAWAY ENHANCE_YOUR_CALM, no stream taken"
    );
    assert_eq!(requests, 0);
}
