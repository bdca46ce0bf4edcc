//! CPU cost of the identity and policy stages, in process (no sockets, no TLS):
//!
//! - identity extraction per connection (`Identity::from_der` on an ECDSA P-256 client cert),
//! - the principal entity, built on a certificate's first connection, then shared by the
//!   certificate's later connections,
//! - `PolicyEngine::authorize` per request with the shipped policies, for an anonymous client
//!   on a public route and a client certificate on the API route,
//! - with a single unconditional permit (decided at load: no Cedar call; "policy off"),
//! - with a single conditional permit (the Cedar floor: context + one evaluation).
//!
//! Run: `cargo run --release --example policy_cost [-- ITERATIONS]`. Reports thread CPU time
//! per operation. Part of bench/mtls-policy (see README.md there), not of `cargo test`.

use std::hint::black_box;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use http::{Method, Version};
use wraith::config::{self, LoadOptions};
use wraith::identity::Identity;
use wraith::policy::{Access, ConnCache, PolicyEngine};
use wraith::proxy::{ConnInfo, TlsInfo};
use wraith::router::{Route, Router};

fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn measure(name: &str, n: u64, mut f: impl FnMut()) {
    for _ in 0..n / 10 {
        f();
    }
    let start = thread_cpu_ns();
    for _ in 0..n {
        f();
    }
    let per = (thread_cpu_ns() - start) as f64 / n as f64;
    println!("{name:<58} {:>9.0} ns CPU/op", per);
}

fn router(cfg: &config::Config) -> Router {
    Router::bare(cfg)
}

fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(200_000);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let shipped = config::load(&root.join("wraith.toml"), LoadOptions::default())
        .unwrap_or_else(|e| panic!("shipped config: {e}"));
    let engine = PolicyEngine::build(&shipped).expect("engine");
    let routes = router(&shipped);

    // Minimal configs: one route, one policy.
    let one_policy = |policy: &str| {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("p.cedar"), policy).expect("write policy");
        let cfg = config::load_str(
            &dir.path().join("w.toml"),
            "[[listener]]\nname='l'\naddress='127.0.0.1:0'\nprotocol='http'\n[policy]\ndir='.'\n\
             [[route]]\nname='api'\npath={prefix='/api/'}\nrespond={status=200}\n",
            LoadOptions::default(),
        )
        .expect("config");
        let engine = PolicyEngine::build(&cfg).expect("engine");
        (engine, router(&cfg))
    };
    let (floor, floor_routes) = one_policy("@id(\"all\")\npermit(principal, action, resource);\n");
    let (cedar, cedar_routes) = one_policy(
        "@id(\"api\")\npermit(principal, action, resource) when { context.path like \"/api/*\" };\n",
    );

    let ca = wraith::certs::Ca::new("bench CA").expect("ca");
    let issued = ca
        .issue_client("dev", Some("spiffe://wraith.dev/client/dev"))
        .expect("client cert");
    let der = rustls_pki_types::pem::PemObject::from_pem_slice(issued.cert_pem.as_bytes())
        .map(|c: rustls_pki_types::CertificateDer<'static>| c.to_vec())
        .expect("pem");

    measure("identity extraction (per connection)", n / 10, || {
        black_box(Identity::from_der(black_box(&der)).ok());
    });
    let identity = Arc::new(Identity::from_der(&der).expect("identity").0);

    let conn = |identity: Option<Arc<Identity>>| ConnInfo {
        peer: SocketAddr::from(([127, 0, 0, 1], 40000)),
        local: SocketAddr::from(([127, 0, 0, 1], 8443)),
        listener: Arc::from("https"),
        tls: Some(TlsInfo {
            version: "TLSv1.3",
            group: Some("X25519MLKEM768"),
            alpn: Some("h2".into()),
            sni: Some("localhost".into()),
        }),
        identity,
        policy_cache: ConnCache::default(),
        limits: Default::default(),
        close: None,
        unnamed_client: false,
    };
    let anon = conn(None);
    let client = conn(Some(identity.clone()));
    let find = |r: &Router, p: &str| {
        r.find(Some("localhost"), p, &Method::GET)
            .expect("route")
            .index
    };
    let (anon, client) = (&anon, &client);
    let health = &routes.routes()[find(&routes, "/healthz")];
    let api = &routes.routes()[find(&routes, "/api/orders")];
    let floor_api = &floor_routes.routes()[find(&floor_routes, "/api/orders")];
    let cedar_api = &cedar_routes.routes()[find(&cedar_routes, "/api/orders")];
    // A certificate the engine has not seen: another fingerprint each time (the engine keeps
    // principals by fingerprint for new connections).
    let unseen = std::cell::Cell::new(0u64);
    measure(
        "principal entity, first connection of a certificate",
        n / 10,
        || {
            unseen.set(unseen.get() + 1);
            let mut id = (**client.identity.as_ref().expect("identity")).clone();
            id.fingerprint = format!("{:064x}", unseen.get());
            let fresh = ConnInfo {
                identity: Some(Arc::new(id)),
                policy_cache: ConnCache::default(),
                limits: Default::default(),
                ..client.clone()
            };
            black_box(
                engine
                    .authorize(&access(api, &fresh, "/api/orders"))
                    .is_ok(),
            );
        },
    );
    measure(
        "principal entity, a new connection of a known certificate",
        n / 10,
        || {
            let fresh = ConnInfo {
                policy_cache: ConnCache::default(),
                limits: Default::default(),
                ..client.clone()
            };
            black_box(
                engine
                    .authorize(&access(api, &fresh, "/api/orders"))
                    .is_ok(),
            );
        },
    );
    let input = wraith::policy::entities::ContextInput {
        method: "GET",
        host: "localhost",
        path: "/api/orders",
        query: "",
        source_ip: anon.peer.ip(),
        listener: "https",
        protocol: "h2",
        tls_version: "TLSv1.3",
        tls_group: "X25519MLKEM768",
        early_data: false,
        time: std::time::SystemTime::now(),
        utc_offset: 0,
    };
    measure("  of which: the ip value", n, || {
        black_box(wraith::policy::entities::ip_value(black_box(anon.peer.ip())).is_ok());
    });
    let ip = wraith::policy::entities::ip_value(anon.peer.ip()).expect("ip");
    measure(
        "  of which: the context around a cached ip value",
        n,
        || {
            black_box(
                wraith::policy::entities::context_with_ip(black_box(&input), ip.clone()).is_ok(),
            );
        },
    );
    measure("  of which: building the context", n, || {
        black_box(wraith::policy::entities::context(black_box(&input)).is_ok());
    });
    measure(
        "authorize: 1 unconditional permit (no Cedar call)",
        n,
        || {
            black_box(
                floor
                    .authorize(&access(floor_api, anon, "/api/orders"))
                    .is_ok(),
            );
        },
    );
    measure("authorize: 1 conditional permit, anonymous", n, || {
        black_box(
            cedar
                .authorize(&access(cedar_api, anon, "/api/orders"))
                .is_ok(),
        );
    });
    measure("authorize: 1 conditional permit, client cert", n, || {
        black_box(
            cedar
                .authorize(&access(cedar_api, client, "/api/orders"))
                .is_ok(),
        );
    });
    measure(
        "authorize: shipped policies, anonymous GET /healthz",
        n,
        || {
            black_box(engine.authorize(&access(health, anon, "/healthz")).is_ok());
        },
    );
    measure(
        "authorize: shipped policies, client cert GET /api/orders",
        n,
        || {
            black_box(
                engine
                    .authorize(&access(api, client, "/api/orders"))
                    .is_ok(),
            );
        },
    );

    // The rate-limit stage keyed by identity (issue: <= 1 µs per request), against 10,000
    // distinct client certificates' identities in rotation and against the client address.
    // wrk cannot present client certificates, so bench/decisions.py measures the ip key over
    // sockets and this measures what the identity key costs on top of the same check.
    let limit = |key: wraith::config::LimitKey| {
        Arc::new(wraith::ratelimit::Limiter::new(
            wraith::config::RateLimitConfig {
                name: Arc::from("bench"),
                key,
                count: std::num::NonZeroU32::new(1_000_000).expect("nonzero"),
                per: std::time::Duration::from_secs(1),
                burst: std::num::NonZeroU32::new(1_000_000).expect("nonzero"),
                mode: wraith::config::LimitMode::Enforce,
                shared: false,
            },
            100_000,
        ))
    };
    let identities: Vec<Arc<Identity>> = (0..10_000)
        .map(|i| {
            let mut id = (*identity).clone();
            id.spiffe_id = Some(format!("spiffe://wraith.dev/client/{i}"));
            id.fingerprint = format!("{i:064x}");
            Arc::new(id)
        })
        .collect();
    let headers = http::HeaderMap::new();
    let by_identity = [limit(wraith::config::LimitKey::Identity)];
    let by_ip = [limit(wraith::config::LimitKey::Ip)];
    let (identity_names, ip_names) = (
        wraith::ratelimit::names(&by_identity),
        wraith::ratelimit::names(&by_ip),
    );
    let mut i = 0usize;
    measure("rate limit, identity key (10,000 identities)", n, || {
        i = (i + 1) % identities.len();
        let facts = wraith::ratelimit::RequestFacts {
            client: anon.peer.ip(),
            peer_trusted: false,
            identity: Some(&identities[i]),
            headers: &headers,
            route: "api",
        };
        black_box(wraith::ratelimit::check(&by_identity, &identity_names, &facts).is_ok());
    });
    measure("rate limit, ip key (one address)", n, || {
        let facts = wraith::ratelimit::RequestFacts {
            client: anon.peer.ip(),
            peer_trusted: false,
            identity: None,
            headers: &headers,
            route: "api",
        };
        black_box(wraith::ratelimit::check(&by_ip, &ip_names, &facts).is_ok());
    });
}

fn access<'a>(route: &'a Route, conn: &'a ConnInfo, path: &'a str) -> Access<'a> {
    Access {
        route,
        method: &Method::GET,
        host: Some("localhost"),
        path,
        query: None,
        version: Version::HTTP_2,
        early_data: false,
        client_ip: conn.peer.ip(),
        conn,
    }
}
