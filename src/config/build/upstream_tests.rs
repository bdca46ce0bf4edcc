//! Building `[[upstream]]` and route `compression`: defaults, every key, and errors with
//! their key paths and positions.

use std::path::Path;
use std::time::Duration;

use crate::config::*;

const BASE: &str = "[[listener]]\nname='l'\naddress='127.0.0.1:0'\nprotocol='http'\n[[route]]\nname='r'\nupstream='u'\n";

fn load(upstream: &str) -> Result<Config, String> {
    load_str(
        Path::new("t.toml"),
        &format!("{BASE}[[upstream]]\nname='u'\n{upstream}\n"),
        LoadOptions::default(),
    )
    .map_err(|e| e.to_string())
}

#[test]
fn upstream_defaults() {
    let c = load("endpoints = ['127.0.0.1:9000']").unwrap();
    let u = &c.upstreams[0];
    assert_eq!(u.algorithm, Algorithm::RoundRobin);
    assert_eq!(u.hash_key, HashKey::ClientIp);
    assert!(!u.fail_open);
    assert_eq!(u.retries, 2);
    assert_eq!(u.try_duration, Duration::from_secs(10));
    assert_eq!(u.retry_buffer, 64 * 1024);
    assert_eq!(u.max_pending, 1024);
    assert_eq!(u.h2_max_streams, 100);
    assert!(u.health_check.is_none());
    assert_eq!(u.outlier, OutlierConfig::default());
    assert!(u.tls.is_none());
    let e = &u.endpoints[0];
    assert_eq!((e.weight, e.max_connections, e.tls), (1, usize::MAX, false));
}

#[test]
fn upstream_every_key() {
    let c = load(
        "endpoints = ['127.0.0.1:9000', { address = 'http://127.0.0.1:9001', weight = 3, max_connections = 7 }]
        algorithm = 'ip_hash'
        hash_key = 'cookie:session'
        fail_open = true
        max_connections = 50
        max_pending = 5
        pending_timeout = '2s'
        retries = 4
        try_duration = '3s'
        retry_buffer = '1KiB'
        outlier = { consecutive_failures = 2, base_ejection_time = '1s', max_ejection_time = '8s', max_ejected_percent = 30 }
        [upstream.health_check]
        path = '/healthz?full=1'
        host = 'health.internal'
        interval = '1s'
        timeout = '500ms'
        expect_status = '200-204'
        rise = 3
        fall = 4
        jitter = '100ms'",
    )
    .unwrap();
    let u = &c.upstreams[0];
    assert_eq!(u.algorithm, Algorithm::IpHash);
    assert_eq!(u.hash_key, HashKey::Cookie("session".into()));
    assert!(u.fail_open);
    assert_eq!(u.endpoints[0].max_connections, 50, "upstream default");
    assert_eq!(
        (u.endpoints[1].weight, u.endpoints[1].max_connections),
        (3, 7)
    );
    assert_eq!((u.max_pending, u.retries, u.retry_buffer), (5, 4, 1024));
    let h = u.health_check.as_ref().unwrap();
    assert_eq!(h.path, "/healthz?full=1");
    assert_eq!(h.expect_status, (200, 204));
    assert_eq!((h.rise, h.fall), (3, 4));
    assert_eq!(u.outlier.max_ejected_percent, 30);
}

