//! Local decisions end to end: the admin API and `wraith decisions`, bans enforced per
//! request (via a trusted proxy's X-Forwarded-For) and at accept time (before TLS), the
//! fallback for non-ban types, and persistence across SIGTERM and restart.

mod common;

use std::time::Duration;

use common::*;
use http::Method;
use serde_json::json;

fn config(setup: &Setup, trusted: &str, extra: &str) -> String {
    let listeners = setup.listeners().replace(
        "[server]\n",
        &format!("[server]\ntrusted_proxies = [{trusted}]\n"),
    );
    format!(
        r#"{listeners}
{extra}

[[route]]
name = "home"
path = {{ prefix = "/" }}
respond = {{ status = 200, body = "ok\n" }}
"#
    )
}

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

#[tokio::test]
async fn admin_api_adds_lists_and_lifts_bans_with_clear_errors() {
    let setup = Setup::new();
    let cfg = config(&setup, "\"127.0.0.0/8\"", "");
    let wraith = setup.start(&cfg);
    let client = http_client();
    assert_eq!(status_for(&client, &wraith, "192.0.2.30").await, 200);

    let (st, v) = wraith
        .admin(
            Method::POST,
            "/v1/decisions",
            Some(json!({"ip": "192.0.2.30", "duration": "1h", "reason": "manual test"})),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    assert_eq!(v["decision"]["origin"], "admin");
    assert_eq!(v["decision"]["type"], "ban");
    assert_eq!(v["decision"]["scope"], "Ip");
    let resp = client
        .get(wraith.url("http", "/anything"))
        .header("x-forwarded-for", "192.0.2.30")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "banned");
    assert!(
        !body["message"].as_str().unwrap().contains("admin"),
        "no internals: {body}"
    );

    // A range, IPv6.
    let (st, _) = wraith
        .admin(
            Method::POST,
            "/v1/decisions",
            Some(json!({"cidr": "2001:db8:9::/48", "origin": "ops"})),
        )
        .await;
    assert_eq!(st, 201);
    assert_eq!(status_for(&client, &wraith, "2001:db8:9:1::1").await, 403);
    assert_eq!(status_for(&client, &wraith, "2001:db8:a::1").await, 200);

    // Listing, filtered by an address the range covers.
    let (st, v) = wraith
        .admin(Method::GET, "/v1/decisions?ip=2001:db8:9:ffff::2", None)
        .await;
    assert_eq!(st, 200);
    assert_eq!(v["count"], 1, "{v}");
    assert_eq!(v["decisions"][0]["value"], "2001:db8:9::/48");
    assert_eq!(v["decisions"][0]["origin"], "ops");

    // Bad input: 400 with a message that says what is wrong.
    for (body, needle) in [
        (json!({"ip": "192.0.2.300"}), "not an IP address"),
        (json!({"ip": "192.0.2.1", "duration": "10"}), "missing unit"),
        (json!({"ip": "192.0.2.1", "colour": "red"}), "unknown field"),
        (json!({"cidr": "192.0.2.0/40"}), "not a CIDR"),
        (json!({}), "give the address"),
    ] {
        let (st, v) = wraith
            .admin(Method::POST, "/v1/decisions", Some(body.clone()))
            .await;
        assert_eq!(st, 400, "{body} -> {v}");
        assert!(
            v["error"].as_str().unwrap().contains(needle),
            "{body} -> {v}"
        );
    }
    let (st, v) = wraith
        .admin(Method::DELETE, "/v1/decisions/not-an-address", None)
        .await;
    assert_eq!(st, 400, "{v}");
    let (st, v) = wraith
        .admin(Method::GET, "/v1/decisions?colour=red", None)
        .await;
    assert_eq!(st, 400, "{v}");

    // Lifting: only the matching origin.
    let (st, v) = wraith
        .admin(
            Method::DELETE,
            "/v1/decisions/192.0.2.30?origin=wazuh",
            None,
        )
        .await;
    assert_eq!(st, 404, "{v}");
    assert_eq!(status_for(&client, &wraith, "192.0.2.30").await, 403);
    let (st, v) = wraith
        .admin(Method::DELETE, "/v1/decisions/192.0.2.30", None)
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["deleted"], 1);
    assert_eq!(status_for(&client, &wraith, "192.0.2.30").await, 200);
    let (st, _) = wraith
        .admin(Method::DELETE, "/v1/decisions/2001:db8:9::%2F48", None)
        .await;
    assert_eq!(st, 200);
    assert_eq!(status_for(&client, &wraith, "2001:db8:9:1::1").await, 200);
}

