//! The admin API: HTTP/1.1 on a unix socket (never TCP), mode 0600. `wraith status`,
//! `wraith reload`, `wraith decisions` and `wraith wazuh-ar` talk to it.
//!
//! - `GET  /v1/status`  version, uptime, config generation, listeners, upstreams with passive
//!   health, decisions, last-minute traffic (rates, p50/p99, top denied), ban refusals by
//!   origin, log sinks
//! - `GET  /v1/metrics` Prometheus/OpenMetrics text
//! - `POST /v1/reload`  reload now; 200 with the new generation, or 409 with every error
//!   (a reload whose client hangs up or times out still runs to the end)
//! - `GET  /v1/decisions[?ip=&origin=&type=&source=]`  live decisions (see `admin_decisions`)
//! - `POST /v1/decisions`  add a local decision (JSON body); 201
//! - `DELETE /v1/decisions/<ip-or-cidr>[?origin=&type=]`  lift local decisions; 200

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::{UnixListener, UnixStream};

use crate::runtime::Runtime;

/// Admin connections served at once; more wait in the kernel's backlog.
const MAX_ADMIN_CONNECTIONS: usize = 16;
/// A request head must arrive within this (and an idle keep-alive connection ends after it).
const ADMIN_HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// No admin exchange (a bulk import included) takes longer than this.
const ADMIN_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// How long an admin client may leave an answer unread before its connection is closed: a
/// client that stops reading must not hold one of the few admin slots for good.
const ADMIN_WRITE_STALL: Duration = Duration::from_secs(10);

/// An admin connection whose writes fail once the client has not read for
/// `ADMIN_WRITE_STALL`.
struct WriteStall {
    inner: UnixStream,
    stalled: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl tokio::io::AsyncRead for WriteStall {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for WriteStall {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        use std::future::Future;
        use std::task::Poll;
        let this = self.get_mut();
        match std::pin::Pin::new(&mut this.inner).poll_write(cx, buf) {
            Poll::Pending => {
                let stalled = this
                    .stalled
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(ADMIN_WRITE_STALL)));
                match stalled.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "admin client stopped reading",
                    ))),
                    Poll::Pending => Poll::Pending,
                }
            }
            done => {
                this.stalled = None;
                done
            }
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// A running admin socket: it is served until this handle is dropped (at exit, after the
/// drain; or a reload moved it elsewhere, or failed after binding a new one). Connections already
/// accepted finish either way; the socket file goes with the listener.
pub struct AdminHandle {
    pub path: PathBuf,
    stop: tokio_util::sync::CancellationToken,
    /// The socket file's (device, inode): only that one is removed, not a newer instance's.
    ours: Option<(u64, u64)>,
}

