//! HTTP/3 framing a well-behaved client never sends, against the real gateway (the h3 fixes
//! in vendor/h3/VENDORED.md): frames declaring more than the gateway accepts are refused from
//! their length, unknown frames are dropped as they arrive, and an empty DATA frame inside a
//! body is just that. A raw QUIC client writes the frames byte by byte; the gateway's resident
//! memory shows that none of the flood was kept.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::quic::frame;
use common::quic::{
    frame_head, read_status, request_section, stream_end, tls_client_with, Groups, H3Client, RawH3,
    StreamEnd, H3_NO_ERROR, H3_REQUEST_CANCELLED, HEADERS, SETTINGS,
};
use common::*;

/// How much the gateway's RSS may grow while a flood goes by: QUIC's receive buffers (a 4 MiB
/// connection window, measured at 4-6 MiB) and allocator slack; well below the 16 and 64 MiB
/// floods, which h3 0.0.8 kept whole (measured +29 and +81 MiB).
const RSS_SLACK_MIB: u64 = 12;
/// Bound on every wait for the gateway.
const WAIT: Duration = Duration::from_secs(30);

/// A reserved frame type (0x1f * N + 0x21): carries no meaning, must be ignored.
const RESERVED: u64 = 0x21;
const H3_EXCESSIVE_LOAD: u64 = 0x107;
const H3_FRAME_ERROR: u64 = 0x106;
/// The largest varint, the length an attacker declares to stream "forever".
const VARINT_MAX: u64 = (1 << 62) - 1;

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

/// A gateway with HTTP/3 in front of the echo upstream (default limits: 64 KiB headers).
async fn gateway() -> (Wraith, Upstream) {
    let upstream = Upstream::echo().await;
    let setup = Setup::new();
    let cfg = config(&setup.listeners_h3("", "", ALLOW_ALL_POLICY), upstream.addr);
    (setup.start(&cfg), upstream)
}

/// Writes `total` bytes of filler to `send`, 64 KiB at a time.
async fn flood(send: &mut quinn::SendStream, total: usize) -> Result<(), quinn::WriteError> {
    let chunk = vec![0x5a; 64 << 10];
    for _ in 0..total / chunk.len() {
        send.write_all(&chunk).await?;
    }
    Ok(())
}

/// Asserts that a connection was closed with H3_EXCESSIVE_LOAD.
fn assert_excessive_load(err: quinn::ConnectionError) {
    match err {
        quinn::ConnectionError::ApplicationClosed(close) => {
            assert_eq!(
                close.error_code.into_inner(),
                H3_EXCESSIVE_LOAD,
                "{close:?}"
            );
        }
        other => panic!("closed with {other:?}, not H3_EXCESSIVE_LOAD"),
    }
}

/// The gateway's RSS growth since `before_kib`, in MiB.
fn grown_mib(wraith: &Wraith, before_kib: u64) -> u64 {
    wraith.rss_kib().saturating_sub(before_kib) / 1024
}

/// The gateway, and a raw client connected to it that has opened its control stream and
/// been served one request.
async fn served() -> (Wraith, Upstream, RawH3) {
    let (wraith, upstream) = gateway().await;
    let ca = wraith.pki().ca_pem.clone();
    let mut client = RawH3::connect(&ca, wraith.addr("https")).await;
    client.open_control().await;
    assert_eq!(client.get().await, Some(200));
    (wraith, upstream, client)
}

