//! TLS to upstreams (`https://` endpoints): certificate verification against the configured
//! CA bundle, the verified server name, mTLS to the upstream, and WebSocket tunnels over TLS.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};

fn config(endpoint: &str, tls: &str) -> String {
    format!(
        r#"{}
[[upstream]]
name = "secure"
endpoints = ["{endpoint}"]
connect_timeout = "3s"
outlier = {{ consecutive_failures = 0 }}
{tls}

[[route]]
name = "all"
upstream = "secure"
"#,
        Setup::standard_listeners()
    )
}

fn tls_table(ca: &Path, extra: &str) -> String {
    format!("[upstream.tls]\nca = \"{}\"\n{extra}", ca.display())
}

#[tokio::test]
async fn https_endpoints_are_verified_against_the_ca_bundle_and_name() {
    let setup = Setup::new();
    let server = tls_server_config(&setup.pki.server_cert, &setup.pki.server_key, None);
    let up = Upstream::start_tls(server, |req| async move { echo_response(req).await }).await;
    let ca = setup.pki.ca_pem.clone();
    let dir = setup.dir.path().to_path_buf();

    // Verified by IP address (the test certificate names 127.0.0.1).
    let wraith = setup.start(&config(
        &format!("https://{}", up.addr),
        &tls_table(&ca, ""),
    ));
    let client = http_client();
    let r = client
        .get(wraith.url("http", "/hello"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let echo: serde_json::Value = r.json().await.unwrap();
    assert_eq!(echo["uri"], "/hello");
    assert_eq!(echo["version"], "HTTP/1.1");

    // A name the certificate has (sent as SNI and verified).
    wraith.write_config(&config(
        &format!("https://{}", up.addr),
        &tls_table(&ca, "server_name = \"localhost\""),
    ));
    wraith.reload().unwrap();
    let r = client.get(wraith.url("http", "/sni")).send().await.unwrap();
    assert_eq!(r.status(), 200);

    // A name it does not have: refused, 502.
    wraith.write_config(&config(
        &format!("https://{}", up.addr),
        &tls_table(&ca, "server_name = \"not-this-one.example\""),
    ));
    wraith.reload().unwrap();
    let r = client
        .get(wraith.url("http", "/wrong-name"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    // The log line is written as the 502 goes out: wait for it rather than race the reader.
    assert!(
        wraith
            .wait_log(Duration::from_secs(5), |v| v
                .to_string()
                .contains("certificate not valid for name"))
            .is_some(),
        "{}",
        wraith.log()
    );

    // A CA that did not issue the upstream's certificate: refused, 502.
    let other = wraith::certs::Ca::new("Some other CA").unwrap();
    let other_ca = dir.join("other-ca.pem");
    std::fs::write(&other_ca, &other.cert_pem).unwrap();
    wraith.write_config(&config(
        &format!("https://{}", up.addr),
        &tls_table(&other_ca, ""),
    ));
    wraith.reload().unwrap();
    let r = client
        .get(wraith.url("http", "/wrong-ca"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"], "upstream_unreachable");
}

#[tokio::test]
async fn mtls_to_the_upstream_presents_the_client_certificate() {
    let setup = Setup::new();
    let server = tls_server_config(
        &setup.pki.server_cert,
        &setup.pki.server_key,
        Some(&setup.pki.ca_pem),
    );
    let up = Upstream::start_tls(server, |req| async move { echo_response(req).await }).await;
    let (cert, key) = setup.pki.client("wraith-to-upstream", None);
    let ca = setup.pki.ca_pem.clone();

    let wraith = setup.start(&config(
        &format!("https://{}", up.addr),
        &tls_table(&ca, ""),
    ));
    let client = http_client();
    let r = client.get(wraith.url("http", "/x")).send().await.unwrap();
    assert_eq!(
        r.status(),
        502,
        "no client certificate: the upstream refuses"
    );

    wraith.write_config(&config(
        &format!("https://{}", up.addr),
        &tls_table(
            &ca,
            &format!(
                "cert = \"{}\"\nkey = \"{}\"\n[upstream.health_check]\npath = \"/healthz\"\ninterval = \"100ms\"",
                cert.display(),
                key.display()
            ),
        ),
    ));
    wraith.reload().unwrap();
    for _ in 0..5 {
        let r = client.get(wraith.url("http", "/x")).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    // Health checks go over the same verified mTLS connection.
    let checked = Wraith::eventually(std::time::Duration::from_secs(10), || async {
        wraith.status().await["upstreams"][0]["endpoints"][0]["last_check"]["status"] == 200
    })
    .await;
    assert!(checked, "{}", wraith.status().await);
    let status = wraith.status().await;
    let ep = &status["upstreams"][0]["endpoints"][0];
    assert!(ep["address"].as_str().unwrap().starts_with("https://"));
    assert!(
        ep["idle_connections"].as_u64().unwrap() >= 1,
        "TLS connections are pooled: {ep}"
    );
}

#[tokio::test]
async fn bad_tls_settings_are_config_errors() {
    let setup = Setup::new();
    let missing = setup.dir.path().join("missing.pem");
    let cfg = config("https://127.0.0.1:9", &tls_table(&missing, ""));
    std::fs::write(setup.dir.path().join("bad.toml"), &cfg).unwrap();
    let (code, out, err) = wraith_cmd(
        &[
            "test",
            "-c",
            &setup.dir.path().join("bad.toml").display().to_string(),
        ],
        setup.dir.path(),
    );
    assert_eq!(code, 1, "{out}{err}");
    let all = format!("{out}{err}");
    assert!(
        all.contains("upstream[0].tls.ca") && all.contains("cannot read"),
        "{all}"
    );

    let cfg = config("https://127.0.0.1:9", "protocol = \"h2c\"");
    std::fs::write(setup.dir.path().join("bad2.toml"), &cfg).unwrap();
    let (code, out, err) = wraith_cmd(
        &[
            "test",
            "-c",
            &setup.dir.path().join("bad2.toml").display().to_string(),
        ],
        setup.dir.path(),
    );
    assert_eq!(code, 1);
    assert!(
        format!("{out}{err}").contains("h2c is cleartext"),
        "{out}{err}"
    );
}

#[tokio::test]
async fn websocket_tunnels_work_over_tls_upstreams() {
    let setup = Setup::new();
    let server = tls_server_config(&setup.pki.server_cert, &setup.pki.server_key, None);
    let acceptor = tokio_rustls::TlsAcceptor::from(server);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                let mut ws = tokio_tungstenite::accept_async(tls).await.unwrap();
                while let Some(Ok(msg)) = ws.next().await {
                    if msg.is_text() || msg.is_binary() {
                        ws.send(msg).await.unwrap();
                    }
                }
            });
        }
    });
    let ca = setup.pki.ca_pem.clone();
    let wraith = setup.start(&config(&format!("https://{addr}"), &tls_table(&ca, "")));
    let url = format!("ws://{}/ws", wraith.addr("http"));
    let (mut ws, resp) = tokio_tungstenite::connect_async(url).await.unwrap();
    assert_eq!(resp.status(), 101);
    for i in 0..5 {
        ws.send(tokio_tungstenite::tungstenite::Message::text(format!(
            "tls {i}"
        )))
        .await
        .unwrap();
        let echoed = ws.next().await.unwrap().unwrap();
        assert_eq!(echoed.into_text().unwrap().as_str(), format!("tls {i}"));
    }
    ws.close(None).await.unwrap();
}

#[tokio::test]
async fn a_large_upload_to_a_slow_reading_tls_upstream_arrives_whole() {
    use http_body_util::BodyExt;
    let setup = Setup::new();
    let server = tls_server_config(&setup.pki.server_cert, &setup.pki.server_key, None);
    // Reads its body slowly, so the sockets on the way are full when the upload ends (the
    // last bytes then wait in the TLS layer until they are flushed), and answers with the
    // number of bytes it got.
    let up = Upstream::start_tls(server, |req| async move {
        let mut body = req.into_body();
        let mut total = 0usize;
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else { break };
            if let Ok(data) = frame.into_data() {
                total += data.len();
                // About 8 MB/s.
                tokio::time::sleep(Duration::from_micros(data.len() as u64 / 8)).await;
            }
        }
        hyper::Response::new(full(total.to_string()))
    })
    .await;
    let ca = setup.pki.ca_pem.clone();
    let wraith = setup.start(&config(
        &format!("https://{}", up.addr),
        &tls_table(&ca, "").replace(
            "[upstream.tls]",
            "response_timeout = \"10s\"\n[upstream.tls]",
        ),
    ));
    const SIZE: usize = 16 << 20;
    let r = http_client()
        .post(wraith.url("http", "/upload"))
        .body(vec![7u8; SIZE])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", wraith.log());
    assert_eq!(r.text().await.unwrap(), SIZE.to_string());
}

/// An upstream a reload leaves as it was keeps its pooled connections (plain and TLS, whose
/// settings hold the CA file's content): the next request reuses the idle one rather than
/// connect and handshake again. One whose settings change gets new pools, as documented.
#[tokio::test]
async fn idle_upstream_connections_outlive_a_reload_that_keeps_the_upstream() {
    let setup = Setup::new();
    let server = tls_server_config(&setup.pki.server_cert, &setup.pki.server_key, None);
    let tls = Upstream::start_tls(server, |req| async move { echo_response(req).await }).await;
    let plain = Upstream::echo().await;
    let ca = setup.pki.ca_pem.clone();
    let cfg = |extra_route: &str, retries: u32| {
        format!(
            "{}\n[[upstream]]\nname = \"secure\"\nendpoints = [\"https://{}\"]\n{}\n\n\
             [[upstream]]\nname = \"plain\"\nendpoints = [\"{}\"]\nretries = {retries}\n\n\
             [[route]]\nname = \"plain\"\npath = {{ prefix = \"/plain\" }}\nupstream = \"plain\"\n\n\
             [[route]]\nname = \"tls\"\npath = {{ prefix = \"/tls\" }}\nupstream = \"secure\"\n{extra_route}",
            Setup::standard_listeners(),
            tls.addr,
            tls_table(&ca, ""),
            plain.addr
        )
    };
    let extra = "\n[[route]]\nname = \"extra\"\npath = { exact = \"/extra\" }\nrespond = { status = 204 }\n";
    let wraith = setup.start(&cfg("", 2));
    let client = http_client();
    let get = |path: &'static str| {
        let (client, url) = (client.clone(), wraith.url("http", path));
        async move { client.get(url).send().await.unwrap().status() }
    };
    assert_eq!(get("/plain/1").await, 200);
    assert_eq!(get("/tls/1").await, 200);
    assert_eq!((plain.accepted(), tls.accepted()), (1, 1));

    wraith.write_config(&cfg(extra, 2));
    wraith.reload().unwrap();
    assert_eq!(get("/plain/2").await, 200);
    assert_eq!(get("/tls/2").await, 200);
    assert_eq!(
        (plain.accepted(), tls.accepted()),
        (1, 1),
        "a reload that kept the upstreams dropped their pooled connections"
    );

    // The plain upstream's settings change: its pool is new, the TLS one's stays.
    wraith.write_config(&cfg(extra, 3));
    wraith.reload().unwrap();
    assert_eq!(get("/plain/3").await, 200);
    assert_eq!(get("/tls/3").await, 200);
    assert_eq!((plain.accepted(), tls.accepted()), (2, 1));
}
