//! The CrowdSec bridge against Debian's real crowdsec 1.4.6: a LAPI on a free loopback port,
//! a bouncer key registered with cscli, decisions added and deleted with cscli, the LAPI
//! stopped and restarted, and the full loop (Wraith's own access log -> crowdsec agent ->
//! ban -> Wraith refuses). Clients appear as TEST-NET addresses through a trusted-proxy
//! X-Forwarded-For (CrowdSec whitelists 127.0.0.1 and private ranges). A stub LAPI stands in
//! where the answer has to be one no real LAPI sends (malformed entries).

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::crowdsec::{self, Crowdsec, BOUNCER_KEY, BOUNCER_KEY_2};
use common::*;

/// A gateway in front of nothing (built-in responses), trusting 127.0.0.0/8 as a proxy, with
/// the CrowdSec bridge polling `lapi` every `every`.
fn config(setup: &Setup, lapi: &str, every: &str, extra: &str) -> String {
    let listeners = setup.listeners().replace(
        "[server]\n",
        "[server]\ntrusted_proxies = [\"127.0.0.0/8\"]\n",
    );
    format!(
        r#"{listeners}
[crowdsec]
lapi_url = "{lapi}"
api_key = "{BOUNCER_KEY}"
update_frequency = "{every}"
{extra}

[[route]]
name = "home"
path = {{ prefix = "/" }}
respond = {{ status = 200, body = "ok\n" }}
"#
    )
}

