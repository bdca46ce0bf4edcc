//! Load balancing against real upstream servers on 127.0.0.1:0: each algorithm's
//! distribution, ip_hash stickiness and remapping, least_connections under a slow endpoint,
//! active health checks and passive ejection, retries, connection limits, fail-open, and
//! health state across reloads.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;
use hyper::body::Incoming;
use hyper::{Request, Response};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A test upstream: answers with its name in `x-upstream` and counts the requests it served
/// (health checks on `/health` excluded). `health` decides the health-check status.
struct Backend {
    name: String,
    server: Option<Upstream>,
    addr: std::net::SocketAddr,
    hits: Arc<AtomicUsize>,
    healthy: Arc<AtomicBool>,
    fail: Arc<AtomicBool>,
    delay: Duration,
    concurrent: Arc<AtomicUsize>,
    max_concurrent: Arc<AtomicUsize>,
}

impl Backend {
    async fn start(name: &str, delay: Duration) -> Backend {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        Backend::with_listener(name, delay, listener)
    }

    /// A backend that will be killed and restarted on its port: the port comes from outside
    /// the ephemeral range (`unused_port`), so no other test's `bind(:0)` can take it while
    /// the backend is down.
    async fn start_restartable(name: &str) -> Backend {
        let port = unused_port();
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        Backend::with_listener(name, Duration::ZERO, listener)
    }

    fn with_listener(name: &str, delay: Duration, listener: tokio::net::TcpListener) -> Backend {
        let mut b = Backend {
            name: name.to_string(),
            server: None,
            addr: listener.local_addr().unwrap(),
            hits: Arc::default(),
            healthy: Arc::new(AtomicBool::new(true)),
            fail: Arc::default(),
            delay,
            concurrent: Arc::default(),
            max_concurrent: Arc::default(),
        };
        b.serve(listener);
        b
    }

    fn serve(&mut self, listener: tokio::net::TcpListener) {
        let (name, hits, healthy, fail, delay, cur, max) = (
            self.name.clone(),
            self.hits.clone(),
            self.healthy.clone(),
            self.fail.clone(),
            self.delay,
            self.concurrent.clone(),
            self.max_concurrent.clone(),
        );
        self.server = Some(Upstream::serve(listener, move |req: Request<Incoming>| {
            let (name, hits, healthy, fail, cur, max) = (
                name.clone(),
                hits.clone(),
                healthy.clone(),
                fail.clone(),
                cur.clone(),
                max.clone(),
            );
            async move {
                if req.uri().path() == "/health" {
                    let status = if healthy.load(Ordering::SeqCst) {
                        200
                    } else {
                        503
                    };
                    return Response::builder()
                        .status(status)
                        .body(full("health"))
                        .unwrap();
                }
                hits.fetch_add(1, Ordering::SeqCst);
                let now = cur.fetch_add(1, Ordering::SeqCst) + 1;
                max.fetch_max(now, Ordering::SeqCst);
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                cur.fetch_sub(1, Ordering::SeqCst);
                let body = req.into_body().collect_len().await;
                let status = if fail.load(Ordering::SeqCst) {
                    500
                } else {
                    200
                };
                Response::builder()
                    .status(status)
                    .header("x-upstream", name.as_str())
                    .header("x-body-len", body.to_string())
                    .body(full(name.clone()))
                    .unwrap()
            }
        }));
    }

    fn endpoint(&self) -> String {
        self.addr.to_string()
    }

