//! h3load: the project's own HTTP/3 (and, for comparison, HTTP/2) load client for bench/h3.
//! No Debian load generator speaks HTTP/3 (h2load lacks ngtcp2), and none offers
//! X25519MLKEM768. tokio + rustls (aws-lc-rs) + quinn/h3, or hyper's HTTP/2 client over
//! tokio-rustls; the same request loops either way.
//!
//! ```text
//! h3load --addr 127.0.0.1:9449 [--proto h3|h2] [--path /small] [--conns 10] [--streams 10]
//!        [--duration 5] [--group default|x25519|x25519mlkem768|p256] [--ca ca.pem]
//!        [--cert client.pem --key client-key.pem] [--handshakes [--resume]]
//!        [--upload BYTES]
//! ```
//!
//! Keep-alive mode: `conns` connections, each with `streams` loops sending one request after
//! another. `--handshakes`: `conns` loops, each connecting (a full handshake, or a resumed one
//! with `--resume`), sending one GET and closing. `--upload N` POSTs N bytes per request.
//! Prints one JSON line: ops, errors, seconds, rps, bytes moved, latency percentiles and the
//! client's own CPU. Every operation of the run counts (warm up with a separate short run).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use clap::Parser;
use http_body_util::{BodyExt, Full};
use rustls::crypto::aws_lc_rs::{self, kx_group};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

#[derive(Parser, Debug, Clone)]
#[command(about = "HTTP/3 and HTTP/2 load client (bench/h3)")]
struct Args {
    /// Server address.
    #[arg(long)]
    addr: SocketAddr,
    /// h3 or h2.
    #[arg(long, default_value = "h3")]
    proto: String,
    /// Request path.
    #[arg(long, default_value = "/small")]
    path: String,
    /// TLS server name and :authority.
    #[arg(long, default_value = "localhost")]
    server_name: String,
    /// Connections (keep-alive mode) or concurrent handshake loops.
    #[arg(long, default_value_t = 10)]
    conns: usize,
    /// Concurrent request loops per connection (keep-alive mode).
    #[arg(long, default_value_t = 10)]
    streams: usize,
    /// Seconds to run.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Key-exchange groups offered: default (X25519MLKEM768 first), x25519,
    /// x25519mlkem768 (only), p256.
    #[arg(long, default_value = "default")]
    group: String,
    /// CA bundle that signed the server certificate.
    #[arg(long)]
    ca: PathBuf,
    /// Client certificate (PEM) for mTLS listeners.
    #[arg(long, requires = "key")]
    cert: Option<PathBuf>,
    /// Its private key.
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
    /// One request per connection: measure handshakes.
    #[arg(long)]
    handshakes: bool,
    /// With --handshakes: resume sessions (TLS 1.3 PSK) instead of full handshakes.
    #[arg(long)]
    resume: bool,
    /// POST this many bytes per request instead of GET.
    #[arg(long)]
    upload: Option<usize>,
}

/// Counters shared by every loop.
#[derive(Default)]
struct Stats {
    ops: AtomicU64,
    errors: AtomicU64,
    bytes: AtomicU64,
    latencies: std::sync::Mutex<Vec<u32>>,
}

