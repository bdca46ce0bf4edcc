//! Shared rate limits (`shared = true`, `[rate_limit.redis]`) against Debian's redis-server:
//! two gateways enforce one budget, a refusal by a local limit leaves the shared ones
//! uncounted, buckets expire in Redis, and while Redis is down the limits fall back to
//! `on_error` (counted locally, or open) and come back with it. Over TLS (`rediss://`, Redis
//! started with `--tls-port`): the certificate is verified (CA, host name), a client
//! certificate is presented when Redis asks for one, and the failures are counted in
//! `wraith_rate_limit_store_errors_total`.

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use common::*;

/// A redis-server on a loopback port, without persistence. Killed on drop.
struct Redis {
    child: Child,
    port: u16,
    /// What `redis-cli` needs to reach it (`--tls`, its CA and client certificate).
    cli_args: Vec<String>,
}

impl Redis {
    fn start_on(port: u16) -> Redis {
        Redis::start_with(port, &[])
    }

    /// A redis-server on `port` with more arguments, e.g. `["--requirepass", "x"]`.
    fn start_with(port: u16, extra: &[&str]) -> Redis {
        Redis::launch(port, &["--port", &port.to_string()], extra, Vec::new())
    }

    /// A redis-server speaking TLS only, with `pki`'s server certificate (localhost,
    /// 127.0.0.1); `client_certs`: whether it demands a client certificate of `pki`'s CA.
    fn start_tls(pki: &Pki, client_certs: bool, extra: &[&str]) -> Redis {
        let port = unused_port();
        let path = |p: &std::path::Path| p.to_str().unwrap().to_string();
        let (cli_cert, cli_key) = pki.client("redis-cli", None);
        let tls = [
            "--port".to_string(),
            "0".into(),
            "--tls-port".into(),
            port.to_string(),
            "--tls-cert-file".into(),
            path(&pki.server_cert),
            "--tls-key-file".into(),
            path(&pki.server_key),
            "--tls-ca-cert-file".into(),
            path(&pki.ca_pem),
            "--tls-auth-clients".into(),
            if client_certs { "yes" } else { "no" }.into(),
        ];
        let tls: Vec<&str> = tls.iter().map(String::as_str).collect();
        let cli = vec![
            "--tls".to_string(),
            "--cacert".into(),
            path(&pki.ca_pem),
            "--cert".into(),
            path(&cli_cert),
            "--key".into(),
            path(&cli_key),
        ];
        Redis::launch(port, &tls, extra, cli)
    }