impl Drop for AdminHandle {
    fn drop(&mut self) {
        self.stop.cancel();
        // At once, not when the accept loop gets to it: at exit the async runtime may not
        // run it again.
        if still_ours(&self.path, self.ours) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Whether the server that answered on `stream` says it is draining (`GET /v1/status`),
/// asked without an async runtime; anything else (no whole answer within 2 s in all, more
/// than 1 MiB, not a Wraith) is taken as running. The 2 s bound the whole exchange, not
/// each read: whatever holds the socket cannot keep `serve` waiting by trickling bytes.
fn draining(mut stream: std::os::unix::net::UnixStream) -> bool {
    use std::io::{Read, Write};
    let deadline = Instant::now() + Duration::from_secs(2);
    let left = || Some(deadline.saturating_duration_since(Instant::now())).filter(|d| !d.is_zero());
    if stream.set_write_timeout(left()).is_err()
        || stream
            .write_all(b"GET /v1/status HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .is_err()
    {
        return false;
    }
    let mut answer = Vec::new();
    let mut piece = [0u8; 16 << 10];
    loop {
        let Some(wait) = left() else {
            return false;
        };
        if stream.set_read_timeout(Some(wait)).is_err() {
            return false;
        }
        match stream.read(&mut piece) {
            Ok(0) => break,
            Ok(n) if answer.len() + n <= 1 << 20 => answer.extend_from_slice(&piece[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Ok(_) | Err(_) => return false,
        }
    }
    let Some(at) = answer.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    answer.starts_with(b"HTTP/1.1 200")
        && serde_json::from_slice::<serde_json::Value>(&answer[at + 4..])
            .is_ok_and(|v| v["draining"] == true)
}

/// Whether the socket file at `path` is still the one we bound (`ours`).
fn still_ours(path: &Path, ours: Option<(u64, u64)>) -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path).is_ok_and(|m| Some((m.dev(), m.ino())) == ours)
}

/// Binds the admin socket, replacing a stale one, and serves it until the returned handle is
/// dropped.
pub fn start(runtime: Arc<Runtime>, path: &Path) -> Result<AdminHandle, String> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        // Only ever replace a socket: a misconfigured path must not delete someone's file.
        if !meta.file_type().is_socket() {
            return Err(format!(
                "admin socket path {} exists and is not a socket",
                path.display()
            ));
        }
        // A socket someone still answers on means another Wraith is running; one that is
        // draining (stopping) gives its socket up, as it gave up its listeners.
        if let Ok(stream) = std::os::unix::net::UnixStream::connect(path) {
            if !draining(stream) {
                return Err(format!(
                    "admin socket {} is in use: is another wraith running?",
                    path.display()
                ));
            }
            tracing::info!(admin_socket = %path.display(), "the wraith on this admin socket is shutting down; taking the socket over");
        }
        std::fs::remove_file(path)
            .map_err(|e| format!("cannot remove stale admin socket {}: {e}", path.display()))?;
    }
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() && !dir.exists() {
            // Created for the socket: only its owner may look inside.
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        }
    }
    let listener = bind_private(path)?;
    // Which file is ours: at shutdown only that one is removed, not a newer instance's.
    let ours = {
        use std::os::unix::fs::MetadataExt;
        std::fs::symlink_metadata(path)
            .map(|m| (m.dev(), m.ino()))
            .ok()
    };
    let path = path.to_path_buf();
    let admin = AdminHandle {
        path: path.clone(),
        stop: tokio_util::sync::CancellationToken::new(),
        ours,
    };
    let stop = admin.stop.clone();
    tokio::spawn(async move {
        // Served through the drain too (until `stop_admin` at exit): `wraith status` shows
        // it, and a ban can still be added while requests finish.
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_ADMIN_CONNECTIONS));
        let mut failures = crate::listener::AcceptFailures::default();
        let address = path.display().to_string();
        loop {
            // Waiting for a free slot must not keep the loop from its stop (a moved or
            // removed socket, the server stopping) while every slot is busy.
            let slot = tokio::select! {
                s = slots.clone().acquire_owned() => match s {
                    Ok(s) => s,
                    Err(_) => break,
                },
                _ = stop.cancelled() => break,
            };
            let stream = tokio::select! {
                r = listener.accept() => match r {
                    Ok((s, _)) => s,
                    Err(e) => {
                        failures.failed(&address, &e).await;
                        continue;
                    }
                },
                _ = stop.cancelled() => break,
            };
            let rt = runtime.clone();
            tokio::spawn(async move {
                let _slot = slot;
                let svc = service_fn(move |req| {
                    let rt = rt.clone();
                    async move {
                        let resp = match tokio::time::timeout(
                            ADMIN_REQUEST_TIMEOUT,
                            handle(&rt, req),
                        )
                        .await
                        {
                            Ok(resp) => resp,
                            Err(_) => reply(
                                StatusCode::REQUEST_TIMEOUT,
                                json!({"error": format!("request not completed within {ADMIN_REQUEST_TIMEOUT:?}")}),
                            ),
                        };
                        Ok::<_, Infallible>(resp)
                    }
                });
                let stream = WriteStall {
                    inner: stream,
                    stalled: None,
                };
                let _ = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(ADMIN_HEAD_TIMEOUT)
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
        if still_ours(&path, ours) {
            let _ = std::fs::remove_file(&path);
        }
    });
    Ok(admin)
}

/// Binds the socket 0600 with no window in which another user could connect: it is made in a
/// fresh 0700 directory beside `path`, restricted there, then renamed into place (the
/// listening socket moves with its name). No process-wide umask is touched.
fn bind_private(path: &Path) -> Result<UnixListener, String> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map_or("admin.sock".into(), |n| n.to_string_lossy());
    let private = dir.join(format!(".{name}.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&private);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .map_err(|e| format!("cannot create {}: {e}", private.display()))?;
    let staged = private.join("s");
    let result = UnixListener::bind(&staged)
        .map_err(|e| format!("cannot bind admin socket {}: {e}", path.display()))
        .and_then(|listener| {
            std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600))
                .and_then(|_| std::fs::rename(&staged, path))
                .map_err(|e| format!("cannot place admin socket {}: {e}", path.display()))?;
            Ok(listener)
        });
    let _ = std::fs::remove_dir_all(&private);
    result
}