    /// The same backend's address and counters, without the server (for config text).
    fn clone_handle(&self) -> Backend {
        Backend {
            name: self.name.clone(),
            server: None,
            addr: self.addr,
            hits: self.hits.clone(),
            healthy: self.healthy.clone(),
            fail: self.fail.clone(),
            delay: self.delay,
            concurrent: self.concurrent.clone(),
            max_concurrent: self.max_concurrent.clone(),
        }
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    fn kill(&mut self) {
        if let Some(s) = self.server.take() {
            s.kill();
        }
    }

    /// Starts serving again on the same port.
    async fn restart(&mut self) {
        let listener = tokio::net::TcpListener::bind(self.addr).await.unwrap();
        self.serve(listener);
    }
}

trait CollectLen {
    async fn collect_len(self) -> usize;
}

impl CollectLen for Incoming {
    async fn collect_len(self) -> usize {
        use http_body_util::BodyExt;
        self.collect()
            .await
            .map(|b| b.to_bytes().len())
            .unwrap_or(0)
    }
}

async fn backends(n: usize) -> Vec<Backend> {
    let mut out = Vec::new();
    for i in 0..n {
        out.push(Backend::start(&format!("b{i}"), Duration::ZERO).await);
    }
    out
}

/// `endpoints = [...]` with optional weights.
fn endpoints(bs: &[Backend], weights: Option<&[u32]>) -> String {
    let list: Vec<String> = bs
        .iter()
        .enumerate()
        .map(|(i, b)| match weights {
            Some(w) => format!("{{ address = \"{}\", weight = {} }}", b.endpoint(), w[i]),
            None => format!("\"{}\"", b.endpoint()),
        })
        .collect();
    format!("endpoints = [{}]", list.join(", "))
}

/// The standard listeners (trusting 127.0.0.1 as a proxy) and one upstream `pool`.
fn config(upstream: &str) -> String {
    let listeners = Setup::standard_listeners().replace(
        "admin_socket = \"admin.sock\"",
        "admin_socket = \"admin.sock\"\ntrusted_proxies = [\"127.0.0.1\"]",
    );
    format!(
        "{listeners}\n[[upstream]]\nname = \"pool\"\n{upstream}\n\n[[route]]\nname = \"all\"\nupstream = \"pool\"\n"
    )
}

/// `n` GETs with `concurrency` in flight; returns (x-upstream of each success, failures).
async fn drive(
    client: &reqwest::Client,
    url: &str,
    n: usize,
    concurrency: usize,
    xff: impl Fn(usize) -> Option<String>,
) -> (Vec<String>, Vec<String>) {
    let mut results: Vec<(usize, Result<String, String>)> = futures_util::stream::iter(0..n)
        .map(|i| {
            let mut req = client.get(url);
            if let Some(ip) = xff(i) {
                req = req.header("x-forwarded-for", ip);
            }
            async move {
                let r = match req.send().await {
                    Ok(r) if r.status() == 200 => Ok(r
                        .headers()
                        .get("x-upstream")
                        .map(|v| v.to_str().unwrap().to_string())
                        .unwrap_or_default()),
                    Ok(r) => Err(format!(
                        "{} {}",
                        r.status(),
                        r.text().await.unwrap_or_default()
                    )),
                    Err(e) => Err(e.to_string()),
                };
                (i, r)
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    // In request order, so runs can be compared key by key.
    results.sort_by_key(|(i, _)| *i);
    let mut ok = Vec::new();
    let mut failed = Vec::new();
    for (_, r) in results {
        match r {
            Ok(s) => ok.push(s),
            Err(e) => failed.push(e),
        }
    }
    (ok, failed)
}

fn shares(names: &[String], n: usize) -> Vec<f64> {
    let total = names.len() as f64;
    (0..n)
        .map(|i| names.iter().filter(|s| **s == format!("b{i}")).count() as f64 / total)
        .collect()
}

/// Runs 10 000 requests with `algorithm` over four endpoints weighted 1:2:3:4 and returns
/// each endpoint's share.
async fn distribution(algorithm: &str, concurrency: usize, client_ips: bool) -> Vec<f64> {
    let bs = backends(4).await;
    let weights = [1, 2, 3, 4];
    let setup = Setup::new();
    let cfg = config(&format!(
        "algorithm = \"{algorithm}\"\n{}",
        endpoints(&bs, Some(&weights))
    ));
    let wraith = setup.start(&cfg);
    let client = http_client();
    let (ok, failed) = drive(
        &client,
        &wraith.url("http", "/d"),
        10_000,
        concurrency,
        |i| client_ips.then(|| format!("10.{}.{}.{}", i / 65536, (i / 256) % 256, i % 256)),
    )
    .await;
    assert!(
        failed.is_empty(),
        "{algorithm}: failures {:?}",
        &failed[..failed.len().min(5)]
    );
    shares(&ok, 4)
}

fn assert_weighted(algorithm: &str, got: &[f64], tolerance: impl Fn(f64) -> f64) {
    let expected = [0.1, 0.2, 0.3, 0.4];
    for (i, (g, e)) in got.iter().zip(expected).enumerate() {
        assert!(
            (g - e).abs() <= tolerance(e),
            "{algorithm}: endpoint b{i} got {g:.4}, expected {e} (all: {got:?})"
        );
    }
}

#[tokio::test]
async fn round_robin_spreads_evenly_and_ignores_weights() {
    let got = distribution("round_robin", 16, false).await;
    for (i, g) in got.iter().enumerate() {
        assert!((g - 0.25).abs() <= 0.25 * 0.05, "b{i}: {g} ({got:?})");
    }
}

#[tokio::test]
async fn weighted_follows_the_weights_within_5_percent() {
    let got = distribution("weighted", 16, false).await;
    assert_weighted("weighted", &got, |e| e * 0.05);
}

#[tokio::test]
async fn least_connections_respects_weights_when_loads_tie() {
    // One request at a time: every endpoint has 0 in flight at each pick, so only the
    // weighted tie-break decides.
    let got = distribution("least_connections", 1, false).await;
    assert_weighted("least_connections", &got, |e| e * 0.05);
}

#[tokio::test]
async fn random_two_choices_follow_the_weights() {
    // Random draws: 10 000 samples have a standard deviation of up to 0.5 percentage
    // points per share, so the bound is 2 points (4 sigma), not 5 % of the smallest share.
    let got = distribution("random", 1, false).await;
    assert_weighted("random", &got, |_| 0.02);
}

#[tokio::test]
async fn ip_hash_spreads_client_addresses_by_weight() {
    // 10 000 distinct client addresses (X-Forwarded-For from a trusted proxy): the shares
    // follow the Maglev table (weights 1:2:3:4) up to sampling noise.
    let got = distribution("ip_hash", 16, true).await;
    assert_weighted("ip_hash", &got, |_| 0.02);
}

#[tokio::test]
async fn ip_hash_is_sticky_and_remaps_about_one_nth_when_an_endpoint_leaves() {
    let bs = backends(5).await;
    let setup = Setup::new();
    let wraith = setup.start(&config(&format!(
        "algorithm = \"ip_hash\"\n{}",
        endpoints(&bs, None)
    )));
    let client = http_client();
    let url = wraith.url("http", "/sticky");
    let ip = |i: usize| Some(format!("192.168.{}.{}", i / 256, i % 256));
    let n = 2000;
    let (first, f1) = drive(&client, &url, n, 16, ip).await;
    let (second, f2) = drive(&client, &url, n, 16, ip).await;
    assert!(f1.is_empty() && f2.is_empty(), "{f1:?} {f2:?}");
    assert_eq!(first, second, "every client address sticks to its endpoint");
    assert!(
        shares(&first, 5).iter().all(|s| *s > 0.1),
        "all endpoints get keys"
    );

    // Remove b2 from the configuration.
    let rest: Vec<Backend> = bs
        .iter()
        .filter(|b| b.name != "b2")
        .map(|b| b.clone_handle())
        .collect();
    let cfg = std::fs::read_to_string(&wraith.config_path)
        .unwrap()
        .replace(&endpoints(&bs, None), &endpoints(&rest, None));
    wraith.write_config(&cfg);
    wraith.reload().unwrap();
    let (after, f3) = drive(&client, &url, n, 16, ip).await;
    assert!(f3.is_empty(), "{f3:?}");
    let moved = first.iter().zip(&after).filter(|(a, b)| a != b).count();
    let on_removed = first.iter().filter(|a| *a == "b2").count();
    assert!(after.iter().all(|a| a != "b2"));
    assert!(
        moved as f64 <= 1.5 / 5.0 * n as f64,
        "{moved} of {n} keys moved (b2 had {on_removed})"
    );
    assert!(moved >= on_removed, "b2's keys must move");
}

#[tokio::test]
async fn least_connections_prefers_idle_endpoints_over_a_slow_one() {
    // Slow enough that its share stays small even when the machine is loaded and the fast
    // endpoints' latency grows to tens of milliseconds.
    let slow = Backend::start("b0", Duration::from_secs(2)).await;
    let mut bs = vec![slow];
    for i in 1..3 {
        bs.push(Backend::start(&format!("b{i}"), Duration::from_millis(2)).await);
    }
    let setup = Setup::new();
    let wraith = setup.start(&config(&format!(
        "algorithm = \"least_connections\"\n{}",
        endpoints(&bs, None)
    )));
    let client = http_client();
    let (ok, failed) = drive(&client, &wraith.url("http", "/lc"), 600, 12, |_| None).await;
    assert!(failed.is_empty(), "{failed:?}");
    let s = shares(&ok, 3);
    // Round robin would give the slow endpoint a third; least connections gives it only
    // what arrives while it is as idle as the others.
    assert!(s[0] < 0.1, "slow endpoint share {:.3} ({s:?})", s[0]);
}

/// GETs in a loop from `workers` tasks until `stop`; returns (count, failures).
fn background_load(
    client: reqwest::Client,
    url: String,
    workers: usize,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(usize, Vec<String>)> {
    tokio::spawn(async move {
        let mut tasks = Vec::new();
        for _ in 0..workers {
            let (client, url, stop) = (client.clone(), url.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                let mut n = 0;
                let mut failed = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    n += 1;
                    match client.get(&url).send().await {
                        Ok(r) if r.status() == 200 => {
                            let _ = r.bytes().await;
                        }
                        Ok(r) => failed.push(format!(
                            "{} {}",
                            r.status(),
                            r.text().await.unwrap_or_default()
                        )),
                        Err(e) => failed.push(e.to_string()),
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                (n, failed)
            }));
        }
        let mut total = 0;
        let mut failed = Vec::new();
        for t in tasks {
            let (n, f) = t.await.unwrap();
            total += n;
            failed.extend(f);
        }
        (total, failed)
    })
}

// `wait_log` blocks its thread: the backends need another one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_checks_take_a_dead_endpoint_out_and_bring_it_back_without_failed_requests() {
    let mut bs = backends(2).await;
    bs.push(Backend::start_restartable("b2").await);
    let setup = Setup::new();
    let wraith = setup.start(&config(&format!(
            "{}\n[upstream.health_check]\npath = \"/health\"\ninterval = \"200ms\"\ntimeout = \"2s\"\nfall = 2\nrise = 2\n",
            endpoints(&bs, None)
        ),
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let load = background_load(http_client(), wraith.url("http", "/x"), 4, stop.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;

    let dead = bs[2].endpoint();
    bs[2].kill();
    // interval * fall = 400 ms, plus jitter and a check in flight: 10 s is a generous bound.
    let down = wraith.wait_log(Duration::from_secs(10), |v| {
        v["message"] == "endpoint is down (health check)"
            && v["endpoint"].as_str().is_some_and(|e| e.ends_with(&dead))
    });
    assert!(down.is_some(), "not marked down:\n{}", wraith.log());
    assert_eq!(
        wraith.endpoint_status("pool", &dead).await["health"],
        "down"
    );
    let (_, text, _) = wraith.cli(&["status"]);
    assert!(text.contains("down"), "{text}");

    // While it is down, it gets nothing.
    let before = bs[2].hits();
    tokio::time::sleep(Duration::from_millis(300)).await;
    bs[2].restart().await;
    let up = wraith.wait_log(Duration::from_secs(10), |v| {
        v["message"] == "endpoint is up (health check)"
            && v["endpoint"].as_str().is_some_and(|e| e.ends_with(&dead))
    });
    assert!(
        up.is_some(),
        "not marked up again: {}\n{}",
        wraith.endpoint_status("pool", &dead).await,
        wraith.log()
    );
    assert!(
        Wraith::eventually(Duration::from_secs(5), || async { bs[2].hits() > before }).await,
        "traffic returns to the recovered endpoint: hits {:?}, status {}",
        bs.iter().map(|b| b.hits()).collect::<Vec<_>>(),
        wraith.status().await
    );
    stop.store(true, Ordering::SeqCst);
    let (total, failed) = load.await.unwrap();
    assert!(total > 20, "the load ran ({total} requests)");
    // The dead endpoint's turns went to both others, not all to its neighbour.
    let (h0, h1) = (bs[0].hits() as f64, bs[1].hits() as f64);
    assert!((0.8..1.25).contains(&(h0 / h1)), "uneven: {h0} vs {h1}");
    assert!(
        failed.is_empty(),
        "{} failed requests: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
}

#[tokio::test]
async fn passive_ejection_without_active_checks_with_a_growing_cool_down() {
    let bs = backends(3).await;
    bs[0].fail.store(true, Ordering::SeqCst);
    let setup = Setup::new();
    let wraith = setup.start(&config(&format!(
            "{}\noutlier = {{ consecutive_failures = 3, base_ejection_time = \"5s\", max_ejection_time = \"1m\" }}\n",
            endpoints(&bs, None)
        ),
    ));
    let client = http_client();
    let url = wraith.url("http", "/p");
    let bad = bs[0].endpoint();
    let ejections = || {
        wraith
            .log_json()
            .into_iter()
            .filter(|v| {
                v["message"] == "endpoint ejected after consecutive failures"
                    && v["endpoint"].as_str().is_some_and(|e| e.ends_with(&bad))
            })
            .map(|v| v["cool_down_ms"].as_u64().unwrap())
            .collect::<Vec<_>>()
    };
    let mut checked_status = false;
    let deadline = Instant::now() + Duration::from_secs(60);
    while ejections().len() < 2 && Instant::now() < deadline {
        let _ = client.get(&url).send().await.unwrap().bytes().await;
        if !checked_status && ejections().len() == 1 {
            let e = wraith.endpoint_status("pool", &bad).await;
            assert_eq!(e["health"], "ejected", "{e}");
            // While ejected (5 s, ample for a few requests), the failing endpoint gets nothing.
            let hits = bs[0].hits();
            drive(&client, &url, 10, 1, |_| None).await;
            assert_eq!(bs[0].hits(), hits);
            checked_status = true;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let e = ejections();
    assert_eq!(e.len(), 2, "{}", wraith.log());
    assert_eq!(
        e,
        vec![5000, 10000],
        "the cool-down doubles on a repeat ejection"
    );
    assert!(checked_status);
}

#[tokio::test]
async fn passive_ejection_never_exceeds_the_allowed_share() {
    let bs = backends(3).await;
    bs[0].fail.store(true, Ordering::SeqCst);
    bs[1].fail.store(true, Ordering::SeqCst);
    let setup = Setup::new();
    let wraith = setup.start(&config(&format!(
            "{}\noutlier = {{ consecutive_failures = 2, base_ejection_time = \"1m\", max_ejected_percent = 50 }}\n",
            endpoints(&bs, None)
        ),
    ));
    let client = http_client();
    drive(&client, &wraith.url("http", "/p"), 60, 1, |_| None).await;
    let status = wraith.status().await;
    let ejected = status["upstreams"][0]["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["health"] == "ejected")
        .count();
    assert_eq!(ejected, 1, "50% of 3 endpoints is 1: {status}");
}

#[tokio::test]
async fn endpoints_down_by_active_checks_count_toward_the_ejection_share() {
    // Two endpoints fail their health checks; the other two pass them but answer 500.
    let bs = backends(4).await;
    bs[0].healthy.store(false, Ordering::SeqCst);
    bs[1].healthy.store(false, Ordering::SeqCst);
    bs[2].fail.store(true, Ordering::SeqCst);
    bs[3].fail.store(true, Ordering::SeqCst);
    let setup = Setup::new();
    let wraith = setup.start(&config(&format!(
        "{}\noutlier = {{ consecutive_failures = 2, base_ejection_time = \"1m\", max_ejected_percent = 50 }}\n\
         [upstream.health_check]\npath = \"/health\"\ninterval = \"100ms\"\nfall = 1\nrise = 1\n",
        endpoints(&bs, None)
    )));
    let down = Wraith::eventually(Duration::from_secs(5), || async {
        let status = wraith.status().await;
        status["upstreams"][0]["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["health"] == "down")
            .count()
            == 2
    })
    .await;
    assert!(down, "{}", wraith.status().await);
    // Half the pool is already out: the 500s eject nothing more, and requests keep
    // reaching the two endpoints that are left (their 500s, not 503s).
    let client = http_client();
    for _ in 0..12 {
        let resp = client.get(wraith.url("http", "/p")).send().await.unwrap();
        assert_eq!(resp.status(), 500);
    }
    let status = wraith.status().await;
    for e in status["upstreams"][0]["endpoints"].as_array().unwrap() {
        assert_ne!(e["health"], "ejected", "{status}");
    }
}

#[tokio::test]
async fn a_heavy_endpoint_that_is_down_leaves_its_share_spread_by_weight() {
    // Weights 30,1,1,1 and 1000,1,1,1 with the heavy endpoint down: its turns are runs of
    // ~10 and ~330 in the weighted sequence (the second beyond what skipping covers).
    for (algorithm, heavy) in [
        ("weighted", 30),
        ("least_connections", 30),
        ("weighted", 1000),
        ("least_connections", 1000),
    ] {
        let bs = backends(4).await;
        bs[0].healthy.store(false, Ordering::SeqCst);
        let setup = Setup::new();
        let wraith = setup.start(&config(&format!(
            "algorithm = \"{algorithm}\"\n{}\n[upstream.health_check]\npath = \"/health\"\n\
             interval = \"100ms\"\nfall = 1\nrise = 1\n",
            endpoints(&bs, Some(&[heavy, 1, 1, 1]))
        )));
        let down = Wraith::eventually(Duration::from_secs(5), || async {
            wraith.endpoint_status("pool", &bs[0].endpoint()).await["health"] == "down"
        })
        .await;
        assert!(down, "{}", wraith.status().await);
        let client = http_client();
        let (ok, failed) = drive(&client, &wraith.url("http", "/p"), 300, 1, |_| None).await;
        assert!(failed.is_empty(), "{failed:?}");
        for name in ["b1", "b2", "b3"] {
            let got = ok.iter().filter(|u| *u == name).count();
            assert!(
                (85..=115).contains(&got),
                "{algorithm} {heavy}: {name} got {got} of 300: {:?}",
                bs.iter().map(|b| b.hits()).collect::<Vec<_>>()
            );
        }
    }
}

/// Sends one request to `slow` and returns once it is in flight there; its status comes
/// from the handle.
async fn one_in_flight(
    client: &reqwest::Client,
    url: &str,
    slow: &Backend,
) -> tokio::task::JoinHandle<reqwest::StatusCode> {
    let first = tokio::spawn({
        let (client, url) = (client.clone(), url.to_string());
        async move { client.get(&url).send().await.unwrap().status() }
    });
    let busy = Wraith::eventually(Duration::from_secs(5), || async {
        slow.concurrent.load(Ordering::SeqCst) == 1
    })
    .await;
    assert!(busy, "the first request never reached the endpoint");
    first
}

#[tokio::test]
async fn requests_in_flight_across_a_reload_still_count_against_max_connections() {
    let slow = Backend::start("slow", Duration::from_secs(2)).await;
    let setup = Setup::new();
    let upstream = |timeout: &str| {
        config(&format!(
            "endpoints = [\"{}\"]\nmax_connections = 1\nmax_pending = 0\nresponse_timeout = \"{timeout}\"\n",
            slow.endpoint()
        ))
    };
    let wraith = setup.start(&upstream("10s"));
    let client = http_client();
    let url = wraith.url("http", "/p");
    let first = one_in_flight(&client, &url, &slow).await;
    // The upstream changes (so its pools are built anew) while the request is in flight.
    wraith.write_config(&upstream("20s"));
    wraith.reload().unwrap();
    let e = wraith.endpoint_status("pool", &slow.endpoint()).await;
    assert_eq!(e["in_flight"], 1, "{e}");
    let second = client.get(&url).send().await.unwrap();
    assert_eq!(
        second.status(),
        503,
        "the endpoint's one connection is taken"
    );
    assert_eq!(first.await.unwrap(), 200);
    let e = wraith.endpoint_status("pool", &slow.endpoint()).await;
    assert_eq!(e["in_flight"], 0, "{e}");
}

#[tokio::test]
async fn a_reload_that_adds_connection_limits_wakes_waiters_when_old_requests_end() {
    let slow = Backend::start("slow", Duration::from_secs(2)).await;
    let setup = Setup::new();
    let upstream = |limits: &str| {
        config(&format!(
            "endpoints = [\"{}\"]\nresponse_timeout = \"20s\"\n{limits}",
            slow.endpoint()
        ))
    };
    let wraith = setup.start(&upstream(""));
    let client = http_client();
    let url = wraith.url("http", "/p");
    let first = one_in_flight(&client, &url, &slow).await;
    // Limits arrive while the first request (of the old snapshot, whose pool had no one to
    // tell) is in flight: the next request waits for it, and is told when it ends.
    wraith.write_config(&upstream(
        "max_connections = 1\nmax_pending = 10\npending_timeout = \"15s\"\n",
    ));
    wraith.reload().unwrap();
    let started = Instant::now();
    let second = client.get(&url).send().await.unwrap();
    assert_eq!(second.status(), 200);
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "the waiter sat out its pending_timeout: {:?}",
        started.elapsed()
    );
    assert_eq!(first.await.unwrap(), 200);
}

/// An upstream that reads a request and closes the connection without answering.
async fn hang_up_server() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(AtomicUsize::new(0));
    let s = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let s = s.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                s.fetch_add(1, Ordering::SeqCst);
                let _ = sock.shutdown().await;
            });
        }
    });
    (addr, seen)
}

#[tokio::test]
async fn retries_follow_the_rules() {
    let (hangup, seen) = hang_up_server().await;
    let good = Backend::start("good", Duration::ZERO).await;
    let closed = std::net::SocketAddr::from(([127, 0, 0, 1], unused_port()));
    let setup = Setup::new();
    let cfg = format!(
        r#"{listeners}
[[upstream]]
name = "pool"
endpoints = ["{hangup}", "{good}"]
outlier = {{ consecutive_failures = 0 }}

[[upstream]]
name = "refused"
endpoints = ["{closed}", "{good}"]
outlier = {{ consecutive_failures = 0 }}

[[route]]
name = "refused"
path = {{ prefix = "/refused/" }}
upstream = "refused"

[[route]]
name = "all"
upstream = "pool"
"#,
        listeners = setup.listeners(),
        good = good.endpoint(),
    );
    let wraith = setup.start(&cfg);
    let client = http_client();
    let url = wraith.url("http", "/r");

    // Idempotent GETs: a hang-up before any response byte is retried on the other endpoint.
    for _ in 0..10 {
        let r = client.get(&url).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-upstream"], "good");
    }
    assert!(
        seen.load(Ordering::SeqCst) >= 4,
        "the hang-up endpoint was tried"
    );

    // PUT with a small body: buffered, so it can be sent again.
    for _ in 0..6 {
        let r = client.put(&url).body("twelve bytes").send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-body-len"], "12");
    }

    // POST is not idempotent: a hang-up after sending it is not retried.
    let before = seen.load(Ordering::SeqCst);
    let mut bad_gateway = 0;
    for _ in 0..10 {
        let r = client.post(&url).body("x").send().await.unwrap();
        if r.status() == 502 {
            bad_gateway += 1;
        } else {
            assert_eq!(r.status(), 200);
        }
    }
    assert!(bad_gateway > 0, "some POSTs hit the hang-up endpoint");
    assert_eq!(bad_gateway, seen.load(Ordering::SeqCst) - before);

    // A refused connection never reached anyone: even a streamed POST is retried.
    let attempts_before = wraith.endpoint_status("refused", &closed.to_string()).await["requests"]
        .as_u64()
        .unwrap();
    for _ in 0..6 {
        let chunks = futures_util::stream::iter(vec![
            Ok::<_, std::io::Error>(bytes::Bytes::from_static(b"streamed ")),
            Ok(bytes::Bytes::from_static(b"body")),
        ]);
        let r = client
            .post(wraith.url("http", "/refused/x"))
            .body(reqwest::Body::wrap_stream(chunks))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-body-len"], "13");
    }
    let attempts = wraith.endpoint_status("refused", &closed.to_string()).await["requests"]
        .as_u64()
        .unwrap();
    assert!(attempts > attempts_before, "the refused endpoint was tried");
}

#[tokio::test]
async fn retries_stop_after_the_configured_number() {
    let mut ups = Vec::new();
    for _ in 0..4 {
        ups.push(hang_up_server().await);
    }
    let list: Vec<String> = ups.iter().map(|(a, _)| format!("\"{a}\"")).collect();
    let setup = Setup::new();
    let wraith = setup.start(&config(&format!(
        "endpoints = [{}]\nretries = 2\noutlier = {{ consecutive_failures = 0 }}\n",
        list.join(", ")
    )));
    let r = http_client()
        .get(wraith.url("http", "/r"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    let total: usize = ups.iter().map(|(_, s)| s.load(Ordering::SeqCst)).sum();
    assert_eq!(
        total, 3,
        "one attempt plus two retries, each on a different endpoint"
    );
    assert!(
        ups.iter().all(|(_, s)| s.load(Ordering::SeqCst) <= 1),
        "never the same endpoint twice"
    );
}

#[tokio::test]
async fn max_connections_and_max_pending_are_enforced_with_503_and_retry_after() {
    // All 8 requests must arrive while the first 2 are still being served: 5 s is ample
    // even on a loaded machine. The 2 queued ones wait 5 s, well inside pending_timeout.
    let slow = Backend::start("b0", Duration::from_secs(5)).await;
    let setup = Setup::new();
    let wraith = setup.start(&config(&format!(
            "endpoints = [{{ address = \"{}\", max_connections = 2 }}]\nmax_pending = 2\npending_timeout = \"30s\"\n",
            slow.endpoint()
        ),
    ));
    let client = http_client();
    let url = wraith.url("http", "/slow");
    let results: Vec<(u16, Option<String>, String)> =
        futures_util::future::join_all((0..8).map(|_| {
            let req = client.get(&url);
            async move {
                let r = req.send().await.unwrap();
                let status = r.status().as_u16();
                let ra = r
                    .headers()
                    .get("retry-after")
                    .map(|v| v.to_str().unwrap().to_string());
                (status, ra, r.text().await.unwrap())
            }
        }))
        .await;
    let ok = results.iter().filter(|r| r.0 == 200).count();
    let refused: Vec<_> = results.iter().filter(|r| r.0 == 503).collect();
    assert_eq!(ok, 4, "2 served at once + 2 queued: {results:?}");
    assert_eq!(refused.len(), 4, "{results:?}");
    for (_, ra, body) in &refused {
        assert_eq!(ra.as_deref(), Some("1"));
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"], "upstream_overloaded");
    }
    assert_eq!(slow.max_concurrent.load(Ordering::SeqCst), 2);
}

async fn wait_health(wraith: &Wraith, addr: &str, want: &str) -> bool {
    Wraith::eventually(Duration::from_secs(10), || async {
        wraith.endpoint_status("pool", addr).await["health"] == want
    })
    .await
}

// `wait_log` blocks its thread: the backends need another one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_healthy_endpoint_is_a_503_unless_fail_open() {
    let bs = backends(2).await;
    for b in &bs {
        b.healthy.store(false, Ordering::SeqCst);
    }
    let setup = Setup::new();
    let body = |fail_open: bool| {
        format!(
            "{}\nfail_open = {fail_open}\n[upstream.health_check]\npath = \"/health\"\ninterval = \"100ms\"\nfall = 1\nrise = 1\n",
            endpoints(&bs, None)
        )
    };
    let wraith = setup.start(&config(&body(false)));
    for b in &bs {
        assert!(wait_health(&wraith, &b.endpoint(), "down").await);
    }
    let client = http_client();
    let r = client.get(wraith.url("http", "/x")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"], "no_endpoint");
    assert!(v["message"]
        .as_str()
        .unwrap()
        .contains("no healthy endpoint"));
    assert!(v["request_id"].is_string());

    let cfg = std::fs::read_to_string(&wraith.config_path)
        .unwrap()
        .replace("fail_open = false", "fail_open = true");
    wraith.write_config(&cfg);
    wraith.reload().unwrap();
    let r = client.get(wraith.url("http", "/x")).send().await.unwrap();
    assert_eq!(r.status(), 200, "fail_open sends to unhealthy endpoints");
    assert!(wraith
        .wait_log(Duration::from_secs(5), |v| v["message"]
            .as_str()
            .is_some_and(|m| m.contains("fail_open = true")))
        .is_some());
}

// `reload` blocks its thread: the backends must still answer health checks meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_state_survives_a_reload_when_the_endpoint_is_unchanged() {
    let bs = backends(3).await;
    bs[1].healthy.store(false, Ordering::SeqCst);
    let setup = Setup::new();
    // fall = 1: a generous probe timeout, so a stalled machine does not take a healthy
    // endpoint down (it would then need `rise` passes to come back).
    let check = |rise: u32| {
        format!(
            "{}\nresponse_timeout = \"30s\"\n[upstream.health_check]\npath = \"/health\"\ninterval = \"100ms\"\ntimeout = \"10s\"\nfall = 1\nrise = {rise}\n",
            endpoints(&bs, None)
        )
    };
    let wraith = setup.start(&config(&check(100)));
    let sick = bs[1].endpoint();
    assert!(wait_health(&wraith, &sick, "down").await);

    // It recovers. Both the running checker (rise = 100) and the one of the reloaded pool
    // (rise = 99, a changed setting, so the pool is rebuilt) need about 10 s of passes in a
    // row to bring it back, far longer than the checks below. A pool built fresh would
    // start it "up"; carried over, it stays down until it earns it.
    bs[1].healthy.store(true, Ordering::SeqCst);
    let cfg = std::fs::read_to_string(&wraith.config_path)
        .unwrap()
        .replace("rise = 100", "rise = 99");
    wraith.write_config(&cfg);
    wraith.reload().unwrap();
    assert_eq!(
        wraith.endpoint_status("pool", &sick).await["health"],
        "down"
    );
    let before = bs[1].hits();
    let (ok, failed) = drive(&http_client(), &wraith.url("http", "/x"), 50, 4, |_| None).await;
    assert!(failed.is_empty());
    assert_eq!(ok.len(), 50);
    assert_eq!(
        bs[1].hits(),
        before,
        "a down endpoint gets no traffic after the reload"
    );
}

/// An upstream that reads requests and never answers.
async fn silent_server() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(AtomicUsize::new(0));
    let s = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let s = s.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                let mut counted = false;
                loop {
                    match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) if !counted => {
                            counted = true;
                            s.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(_) => {}
                    }
                }
            });
        }
    });
    (addr, seen)
}