#[tokio::test]
async fn the_cli_manages_decisions() {
    let setup = Setup::new();
    let cfg = config(&setup, "\"127.0.0.0/8\"", "");
    let wraith = setup.start(&cfg);
    let client = http_client();

    let (code, out, err) = wraith.cli(&[
        "decisions",
        "add",
        "--ip",
        "198.51.100.9",
        "--duration",
        "2h",
        "--reason",
        "cli test",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("added admin ban on 198.51.100.9/32"), "{out}");
    let (code, out, _) = wraith.cli(&["decisions", "add", "--range", "203.0.113.0/28"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(status_for(&client, &wraith, "198.51.100.9").await, 403);
    assert_eq!(status_for(&client, &wraith, "203.0.113.14").await, 403);

    let (code, out, _) = wraith.cli(&["decisions", "list"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("198.51.100.9/32") && out.contains("cli test"),
        "{out}"
    );
    assert!(out.contains("203.0.113.0/28"), "{out}");
    assert!(out.contains("2 decision(s)"), "{out}");
    let (code, out, _) = wraith.cli(&["decisions", "list", "--limit", "1"]);
    assert_eq!(code, 0);
    assert!(out.contains("1 of 2 decision(s) shown"), "{out}");
    let (code, out, _) = wraith.cli(&["decisions", "list", "--ip", "203.0.113.3", "--json"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["count"], 1);
    let (code, out, _) = wraith.cli(&["decisions", "list", "--json", "--limit", "1"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (v["count"].as_u64(), v["truncated"].as_bool()),
        (Some(2), Some(true))
    );

    let (code, out, err) = wraith.cli(&["decisions", "add", "--ip", "nonsense"]);
    assert_eq!(code, 1);
    assert!(err.contains("not an IP address"), "{out}{err}");

    let (code, out, _) = wraith.cli(&["decisions", "delete", "--ip", "198.51.100.9"]);
    assert_eq!(code, 0);
    assert!(out.contains("deleted 1"), "{out}");
    let (code, _, _) = wraith.cli(&["decisions", "delete", "--range", "203.0.113.0/28"]);
    assert_eq!(code, 0);
    assert_eq!(status_for(&client, &wraith, "198.51.100.9").await, 200);
    assert_eq!(status_for(&client, &wraith, "203.0.113.14").await, 200);
    let (code, _, err) = wraith.cli(&["decisions", "delete", "--ip", "198.51.100.9"]);
    assert_eq!(code, 1, "nothing left to delete");
    assert!(err.contains("no local"), "{err}");
}

#[tokio::test]
async fn a_banned_client_is_refused_before_the_https_redirect() {
    // Behind a trusted proxy on a listener that sends everyone to HTTPS: the ban, not a 308.
    let setup = Setup::new();
    let cfg = config(&setup, "\"127.0.0.0/8\"", "").replace(
        "protocol = \"http\"\n",
        "protocol = \"http\"\nredirect_https = { port = 8443 }\n",
    );
    let wraith = setup.start(&cfg);
    let (code, out, err) = wraith.cli(&["decisions", "add", "--ip", "198.51.100.7"]);
    assert_eq!(code, 0, "{out}{err}");
    let client = http_client();
    assert_eq!(status_for(&client, &wraith, "198.51.100.7").await, 403);
    assert_eq!(status_for(&client, &wraith, "198.51.100.8").await, 308);
}

#[tokio::test]
async fn captcha_and_other_types_follow_the_fallback() {
    let setup = Setup::new();
    let cfg = config(&setup, "\"127.0.0.0/8\"", "");
    let wraith = setup.start(&cfg);
    let client = http_client();
    let (st, _) = wraith
        .admin(
            Method::POST,
            "/v1/decisions",
            Some(json!({"ip": "192.0.2.31", "type": "captcha"})),
        )
        .await;
    assert_eq!(st, 201);
    // Default fallback: ban.
    assert_eq!(status_for(&client, &wraith, "192.0.2.31").await, 403);
    // fallback = "allow", by reload: decisions survive the reload, the meaning changes.
    wraith.write_config(&config(
        &Setup::new(),
        "\"127.0.0.0/8\"",
        "[decisions]\nfallback = \"allow\"\n",
    ));
    wraith.reload().unwrap();
    assert_eq!(status_for(&client, &wraith, "192.0.2.31").await, 200);
    let (_, v) = wraith.admin(Method::GET, "/v1/decisions", None).await;
    assert_eq!(v["count"], 1);
}

#[tokio::test]
async fn bans_survive_sigterm_and_restart() {
    let setup = Setup::new();
    let cfg = config(&setup, "\"127.0.0.0/8\"", "");
    let mut wraith = setup.start(&cfg);
    let client = http_client();
    let (st, v) = wraith
        .admin(
            Method::POST,
            "/v1/decisions",
            Some(json!({"ip": "192.0.2.40", "duration": "3h", "origin": "wazuh"})),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    let until = v["decision"]["until"].clone();
    // Written at once, 0600.
    let file = wraith.dir.path().join("decisions.json");
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.contains("192.0.2.40"), "{text}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );

    wraith.signal(libc::SIGTERM);
    assert_eq!(wraith.wait_exit(Duration::from_secs(20)), Some(0));
    assert!(
        wraith.log().contains("local decisions saved"),
        "{}",
        wraith.log()
    );

    let dir = std::mem::replace(&mut wraith.dir, tempfile::tempdir().unwrap());
    let wraith = Wraith::start_in(dir, &cfg);
    assert!(wraith.log().contains("local decisions restored"));
    assert_eq!(status_for(&client, &wraith, "192.0.2.40").await, 403);
    let (_, v) = wraith
        .admin(Method::GET, "/v1/decisions?origin=wazuh", None)
        .await;
    assert_eq!(v["count"], 1);
    // The expiry is kept (to the clock reads' millisecond or two: the file holds wall-clock
    // times, the store its own clock).
    let at = |v: &serde_json::Value| {
        time::OffsetDateTime::parse(
            v.as_str().unwrap(),
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap()
    };
    let moved = at(&v["decisions"][0]["until"]) - at(&until);
    assert!(moved.abs() < time::Duration::seconds(1), "moved by {moved}");
}

/// The wall clock, in milliseconds since the Unix epoch.
fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// The `until_ms` a decisions state file holds for `value` (a CIDR).
fn saved_until_ms(file: &serde_json::Value, value: &str) -> Option<u64> {
    file["decisions"]
        .as_array()?
        .iter()
        .find(|d| d["value"] == value)
        .and_then(|d| d["until_ms"].as_u64())
}

#[tokio::test]
async fn a_wall_clock_step_neither_ends_nor_stretches_a_ban() {
    // The gateway's wall clock is moved by libfaketime, which reads the offset from a file
    // on every call; the monotonic clock is left alone, as an NTP step leaves it.
    let setup = Setup::new();
    let clock = setup.dir.path().join("clock");
    std::fs::write(&clock, "+0\n").unwrap();
    let cfg = config(&setup, "\"127.0.0.0/8\"", "");
    let mut wraith = setup.start_with_env(&cfg, &faketime_env(&clock));
    let client = http_client();
    for (ip, duration) in [("192.0.2.60", "1h"), ("192.0.2.61", "3s")] {
        let (st, v) = wraith
            .admin(
                Method::POST,
                "/v1/decisions",
                Some(json!({"ip": ip, "duration": duration})),
            )
            .await;
        assert_eq!(st, 201, "{v}");
    }
    let started = std::time::Instant::now();

    // Two hours forward: the hour-long ban still holds.
    std::fs::write(&clock, "+7200\n").unwrap();
    assert_eq!(status_for(&client, &wraith, "192.0.2.60").await, 403);
    let (_, v) = wraith
        .admin(Method::GET, "/v1/decisions?ip=192.0.2.60", None)
        .await;
    let secs = v["decisions"][0]["expires_in_secs"].as_u64().unwrap();
    assert!((3500..=3600).contains(&secs), "{v}");
    // The time shown is on the (stepped) wall clock: about three hours from the real now.
    let until = time::OffsetDateTime::parse(
        v["decisions"][0]["until"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    let ahead = until - time::OffsetDateTime::now_utc();
    assert!(
        (10_700..=10_800).contains(&ahead.whole_seconds()),
        "{v} is {ahead} ahead"
    );

    // Two hours back: the three-second ban still ends after three seconds.
    std::fs::write(&clock, "-7200\n").unwrap();
    assert_eq!(status_for(&client, &wraith, "192.0.2.61").await, 403);
    tokio::time::sleep(Duration::from_secs(3).saturating_sub(started.elapsed())).await;
    let lifted = async {
        while status_for(&client, &wraith, "192.0.2.61").await != 200 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), lifted)
        .await
        .expect("the three-second ban ends on time");
    assert_eq!(status_for(&client, &wraith, "192.0.2.60").await, 403);

    // Saved on exit with the wall clock's time: an hour after the (stepped) wall clock's
    // now, so about an hour before the real now; a restart on the real clock reads it so.
    wraith.signal(libc::SIGTERM);
    assert_eq!(wraith.wait_exit(Duration::from_secs(20)), Some(0));
    let saved: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(wraith.dir.path().join("decisions.json")).unwrap(),
    )
    .unwrap();
    let until = saved_until_ms(&saved, "192.0.2.60/32").expect("the hour-long ban is saved");
    let behind = wall_ms() as i64 - until as i64;
    assert!(
        (3_500_000..=3_610_000).contains(&behind),
        "{saved}: {behind} ms behind the real clock"
    );
}

#[tokio::test]
async fn banned_peers_are_refused_at_accept_before_tls() {
    let setup = Setup::new();
    let ca = setup.pki.ca_pem.clone();
    // Only 127.0.0.1 is a trusted proxy; 127.0.0.2 is an ordinary client.
    let cfg = config(&setup, "\"127.0.0.1\"", "");
    let wraith = setup.start(&cfg);
    let (st, _) = wraith
        .admin(
            Method::POST,
            "/v1/decisions",
            Some(json!({"ip": "127.0.0.2"})),
        )
        .await;
    assert_eq!(st, 201);

    let connect_from = |src: &'static str, port: u16| async move {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(format!("{src}:0").parse().unwrap()).unwrap();
        sock.connect(format!("127.0.0.1:{port}").parse().unwrap())
            .await
    };
    let https = wraith.addr("https").port();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls_client_config(
        &ca,
        &[b"http/1.1"],
        None,
    )));
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    // The banned peer: the connection is reset before any TLS byte comes back (the reset
    // can even beat connect() returning).
    if let Ok(stream) = connect_from("127.0.0.2", https).await {
        let result =
            tokio::time::timeout(Duration::from_secs(10), tls.connect(name.clone(), stream))
                .await
                .expect("the handshake must fail promptly, not hang");
        assert!(result.is_err(), "a banned peer completed a TLS handshake");
    }
    // Plain HTTP: closed without an answer.
    if let Ok(mut stream) = connect_from("127.0.0.2", wraith.addr("http").port()).await {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let _ = stream.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await;
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut buf)).await;
        assert!(buf.is_empty(), "got {:?}", String::from_utf8_lossy(&buf));
    }
    // Anyone else handshakes fine.
    let stream = connect_from("127.0.0.3", https).await.unwrap();
    assert!(tls.connect(name, stream).await.is_ok());
}

#[tokio::test]
async fn admin_clients_that_stop_reading_lose_their_slot() {
    use tokio::io::AsyncWriteExt;
    let setup = Setup::new();
    let cfg = config(&setup, "\"127.0.0.0/8\"", "");
    let wraith = setup.start(&cfg);
    // Enough decisions for a listing far larger than a socket buffer.
    let many: Vec<_> = (0..20_000u32)
        .map(|i| {
            json!({"ip": format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255),
                   "reason": "x".repeat(40)})
        })
        .collect();
    let (st, v) = wraith
        .admin(Method::POST, "/v1/decisions", Some(json!(many)))
        .await;
    assert_eq!(st, 201, "{v}");
    // Every admin slot (16) taken by a client that asks for the list and never reads it.
    let socket = wraith.dir.path().join("admin.sock");
    let mut stalled = Vec::new();
    for _ in 0..16 {
        let mut s = tokio::net::UnixStream::connect(&socket).await.unwrap();
        s.write_all(b"GET /v1/decisions HTTP/1.1\r\nhost: wraith\r\n\r\n")
            .await
            .unwrap();
        stalled.push(s);
    }
    // The slots come back once the write stall limit has passed; status answers then.
    let start = std::time::Instant::now();
    let status = loop {
        match wraith::admin::call(&socket, Method::GET, "/v1/status", Duration::from_secs(5)).await
        {
            Ok((code, v)) => break (code, v),
            Err(e) => assert!(
                start.elapsed() < Duration::from_secs(60),
                "the admin socket stayed blocked by clients that do not read: {e}"
            ),
        }
    };
    assert_eq!(status.0, 200, "{}", status.1);
    drop(stalled);
    // A listing that size is asked for in part.
    let (st, v) = wraith
        .admin(Method::GET, "/v1/decisions?limit=10", None)
        .await;
    assert_eq!(st, 200);
    assert_eq!(v["count"], 20_000);
    assert_eq!(v["truncated"], true);
    assert_eq!(v["decisions"].as_array().unwrap().len(), 10);
    let (st, v) = wraith
        .admin(Method::GET, "/v1/decisions?limit=ten", None)
        .await;
    assert_eq!(st, 400, "{v}");
}

#[tokio::test]
async fn a_state_file_moved_by_reload_gets_the_bans_in_hand_and_keeps_its_own() {
    let setup = Setup::new();
    let cfg = config(&setup, "\"127.0.0.0/8\"", "");
    let moved = config(
        &setup,
        "\"127.0.0.0/8\"",
        "[decisions]\nstate_file = \"other.json\"\n",
    );
    let broken = config(
        &setup,
        "\"127.0.0.0/8\"",
        "[decisions]\nstate_file = \"broken.json\"\n",
    );
    let wraith = setup.start(&cfg);
    let client = http_client();
    let add = |ip: &'static str| {
        let w = &wraith;
        async move {
            let (st, v) = w
                .admin(Method::POST, "/v1/decisions", Some(json!({"ip": ip})))
                .await;
            assert_eq!(st, 201, "{v}");
        }
    };
    let ban = |ip: &'static str, duration: &'static str| {
        let w = &wraith;
        async move {
            let (st, v) = w
                .admin(
                    Method::POST,
                    "/v1/decisions",
                    Some(json!({"ip": ip, "duration": duration})),
                )
                .await;
            assert_eq!(st, 201, "{v}");
        }
    };
    let expires_in = |ip: &'static str| {
        let w = &wraith;
        async move {
            let (st, v) = w
                .admin(Method::GET, &format!("/v1/decisions?value={ip}"), None)
                .await;
            assert_eq!(st, 200, "{v}");
            v["decisions"][0]["expires_in_secs"].as_u64().unwrap()
        }
    };
    // other.json holds a ban that the running gateway no longer has, and an older, shorter
    // version of one it has.
    add("192.0.2.71").await;
    ban("192.0.2.72", "60s").await;
    let default_file = wraith.dir.path().join("decisions.json");
    let other = wraith.dir.path().join("other.json");
    std::fs::copy(&default_file, &other).unwrap();
    let (st, _) = wraith
        .admin(Method::DELETE, "/v1/decisions/192.0.2.71", None)
        .await;
    assert_eq!(st, 200);
    add("192.0.2.70").await;
    ban("192.0.2.72", "1d").await;
    assert_eq!(status_for(&client, &wraith, "192.0.2.71").await, 200);

    wraith.write_config(&moved);
    wraith.reload().unwrap();
    for ip in ["192.0.2.70", "192.0.2.71", "192.0.2.72"] {
        assert_eq!(status_for(&client, &wraith, ip).await, 403, "{ip}");
    }
    // The day-long ban in hand stays a day long, in memory and in the new file.
    assert!(expires_in("192.0.2.72").await > 3600);
    let text = std::fs::read_to_string(&other).unwrap();
    assert!(
        text.contains("192.0.2.70") && text.contains("192.0.2.71"),
        "{text}"
    );
    let file: serde_json::Value = serde_json::from_str(&text).unwrap();
    let until = saved_until_ms(&file, "192.0.2.72/32").unwrap();
    assert!(until > wall_ms() + 3_600_000, "{text}");

    // A state file that is not one: the reload is refused, the file untouched.
    std::fs::write(wraith.dir.path().join("broken.json"), "{ not json").unwrap();
    wraith.write_config(&broken);
    let err = wraith.reload().unwrap_err();
    assert!(err.contains("decisions.state_file"), "{err}");
    assert_eq!(
        std::fs::read_to_string(wraith.dir.path().join("broken.json")).unwrap(),
        "{ not json"
    );
}