    fn launch(port: u16, listen: &[&str], extra: &[&str], cli_args: Vec<String>) -> Redis {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1"])
            .args(listen)
            .args(["--save", "", "--appendonly", "no"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("redis-server (Debian's package; .ci/install-deps.sh installs it)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        Redis {
            child,
            port,
            cli_args,
        }
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
            .args(&self.cli_args)
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

/// Two gateways sharing `redis` with the shared limits `limits`.
fn two_gateways(redis: &Redis, limits: &str) -> (Wraith, Wraith) {
    let (a, b) = (Setup::new(), Setup::new());
    let (ca, cb) = (
        config(&a, &redis.url(), limits),
        config(&b, &redis.url(), limits),
    );
    (a.start(&ca), b.start(&cb))
}

async fn status(wraith: &Wraith, from: &str) -> u16 {
    get_from(wraith, from).await.0
}

#[tokio::test]
async fn two_gateways_enforce_one_budget() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let redis = Redis::start();
    let limit = r#"{ name = "per-ip", key = "ip", rate = "3/m", burst = 3, shared = true }"#;
    let (a, b) = two_gateways(&redis, limit);

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
    assert_eq!(st["rate_limit_redis"]["url"], redis.url(), "{st}");
    assert_eq!(st["rate_limit_redis"]["failures"], 0, "{st}");
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
    let st = wraith.status().await;
    let redis_state = &st["rate_limit_redis"];
    assert!(redis_state["failures"].as_u64() >= Some(1), "{st}");
    assert!(redis_state["last_error"].is_string(), "{st}");
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
    let out = test(&config(&setup, "rediss://127.0.0.1:1", limit).replace(
        "timeout = \"200ms\"",
        "timeout = \"200ms\"\nca = \"no-such-ca.pem\"\ncert = \"ca.pem\"",
    ));
    assert!(
        out.contains("rate_limit.redis.ca")
            && out.contains("cannot read")
            && out.contains("no-such-ca.pem")
            && out.contains("a client certificate needs both cert and key"),
        "{out}"
    );
    // TLS settings with a cleartext URL would do nothing.
    let out = test(&config(&setup, "redis://127.0.0.1:1", limit).replace(
        "timeout = \"200ms\"",
        "timeout = \"200ms\"\nca = \"ca.pem\"\ncert = \"server.pem\"\nkey = \"server-key.pem\"\nserver_name = \"redis.internal\"",
    ));
    for key in ["ca", "cert", "key", "server_name"] {
        assert!(
            out.contains(&format!("rate_limit.redis.{key}")) && out.contains("use rediss://"),
            "{key}: {out}"
        );
    }
    // A key that is no key; a URL asking for no verification.
    std::fs::write(setup.dir.path().join("bad-key.pem"), "not a key\n").unwrap();
    let out = test(&config(&setup, "rediss://127.0.0.1:1", limit).replace(
        "timeout = \"200ms\"",
        "timeout = \"200ms\"\nca = \"ca.pem\"\ncert = \"server.pem\"\nkey = \"bad-key.pem\"",
    ));
    assert!(
        out.contains("rate_limit.redis")
            && out.contains("client key")
            && out.contains("bad-key.pem"),
        "{out}"
    );
    let out = test(&config(&setup, "rediss://127.0.0.1:1/0#insecure", limit));
    assert!(
        out.contains("rate_limit.redis.url") && out.contains("#insecure is not supported"),
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

/// Redis refuses the password Wraith has (a rotation done in the wrong order, an ACL user
/// not created yet, a Redis restarted without the `requirepass` set at run time); then it
/// accepts it. The instance should use Redis again after its second's rest, as after an
/// outage. It does not: `ConnectionManager` reconnects only after an I/O error, so the failed
/// connect (an authentication error) is kept and answered to every later request without
/// asking Redis, and a reload with the same settings keeps that store. The shared limits
/// stay counted per instance until Wraith restarts, while a gateway started now with the
/// same settings counts in Redis at once.
#[tokio::test]
async fn a_password_redis_refused_once_is_tried_again() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let redis = Redis::start_with(unused_port(), &["--requirepass", "old-secret"]);
    let cli = |pass: &str, args: &[&str]| {
        let mut all = vec!["-a", pass, "--no-auth-warning"];
        all.extend_from_slice(args);
        redis.cli(&all)
    };
    let keys = || cli("new-secret", &["--scan", "--pattern", "wraith:ratelimit:*"]);
    let limit = r#"{ name = "per-ip", key = "ip", rate = "2/m", burst = 2, shared = true }"#;
    let with_password = |setup: &Setup| {
        std::fs::write(setup.dir.path().join("redis-password"), "new-secret\n").unwrap();
        config(setup, &redis.url(), limit).replace(
            "timeout = \"200ms\"",
            "timeout = \"200ms\"\npassword_file = \"redis-password\"",
        )
    };
    let setup = Setup::new();
    let cfg = with_password(&setup);
    let wraith = setup.start(&cfg);
    // Refused: counted here alone, for a few of the second's rests.
    for i in 0..8 {
        assert_eq!(status(&wraith, &format!("127.0.0.{}", 10 + i)).await, 200);
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
    wraith
        .wait_log(Duration::from_secs(5), |v| {
            v["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("shared rate limits: Redis failed"))
        })
        .unwrap_or_else(|| panic!("no warning:\n{}", wraith.log()));

    // Redis now takes the password Wraith has.
    let set = cli(
        "old-secret",
        &["config", "set", "requirepass", "new-secret"],
    );
    assert_eq!(set.trim(), "OK");
    // A gateway started now counts there at once.
    let fresh = Setup::new();
    let fresh_cfg = with_password(&fresh);
    let fresh = fresh.start(&fresh_cfg);
    assert_eq!(status(&fresh, "127.0.0.2").await, 200);
    assert!(
        keys()
            .lines()
            .any(|k| k == "wraith:ratelimit:per-ip:ip:127.0.0.2"),
        "{}",
        keys()
    );
    // The first one, reloaded or not, should too once its rest is over.
    wraith.reload().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    for n in 0.. {
        // A fresh client each time: the fallback's own budget is no part of the question.
        assert_eq!(status(&wraith, &format!("127.0.1.{n}")).await, 200);
        if keys().contains(":ip:127.0.1.") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "10 s after Redis took the password, the gateway it once refused still counts \
             alone; Redis holds:\n{}",
            keys()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// A TCP relay to a local port whose connections can go silent: after `freeze`, every
/// connection made so far swallows what either side sends, as a firewall, NAT or load
/// balancer that forgot it drops its packets (no reset, no answer); connections made after
/// it pass.
struct Relay {
    port: u16,
    frozen_below: Arc<AtomicU64>,
    next: Arc<AtomicU64>,
}

impl Relay {
    async fn start(to: u16) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let frozen_below = Arc::new(AtomicU64::new(0));
        let next = Arc::new(AtomicU64::new(0));
        let (frozen, count) = (frozen_below.clone(), next.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let id = count.fetch_add(1, Ordering::SeqCst);
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", to)).await else {
                    continue;
                };
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                for (mut from, mut into) in
                    [(client_read, server_write), (server_read, client_write)]
                {
                    let frozen = frozen.clone();
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 16 * 1024];
                        while let Ok(n @ 1..) = from.read(&mut buf).await {
                            if id >= frozen.load(Ordering::SeqCst)
                                && into.write_all(&buf[..n]).await.is_err()
                            {
                                break;
                            }
                        }
                    });
                }
            }
        });
        Relay {
            port,
            frozen_below,
            next,
        }
    }

    fn freeze(&self) {
        self.frozen_below
            .store(self.next.load(Ordering::SeqCst), Ordering::SeqCst);
    }
}

/// The path to Redis silently drops the connection Wraith holds (a firewall's or NAT's idle
/// timeout, a cloud load balancer's), while a new connection would work. Every request then
/// times out, and the instance falls back; but a timeout never replaces the connection
/// (`ConnectionManager` reconnects only on an error that says the connection dropped, which
/// a silent path never gives, short of the kernel's retransmission limit: ~15 minutes with
/// Linux's defaults). So after each second's rest Redis is asked again on the same dead
/// connection, and the shared limits stay counted per instance, each request of each
/// second's first `timeout` paying it, although Redis answers a new connection at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_went_silent_is_replaced() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let redis = Redis::start();
    let relay = Relay::start(redis.port).await;
    let keys = || redis.cli(&["--scan", "--pattern", "wraith:ratelimit:*"]);
    let limit = r#"{ name = "per-ip", key = "ip", rate = "2/m", burst = 2, shared = true }"#;
    let setup = Setup::new();
    let cfg = config(
        &setup,
        &format!("redis://127.0.0.1:{}/0", relay.port),
        limit,
    );
    let wraith = setup.start(&cfg);
    assert_eq!(status(&wraith, "127.0.0.1").await, 200);
    assert!(keys().contains("per-ip:ip:127.0.0.1"), "{}", keys());