async fn handle(rt: &Arc<Runtime>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.uri().path() == "/v1/decisions" || req.uri().path().starts_with("/v1/decisions/") {
        let (status, body) = crate::admin_decisions::handle(rt, req).await;
        return reply(status, body);
    }
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/v1/status") => reply(StatusCode::OK, status(rt)),
        (&Method::GET, "/v1/metrics") => {
            let mut resp = Response::new(Full::new(Bytes::from(
                crate::telemetry::exporter::render(rt),
            )));
            resp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static(crate::telemetry::exporter::CONTENT_TYPE),
            );
            resp
        }
        (&Method::POST, "/v1/reload") => {
            // The reload runs in its own task: hyper drops this handler when the client
            // goes away (and the request timeout drops it too), and a reload cancelled
            // between the swap and the CrowdSec reconcile would leave the bridge slot empty
            // and the result unrecorded. Dropping the JoinHandle only detaches the task.
            let rt = rt.clone();
            match tokio::spawn(async move { rt.reload().await }).await {
                Ok(Ok(generation)) => reply(
                    StatusCode::OK,
                    json!({"ok": true, "generation": generation}),
                ),
                Ok(Err(errors)) => {
                    reply(StatusCode::CONFLICT, json!({"ok": false, "errors": errors}))
                }
                Err(e) => reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    json!({"ok": false, "errors": [format!("reload task failed: {e}")]}),
                ),
            }
        }
        (_, "/v1/status" | "/v1/reload" | "/v1/metrics") => reply(
            StatusCode::METHOD_NOT_ALLOWED,
            json!({"error": "method not allowed"}),
        ),
        (_, path) => reply(
            StatusCode::NOT_FOUND,
            json!({"error": format!("no such endpoint {path:?}; try GET /v1/status")}),
        ),
    }
}