// ---------------------------------------------------------------------------------------------
// Tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_reserved_frame_on_the_control_stream_is_dropped_as_it_arrives() {
    // A request first: from its end the connection has idle_timeout, not header_read_timeout.
    let (wraith, _upstream, mut client) = served().await;

    // SETTINGS was sent; now a reserved frame that declares 2^62-1 bytes, and 64 MiB of it.
    let rss_before = wraith.rss_kib();
    let control = client.control.as_mut().unwrap();
    control
        .write_all(&frame_head(RESERVED, VARINT_MAX))
        .await
        .unwrap();
    // The gateway keeps reading (else flow control would stall this write) and keeps none.
    tokio::time::timeout(Duration::from_secs(120), flood(control, 64 << 20))
        .await
        .expect("the gateway stopped reading the control stream")
        .unwrap();
    let grown = grown_mib(&wraith, rss_before);
    assert!(grown < RSS_SLACK_MIB, "gateway RSS grew by {grown} MiB");

    // An unknown frame has no meaning (RFC 9114 §9): the connection goes on serving.
    assert_eq!(client.get().await, Some(200));
    assert!(client.conn.close_reason().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_frame_declaring_a_gigabyte_closes_the_connection_with_excessive_load() {
    let (wraith, _upstream) = gateway().await;
    let ca = wraith.pki().ca_pem.clone();
    let client = RawH3::connect(&ca, wraith.addr("https")).await;

    // The first frame on the control stream: a SETTINGS frame declaring 1 GiB.
    let mut control = client.conn.open_uni().await.unwrap();
    let mut head = vec![0x00];
    head.extend(frame_head(SETTINGS, 1 << 30));
    control.write_all(&head).await.unwrap();
    let rss_before = wraith.rss_kib();
    let sending = async {
        let _ = flood(&mut control, 16 << 20).await;
    };
    let closed = async {
        tokio::select! {
            e = client.conn.closed() => e,
            // A flood that completed means nobody stopped it: wait for the close anyway.
            () = sending => client.conn.closed().await,
        }
    };
    let err = tokio::time::timeout(WAIT, closed)
        .await
        .expect("the connection was not closed");
    assert_excessive_load(err);
    let grown = grown_mib(&wraith, rss_before);
    assert!(grown < RSS_SLACK_MIB, "gateway RSS grew by {grown} MiB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_headers_declared_over_max_header_size_get_431_unread() {
    // A first request, so the baseline holds what any served connection holds.
    let (wraith, _upstream, client) = served().await;
    let rss_before = wraith.rss_kib();

    // A HEADERS frame declaring 1 GiB (max_header_size is 64 KiB), then 16 MiB of it.
    let (mut send, mut recv) = client.conn.open_bi().await.unwrap();
    send.write_all(&frame_head(HEADERS, 1 << 30)).await.unwrap();
    let sent = tokio::time::timeout(WAIT, flood(&mut send, 16 << 20))
        .await
        .expect("the gateway neither read nor stopped the request stream");
    // Refused from its length: the rest is not wanted (STOP_SENDING, H3_NO_ERROR)...
    match sent {
        Err(quinn::WriteError::Stopped(code)) => assert_eq!(code.into_inner(), H3_NO_ERROR),
        other => panic!("request stream not stopped: {other:?}"),
    }
    // ... and answered as a head that decodes too large would be.
    let status = tokio::time::timeout(WAIT, read_status(&mut recv)).await;
    assert_eq!(status, Ok(Some(431)));
    let grown = grown_mib(&wraith, rss_before);
    assert!(grown < RSS_SLACK_MIB, "gateway RSS grew by {grown} MiB");

    // A request-level refusal: the connection serves the next request.
    assert_eq!(client.get().await, Some(200));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_16_mib_reserved_frame_before_the_request_head_is_skipped_unkept() {
    // A first request, so the baseline holds what any served connection holds.
    let (wraith, _upstream, client) = served().await;
    let rss_before = wraith.rss_kib();

    // Legal (RFC 9114 §9: unknown frames may come anywhere), and h3 0.0.8 kept it whole.
    const SIZE: usize = 16 << 20;
    let (mut send, mut recv) = client.conn.open_bi().await.unwrap();
    send.write_all(&frame_head(RESERVED, SIZE as u64))
        .await
        .unwrap();
    tokio::time::timeout(WAIT, flood(&mut send, SIZE))
        .await
        .expect("the gateway stopped reading the request stream")
        .unwrap();
    let section = request_section("GET", "/", &[]);
    let mut head = frame_head(HEADERS, section.len() as u64);
    head.extend(section);
    send.write_all(&head).await.unwrap();
    send.finish().unwrap();

    let status = tokio::time::timeout(WAIT, read_status(&mut recv)).await;
    assert_eq!(status, Ok(Some(200)));
    let grown = grown_mib(&wraith, rss_before);
    assert!(grown < RSS_SLACK_MIB, "gateway RSS grew by {grown} MiB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_data_frames_inside_a_body_do_not_end_it() {
    let (wraith, _upstream) = gateway().await;
    let client = H3Client::new(&wraith.pki().ca_pem, None, Groups::Default);
    let mut conn = client.connect(wraith.addr("https")).await.unwrap();

    // h3's send_data writes an empty chunk as a DATA frame of length 0 (RFC 9114 §7.2.1).
    let mut chunks = [&b"hello "[..], b"", b"", b"world", b""]
        .into_iter()
        .map(Bytes::from_static);
    let req = http::Request::post("https://localhost/upload")
        .body(())
        .unwrap();
    let resp = conn.request_streamed(req, || chunks.next()).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.json()["body_len"], 11);

    // The connection is intact: the next request works.
    assert_eq!(conn.get("/after").await.unwrap().status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_head_not_complete_within_header_read_timeout_is_reset_as_incomplete() {
    const H3_REQUEST_INCOMPLETE: u64 = 0x10d;
    let upstream = Upstream::echo().await;
    let setup = Setup::new();
    let base = setup.listeners_h3("", "", ALLOW_ALL_POLICY).replacen(
        "http3 = true",
        "http3 = true\nlimits = { header_read_timeout = \"1s\" }",
        1,
    );
    let wraith = setup.start(&config(&base, upstream.addr));
    let ca = wraith.pki().ca_pem.clone();
    let mut client = RawH3::connect(&ca, wraith.addr("https")).await;
    client.open_control().await;
    // A HEADERS frame that never completes.
    let (mut send, mut recv) = client.conn.open_bi().await.unwrap();
    send.write_all(&frame_head(HEADERS, 100)).await.unwrap();
    send.write_all(&[0u8; 10]).await.unwrap();
    // Told that no response is coming, rather than a stream that ends with nothing on it.
    let mut buf = [0u8; 16];
    match tokio::time::timeout(WAIT, recv.read(&mut buf)).await {
        Ok(Err(quinn::ReadError::Reset(code))) => {
            assert_eq!(code.into_inner(), H3_REQUEST_INCOMPLETE)
        }
        other => panic!("not reset as incomplete: {other:?}"),
    }
    // A request-level refusal: the connection serves the next request.
    assert_eq!(client.get().await, Some(200));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_the_client_reads_none_of_is_given_up_after_idle_timeout() {
    let upstream =
        Upstream::start(|_req| async { hyper::Response::new(full(vec![b'x'; 8 << 20])) }).await;
    let setup = Setup::new();
    let base = setup.listeners_h3("", "", ALLOW_ALL_POLICY).replace(
        "http3 = true",
        "http3 = true\nlimits = { idle_timeout = \"2s\" }",
    );
    assert!(base.contains("idle_timeout = \"2s\""), "{base}");
    let wraith = setup.start(&config(&base, upstream.addr));
    let ca = wraith.pki().ca_pem.clone();

    // A client that keeps its connection alive (PINGs) but reads none of the response: its
    // stream window stays shut once the first part has come.
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut tls = tls_client_with(&ca, None, provider);
    tls.alpn_protocols = vec![b"h3".to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(Duration::from_millis(300)));
    let mut client_config = quinn::ClientConfig::new(Arc::new(crypto));
    client_config.transport_config(Arc::new(transport));
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let conn = endpoint
        .connect_with(client_config, wraith.addr("https"), "localhost")
        .unwrap()
        .await
        .unwrap();
    let mut control = conn.open_uni().await.unwrap();
    let mut head = vec![0x00];
    head.extend(frame_head(SETTINGS, 0));
    control.write_all(&head).await.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let section = request_section("GET", "/", &[]);
    let mut frame = frame_head(HEADERS, section.len() as u64);
    frame.extend(section);
    send.write_all(&frame).await.unwrap();
    send.finish().unwrap();

    tokio::time::sleep(Duration::from_secs(6)).await;
    // Reading now: what was sent, then the reset (or, once the connection has had no
    // request for idle_timeout since, its close), never the whole 8 MiB.
    let read = tokio::time::timeout(Duration::from_secs(20), recv.read_to_end(16 << 20))
        .await
        .expect("the stream ended");
    assert!(
        read.is_err(),
        "the response came whole: {} bytes",
        read.map(|b| b.len()).unwrap_or(0)
    );
    drop(control);
}

/// Says when it is dropped: an upstream body's stream carries one, so the test learns when
/// the gateway let go of the upstream response (and of its connection).
struct Released(Option<tokio::sync::oneshot::Sender<()>>);

impl Drop for Released {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_head_the_client_grants_no_credit_for_is_given_up_after_idle_timeout() {
    // The upstream answers with a head of 8 KiB and a body that never ends; it is told when
    // the gateway drops that body.
    let (released_tx, released) = tokio::sync::oneshot::channel();
    let released_tx = std::sync::Mutex::new(Some(released_tx));
    let upstream = Upstream::start(move |_req| {
        let guard = Released(released_tx.lock().unwrap().take());
        async move {
            use futures_util::StreamExt;
            let never = futures_util::stream::pending::<
                Result<hyper::body::Frame<Bytes>, Box<dyn std::error::Error + Send + Sync>>,
            >()
            .map(move |frame| {
                let _ = &guard;
                frame
            });
            hyper::Response::builder()
                .header("x-large", "x".repeat(8 << 10))
                .body(http_body_util::BodyExt::boxed(
                    http_body_util::StreamBody::new(never),
                ))
                .unwrap()
        }
    })
    .await;
    let setup = Setup::new();
    let base = setup.listeners_h3("", "", ALLOW_ALL_POLICY).replace(
        "http3 = true",
        "http3 = true\nlimits = { idle_timeout = \"1s\" }",
    );
    let cfg = format!(
        "{}\n[log.json]\npath = \"access.json\"\n",
        config(&base, upstream.addr)
    );
    // (Debug lines from Wraith: if the head is not given up on, the log says what happened.)
    let wraith = setup.start_with_env(&cfg, &[("WRAITH_LOG", "info,wraith=debug".as_ref())]);
    let ca = wraith.pki().ca_pem.clone();

    // In HTTP/3 the response head is stream data: a client that grants a stream 512 bytes
    // and never more (it reads nothing) lets the gateway's SETTINGS through, but not an
    // 8 KiB HEADERS frame. It PINGs, so the connection stays up, and its request is in
    // flight, so the connection's idle check leaves it alone.
    let mut transport = quinn::TransportConfig::default();
    transport.stream_receive_window(quinn::VarInt::from_u32(512));
    transport.keep_alive_interval(Some(Duration::from_millis(200)));
    let mut client = RawH3::connect_with(&ca, wraith.addr("https"), transport).await;
    client.open_control().await;
    let (_send, mut recv) = client
        .send(&request_section("GET", "/", &[]), None, true)
        .await;

    // The head waits idle_timeout for credit, then the gateway gives up: the upstream
    // response (and its connection) is let go of...
    tokio::time::timeout(Duration::from_secs(15), released)
        .await
        .unwrap_or_else(|_| {
            panic!(
                "the gateway still holds the upstream response (client: {:?}):\n{}",
                client.conn.close_reason(),
                wraith.log()
            )
        })
        .unwrap();
    // ... the request is logged as cut short ...
    let record = wraith
        .wait_json_line("access.json", Duration::from_secs(10), |_| true)
        .await
        .expect("no access record");
    assert_eq!(record["protocol"], "h3", "{record}");
    assert_eq!(record["status"], 200, "{record}");
    assert_eq!(record["aborted"], true, "{record}");
    // ... and the client is told its response was cancelled, not sent a stream that ends.
    let end = tokio::time::timeout(WAIT, stream_end(&mut recv)).await;
    assert_eq!(end, Ok(StreamEnd::Reset(H3_REQUEST_CANCELLED)));
    assert!(
        client.conn.stats().frame_tx.ping > 0,
        "the client sent PINGs"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_qpack_encoder_stream_is_read_as_it_arrives_and_an_insert_closes_the_connection() {
    const QPACK_ENCODER_STREAM_ERROR: u64 = 0x201;
    let (wraith, _upstream, client) = served().await;
    let rss_before = wraith.rss_kib();

    // The client's QPACK encoder stream (type 0x02), with 8 MiB of Set Dynamic Table
    // Capacity 0 (the byte 0x20): legal, and meaningless to a server without a table. The
    // gateway reads and drops it; unread, the write would stall once the stream's 1 MiB
    // window was full, and that megabyte would stay buffered for the connection's life.
    let mut encoder = client.conn.open_uni().await.unwrap();
    encoder.write_all(&[0x02]).await.unwrap();
    let chunk = vec![0x20u8; 64 << 10];
    tokio::time::timeout(WAIT, async {
        for _ in 0..128 {
            encoder.write_all(&chunk).await.unwrap();
        }
    })
    .await
    .expect("the gateway does not read the QPACK encoder stream");
    let grown = grown_mib(&wraith, rss_before);
    assert!(grown < RSS_SLACK_MIB, "gateway RSS grew by {grown} MiB");
    assert_eq!(client.get().await, Some(200));

    // An Insert With Name Reference: with a dynamic table of capacity 0 there is nothing to
    // insert into (RFC 9204 §4.3.2), a connection error.
    encoder.write_all(&[0xc0 | 17, 0x00]).await.unwrap();
    let reason = tokio::time::timeout(WAIT, client.conn.closed())
        .await
        .expect("the connection was not closed");
    match reason {
        quinn::ConnectionError::ApplicationClosed(close) => assert_eq!(
            close.error_code.into_inner(),
            QPACK_ENCODER_STREAM_ERROR,
            "{close:?}"
        ),
        other => panic!("closed with {other:?}, not QPACK_ENCODER_STREAM_ERROR"),
    }
}

/// Heads RFC 9114 calls malformed (§4.1.2, §4.2, §4.3) are refused as HTTP/2 refuses them
/// (a stream error, H3_MESSAGE_ERROR), never forwarded: a pseudo-header twice, `:status` in a
/// request, a pseudo-header after a regular field, connection-specific fields, `te` other
/// than `trailers`. h3 0.0.8 took the last of two pseudo-headers and let the rest through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_heads_are_refused_not_forwarded() {
    use common::quic::H3_MESSAGE_ERROR;
    let (_wraith, _upstream, client) = served().await;
    let cases: [&[(&str, &str)]; 8] = [
        &[(":path", "/other")],
        &[(":method", "POST")],
        &[(":status", "200")],
        &[("x-a", "1"), (":protocol", "websocket")],
        &[("connection", "close")],
        &[("keep-alive", "timeout=5")],
        &[("transfer-encoding", "chunked")],
        &[("te", "gzip")],
    ];
    for headers in cases {
        let (_send, mut recv) = client
            .send(&request_section("GET", "/malformed", headers), None, true)
            .await;
        let end = tokio::time::timeout(WAIT, stream_end(&mut recv)).await;
        assert!(
            matches!(end, Ok(StreamEnd::Reset(code)) if code == H3_MESSAGE_ERROR),
            "{headers:?}: {end:?}"
        );
    }
    // `te: trailers` is the one `te` allowed; the connection still serves.
    let (_send, mut recv) = client
        .send(
            &request_section("GET", "/", &[("te", "trailers")]),
            None,
            true,
        )
        .await;
    assert_eq!(read_status(&mut recv).await, Some(200));
}

/// A field value beginning or ending with whitespace is malformed in HTTP/3 too (RFC 9114
/// §4.2, RFC 9113 §8.2.1): answered 400 by the gateway (the echo upstream answers only 200),
/// so a policy never judges " admin" while an HTTP/1.1 upstream reads "admin".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn field_values_padded_with_whitespace_are_refused() {
    let (_wraith, _upstream, client) = served().await;
    for value in [" admin", "admin ", "\tadmin", "admin\t"] {
        let (_send, mut recv) = client
            .send(
                &request_section("GET", "/padded", &[("x-role", value)]),
                None,
                true,
            )
            .await;
        assert_eq!(read_status(&mut recv).await, Some(400), "{value:?}");
    }
    let (_send, mut recv) = client
        .send(
            &request_section("GET", "/inner", &[("x-role", "site admin")]),
            None,
            true,
        )
        .await;
    assert_eq!(read_status(&mut recv).await, Some(200));
}

/// A head of more fields than an `http::HeaderMap` holds (24,576) is answered 431, as HTTP/2
/// answers it: h3 0.0.8 panicked building the map, so with a `max_header_size` from about
/// 800 KiB (30,000 empty fields decode to 990,000 bytes) a client could panic request tasks
/// at will, each with a backtrace in the log, and got no answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_of_more_fields_than_a_header_map_holds_gets_431() {
    let upstream = Upstream::echo().await;
    let setup = Setup::new();
    let listeners = setup.listeners_h3("", "", ALLOW_ALL_POLICY).replace(
        "http3 = true",
        "http3 = true\nlimits = { max_header_size = \"2MiB\", max_headers = 10000 }",
    );
    let wraith = setup.start(&config(&listeners, upstream.addr));
    let mut client = RawH3::connect(&wraith.pki().ca_pem, wraith.addr("https")).await;
    client.open_control().await;

    let fields = vec![("a", ""); 30_000];
    let (_send, mut recv) = client
        .send(&request_section("GET", "/many", &fields), None, true)
        .await;
    let status = tokio::time::timeout(WAIT, read_status(&mut recv)).await;
    assert_eq!(status, Ok(Some(431)));
    // A request-level refusal: the connection serves the next request.
    assert_eq!(client.get().await, Some(200));
    assert!(!wraith.log().contains("panicked"), "{}", wraith.log());
}

/// A Huffman-coded string ends in at most 7 bits of padding, all ones (RFC 7541 §5.2, which
/// QPACK takes over): anything else is a decoding error, QPACK_DECOMPRESSION_FAILED for the
/// connection (RFC 9204 §2.2). h3 0.0.8 took any run of ones past the last symbol (whole
/// bytes of 0xff), and the first bits of a longer code cut off by the end, for padding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huffman_strings_with_more_than_seven_bits_of_padding_are_refused() {
    const QPACK_DECOMPRESSION_FAILED: u64 = 0x200;
    let (wraith, _upstream) = gateway().await;
    let ca = wraith.pki().ca_pem.clone();
    // `x-h` with a Huffman-coded value: 'a' is 00011, so 0x1f is "a" and 3 bits of padding.
    let section = |value: &[u8]| {
        let mut s = request_section("GET", "/huffman", &[]);
        s.extend([0x23, b'x', b'-', b'h', 0x80 | value.len() as u8]);
        s.extend_from_slice(value);
        s
    };
    let mut client = RawH3::connect(&ca, wraith.addr("https")).await;
    client.open_control().await;
    let (_send, mut recv) = client.send(&section(&[0x1f]), None, true).await;
    assert_eq!(read_status(&mut recv).await, Some(200));

    // 11 bits of padding; 8 bits that are not all ones, the start of a longer code.
    for value in [&[0x1f, 0xff][..], &[0x1f, 0xfe], &[0x1f, 0xff, 0xff, 0xff]] {
        let mut client = RawH3::connect(&ca, wraith.addr("https")).await;
        client.open_control().await;
        let (_send, _recv) = client.send(&section(value), None, true).await;
        let err = tokio::time::timeout(WAIT, client.conn.closed())
            .await
            .expect("the connection was not closed");
        match err {
            quinn::ConnectionError::ApplicationClosed(close) => assert_eq!(
                close.error_code.into_inner(),
                QPACK_DECOMPRESSION_FAILED,
                "{value:x?}: {close:?}"
            ),
            other => panic!("{value:x?}: closed with {other:?}"),
        }
    }
}

/// A request whose connection dies of the next frame on its stream (a GOAWAY there is a
/// connection error) still gets its one record, as a client abort, and is not forwarded.
/// The request used to lose a random race against the connection's close (no record in
/// 10-25 % of runs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_connection_dies_at_once_is_recorded() {
    use common::quic::GOAWAY;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let forwarded = Arc::new(AtomicUsize::new(0));
    let count = forwarded.clone();
    let upstream = Upstream::start(move |_req| {
        count.fetch_add(1, Ordering::Relaxed);
        async { hyper::Response::new(full("ok")) }
    })
    .await;
    let setup = Setup::new();
    let base = setup.listeners_h3("", "", ALLOW_ALL_POLICY);
    let cfg = format!(
        "{}\n[log.json]\npath = \"access.json\"\n",
        config(&base, upstream.addr)
    );
    let wraith = setup.start(&cfg);
    let ca = wraith.pki().ca_pem.clone();
    const RUNS: usize = 20;
    for i in 0..RUNS {
        let mut client = RawH3::connect(&ca, wraith.addr("https")).await;
        client.open_control().await;
        let (mut send, _recv) = client.conn.open_bi().await.unwrap();
        let mut bytes = frame(HEADERS, &request_section("GET", &format!("/gone-{i}"), &[]));
        bytes.extend(frame(GOAWAY, &[0]));
        let _ = send.write_all(&bytes).await;
        let _ = tokio::time::timeout(WAIT, client.conn.closed()).await;
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    let records = loop {
        let records: Vec<serde_json::Value> = wraith
            .json_lines("access.json")
            .into_iter()
            .filter(|r| r["path"].as_str().is_some_and(|p| p.starts_with("/gone-")))
            .collect();
        if records.len() >= RUNS || tokio::time::Instant::now() > deadline {
            break records;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(records.len(), RUNS, "{records:?}");
    for r in &records {
        assert_eq!(r["status"], 499, "{r}");
    }
    assert_eq!(
        forwarded.load(Ordering::Relaxed),
        0,
        "a request of a closed connection went upstream"
    );
}

/// A request body made of empty DATA frames (legal one by one, worthless by the thousand)
/// closes the connection with H3_EXCESSIVE_LOAD past 1,024 of them on one stream; a few
/// among real data are just that (`empty_data_frames_inside_a_body_do_not_end_it`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_empty_data_frames_closes_the_connection_with_excessive_load() {
    use common::quic::DATA;
    let (_wraith, _upstream, client) = served().await;
    let (mut send, _recv) = client.conn.open_bi().await.unwrap();
    let mut bytes = frame(HEADERS, &request_section("POST", "/upload", &[]));
    for _ in 0..5_000 {
        bytes.extend(frame(DATA, &[]));
    }
    let _ = send.write_all(&bytes).await;
    let err = tokio::time::timeout(WAIT, client.conn.closed())
        .await
        .expect("the connection was not closed");
    assert_excessive_load(err);
}

/// A DATA frame cut short by the end of its stream is a truncated body (RFC 9114 §7.1,
/// H3_FRAME_ERROR), also when its last bytes came in a packet before the end: h3 0.0.8 ended
/// such a body cleanly, and the upstream took the bytes that came as the whole body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_frame_the_stream_ends_inside_of_is_no_complete_body() {
    use common::quic::DATA;
    let (_wraith, _upstream, client) = served().await;
    let (mut send, mut recv) = client.conn.open_bi().await.unwrap();
    let mut bytes = frame(HEADERS, &request_section("POST", "/upload", &[]));
    bytes.extend(frame_head(DATA, 10));
    bytes.extend_from_slice(b"abc");
    send.write_all(&bytes).await.unwrap();
    // The end of the stream in a packet of its own, once the gateway has read the rest.
    tokio::time::sleep(Duration::from_millis(300)).await;
    send.finish().unwrap();
    let status = tokio::time::timeout(WAIT, read_status(&mut recv)).await;
    assert_ne!(
        status,
        Ok(Some(200)),
        "a truncated body was forwarded as complete"
    );
    let err = tokio::time::timeout(WAIT, client.conn.closed())
        .await
        .expect("the connection was not closed");
    match err {
        quinn::ConnectionError::ApplicationClosed(close) => {
            assert_eq!(close.error_code.into_inner(), H3_FRAME_ERROR, "{close:?}");
        }
        other => panic!("closed with {other:?}, not H3_FRAME_ERROR"),
    }
}

/// Sends a POST whose body is `FRAMES` DATA frames of one byte, all in one write, and
/// returns the echo's JSON (the upstream counts the data frames its HTTP library made of the
/// body: one per chunk of HTTP/1.1, one per DATA frame of HTTP/2).
async fn post_in_one_byte_frames(client: &RawH3) -> serde_json::Value {
    use common::quic::{varint, DATA};
    let (mut send, mut recv) = client.conn.open_bi().await.unwrap();
    let mut bytes = frame(HEADERS, &request_section("POST", "/upload", &[]));
    for _ in 0..FRAMES {
        bytes.extend(frame(DATA, b"x"));
    }
    send.write_all(&bytes).await.unwrap();
    send.finish().unwrap();
    let response = tokio::time::timeout(WAIT, recv.read_to_end(1 << 20))
        .await
        .unwrap()
        .unwrap();
    // HEADERS (200), then the echo's JSON in DATA frames.
    let (mut at, mut body, mut status) = (0, Vec::new(), None);
    while let Some((ty, a)) = varint(&response[at..]) {
        let (len, b) = varint(&response[at + a..]).unwrap();
        let payload = &response[at + a + b..at + a + b + len as usize];
        match ty {
            HEADERS if status.is_none() => status = common::quic::status(payload),
            DATA => body.extend_from_slice(payload),
            _ => {}
        }
        at += a + b + len as usize;
    }
    assert_eq!(status, Some(200));
    let echo: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(echo["body_len"], FRAMES);
    echo
}

const FRAMES: usize = 2_000;

/// A body of small DATA frames that came together goes upstream as a few chunks, not one per
/// frame (each cost the upstream a chunk line of its own: six bytes for one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_data_frames_that_come_together_go_upstream_as_few_chunks() {
    let (_wraith, _upstream, client) = served().await;
    let echo = post_in_one_byte_frames(&client).await;
    let chunks = echo["data_frames"].as_u64().unwrap() as usize;
    assert!(
        chunks <= FRAMES / 10,
        "{chunks} chunks upstream for {FRAMES} frames"
    );
}

/// The same to an HTTP/2 upstream: a few DATA frames, not one per client frame (HTTP/2
/// servers close a connection that sends many small ones, ENHANCE_YOUR_CALM, and every
/// client's requests on it go with it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_data_frames_that_come_together_go_to_an_h2_upstream_as_few_frames() {
    let upstream = Upstream::echo().await;
    let setup = Setup::new();
    let cfg = config(&setup.listeners_h3("", "", ALLOW_ALL_POLICY), upstream.addr).replace(
        "name = \"app\"\nendpoints",
        "name = \"app\"\nprotocol = \"h2c\"\nendpoints",
    );
    assert!(cfg.contains("h2c"));
    let wraith = setup.start(&cfg);
    let mut client = RawH3::connect(&wraith.pki().ca_pem, wraith.addr("https")).await;
    client.open_control().await;
    let echo = post_in_one_byte_frames(&client).await;
    assert_eq!(echo["version"], "HTTP/2.0");
    let frames = echo["data_frames"].as_u64().unwrap() as usize;
    assert!(
        frames <= FRAMES / 10,
        "{frames} DATA frames upstream for {FRAMES}"
    );
}

/// A client that abandons its upload (the request stream reset, or the connection closed,
/// mid-body) is a client abort: logged 499, not 400 (as over HTTP/1.1 and HTTP/2:
/// `an_upload_the_client_abandons_is_a_client_abort_not_a_bad_request`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_the_client_abandons_is_logged_as_a_client_abort() {
    use common::quic::DATA;
    const H3_REQUEST_CANCELLED: u32 = 0x10c;
    let upstream = Upstream::echo().await;
    let setup = Setup::new();
    let base = setup.listeners_h3("", "", ALLOW_ALL_POLICY);
    let cfg = format!(
        "{}\n[log.json]\npath = \"access.json\"\n",
        config(&base, upstream.addr)
    );
    let wraith = setup.start(&cfg);
    let ca = wraith.pki().ca_pem.clone();
    for (path, reset) in [("/reset", true), ("/closed", false)] {
        let mut client = RawH3::connect(&ca, wraith.addr("https")).await;
        client.open_control().await;
        let (mut send, mut recv) = client.conn.open_bi().await.unwrap();
        let mut bytes = frame(
            HEADERS,
            &request_section("POST", path, &[("content-length", "10000")]),
        );
        bytes.extend(frame_head(DATA, 10000));
        bytes.extend_from_slice(&[b'a'; 1000]);
        send.write_all(&bytes).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        if reset {
            send.reset(quinn::VarInt::from_u32(H3_REQUEST_CANCELLED))
                .unwrap();
        } else {
            client
                .conn
                .close(quinn::VarInt::from_u32(H3_REQUEST_CANCELLED), b"");
        }
        let deadline = tokio::time::Instant::now() + WAIT;
        let record = loop {
            let found = wraith
                .json_lines("access.json")
                .into_iter()
                .find(|r| r["path"] == path);
            if found.is_some() || tokio::time::Instant::now() > deadline {
                break found;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let record = record.unwrap_or_else(|| panic!("no record for {path}"));
        assert_eq!(record["status"], 499, "{record}");
        assert_eq!(record["protocol"], "h3", "{record}");
        if reset {
            // Its receiving side still open, the client gets the stream cancelled: 499 is
            // for the log, never a response on the wire.
            match tokio::time::timeout(WAIT, recv.read_to_end(1 << 16)).await {
                Ok(Err(quinn::ReadToEndError::Read(quinn::ReadError::Reset(code)))) => {
                    assert_eq!(code.into_inner(), H3_REQUEST_CANCELLED as u64)
                }
                other => panic!("not a cancelled stream: {other:?}"),
            }
        }
    }
}

/// A GET whose FIN comes after its HEADERS frame, in a later packet, goes upstream as the
/// bodyless GET it is once the FIN is there (not with an empty chunked body, which an
/// upstream may not read or may refuse).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_whose_fin_comes_after_its_head_goes_upstream_without_a_body() {
    let (wraith, _upstream) = gateway().await;
    let client = H3Client::new(&wraith.pki().ca_pem, None, Groups::Default);
    let conn = client.connect(wraith.addr("https")).await.unwrap();
    let req = http::Request::get("https://localhost/fin-later")
        .body(())
        .unwrap();
    let mut send = conn.send.clone();
    let mut stream = send.send_request(req).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    stream.finish().await.unwrap();
    let resp = tokio::time::timeout(WAIT, stream.recv_response())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = Vec::new();
    while let Some(mut chunk) = stream.recv_data().await.unwrap() {
        use bytes::Buf;
        body.extend_from_slice(&chunk.copy_to_bytes(chunk.remaining()));
    }
    let echo: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(echo["method"], "GET", "{echo}");
    assert_eq!(echo["body_len"], 0, "{echo}");
    assert!(
        echo["headers"].get("transfer-encoding").is_none()
            && echo["headers"].get("content-length").is_none(),
        "a bodyless GET went upstream with a body: {echo}"
    );
}