    relay.freeze();
    // A new connection through the relay works.
    let pong = Command::new("redis-cli")
        .args(["-p", &relay.port.to_string(), "ping"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&pong.stdout).trim(), "PONG");

    let deadline = Instant::now() + Duration::from_secs(10);
    for n in 0.. {
        // A fresh client each time: the fallback's own budget is no part of the question.
        assert_eq!(status(&wraith, &format!("127.0.1.{n}")).await, 200);
        if keys().contains(":ip:127.0.1.") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "10 s after its connection went silent, the gateway still counts alone (Redis \
             answers a new connection):\n{}",
            wraith.log()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // No answer in time: counted as such, whichever timer saw it first.
    assert!(store_errors(&wraith, "timeout").await >= 1.0);
    assert_eq!(store_errors(&wraith, "error").await, 0.0);
}

/// Raising a shared limit. Its key names the limit but not its rate or burst, so the bucket
/// stays, and its theoretical arrival time was set an old interval ahead: read against the new
/// one, a client the old 1/h limit held back would be refused by the new 100/s one for the rest
/// of the hour (Retry-After about 3600), whatever the new limit allows. It is read in requests:
/// one spent of the new burst of 100.
#[tokio::test]
async fn a_raised_shared_limit_reads_what_was_spent_in_requests() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let redis = Redis::start();
    let setup = Setup::new();
    let slow = r#"{ name = "per-ip", key = "ip", rate = "1/h", burst = 1, shared = true }"#;
    let cfg = config(&setup, &redis.url(), slow);
    let wraith = setup.start(&cfg);
    assert_eq!(status(&wraith, "127.0.0.1").await, 200);
    assert_eq!(status(&wraith, "127.0.0.1").await, 429);

    let fast = r#"{ name = "per-ip", key = "ip", rate = "100/s", burst = 100, shared = true }"#;
    wraith.write_config(&cfg.replace(slow, fast));
    wraith.reload().unwrap();
    let (code, retry, policy) = get_from(&wraith, "127.0.0.1").await;
    assert_eq!(
        code, 200,
        "refused by the raised limit ({policy:?}), Retry-After {retry:?}"
    );
}

/// A reload that changes a shared limit's burst must not hand every client a fresh one (nor
/// must a rolling deploy, whose instances count under both settings for a while): the
/// requests a client spent carry over, as they do for a local limit.
#[tokio::test]
async fn a_changed_shared_limit_keeps_what_each_client_spent() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let redis = Redis::start();
    let files = Setup::new();
    let limit = |burst: u32| {
        format!(
            r#"{{ name = "per-ip", key = "ip", rate = "1/h", burst = {burst}, shared = true }}"#
        )
    };
    // A long timeout: a request counted by the local fallback would prove nothing.
    let cfg = |burst| {
        config(&files, &redis.url(), &limit(burst))
            .replace("timeout = \"200ms\"", "timeout = \"5s\"")
    };
    let wraith = Setup::new().start(&cfg(3));
    assert_eq!(status(&wraith, "127.0.0.1").await, 200);
    assert_eq!(status(&wraith, "127.0.0.1").await, 200);

    // Burst 2: both spent.
    wraith.write_config(&cfg(2));
    wraith.reload().unwrap();
    assert_eq!(status(&wraith, "127.0.0.1").await, 429);
    // Burst 4: two left, not four.
    wraith.write_config(&cfg(4));
    wraith.reload().unwrap();
    assert_eq!(status(&wraith, "127.0.0.1").await, 200);
    assert_eq!(status(&wraith, "127.0.0.1").await, 200);
    assert_eq!(status(&wraith, "127.0.0.1").await, 429);
    assert_eq!(store_errors(&wraith, "timeout").await, 0.0);
}

/// `config_with` for a gateway whose Redis connection must work from its first request: the
/// first connect includes a TLS handshake, which a debug build on a loaded 2-core machine
/// does not always finish within `config`'s 200 ms (a failure would send the request to
/// `on_error`).
fn config_tls(setup: &Setup, redis: &str, limits: &str, more: &str) -> String {
    config_with(setup, redis, limits, more).replace("timeout = \"200ms\"", "timeout = \"2s\"")
}

/// `config` for Redis reached through `relay`, with this `timeout`.
fn through_relay(setup: &Setup, relay: &Relay, limits: &str, timeout: &str) -> String {
    config(
        setup,
        &format!("redis://127.0.0.1:{}/0", relay.port),
        limits,
    )
    .replace("timeout = \"200ms\"", &format!("timeout = \"{timeout}\""))
}

/// `config` with more lines in `[rate_limit.redis]`.
fn config_with(setup: &Setup, redis: &str, limits: &str, more: &str) -> String {
    config(setup, redis, limits).replace(
        "timeout = \"200ms\"",
        &format!("timeout = \"200ms\"\n{more}"),
    )
}

/// The value of metric `name` with `labels` on `/metrics` (admin socket), if exported.
async fn metric(wraith: &Wraith, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let (code, text) = wraith.admin_get("/v1/metrics").await;
    assert_eq!(code, 200);
    let text = String::from_utf8(text.to_vec()).unwrap();
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .unwrap_or_else(|e| panic!("{e}:\n{text}"));
    scrape
        .samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            // (prometheus-parse reads an OpenMetrics counter's `_total` sample as untyped.)
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            ref other => panic!("{name}: {other:?}"),
        })
}