fn tls_config(a: &Args, alpn: &[u8]) -> rustls::ClientConfig {
    let mut provider = aws_lc_rs::default_provider();
    provider.kx_groups = match a.group.as_str() {
        "default" => provider.kx_groups,
        "x25519" => vec![kx_group::X25519],
        "x25519mlkem768" => vec![kx_group::X25519MLKEM768],
        "p256" => vec![kx_group::SECP256R1],
        other => panic!("unknown --group {other}"),
    };
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(&a.ca).expect("--ca readable") {
        roots.add(c.expect("--ca is PEM")).expect("--ca usable");
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_root_certificates(roots);
    let mut config = match (&a.cert, &a.key) {
        (Some(cert), Some(key)) => builder
            .with_client_auth_cert(
                CertificateDer::pem_file_iter(cert)
                    .expect("--cert readable")
                    .map(|c| c.expect("--cert is PEM"))
                    .collect(),
                PrivateKeyDer::from_pem_file(key).expect("--key readable"),
            )
            .expect("client certificate usable"),
        _ => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![alpn.to_vec()];
    if a.handshakes && !a.resume {
        config.resumption = rustls::client::Resumption::disabled();
    }
    config
}

fn request(a: &Args, h2: bool) -> http::Request<()> {
    let uri = format!("https://{}{}", a.server_name, a.path);
    let mut b = http::Request::builder().uri(uri);
    if h2 {
        b = b.version(http::Version::HTTP_2);
    }
    match a.upload {
        Some(n) => b.method("POST").header("content-length", n),
        None => b.method("GET"),
    }
    .body(())
    .expect("valid request")
}

/// The upload body: one shared zero buffer, sent in 64 KiB pieces.
fn upload_chunks(n: usize) -> Vec<Bytes> {
    let piece = Bytes::from(vec![0u8; 64 << 10]);
    let mut out = Vec::new();
    let mut left = n;
    while left > 0 {
        let k = left.min(piece.len());
        out.push(piece.slice(..k));
        left -= k;
    }
    out
}

// ---------------------------------------------------------------------------------------------
// HTTP/3

async fn h3_connect(
    endpoint: &quinn::Endpoint,
    config: &quinn::ClientConfig,
    a: &Args,
) -> Result<
    (
        quinn::Connection,
        h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>,
        tokio::task::JoinHandle<()>,
    ),
    String,
> {
    let conn = endpoint
        .connect_with(config.clone(), a.addr, &a.server_name)
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    let (mut driver, send) = h3::client::new(h3_quinn::Connection::new(conn.clone()))
        .await
        .map_err(|e| e.to_string())?;
    let task = tokio::spawn(async move {
        let _ = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
    });
    Ok((conn, send, task))
}

async fn h3_once(
    send: &mut h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>,
    req: http::Request<()>,
    body: &[Bytes],
) -> Result<u64, String> {
    let mut stream = send.send_request(req).await.map_err(|e| e.to_string())?;
    let mut moved = 0u64;
    let mut stopped = false;
    for chunk in body {
        // A server may answer before reading the whole body and stop the upload (RFC 9114
        // §4.1); the response still comes.
        if stream.send_data(chunk.clone()).await.is_err() {
            stopped = true;
            break;
        }
        moved += chunk.len() as u64;
    }
    if !stopped {
        stream.finish().await.map_err(|e| e.to_string())?;
    }
    let resp = stream.recv_response().await.map_err(|e| e.to_string())?;
    while let Some(mut chunk) = stream.recv_data().await.map_err(|e| e.to_string())? {
        moved += chunk.remaining() as u64;
        chunk.advance(chunk.remaining());
    }
    if !resp.status().is_success() {
        return Err(format!("status {}", resp.status()));
    }
    Ok(moved)
}

async fn run_h3(a: Arc<Args>, stats: Arc<Stats>, stop: Arc<AtomicBool>) {
    let tls = tls_config(&a, b"h3");
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("TLS 1.3 config");
    let config = quinn::ClientConfig::new(Arc::new(crypto));
    let bind: SocketAddr = if a.addr.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    }
    .parse()
    .expect("address");
    let endpoint = quinn::Endpoint::client(bind).expect("UDP socket");
    let body = Arc::new(a.upload.map(upload_chunks).unwrap_or_default());
    let mut tasks = Vec::new();
    for _ in 0..a.conns {
        let (a, stats, stop, endpoint, config, body) = (
            a.clone(),
            stats.clone(),
            stop.clone(),
            endpoint.clone(),
            config.clone(),
            body.clone(),
        );
        tasks.push(tokio::spawn(async move {
            if a.handshakes {
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    let result = match h3_connect(&endpoint, &config, &a).await {
                        Ok((conn, mut send, driver)) => {
                            let r = h3_once(&mut send, request(&a, false), &body).await;
                            conn.close(0u32.into(), b"");
                            driver.abort();
                            r
                        }
                        Err(e) => Err(e),
                    };
                    record(&stats, t, result);
                }
                return;
            }
            let Ok((_conn, send, _driver)) = h3_connect(&endpoint, &config, &a).await else {
                stats.errors.fetch_add(1, Ordering::Relaxed);
                return;
            };
            let mut loops = Vec::new();
            for _ in 0..a.streams {
                let (a, stats, stop, body, mut send) = (
                    a.clone(),
                    stats.clone(),
                    stop.clone(),
                    body.clone(),
                    send.clone(),
                );
                loops.push(tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        let t = Instant::now();
                        let r = h3_once(&mut send, request(&a, false), &body).await;
                        record(&stats, t, r);
                    }
                }));
            }
            for l in loops {
                let _ = l.await;
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    endpoint.close(0u32.into(), b"");
}

// ---------------------------------------------------------------------------------------------
// HTTP/2

type H2Send = hyper::client::conn::http2::SendRequest<Full<Bytes>>;

async fn h2_connect(
    connector: &tokio_rustls::TlsConnector,
    a: &Args,
) -> Result<(H2Send, tokio::task::JoinHandle<()>), String> {
    let tcp = tokio::net::TcpStream::connect(a.addr)
        .await
        .map_err(|e| e.to_string())?;
    let _ = tcp.set_nodelay(true);
    let name = ServerName::try_from(a.server_name.clone()).map_err(|e| e.to_string())?;
    let tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let (send, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .initial_stream_window_size(4 << 20)
            .initial_connection_window_size(16 << 20)
            .handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .map_err(|e| e.to_string())?;
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok((send, task))
}

async fn h2_once(send: &mut H2Send, a: &Args, upload: &Bytes) -> Result<u64, String> {
    let sent = upload.len() as u64;
    // Full hands the shared buffer to hyper, which sends it as the window allows.
    let req = request(a, true).map(|()| Full::new(upload.clone()));
    send.ready().await.map_err(|e| e.to_string())?;
    let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let mut body = resp.into_body();
    let mut moved = sent;
    while let Some(frame) = body.frame().await {
        if let Ok(d) = frame.map_err(|e| e.to_string())?.into_data() {
            moved += d.len() as u64;
        }
    }
    if !status.is_success() {
        return Err(format!("status {status}"));
    }
    Ok(moved)
}

async fn run_h2(a: Arc<Args>, stats: Arc<Stats>, stop: Arc<AtomicBool>) {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls_config(&a, b"h2")));
    let body = Arc::new(Bytes::from(vec![0u8; a.upload.unwrap_or(0)]));
    let mut tasks = Vec::new();
    for _ in 0..a.conns {
        let (a, stats, stop, connector, body) = (
            a.clone(),
            stats.clone(),
            stop.clone(),
            connector.clone(),
            body.clone(),
        );
        tasks.push(tokio::spawn(async move {
            if a.handshakes {
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    let r = match h2_connect(&connector, &a).await {
                        Ok((mut send, task)) => {
                            let r = h2_once(&mut send, &a, &body).await;
                            task.abort();
                            r
                        }
                        Err(e) => Err(e),
                    };
                    record(&stats, t, r);
                }
                return;
            }
            let Ok((send, _task)) = h2_connect(&connector, &a).await else {
                stats.errors.fetch_add(1, Ordering::Relaxed);
                return;
            };
            let mut loops = Vec::new();
            for _ in 0..a.streams {
                let (a, stats, stop, body, mut send) = (
                    a.clone(),
                    stats.clone(),
                    stop.clone(),
                    body.clone(),
                    send.clone(),
                );
                loops.push(tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        let t = Instant::now();
                        let r = h2_once(&mut send, &a, &body).await;
                        record(&stats, t, r);
                    }
                }));
            }
            for l in loops {
                let _ = l.await;
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

fn record(stats: &Stats, started: Instant, result: Result<u64, String>) {
    match result {
        Ok(bytes) => {
            stats.ops.fetch_add(1, Ordering::Relaxed);
            stats.bytes.fetch_add(bytes, Ordering::Relaxed);
            let us = started.elapsed().as_micros().min(u128::from(u32::MAX)) as u32;
            if let Ok(mut l) = stats.latencies.lock() {
                l.push(us);
            }
        }
        Err(e) => {
            if stats.errors.fetch_add(1, Ordering::Relaxed) == 0 {
                eprintln!("first error: {e}");
            }
        }
    }
}

fn cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the struct we pass.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(u.ru_utime) + t(u.ru_stime)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let a = Arc::new(Args::parse());
    let stats = Arc::new(Stats::default());
    let stop = Arc::new(AtomicBool::new(false));
    let cpu0 = cpu_seconds();
    let started = Instant::now();
    let timer = {
        let stop = stop.clone();
        let d = Duration::from_secs_f64(a.duration);
        tokio::spawn(async move {
            tokio::time::sleep(d).await;
            stop.store(true, Ordering::Relaxed);
        })
    };
    match a.proto.as_str() {
        "h3" => run_h3(a.clone(), stats.clone(), stop).await,
        "h2" => run_h2(a.clone(), stats.clone(), stop).await,
        other => panic!("unknown --proto {other} (h3 or h2)"),
    }
    timer.abort();
    let secs = started.elapsed().as_secs_f64();
    let mut lat = stats
        .latencies
        .lock()
        .map(|l| l.clone())
        .unwrap_or_default();
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    let ops = stats.ops.load(Ordering::Relaxed);
    println!(
        "{}",
        serde_json::json!({
            "proto": a.proto,
            "mode": if a.handshakes { if a.resume { "resumed-handshakes" } else { "full-handshakes" } } else { "keep-alive" },
            "group": a.group,
            "ops": ops,
            "errors": stats.errors.load(Ordering::Relaxed),
            "secs": (secs * 1000.0).round() / 1000.0,
            "rps": (ops as f64 / secs).round(),
            "bytes": stats.bytes.load(Ordering::Relaxed),
            "p50_us": pct(0.50),
            "p99_us": pct(0.99),
            "client_cpu_s": ((cpu_seconds() - cpu0) * 1000.0).round() / 1000.0,
        })
    );
}