pub(crate) fn reply(status: StatusCode, body: Value) -> Response<Full<Bytes>> {
    let mut bytes = serde_json::to_vec_pretty(&body).unwrap_or_default();
    bytes.push(b'\n');
    let mut resp = Response::new(Full::new(Bytes::from(bytes)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}

/// Seconds since the epoch.
fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// A listener's OCSP staple: its file, times, and whether handshakes send it now.
fn ocsp_status(tls: &crate::config::TlsConfig) -> Option<Value> {
    let staple = tls.ocsp.as_ref()?;
    let now = unix(SystemTime::now()) as i64;
    Some(json!({
        "file": tls.ocsp_path.as_ref().map(|p| p.display().to_string()),
        "this_update": staple.this_update,
        "next_update": staple.next_update,
        // The end of stapling: nextUpdate, or a day after thisUpdate without one.
        "valid_until": staple.valid_until(),
        "stapled": staple.current(now),
    }))
}

/// The status document.
pub fn status(rt: &Runtime) -> Value {
    let snapshot = rt.gateway.snapshot();
    let states = rt.listener_states();
    let quic = rt.quic_states();
    let listeners: Vec<Value> = snapshot
        .listeners
        .iter()
        .map(|l| {
            let state = states.iter().find(|(k, _, _)| *k == l.config.key());
            json!({
                "name": &*l.config.name,
                "address": l.config.address.to_string(),
                "bound": state.map(|(_, b, _)| b.to_string()),
                "protocol": if l.config.tls.is_some() { "https" } else { "http" },
                "active_connections": state.map_or(0, |(_, _, n)| *n),
                "http3": l.quic.is_some(),
                "proxy_protocol": l.config.proxy_protocol,
                "quic_connections": quic.iter().find(|(k, _)| *k == l.config.key()).map_or(0, |(_, n)| *n),
                "ocsp": l.config.tls.as_ref().and_then(ocsp_status),
            })
        })
        .collect();
    let upstreams: Vec<Value> = snapshot
        .upstreams
        .iter()
        .map(|u| {
            use std::sync::atomic::Ordering::Relaxed;
            json!({
                "name": &*u.config.name,
                "protocol": u.config.protocol.name(),
                "algorithm": u.config.algorithm.name(),
                "active_checks": u.config.health_check.is_some(),
                "pending": u.pending(),
                "endpoints": u.endpoints.iter().map(|e| {
                    let check = e.health.last_check().map(|c| json!({
                        "at": unix(c.at),
                        "ok": c.failure.is_none(),
                        "status": c.status,
                        "error": c.failure,
                        "duration_ms": c.duration.as_millis() as u64,
                    }));
                    json!({
                        "address": format!("{}://{}", e.scheme, e.authority),
                        "weight": e.weight,
                        "max_connections": (e.max_connections != usize::MAX).then_some(e.max_connections),
                        "health": e.health.state().name(),
                        "ejected_for_ms": e.health.ejected_for_ms(),
                        "consecutive_failures": e.health.consecutive_failures(),
                        "ejections": e.health.total_ejections(),
                        "last_check": check,
                        "in_flight": e.in_flight(),
                        "idle_connections": e.pool.idle_count(),
                        "requests": e.requests.load(Relaxed),
                        "connect_failures": e.failures.load(Relaxed),
                    })
                }).collect::<Vec<_>>(),
            })
        })
        .collect();
    let last_reload = rt
        .last_reload()
        .map(|r| json!({"seq": r.seq, "at": unix(r.at), "ok": r.ok, "errors": r.errors, "generation": r.generation}));
    let (local, crowdsec) = rt.gateway.decisions.counts();
    let bridge = rt.crowdsec_status().map(|(url, st)| {
        use std::sync::atomic::Ordering::Relaxed;
        let last = st.last_success_ms.load(Relaxed);
        json!({
            "lapi_url": url,
            "last_success": (last > 0).then(|| crate::decisions::store::to_wall_ms(last) / 1000),
            "pulls": st.pulls.load(Relaxed),
            "failures": st.failures.load(Relaxed),
            "last_error": st.last_error.lock().ok().and_then(|e| e.clone()),
        })
    });
    let limits: Vec<Value> = snapshot
        .limiters()
        .iter()
        .map(|l| {
            json!({
                "name": &*l.config.name,
                "key": l.config.key.describe(),
                // A shared limit's keys are in Redis; these are its fallback's (`on_error`).
                "keys": l.keys(),
                "shared": l.config.shared,
            })
        })
        .collect();
    json!({
        "decisions": {
            "local": local,
            "crowdsec": crowdsec,
            "refusing_all": rt.gateway.decisions.refusing_all(),
            "crowdsec_bridge": bridge,
        },
        "rate_limits": limits,
        "rate_limit_redis": snapshot.rate_store.as_ref().map(|s| s.status()),
        "version": env!("CARGO_PKG_VERSION"),
        "git_revision": env!("WRAITH_GIT_REV"),
        "pid": std::process::id(),
        "started_at": unix(rt.started_at),
        "uptime_secs": rt.started.elapsed().as_secs(),
        "config_file": rt.config_path.display().to_string(),
        "pid_file": rt.pid_file_path(),
        "admin_socket": rt.admin_socket_path(),
        "generation": snapshot.generation,
        "loaded_at": unix(snapshot.loaded_at),
        "last_reload": last_reload,
        "reloads_started": rt.reloads_started(),
        "draining": rt.shutdown.is_cancelled(),
        "listeners": listeners,
        "upstreams": upstreams,
        "traffic": traffic(rt),
        "routes": snapshot.telemetry.route_totals().into_iter().map(|(name, requests, server_errors, denied)| json!({
            "name": name, "requests": requests, "server_errors": server_errors, "denied": denied,
        })).collect::<Vec<_>>(),
        "bans": bans(rt),
        "log_sinks": snapshot.telemetry.sink_counts().into_iter().map(|(sink, queued, accepted, written, dropped)| json!({
            "sink": sink, "queued": queued, "accepted": accepted, "written": written, "dropped": dropped,
        })).collect::<Vec<_>>(),
        "client_cert_rejections": rt
            .client_cert_rejections
            .counts()
            .map(|(reason, n)| (reason.to_string(), json!(n)))
            .collect::<serde_json::Map<_, _>>(),
    })
}

/// The last minute of traffic.
fn traffic(rt: &Runtime) -> Value {
    let s = rt
        .telemetry
        .window
        .summary(crate::telemetry::unix_now(), rt.started.elapsed());
    let per_sec = |n: u64| (n as f64 / s.seconds as f64 * 100.0).round() / 100.0;
    let top = |v: &[(String, u64)]| {
        v.iter()
            .map(|(name, n)| json!({"name": name, "count": n}))
            .collect::<Vec<_>>()
    };
    json!({
        "window_secs": s.seconds,
        "requests": s.requests,
        "requests_per_sec": per_sec(s.requests),
        "server_errors": s.server_errors,
        "errors_per_sec": per_sec(s.server_errors),
        "error_rate": if s.requests == 0 { 0.0 } else { (s.server_errors as f64 / s.requests as f64 * 10_000.0).round() / 10_000.0 },
        "client_errors": s.client_errors,
        "denied": s.denied,
        "p50_ms": s.p50_ms,
        "p99_ms": s.p99_ms,
        "top_denied_ips": top(&s.top_denied_ips),
        "top_denied_identities": top(&s.top_denied_identities),
    })
}

/// Requests refused by bans, and active decisions, by origin (only origins seen).
fn bans(rt: &Runtime) -> Value {
    use crate::telemetry::metrics::{OriginLabel, ORIGINS};
    let m = &rt.telemetry.metrics;
    let mut refused = serde_json::Map::new();
    let mut active = serde_json::Map::new();
    for origin in ORIGINS {
        let label = OriginLabel { origin };
        if let Some(c) = m.bans.get(&label) {
            refused.insert(origin.into(), json!(c.get()));
        }
        if let Some(g) = m.decisions_active.get(&label) {
            active.insert(origin.into(), json!(g.get()));
        }
    }
    json!({"refused_by_origin": refused, "active_by_origin": active})
}

/// A client call to the admin socket: returns the status code and the JSON body.
pub async fn call(
    socket: &Path,
    method: Method,
    path: &str,
    timeout: Duration,
) -> Result<(StatusCode, Value), String> {
    call_with_body(socket, method, path, None, timeout).await
}

/// Like `call`, with an optional JSON request body.
pub async fn call_with_body(
    socket: &Path,
    method: Method,
    path: &str,
    body: Option<&Value>,
    timeout: Duration,
) -> Result<(StatusCode, Value), String> {
    let body = match body {
        Some(v) => Bytes::from(serde_json::to_vec(v).map_err(|e| e.to_string())?),
        None => Bytes::new(),
    };
    let (status, body) = request(socket, method, path, body, timeout).await?;
    let value =
        serde_json::from_slice(&body).map_err(|e| format!("admin response is not JSON: {e}"))?;
    Ok((status, value))
}

/// A client call to the admin socket with a raw body (JSON when not empty): returns the status
/// code and the raw response body (e.g. the metrics text).
pub async fn request(
    socket: &Path,
    method: Method,
    path: &str,
    body: Bytes,
    timeout: Duration,
) -> Result<(StatusCode, Bytes), String> {
    let fut = async {
        let stream = UnixStream::connect(socket).await.map_err(|e| {
            format!(
                "cannot connect to admin socket {}: {e} (is wraith running?)",
                socket.display()
            )
        })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("admin socket handshake failed: {e}"))?;
        tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, "wraith");
        if !body.is_empty() {
            req = req.header(http::header::CONTENT_TYPE, "application/json");
        }
        let req = req.body(Full::new(body)).map_err(|e| e.to_string())?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("admin request failed: {e}"))?;
        let status = resp.status();
        // The answer comes from the local server over its private socket; the bound only
        // keeps a broken one from exhausting memory. `decisions list --json` with CrowdSec
        // blocklists runs to hundreds of MiB (~230 bytes a decision).
        let body = Limited::new(resp.into_body(), 1 << 30)
            .collect()
            .await
            .map_err(|e| format!("admin response failed: {e}"))?
            .to_bytes();
        Ok((status, body))
    };
    tokio::time::timeout(timeout, fut).await.map_err(|_| {
        format!(
            "admin socket {} did not answer within {timeout:?}",
            socket.display()
        )
    })?
}