#[tokio::test]
async fn local_decisions_stop_at_max_local() {
    let setup = Setup::new();
    let cfg = config(&setup, "\"127.0.0.0/8\"", "[decisions]\nmax_local = 2\n");
    let wraith = setup.start(&cfg);
    let add = |body: serde_json::Value| {
        let w = &wraith;
        async move { w.admin(Method::POST, "/v1/decisions", Some(body)).await }
    };
    assert_eq!(add(json!({"ip": "192.0.2.81"})).await.0, 201);
    assert_eq!(add(json!({"ip": "192.0.2.82"})).await.0, 201);
    // Renewing one already held adds nothing: allowed.
    assert_eq!(
        add(json!({"ip": "192.0.2.82", "duration": "8h"})).await.0,
        201
    );
    // A third, alone or in bulk: refused, nothing added.
    let (st, v) = add(json!({"ip": "192.0.2.83"})).await;
    assert_eq!(st, 507, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("decisions.max_local (2)"),
        "{v}"
    );
    let (st, _) = add(json!([{"ip": "192.0.2.84"}, {"ip": "192.0.2.81"}])).await;
    assert_eq!(st, 507);
    // An array longer than max_local is refused as it is read, whatever it holds.
    let (st, v) =
        add(json!([{"ip": "192.0.2.85"}, {"ip": "192.0.2.86"}, {"ip": "192.0.2.87"}])).await;
    assert_eq!(st, 507, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("more than 2 decisions"),
        "{v}"
    );
    let (_, list) = wraith.admin(Method::GET, "/v1/decisions", None).await;
    assert_eq!(list["count"], 2, "{list}");
}