#[test]
fn upstream_errors_name_the_key() {
    let cases = [
        (
            "endpoints = ['127.0.0.1:1']\nalgorithm = 'fastest'",
            "upstream[0].algorithm",
            "unknown algorithm",
        ),
        (
            "endpoints = ['127.0.0.1:1']\nprotocol = 'h2c'\nh2_max_streams = 0",
            "upstream[0].h2_max_streams",
            "0 is out of range",
        ),
        (
            "endpoints = ['127.0.0.1:1']\nhash_key = 'query:x'",
            "upstream[0].hash_key",
            "invalid hash_key",
        ),
        (
            "endpoints = [{ address = '127.0.0.1:1', weight = 0 }]",
            "upstream[0].endpoints[0]",
            "weight 0",
        ),
        (
            "endpoints = [{ address = '127.0.0.1:1', colour = 'red' }]",
            "upstream[0]",
            "unknown field `colour`",
        ),
        (
            "endpoints = ['127.0.0.1:1']\nretries = 99",
            "upstream[0].retries",
            "out of range",
        ),
        (
            "endpoints = ['127.0.0.1:1']\n[upstream.health_check]\nexpect_status = '300-200'",
            "upstream[0].health_check.expect_status",
            "invalid status range",
        ),
        (
            "endpoints = ['127.0.0.1:1']\n[upstream.health_check]\ninterval = '1s'\njitter = '2s'",
            "upstream[0].health_check.jitter",
            "shorter than the interval",
        ),
        (
            "endpoints = ['127.0.0.1:1']\nprotocol = 'h2'",
            "upstream[0].protocol",
            "must be https://",
        ),
        (
            "endpoints = ['https://127.0.0.1:1']\nprotocol = 'h2c'",
            "upstream[0].protocol",
            "h2c is cleartext",
        ),
        (
            "endpoints = ['https://127.0.0.1:1']\ntls = { ca = '/nonexistent/ca.pem' }",
            "upstream[0].tls.ca",
            "cannot read",
        ),
        (
            "endpoints = ['127.0.0.1:1/path']",
            "upstream[0].endpoints[0]",
            "path is not allowed",
        ),
    ];
    for (toml, key, msg) in cases {
        let err = load(toml).unwrap_err();
        assert!(err.contains(key) && err.contains(msg), "{toml}\n-> {err}");
        assert!(err.starts_with("t.toml:"), "positioned: {err}");
    }
}

#[test]
fn route_compression() {
    let load_route = |c: &str| {
        load_str(
            Path::new("t.toml"),
            &format!("[[listener]]\nname='l'\naddress='127.0.0.1:0'\nprotocol='http'\n[[upstream]]\nname='u'\nendpoints=['127.0.0.1:1']\n[[route]]\nname='r'\nupstream='u'\n{c}\n"),
            LoadOptions::default(),
        )
        .map_err(|e| e.to_string())
    };
    let c = load_route("").unwrap();
    assert!(c.routes[0].compression.is_none(), "off by default");
    let c = load_route("compression = true").unwrap();
    let comp = c.routes[0].compression.as_ref().unwrap();
    assert_eq!(
        comp.algorithms,
        vec![Encoding::Zstd, Encoding::Brotli, Encoding::Gzip]
    );
    assert_eq!(comp.min_size, 1024);
    let c = load_route(
        "compression = { algorithms = ['gzip'], min_size = '10KiB', types = ['text/html'] }",
    )
    .unwrap();
    let comp = c.routes[0].compression.as_ref().unwrap();
    assert_eq!(comp.algorithms, vec![Encoding::Gzip]);
    assert_eq!(comp.min_size, 10 * 1024);
    assert_eq!(comp.types, vec!["text/html".to_string()]);
    let err = load_route("compression = { algorithms = ['lz4'] }").unwrap_err();
    assert!(err.contains("route[0].compression.algorithms"), "{err}");
}

/// `h2_max_streams`: per connection of an HTTP/2 upstream; on an HTTP/1.1 one it is ignored,
/// with a warning.
#[test]
fn h2_max_streams_applies_to_http2_upstreams() {
    let c = load("endpoints = ['127.0.0.1:1']\nprotocol = 'h2c'\nh2_max_streams = 250").unwrap();
    assert_eq!(c.upstreams[0].h2_max_streams, 250);
    assert!(
        !c.warnings.iter().any(|w| w.contains("h2_max_streams")),
        "{:?}",
        c.warnings
    );
    let c = load("endpoints = ['127.0.0.1:1']\nh2_max_streams = 250").unwrap();
    assert!(
        c.warnings
            .iter()
            .any(|w| w.contains("upstream[0].h2_max_streams only applies to protocol")),
        "{:?}",
        c.warnings
    );
}

#[test]
fn a_pem_file_does_not_print_its_contents() {
    let key = PemFile {
        path: "client-key.pem".into(),
        pem: std::sync::Arc::from(&b"-----BEGIN PRIVATE KEY-----\nMC4CAQAw\n"[..]),
    };
    let printed = format!("{key:?}");
    assert!(printed.contains("client-key.pem"), "{printed}");
    assert!(!printed.contains("77, 67"), "{printed}");
    assert!(!printed.contains("PRIVATE"), "{printed}");
}