async fn store_errors(wraith: &Wraith, reason: &str) -> f64 {
    metric(
        wraith,
        "wraith_rate_limit_store_errors_total",
        &[("reason", reason)],
    )
    .await
    .unwrap_or_else(|| panic!("no wraith_rate_limit_store_errors_total{{reason={reason:?}}}"))
}

/// Sends requests from fresh addresses until Redis holds a key of one of them: the shared
/// limits count there (again). Panics after 10 s.
async fn wait_counted_in_redis(wraith: &Wraith, redis: &Redis, octet: u8) {
    let deadline = Instant::now() + Duration::from_secs(10);
    for n in 0.. {
        assert_eq!(status(wraith, &format!("127.0.{octet}.{n}")).await, 200);
        let keys = redis.cli(&["--scan", "--pattern", "wraith:ratelimit:*"]);
        if keys.contains(&format!(":ip:127.0.{octet}.")) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the shared limits do not count in Redis; Redis holds:\n{keys}\n{}",
            wraith.log()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Redis over TLS with a password: two gateways (one naming Redis by host name, the other by
/// address, both in its certificate) enforce one budget, and `wraith status` shows the URL
/// without the password.
#[tokio::test]
async fn two_gateways_enforce_one_budget_over_tls() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let redis_dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(redis_dir.path());
    let redis = Redis::start_tls(&pki, false, &["--requirepass", "s3cret"]);
    let ca = format!("ca = {:?}", pki.ca_pem.to_str().unwrap());
    let limit = r#"{ name = "per-ip", key = "ip", rate = "3/m", burst = 3, shared = true }"#;
    let (a, b) = (Setup::new(), Setup::new());
    let url_a = format!("rediss://:s3cret@localhost:{}/0", redis.port);
    let url_b = format!("rediss://:s3cret@127.0.0.1:{}/0", redis.port);
    let (ca_cfg, cb_cfg) = (
        config_tls(&a, &url_a, limit, &ca),
        config_tls(&b, &url_b, limit, &ca),
    );
    let (a, b) = (a.start(&ca_cfg), b.start(&cb_cfg));

    assert_eq!(status(&a, "127.0.0.1").await, 200);
    assert_eq!(status(&b, "127.0.0.1").await, 200);
    assert_eq!(status(&a, "127.0.0.1").await, 200);
    let (code, _, policy) = get_from(&b, "127.0.0.1").await;
    assert_eq!(code, 429, "the fourth request across both gateways passed");
    assert_eq!(policy.as_deref(), Some("\"per-ip\";q=3;w=60"));
    assert_eq!(status(&a, "127.0.0.1").await, 429);
    let keys = redis.cli(&[
        "-a",
        "s3cret",
        "--no-auth-warning",
        "--scan",
        "--pattern",
        "wraith:ratelimit:*",
    ]);
    assert_eq!(keys.trim(), "wraith:ratelimit:per-ip:ip:127.0.0.1");

    let st = a.status().await;
    let url = format!("rediss://localhost:{}/0", redis.port);
    assert_eq!(st["rate_limit_redis"]["url"], url, "{st}");
    assert_eq!(st["rate_limit_redis"]["failures"], 0, "{st}");
    assert!(!st.to_string().contains("s3cret"), "{st}");
    for reason in ["timeout", "connect", "tls", "error"] {
        assert_eq!(store_errors(&a, reason).await, 0.0, "{reason}");
    }
    assert_eq!(
        metric(&a, "wraith_rate_limit_store_fallback", &[]).await,
        Some(0.0)
    );
}

/// Redis's certificate is not from the CA Wraith was given: the shared limits fall back to
/// `on_error` (counted here alone), the failure is logged, shown by `wraith status` and
/// counted as `reason="tls"`. The CA file replaced with the right one (same path, same
/// config text), a reload connects anew and the limits count in Redis again; the counters go
/// on from where they were. A URL naming Redis by an address its certificate does not hold
/// fails the same way.
#[tokio::test]
async fn an_untrusted_redis_certificate_falls_back_until_the_ca_is_fixed() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let redis_dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(redis_dir.path());
    let redis = Redis::start_tls(&pki, false, &["--bind", "127.0.0.1", "127.0.0.2"]);
    let setup = Setup::new();
    // The gateway's own test CA: not the one that issued Redis's certificate.
    let redis_ca = setup.dir.path().join("redis-ca.pem");
    std::fs::copy(&setup.pki.ca_pem, &redis_ca).unwrap();
    let limit = r#"{ name = "per-ip", key = "ip", rate = "2/m", burst = 2, shared = true }"#;
    let url = format!("rediss://localhost:{}/0", redis.port);
    let cfg = config_with(&setup, &url, limit, "ca = \"redis-ca.pem\"");
    let wraith = setup.start(&cfg);

    // Counted here alone: 2 a minute.
    assert_eq!(status(&wraith, "127.0.0.1").await, 200);
    assert_eq!(status(&wraith, "127.0.0.1").await, 200);
    assert_eq!(status(&wraith, "127.0.0.1").await, 429);
    assert!(redis
        .cli(&["--scan", "--pattern", "wraith:ratelimit:*"])
        .trim()
        .is_empty());
    let st = wraith.status().await;
    let state = &st["rate_limit_redis"];
    assert!(state["failures"].as_u64() >= Some(1), "{st}");
    let last = state["last_error"].as_str().unwrap_or_default();
    assert!(last.contains("certificate"), "{st}");
    wraith
        .wait_log(Duration::from_secs(5), |v| {
            v["level"] == "WARN"
                && v["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("shared rate limits: Redis failed"))
        })
        .unwrap_or_else(|| panic!("no warning:\n{}", wraith.log()));
    let tls_errors = store_errors(&wraith, "tls").await;
    assert!(tls_errors >= 1.0, "{tls_errors}");
    assert_eq!(store_errors(&wraith, "connect").await, 0.0);
    // On the fallback for a second after each failure: seen right after a failed request.
    let mut seen = false;
    for n in 0..10 {
        assert_eq!(status(&wraith, &format!("127.0.2.{n}")).await, 200);
        if metric(&wraith, "wraith_rate_limit_store_fallback", &[]).await == Some(1.0) {
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    assert!(seen, "wraith_rate_limit_store_fallback never 1");

    // The right CA in the same file: the reload makes a new connection, which is trusted.
    std::fs::copy(&pki.ca_pem, &redis_ca).unwrap();
    wraith.reload().unwrap();
    wait_counted_in_redis(&wraith, &redis, 3).await;
    let st = wraith.status().await;
    assert_eq!(st["rate_limit_redis"]["failures"], 0, "a new store: {st}");
    assert!(store_errors(&wraith, "tls").await >= tls_errors);

    // Redis by an address its certificate does not name (it holds localhost, 127.0.0.1).
    let before = store_errors(&wraith, "tls").await;
    let other = format!("rediss://127.0.0.2:{}/0", redis.port);
    wraith.write_config(&cfg.replace(&url, &other));
    wraith.reload().unwrap();
    assert_eq!(status(&wraith, "127.0.4.1").await, 200);
    assert_eq!(status(&wraith, "127.0.4.1").await, 200);
    assert_eq!(status(&wraith, "127.0.4.1").await, 429);
    assert!(store_errors(&wraith, "tls").await > before);
    assert!(!redis
        .cli(&["--scan", "--pattern", "wraith:ratelimit:*"])
        .contains(":ip:127.0.4."));
}

/// Redis demands a client certificate (`--tls-auth-clients yes`): a gateway with `cert` and
/// `key` from Redis's CA counts there; one without falls back, its failure counted.
#[tokio::test]
async fn mutual_tls_to_redis() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let redis_dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(redis_dir.path());
    let redis = Redis::start_tls(&pki, true, &[]);
    let (cert, key) = pki.client("wraith", None);
    let limit = r#"{ name = "per-ip", key = "ip", rate = "2/m", burst = 2, shared = true }"#;
    let url = format!("rediss://localhost:{}/0", redis.port);
    let ca = format!("ca = {:?}", pki.ca_pem.to_str().unwrap());
    let with_cert = format!(
        "{ca}\ncert = {:?}\nkey = {:?}",
        cert.to_str().unwrap(),
        key.to_str().unwrap()
    );
    let (a, b) = (Setup::new(), Setup::new());
    let (ca_cfg, cb_cfg) = (
        config_tls(&a, &url, limit, &with_cert),
        config_with(&b, &url, limit, &ca),
    );
    let (a, b) = (a.start(&ca_cfg), b.start(&cb_cfg));

    assert_eq!(status(&a, "127.0.0.1").await, 200);
    assert!(redis
        .cli(&["--scan", "--pattern", "wraith:ratelimit:*"])
        .contains("per-ip:ip:127.0.0.1"));
    assert_eq!(a.status().await["rate_limit_redis"]["failures"], 0);

    // Without a certificate: refused by Redis, so counted alone (a fresh budget of 2).
    assert_eq!(status(&b, "127.0.0.1").await, 200);
    assert_eq!(status(&b, "127.0.0.1").await, 200);
    assert_eq!(status(&b, "127.0.0.1").await, 429);
    let st = b.status().await;
    assert!(
        st["rate_limit_redis"]["failures"].as_u64() >= Some(1),
        "{st}"
    );
    assert!(store_errors(&b, "tls").await >= 1.0, "{st}");
    // Counted by gateway a alone: its one request.
    assert_eq!(status(&a, "127.0.0.1").await, 200);
    assert_eq!(status(&a, "127.0.0.1").await, 429);
}

/// A request asked on a connection that went silent, after the first one asked on it, fails
/// later than that one: its failure is the old connection's, counted, and once the rest (as
/// long as the 3 s `timeout`) is over a new connection counts in Redis again and keeps
/// counting. (Before the rest lasted `timeout`, a rest of a second was over before such a
/// late failure, which then had to leave the new connection alone; `SharedStore::failed`
/// still does, should a timer fire late.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_failure_of_a_replaced_connection_keeps_the_new_one() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let redis = Redis::start();
    let relay = Relay::start(redis.port).await;
    let limit = r#"{ name = "per-ip", key = "ip", rate = "2/m", burst = 2, shared = true }"#;
    let setup = Setup::new();
    let cfg = through_relay(&setup, &relay, limit, "3s");
    let wraith = setup.start(&cfg);
    assert_eq!(status(&wraith, "127.0.0.1").await, 200);

    relay.freeze();
    // Asked on the silent connection after the first request below, it fails 3 s later: once
    // the first one's rest is over and a new connection counts in Redis.
    let late = async {
        tokio::time::sleep(Duration::from_millis(2500)).await;
        status(&wraith, "127.0.1.2").await
    };
    let first_then_new = async {
        assert_eq!(status(&wraith, "127.0.1.1").await, 200);
        wait_counted_in_redis(&wraith, &redis, 2).await;
    };
    let (late, ()) = tokio::join!(late, first_then_new);
    assert_eq!(late, 200);
    assert_eq!(store_errors(&wraith, "timeout").await, 2.0);

    // The new connection still counts.
    assert_eq!(status(&wraith, "127.0.3.1").await, 200);
    let keys = redis.cli(&["--scan", "--pattern", "wraith:ratelimit:*"]);
    assert!(
        keys.contains(":ip:127.0.3.1"),
        "the late failure of the old connection dropped the new one; Redis holds:\n{keys}"
    );
}

/// Redis restarted (an upgrade, a crash) while the gateway was idle: Redis closed the
/// connection, and the next request should open a new one, not fail on the closed one and
/// put the instance on `on_error` for a second (nor count a failure).
#[tokio::test]
async fn a_connection_redis_closed_is_not_used() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let mut redis = Redis::start();
    let port = redis.port;
    let limit = r#"{ name = "per-ip", key = "ip", rate = "2/m", burst = 2, shared = true }"#;
    let setup = Setup::new();
    let cfg = config(&setup, &redis.url(), limit);
    let wraith = setup.start(&cfg);
    assert_eq!(status(&wraith, "127.0.0.1").await, 200);

    redis.stop();
    let redis = Redis::start_on(port);
    assert_eq!(status(&wraith, "127.0.0.2").await, 200);
    let keys = redis.cli(&["--scan", "--pattern", "wraith:ratelimit:*"]);
    assert!(
        keys.contains(":ip:127.0.0.2"),
        "the first request after the restart was not counted in Redis:\n{keys}\n{}",
        wraith.log()
    );
    for reason in ["timeout", "connect", "tls", "error"] {
        assert_eq!(store_errors(&wraith, reason).await, 0.0, "{reason}");
    }
}

/// The settings' `Debug` (a config printed whole while debugging) shows neither the URL's
/// password nor the password file's.
#[test]
fn redis_settings_debug_shows_no_password() {
    let settings = wraith::config::RedisSettings {
        url: "rediss://wraith:hunter2@redis.example:6380/2".into(),
        tls: None,
        password: Some(wraith::config::Secret("from-the-file".into())),
        timeout: Duration::from_millis(50),
        on_error: wraith::config::SharedOnError::Local,
        key_prefix: "wraith:ratelimit:".into(),
    };
    let shown = format!("{settings:?}");
    assert!(
        !shown.contains("hunter2") && !shown.contains("from-the-file"),
        "{shown}"
    );
    assert!(shown.contains("rediss://redis.example:6380/2"), "{shown}");
}

/// Redis answers an error. Its scripts flushed (`SCRIPT FLUSH`, a restart that kept the data):
/// `NOSCRIPT`, and the script is loaded again, no failure. Out of memory under `noeviction`
/// (`OOM`), a replica (`READONLY`): the request goes to `on_error`, counted as
/// `reason="error"`, and once Redis is set right the limits count there again.
#[tokio::test]
async fn redis_answering_an_error() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let redis = Redis::start();
    let keys = || redis.cli(&["--scan", "--pattern", "wraith:ratelimit:*"]);
    let limit = r#"{ name = "per-ip", key = "ip", rate = "2/m", burst = 2, shared = true }"#;
    let setup = Setup::new();
    let cfg = config(&setup, &redis.url(), limit);
    let wraith = setup.start(&cfg);
    assert_eq!(status(&wraith, "127.0.0.1").await, 200);

    assert_eq!(redis.cli(&["script", "flush"]).trim(), "OK");
    assert_eq!(status(&wraith, "127.0.0.2").await, 200);
    assert!(keys().contains(":ip:127.0.0.2"), "{}", keys());
    assert_eq!(store_errors(&wraith, "error").await, 0.0);

    redis.cli(&["config", "set", "maxmemory-policy", "noeviction"]);
    assert_eq!(redis.cli(&["config", "set", "maxmemory", "1"]).trim(), "OK");
    assert_eq!(status(&wraith, "127.0.0.3").await, 200);
    assert!(!keys().contains(":ip:127.0.0.3"), "{}", keys());
    assert_eq!(store_errors(&wraith, "error").await, 1.0);
    assert_eq!(redis.cli(&["config", "set", "maxmemory", "0"]).trim(), "OK");
    wait_counted_in_redis(&wraith, &redis, 4).await;

    // A replica of a primary it cannot reach: it refuses writes.
    assert_eq!(redis.cli(&["replicaof", "127.0.0.1", "1"]).trim(), "OK");
    let deadline = Instant::now() + Duration::from_secs(5);
    while store_errors(&wraith, "error").await < 2.0 {
        assert!(
            Instant::now() < deadline,
            "no READONLY failure:\n{}",
            wraith.log()
        );
        assert_eq!(status(&wraith, "127.0.5.1").await, 200);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(redis.cli(&["replicaof", "no", "one"]).trim(), "OK");
    wait_counted_in_redis(&wraith, &redis, 6).await;
    for reason in ["timeout", "connect", "tls"] {
        assert_eq!(store_errors(&wraith, reason).await, 0.0, "{reason}");
    }
}

/// A URL scheme is case-insensitive: `REDISS://` is Redis over TLS, as the config check reads
/// it (the gateway refused to start: "the URL's scheme and the TLS settings disagree").
#[tokio::test]
async fn a_rediss_scheme_in_capitals_is_tls() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let redis_dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(redis_dir.path());
    let redis = Redis::start_tls(&pki, false, &[]);
    let ca = format!("ca = {:?}", pki.ca_pem.to_str().unwrap());
    let limit = r#"{ name = "per-ip", key = "ip", rate = "3/m", burst = 3, shared = true }"#;
    let setup = Setup::new();
    let url = format!("REDISS://localhost:{}/0", redis.port);
    let cfg = config_tls(&setup, &url, limit, &ca);
    let wraith = setup.start(&cfg);
    assert_eq!(status(&wraith, "127.0.0.1").await, 200);
    let keys = redis.cli(&["--scan", "--pattern", "wraith:ratelimit:*"]);
    assert_eq!(keys.trim(), "wraith:ratelimit:per-ip:ip:127.0.0.1");
}