/// Status of a request "from" `client` (via the trusted-proxy header).
async fn status_for(client: &reqwest::Client, wraith: &Wraith, ip: &str) -> u16 {
    client
        .get(wraith.url("http", "/"))
        .header("x-forwarded-for", ip)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// Polls until a request from `ip` gets `want`; returns how long that took.
async fn until_status(
    client: &reqwest::Client,
    wraith: &Wraith,
    ip: &str,
    want: u16,
    deadline: Duration,
) -> Duration {
    let start = Instant::now();
    loop {
        let got = status_for(client, wraith, ip).await;
        if got == want {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < deadline,
            "{ip}: still {got} after {deadline:?}, expected {want}\n{}",
            wraith.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn bridge_synced(wraith: &Wraith) {
    assert!(
        wraith
            .wait_log(Duration::from_secs(20), |v| v["message"]
                == "crowdsec decisions updated"
                && v["full"] == true)
            .is_some(),
        "the bridge never completed a full pull:\n{}",
        wraith.log()
    );
}

#[tokio::test]
async fn cscli_decisions_take_effect_within_two_polls_and_deletes_lift_them() {
    if !crowdsec::available("cscli_decisions_take_effect_within_two_polls") {
        return;
    }
    let cs = Crowdsec::lapi();
    let setup = Setup::new();
    let cfg = config(&setup, &cs.url(), "1s", "");
    let wraith = setup.start(&cfg);
    bridge_synced(&wraith);
    let client = http_client();
    assert_eq!(status_for(&client, &wraith, "192.0.2.10").await, 200);

    cs.cscli_ok(&["decisions", "add", "--ip", "192.0.2.10", "--duration", "1h"]);
    cs.cscli_ok(&[
        "decisions",
        "add",
        "--range",
        "198.51.100.0/24",
        "--duration",
        "1h",
    ]);
    cs.cscli_ok(&[
        "decisions",
        "add",
        "--range",
        "2001:db8:77::/48",
        "--duration",
        "1h",
    ]);
    // Two poll intervals (1s each) when all is well; the bound is generous because a busy
    // machine (cscli, LAPI and gateway all on it) can stall a poll for seconds.
    let within = Duration::from_secs(15);
    until_status(&client, &wraith, "192.0.2.10", 403, within).await;
    until_status(&client, &wraith, "198.51.100.77", 403, within).await;
    until_status(&client, &wraith, "2001:db8:77:1::5", 403, within).await;
    // Neighbours are untouched; so is the proxy itself.
    assert_eq!(status_for(&client, &wraith, "192.0.2.11").await, 200);
    assert_eq!(status_for(&client, &wraith, "198.51.101.1").await, 200);
    assert_eq!(status_for(&client, &wraith, "2001:db8:78::1").await, 200);
    let direct = client.get(wraith.url("http", "/")).send().await.unwrap();
    assert_eq!(direct.status(), 200);

    // The refusal is the JSON error with the request id.
    let resp = client
        .get(wraith.url("http", "/"))
        .header("x-forwarded-for", "198.51.100.77")
        .send()
        .await
        .unwrap();
    let rid = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "banned");
    assert_eq!(body["request_id"], rid);

    // The admin API lists them as CrowdSec decisions.
    let (st, list) = wraith
        .admin(http::Method::GET, "/v1/decisions?source=crowdsec", None)
        .await;
    assert_eq!(st, 200);
    assert_eq!(list["count"], 3, "{list}");

    // LAPI recorded who we are from the User-Agent.
    let bouncers: serde_json::Value =
        serde_json::from_str(&cs.cscli_ok(&["bouncers", "list", "-o", "json"])).unwrap();
    let b = &bouncers[0];
    assert_eq!(b["type"], "wraith", "{bouncers}");
    assert_eq!(b["version"], env!("CARGO_PKG_VERSION"), "{bouncers}");

    cs.cscli_ok(&["decisions", "delete", "--ip", "192.0.2.10"]);
    cs.cscli_ok(&["decisions", "delete", "--range", "198.51.100.0/24"]);
    cs.cscli_ok(&["decisions", "delete", "--range", "2001:db8:77::/48"]);
    until_status(&client, &wraith, "192.0.2.10", 200, within).await;
    until_status(&client, &wraith, "198.51.100.77", 200, within).await;
    until_status(&client, &wraith, "2001:db8:77:1::5", 200, within).await;
    // 1.4.6 repeats deleted decisions on later polls: harmless, nothing comes back.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(status_for(&client, &wraith, "192.0.2.10").await, 200);
}

/// The LAPI ids of the active decisions on `value`, longest first (asked as a second
/// bouncer, so Wraith's own stream position is untouched).
async fn decision_ids(cs: &Crowdsec, value: &str) -> Vec<i64> {
    let body: serde_json::Value = http_client()
        .get(format!(
            "{}/v1/decisions/stream?startup=true&dedup=false",
            cs.url()
        ))
        .header("X-Api-Key", BOUNCER_KEY_2)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut found: Vec<(u64, i64)> = body["new"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|d| d["value"] == value)
        .map(|d| {
            let ms = wraith::decisions::godur::parse_millis(d["duration"].as_str().unwrap());
            (ms.unwrap() as u64, d["id"].as_i64().unwrap())
        })
        .collect();
    found.sort_unstable_by(|a, b| b.cmp(a));
    found.into_iter().map(|(_, id)| id).collect()
}

#[tokio::test]
async fn an_origins_filter_keeps_a_ban_that_a_longer_one_from_another_origin_would_hide() {
    if !crowdsec::available("an_origins_filter_keeps_a_ban") {
        return;
    }
    let cs = Crowdsec::lapi();
    // An imported list (origin `cscli-import`) bans two addresses for a day; cscli bans one
    // of them for an hour. By default the LAPI sends one decision per (value, scope, type),
    // the longest, whatever origins were asked for (1.4.6).
    let list = cs.dir.path().join("list.csv");
    std::fs::write(
        &list,
        "duration,scope,value\n24h,ip,192.0.2.50\n24h,ip,192.0.2.51\n",
    )
    .unwrap();
    cs.cscli_ok(&["decisions", "import", "-i", list.to_str().unwrap()]);
    cs.cscli_ok(&["decisions", "add", "--ip", "192.0.2.50", "--duration", "1h"]);
    // Two cscli bans of one address.
    cs.cscli_ok(&["decisions", "add", "--ip", "192.0.2.60", "--duration", "1h"]);
    cs.cscli_ok(&["decisions", "add", "--ip", "192.0.2.60", "--duration", "3h"]);

    let setup = Setup::new();
    let cfg = config(&setup, &cs.url(), "1s", r#"origins = ["cscli"]"#);
    let wraith = setup.start(&cfg);
    bridge_synced(&wraith);
    let client = http_client();
    // The cscli ban holds although a longer imported one covers the same address.
    assert_eq!(status_for(&client, &wraith, "192.0.2.50").await, 403);
    // Only the imported list bans this one: left out.
    assert_eq!(status_for(&client, &wraith, "192.0.2.51").await, 200);
    assert_eq!(status_for(&client, &wraith, "192.0.2.60").await, 403);
    let (st, list) = wraith
        .admin(http::Method::GET, "/v1/decisions?source=crowdsec", None)
        .await;
    assert_eq!(st, 200);
    assert_eq!(list["count"], 2, "{list}");

    // Deleting the longer of the two cscli bans leaves the shorter one in force.
    let ids = decision_ids(&cs, "192.0.2.60").await;
    assert_eq!(ids.len(), 2, "{ids:?}");
    cs.cscli_ok(&["decisions", "delete", "--id", &ids[0].to_string()]);
    // Two polls for the delete to arrive (and a third to be sure nothing else does).
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(status_for(&client, &wraith, "192.0.2.60").await, 403);
    cs.cscli_ok(&["decisions", "delete", "--id", &ids[1].to_string()]);
    until_status(&client, &wraith, "192.0.2.60", 200, Duration::from_secs(15)).await;
    assert_eq!(status_for(&client, &wraith, "192.0.2.50").await, 403);
}

#[tokio::test]
async fn a_reload_in_closed_mode_keeps_serving_while_the_decisions_are_fresh() {
    if !crowdsec::available("a_reload_in_closed_mode_keeps_serving") {
        return;
    }
    let mut cs = Crowdsec::lapi();
    let setup = Setup::new();
    let closed = |every: &str| {
        config(
            &setup,
            &cs.url(),
            every,
            "on_error = \"closed\"\nmax_staleness = \"60s\"\ntimeout = \"2s\"",
        )
    };
    let (first, second) = (closed("300ms"), closed("400ms"));
    let wraith = setup.start(&first);
    bridge_synced(&wraith);
    let client = http_client();
    cs.cscli_ok(&["decisions", "add", "--ip", "192.0.2.90", "--duration", "1h"]);
    until_status(&client, &wraith, "192.0.2.90", 403, Duration::from_secs(10)).await;

    // The LAPI goes away and a reload restarts the bridge (another update_frequency): the
    // decisions in hand are seconds old, far from max_staleness, so nothing is refused
    // while the new bridge waits for its first pull, and the ban still holds.
    cs.stop();
    wraith.write_config(&second);
    wraith.reload().unwrap();
    assert!(
        wraith
            .wait_log(Duration::from_secs(10), |v| v["message"]
                == "crowdsec bridge started"
                && v["every"].as_str().is_some_and(|e| e.contains("400")))
            .is_some(),
        "{}",
        wraith.log()
    );
    for _ in 0..5 {
        assert_eq!(status_for(&client, &wraith, "192.0.2.91").await, 200);
        assert_eq!(status_for(&client, &wraith, "192.0.2.90").await, 403);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_lapi_that_goes_away_gives_open_or_closed() {
    if !crowdsec::available("a_lapi_that_goes_away_gives_open_or_closed") {
        return;
    }
    let mut cs = Crowdsec::lapi();
    let open_setup = Setup::new();
    let cfg = config(
        &open_setup,
        &cs.url(),
        "300ms",
        "on_error = \"open\"\nmax_staleness = \"3s\"\ntimeout = \"3s\"",
    );
    let open = open_setup.start(&cfg);
    let closed_setup = Setup::new();
    let cfg = config(
        &closed_setup,
        &cs.url(),
        "300ms",
        "on_error = \"closed\"\nmax_staleness = \"3s\"\ntimeout = \"3s\"",
    );
    // Its own bouncer key: LAPI tracks last_pull per bouncer.
    let closed = closed_setup.start(&cfg.replace(BOUNCER_KEY, BOUNCER_KEY_2));
    bridge_synced(&open);
    bridge_synced(&closed);
    let client = http_client();
    let limit = Duration::from_secs(10);

    cs.cscli_ok(&["decisions", "add", "--ip", "192.0.2.20", "--duration", "1h"]);
    until_status(&client, &open, "192.0.2.20", 403, limit).await;
    until_status(&client, &closed, "192.0.2.20", 403, limit).await;
    // (Polled: one slow pull must not count as the LAPI being gone.)
    until_status(&client, &closed, "192.0.2.21", 200, limit).await;

    cs.stop();
    // Closed: once the data is older than max_staleness, everyone gets 503.
    until_status(&client, &closed, "192.0.2.21", 503, limit).await;
    let resp = client
        .get(closed.url("http", "/"))
        .header("x-forwarded-for", "192.0.2.21")
        .send()
        .await
        .unwrap();
    assert!(resp.headers().contains_key("retry-after"));
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "decisions_unavailable");
    // Open: once stale too, keeps serving, and keeps enforcing what it already knew.
    assert!(open
        .wait_log(limit, |v| v["message"]
            .as_str()
            .is_some_and(|m| m.contains("stale")))
        .is_some());
    assert_eq!(status_for(&client, &open, "192.0.2.21").await, 200);
    assert_eq!(status_for(&client, &open, "192.0.2.20").await, 403);

    // The LAPI comes back: the closed gateway opens again, with the ban still there.
    cs.start();
    until_status(&client, &closed, "192.0.2.21", 200, limit).await;
    assert_eq!(status_for(&client, &closed, "192.0.2.20").await, 403);
}

#[tokio::test]
async fn wraith_logs_fed_to_a_crowdsec_agent_produce_a_ban_that_wraith_enforces() {
    if !crowdsec::available("wraith_logs_fed_to_a_crowdsec_agent") {
        return;
    }
    let setup = Setup::new();
    let access_log = setup.dir.path().join("access.log");
    // The shipped acquisition file, pointed at this test's log.
    let shipped = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("integrations/crowdsec/acquis.yaml"),
    )
    .unwrap();
    let acquis = shipped.replace("/var/log/wraith/access.log", access_log.to_str().unwrap());
    assert_ne!(
        acquis, shipped,
        "the shipped file names /var/log/wraith/access.log"
    );

    // Wraith first (it creates the log), then the agent tailing it.
    let port = common::unused_port();
    let lapi = format!("http://127.0.0.1:{port}");
    let cfg = config(
        &setup,
        &lapi,
        "500ms",
        "\n[log.combined]\npath = \"access.log\"\n",
    )
    .replace(
        "[[route]]\nname = \"home\"\npath = { prefix = \"/\" }",
        "[[route]]\nname = \"home\"\npath = { exact = \"/\" }",
    );
    let wraith = setup.start(&cfg);
    let cs = Crowdsec::with_agent_on_port(&acquis, port);
    bridge_synced(&wraith);

    let client = http_client();
    let attacker = "203.0.113.50";
    assert_eq!(status_for(&client, &wraith, attacker).await, 200);
    // http-probing: more than 10 distinct 404 paths from one address. The agent tails the
    // file from its end, so keep probing (new paths) until the ban lands rather than betting
    // that its tail was in place before the first line: under load it may not be yet.
    let start = Instant::now();
    let mut i = 0;
    loop {
        let resp = client
            .get(wraith.url("http", &format!("/probe-{i}/admin.php")))
            .header("x-forwarded-for", attacker)
            .header("user-agent", "Mozilla/5.0 (X11; Linux x86_64)")
            .send()
            .await
            .unwrap();
        i += 1;
        if resp.status() == 403 {
            break;
        }
        assert_eq!(resp.status(), 404);
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no ban after {i} probes in 60s\n{}\n{}",
            wraith.log(),
            cs.log()
        );
        if i >= 15 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let text = std::fs::read_to_string(&access_log).unwrap();
    assert!(
        text.lines().any(|l| l.starts_with("203.0.113.50 - - [")
            && l.contains("\"GET /probe-3/admin.php HTTP/1.1\" 404 ")),
        "combined log:\n{text}"
    );
    // Banned means 403 everywhere, unknown paths included.
    let r = client
        .get(wraith.url("http", "/probe-99/admin.php"))
        .header("x-forwarded-for", attacker)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let alerts = cs.cscli_ok(&["alerts", "list", "-o", "json"]);
    assert!(alerts.contains("crowdsecurity/http-probing"), "{alerts}");
    // Someone else is still welcome.
    assert_eq!(status_for(&client, &wraith, "203.0.113.51").await, 200);
}

#[tokio::test]
async fn mtls_to_the_lapi_authenticates_without_an_api_key() {
    if !crowdsec::available("mtls_to_the_lapi_authenticates_without_an_api_key") {
        return;
    }
    let setup = Setup::new();
    let dir = setup.dir.path().to_path_buf();
    // The LAPI's server certificate, and a bouncer client certificate (OU bouncer-ou), both
    // from the test CA.
    let server = setup
        .pki
        .ca
        .issue_server(&["127.0.0.1", "localhost"])
        .unwrap();
    std::fs::write(dir.join("lapi.pem"), &server.cert_pem).unwrap();
    std::fs::write(dir.join("lapi-key.pem"), &server.key_pem).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "wraith");
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationalUnitName, "bouncer-ou");
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let bouncer = setup.pki.ca.issue(params, 30).unwrap();
    std::fs::write(dir.join("bouncer.pem"), &bouncer.cert_pem).unwrap();
    std::fs::write(dir.join("bouncer-key.pem"), &bouncer.key_pem).unwrap();
    let cs = Crowdsec::lapi_tls(crowdsec::LapiTls {
        cert: dir.join("lapi.pem"),
        key: dir.join("lapi-key.pem"),
        ca: setup.pki.ca_pem.clone(),
    });
    assert!(cs.url().starts_with("https://"));

    let listeners = setup.listeners().replace(
        "[server]\n",
        "[server]\ntrusted_proxies = [\"127.0.0.0/8\"]\n",
    );
    let cfg = format!(
        r#"{listeners}
[crowdsec]
lapi_url = "{}"
ca_cert = "ca.pem"
client_cert = "bouncer.pem"
client_key = "bouncer-key.pem"
update_frequency = "500ms"

[[route]]
name = "home"
path = {{ prefix = "/" }}
respond = {{ status = 200, body = "ok\n" }}
"#,
        cs.url()
    );
    let wraith = setup.start(&cfg);
    bridge_synced(&wraith);
    let client = http_client();
    cs.cscli_ok(&["decisions", "add", "--ip", "192.0.2.60", "--duration", "1h"]);
    until_status(&client, &wraith, "192.0.2.60", 403, Duration::from_secs(10)).await;
    // LAPI registered the certificate as a TLS bouncer named after its CN.
    let bouncers: serde_json::Value =
        serde_json::from_str(&cs.cscli_ok(&["bouncers", "list", "-o", "json"])).unwrap();
    let tls_bouncer = bouncers
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"].as_str().is_some_and(|n| n.starts_with("wraith@")))
        .unwrap_or_else(|| panic!("no certificate bouncer in {bouncers}"));
    assert_eq!(tls_bouncer["auth_type"], "tls", "{bouncers}");
}

/// A stub LAPI whose answers mix malformed entries with good ones: the snapshot bans
/// .60 and .62 (.61 has no type), every delta bans .64 (.63's `simulated` is a string) and
/// deletes .62 (beside a deleted entry without a value). Counts the deltas it has served.
async fn broken_lapi(deltas: Arc<AtomicUsize>) -> Upstream {
    const SNAPSHOT: &str = r#"{"new":[
 {"id":1,"duration":"1h","origin":"cscli","scope":"Ip","value":"192.0.2.60","type":"ban"},
 {"id":2,"duration":"1h","origin":"cscli","scope":"Ip","value":"192.0.2.61"},
 {"id":3,"duration":"1h","origin":"cscli","scope":"Ip","value":"192.0.2.62","type":"ban"}],
 "deleted":[{"id":9,"scope":"Ip","value":{},"type":"ban"}]}"#;
    const DELTA: &str = r#"{"new":[
 {"id":4,"duration":"1h","origin":"cscli","scope":"Ip","value":"192.0.2.63","type":"ban","simulated":"false"},
 {"id":5,"duration":"1h","origin":"cscli","scope":"Ip","value":"192.0.2.64","type":"ban"}],
 "deleted":[{"id":8,"duration":"-1s","origin":"cscli","scope":"Ip","type":"ban"},
 {"id":3,"duration":"-1s","origin":"cscli","scope":"Ip","value":"192.0.2.62","type":"ban"}]}"#;
    Upstream::start(move |req: hyper::Request<hyper::body::Incoming>| {
        let deltas = deltas.clone();
        async move {
            let snapshot = req
                .uri()
                .query()
                .is_some_and(|q| q.contains("startup=true"));
            if !snapshot {
                deltas.fetch_add(1, Ordering::SeqCst);
            }
            hyper::Response::builder()
                .header("content-type", "application/json")
                .body(full(if snapshot { SNAPSHOT } else { DELTA }))
                .unwrap()
        }
    })
    .await
}

