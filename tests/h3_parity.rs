//! Parity: one identity layer and one pipeline for every protocol. The same client
//! certificate over HTTP/1.1, HTTP/2 and HTTP/3 gives the same identity, the same policy
//! decision, the same rate-limit key and the same access-log identity; a client without a
//! certificate is refused over HTTP/3 exactly as over TCP.

mod common;

use std::time::Duration;

use common::quic::{Groups, H3Client};
use common::*;

const LOG_WAIT: Duration = Duration::from_secs(10);

/// The server log's policy line of one request.
fn policy_line(wraith: &Wraith, rid: &str) -> serde_json::Value {
    wraith
        .wait_log(LOG_WAIT, |v| {
            v["message"] == "policy decision" && v["request_id"] == rid
        })
        .unwrap_or_else(|| panic!("no policy line for {rid}:\n{}", wraith.log()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_certificate_is_one_identity_decision_and_rate_limit_key_over_h1_h2_and_h3() {
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
    let orders = setup.pki.client_with("orders", params);
    let other = setup.pki.client_with(
        "billing",
        client_params("billing", Some("spiffe://test.local/svc/billing")),
    );
    let ca = setup.pki.ca_pem.clone();
    let cfg = format!(
        r#"{base}
[log.json]
path = "access.json"

[[upstream]]
name = "app"
endpoints = ["{up}"]

[[route]]
name = "app"
upstream = "app"
rate_limits = [{{ name = "per-client", key = "identity", rate = "1/h", burst = 3 }}]
"#,
        base = setup.listeners_h3(
            r#"client_auth = "optional", client_ca = "ca.pem""#,
            "",
            "[policy]\ndir = \"pol\"\n"
        ),
        up = upstream.addr,
    );
    let wraith = setup.start(&cfg);

    // One request per protocol with the same certificate.
    let h1 = https_client_h1(&ca, Some(orders.pair()))
        .get(wraith.url("https", "/p"))
        .send()
        .await
        .unwrap();
    assert_eq!(h1.version(), reqwest::Version::HTTP_11);
    let h2 = https_client_h2(&ca, Some(orders.pair()))
        .get(wraith.url("https", "/p"))
        .send()
        .await
        .unwrap();
    assert_eq!(h2.version(), reqwest::Version::HTTP_2);
    let h3_client = H3Client::new(&ca, Some(orders.pair()), Groups::Default);
    let mut h3 = h3_client.connect(wraith.addr("https")).await.unwrap();
    let r3 = h3.get("/p").await.unwrap();

    let mut seen = Vec::new();
    for (protocol, status, rid, body) in [
        (
            "h1",
            h1.status().as_u16(),
            h1.headers()["x-request-id"].to_str().unwrap().to_string(),
            h1.json::<serde_json::Value>().await.unwrap(),
        ),
        (
            "h2",
            h2.status().as_u16(),
            h2.headers()["x-request-id"].to_str().unwrap().to_string(),
            h2.json::<serde_json::Value>().await.unwrap(),
        ),
        (
            "h3",
            r3.status(),
            r3.header("x-request-id").unwrap().to_string(),
            r3.json(),
        ),
    ] {
        assert_eq!(status, 200, "{protocol}");
        // Same identity toward the upstream.
        let xfcc = body["headers"]["x-forwarded-client-cert"][0].clone();
        // Same policy decision and principal in the server log.
        let line = policy_line(&wraith, &rid);
        assert_eq!(
            line["principal"], "spiffe://test.local/svc/orders",
            "{protocol}"
        );
        assert_eq!(
            line["policy"], "allow (permitted: orders-only; set default)",
            "{protocol}"
        );
        // Same identity in the access log, under its own protocol label.
        let record = wraith.access_record("access.json", &rid);
        assert_eq!(record["protocol"], protocol);
        seen.push((
            xfcc,
            record["identity"].clone(),
            record["spiffe_id"].clone(),
            record["cn"].clone(),
            record["fingerprint"].clone(),
        ));
    }
    assert_eq!(seen[0].0, serde_json::json!(format!(
        "Hash={};Subject=\"OU=payments,O=Wraith test,CN=orders\";URI=spiffe://test.local/svc/orders",
        orders.fingerprint()
    )));
    assert_eq!(seen[0].1, "spiffe://test.local/svc/orders");
    assert_eq!(seen[0].4, orders.fingerprint().as_str());
    assert!(
        seen.iter().all(|s| *s == seen[0]),
        "identical over h1, h2 and h3: {seen:?}"
    );

    // Same rate-limit key: the three requests spent one bucket of 3.
    let resp = h3.get("/p").await.unwrap();
    assert_eq!(
        resp.status(),
        429,
        "the 4th request of this identity, whatever the protocol"
    );
    let record = wraith.access_record("access.json", resp.header("x-request-id").unwrap());
    assert_eq!(record["rate_limiter"], "per-client");
    assert_eq!(record["identity"], "spiffe://test.local/svc/orders");
    let resp = https_client_h2(&ca, Some(orders.pair()))
        .get(wraith.url("https", "/p"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 429);
    // Another certificate has its own bucket (and the policy refuses it, before any limit).
    let mut billing = H3Client::new(&ca, Some(other.pair()), Groups::Default)
        .connect(wraith.addr("https"))
        .await
        .unwrap();
    let resp = billing.get("/p").await.unwrap();
    assert_eq!(resp.status(), 403);
    let line = policy_line(&wraith, resp.header("x-request-id").unwrap());
    assert_eq!(line["principal"], "spiffe://test.local/svc/billing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_a_certificate_is_refused_over_h3_as_over_tcp() {
    let (upstream, hits) = {
        let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let h = hits.clone();
        let up = Upstream::start(move |req: hyper::Request<hyper::body::Incoming>| {
            h.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async move { echo_response(req).await }
        })
        .await;
        (up, hits)
    };
    let setup = Setup::new();
    let good = setup.pki.client_with(
        "good",
        client_params("good", Some("spiffe://test.local/good")),
    );
    let revoked = setup.pki.client_with(
        "revoked",
        client_params("revoked", Some("spiffe://test.local/revoked")),
    );
    let stranger = setup.pki.untrusted_client("stranger");
    setup.pki.write_crl("ca.crl", &[&revoked]);
    let ca = setup.pki.ca_pem.clone();
    let cfg = format!(
        "{}\n[[upstream]]\nname = \"app\"\nendpoints = [\"{}\"]\n\n[[route]]\nname = \"app\"\nupstream = \"app\"\n",
        setup.listeners_h3(
            r#"client_auth = "require", client_ca = "ca.pem", client_crl = "ca.crl""#,
            "",
            ALLOW_ALL_POLICY
        ),
        upstream.addr
    );
    let wraith = setup.start(&cfg);
    let addr = wraith.addr("https");

    // A valid certificate gets through on both.
    let mut ok = H3Client::new(&ca, Some(good.pair()), Groups::Default)
        .connect(addr)
        .await
        .unwrap();
    assert_eq!(ok.get("/a").await.unwrap().status(), 200);

    let cases: [(&str, Option<&ClientCert>, &str); 3] = [
        ("no certificate", None, "no_client_certificate"),
        ("revoked by the CRL", Some(&revoked), "certificate_revoked"),
        ("untrusted CA", Some(&stranger), "untrusted_issuer"),
    ];
    for (what, cert, reason) in cases {
        // TCP: the handshake fails.
        let tcp = https_client(&ca, cert.map(|c| c.pair()))
            .get(wraith.url("https", "/a"))
            .send()
            .await;
        assert!(tcp.is_err(), "{what} over TCP: {tcp:?}");
        // QUIC: the client thinks its side is done, but the server closes the connection
        // with the TLS alert and no request is served.
        let h3 = H3Client::new(&ca, cert.map(|c| c.pair()), Groups::Default);
        let result = match h3.connect(addr).await {
            Ok(mut conn) => conn.get("/a").await.map(|r| r.status()),
            Err(e) => Err(e),
        };
        assert!(result.is_err(), "{what} over HTTP/3: {result:?}");
        // The same log line, reason and counter for both transports.
        for transport in ["tcp", "quic"] {
            let line = wraith.wait_log(LOG_WAIT, |v| {
                v["message"] == "TLS handshake failed: client certificate refused"
                    && v["reason"] == reason
                    && v["transport"] == transport
            });
            assert!(
                line.is_some(),
                "{what}: no {transport} log line with reason {reason}:\n{}",
                wraith.log()
            );
        }
    }
    assert_eq!(
        hits.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "no refused client reached the upstream"
    );
    let status = wraith.status().await;
    for (_, _, reason) in cases {
        assert_eq!(
            status["client_cert_rejections"][reason], 2,
            "{reason}: counted once per transport: {}",
            status["client_cert_rejections"]
        );
    }
}
