//! mTLS and policy end to end: rcgen-made CAs and client certificates, the real gateway with
//! real TLS, real upstreams, and the `wraith test` / `wraith policy` commands.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use hyper::Request;

const LOG_WAIT: Duration = Duration::from_secs(10);

/// An echo upstream that also counts the requests it received.
async fn counting_echo() -> (Upstream, Arc<AtomicUsize>) {
    let count = Arc::new(AtomicUsize::new(0));
    let c = count.clone();
    let upstream = Upstream::start(move |req: Request<hyper::body::Incoming>| {
        c.fetch_add(1, Ordering::SeqCst);
        async move { echo_response(req).await }
    })
    .await;
    (upstream, count)
}

/// One catch-all route `app` to the upstream, after `routes`.
fn config(
    setup: &Setup,
    tls_extra: &str,
    policy: &str,
    upstream: SocketAddr,
    routes: &str,
) -> String {
    format!(
        r#"{base}
[[upstream]]
name = "app"
endpoints = ["{upstream}"]

{routes}
"#,
        base = setup.listeners_with(tls_extra, policy)
    )
}

async fn json(resp: reqwest::Response) -> serde_json::Value {
    resp.json().await.unwrap()
}

/// Sends a request; returns its status and request id.
async fn send(req: reqwest::RequestBuilder) -> (u16, String) {
    let resp = req.send().await.unwrap();
    let rid = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    (resp.status().as_u16(), rid)
}

/// Waits for the server's debug line with the policy decision of the request with this id.
fn access_line(wraith: &Wraith, request_id: &str) -> serde_json::Value {
    let line = wraith.wait_log(LOG_WAIT, |v| {
        v["message"] == "policy decision" && v["request_id"] == request_id
    });
    line.unwrap_or_else(|| panic!("no access line for {request_id}:\n{}", wraith.log()))
}

// ---------------------------------------------------------------------------------------------
// Client certificates