// Multi-threaded: the stub serves while this thread blocks on Wraith's log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_lapi_entry_is_skipped_and_the_rest_applied() {
    let deltas = Arc::new(AtomicUsize::new(0));
    let lapi = broken_lapi(deltas.clone()).await;
    let setup = Setup::new();
    let cfg = config(&setup, &format!("http://{}", lapi.addr), "200ms", "");
    let wraith = setup.start(&cfg);
    bridge_synced(&wraith);
    let client = http_client();
    // The snapshot's good entries are enforced (until the delta deletes .62, so no check
    // on it here), the bad one is not.
    assert_eq!(status_for(&client, &wraith, "192.0.2.60").await, 403);
    assert_eq!(status_for(&client, &wraith, "192.0.2.61").await, 200);
    // A delta with a bad entry in each list still bans and lifts.
    until_status(&client, &wraith, "192.0.2.64", 403, Duration::from_secs(10)).await;
    until_status(&client, &wraith, "192.0.2.62", 200, Duration::from_secs(10)).await;
    assert_eq!(status_for(&client, &wraith, "192.0.2.63").await, 200);
    assert_eq!(status_for(&client, &wraith, "192.0.2.60").await, 403);
    assert!(deltas.load(Ordering::SeqCst) > 0);
    // Each skip is logged with its reason; no pull failed.
    let logs = wraith.log_json();
    let ignored = |what: &str| {
        logs.iter().any(|v| {
            v["message"] == "crowdsec decision ignored"
                && v["reason"].as_str().is_some_and(|r| r.contains(what))
        })
    };
    assert!(
        ignored("\"scope\", \"value\" and \"type\""),
        "{}",
        wraith.log()
    );
    assert!(ignored("\"simulated\" is a string"), "{}", wraith.log());
    assert!(ignored("deleted entry"), "{}", wraith.log());
    assert!(
        !logs.iter().any(|v| v["message"]
            .as_str()
            .is_some_and(|m| m.contains("pull failed"))),
        "{}",
        wraith.log()
    );
}

