//! Rate limits end to end: 429 with Retry-After and the IETF RateLimit fields exactly at the
//! configured burst, per-client buckets, defaults vs route limits, shadow mode, state kept
//! across an unchanged reload, header keys from a trusted proxy, and a key cap that holds
//! (its overflow spread over several buckets) and, once full, is cleaned without waiting for
//! the timer. (Exact GCRA timing is proven with a fake clock in `src/ratelimit.rs`; here the
//! clock is real, so rates are slow enough that no refill happens during a test, except
//! where the test waits for one.)

mod common;

use std::time::Duration;

use common::*;
use http::Method;

fn config(setup: &Setup, limits: &str, extra: &str) -> String {
    let listeners = setup.listeners().replace(
        "[server]\n",
        "[server]\ntrusted_proxies = [\"127.0.0.0/8\"]\n",
    );
    format!(
        r#"{listeners}
{extra}

[[route]]
name = "limited"
path = {{ prefix = "/limited" }}
respond = {{ status = 200, body = "ok\n" }}
rate_limits = [{limits}]

[[route]]
name = "open"
path = {{ prefix = "/open" }}
respond = {{ status = 200, body = "ok\n" }}
rate_limits = []

[[route]]
name = "default"
path = {{ prefix = "/" }}
respond = {{ status = 200, body = "ok\n" }}
"#
    )
}

async fn get(client: &reqwest::Client, wraith: &Wraith, path: &str, ip: &str) -> reqwest::Response {
    client
        .get(wraith.url("http", path))
        .header("x-forwarded-for", ip)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn over_the_burst_is_429_with_retry_after_and_ietf_headers() {
    let setup = Setup::new();
    let cfg = config(
        &setup,
        r#"{ name = "per-ip", key = "ip", rate = "1/m", burst = 3 }"#,
        "",
    );
    let wraith = setup.start(&cfg);
    let client = http_client();
    for i in 0..3 {
        let r = get(&client, &wraith, "/limited", "192.0.2.1").await;
        assert_eq!(r.status(), 200, "request {i} is within the burst");
    }
    let r = get(&client, &wraith, "/limited", "192.0.2.1").await;
    assert_eq!(r.status(), 429);
    let h = r.headers().clone();
    let retry: u64 = h["retry-after"].to_str().unwrap().parse().unwrap();
    // 60 s minus however long the burst took (generously, on a loaded machine).
    assert!(
        (50..=60).contains(&retry),
        "one request per minute: {retry}"
    );
    assert_eq!(h["ratelimit-policy"], "\"per-ip\";q=3;w=180");
    assert_eq!(
        h["ratelimit"].to_str().unwrap(),
        format!("\"per-ip\";r=0;t={retry}")
    );
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "rate_limited");
    assert_eq!(body["request_id"], h["x-request-id"].to_str().unwrap());

    // Another client has its own bucket; IPv6 clients count by /64.
    assert_eq!(
        get(&client, &wraith, "/limited", "192.0.2.2")
            .await
            .status(),
        200
    );
    for _ in 0..3 {
        let r = get(&client, &wraith, "/limited", "2001:db8:1:2::a").await;
        assert_eq!(r.status(), 200);
    }
    let r = get(&client, &wraith, "/limited", "2001:db8:1:2::b").await;
    assert_eq!(r.status(), 429, "same /64");
    let r = get(&client, &wraith, "/limited", "2001:db8:1:3::b").await;
    assert_eq!(r.status(), 200, "another /64");
    // Routes with `rate_limits = []` and (here) no defaults are not limited.
    for _ in 0..10 {
        assert_eq!(
            get(&client, &wraith, "/open", "192.0.2.1").await.status(),
            200
        );
        assert_eq!(get(&client, &wraith, "/", "192.0.2.1").await.status(), 200);
    }
}