#[tokio::test]
async fn no_retry_starts_after_the_try_duration() {
    let mut ups = Vec::new();
    for _ in 0..5 {
        ups.push(silent_server().await);
    }
    let list: Vec<String> = ups.iter().map(|(a, _)| format!("\"{a}\"")).collect();
    let wraith = Setup::new().start(&config(&format!(
        "endpoints = [{}]\nretries = 4\nresponse_timeout = \"2s\"\ntry_duration = \"3500ms\"\noutlier = {{ consecutive_failures = 0 }}\n",
        list.join(", ")
    )));
    let r = http_client()
        .get(wraith.url("http", "/t"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 504);
    let total: usize = ups.iter().map(|(_, s)| s.load(Ordering::SeqCst)).sum();
    // Attempt 1 times out at 2 s (inside the 3.5 s budget, so a retry starts, even if the
    // machine stalls for over a second); attempt 2 times out at 4 s at the earliest (timers
    // never fire early), past the budget: no third attempt despite retries = 4.
    assert_eq!(total, 2);
}

fn with_cookie(r: reqwest::RequestBuilder, k: &str) -> reqwest::RequestBuilder {
    r.header("cookie", format!("theme=dark; session={k}; x=1"))
}

fn with_header(r: reqwest::RequestBuilder, k: &str) -> reqwest::RequestBuilder {
    r.header("x-user", k)
}

#[tokio::test]
async fn ip_hash_can_key_on_a_cookie_or_a_header() {
    let bs = backends(4).await;
    type Keyed = fn(reqwest::RequestBuilder, &str) -> reqwest::RequestBuilder;
    let cases: [(&str, Keyed); 2] = [
        ("cookie:session", with_cookie),
        ("header:x-user", with_header),
    ];
    for (key, keyed) in cases {
        let wraith = Setup::new().start(&config(&format!(
            "algorithm = \"ip_hash\"\nhash_key = \"{key}\"\n{}",
            endpoints(&bs, None)
        )));
        let client = http_client();
        let url = wraith.url("http", "/k");
        let mut first: Vec<String> = Vec::new();
        for i in 0..200 {
            let r = keyed(client.get(&url), &format!("user-{i}"))
                .send()
                .await
                .unwrap();
            first.push(r.headers()["x-upstream"].to_str().unwrap().to_string());
        }
        for i in (0..200).step_by(7) {
            let r = keyed(client.get(&url), &format!("user-{i}"))
                .send()
                .await
                .unwrap();
            assert_eq!(
                r.headers()["x-upstream"],
                first[i].as_str(),
                "{key}: user-{i} moved"
            );
        }
        let spread = shares(&first, 4);
        assert!(
            spread.iter().all(|s| *s > 0.1),
            "{key}: keys spread over all endpoints {spread:?}"
        );
    }
}

// `reload` blocks its thread: the backends must still answer meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checks_a_reload_replaced_stop_even_while_a_request_holds_the_old_pool() {
    let bs = backends(1).await;
    let slow = Backend::start("slow", Duration::from_secs(8)).await;
    let setup = Setup::new();
    let pool = |path: &str| {
        config(&format!(
            "{}\n[upstream.health_check]\npath = \"{path}\"\ninterval = \"100ms\"\nfall = 1\nrise = 1\n\n[[upstream]]\nname = \"slow\"\nendpoints = [\"{}\"]\nresponse_timeout = \"30s\"\n",
            endpoints(&bs, None),
            slow.endpoint()
        ))
        .replace(
            "[[route]]\nname = \"all\"",
            "[[route]]\nname = \"slow\"\npath = { prefix = \"/slow\" }\nupstream = \"slow\"\n\n[[route]]\nname = \"all\"",
        )
    };
    let (old, new) = (pool("/health"), pool("/elsewhere"));
    let wraith = setup.start(&old);
    let client = http_client();
    let status = || async {
        client
            .get(wraith.url("http", "/x"))
            .send()
            .await
            .unwrap()
            .status()
    };
    assert_eq!(status().await, 200);
    // A request in flight keeps the old snapshot, and its pool, alive across the reload.
    let held = tokio::spawn({
        let (client, url) = (client.clone(), wraith.url("http", "/slow"));
        async move { client.get(url).send().await.map(|r| r.status().as_u16()) }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    wraith.write_config(&new);
    wraith.reload().unwrap();
    // The old check path now fails: only the new checks (which pass) may decide.
    bs[0].healthy.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let down = wraith.log_json().into_iter().any(|v| {
        v["message"] == "endpoint is down (health check)"
            && v["endpoint"]
                .as_str()
                .is_some_and(|e| e.ends_with(&bs[0].endpoint()))
    });
    assert!(
        !down,
        "the replaced pool's checks still ran:\n{}",
        wraith.log()
    );
    assert_eq!(status().await, 200);
    assert!(
        !held.is_finished(),
        "the held request should still be in flight"
    );
    assert_eq!(held.await.unwrap().unwrap(), 200);
}

#[tokio::test]
async fn request_bodies_the_client_breaks_never_eject_an_endpoint() {
    for protocol in ["http1", "h2c"] {
        let bs = backends(2).await;
        let setup = Setup::new();
        let wraith = setup.start(&config(&format!(
            "{}\nprotocol = \"{protocol}\"\noutlier = {{ consecutive_failures = 2, base_ejection_time = \"1m\", max_ejected_percent = 50 }}\n",
            endpoints(&bs, None)
        )));
        for _ in 0..6 {
            // One good chunk, then a chunk-size line that is no number: the client's body
            // fails while its connection stays open for the answer.
            let mut s = tokio::net::TcpStream::connect(wraith.addr("http"))
                .await
                .unwrap();
            s.write_all(
                b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
            )
            .await
            .unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
            s.write_all(b"zz\r\n").await.unwrap();
            let mut out = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
            let out = String::from_utf8_lossy(&out);
            // The client's error, answered as one (nginx says 400 too).
            assert!(out.starts_with("HTTP/1.1 400 "), "{protocol}: {out}");
            assert!(out.contains("\"bad_request\""), "{protocol}: {out}");
        }
        // Healthy requests still reach both endpoints, and none was ejected.
        let client = http_client();
        for _ in 0..4 {
            let resp = client.get(wraith.url("http", "/p")).send().await.unwrap();
            assert_eq!(resp.status(), 200, "{protocol}");
        }
        let status = wraith.status().await;
        for e in status["upstreams"][0]["endpoints"].as_array().unwrap() {
            assert_ne!(e["health"], "ejected", "{protocol}: {status}");
        }
        assert_eq!(
            status["traffic"]["server_errors"], 0,
            "{protocol}: {status}"
        );
        assert!(
            !wraith.log().contains("endpoint ejected"),
            "{protocol}: {}",
            wraith.log()
        );
    }
}

/// A request waiting for a free endpoint takes one that comes back (its health check passes
/// again) at once: waiters were woken only when a request ended, so with the other endpoint
/// busy it sat out its pending_timeout and got 503 beside an idle, healthy endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_request_takes_an_endpoint_that_comes_back() {
    let back = Backend::start("back", Duration::ZERO).await;
    let busy = Backend::start("busy", Duration::from_secs(30)).await;
    back.healthy.store(false, Ordering::SeqCst);
    let setup = Setup::new();
    let wraith = setup.start(&config(&format!(
        "endpoints = [{{ address = \"{}\", max_connections = 1 }}, {{ address = \"{}\", max_connections = 1 }}]\nmax_pending = 5\npending_timeout = \"10s\"\nresponse_timeout = \"60s\"\noutlier = {{ consecutive_failures = 0 }}\n[upstream.health_check]\npath = \"/health\"\ninterval = \"100ms\"\nfall = 1\nrise = 1\n",
        back.endpoint(),
        busy.endpoint()
    )));
    assert!(wait_health(&wraith, &back.endpoint(), "down").await);
    let client = http_client();
    // The one healthy endpoint's one connection is taken for 30 s.
    let _long = one_in_flight(&client, &wraith.url("http", "/long"), &busy).await;
    let waiter = tokio::spawn({
        let (client, url) = (client.clone(), wraith.url("http", "/waits"));
        async move {
            let r = client.get(&url).send().await.unwrap();
            let from = r.headers().get("x-upstream").cloned();
            (r.status(), from)
        }
    });
    assert!(
        Wraith::eventually(Duration::from_secs(5), || async {
            wraith.status().await["upstreams"][0]["pending"] == 1
        })
        .await,
        "the request never waited"
    );
    back.healthy.store(true, Ordering::SeqCst);
    let (status, from) = waiter.await.unwrap();
    assert_eq!(status, 200, "the waiter got no endpoint");
    assert_eq!(from.unwrap(), "back");
}

/// An upstream that reads a request and: for `/long`, answers after 30 s; for `/hangup`,
/// closes without answering; for `/short`, answers after 1 s; for `/cut`, sends a 200 head
/// promising 1000 bytes and 10 of them, then closes; else answers at once.
async fn scripted_endpoint() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let mut tmp = [0u8; 4096];
                    match s.read(&mut tmp).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&tmp[..n]),
                    }
                    if buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
                let head = String::from_utf8_lossy(&buf).to_string();
                let path = head.split(' ').nth(1).unwrap_or("").to_string();
                match path.as_str() {
                    "/hangup" => return,
                    "/cut" => {
                        let _ = s
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n0123456789")
                            .await;
                        return;
                    }
                    "/long" => tokio::time::sleep(Duration::from_secs(30)).await,
                    "/short" => tokio::time::sleep(Duration::from_secs(1)).await,
                    _ => {}
                }
                let _ = s
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                    )
                    .await;
            });
        }
    });
    addr
}