#[tokio::test]
async fn required_mode_refuses_bad_certificates_at_the_handshake() {
    let (upstream, hits) = counting_echo().await;
    let setup = Setup::new();
    let good = setup.pki.client_with(
        "good",
        client_params("good", Some("spiffe://test.local/good")),
    );
    let revoked = setup.pki.client_with(
        "revoked",
        client_params("revoked", Some("spiffe://test.local/revoked")),
    );
    let expired = setup.pki.expired_client("expired");
    let stranger = setup.pki.untrusted_client("stranger");
    let chained = setup.pki.intermediate_client("chained");
    setup.pki.write_crl("ca.crl", &[&revoked]);
    let ca = setup.pki.ca_pem.clone();
    let cfg = config(
        &setup,
        r#"client_auth = "require", client_ca = "ca.pem", client_crl = "ca.crl", client_max_chain_depth = 1"#,
        ALLOW_ALL_POLICY,
        upstream.addr,
        r#"
# Same CA, no CRL, room for one intermediate.
[[listener]]
name = "https-deep"
address = "127.0.0.1:0"
protocol = "https"
tls = { cert = "server.pem", key = "server-key.pem", client_auth = "require", client_ca = "ca.pem", client_max_chain_depth = 2 }

[[route]]
name = "app"
upstream = "app"
"#,
    );
    let wraith = setup.start(&cfg);
    let url = wraith.url("https", "/whoami");

    // A valid certificate gets through.
    let resp = https_client(&ca, Some(good.pair()))
        .get(&url)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(hits.load(Ordering::SeqCst), 1);

    // Every bad one is refused with a TLS alert, and the log says why.
    let cases: [(&str, Option<&ClientCert>, &str); 5] = [
        ("no certificate", None, "no_client_certificate"),
        ("untrusted CA", Some(&stranger), "untrusted_issuer"),
        ("expired", Some(&expired), "certificate_expired"),
        ("revoked by the CRL", Some(&revoked), "certificate_revoked"),
        ("chain deeper than 1", Some(&chained), "chain_too_long"),
    ];
    for (what, cert, reason) in cases {
        let result = https_client(&ca, cert.map(|c| c.pair()))
            .get(&url)
            .send()
            .await;
        assert!(
            result.is_err(),
            "{what}: the request went through: {result:?}"
        );
        let line = wraith.wait_log(LOG_WAIT, |v| {
            v["message"] == "TLS handshake failed: client certificate refused"
                && v["reason"] == reason
        });
        assert!(
            line.is_some(),
            "{what}: no log line with reason {reason}:\n{}",
            wraith.log()
        );
    }
    assert_eq!(
        hits.load(Ordering::SeqCst),
        1,
        "no refused client reached the upstream"
    );

    // The same intermediate chain is fine where the depth allows it.
    let resp = https_client(&ca, Some(chained.pair()))
        .get(wraith.url("https-deep", "/whoami"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let echo = json(resp).await;
    let xfcc = echo["headers"]["x-forwarded-client-cert"][0]
        .as_str()
        .unwrap();
    assert!(xfcc.contains("URI=spiffe://test.local/chained"), "{xfcc}");

    // And they are counted.
    let (code, out, err) = wraith.cli(&["status", "--json"]);
    assert_eq!(code, 0, "{err}");
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    for (_, _, reason) in cases {
        assert!(
            status["client_cert_rejections"][reason]
                .as_u64()
                .unwrap_or(0)
                >= 1,
            "{reason} not counted: {}",
            status["client_cert_rejections"]
        );
    }
}

#[tokio::test]
async fn crl_is_read_again_on_sighup() {
    let upstream = Upstream::echo().await;
    let setup = Setup::new();
    let client = setup
        .pki
        .client_with("svc", client_params("svc", Some("spiffe://test.local/svc")));
    setup.pki.write_crl("ca.crl", &[]);
    // What the CA will publish once it revokes the certificate.
    let revoking = setup
        .pki
        .ca
        .revocation_list(&[client.serial.as_slice()], 7)
        .unwrap();
    let ca = setup.pki.ca_pem.clone();
    let cfg = config(
        &setup,
        r#"client_auth = "require", client_ca = "ca.pem", client_crl = "ca.crl""#,
        ALLOW_ALL_POLICY,
        upstream.addr,
        "[[route]]\nname = \"app\"\nupstream = \"app\"\n",
    );
    let wraith = setup.start(&cfg);
    let url = wraith.url("https", "/");
    let resp = https_client(&ca, Some(client.pair()))
        .get(&url)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    // The CA revokes the certificate; the config file itself is unchanged.
    std::fs::write(wraith.dir.path().join("ca.crl"), revoking).unwrap();
    wraith.reload().unwrap();

    // A fresh client (new handshake) is refused.
    let result = https_client(&ca, Some(client.pair()))
        .get(&url)
        .send()
        .await;
    assert!(
        result.is_err(),
        "revoked certificate still accepted: {result:?}"
    );
    assert!(wraith
        .wait_log(LOG_WAIT, |v| v["reason"] == "certificate_revoked")
        .is_some());
}

#[tokio::test]
async fn optional_mode_lets_anonymous_clients_reach_the_policies() {
    let upstream = Upstream::echo().await;
    let setup = Setup::new();
    setup.write_policies(
        "pol",
        &[(
            "p.cedar",
            r#"
@id("anyone-reads-public")
permit (principal, action in Wraith::Action::"read", resource == Wraith::Route::"public");

@id("clients-read-private")
permit (principal is Wraith::Client, action in Wraith::Action::"read", resource == Wraith::Route::"private");
"#,
        )],
    );
    let client = setup.pki.client_with(
        "reader",
        client_params("reader", Some("spiffe://test.local/reader")),
    );
    let ca = setup.pki.ca_pem.clone();
    let cfg = config(
        &setup,
        r#"client_auth = "optional", client_ca = "ca.pem""#,
        "[policy]\ndir = \"pol\"\n",
        upstream.addr,
        r#"
[[route]]
name = "public"
path = { prefix = "/public/" }
upstream = "app"

[[route]]
name = "private"
path = { prefix = "/private/" }
upstream = "app"
"#,
    );
    let wraith = setup.start(&cfg);

    let anon = https_client(&ca, None);
    let resp = anon
        .get(wraith.url("https", "/public/a"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        200,
        "anonymous handshake accepted, policy permits"
    );

    let resp = anon
        .get(wraith.url("https", "/private/a"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    let rid = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(resp.headers()["content-type"], "application/json");
    let body = json(resp).await;
    assert_eq!(body["error"], "forbidden");
    assert_eq!(body["request_id"], rid.as_str());
    let message = body["message"].as_str().unwrap();
    assert!(message.contains("no policy permits"), "{message}");
    assert!(
        !message.contains("clients-read-private"),
        "no policy detail leaked: {message}"
    );

    // The decision record: default deny names no policy.
    let line = access_line(&wraith, &rid);
    assert_eq!(line["principal"], "-");
    assert_eq!(line["policy"], "deny (no policy permits; set default)");

    let (status, rid) =
        send(https_client(&ca, Some(client.pair())).get(wraith.url("https", "/private/a"))).await;
    assert_eq!(status, 200);
    let line = access_line(&wraith, &rid);
    assert_eq!(line["principal"], "spiffe://test.local/reader");
    assert_eq!(
        line["policy"],
        "allow (permitted: clients-read-private; set default)"
    );
}

#[tokio::test]
async fn the_same_certificate_is_the_same_identity_over_h1_and_h2() {
    let upstream = Upstream::echo().await;
    let setup = Setup::new();
    setup.write_policies(
        "pol",
        &[(
            "p.cedar",
            r#"
@id("orders-only")
permit (principal == Wraith::Client::"spiffe://test.local/svc/orders", action, resource);
"#,
        )],
    );
    let mut params = client_params("orders", Some("spiffe://test.local/svc/orders"));
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationalUnitName, "payments");
    params.subject_alt_names.push(rcgen::SanType::DnsName(
        "orders.internal".try_into().unwrap(),
    ));
    let client = setup.pki.client_with("orders", params);
    let ca = setup.pki.ca_pem.clone();
    let cfg = config(
        &setup,
        r#"client_auth = "require", client_ca = "ca.pem""#,
        "[policy]\ndir = \"pol\"\n",
        upstream.addr,
        "[[route]]\nname = \"app\"\nupstream = \"app\"\n",
    );
    let wraith = setup.start(&cfg);

    let h1 = https_client_h1(&ca, Some(client.pair()))
        .get(wraith.url("https", "/h1"))
        .send()
        .await
        .unwrap();
    assert_eq!(h1.version(), reqwest::Version::HTTP_11);
    assert_eq!(h1.status(), 200);
    let rid1 = h1.headers()["x-request-id"].to_str().unwrap().to_string();
    let h2 = https_client_h2(&ca, Some(client.pair()))
        .get(wraith.url("https", "/h2"))
        .send()
        .await
        .unwrap();
    assert_eq!(h2.version(), reqwest::Version::HTTP_2);
    assert_eq!(h2.status(), 200);
    let rid2 = h2.headers()["x-request-id"].to_str().unwrap().to_string();

    let x1 = json(h1).await["headers"]["x-forwarded-client-cert"].clone();
    let x2 = json(h2).await["headers"]["x-forwarded-client-cert"].clone();
    assert_eq!(x1, x2, "same identity header over both protocols");
    let expected = format!(
        "Hash={};Subject=\"OU=payments,O=Wraith test,CN=orders\";URI=spiffe://test.local/svc/orders;DNS=orders.internal",
        client.fingerprint()
    );
    assert_eq!(x1[0], expected.as_str());

    let l1 = access_line(&wraith, &rid1);
    let l2 = access_line(&wraith, &rid2);
    assert_eq!(l1["protocol"], "h1");
    assert_eq!(l2["protocol"], "h2");
    for l in [&l1, &l2] {
        assert_eq!(l["principal"], "spiffe://test.local/svc/orders");
        assert_eq!(l["policy"], "allow (permitted: orders-only; set default)");
    }
}

#[tokio::test]
async fn spoofed_identity_headers_never_reach_the_upstream() {
    let upstream = Upstream::echo().await;
    let setup = Setup::new();
    let client = setup.pki.client_with(
        "real",
        client_params("real", Some("spiffe://test.local/real")),
    );
    let ca = setup.pki.ca_pem.clone();
    let cfg = config(
        &setup,
        r#"client_auth = "optional", client_ca = "ca.pem""#,
        ALLOW_ALL_POLICY,
        upstream.addr,
        "[[route]]\nname = \"app\"\nupstream = \"app\"\n",
    );
    let wraith = setup.start(&cfg);
    let spoof = |req: reqwest::RequestBuilder| {
        req.header(
            "x-forwarded-client-cert",
            "Hash=00;URI=spiffe://test.local/admin",
        )
        .header("X-Wraith-Identity", "admin")
        .header("x-wraith-policy", "allow")
    };

    // Anonymous, over plain HTTP and over HTTPS: nothing of it arrives.
    for (client, url) in [
        (http_client(), wraith.url("http", "/a")),
        (https_client(&ca, None), wraith.url("https", "/a")),
    ] {
        let echo = json(spoof(client.get(&url)).send().await.unwrap()).await;
        let h = &echo["headers"];
        assert!(h.get("x-forwarded-client-cert").is_none(), "{url}: {h}");
        assert!(h.get("x-wraith-identity").is_none(), "{url}: {h}");
        assert!(h.get("x-wraith-policy").is_none(), "{url}: {h}");
    }

    // With a certificate, the real identity replaces the spoofed one.
    let echo = json(
        spoof(https_client(&ca, Some(client.pair())).get(wraith.url("https", "/a")))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let xfcc = echo["headers"]["x-forwarded-client-cert"]
        .as_array()
        .unwrap();
    assert_eq!(xfcc.len(), 1, "exactly one XFCC value: {xfcc:?}");
    let v = xfcc[0].as_str().unwrap();
    assert!(
        v.starts_with(&format!("Hash={};", client.fingerprint())),
        "{v}"
    );
    assert!(v.contains(";URI=spiffe://test.local/real"), "{v}");
    assert!(echo["headers"].get("x-wraith-identity").is_none());
}

// ---------------------------------------------------------------------------------------------
// Policies through the gateway

fn policy_routes() -> &'static str {
    r#"
[[route]]
name = "orders"
path = { prefix = "/orders/" }
upstream = "app"

[[route]]
name = "admin"
path = { prefix = "/admin/" }
upstream = "app"

[[route]]
name = "open"
path = { prefix = "/open/" }
upstream = "app"

[[route]]
name = "closed"
path = { prefix = "/closed/" }
upstream = "app"
"#
}

#[tokio::test]
async fn policies_decide_by_spiffe_id_default_deny_forbid_ip_range_time_and_method_group() {
    let upstream = Upstream::echo().await;
    let setup = Setup::new();
    let dt = |offset_secs: i64| {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        wraith::policy::entities::datetime((now + offset_secs) * 1000)
    };
    let policies = format!(
        r#"
@id("orders-by-spiffe-id")
permit (principal == Wraith::Client::"spiffe://test.local/svc/orders", action, resource == Wraith::Route::"orders");

@id("readers-read-orders")
permit (principal is Wraith::Client, action in Wraith::Action::"read", resource == Wraith::Route::"orders")
when {{ principal.ou.contains("readers") }};

@id("no-deletes-from-outside")
forbid (principal, action == Wraith::Action::"DELETE", resource)
unless {{ context.source_ip.isInRange(ip("10.20.0.0/16")) }};

@id("admin-from-office-network")
permit (principal, action, resource == Wraith::Route::"admin")
when {{ context.source_ip.isInRange(ip("10.20.0.0/16")) }};

@id("open-window")
permit (principal, action, resource == Wraith::Route::"open")
when {{ context.time >= datetime("{start}") && context.time < datetime("{end}") }};

@id("closed-window")
permit (principal, action, resource == Wraith::Route::"closed")
when {{ context.time >= datetime("2001-01-01T00:00:00Z") && context.time < datetime("2001-01-02T00:00:00Z") }};
"#,
        start = dt(-3600),
        end = dt(3600)
    );
    setup.write_policies("pol", &[("p.cedar", &policies)]);
    let orders = setup.pki.client_with(
        "orders",
        client_params("orders", Some("spiffe://test.local/svc/orders")),
    );
    let stranger = setup.pki.client_with(
        "stranger",
        client_params("stranger", Some("spiffe://test.local/svc/other")),
    );
    let mut reader_params = client_params("reader", None);
    reader_params
        .distinguished_name
        .push(rcgen::DnType::OrganizationalUnitName, "readers");
    let reader = setup.pki.client_with("reader", reader_params);
    let ca = setup.pki.ca_pem.clone();
    // The test client is a trusted proxy: X-Forwarded-For sets the client address.
    let cfg = config(
        &setup,
        r#"client_auth = "optional", client_ca = "ca.pem""#,
        "[policy]\ndir = \"pol\"\n",
        upstream.addr,
        policy_routes(),
    )
    .replace(
        "[server]\n",
        "[server]\ntrusted_proxies = [\"127.0.0.1/32\"]\n",
    );
    let wraith = setup.start(&cfg);
    let url = |p: &str| wraith.url("https", p);

    let orders_c = https_client(&ca, Some(orders.pair()));
    let stranger_c = https_client(&ca, Some(stranger.pair()));
    let reader_c = https_client(&ca, Some(reader.pair()));
    let anon = https_client(&ca, None);
    let policy_of = |rid: &str| access_line(&wraith, rid)["policy"].clone();

    // Allow by SPIFFE ID; deny by default for another ID.
    let (st, rid) = send(orders_c.get(url("/orders/1"))).await;
    assert_eq!(st, 200);
    assert_eq!(
        policy_of(&rid),
        "allow (permitted: orders-by-spiffe-id; set default)"
    );
    let (st, rid) = send(stranger_c.get(url("/orders/2"))).await;
    assert_eq!(st, 403);
    assert_eq!(policy_of(&rid), "deny (no policy permits; set default)");

    // Forbid overrides permit: orders may do anything, but DELETE only from the office range.
    let (st, rid) = send(orders_c.delete(url("/orders/3"))).await;
    assert_eq!(st, 403);
    assert_eq!(
        policy_of(&rid),
        "deny (forbidden by policy: no-deletes-from-outside; set default)"
    );
    let (st, _) = send(
        orders_c
            .delete(url("/orders/4"))
            .header("x-forwarded-for", "10.20.1.1"),
    )
    .await;
    assert_eq!(st, 200);

    // Method groups: readers may GET and HEAD (read), not POST (write).
    assert_eq!(send(reader_c.get(url("/orders/5"))).await.0, 200);
    assert_eq!(send(reader_c.head(url("/orders/6"))).await.0, 200);
    let (st, rid) = send(reader_c.post(url("/orders/7"))).await;
    assert_eq!(st, 403);
    assert_eq!(policy_of(&rid), "deny (no policy permits; set default)");

    // IP range, for anonymous clients too.
    let (st, rid) = send(
        anon.get(url("/admin/x"))
            .header("x-forwarded-for", "10.20.3.3"),
    )
    .await;
    assert_eq!(st, 200);
    assert_eq!(
        policy_of(&rid),
        "allow (permitted: admin-from-office-network; set default)"
    );
    let (st, _) = send(
        anon.get(url("/admin/y"))
            .header("x-forwarded-for", "192.0.2.1"),
    )
    .await;
    assert_eq!(st, 403);

    // Time windows.
    let (st, rid) = send(anon.get(url("/open/now"))).await;
    assert_eq!(st, 200);
    assert_eq!(
        policy_of(&rid),
        "allow (permitted: open-window; set default)"
    );
    assert_eq!(send(anon.get(url("/closed/now"))).await.0, 403);
}

#[tokio::test]
async fn shadow_mode_logs_would_deny_and_lets_the_request_through() {
    let (upstream, hits) = counting_echo().await;
    let setup = Setup::new();
    setup.write_policies(
        "pol",
        &[(
            "clients.cedar",
            "@id(\"clients-only\")\npermit (principal is Wraith::Client, action, resource);\n",
        )],
    );
    let policy = r#"
[policy]
dir = "pol"
default_set = "strict"

[[policy.set]]
name = "strict"
files = ["clients.cedar"]

[[policy.set]]
name = "trial"
files = ["clients.cedar"]
mode = "shadow"
"#;
    let routes = r#"
[[route]]
name = "enforced"
path = { prefix = "/enforced/" }
upstream = "app"

[[route]]
name = "trial"
path = { prefix = "/trial/" }
upstream = "app"
policy = "trial"

[[route]]
name = "route-shadow"
path = { prefix = "/route-shadow/" }
upstream = "app"
policy_mode = "shadow"
"#;
    let cfg = config(&setup, "", policy, upstream.addr, routes);
    let wraith = setup.start(&cfg);
    let c = http_client();

    let r = c
        .get(wraith.url("http", "/enforced/a"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(hits.load(Ordering::SeqCst), 0);

    for (path, route, set) in [
        ("/trial/a", "trial", "trial"),
        ("/route-shadow/a", "route-shadow", "strict"),
    ] {
        let (st, rid) = send(c.get(wraith.url("http", path))).await;
        assert_eq!(st, 200, "{path}: shadow mode does not enforce");
        let line = wraith
            .wait_log(LOG_WAIT, |v| {
                v["message"] == "policy would deny (shadow mode): request allowed"
                    && v["route"] == route
            })
            .unwrap_or_else(|| panic!("no would-deny line for {route}:\n{}", wraith.log()));
        assert_eq!(line["reason"], "no policy permits");
        assert_eq!(line["set"], set);
        let access = access_line(&wraith, &rid);
        assert_eq!(
            access["policy"],
            format!("would deny (no policy permits; set {set})")
        );
    }
    assert_eq!(hits.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_reload_with_a_broken_policy_keeps_the_old_policies() {
    let upstream = Upstream::echo().await;
    let setup = Setup::new();
    let dir = setup.write_policies(
        "pol",
        &[(
            "p.cedar",
            "@id(\"open\")\npermit (principal, action, resource);\n",
        )],
    );
    let cfg = config(
        &setup,
        "",
        "[policy]\ndir = \"pol\"\n",
        upstream.addr,
        "[[route]]\nname = \"app\"\nupstream = \"app\"\n",
    );
    let wraith = setup.start(&cfg);
    let c = http_client();
    let url = wraith.url("http", "/x");
    assert_eq!(c.get(&url).send().await.unwrap().status(), 200);

    // A schema error on line 3: the reload is refused, naming file and line.
    std::fs::write(
        dir.join("p.cedar"),
        "@id(\"open\")\npermit (principal, action, resource)\nwhen { context.no_such_field == 1 };\n",
    )
    .unwrap();
    let err = wraith.reload().unwrap_err();
    assert!(err.contains("p.cedar:3:"), "{err}");
    assert_eq!(
        c.get(&url).send().await.unwrap().status(),
        200,
        "old policies still serve"
    );

    // A valid change is taken.
    std::fs::write(
        dir.join("p.cedar"),
        "@id(\"closed\")\nforbid (principal, action, resource);\n",
    )
    .unwrap();
    wraith.reload().unwrap();
    assert_eq!(c.get(&url).send().await.unwrap().status(), 403);
}

/// A `*.cedar` entry that is not a readable regular file is an error, never skipped: a
/// symlinked `forbid` whose target moved away must not turn into "allow" (`wraith test` says
/// so, a reload is refused and the old policies keep serving). A symlink to a file is fine.
#[tokio::test]
async fn a_policy_entry_that_is_not_a_readable_file_is_an_error() {
    let upstream = Upstream::echo().await;
    let setup = Setup::new();
    let dir = setup.write_policies(
        "pol",
        &[(
            "open.cedar",
            "@id(\"open\")\npermit (principal, action, resource);\n",
        )],
    );
    let avail = setup.write_policies(
        "avail",
        &[(
            "block.cedar",
            "@id(\"block\")\nforbid (principal, action, resource);\n",
        )],
    );
    std::os::unix::fs::symlink("../avail/block.cedar", dir.join("block.cedar")).unwrap();
    let cfg = config(
        &setup,
        "",
        "[policy]\ndir = \"pol\"\n",
        upstream.addr,
        "[[route]]\nname = \"app\"\nupstream = \"app\"\n",
    );
    let wraith = setup.start(&cfg);
    let c = http_client();
    let url = wraith.url("http", "/x");
    assert_eq!(c.get(&url).send().await.unwrap().status(), 403);
    let (code, out, err) = wraith.cli(&["test"]);
    assert_eq!(code, 0, "{out}{err}");

    // The symlink's target moves away: the entry is an error naming it.
    std::fs::rename(avail.join("block.cedar"), avail.join("moved.cedar")).unwrap();
    let link = dir.join("block.cedar").display().to_string();
    let (code, out, err) = wraith.cli(&["test"]);
    assert_eq!(code, 1, "{out}{err}");
    let said = format!("{out}{err}");
    assert!(
        said.contains(&link) && said.contains("cannot read policy file"),
        "{said}"
    );
    let err = wraith.reload().unwrap_err();
    assert!(err.contains(&link), "{err}");
    assert_eq!(
        c.get(&url).send().await.unwrap().status(),
        403,
        "the old policies (with the forbid) still serve"
    );

    // Nor is a directory (or anything else not a file) with the extension skipped.
    std::fs::remove_file(dir.join("block.cedar")).unwrap();
    std::fs::create_dir(dir.join("old.cedar")).unwrap();
    let (code, out, err) = wraith.cli(&["test"]);
    assert_eq!(code, 1, "{out}{err}");
    let said = format!("{out}{err}");
    assert!(
        said.contains("old.cedar") && said.contains("not a regular file (a directory)"),
        "{said}"
    );
    assert!(wraith.reload().is_err());
    assert_eq!(c.get(&url).send().await.unwrap().status(), 403);

    // Once that is cleaned up, the reload goes through.
    std::fs::remove_dir(dir.join("old.cedar")).unwrap();
    wraith.reload().unwrap();
    assert_eq!(c.get(&url).send().await.unwrap().status(), 200);
}

// ---------------------------------------------------------------------------------------------
// `wraith test` and `wraith policy`

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn wraith_test_passes_on_the_shipped_config() {
    let shipped = repo().join("wraith.toml");
    let (code, out, err) = wraith_cmd(&["test", "-c", shipped.to_str().unwrap()], &repo());
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    let last = out.lines().last().unwrap_or_default();
    assert!(last.ends_with(" passed, 0 failed"), "{out}");
    assert!(out.contains("coverage: 10 of 10 policies"), "{out}");
}

#[test]
fn the_printed_schema_is_the_shipped_schema() {
    let (code, out, _) = wraith_cmd(&["policy", "schema"], &repo());
    assert_eq!(code, 0);
    let shipped = std::fs::read_to_string(repo().join("policies/wraith.cedarschema")).unwrap();
    assert_eq!(
        out, shipped,
        "regenerate with `wraith policy schema > policies/wraith.cedarschema`"
    );
}

/// A config directory for the CLI tests: one route, policies and cases as given.
fn cli_setup(policies: &[(&str, &str)], cases: Option<&str>) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let pol = dir.path().join("policies");
    std::fs::create_dir_all(pol.join("tests")).unwrap();
    for (f, t) in policies {
        std::fs::write(pol.join(f), t).unwrap();
    }
    if let Some(c) = cases {
        std::fs::write(pol.join("tests/cases.toml"), c).unwrap();
    }
    let cfg = dir.path().join("wraith.toml");
    std::fs::write(
        &cfg,
        r#"
[[listener]]
name = "http"
address = "127.0.0.1:0"
protocol = "http"

[policy]
dir = "policies"

[[route]]
name = "api"
path = { prefix = "/api/" }
respond = { status = 200 }
"#,
    )
    .unwrap();
    (dir, cfg)
}

#[test]
fn wraith_test_names_file_and_line_of_a_schema_error() {
    let (dir, cfg) = cli_setup(
        &[(
            "bad.cedar",
            "// a comment\n@id(\"typo\")\npermit (principal, action, resource)\nwhen { principal.ou.contains(1) };\n",
        )],
        None,
    );
    let (code, out, _) = wraith_cmd(&["test", "-c", cfg.to_str().unwrap()], dir.path());
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("bad.cedar:4:"), "{out}");
    assert!(out.contains("\"typo\" does not match the schema"), "{out}");
}

#[test]
fn wraith_test_reports_a_failing_case_and_uncovered_policies() {
    let (dir, cfg) = cli_setup(
        &[(
            "p.cedar",
            r#"@id("clients-read")
permit (principal is Wraith::Client, action in Wraith::Action::"read", resource);

@id("never-used")
forbid (principal, action, resource) when { context.path == "/nowhere" };
"#,
        )],
        Some(
            r#"
[[case]]
name = "a client reads"
url = "http://gw/api/x"
identity = { cn = "svc" }
expect = "allow"
policies = ["clients-read"]

[[case]]
name = "anonymous reads too (wrong on purpose)"
url = "http://gw/api/x"
expect = "allow"
"#,
        ),
    );
    let (code, out, _) = wraith_cmd(&["test", "-c", cfg.to_str().unwrap()], dir.path());
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("ok    a client reads"), "{out}");
    assert!(
        out.contains("FAIL  anonymous reads too (wrong on purpose)"),
        "{out}"
    );
    assert!(
        out.contains("cases.toml:9)"),
        "the failing case's line: {out}"
    );
    assert!(out.contains("expected: allow"), "{out}");
    assert!(out.contains("actual:   deny (no policy permits"), "{out}");
    assert!(out.contains("not exercised: never-used"), "{out}");
    assert!(out.trim_end().ends_with("1 passed, 1 failed"), "{out}");
}

#[test]
fn wraith_test_says_why_a_case_file_cannot_be_read() {
    let (dir, cfg) = cli_setup(
        &[(
            "p.cedar",
            "@id(\"all\")\npermit (principal, action, resource);\n",
        )],
        None,
    );
    std::fs::write(dir.path().join("policies/tests/bad.toml"), [0xff, 0xfe]).unwrap();
    let (code, out, _) = wraith_cmd(&["test", "-c", cfg.to_str().unwrap()], dir.path());
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("bad.toml: cannot read: not UTF-8 text"),
        "the file and the reason: {out}"
    );
}

#[test]
fn policy_explain_shows_the_decision_policies_and_entities() {
    let dir = tempfile::tempdir().unwrap();
    let ca = wraith::certs::Ca::new("explain CA").unwrap();
    let issued = ca
        .issue_client("dev", Some("spiffe://wraith.dev/client/dev"))
        .unwrap();
    let pem = dir.path().join("client.pem");
    std::fs::write(&pem, issued.cert_pem).unwrap();
    let shipped = repo().join("wraith.toml");
    let (code, out, err) = wraith_cmd(
        &[
            "policy",
            "explain",
            "-c",
            shipped.to_str().unwrap(),
            "--cert",
            pem.to_str().unwrap(),
            "--url",
            "https://localhost/api/orders?limit=5",
            "--ip",
            "10.1.2.3",
        ],
        &repo(),
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("decision:  ALLOW (permitted)"), "{out}");
    // Only the policies that can apply to GET on the api route are evaluated.
    assert!(
        out.contains("evaluated: 3 of the set's 10 policies"),
        "{out}"
    );
    assert!(
        out.contains("workloads-read-api (") && out.contains("services.cedar:"),
        "{out}"
    );
    assert!(
        out.contains("principal: Wraith::Client::\"spiffe://wraith.dev/client/dev\""),
        "{out}"
    );
    assert!(out.contains("resource:  Wraith::Route::\"api\""), "{out}");
    assert!(out.contains("\"trust_domain\": \"wraith.dev\""), "{out}");
    assert!(out.contains("\"query\": \"limit=5\""), "{out}");

    let (code, out, _) = wraith_cmd(
        &[
            "policy",
            "explain",
            "-c",
            shipped.to_str().unwrap(),
            "--method",
            "DELETE",
            "--url",
            "http://localhost/api/orders/1",
        ],
        &repo(),
    );
    assert_eq!(code, 0);
    assert!(out.contains("decision:  DENY (no policy permits)"), "{out}");
    assert!(
        out.contains("principal: Wraith::Anonymous::\"127.0.0.1\""),
        "{out}"
    );
}

// ---------------------------------------------------------------------------------------------
// Robustness

/// Thousands of random and mutated DER certificates through identity extraction: it may say
/// "not a certificate", it must never panic.
#[test]
fn identity_extraction_survives_random_and_mutated_der() {
    let seed = std::env::var("WRAITH_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_cafe_u64);
    let mut rng = fastrand::Rng::with_seed(seed);
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());

    // Seeds with every field the extractor reads.
    let mut seeds: Vec<Vec<u8>> = Vec::new();
    for i in 0..4 {
        let mut p = client_params(
            &format!("seed-{i}"),
            Some(&format!("spiffe://fuzz.test/ns/{i}")),
        );
        p.distinguished_name
            .push(rcgen::DnType::OrganizationalUnitName, "fuzzers");
        p.subject_alt_names
            .push(rcgen::SanType::DnsName("a.fuzz.test".try_into().unwrap()));
        p.subject_alt_names.push(rcgen::SanType::Rfc822Name(
            "f@fuzz.test".try_into().unwrap(),
        ));
        p.subject_alt_names
            .push(rcgen::SanType::IpAddress("10.0.0.1".parse().unwrap()));
        seeds.push(pki.client_with(&format!("seed{i}"), p).der);
    }
    let (mut parsed, mut refused) = (0, 0);
    for round in 0..6000 {
        let input: Vec<u8> = if round % 10 == 0 {
            // Pure noise, sometimes with a plausible SEQUENCE header.
            let mut v: Vec<u8> = (0..rng.usize(0..600)).map(|_| rng.u8(..)).collect();
            if rng.bool() && v.len() > 4 {
                v[0] = 0x30;
                v[1] = 0x82;
            }
            v
        } else {
            let mut v = seeds[rng.usize(..seeds.len())].clone();
            for _ in 0..rng.usize(1..8) {
                let len = v.len();
                if len == 0 {
                    break;
                }
                match rng.u8(0..6) {
                    0 => v[rng.usize(..len)] ^= 1 << rng.u8(0..8),
                    1 => v[rng.usize(..len)] = rng.u8(..),
                    2 => v.truncate(rng.usize(..len)),
                    3 => {
                        let at = rng.usize(..len);
                        v.insert(at, rng.u8(..));
                    }
                    // Length bytes are where parsers get hurt: push them to extremes.
                    4 => {
                        v[rng.usize(..len)] = *[0x00, 0x7f, 0x80, 0x81, 0x82, 0xff]
                            .get(rng.usize(..6))
                            .unwrap_or(&0)
                    }
                    _ => {
                        let a = rng.usize(..len);
                        let b = rng.usize(a..len);
                        let chunk: Vec<u8> = v[a..b].to_vec();
                        let at = rng.usize(..v.len());
                        v.splice(at..at, chunk);
                    }
                }
            }
            v
        };
        match wraith::identity::Identity::from_der(&input) {
            Ok((id, _warnings)) => {
                parsed += 1;
                // Whatever was read must still be usable downstream.
                assert_eq!(id.fingerprint.len(), 64);
                let _ = id.name();
            }
            Err(e) => {
                refused += 1;
                assert!(e.contains("not parseable"), "{e}");
            }
        }
        let _ = wraith::identity::Identity::unparsed(&input);
    }
    assert!(parsed > 0, "some mutations must still parse (seed {seed})");
    assert!(refused > 0, "some inputs must be refused (seed {seed})");
}

#[tokio::test]
async fn a_trust_domain_bound_to_its_bundle_refuses_ids_another_ca_issued() {
    let (upstream, hits) = counting_echo().await;
    let setup = Setup::new();
    // A partner CA, trusted for its own trust domain only.
    let partner = wraith::certs::Ca::new("Partner CA").unwrap();
    std::fs::write(setup.dir.path().join("partner.pem"), &partner.cert_pem).unwrap();
    let ours = setup.pki.client_with(
        "ours",
        client_params("ours", Some("spiffe://test.local/svc")),
    );
    let theirs = setup.pki.client_from(
        &partner,
        "theirs",
        client_params("theirs", Some("spiffe://partner.example/app")),
    );
    let forged = setup.pki.client_from(
        &partner,
        "forged",
        client_params("forged", Some("spiffe://test.local/svc")),
    );
    let plain = setup
        .pki
        .client_from(&partner, "plain", client_params("plain", None));
    let unbound = setup.pki.client_with(
        "unbound",
        client_params("unbound", Some("spiffe://elsewhere.example/x")),
    );
    let ca = setup.pki.ca_pem.clone();
    let cfg = config(
        &setup,
        r#"client_auth = "require", client_ca = ["ca.pem", "partner.pem"], client_trust_domains = { "test.local" = "ca.pem", "partner.example" = "partner.pem" }"#,
        ALLOW_ALL_POLICY,
        upstream.addr,
        "[[route]]\nname = \"app\"\nupstream = \"app\"\n",
    );
    let wraith = setup.start(&cfg);
    let url = wraith.url("https", "/whoami");
    // Each CA for its own domain, and a certificate without a SPIFFE ID, get through.
    for (what, cert) in [("ours", &ours), ("theirs", &theirs), ("plain", &plain)] {
        let resp = https_client(&ca, Some(cert.pair()))
            .get(&url)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}\n{}", wraith.log()));
        assert_eq!(resp.status(), 200, "{what}");
    }
    // The partner's CA cannot vouch for test.local, and a domain with no bundle is refused.
    for (what, cert) in [("forged", &forged), ("unbound", &unbound)] {
        let result = https_client(&ca, Some(cert.pair())).get(&url).send().await;
        assert!(result.is_err(), "{what}: the request went through");
    }
    for domain in ["test.local", "elsewhere.example"] {
        assert!(
            wraith
                .wait_log(LOG_WAIT, |v| v["reason"] == "wrong_trust_domain"
                    && v["error"].as_str().is_some_and(|e| e.contains(domain)))
                .is_some(),
            "{domain}:\n{}",
            wraith.log()
        );
    }
    assert_eq!(hits.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn a_bound_listener_refuses_spiffe_uris_that_make_no_id() {
    let (upstream, hits) = counting_echo().await;
    let setup = Setup::new();
    // All from the CA bound to test.local: the chains are fine, the SPIFFE claims are not.
    let twice = {
        let mut p = client_params("twice", Some("spiffe://test.local/a"));
        p.subject_alt_names.push(rcgen::SanType::URI(
            "spiffe://test.local/b".try_into().unwrap(),
        ));
        setup.pki.client_with("twice", p)
    };
    let bent = |name: &str, uri: &str| setup.pki.client_with(name, client_params(name, Some(uri)));
    let upper = bent("upper", "spiffe://TEST.local/svc");
    let dotted = bent("dotted", "spiffe://test.local/a/../svc");
    let scheme = bent("scheme", "SPIFFE://test.local/svc");
    // A subjectAltName Wraith's certificate reader cannot read (a URI that is not UTF-8),
    // though the chain verifies: the SPIFFE ID it may hold cannot be checked.
    let unreadable = {
        let uri = b"spiffe://test.local/a\xff";
        let mut san = vec![0x30, uri.len() as u8 + 2, 0x86, uri.len() as u8];
        san.extend_from_slice(uri);
        let mut p = client_params("unreadable", None);
        p.custom_extensions
            .push(rcgen::CustomExtension::from_oid_content(
                &[2, 5, 29, 17],
                san,
            ));
        setup.pki.client_with("unreadable", p)
    };
    // No SPIFFE claim at all: an https URI, or no URI.
    let web = bent("web", "https://test.local/svc");
    // A SPIFFE ID with another URI SAN beside it: no X.509-SVID (exactly one URI SAN).
    let two_uris = {
        let mut p = client_params("two-uris", Some("spiffe://test.local/svc"));
        p.subject_alt_names.push(rcgen::SanType::URI(
            "https://test.local/svc".try_into().unwrap(),
        ));
        setup.pki.client_with("two-uris", p)
    };
    let plain = setup.pki.client_with("plain", client_params("plain", None));
    let ca = setup.pki.ca_pem.clone();
    let cfg = config(
        &setup,
        r#"client_auth = "require", client_ca = "ca.pem", client_trust_domains = { "test.local" = "ca.pem" }"#,
        ALLOW_ALL_POLICY,
        upstream.addr,
        r#"
# The same CA without client_trust_domains.
[[listener]]
name = "https-unbound"
address = "127.0.0.1:0"
protocol = "https"
tls = { cert = "server.pem", key = "server-key.pem", client_auth = "require", client_ca = "ca.pem" }

[[route]]
name = "app"
upstream = "app"
"#,
    );
    let wraith = setup.start(&cfg);
    let (bound, unbound) = (
        wraith.url("https", "/whoami"),
        wraith.url("https-unbound", "/whoami"),
    );
    let get = |cert: &ClientCert, url: &str| https_client(&ca, Some(cert.pair())).get(url).send();
    // Certificates that claim no SPIFFE ID pass on client_ca, as before.
    for (what, cert) in [("web", &web), ("plain", &plain)] {
        let resp = get(cert, &bound)
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}\n{}", wraith.log()));
        assert_eq!(resp.status(), 200, "{what}");
    }
    let bad = [
        ("two SPIFFE IDs", &twice, "2 SPIFFE IDs"),
        (
            "an uppercase trust domain",
            &upper,
            "spiffe://TEST.local/svc",
        ),
        ("a '..' segment", &dotted, "spiffe://test.local/a/../svc"),
        ("an uppercase scheme", &scheme, "SPIFFE://test.local/svc"),
        (
            "an unreadable subjectAltName",
            &unreadable,
            "cannot be read",
        ),
    ];
    for (what, cert, why) in bad {
        let result = get(cert, &bound).await;
        assert!(result.is_err(), "{what}: the request went through");
        assert!(
            wraith
                .wait_log(LOG_WAIT, |v| v["reason"] == "invalid_spiffe_id"
                    && v["error"].as_str().is_some_and(|e| e.contains(why)))
                .is_some(),
            "{what}:\n{}",
            wraith.log()
        );
        // Without client_trust_domains they still pass, carrying no SPIFFE identity.
        let resp = get(cert, &unbound).await.unwrap();
        assert_eq!(resp.status(), 200, "{what}, unbound");
        let xfcc = json(resp).await["headers"]["x-forwarded-client-cert"][0]
            .as_str()
            .unwrap()
            .to_string();
        assert!(!xfcc.contains("URI="), "{what}: {xfcc}");
    }
    // A SPIFFE ID beside another URI SAN: refused where trust domains are bound; elsewhere
    // the ID is used.
    assert!(
        get(&two_uris, &bound).await.is_err(),
        "two URI SANs went through"
    );
    assert!(
        wraith
            .wait_log(LOG_WAIT, |v| v["reason"] == "invalid_spiffe_id"
                && v["error"]
                    .as_str()
                    .is_some_and(|e| e.contains("besides its SPIFFE ID")))
            .is_some(),
        "{}",
        wraith.log()
    );
    let resp = get(&two_uris, &unbound).await.unwrap();
    assert_eq!(resp.status(), 200);
    let xfcc = json(resp).await["headers"]["x-forwarded-client-cert"][0]
        .as_str()
        .unwrap()
        .to_string();
    assert!(xfcc.contains("URI=spiffe://test.local/svc"), "{xfcc}");
    assert_eq!(hits.load(Ordering::SeqCst), 3 + bad.len());
    let (code, out, err) = wraith.cli(&["status", "--json"]);
    assert_eq!(code, 0, "{err}");
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(
        status["client_cert_rejections"]["invalid_spiffe_id"]
            .as_u64()
            .unwrap_or(0)
            > bad.len() as u64,
        "{}",
        status["client_cert_rejections"]
    );
}