/// An upstream that answers every request with `count` pieces (`<word> <i>\n`), waiting
/// `gap(i)` before piece `i`.
async fn streaming_upstream(word: &'static str, count: u32, gap: fn(u32) -> Duration) -> Upstream {
    use http_body_util::{BodyExt, StreamBody};
    type BoxError = Box<dyn std::error::Error + Send + Sync>;
    Upstream::start(move |_req| async move {
        let pieces = futures_util::stream::unfold(0u32, move |i| async move {
            if i == count {
                return None;
            }
            tokio::time::sleep(gap(i)).await;
            let piece = bytes::Bytes::from(format!("{word} {i}\n"));
            Some((Ok::<_, BoxError>(hyper::body::Frame::data(piece)), i + 1))
        });
        hyper::Response::new(BodyExt::boxed(StreamBody::new(pieces)))
    })
    .await
}

/// `GET url`, answered 200 with a body whose first piece starts with `first`: the rest of
/// the body, still streaming.
async fn streaming(
    client: &reqwest::Client,
    url: String,
    first: &str,
) -> impl futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin {
    use futures_util::StreamExt;
    let resp = client.get(url).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    let piece = tokio::time::timeout(Duration::from_secs(10), body.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(piece.starts_with(first.as_bytes()), "{piece:?}");
    body
}

/// The standard listeners, a JSON access log (`access.json`), `extra` (upstreams and routes
/// matched first), and upstream `name` at `addr`, routed for every other path.
fn routed_to(setup: &Setup, name: &str, addr: std::net::SocketAddr, extra: &str) -> String {
    format!(
        r#"{listeners}
{extra}
[[upstream]]
name = "{name}"
endpoints = ["{addr}"]
response_timeout = "90s"

[[route]]
name = "{name}"
upstream = "{name}"

[log.json]
path = "access.json"
"#,
        listeners = setup.listeners()
    )
}

/// A ban ends what the client started before it: a response still streaming is cut (the
/// record says why), and a WebSocket tunnel is closed. Bans are checked per request; these
/// are requests that would otherwise never end while the banned client keeps reading.
#[tokio::test]
async fn a_ban_cuts_the_clients_streaming_response_and_closes_its_websocket() {
    use futures_util::{SinkExt, StreamExt};
    let ws_addr = websocket_echo().await;
    // An event stream: a line every 100 ms, for half a minute.
    let streamer = streaming_upstream("tick", 300, |_| Duration::from_millis(100)).await;
    let setup = Setup::new();
    let ws = format!(
        r#"[[upstream]]
name = "ws"
endpoints = ["{ws_addr}"]
response_timeout = "30s"

[[route]]
name = "ws"
path = {{ prefix = "/ws" }}
upstream = "ws"
"#
    );
    let cfg = routed_to(&setup, "events", streamer.addr, &ws);
    let wraith = setup.start(&cfg);

    let mut body = streaming(&http_client(), wraith.url("http", "/events"), "tick 0").await;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", wraith.addr("http")))
        .await
        .unwrap();
    ws.send(tokio_tungstenite::tungstenite::Message::text("before"))
        .await
        .unwrap();
    assert!(ws.next().await.unwrap().is_ok());

    let (st, v) = wraith
        .admin(
            Method::POST,
            "/v1/decisions",
            Some(json!({"ip": "127.0.0.1", "reason": "caught streaming"})),
        )
        .await;
    assert_eq!(st, 201, "{v}");

    // The stream ends, cut, long before its 30 s.
    let cut = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match body.next().await {
                Some(Ok(_)) => continue,
                Some(Err(_)) => return true,
                None => return false,
            }
        }
    })
    .await
    .expect("the stream went on after the ban");
    assert!(cut, "the stream ended as if complete");
    // The tunnel is closed.
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match ws.next().await {
                Some(Ok(m)) if !m.is_close() => continue,
                _ => return,
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the tunnel stayed open after the ban");

    let record = wraith
        .wait_json_line("access.json", Duration::from_secs(10), |v| {
            v["path"] == "/events"
        })
        .await
        .expect("a record of the stream");
    assert_eq!(record["status"], 200, "{record}");
    assert_eq!(record["error"], "banned", "{record}");
    assert_eq!(record["ban_origin"], "admin", "{record}");
    assert_eq!(record["ban_scenario"], "caught streaming", "{record}");
    assert_eq!(record["aborted"], true, "{record}");
}