/// A freed connection slot wakes every waiter, not one: the first waiter, a retry that has
/// tried the endpoint just freed, cannot take it, and the wake-up it swallowed left the
/// waiter behind it (which could) to its pending_timeout and a 503, beside an idle endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_freed_slot_reaches_a_waiter_that_can_use_it() {
    let (x, y) = (scripted_endpoint().await, scripted_endpoint().await);
    let setup = Setup::new();
    let wraith = setup.start(&config(&format!(
        "endpoints = [{{ address = \"{x}\", max_connections = 1 }}, {{ address = \"{y}\", max_connections = 1 }}]\nmax_pending = 5\npending_timeout = \"6s\"\nresponse_timeout = \"60s\"\nretries = 1\noutlier = {{ consecutive_failures = 0 }}\n"
    )));
    let client = http_client();
    let get = |path: &str| {
        let (client, url) = (client.clone(), wraith.url("http", path));
        tokio::spawn(async move { client.get(&url).send().await.unwrap().status() })
    };
    let pending = |n: u64| {
        let wraith = &wraith;
        async move {
            Wraith::eventually(Duration::from_secs(5), || async {
                wraith.status().await["upstreams"][0]["pending"] == n
            })
            .await
        }
    };
    // One endpoint busy for 30 s; the other hangs up on the next request, which (tried it)
    // waits for the busy one.
    let _long = get("/long");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _retrying = get("/hangup");
    assert!(pending(1).await, "the retry never waited");
    // A 1 s request takes the free endpoint; a fresh request waits behind the retry.
    let short = get("/short");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let fresh = get("/fresh");
    assert!(pending(2).await, "the fresh request never waited");
    assert_eq!(short.await.unwrap(), 200);
    // The slot the short request freed reaches the fresh request.
    assert_eq!(fresh.await.unwrap(), 200);
}

