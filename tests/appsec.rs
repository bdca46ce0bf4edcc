//! CrowdSec AppSec (WAF) forwarding against a faithful stub (AppSec needs CrowdSec >= 1.6;
//! Debian ships 1.4.6). The stub follows the documented protocol and the Traefik bouncer's
//! mock LAPI: it requires the Ip/Uri/Verb headers (else 500), checks the API key (else 401
//! with an empty body), blocks URIs or bodies carrying a marker with 403 and
//! `{"action", "http_status"}`, and answers 500 (or a redirect to an "allow") on demand. The same stub serves an empty
//! decision stream in the 1.7.8+ shape (`[]`), so the bridge is exercised too.

mod common;

use std::sync::{Arc, Mutex};

use common::*;
use http_body_util::BodyExt;
use hyper::{Request, Response};

const KEY: &str = "appsec-test-key";

/// What the stub saw of one inspection.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    headers: http::HeaderMap,
    body: Vec<u8>,
}

async fn stub(seen: Arc<Mutex<Vec<Seen>>>) -> Upstream {
    Upstream::start(move |req: Request<hyper::body::Incoming>| {
        let seen = seen.clone();
        async move {
            let (parts, body) = req.into_parts();
            let body = body.collect().await.unwrap().to_bytes().to_vec();
            let reply = |status: u16, json: &str| {
                Response::builder()
                    .status(status)
                    .header("content-type", "application/json")
                    .body(full(json.to_string()))
                    .unwrap()
            };
            if parts.uri.path().starts_with("/v1/decisions/stream") {
                return reply(200, r#"{"new": [], "deleted": []}"#);
            }
            // Where the redirect below points: an "allow" for whoever follows it.
            if parts.uri.path() == "/elsewhere" {
                return reply(200, r#"{"action":"allow","http_status":200}"#);
            }
            let h = &parts.headers;
            let get = |n: &str| h.get(n).and_then(|v| v.to_str().ok()).map(String::from);
            seen.lock().unwrap().push(Seen {
                method: parts.method.to_string(),
                headers: h.clone(),
                body: body.clone(),
            });
            let (Some(_ip), Some(uri), Some(_verb)) = (
                get("x-crowdsec-appsec-ip"),
                get("x-crowdsec-appsec-uri"),
                get("x-crowdsec-appsec-verb"),
            ) else {
                return reply(500, "");
            };
            if get("x-crowdsec-appsec-api-key").as_deref() != Some(KEY) {
                return reply(401, "");
            }
            if uri.contains("fail500") {
                return reply(500, "");
            }
            if uri.contains("redirectme") {
                return Response::builder()
                    .status(302)
                    .header("location", "/elsewhere")
                    .body(full(""))
                    .unwrap();
            }
            if uri.contains("teapot") {
                return reply(403, r#"{"action":"ban","http_status":418}"#);
            }
            if uri.contains("hugeverdict") {
                let pad = "x".repeat(1 << 20);
                let verdict = format!(r#"{{"action":"ban","http_status":418,"pad":"{pad}"}}"#);
                return reply(403, &verdict);
            }
            if uri.contains("blockme") || String::from_utf8_lossy(&body).contains("<script>") {
                return reply(403, r#"{"action":"ban","http_status":403}"#);
            }
            reply(200, r#"{"action":"allow","http_status":200}"#)
        }
    })
    .await
}

fn config(
    setup: &Setup,
    stub: std::net::SocketAddr,
    upstream: std::net::SocketAddr,
    extra: &str,
) -> String {
    let listeners = setup.listeners().replace(
        "[server]\n",
        "[server]\ntrusted_proxies = [\"127.0.0.0/8\"]\n",
    );
    format!(
        r#"{listeners}
[crowdsec]
lapi_url = "http://{stub}"
api_key = "{KEY}"

[crowdsec.appsec]
url = "http://{stub}/"
# No test waits for it to fire (the unreachable WAF refuses at once): long enough that a
# stalled machine never turns an answer into a failure.
timeout = "10s"
max_body = "1KiB"
{extra}

[[upstream]]
name = "app"
endpoints = ["{upstream}"]

[[route]]
name = "app"
path = {{ prefix = "/" }}
upstream = "app"
"#
    )
}

#[tokio::test]
async fn requests_are_inspected_with_the_documented_headers() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let waf = stub(seen.clone()).await;
    let app = Upstream::echo().await;
    let setup = Setup::new();
    let cfg = config(&setup, waf.addr, app.addr, "");
    let wraith = setup.start(&cfg);
    let client = http_client();

    // GET without a body: inspected with GET, forwarded.
    let r = client
        .get(wraith.url("http", "/x?q=1"))
        .header("x-forwarded-for", "192.0.2.50")
        .header("user-agent", "test-agent/1.0")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let s = seen.lock().unwrap().last().cloned().unwrap();
    assert_eq!(s.method, "GET");
    let h = |n: &str| s.headers[n].to_str().unwrap().to_string();
    assert_eq!(h("x-crowdsec-appsec-ip"), "192.0.2.50");
    assert_eq!(h("x-crowdsec-appsec-uri"), "/x?q=1");
    assert_eq!(h("x-crowdsec-appsec-verb"), "GET");
    assert_eq!(h("x-crowdsec-appsec-host"), "127.0.0.1");
    assert_eq!(h("x-crowdsec-appsec-api-key"), KEY);
    assert_eq!(h("x-crowdsec-appsec-user-agent"), "test-agent/1.0");
    assert_eq!(h("x-crowdsec-appsec-http-version"), "11");
    assert_eq!(
        h("user-agent"),
        "test-agent/1.0",
        "original headers are copied"
    );

    // A User-Agent with bytes beyond ASCII reaches the WAF as sent, not left out.
    let ua = http::HeaderValue::from_bytes(b"agent/\xe9\xff").unwrap();
    let r = client
        .get(wraith.url("http", "/ua"))
        .header("user-agent", ua.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let s = seen.lock().unwrap().last().cloned().unwrap();
    assert_eq!(s.headers.get("x-crowdsec-appsec-user-agent"), Some(&ua));
    // Two of them: the WAF sees both.
    let r = raw_exchange(
        wraith.addr("http"),
        b"GET /ua2 HTTP/1.1\r\nHost: localhost\r\nUser-Agent: harmless/1.0\r\n\
          User-Agent: sqlmap/1.7\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    let s = seen.lock().unwrap().last().cloned().unwrap();
    assert_eq!(
        s.headers["x-crowdsec-appsec-user-agent"],
        "harmless/1.0, sqlmap/1.7"
    );

    // POST with a body: inspected with POST and an explicit Content-Length, and the
    // upstream still gets the whole body.
    let r = client
        .post(wraith.url("http", "/submit"))
        .body("hello appsec")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let echoed: serde_json::Value = r.json().await.unwrap();
    assert_eq!(echoed["body_len"], 12);
    let s = seen.lock().unwrap().last().cloned().unwrap();
    assert_eq!(s.method, "POST");
    assert_eq!(s.body, b"hello appsec");
    assert_eq!(s.headers["content-length"], "12");

    // Blocks: 403 by default, or the status the WAF asks for.
    let r = client
        .get(wraith.url("http", "/blockme"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "appsec_blocked");
    let r = client
        .get(wraith.url("http", "/teapot"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 418);
    // A verdict past 4 KiB is not read: it blocks with the defaults.
    let r = client
        .get(wraith.url("http", "/hugeverdict"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = client
        .post(wraith.url("http", "/comment"))
        .body("<script>alert(1)</script>")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    // Bodies over max_body are refused rather than forwarded uninspected.
    let r = client
        .post(wraith.url("http", "/big"))
        .body(vec![b'a'; 4096])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    // A WAF failure with on_error = "open" (the default) lets the request through.
    let r = client
        .get(wraith.url("http", "/fail500"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn a_failing_or_absent_waf_with_on_error_closed_refuses() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let waf = stub(seen.clone()).await;
    let app = Upstream::echo().await;
    let setup = Setup::new();
    let cfg = config(&setup, waf.addr, app.addr, "on_error = \"closed\"");
    let wraith = setup.start(&cfg);
    let client = http_client();
    assert_eq!(
        client
            .get(wraith.url("http", "/ok"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let r = client
        .get(wraith.url("http", "/fail500"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "appsec_unavailable");

    // A redirect is no verdict: not followed (it points at an "allow"), a failure.
    let r = client
        .get(wraith.url("http", "/redirectme"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);

    // Wrong key: 401 from the WAF is a failure too.
    wraith.write_config(&cfg.replace(&format!("api_key = \"{KEY}\""), "api_key = \"wrong\""));
    wraith.reload().unwrap();
    assert_eq!(
        client
            .get(wraith.url("http", "/ok"))
            .send()
            .await
            .unwrap()
            .status(),
        503
    );

    // The WAF gone entirely.
    let dead = unused_port();
    wraith.write_config(&cfg.replace(
        &format!("url = \"http://{}/\"", waf.addr),
        &format!("url = \"http://127.0.0.1:{dead}/\""),
    ));
    wraith.reload().unwrap();
    assert_eq!(
        client
            .get(wraith.url("http", "/ok"))
            .send()
            .await
            .unwrap()
            .status(),
        503
    );
}

#[tokio::test]
async fn a_client_cannot_speak_for_wraith_to_the_waf() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let waf = stub(seen.clone()).await;
    let app = Upstream::echo().await;
    let setup = Setup::new();
    let cfg = config(&setup, waf.addr, app.addr, "");
    let wraith = setup.start(&cfg);
    // No User-Agent of its own, so Wraith sets no X-Crowdsec-Appsec-User-Agent: the client
    // tries to fill that in, and the other names of the namespace, in any case.
    let r = http_client()
        .get(wraith.url("http", "/x"))
        .header("X-Crowdsec-Appsec-User-Agent", "spoofed-agent")
        .header("x-crowdsec-appsec-transaction-id", "spoofed-tx")
        .header("X-CROWDSEC-APPSEC-IP", "198.51.100.66")
        .header("x-crowdsec-appsec-uri", "/innocent")
        .header("x-other", "kept")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let s = seen.lock().unwrap().last().cloned().unwrap();
    let all = |n: &str| -> Vec<&str> {
        s.headers
            .get_all(n)
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect()
    };
    assert_eq!(all("x-crowdsec-appsec-user-agent"), Vec::<&str>::new());
    assert_eq!(all("x-crowdsec-appsec-transaction-id"), Vec::<&str>::new());
    assert_eq!(all("x-crowdsec-appsec-ip"), ["127.0.0.1"]);
    assert_eq!(all("x-crowdsec-appsec-uri"), ["/x"]);
    assert_eq!(all("x-other"), ["kept"], "other headers are still copied");
    let spoofed = s
        .headers
        .values()
        .any(|v| v.as_bytes().starts_with(b"spoofed") || v == "198.51.100.66");
    assert!(!spoofed, "{:?}", s.headers);
}
