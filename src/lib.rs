//! Wraith: a zero-trust security gateway and reverse proxy.
//!
//! # The request path
//!
//! ```text
//! accept (TCP)                      listener/      connection limit, TLS 1.3 handshake
//!   └─ HTTP/1.1 or HTTP/2           listener/conn  header-read and idle timeouts, drain
//!       │                           identity       verified client cert -> Identity (per connection)
//!       └─ Gateway::handle          proxy/         one pipeline for every protocol
//!           ├─ normalize path       proxy/path
//!           ├─ route                router         first match in file order, else 404
//!           ├─ policy               policy/        Cedar: identity x method x route; deny by default
//!           └─ respond | redirect | forward
//!                                   upstream/      pooled client, streamed bodies,
//!                                                  hop-by-hop out, X-Forwarded-* in
//! ```
//!
//! # Layout
//!
//! - `config`: `wraith.toml` -> raw serde mirror -> typed `Config`, every error at once
//! - `runtime`: `Snapshot` (config + everything built from it) behind ArcSwap; reload; drain
//! - `listener`: sockets, TLS, per-connection serving
//! - `proxy`: the pipeline (`Gateway::handle`), header rules, path normalization
//! - `router`, `upstream`: route matching; upstream pools and the forwarder
//! - `identity`, `policy`: client certificates -> `Identity`; Cedar policies, explain, tests
//! - `error`: stage errors -> JSON responses
//! - `admin`, `signals`, `cli`: operating the server
//! - `certs`: development certificates

pub mod admin;
pub mod body;
pub mod certs;
pub mod cli;
pub mod config;
pub mod error;
pub mod identity;
pub mod listener;
pub mod policy;
pub mod proxy;
pub mod router;
pub mod runtime;
pub mod signals;
pub mod telemetry;
pub mod upstream;