/// A stub LAPI whose answer never ends: a chunked body of 1 MiB chunks, sent for as long
/// as the client reads.
async fn endless_lapi() -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = [0u8; 4096];
                let _ = s.read(&mut head).await;
                let start = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n";
                if s.write_all(start).await.is_err() {
                    return;
                }
                let mut chunk = b"{\"new\":[".to_vec();
                chunk.resize(1 << 20, b' ');
                let mut piece = format!("{:x}\r\n", chunk.len()).into_bytes();
                piece.extend_from_slice(&chunk);
                piece.extend_from_slice(b"\r\n");
                while s.write_all(&piece).await.is_ok() {}
            });
        }
    });
    addr
}

/// An answer refused at the 256 MiB ceiling leaves no trace in the gateway's memory: what
/// was read of it is given back to the system at once (mimalloc kept it, and an idle
/// gateway stayed 300 MiB larger for good).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_lapi_answer_is_refused_and_its_memory_given_back() {
    let lapi = endless_lapi().await;
    let setup = Setup::new();
    let cfg = config(&setup, &format!("http://{lapi}"), "60s", "");
    let wraith = setup.start(&cfg);
    assert!(
        wraith
            .wait_log(Duration::from_secs(60), |v| v["message"]
                .as_str()
                .is_some_and(|m| m.contains("pull failed"))
                && v["error"]
                    .as_str()
                    .is_some_and(|e| e.contains("larger than 256 MiB")))
            .is_some(),
        "the endless answer was not refused:\n{}",
        wraith.log()
    );
    let rss = wraith.rss_kib() / 1024;
    assert!(rss < 128, "the gateway holds {rss} MiB after the refusal");
    // And it serves (open mode: no decisions yet is no ban).
    let client = http_client();
    assert_eq!(status_for(&client, &wraith, "192.0.2.70").await, 200);
}