/// A response that streams nothing after its first piece (an idle event stream) is cut
/// when the client is banned, not at its next piece: the upstream here sends none for a
/// minute.
#[tokio::test]
async fn a_ban_cuts_an_idle_streaming_response_at_once() {
    use futures_util::StreamExt;
    let streamer = streaming_upstream("piece", 2, |i| Duration::from_secs(60 * u64::from(i))).await;
    let setup = Setup::new();
    let cfg = routed_to(&setup, "events", streamer.addr, "");
    let ca = setup.pki.ca_pem.clone();
    let wraith = setup.start(&cfg);
    for (listener, client) in [("http", http_client()), ("https", https_client(&ca, None))] {
        let mut body = streaming(&client, wraith.url(listener, "/idle"), "piece 0").await;
        let (st, v) = wraith
            .admin(
                Method::POST,
                "/v1/decisions",
                Some(json!({"ip": "127.0.0.1"})),
            )
            .await;
        assert_eq!(st, 201, "{v}");
        let next = tokio::time::timeout(Duration::from_secs(10), body.next())
            .await
            .expect("the idle stream stayed open after the ban");
        assert!(matches!(next, Some(Err(_))), "{next:?}");
        let record = wraith
            .wait_json_line("access.json", Duration::from_secs(10), |v| {
                v["listener"] == listener
            })
            .await
            .expect("a record of the stream");
        assert_eq!(record["error"], "banned", "{record}");
        assert_eq!(record["aborted"], true, "{record}");
        let (st, _) = wraith
            .admin(Method::DELETE, "/v1/decisions/127.0.0.1", None)
            .await;
        assert_eq!(st, 200);
    }
}