/// fail_open is for a pool with no healthy endpoint: a request whose healthy endpoint
/// failed it is not retried on one that health checks hold down (it was, with nothing
/// logged).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_open_sends_nothing_to_a_down_endpoint_while_one_is_healthy() {
    let healthy = scripted_endpoint().await;
    let down = Backend::start("down", Duration::ZERO).await;
    down.healthy.store(false, Ordering::SeqCst);
    let setup = Setup::new();
    let wraith = setup.start(&config(&format!(
        "endpoints = [\"{healthy}\", \"{}\"]\nfail_open = true\nretries = 2\noutlier = {{ consecutive_failures = 0 }}\n[upstream.health_check]\npath = \"/health\"\ninterval = \"100ms\"\nfall = 1\nrise = 1\n",
        down.endpoint()
    )));
    assert!(wait_health(&wraith, &down.endpoint(), "down").await);
    assert!(wait_health(&wraith, &healthy.to_string(), "up").await);
    let client = http_client();
    for _ in 0..4 {
        let r = client
            .get(wraith.url("http", "/hangup"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 502);
    }
    assert_eq!(down.hits(), 0, "a retry went to the endpoint that is down");
}

/// Responses cut off mid-body count as broken responses for passive ejection: they were
/// recorded as successes when their heads came, and an endpoint breaking every response
/// was never ejected.
#[tokio::test]
async fn responses_cut_off_mid_body_eject_their_endpoint() {
    let broken = scripted_endpoint().await;
    let good = Backend::start("good", Duration::ZERO).await;
    let setup = Setup::new();
    let wraith = setup.start(&config(&format!(
        "endpoints = [\"{broken}\", \"{}\"]\noutlier = {{ consecutive_failures = 3, base_ejection_time = \"1m\", max_ejected_percent = 50 }}\n",
        good.endpoint()
    )));
    // A connection per request: the gateway closes a client connection whose response it
    // could not complete.
    let _ = http_client();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let mut cut = 0;
    for _ in 0..12 {
        // Cut off before the head reached the client, or in its body.
        let whole = match client.get(wraith.url("http", "/cut")).send().await {
            Ok(r) => r.bytes().await.is_ok(),
            Err(_) => false,
        };
        if !whole {
            cut += 1;
        }
    }
    assert_eq!(
        cut, 3,
        "the endpoint was ejected after its third broken response"
    );
    let e = wraith.endpoint_status("pool", &broken.to_string()).await;
    assert_eq!(e["health"], "ejected", "{e}");
    // Each broken body is in the server log, with the endpoint and why.
    let line = wraith
        .wait_log(Duration::from_secs(10), |v| {
            v["message"] == UPSTREAM_BODY_BROKE_OFF
        })
        .unwrap_or_else(|| panic!("no log line for a broken body:\n{}", wraith.log()));
    assert_eq!(line["upstream"], "pool", "{line}");
    assert_eq!(line["endpoint"], broken.to_string(), "{line}");
    assert!(
        line["error"]
            .as_str()
            .is_some_and(|e| e.contains("upstream")),
        "{line}"
    );
}