#[tokio::test]
async fn defaults_apply_to_routes_without_their_own_and_are_shared() {
    let setup = Setup::new();
    let cfg = config(
        &setup,
        r#"{ key = "route", rate = "1/h", burst = 1 }"#,
        r#"[rate_limit]
limits = [{ name = "global-ip", key = "ip", rate = "1/h", burst = 2 }]
"#,
    );
    let wraith = setup.start(&cfg);
    let client = http_client();
    // The default limit counts across every route that uses it.
    assert_eq!(get(&client, &wraith, "/a", "192.0.2.9").await.status(), 200);
    assert_eq!(get(&client, &wraith, "/b", "192.0.2.9").await.status(), 200);
    let r = get(&client, &wraith, "/c", "192.0.2.9").await;
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["ratelimit-policy"], "\"global-ip\";q=2;w=7200");
    // The route's own limit replaces the defaults: one request for the whole route.
    assert_eq!(
        get(&client, &wraith, "/limited", "192.0.2.9")
            .await
            .status(),
        200
    );
    assert_eq!(
        get(&client, &wraith, "/limited", "192.0.2.10")
            .await
            .status(),
        429
    );
    // And the opted-out route is free.
    assert_eq!(
        get(&client, &wraith, "/open", "192.0.2.9").await.status(),
        200
    );
}