/// The ids of the gateways' connections to `redis` (`CLIENT LIST`, less `redis-cli`'s own).
fn gateway_connections(redis: &Redis) -> Vec<String> {
    let list = redis.cli(&["client", "list"]);
    let mut ids: Vec<String> = list
        .lines()
        .filter(|l| !l.contains("cmd=client|list"))
        .filter_map(|l| l.split(' ').find_map(|f| f.strip_prefix("id=")))
        .map(str::to_string)
        .collect();
    ids.sort();
    ids
}

/// Another program wrote under one client's bucket key (a list: the script's GET answers
/// `WRONGTYPE`). That client's requests are decided by `on_error`, counted as
/// `reason="error"` and warned about with the key. But Redis answered, over a connection that
/// works: the other clients go on counting in Redis (a budget spent across both gateways stays
/// spent, where the fallback would give each gateway a fresh one), the gateways do not rest
/// and keep their connections.
#[tokio::test]
async fn an_error_about_one_bucket_decides_only_that_request() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let redis = Redis::start();
    let limit = r#"{ name = "per-ip", key = "ip", rate = "3/m", burst = 3, shared = true }"#;
    let (a, b) = two_gateways(&redis, limit);
    // 127.0.0.2 spends its budget of 3 across both gateways.
    assert_eq!(status(&a, "127.0.0.2").await, 200);
    assert_eq!(status(&b, "127.0.0.2").await, 200);
    assert_eq!(status(&a, "127.0.0.2").await, 200);
    let connections = gateway_connections(&redis);
    assert_eq!(connections.len(), 2, "{connections:?}");

    let bad = "wraith:ratelimit:per-ip:ip:127.0.0.1";
    assert_eq!(redis.cli(&["rpush", bad, "not-a-bucket"]).trim(), "1");
    for gateway in [&a, &b] {
        // Counted here alone (on_error = "local"): a budget of 3 in each gateway.
        for _ in 0..3 {
            assert_eq!(status(gateway, "127.0.0.1").await, 200);
        }
        assert_eq!(status(gateway, "127.0.0.1").await, 429);
        // Right after, still counted in Redis, where its budget is spent.
        assert_eq!(
            status(gateway, "127.0.0.2").await,
            429,
            "another client's request went to on_error after an error about 127.0.0.1's key"
        );
        assert_eq!(store_errors(gateway, "error").await, 4.0);
        assert_eq!(
            metric(gateway, "wraith_rate_limit_store_fallback", &[]).await,
            Some(0.0)
        );
    }
    assert_eq!(status(&a, "127.0.0.3").await, 200);
    let keys = redis.cli(&["--scan", "--pattern", "wraith:ratelimit:*"]);
    assert!(keys.contains(":ip:127.0.0.3"), "{keys}");
    // Redis's value is left as it was; the connections are the same.
    assert_eq!(redis.cli(&["type", bad]).trim(), "list");
    assert_eq!(gateway_connections(&redis), connections);
    a.wait_log(Duration::from_secs(5), |v| {
        v["level"] == "WARN"
            && v["key"] == bad
            && v["error"].as_str().is_some_and(|e| e.contains("WRONGTYPE"))
    })
    .unwrap_or_else(|| panic!("no warning naming the key:\n{}", a.log()));
    for reason in ["timeout", "connect", "tls"] {
        assert_eq!(store_errors(&a, reason).await, 0.0, "{reason}");
    }
}