/// Requests still running on an endpoint that a reload removed count against its
/// `max_connections` when a later reload adds it back: only the previous snapshot's counts
/// were carried over, and the endpoint took more requests than its limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_removed_and_added_back_keeps_counting_its_requests() {
    let a = Backend::start("a", Duration::from_secs(4)).await;
    let b = Backend::start("b", Duration::ZERO).await;
    let setup = Setup::new();
    let with = |endpoint: &str| {
        config(&format!(
            "endpoints = [{{ address = \"{endpoint}\", max_connections = 2 }}]\nmax_pending = 0\nresponse_timeout = \"20s\"\n"
        ))
    };
    let wraith = setup.start(&with(&a.endpoint()));
    let client = http_client();
    let url = wraith.url("http", "/slow");
    let running: Vec<_> = (0..2)
        .map(|_| {
            let (client, url) = (client.clone(), url.clone());
            tokio::spawn(async move { client.get(&url).send().await.unwrap().status() })
        })
        .collect();
    assert!(
        Wraith::eventually(Duration::from_secs(5), || async {
            a.concurrent.load(Ordering::SeqCst) == 2
        })
        .await
    );
    // Removed, then added back while its two requests run.
    wraith.write_config(&with(&b.endpoint()));
    wraith.reload().unwrap();
    wraith.write_config(&with(&a.endpoint()));
    wraith.reload().unwrap();
    let e = wraith.endpoint_status("pool", &a.endpoint()).await;
    assert_eq!(e["in_flight"], 2, "{e}");
    let r = client.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 503, "the endpoint's two connections are taken");
    for r in running {
        assert_eq!(r.await.unwrap(), 200);
    }
    assert_eq!(a.max_concurrent.load(Ordering::SeqCst), 2);
}

