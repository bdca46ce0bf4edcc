//! Shared rate limits (`shared = true`, `[rate_limit.redis]`) against Debian's redis-server:
//! two gateways enforce one budget, a refusal by a local limit leaves the shared ones
//! uncounted, buckets expire in Redis, and while Redis is down the limits fall back to
//! `on_error` (counted locally, or open) and come back with it.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A redis-server on a loopback port, without persistence. Killed on drop.
struct Redis {
    child: Child,
    port: u16,
}

impl Redis {
    fn start_on(port: u16) -> Redis {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("redis-server (Debian's package; .ci/install-deps.sh installs it)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        Redis { child, port }
    }

    fn start() -> Redis {
        Redis::start_on(unused_port())
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// `redis-cli` against this server.
    fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

fn config(setup: &Setup, redis: &str, limits: &str) -> String {
    format!(
        r#"{}
[rate_limit]
limits = [{limits}]

[rate_limit.redis]
url = "{redis}"
timeout = "200ms"

[[route]]
name = "home"
path = {{ prefix = "/" }}
respond = {{ status = 200, body = "ok\n" }}
"#,
        setup.listeners()
    )
}

/// A GET of `/` from the loopback address `from`: status, Retry-After and RateLimit-Policy.
async fn get_from(wraith: &Wraith, from: &str) -> (u16, Option<String>, Option<String>) {
    let client = reqwest::Client::builder()
        .local_address(from.parse::<std::net::IpAddr>().unwrap())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let resp = client.get(wraith.url("http", "/")).send().await.unwrap();
    let header = |n: &str| {
        resp.headers()
            .get(n)
            .map(|v| v.to_str().unwrap().to_string())
    };
    (
        resp.status().as_u16(),
        header("retry-after"),
        header("ratelimit-policy"),
    )
}

async fn status(wraith: &Wraith, from: &str) -> u16 {
    get_from(wraith, from).await.0
}

#[tokio::test]
async fn two_gateways_enforce_one_budget() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let redis = Redis::start();
    let limit = r#"{ name = "per-ip", key = "ip", rate = "3/m", burst = 3, shared = true }"#;
    let (a, b) = (Setup::new(), Setup::new());
    let (ca, cb) = (
        config(&a, &redis.url(), limit),
        config(&b, &redis.url(), limit),
    );
    let (a, b) = (a.start(&ca), b.start(&cb));

    assert_eq!(status(&a, "127.0.0.1").await, 200);
    assert_eq!(status(&b, "127.0.0.1").await, 200);
    assert_eq!(status(&a, "127.0.0.1").await, 200);
    let (code, retry, policy) = get_from(&b, "127.0.0.1").await;
    assert_eq!(code, 429, "the fourth request across both gateways passed");
    let retry: u64 = retry.expect("Retry-After").parse().unwrap();
    assert!((1..=20).contains(&retry), "Retry-After {retry}");
    assert_eq!(policy.as_deref(), Some("\"per-ip\";q=3;w=60"));
    assert_eq!(status(&a, "127.0.0.1").await, 429);
    // Another client has a budget of its own.
    assert_eq!(status(&b, "127.0.0.2").await, 200);

    let st = a.status().await;
    assert_eq!(st["rate_limits"][0]["shared"], true, "{st}");
    let (code, text, _) = a.cli(&["status"]);
    assert_eq!(code, 0);
    assert!(
        text.contains("rate limit   per-ip (by ip): shared in Redis"),
        "{text}"
    );

    // One key per client, expiring once its bucket is full again (a minute at most).
    let keys = redis.cli(&["--scan", "--pattern", "wraith:ratelimit:*"]);
    let mut keys: Vec<&str> = keys.lines().collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "wraith:ratelimit:per-ip:ip:127.0.0.1",
            "wraith:ratelimit:per-ip:ip:127.0.0.2"
        ]
    );
    let ttl: i64 = redis
        .cli(&["pttl", "wraith:ratelimit:per-ip:ip:127.0.0.1"])
        .trim()
        .parse()
        .unwrap();
    assert!((50_000..=61_000).contains(&ttl), "pttl {ttl}");
}