/// Redis's certificate names it `redis.internal` alone, and the URL reaches it by address:
/// refused as not for that host (`reason="tls"`), counted here alone. With `server_name =
/// "redis.internal"` (sent as SNI, verified in the certificate), the limits count in Redis.
#[tokio::test]
async fn server_name_is_the_name_redis_certificate_must_carry() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let redis_dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(redis_dir.path());
    let named = pki.ca.issue_server(&["redis.internal"]).unwrap();
    std::fs::write(&pki.server_cert, &named.cert_pem).unwrap();
    std::fs::write(&pki.server_key, &named.key_pem).unwrap();
    let redis = Redis::start_tls(&pki, false, &[]);
    let ca = format!("ca = {:?}", pki.ca_pem.to_str().unwrap());
    let limit = r#"{ name = "per-ip", key = "ip", rate = "2/m", burst = 2, shared = true }"#;
    let url = format!("rediss://127.0.0.1:{}/0", redis.port);
    let setup = Setup::new();
    let cfg = config_tls(&setup, &url, limit, &ca);
    let wraith = setup.start(&cfg);

    assert_eq!(status(&wraith, "127.0.0.1").await, 200);
    assert_eq!(status(&wraith, "127.0.0.1").await, 200);
    assert_eq!(status(&wraith, "127.0.0.1").await, 429);
    assert!(store_errors(&wraith, "tls").await >= 1.0);
    let keys = || redis.cli(&["--scan", "--pattern", "wraith:ratelimit:*"]);
    assert!(keys().trim().is_empty(), "{}", keys());

    wraith.write_config(&cfg.replace(&ca, &format!("{ca}\nserver_name = \"redis.internal\"")));
    wraith.reload().unwrap();
    let before = store_errors(&wraith, "tls").await;
    assert_eq!(status(&wraith, "127.0.1.1").await, 200);
    assert!(keys().contains(":ip:127.0.1.1"), "{}", keys());
    assert_eq!(store_errors(&wraith, "tls").await, before);
}