/// An h2c server that allows `max_streams` streams per connection and holds every request
/// until `release` is notified (or answers at once: `start_answering`); it counts its
/// connections and the requests it holds at once.
struct StreamLimitedH2 {
    addr: std::net::SocketAddr,
    connections: Arc<AtomicUsize>,
    holding: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
    release: Arc<tokio::sync::Notify>,
}

impl StreamLimitedH2 {
    async fn start(max_streams: u32) -> StreamLimitedH2 {
        Self::start_with(max_streams, true).await
    }

    async fn start_answering(max_streams: u32) -> StreamLimitedH2 {
        Self::start_with(max_streams, false).await
    }

    async fn start_with(max_streams: u32, hold: bool) -> StreamLimitedH2 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = StreamLimitedH2 {
            addr: listener.local_addr().unwrap(),
            connections: Arc::default(),
            holding: Arc::default(),
            peak: Arc::default(),
            release: Arc::default(),
        };
        let (connections, holding, peak, release) = (
            server.connections.clone(),
            server.holding.clone(),
            server.peak.clone(),
            server.release.clone(),
        );
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                connections.fetch_add(1, Ordering::SeqCst);
                let (holding, peak, release) = (holding.clone(), peak.clone(), release.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |_req: Request<Incoming>| {
                        let (holding, peak, release) =
                            (holding.clone(), peak.clone(), release.clone());
                        async move {
                            let released = release.notified();
                            let now = holding.fetch_add(1, Ordering::SeqCst) + 1;
                            peak.fetch_max(now, Ordering::SeqCst);
                            if hold {
                                released.await;
                            }
                            holding.fetch_sub(1, Ordering::SeqCst);
                            Ok::<_, std::convert::Infallible>(Response::new(full("ok")))
                        }
                    });
                    let _ = hyper::server::conn::http2::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .max_concurrent_streams(max_streams)
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
                });
            }
        });
        server
    }
}