/// An upload (a request body still coming) is cut when its client is banned: the client
/// gets 403 and the upstream never gets the whole body, whether the client keeps sending or
/// has gone quiet. Over HTTP/1.1 and HTTP/2.
#[tokio::test]
async fn a_ban_cuts_an_upload_in_progress() {
    use http_body_util::BodyExt;
    // The upstream says when it has a request (so the ban comes after the request's own
    // check), then what became of the body.
    let (entered_tx, mut entered_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let (got_tx, mut got_rx) = tokio::sync::mpsc::unbounded_channel::<Result<usize, String>>();
    let receiver = Upstream::start(move |req| {
        let got = got_tx.clone();
        let entered = entered_tx.clone();
        async move {
            let _ = entered.send(());
            let read = req.into_body().collect().await;
            let _ = got.send(read.map(|b| b.to_bytes().len()).map_err(|e| e.to_string()));
            hyper::Response::new(full("stored"))
        }
    })
    .await;
    let setup = Setup::new();
    let ca = setup.pki.ca_pem.clone();
    let cfg = routed_to(&setup, "store", receiver.addr, "");
    let wraith = setup.start(&cfg);
    let cases = [
        ("http", http_client(), true),
        ("http", http_client(), false),
        ("https", https_client(&ca, None), true),
        ("https", https_client(&ca, None), false),
    ];
    for (i, (listener, client, keeps_sending)) in cases.into_iter().enumerate() {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<bytes::Bytes, std::io::Error>>(4);
        let body = reqwest::Body::wrap_stream(tokio_stream_from(rx));
        let path = format!("/upload-{i}");
        let sent = tokio::spawn(client.post(wraith.url(listener, &path)).body(body).send());
        let piece = bytes::Bytes::from(vec![b'x'; 16 * 1024]);
        tx.send(Ok(piece.clone())).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), entered_rx.recv())
            .await
            .expect("the request reached the upstream")
            .unwrap();
        let (st, v) = wraith
            .admin(
                Method::POST,
                "/v1/decisions",
                Some(json!({"ip": "127.0.0.1", "reason": "caught uploading"})),
            )
            .await;
        assert_eq!(st, 201, "{v}");
        let feeder = tokio::spawn(async move {
            // Sends for as long as anyone reads, or holds the body open without a byte.
            if keeps_sending {
                while tx.send(Ok(piece.clone())).await.is_ok() {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            } else {
                tokio::time::sleep(Duration::from_secs(60)).await;
                drop(tx);
            }
        });
        let resp = tokio::time::timeout(Duration::from_secs(10), sent)
            .await
            .expect("the upload went on after the ban")
            .unwrap();
        // The client, still listening, gets the 403 (whole: a ban must not cut the answer
        // that reports it).
        let resp =
            resp.unwrap_or_else(|e| panic!("{listener}, keeps sending: {keeps_sending}: {e}"));
        assert_eq!(
            resp.status(),
            403,
            "{listener}, keeps sending: {keeps_sending}"
        );
        let body = resp.text().await.unwrap();
        assert!(body.contains("\"banned\""), "{body}");
        let upstream_saw = tokio::time::timeout(Duration::from_secs(10), got_rx.recv())
            .await
            .expect("the upstream's request was not ended")
            .unwrap();
        assert!(
            upstream_saw.is_err(),
            "the upstream got a complete body: {upstream_saw:?}"
        );
        let record = wraith
            .wait_json_line("access.json", Duration::from_secs(10), |v| {
                v["path"] == path.as_str()
            })
            .await
            .expect("a record of the upload");
        assert_eq!(record["status"], 403, "{record}");
        assert_eq!(record["ban_origin"], "admin", "{record}");
        assert_eq!(record["ban_scenario"], "caught uploading", "{record}");
        feeder.abort();
        let (st, _) = wraith
            .admin(Method::DELETE, "/v1/decisions/127.0.0.1", None)
            .await;
        assert_eq!(st, 200);
    }
}

/// A stream of what `rx` receives.
fn tokio_stream_from<T: Send + 'static>(
    rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> {
    futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|t| (t, rx)) })
}