/// A resolver that takes 2 s for `slow-redis.test` (getaddrinfo wrapped by an LD_PRELOAD
/// library built here: each lookup of that name is written to a file, then fails after 2 s).
/// A lookup runs on a blocking thread that a timeout cannot stop: every request is still
/// decided within about `timeout`, and a connect after a rest joins the lookup in flight
/// rather than start another, so over 4.5 s (a connect every 1.2 s) at most two run.
#[tokio::test]
async fn a_slow_resolver_delays_no_request_and_runs_one_lookup_at_a_time() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("slowdns.c");
    std::fs::write(&source, SLOW_DNS).unwrap();
    let library = dir.path().join("slowdns.so");
    let built = Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(&library)
        .arg(&source)
        .arg("-ldl")
        .output()
        .expect("cc");
    assert!(built.status.success(), "{built:?}");
    let lookups = dir.path().join("lookups");

    let limit = r#"{ name = "per-ip", key = "ip", rate = "2/m", burst = 2, shared = true }"#;
    let setup = Setup::new();
    let cfg = config(&setup, "redis://slow-redis.test:6379/0", limit);
    let wraith = setup.start_with_env(
        &cfg,
        &[
            ("LD_PRELOAD", library.as_os_str()),
            ("SLOW_DNS_LOG", lookups.as_os_str()),
        ],
    );
    let started = Instant::now();
    for n in 0.. {
        if started.elapsed() > Duration::from_millis(4500) {
            break;
        }
        let asked = Instant::now();
        assert_eq!(status(&wraith, &format!("127.0.1.{n}")).await, 200);
        let took = asked.elapsed();
        assert!(took < Duration::from_millis(700), "a request took {took:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let count = std::fs::read_to_string(&lookups)
        .unwrap_or_default()
        .lines()
        .count();
    assert!(
        (1..=2).contains(&count),
        "{count} lookups of slow-redis.test started in 4.5 s"
    );
    assert!(store_errors(&wraith, "timeout").await >= 2.0);
}

/// getaddrinfo, slow for one name (see the test above).
const SLOW_DNS: &str = r#"
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <netdb.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int getaddrinfo(const char *node, const char *service, const struct addrinfo *hints,
                struct addrinfo **res) {
    if (node && strcmp(node, "slow-redis.test") == 0) {
        const char *log = getenv("SLOW_DNS_LOG");
        int fd = log ? open(log, O_WRONLY | O_APPEND | O_CREAT, 0644) : -1;
        if (fd >= 0) {
            (void)!write(fd, "lookup\n", 7);
            close(fd);
        }
        sleep(2);
        return EAI_NONAME;
    }
    int (*real)(const char *, const char *, const struct addrinfo *, struct addrinfo **) =
        (int (*)(const char *, const char *, const struct addrinfo *, struct addrinfo **))
            dlsym(RTLD_NEXT, "getaddrinfo");
    return real(node, service, hints, res);
}
"#;

/// With a `timeout` above the second's rest, the instance rests for the `timeout`: a
/// request a little over a second after a failure is decided on the fallback at once, not
/// sent to Redis (which, on a path that went silent, would cost another `timeout`: an
/// outage would then cost more than half the time waiting).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_above_a_second_rests_as_long() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let redis = Redis::start();
    let relay = Relay::start(redis.port).await;
    let limit = r#"{ name = "per-ip", key = "ip", rate = "2/m", burst = 2, shared = true }"#;
    let setup = Setup::new();
    let cfg = through_relay(&setup, &relay, limit, "1500ms");
    let wraith = setup.start(&cfg);
    assert_eq!(status(&wraith, "127.0.0.1").await, 200);

    relay.freeze();
    let asked = Instant::now();
    assert_eq!(status(&wraith, "127.0.1.1").await, 200);
    assert!(asked.elapsed() >= Duration::from_millis(1400));
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(
        metric(&wraith, "wraith_rate_limit_store_fallback", &[]).await,
        Some(1.0),
        "1.2 s after a failure with a 1.5 s timeout, no longer resting"
    );
    assert_eq!(status(&wraith, "127.0.1.2").await, 200);
    let keys = redis.cli(&["--scan", "--pattern", "wraith:ratelimit:*"]);
    assert!(!keys.contains(":ip:127.0.1.2"), "{keys}");
}

/// A connect that hangs (Redis's address answers TCP, never TLS) is one failure, however many
/// requests waited for it: `wraith_rate_limit_store_errors_total` counts the calls that
/// failed, as logging.md says, not every request sent to `on_error`.
#[tokio::test]
async fn a_failed_connect_is_counted_once() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let limit = r#"{ name = "per-ip", key = "ip", rate = "2/m", burst = 2, shared = true }"#;
    let setup = Setup::new();
    let url = format!("rediss://127.0.0.1:{port}/0");
    let cfg = config_with(&setup, &url, limit, "ca = \"ca.pem\"");
    let wraith = setup.start(&cfg);
    let requests = (1..=5).map(|n| {
        let wraith = &wraith;
        async move { status(wraith, &format!("127.0.0.{n}")).await }
    });
    let codes = futures_util::future::join_all(requests).await;
    assert_eq!(codes, [200; 5]);
    assert_eq!(store_errors(&wraith, "timeout").await, 1.0);
    assert_eq!(wraith.status().await["rate_limit_redis"]["failures"], 1);
}