/// A route's own limits, a local per-address one first and a shared one for the whole
/// route: a request the local limit refuses does not spend the shared budget; a shadow
/// shared limit only reports.
#[tokio::test]
async fn a_request_a_local_limit_refuses_does_not_spend_the_shared_budget() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let redis = Redis::start();
    let setup = Setup::new();
    let cfg = config(&setup, &redis.url(), "").replace(
        "respond = {",
        r#"rate_limits = [
  { name = "per-ip", key = "ip", rate = "2/m", burst = 2 },
  { name = "route", key = "route", rate = "4/m", burst = 4, shared = true },
  { name = "watch", key = "route", rate = "1/m", burst = 1, shared = true, mode = "shadow" },
]
respond = {"#,
    );
    let wraith = setup.start(&cfg);
    assert_eq!(status(&wraith, "127.0.0.1").await, 200);
    assert_eq!(status(&wraith, "127.0.0.1").await, 200);
    for _ in 0..3 {
        assert_eq!(status(&wraith, "127.0.0.1").await, 429);
    }
    // The shared budget is 4: two spent, two left for the others.
    assert_eq!(status(&wraith, "127.0.0.2").await, 200);
    assert_eq!(status(&wraith, "127.0.0.3").await, 200);
    let (code, _, policy) = get_from(&wraith, "127.0.0.4").await;
    assert_eq!(code, 429);
    assert_eq!(policy.as_deref(), Some("\"route\";q=4;w=60"));
    // The route's own limits are its own buckets.
    let keys = redis.cli(&["--scan", "--pattern", "wraith:ratelimit:*"]);
    assert!(
        keys.lines()
            .any(|k| k == "wraith:ratelimit:route/home/route:route:home"),
        "{keys}"
    );
    // The shadow limit (1/m) would have refused the second request on: logged, never 429.
    wraith
        .wait_log(Duration::from_secs(5), |v| {
            v["message"] == "rate limit would refuse this request (shadow mode)"
                && v["limit"] == "watch"
        })
        .unwrap_or_else(|| panic!("no shadow report:\n{}", wraith.log()));
}

/// Redis gone: with `on_error = "local"` (the default) each gateway counts the shared
/// limits itself; with `"open"` they do not apply. Either way the failure is logged, and
/// once Redis is back the limits are shared again.
#[tokio::test]
async fn without_redis_shared_limits_fall_back_and_come_back() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let mut redis = Redis::start();
    let port = redis.port;
    let limit = r#"{ name = "per-ip", key = "ip", rate = "2/m", burst = 2, shared = true }"#;
    let setup = Setup::new();
    let local = config(&setup, &redis.url(), limit);
    let wraith = setup.start(&local);
    assert_eq!(status(&wraith, "127.0.0.1").await, 200);
    redis.stop();

    // Counted here alone: a fresh bucket of 2 for this gateway.
    assert_eq!(status(&wraith, "127.0.0.2").await, 200);
    assert_eq!(status(&wraith, "127.0.0.2").await, 200);
    assert_eq!(status(&wraith, "127.0.0.2").await, 429);
    wraith
        .wait_log(Duration::from_secs(5), |v| {
            v["level"] == "WARN"
                && v["message"].as_str().is_some_and(|m| {
                    m.starts_with("shared rate limits: Redis failed")
                        && m.contains("counted in this instance alone")
                })
        })
        .unwrap_or_else(|| panic!("no warning:\n{}", wraith.log()));

    wraith.write_config(&local.replace(
        "timeout = \"200ms\"",
        "timeout = \"200ms\"\non_error = \"open\"",
    ));
    wraith.reload().unwrap();
    for _ in 0..4 {
        assert_eq!(status(&wraith, "127.0.0.3").await, 200);
    }

    // Redis back (empty): the limits count there again once the second's rest is over.
    let redis = Redis::start_on(port);
    let deadline = Instant::now() + Duration::from_secs(15);
    while redis
        .cli(&["--scan", "--pattern", "wraith:ratelimit:*"])
        .trim()
        .is_empty()
    {
        assert!(Instant::now() < deadline, "Redis was not used again");
        assert_eq!(status(&wraith, "127.0.0.5").await, 200);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(status(&wraith, "127.0.0.4").await, 200);
    assert_eq!(status(&wraith, "127.0.0.4").await, 200);
    assert_eq!(status(&wraith, "127.0.0.4").await, 429);
}

#[test]
fn shared_limits_need_a_usable_redis_section() {
    let setup = Setup::new();
    let path = setup.dir.path().join("wraith.toml");
    let test = |cfg: &str| {
        std::fs::write(&path, cfg).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_wraith"))
            .args(["test", "-c"])
            .arg(&path)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    let limit = r#"{ key = "ip", rate = "3/m", shared = true }"#;
    let without = config(&setup, "redis://127.0.0.1:1", limit).replace(
        "[rate_limit.redis]\nurl = \"redis://127.0.0.1:1\"\ntimeout = \"200ms\"\n",
        "",
    );
    let out = test(&without);
    assert!(
        out.contains("rate_limit.limits[0].shared") && out.contains("needs [rate_limit.redis]"),
        "{out}"
    );
    let out = test(&config(&setup, "rediss://127.0.0.1:1", limit));
    assert!(
        out.contains("rate_limit.redis.url") && out.contains("\"rediss\" is not supported"),
        "{out}"
    );
    let out = test(&config(&setup, "http://127.0.0.1:1", limit));
    assert!(out.contains("invalid Redis URL"), "{out}");
    let out = test(&config(&setup, "redis://127.0.0.1:1", limit).replace(
        "timeout = \"200ms\"",
        "timeout = \"200ms\"\non_error = \"closed\"\npassword_file = \"nope\"",
    ));
    assert!(
        out.contains("rate_limit.redis.on_error") && out.contains("rate_limit.redis.password_file"),
        "{out}"
    );
}
