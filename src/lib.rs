//! Wraith: a zero-trust security gateway and reverse proxy.
//!
//! # The request path
//!
//! ```text
//! accept (TCP | QUIC)               listener/      connection limit, banned peers closed,
//!                                                  TLS 1.3 handshake (QUIC: own rustls
//!                                                  session, listener/quic/crypto)
//!   └─ HTTP/1.1 or HTTP/2           listener/conn  header-read and idle timeouts, drain
//!                                   listener/h1    own HTTP/1.1 codec (strict framing);
//!                                                  HTTP/2 by hyper
//!      or HTTP/3                    listener/quic  streamed bodies, GOAWAY drain, 0-RTT
//!       │                           identity       verified client cert -> Identity (per connection)
//!       └─ Gateway::handle          proxy/         one pipeline for every protocol
//!           ├─ normalize path       proxy/path
//!           ├─ route                router         first match in file order, else 404
//!           ├─ decisions            decisions/     banned client ip -> 403
//!           ├─ early data           proxy/early    0-RTT: safe methods on routes that allow
//!           │                                      it, identity waits, else 425
//!           ├─ policy               policy/        Cedar: identity x method x route; deny by default
//!           ├─ rate limits          ratelimit      per ip | identity | route | header -> 429
//!           ├─ appsec               decisions/appsec  optional CrowdSec WAF
//!           ├─ respond | redirect | forward
//!           │                       upstream/      health-aware balancing, retries,
//!           │                                      pooled (TLS) connections, streamed
//!           │                                      bodies, hop-by-hop out, X-Forwarded-* in
//!           │                       proxy/compress opt-in response compression
//!           └─ access record        telemetry/     one per request, emitted when the body
//!                                                  ends: metrics, window, log sinks
//! ```
//!
//! # Layout
//!
//! - `config`: `wraith.toml` -> raw serde mirror -> typed `Config`, every error at once
//! - `runtime`: `Snapshot` (config + everything built from it) behind ArcSwap; reload; drain
//! - `listener`: sockets, TLS (OCSP staples in `ocsp`), per-connection serving (TCP in `conn`,
//!   its HTTP/1.1 codec in `h1`, QUIC/HTTP/3 in `quic`); `http1`: chunked decoding shared with
//!   the upstream client; `upgrade`: connections handed from the HTTP/1.1 server to the
//!   pipeline after a 101
//! - `proxy`: the pipeline (`Gateway::handle`), header rules, path normalization
//! - `router`, `upstream`: route matching; upstream pools (balancing, health, TLS) and the
//!   forwarder (retries)
//! - `identity`, `policy`: client certificates -> `Identity`; Cedar policies, explain, tests
//! - `decisions`: the ban store (lock-free longest-prefix lookup), CrowdSec bridge and
//!   AppSec stage, Wazuh active-response messages
//! - `ratelimit`: governor-based keyed limits with bounded key state
//! - `error`: stage errors -> JSON responses
//! - `admin` (+ `admin_decisions`), `signals`, `cli`: operating the server
//! - `telemetry`: server logs; access records and their sinks (JSON, combined, SQLite,
//!   security events), Prometheus metrics, the last-minute window behind `wraith status` /
//!   `wraith top`
//! - `certs`: development certificates

pub mod admin;
mod admin_decisions;
pub mod body;
pub mod certs;
pub mod cli;
pub mod config;
pub mod decisions;
pub mod error;
pub mod files;
mod http1;
pub mod identity;
pub mod listener;
pub mod policy;
pub mod proxy;
pub mod ratelimit;
pub mod router;
pub mod runtime;
pub mod sdnotify;
pub mod signals;
pub mod telemetry;
pub mod upgrade;
pub mod upstream;