/// An HTTP/2 upstream gets another connection when its connections have no stream to
/// spare: 20 requests held at once by a server allowing 5 streams per connection all reach
/// it, over 4 connections. With one connection per endpoint, 15 of them waited inside it
/// (for a stream, counting toward their response timeout). Afterwards, requests one at a
/// time share the first connection again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_upstream_gets_more_connections_when_its_streams_run_out() {
    let server = StreamLimitedH2::start(5).await;
    let setup = Setup::new();
    let wraith = setup.start(&config(&format!(
        "endpoints = [\"{}\"]\nprotocol = \"h2c\"\nh2_max_streams = 5\n",
        server.addr
    )));
    let client = http_client();
    let url = wraith.url("http", "/held");
    let requests: Vec<_> = (0..20)
        .map(|_| {
            let (client, url) = (client.clone(), url.clone());
            tokio::spawn(async move { client.get(url).send().await.map(|r| r.status()) })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.holding.load(Ordering::SeqCst) < 20 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        server.holding.load(Ordering::SeqCst),
        20,
        "requests held by the upstream at once (connections: {})",
        server.connections.load(Ordering::SeqCst)
    );
    assert_eq!(server.connections.load(Ordering::SeqCst), 4);
    // Release them all (each waits on the notification made before it counted itself).
    while server.holding.load(Ordering::SeqCst) > 0 {
        server.release.notify_waiters();
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for r in requests {
        assert_eq!(r.await.unwrap().unwrap(), 200);
    }
    assert_eq!(server.peak.load(Ordering::SeqCst), 20);
    // One at a time: all on the first connection, no new one.
    for _ in 0..5 {
        let (client, url) = (client.clone(), url.clone());
        let one = tokio::spawn(async move { client.get(url).send().await.map(|r| r.status()) });
        while server.holding.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        server.release.notify_waiters();
        assert_eq!(one.await.unwrap().unwrap(), 200);
    }
    assert_eq!(server.connections.load(Ordering::SeqCst), 4);
}

/// With `max_connections` equal to `h2_max_streams`, one connection carries everything: a
/// request that waited for the endpoint's slot was woken (the slot freed) before the stream
/// it was to replace had left its connection, found the connection full, and opened a second
/// one (found by a helper's chaos run: 2 connections in 5 of 5 runs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_endpoint_at_max_connections_needs_one_connection() {
    let server = StreamLimitedH2::start_answering(4).await;
    let setup = Setup::new();
    let wraith = setup.start(&config(&format!(
        "endpoints = [{{ address = \"{}\", max_connections = 4 }}]\nprotocol = \"h2c\"\nh2_max_streams = 4\nmax_pending = 1000\n",
        server.addr
    )));
    let client = http_client();
    let url = wraith.url("http", "/x");
    let results: Vec<_> = futures_util::stream::iter(0..3000)
        .map(|_| {
            let (client, url) = (client.clone(), url.clone());
            async move { client.get(url).send().await.map(|r| r.status().as_u16()) }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    assert!(results.iter().all(|r| matches!(r, Ok(200))), "{results:?}");
    assert!(server.peak.load(Ordering::SeqCst) <= 4);
    assert_eq!(server.connections.load(Ordering::SeqCst), 1);
}

/// A reload that fails must leave nothing of itself wired into the running pools. One that
/// added connection limits and then failed (a port in use) had its upstream, which never
/// served, take the old pool's one release notification: the next, successful reload with
/// the limits then had its waiters sit out `pending_timeout` for a request of the old pool
/// that had long ended.
#[tokio::test]
async fn a_failed_reload_leaves_the_running_pools_waking_the_next_ones_waiters() {
    let slow = Backend::start("slow", Duration::from_secs(2)).await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let setup = Setup::new();
    let limits = "max_connections = 1\nmax_pending = 10\npending_timeout = \"15s\"\n";
    let upstream = |limits: &str| {
        config(&format!(
            "endpoints = [\"{}\"]\nresponse_timeout = \"20s\"\n{limits}",
            slow.endpoint()
        ))
    };
    let wraith = setup.start(&upstream(""));
    let client = http_client();
    let url = wraith.url("http", "/p");

    let failing = format!(
        "{}\n[[listener]]\nname = \"taken\"\naddress = \"{}\"\nprotocol = \"http\"\n",
        upstream(limits),
        taken.local_addr().unwrap()
    );
    wraith.write_config(&failing);
    let refused = wraith.reload().unwrap_err();
    assert!(refused.contains("taken"), "{refused}");

    let first = one_in_flight(&client, &url, &slow).await;
    wraith.write_config(&upstream(limits));
    wraith.reload().unwrap();
    let started = Instant::now();
    let second = client.get(&url).send().await.unwrap();
    assert_eq!(second.status(), 200);
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "the waiter sat out its pending_timeout: {:?}",
        started.elapsed()
    );
    assert_eq!(first.await.unwrap(), 200);
}
