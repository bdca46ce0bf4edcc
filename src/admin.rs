//! The admin API: HTTP/1.1 on a unix socket (never TCP), mode 0600. `wraith status` and
//! `wraith reload` talk to it; later work adds decisions and metrics.
//!
//! - `GET  /v1/status`  version, uptime, config generation, listeners, upstreams
//! - `POST /v1/reload`  reload now; 200 with the new generation, or 409 with every error

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::{UnixListener, UnixStream};

use crate::runtime::Runtime;

/// Binds the admin socket, replacing a stale one, and serves it until shutdown.
pub fn start(runtime: Arc<Runtime>, path: &Path) -> Result<(), String> {
    if path.exists() {
        // A socket someone still answers on means another Wraith is running.
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(format!(
                "admin socket {} is in use: is another wraith running?",
                path.display()
            ));
        }
        std::fs::remove_file(path)
            .map_err(|e| format!("cannot remove stale admin socket {}: {e}", path.display()))?;
    }
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        }
    }
    let listener = UnixListener::bind(path)
        .map_err(|e| format!("cannot bind admin socket {}: {e}", path.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| format!("cannot chmod admin socket {}: {e}", path.display()))?;
    }
    let path = path.to_path_buf();
    tokio::spawn(async move {
        let shutdown = runtime.shutdown.clone();
        loop {
            let stream = tokio::select! {
                r = listener.accept() => match r {
                    Ok((s, _)) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "admin accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = shutdown.cancelled() => break,
            };
            let rt = runtime.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let rt = rt.clone();
                    async move { Ok::<_, Infallible>(handle(&rt, req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
        let _ = std::fs::remove_file(&path);
    });
    Ok(())
}

async fn handle(rt: &Arc<Runtime>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/v1/status") => reply(StatusCode::OK, status(rt)),
        (&Method::POST, "/v1/reload") => match rt.reload().await {
            Ok(generation) => reply(
                StatusCode::OK,
                json!({"ok": true, "generation": generation}),
            ),
            Err(errors) => reply(StatusCode::CONFLICT, json!({"ok": false, "errors": errors})),
        },
        (_, "/v1/status" | "/v1/reload") => reply(
            StatusCode::METHOD_NOT_ALLOWED,
            json!({"error": "method not allowed"}),
        ),
        (_, path) => reply(
            StatusCode::NOT_FOUND,
            json!({"error": format!("no such endpoint {path:?}; try GET /v1/status")}),
        ),
    }
}

fn reply(status: StatusCode, body: Value) -> Response<Full<Bytes>> {
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

/// The status document.
pub fn status(rt: &Runtime) -> Value {
    let snapshot = rt.gateway.snapshot();
    let states = rt.listener_states();
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
                "protocol": format!("{:?}", u.config.protocol).to_lowercase(),
                "endpoints": u.endpoints.iter().map(|e| json!({
                    "address": e.authority.as_str(),
                    "in_flight": e.in_flight(),
                    "idle_connections": e.pool.idle_count(),
                    "requests": e.requests.load(Relaxed),
                    "connect_failures": e.failures.load(Relaxed),
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    let last_reload = rt
        .last_reload()
        .map(|r| json!({"at": unix(r.at), "ok": r.ok, "errors": r.errors}));
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "git_revision": env!("WRAITH_GIT_REV"),
        "pid": std::process::id(),
        "started_at": unix(rt.started_at),
        "uptime_secs": rt.started.elapsed().as_secs(),
        "config_file": rt.config_path.display().to_string(),
        "generation": snapshot.generation,
        "loaded_at": unix(snapshot.loaded_at),
        "last_reload": last_reload,
        "draining": rt.shutdown.is_cancelled(),
        "listeners": listeners,
        "upstreams": upstreams,
        "client_cert_rejections": rt
            .client_cert_rejections
            .counts()
            .map(|(reason, n)| (reason.to_string(), json!(n)))
            .collect::<serde_json::Map<_, _>>(),
    })
}

/// A client call to the admin socket: returns the status code and the JSON body.
pub async fn call(
    socket: &Path,
    method: Method,
    path: &str,
    timeout: Duration,
) -> Result<(StatusCode, Value), String> {
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
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, "wraith")
            .body(Full::new(Bytes::new()))
            .map_err(|e| e.to_string())?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("admin request failed: {e}"))?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), 16 << 20)
            .collect()
            .await
            .map_err(|e| format!("admin response failed: {e}"))?
            .to_bytes();
        let value = serde_json::from_slice(&body)
            .map_err(|e| format!("admin response is not JSON: {e}"))?;
        Ok((status, value))
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