#[tokio::test]
async fn shadow_mode_logs_what_it_would_refuse() {
    let setup = Setup::new();
    let cfg = config(
        &setup,
        r#"{ name = "trial", key = "ip", rate = "1/h", burst = 1, mode = "shadow" }"#,
        "[log.json]\npath = \"access.json\"\n",
    );
    let wraith = setup.start(&cfg);
    let client = http_client();
    for _ in 0..4 {
        assert_eq!(
            get(&client, &wraith, "/limited", "192.0.2.3")
                .await
                .status(),
            200
        );
    }
    let line = wraith
        .wait_log(Duration::from_secs(5), |v| {
            v["message"] == "rate limit would refuse this request (shadow mode)"
        })
        .expect("a would-refuse line");
    assert_eq!(line["limit"], "trial");
    assert_eq!(line["client"], "192.0.2.3");
    // And the access records say what the limit did: the first passed, the others would
    // have been refused.
    let path = wraith.path("access.json");
    let records = || -> Vec<serde_json::Value> {
        std::fs::read_to_string(&path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    };
    assert!(Wraith::eventually(Duration::from_secs(5), || async { records().len() >= 4 }).await);
    let outcomes: Vec<_> = records()
        .iter()
        .map(|r| (r["rate_limit"].clone(), r["rate_limiter"].clone()))
        .collect();
    let expected = [
        "passed",
        "shadow_limited",
        "shadow_limited",
        "shadow_limited",
    ];
    assert_eq!(
        outcomes,
        expected.map(|o| (serde_json::json!(o), serde_json::json!("trial")))
    );
}

#[tokio::test]
async fn limiter_state_survives_a_reload_when_unchanged() {
    let setup = Setup::new();
    let limit = r#"{ name = "per-ip", key = "ip", rate = "1/h", burst = 2 }"#;
    let cfg = config(&setup, limit, "");
    let wraith = setup.start(&cfg);
    let client = http_client();
    for _ in 0..2 {
        assert_eq!(
            get(&client, &wraith, "/limited", "192.0.2.4")
                .await
                .status(),
            200
        );
    }
    assert_eq!(
        get(&client, &wraith, "/limited", "192.0.2.4")
            .await
            .status(),
        429
    );

    // Unchanged limit (another part of the config changed): still exhausted.
    wraith.write_config(&config(
        &Setup::new(),
        limit,
        "[[route]]\nname = \"extra\"\npath = { exact = \"/extra\" }\nrespond = { status = 204 }\n",
    ));
    wraith.reload().unwrap();
    assert_eq!(
        get(&client, &wraith, "/extra", "192.0.2.4").await.status(),
        204
    );
    assert_eq!(
        get(&client, &wraith, "/limited", "192.0.2.4")
            .await
            .status(),
        429
    );

    // A changed limit keeps what the client spent: the larger burst gives it one more.
    wraith.write_config(&config(
        &Setup::new(),
        r#"{ name = "per-ip", key = "ip", rate = "1/h", burst = 3 }"#,
        "",
    ));
    wraith.reload().unwrap();
    assert_eq!(
        get(&client, &wraith, "/limited", "192.0.2.4")
            .await
            .status(),
        200
    );
}

#[tokio::test]
async fn header_keys_from_a_trusted_proxy_count_per_value() {
    let setup = Setup::new();
    let cfg = config(
        &setup,
        r#"{ name = "per-tenant", key = "header", header = "x-client-id", rate = "1/h", burst = 1 }"#,
        "",
    );
    let wraith = setup.start(&cfg);
    let client = http_client();
    let send = |value: String| {
        client
            .get(wraith.url("http", "/limited"))
            .header("x-forwarded-for", "192.0.2.7")
            .header("x-client-id", value)
            .send()
    };
    // The test client is on 127.0.0.1, a trusted proxy: every value is its own bucket, even
    // from one address, and a long value is one key like any other.
    let long = "t".repeat(16 * 1024);
    for value in ["tenant-1", "tenant-2", &long] {
        assert_eq!(
            send(value.into()).await.unwrap().status(),
            200,
            "{value:.20}"
        );
        assert_eq!(
            send(value.into()).await.unwrap().status(),
            429,
            "{value:.20}"
        );
    }
    assert_eq!(send(long[1..].into()).await.unwrap().status(), 200);
}

#[tokio::test]
async fn key_state_is_capped() {
    let setup = Setup::new();
    let cfg = config(
        &setup,
        // 1/h: no key's bucket refills during the test, so no cleanup (the timer's, or one a
        // full table asks for) drops any.
        r#"{ name = "per-ip", key = "ip", rate = "1/h", burst = 1 }"#,
        "[rate_limit]\nmax_keys = 500\n",
    );
    let wraith = setup.start(&cfg);
    let client = http_client();
    let mut refused = 0;
    for i in 0..2000u32 {
        let ip = std::net::Ipv4Addr::from(0xC633_6400u32 + i).to_string();
        let r = get(&client, &wraith, "/limited", &ip).await;
        match r.status().as_u16() {
            200 => {}
            // Past the cap, new addresses share 64 overflow buckets (1/h, burst 1 each).
            429 if i >= 500 => refused += 1,
            other => panic!("request {i} from {ip}: {other}"),
        }
    }
    // 1500 addresses past the cap: at most one request per overflow bucket passed, and
    // they were spread over more than one bucket.
    assert!(
        (1500 - 64..1499).contains(&refused),
        "{refused} of 1500 refused"
    );
    assert_eq!(keys(&wraith, "per-ip").await, 500);
}

/// The keys limit `name` tracks, from `/v1/status`.
async fn keys(wraith: &Wraith, name: &str) -> u64 {
    let (_, status) = wraith.admin(Method::GET, "/v1/status", None).await;
    status["rate_limits"]
        .as_array()
        .and_then(|all| all.iter().find(|l| l["name"] == name))
        .and_then(|l| l["keys"].as_u64())
        .unwrap_or_else(|| panic!("no key count for {name}: {status}"))
}

#[tokio::test]
async fn a_full_key_table_is_cleaned_without_waiting_for_the_timer() {
    let setup = Setup::new();
    let cfg = config(
        &setup,
        // One request a second: a key's bucket is back to its start about 2 s after it.
        r#"{ name = "per-ip", key = "ip", rate = "1/s", burst = 1 }"#,
        // The timer does not run during the test.
        "[rate_limit]\nmax_keys = 20\ncleanup_interval = \"1h\"\n",
    );
    let wraith = setup.start(&cfg);
    let client = http_client();
    for i in 0..20 {
        let r = get(&client, &wraith, "/limited", &format!("198.51.100.{i}")).await;
        assert_eq!(r.status(), 200);
    }
    assert_eq!(keys(&wraith, "per-ip").await, 20);
    // New clients find the table full and go to overflow buckets; once the first 20 keys
    // have refilled, the cleanup one of them asked for makes room.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let mut i = 0;
    while keys(&wraith, "per-ip").await == 20 {
        assert!(
            std::time::Instant::now() < deadline,
            "the full table was never cleaned:\n{}",
            wraith.log()
        );
        let newcomer = format!("203.0.113.{}", i % 250);
        i += 1;
        let r = get(&client, &wraith, "/limited", &newcomer).await;
        assert!(matches!(r.status().as_u16(), 200 | 429));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A new client has its own bucket again.
    assert_eq!(
        get(&client, &wraith, "/limited", "192.0.2.200")
            .await
            .status(),
        200
    );
    assert_eq!(
        get(&client, &wraith, "/limited", "192.0.2.200")
            .await
            .status(),
        429
    );
}

#[tokio::test]
async fn identity_limits_are_independent_per_client_certificate() {
    let setup = Setup::new();
    let alice = setup
        .pki
        .client("alice", Some("spiffe://wraith.test/alice"));
    let bob = setup.pki.client("bob", Some("spiffe://wraith.test/bob"));
    let ca = setup.pki.ca_pem.clone();
    let cfg = config(
        &setup,
        r#"{ name = "per-client", key = "identity", rate = "1/h", burst = 2 }"#,
        "",
    )
    .replace(
        "tls = { cert = \"server.pem\", key = \"server-key.pem\" }",
        "tls = { cert = \"server.pem\", key = \"server-key.pem\", client_auth = \"optional\", client_ca = \"ca.pem\" }",
    );
    let wraith = setup.start(&cfg);
    let a = https_client(&ca, Some((&alice.0, &alice.1)));
    let b = https_client(&ca, Some((&bob.0, &bob.1)));
    let url = wraith.url("https", "/limited");
    for _ in 0..2 {
        assert_eq!(a.get(&url).send().await.unwrap().status(), 200);
    }
    assert_eq!(a.get(&url).send().await.unwrap().status(), 429);
    // Same address, another certificate: its own bucket.
    for _ in 0..2 {
        assert_eq!(b.get(&url).send().await.unwrap().status(), 200);
    }
    assert_eq!(b.get(&url).send().await.unwrap().status(), 429);
}

/// A burst whose refill (`period × burst`) does not fit governor's nanosecond clock is a
/// config error at the burst, in `wraith test` and on reload (the server keeps its limits),
/// not a panic.
#[tokio::test]
async fn a_burst_too_long_to_refill_is_refused_at_its_position() {
    let setup = Setup::new();
    let limited = |limit: &str| config(&setup, limit, "");
    let good = limited(r#"{ name = "per-ip", key = "ip", rate = "1/m", burst = 3 }"#);
    let bad = [
        (
            limited(r#"{ name = "per-ip", key = "ip", rate = "1/h", burst = 10000000 }"#),
            "burst 10000000 at rate \"1/h\" takes over 100 years to refill: at most 876000 at this rate",
        ),
        (
            limited(r#"{ name = "per-ip", key = "ip", rate = "1/36500d", burst = 10 }"#),
            "burst 10 at rate \"1/36500d\" takes over 100 years to refill: at most 1 at this rate",
        ),
    ];
    let wraith = setup.start(&good);
    let client = http_client();
    for _ in 0..3 {
        assert_eq!(
            get(&client, &wraith, "/limited", "192.0.2.1")
                .await
                .status(),
            200
        );
    }
    for (cfg, message) in &bad {
        wraith.write_config(cfg);
        let (code, out, err) = wraith.cli(&["test"]);
        assert_eq!(code, 1, "{out}{err}");
        // The burst's value on the `rate_limits` line of the "limited" route.
        let line = cfg
            .lines()
            .position(|l| l.starts_with("rate_limits = [{"))
            .unwrap()
            + 1;
        let column = cfg.lines().nth(line - 1).unwrap().find("burst = ").unwrap() + 9;
        let at = format!(":{line}:{column}: route[0].rate_limits[0].burst: {message}");
        assert!(out.contains(&at) || err.contains(&at), "{at}\n{out}{err}");
        assert!(!err.contains("panicked"), "{err}");

        // The log line is JSON: its quotes are escaped.
        let e = wraith.reload().unwrap_err();
        assert!(e.contains(&message.replace('"', "\\\"")), "{e}");
        let status = wraith.status().await;
        assert_eq!(status["last_reload"]["ok"], false, "{status}");
        // The running limit is the old one: the client's burst is still spent.
        assert_eq!(
            get(&client, &wraith, "/limited", "192.0.2.1")
                .await
                .status(),
            429
        );
    }
    assert!(!wraith.log().contains("panicked"), "{}", wraith.log());
}

/// Status of each of `n` requests from `ip` to `path`.
async fn statuses(
    client: &reqwest::Client,
    wraith: &Wraith,
    path: &str,
    ip: &str,
    n: usize,
) -> Vec<u16> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(get(client, wraith, path, ip).await.status().as_u16());
    }
    out
}

#[tokio::test]
async fn a_reload_that_changes_a_limit_keeps_what_each_client_has_spent() {
    // The rollout nginx operators know: a limit runs in shadow mode, then is enforced, then
    // tuned. None of those reloads may hand every client a fresh burst.
    let setup = Setup::new();
    let limit = |burst: u32, mode: &str| {
        format!(
            r#"{{ name = "per-ip", key = "ip", rate = "1/h", burst = {burst}, mode = "{mode}" }}"#
        )
    };
    let wraith = setup.start(&config(&Setup::new(), &limit(2, "shadow"), ""));
    let client = http_client();
    // Shadow mode counts as enforce would, and refuses nothing.
    assert_eq!(
        statuses(&client, &wraith, "/limited", "192.0.2.4", 3).await,
        [200, 200, 200]
    );

    // Enforced now: the client already spent its burst of 2.
    wraith.write_config(&config(&Setup::new(), &limit(2, "enforce"), ""));
    wraith.reload().unwrap();
    assert_eq!(
        statuses(&client, &wraith, "/limited", "192.0.2.4", 1).await,
        [429]
    );

    // A larger burst gives it the difference, not a whole new burst of 3.
    wraith.write_config(&config(&Setup::new(), &limit(3, "enforce"), ""));
    wraith.reload().unwrap();
    assert_eq!(
        statuses(&client, &wraith, "/limited", "192.0.2.4", 2).await,
        [200, 429]
    );

    // A new key cap changes no bucket either.
    wraith.write_config(&config(
        &Setup::new(),
        &limit(3, "enforce"),
        "[rate_limit]\nmax_keys = 1000\n",
    ));
    wraith.reload().unwrap();
    assert_eq!(
        statuses(&client, &wraith, "/limited", "192.0.2.4", 1).await,
        [429]
    );
    // A client that had spent nothing has the whole new burst.
    assert_eq!(
        statuses(&client, &wraith, "/limited", "192.0.2.5", 4).await,
        [200, 200, 200, 429]
    );
}

#[tokio::test]
async fn own_limits_a_reload_gives_a_route_are_not_the_defaults_buckets() {
    // Route "a" used the defaults; a reload gives it limits of its own, equal to them. Its
    // buckets are then its own, as after a restart: requests to "b" (still on the defaults)
    // spend nothing of them.
    let setup = Setup::new();
    let limit = r#"{ name = "per-ip", key = "ip", rate = "1/h", burst = 2 }"#;
    let routes = |a_limits: &str| {
        format!(
            "[rate_limit]\nlimits = [{limit}]\n\n\
             [[route]]\nname = \"a\"\npath = {{ prefix = \"/a\" }}\n\
             respond = {{ status = 200, body = \"a\\n\" }}\n{a_limits}\n\n\
             [[route]]\nname = \"b\"\npath = {{ prefix = \"/b\" }}\n\
             respond = {{ status = 200, body = \"b\\n\" }}\n"
        )
    };
    let wraith = setup.start(&config(&Setup::new(), limit, &routes("")));
    let client = http_client();
    wraith.write_config(&config(
        &Setup::new(),
        limit,
        &routes(&format!("rate_limits = [{limit}]")),
    ));
    wraith.reload().unwrap();
    assert_eq!(
        statuses(&client, &wraith, "/b", "192.0.2.6", 3).await,
        [200, 200, 429]
    );
    assert_eq!(
        statuses(&client, &wraith, "/a", "192.0.2.6", 3).await,
        [200, 200, 429]
    );
}