/// The admin socket path of a config, or an explanation of why there is none.
pub fn socket_path(config: &crate::config::Config) -> Result<PathBuf, String> {
    config.server.admin_socket.clone().ok_or_else(|| {
        format!(
            "{} has no server.admin_socket; set one to use this command",
            config.file.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A socket in use is given up only by a server that says it is draining.
    #[test]
    fn only_a_draining_server_gives_its_socket_up() {
        let dir = tempfile::tempdir().unwrap();
        let answer = |path: std::path::PathBuf, reply: &'static [u8]| {
            let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
            std::thread::spawn(move || {
                use std::io::{Read, Write};
                let (mut s, _) = listener.accept().unwrap();
                let mut head = [0u8; 1024];
                let _ = s.read(&mut head);
                let _ = s.write_all(reply);
            });
            std::os::unix::net::UnixStream::connect(&path).unwrap()
        };
        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 17\r\n\r\n{\"draining\":true}";
        assert!(draining(answer(dir.path().join("a"), ok)));
        let running = b"HTTP/1.1 200 OK\r\ncontent-length: 18\r\n\r\n{\"draining\":false}";
        assert!(!draining(answer(dir.path().join("b"), running)));
        let failed = b"HTTP/1.1 500 Oops\r\n\r\n{\"draining\":true}";
        assert!(!draining(answer(dir.path().join("c"), failed)));
        assert!(!draining(answer(dir.path().join("d"), b"not http at all")));
    }

    /// Whatever holds the socket cannot keep the probe (and so `serve`) waiting by sending
    /// a byte now and then: the probe gives up on the whole exchange, not per read.
    #[test]
    fn a_trickling_socket_is_given_up_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("slow");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            use std::io::Write;
            let (mut s, _) = listener.accept().unwrap();
            while s.write_all(b"H").is_ok() {
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let stream = std::os::unix::net::UnixStream::connect(&path).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(draining(stream)));
        // A bound on a hang (the probe's own limit is 2 s), not a measurement.
        let answered = rx.recv_timeout(Duration::from_secs(30));
        assert_eq!(answered, Ok(false));
    }
}
