//! The command line: `wraith test` on good and broken configs, `certs init`, `version`,
//! `status`, `reload` and `stop` against a running server.

mod common;

use std::time::Duration;

use common::*;

#[test]
fn test_accepts_the_shipped_config() {
    let repo = env!("CARGO_MANIFEST_DIR");
    let (code, out, err) = wraith_cmd(
        &["test", "-c", &format!("{repo}/wraith.toml")],
        std::path::Path::new(repo),
    );
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("is valid"), "{out}");
}

/// `wraith test` on `text`, a config that must be refused: exit 1, and every `expected`
/// problem printed as `<file>:<line:col: key: message>`. Returns the output.
fn refused_config(text: &str, expected: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, text).unwrap();
    let (code, out, _) = wraith_cmd(&["test", "-c", path.to_str().unwrap()], dir.path());
    assert_eq!(code, 1, "{out}");
    for e in expected {
        let line = format!("{}:{e}", path.display());
        assert!(out.contains(&line), "missing {line:?} in:\n{out}");
    }
    out
}

#[test]
fn test_reports_every_error_with_position() {
    let text = r#"[server]
shutdown_timeout = "10 parsecs"

[[listener]]
name = "a"
address = "127.0.0.1:18080"
protocol = "http"
adress = "typo"

[[listener]]
name = "b"
address = "127.0.0.1:18081"
protocol = "http"

[[listener]]
name = "c"
address = "127.0.0.1:18081"
protocol = "http"

[[upstream]]
name = "app"
endpoints = ["127.0.0.1:9000"]
response_timeout = "soon"

[[route]]
name = "r1"
path = { regex = "^/(unclosed" }
upstream = "app"

[[route]]
name = "r2"
upstream = "nowhere"

[[route]]
name = "r3"
upstream = "app"
strip_prefix = "yes"

[[route]]
name = "r4"
upstream = "app"
path = { prefix = 5 }
"#;
    // Every problem, each with file:line:col and key path.
    let out = refused_config(
        text,
        &[
            "2:20: server.shutdown_timeout: invalid duration",
            "8:1: listener[0]: unknown field `adress`",
            "17:11: listener[2].address: address 127.0.0.1:18081 clashes with listener \"b\"",
            "23:20: upstream[0].response_timeout: invalid duration \"soon\"",
            "27:18: route[0].path.regex: invalid regex: unclosed group",
            "32:12: route[1].upstream: unknown upstream \"nowhere\"",
            "37:16: route[2].strip_prefix: invalid type: string \"yes\"",
            "42:19: route[3].path.prefix: invalid type: integer `5`",
        ],
    );
    assert!(out.contains("is invalid"), "{out}");
}

#[test]
fn test_reports_certificate_problems() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let other = wraith::certs::Ca::new("other")
        .unwrap()
        .issue_server(&["localhost"])
        .unwrap();
    std::fs::write(dir.path().join("other-key.pem"), other.key_pem).unwrap();
    std::fs::write(dir.path().join("garbage.pem"), "not a certificate").unwrap();
    let cfg = |cert: &str, key: &str| {
        format!(
            "[[listener]]\nname='s'\naddress='127.0.0.1:0'\nprotocol='https'\ntls = {{ cert = '{cert}', key = '{key}' }}\n"
        )
    };
    let _ = pki;
    let cases = [
        (
            cfg("missing.pem", "server-key.pem"),
            "cannot read certificate file",
        ),
        (cfg("garbage.pem", "server-key.pem"), "no certificate found"),
        (
            cfg("server.pem", "other-key.pem"),
            "does not match the certificate",
        ),
        (cfg("server.pem", "server.pem"), "no usable private key"),
    ];
    for (text, expected) in cases {
        let path = dir.path().join("c.toml");
        std::fs::write(&path, &text).unwrap();
        let (code, out, _) = wraith_cmd(&["test", "-c", path.to_str().unwrap()], dir.path());
        assert_eq!(code, 1, "{out}");
        assert!(out.contains(expected), "expected {expected:?} in:\n{out}");
        assert!(out.contains("c.toml:5:"), "position missing:\n{out}");
    }
}

#[test]
fn test_checks_listeners_whose_dev_certs_serve_has_yet_to_create() {
    // A fresh clone: the dev certs do not exist yet. `test` must still build and check the
    // listener's client authentication, with a stand-in set, and create nothing in certs/.
    let dir = tempfile::tempdir().unwrap();
    let cfg = |extra: &str| {
        format!(
            "[server]\ndev_certs_dir = 'certs'\n\n[[listener]]\nname='s'\naddress='127.0.0.1:0'\nprotocol='https'\n\n[listener.tls]\ncert = 'certs/server.pem'\nkey = 'certs/server-key.pem'\nclient_auth = 'optional'\nclient_ca = 'certs/ca.pem'\n{extra}"
        )
    };
    let path = dir.path().join("c.toml");
    std::fs::write(&path, cfg("")).unwrap();
    let (code, out, _) = wraith_cmd(&["test", "-c", path.to_str().unwrap()], dir.path());
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("will create development certificates"),
        "{out}"
    );
    assert!(
        !dir.path().join("certs").exists(),
        "test created the dev certs"
    );

    // Skipped before: the CRL beside pending dev certs was never read.
    std::fs::write(&path, cfg("client_crl = 'missing.crl'\n")).unwrap();
    let (code, out, _) = wraith_cmd(&["test", "-c", path.to_str().unwrap()], dir.path());
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("cannot read CRL file"), "{out}");
    assert!(out.contains("c.toml:14:"), "position missing:\n{out}");
    assert!(
        !dir.path().join("certs").exists(),
        "test created the dev certs"
    );
}

#[test]
fn test_reports_crowdsec_tls_files_it_cannot_use() {
    let dir = tempfile::tempdir().unwrap();
    let _pki = Pki::new(dir.path());
    std::fs::write(dir.path().join("garbage.pem"), "not a certificate").unwrap();
    let cases = [
        ("ca_cert = 'missing.pem'", "crowdsec.ca_cert"),
        (
            "client_cert = 'server.pem', client_key = 'garbage.pem'",
            "crowdsec.client_key",
        ),
    ];
    for (tls, expected) in cases {
        let text = format!(
            "[[listener]]\nname = 'h'\naddress = '127.0.0.1:0'\nprotocol = 'http'\n\n[crowdsec]\nlapi_url = 'https://127.0.0.1:1'\napi_key = 'k'\n{}\n",
            tls.replace(", ", "\n")
        );
        let path = dir.path().join("c.toml");
        std::fs::write(&path, &text).unwrap();
        let (code, out, _) = wraith_cmd(&["test", "-c", path.to_str().unwrap()], dir.path());
        assert_eq!(code, 1, "{text}\n{out}");
        assert!(out.contains(expected), "expected {expected:?} in:\n{out}");
        if expected == "crowdsec.ca_cert" {
            // A file that cannot be read is named at its place in the config.
            assert!(out.contains("c.toml:9:"), "position missing:\n{out}");
        }
    }
}

#[test]
fn certs_init_makes_private_keys_and_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let (code, out, err) = wraith_cmd(&["certs", "init", "--dir", "d"], dir.path());
    assert_eq!(code, 0, "{out}{err}");
    use std::os::unix::fs::PermissionsExt;
    for key in ["ca-key.pem", "server-key.pem", "client-key.pem"] {
        let mode = std::fs::metadata(dir.path().join("d").join(key))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{key}");
    }
    let client = std::fs::read(dir.path().join("d/client.pem")).unwrap();
    let (_, pem) = x509_parser::pem::parse_x509_pem(&client).unwrap();
    let cert = pem.parse_x509().unwrap();
    let san = cert.subject_alternative_name().unwrap().unwrap();
    assert!(format!("{:?}", san.value.general_names).contains("spiffe://wraith.dev/client/dev"));

    let (code, _, err) = wraith_cmd(&["certs", "init", "--dir", "d"], dir.path());
    assert_eq!(code, 1);
    assert!(err.contains("refusing to overwrite"), "{err}");
    let (code, _, _) = wraith_cmd(&["certs", "init", "--dir", "d", "--force"], dir.path());
    assert_eq!(code, 0);

    // --dir naming a file.
    let (code, _, err) = wraith_cmd(&["certs", "init", "--dir", "d/ca.pem"], dir.path());
    assert_eq!(code, 1);
    assert!(
        err.contains("d/ca.pem is a file, not a directory: give --dir a directory"),
        "{err}"
    );
}

#[test]
fn version_names_the_tls_provider() {
    let (code, out, _) = wraith_cmd(&["version"], std::path::Path::new("."));
    assert_eq!(code, 0);
    assert!(out.contains(env!("CARGO_PKG_VERSION")));
    assert!(out.contains("aws-lc-rs"));
    assert!(out.contains("git revision"));
}

#[tokio::test]
async fn status_reload_and_stop_talk_to_the_running_server() {
    let upstream = Upstream::echo().await;
    let setup = Setup::new();
    let base = format!(
        "{}\n[[upstream]]\nname='app'\nendpoints=['{}']\n\n[[route]]\nname='all'\nupstream='app'\n",
        setup.listeners(),
        upstream.addr
    );
    let mut wraith = setup.start(&base);

    let (code, out, err) = wraith.cli(&["status"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("generation 1"), "{out}");
    assert!(out.contains(&wraith.addr("https").to_string()), "{out}");
    assert!(out.contains(&upstream.addr.to_string()), "{out}");

    let (code, out, _) = wraith.cli(&["status", "--json"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["generation"], 1);
    assert_eq!(v["listeners"].as_array().unwrap().len(), 2);
    // Connections are counted as they are open: none yet (an accept loop's waiting slot is
    // none), then the one held here.
    let active = |v: &serde_json::Value, name: &str| {
        v["listeners"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["name"] == name)
            .unwrap()["active_connections"]
            .clone()
    };
    assert_eq!(active(&v, "http"), 0, "{v}");
    assert_eq!(active(&v, "https"), 0, "{v}");
    let held = std::net::TcpStream::connect(wraith.addr("http")).unwrap();
    let counted = |wraith: &Wraith| {
        let (_, out, _) = wraith.cli(&["status", "--json"]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        active(&v, "http") == 1
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !counted(&wraith) {
        assert!(
            std::time::Instant::now() < deadline,
            "the held connection is not counted"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(held);

    // A good reload advances the generation and says so.
    let (code, out, err) = wraith.cli(&["reload"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("generation 2"), "{out}");

    // A broken config is rejected; the server keeps serving generation 2 and says why.
    wraith.write_config(&format!(
        "{base}\n[[route]]\nname='bad'\nupstream='missing'\n"
    ));
    let (code, _, err) = wraith.cli(&["reload"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("unknown upstream \\\"missing\\\"")
            || err.contains("unknown upstream \"missing\""),
        "{err}"
    );
    let resp = http_client()
        .get(wraith.url("http", "/still-up"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let (_, out, _) = wraith.cli(&["status"]);
    assert!(out.contains("FAILED"), "{out}");

    // A broken [server] leaves the CLI unable to find the server: it says that nothing was
    // sent, and the server is untouched.
    wraith.write_config(&base.replacen("[server]\n", "[server]\nshutdown_timeout = 'soon'\n", 1));
    let (code, _, err) = wraith.cli(&["reload"]);
    assert_eq!(code, 1);
    assert!(err.contains("nothing was sent to it"), "{err}");
    assert!(err.contains("server.shutdown_timeout"), "{err}");
    wraith.write_config(&base);
    let (_, out, _) = wraith.cli(&["status"]);
    assert!(out.contains("generation 2"), "{out}");

    // stop: SIGTERM, wait, report; the pid file is gone afterwards.
    let (code, out, err) = wraith.cli(&["stop"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("exited"), "{out}");
    assert_eq!(wraith.wait_exit(Duration::from_secs(5)), Some(0));
    assert!(!wraith.dir.path().join("wraith.pid").exists());
    let (code, _, err) = wraith.cli(&["status"]);
    assert_eq!(code, 1);
    assert!(err.contains("is wraith running?"), "{err}");
}

/// Two `wraith reload`s within one second with the same outcome: each reports its own reload
/// (by the reload's sequence number in the status), rather than waiting 30 s for a change in a
/// last-reload record (time in seconds, ok, errors) that the second one leaves as it was.
#[test]
fn reloads_within_one_second_each_report_their_outcome() {
    let setup = Setup::new();
    let base = format!(
        "{}\n[[route]]\nname='all'\nrespond={{ status = 200 }}\n",
        setup.listeners()
    );
    let wraith = setup.start(&base);
    let mut generation = 1;
    for ok in [true, false] {
        if !ok {
            wraith.write_config(&format!(
                "{base}\n[[route]]\nname='bad'\nupstream='missing'\n"
            ));
        }
        // Both at the start of a second, so that they land in the same one.
        let into = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_millis();
        std::thread::sleep(Duration::from_millis(u64::from(1020 - into)));
        let started = std::time::Instant::now();
        for _ in 0..2 {
            let (code, out, err) = wraith.cli(&["reload"]);
            if ok {
                generation += 1;
                assert_eq!(code, 0, "{out}{err}");
                assert!(
                    out.contains(&format!("reloaded: configuration generation {generation}")),
                    "{out}"
                );
            } else {
                assert_eq!(code, 1, "{out}{err}");
                assert!(err.contains("rejected the new configuration"), "{err}");
                assert!(
                    err.contains(&format!("serving generation {generation}")),
                    "{err}"
                );
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
    }
    let (_, out, _) = wraith.cli(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["reloads_started"], 4, "{v}");
    assert_eq!(v["last_reload"]["seq"], 4, "{v}");
    assert_eq!(v["last_reload"]["generation"], 3, "{v}");
}

#[test]
fn the_admin_socket_is_private_and_never_replaces_a_file_that_is_not_a_socket() {
    use std::os::unix::fs::PermissionsExt;
    // A config whose admin_socket names a regular file: serve refuses, the file survives.
    let setup = Setup::new();
    let cfg = setup.dir.path().join("wraith.toml");
    std::fs::write(&cfg, Setup::standard_listeners()).unwrap();
    let precious = setup.dir.path().join("admin.sock");
    std::fs::write(&precious, "not a socket").unwrap();
    let (code, _, err) = wraith_cmd(&["serve", "-c", cfg.to_str().unwrap()], setup.dir.path());
    assert_ne!(code, 0);
    assert!(err.contains("is not a socket"), "{err}");
    assert_eq!(std::fs::read_to_string(&precious).unwrap(), "not a socket");

    // A running gateway's socket is 0600 from birth.
    let setup = Setup::new();
    let cfg = setup.listeners();
    let wraith = setup.start(&cfg);
    let mode = std::fs::metadata(wraith.path("admin.sock"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn test_reports_trust_domain_bundles_it_cannot_use() {
    let dir = tempfile::tempdir().unwrap();
    let _pki = Pki::new(dir.path());
    let other = wraith::certs::Ca::new("other").unwrap();
    std::fs::write(dir.path().join("other.pem"), &other.cert_pem).unwrap();
    let cfg = |domains: &str| {
        format!(
            "[[listener]]\nname='s'\naddress='127.0.0.1:0'\nprotocol='https'\ntls = {{ cert = 'server.pem', key = 'server-key.pem', client_auth = 'require', client_ca = 'ca.pem', client_trust_domains = {{ {domains} }} }}\n"
        )
    };
    let cases = [
        (
            cfg("'Upper.Example' = 'ca.pem'"),
            "is not a SPIFFE trust domain",
        ),
        (
            cfg("'a.example' = 'other.pem'"),
            "must also be in client_ca",
        ),
        (
            cfg("'a.example' = 'missing.pem'"),
            "client_trust_domains.a.example",
        ),
    ];
    for (text, expected) in cases {
        let path = dir.path().join("c.toml");
        std::fs::write(&path, &text).unwrap();
        let (code, out, _) = wraith_cmd(&["test", "-c", path.to_str().unwrap()], dir.path());
        assert_eq!(code, 1, "{text}\n{out}");
        assert!(out.contains(expected), "expected {expected:?} in:\n{out}");
    }
    let path = dir.path().join("c.toml");
    std::fs::write(&path, cfg("'test.local' = 'ca.pem'")).unwrap();
    let (code, out, _) = wraith_cmd(&["test", "-c", path.to_str().unwrap()], dir.path());
    assert_eq!(code, 0, "{out}");
}

/// `[server]` keys changed in the file: those read only at start are named in a warning by the
/// reload; a new `pid_file` or `admin_socket` is moved to by the reload, and `wraith reload` /
/// `wraith stop` (which read the paths from the edited file) keep reaching the server before
/// and after.
#[test]
fn server_keys_changed_by_a_reload_warn_or_move_and_the_cli_keeps_reaching_the_server() {
    let setup = Setup::new();
    let base = format!(
        "{}\n[[route]]\nname='all'\nrespond={{ status = 200 }}\n",
        setup.listeners()
    );
    let mut wraith = setup.start(&base);

    wraith.write_config(&base.replace(
        "[server]\n",
        "[server]\nworker_threads = 3\nlog_level = \"debug\"\n",
    ));
    let (code, out, err) = wraith.cli(&["reload"]);
    assert_eq!(code, 0, "{out}{err}");
    for key in ["server.worker_threads", "server.log_level"] {
        assert!(
            wraith.log_json().iter().any(|l| l["key"] == key
                && l["level"] == "WARN"
                && l["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("takes effect at the next restart"))),
            "no warning for {key}:\n{}",
            wraith.log()
        );
    }

    // A new pid file: the server still holds the old one until the reload moves it.
    let moved_pid = base.replace("pid_file = \"wraith.pid\"", "pid_file = \"moved.pid\"");
    wraith.write_config(&moved_pid);
    let (code, out, err) = wraith.cli(&["reload"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("reloaded"), "{out}");
    assert!(err.contains("holds"), "{err}");
    assert!(!wraith.path("wraith.pid").exists());
    assert_eq!(
        std::fs::read_to_string(wraith.path("moved.pid")).unwrap(),
        format!("{}\n", wraith.pid())
    );

    // A new admin socket: nothing answers there until the reload moves it.
    let moved_both = moved_pid.replace(
        "admin_socket = \"admin.sock\"",
        "admin_socket = \"moved.sock\"",
    );
    wraith.write_config(&moved_both);
    let (code, out, err) = wraith.cli(&["reload"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("reloaded"), "{out}");
    assert!(!wraith.path("admin.sock").exists());
    let (code, out, err) = wraith.cli(&["status", "--json"]);
    assert_eq!(code, 0, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(
        v["admin_socket"]
            .as_str()
            .is_some_and(|p| p.ends_with("/moved.sock")),
        "{v}"
    );

    // A reload that cannot take its new pid file fails and moves nothing.
    std::fs::create_dir(wraith.path("taken.pid")).unwrap();
    wraith.write_config(&moved_both.replace("moved.pid", "taken.pid"));
    let err = wraith.reload().unwrap_err();
    assert!(err.contains("server.pid_file"), "{err}");
    assert!(wraith.path("moved.pid").exists());
    assert!(wraith.path("moved.sock").exists());

    wraith.write_config(&moved_both);
    let (code, out, err) = wraith.cli(&["stop"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(wraith.wait_exit(Duration::from_secs(10)), Some(0));
    assert!(!wraith.path("moved.pid").exists());
    assert!(!wraith.path("moved.sock").exists());
}

#[test]
fn test_opens_what_serve_opens_log_files_and_the_decisions_state_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("a-directory")).unwrap();
    std::fs::write(dir.path().join("bad-state.json"), "not a state file").unwrap();
    let base = "[[listener]]\nname = 'h'\naddress = '127.0.0.1:0'\nprotocol = 'http'\n";
    let cases = [
        ("[log.json]\npath = 'a-directory'\n", "log.json.path"),
        (
            "[log.combined]\npath = 'a-directory'\n",
            "log.combined.path",
        ),
        ("[log.sqlite]\npath = 'a-directory'\n", "log.sqlite.path"),
        (
            "[decisions]\nstate_file = 'bad-state.json'\n",
            "decisions.state_file",
        ),
    ];
    for (extra, key) in cases {
        let path = dir.path().join("c.toml");
        std::fs::write(&path, format!("{base}{extra}")).unwrap();
        let (code, out, _) = wraith_cmd(&["test", "-c", path.to_str().unwrap()], dir.path());
        assert_eq!(code, 1, "{extra}\n{out}");
        // Named where the file sets it: the value on line 6.
        let column = if key == "decisions.state_file" { 14 } else { 8 };
        let expected = format!("error: {}:6:{column}: {key}: ", path.display());
        assert!(out.contains(&expected), "expected {expected:?} in:\n{out}");
    }
    // Paths that can be opened pass (and the log file is created, as `nginx -t` does).
    let path = dir.path().join("c.toml");
    std::fs::write(
        &path,
        format!(
            "{base}[log.json]\npath = 'logs/access.json'\n[log.sqlite]\npath = 'logs/access.db'\n"
        ),
    )
    .unwrap();
    let (code, out, _) = wraith_cmd(&["test", "-c", path.to_str().unwrap()], dir.path());
    assert_eq!(code, 0, "{out}");
}

#[tokio::test]
async fn a_policy_too_deep_for_cedar_is_refused_and_a_reload_with_it_leaves_the_server_up() {
    let setup = Setup::new();
    let cfg = format!(
        "{}\n[[route]]\nname = \"home\"\nrespond = {{ status = 200, body = \"ok\\n\" }}\n",
        setup.listeners()
    );
    let wraith = setup.start(&cfg);
    // 150 brackets deep: Cedar's parser, on a reload's thread, overflowed the stack and
    // killed the server (`wraith test` passed it on the main thread's larger stack).
    let deep = format!(
        "@id(\"deep\")\npermit(principal, action, resource) when {{ {}true{} }};\n",
        "(".repeat(150),
        ")".repeat(150)
    );
    let file = wraith.dir.path().join("policies/deep.cedar");
    std::fs::write(&file, deep).unwrap();
    let (code, out, err) = wraith.cli(&["test"]);
    assert_eq!(code, 1, "{out}{err}");
    let all = format!("{out}{err}");
    assert!(
        all.contains("deep.cedar:2:") && all.contains("brackets nested deeper than 64"),
        "{all}"
    );
    let (code, _, err) = wraith.cli(&["reload"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("too complex to load"), "{err}");
    // Still serving, on the previous policies.
    let resp = http_client()
        .get(wraith.url("http", "/"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // No brackets, but as deep: a chain of 20,000 additions overflowed the stack of the
    // pruning that runs after Cedar's parser.
    let chain = format!(
        "@id(\"deep\")\npermit(principal, action, resource) when {{ {} > 0 }};\n",
        vec!["1"; 20_000].join(" + ")
    );
    std::fs::write(&file, chain).unwrap();
    let (code, out, err) = wraith.cli(&["test"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        format!("{out}{err}").contains("its expression nests about 2000"),
        "{out}{err}"
    );
    std::fs::remove_file(&file).unwrap();
}

#[test]
fn files_that_are_no_regular_files_are_refused_at_once() {
    // A FIFO would block the read (or the open) until a writer or reader came, in a reload
    // on a worker thread too; /dev/zero never ends.
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let _ = &pki;
    let fifo = dir.path().join("st.fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let listener = |cert: &str| {
        format!(
            "[[listener]]\nname='s'\naddress='127.0.0.1:0'\nprotocol='https'\n\
             tls = {{ cert = '{cert}', key = 'server-key.pem' }}\n"
        )
    };
    let cases = [
        (
            format!(
                "[decisions]\nstate_file = 'st.fifo'\n{}",
                listener("server.pem")
            ),
            "not a regular file (a FIFO)",
        ),
        (
            listener("/dev/zero"),
            "not a regular file (a character device)",
        ),
        (listener("st.fifo"), "not a regular file (a FIFO)"),
        (
            format!("[log.json]\npath = 'st.fifo'\n{}", listener("server.pem")),
            "a FIFO with no reader",
        ),
    ];
    for (text, expected) in cases {
        let path = dir.path().join("c.toml");
        std::fs::write(&path, &text).unwrap();
        // Refused at once: a FIFO waited on would keep the command running.
        let args = ["test", "-c", path.to_str().unwrap()];
        let (code, out, _) = wraith_cmd_within(&args, dir.path(), Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("{text}\n{e}"));
        assert_eq!(code, 1, "{text}\n{out}");
        assert!(out.contains(expected), "{expected:?} not in:\n{out}");
    }
    let (code, out, _) = wraith_cmd(&["test", "-c", "/dev/zero"], dir.path());
    assert_eq!(code, 1);
    assert!(out.contains("a character device"), "{out}");
}

#[test]
fn a_command_printing_into_a_closed_pipe_ends_quietly() {
    // `wraith policy schema | head -0`: the reader is gone before the first write.
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    unsafe { libc::close(fds[0]) };
    let write_end = unsafe { std::os::fd::OwnedFd::from_raw_fd(fds[1]) };
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wraith"))
        .args(["policy", "schema"])
        .stdout(std::process::Stdio::from(write_end))
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.code(), Some(141), "{:?}", out.status);
}

#[test]
fn framing_headers_given_for_responses_are_config_errors() {
    // Every client got an empty reply from such a route: its Content-Length contradicted
    // the body sent.
    let text = r#"[[listener]]
name = "a"
address = "127.0.0.1:0"
protocol = "http"

[[upstream]]
name = "app"
endpoints = ["127.0.0.1:9"]

[[route]]
name = "r1"
path = { exact = "/" }
respond = { status = 200, body = "abc", headers = { "Content-Length" = "5" } }

[[route]]
name = "r2"
upstream = "app"
response_headers = { set = { "transfer-encoding" = "chunked" }, add = { "x-ok" = "1" } }
request_headers = { set = { "x-ok" = "1" } }
"#;
    refused_config(
        text,
        &[
            "13:53: route[0].respond.headers.content-length: content-length cannot be set",
            "18:30: route[1].response_headers.set.transfer-encoding: transfer-encoding cannot be set",
        ],
    );
}

#[test]
fn identity_headers_in_a_routes_request_edits_are_config_errors() {
    // Upstreams take x-forwarded-client-cert (and x-wraith-*) for a verified client
    // certificate: a route that set one named every anonymous client as whoever it said.
    let text = r#"[[listener]]
name = "a"
address = "127.0.0.1:0"
protocol = "http"

[[upstream]]
name = "app"
endpoints = ["127.0.0.1:9"]

[[route]]
name = "r1"
upstream = "app"
request_headers = { set = { "X-Forwarded-Client-Cert" = "URI=spiffe://x/admin" } }

[[route]]
name = "r2"
upstream = "app"
request_headers = { add = { "x_wraith_user" = "admin", "x-ok" = "1" } }
response_headers = { set = { "x-wraith-note" = "fine on a response" } }
"#;
    refused_config(
        text,
        &[
            "13:29: route[0].request_headers.set.x-forwarded-client-cert: x-forwarded-client-cert cannot be set by a route",
            "18:29: route[1].request_headers.add.x_wraith_user: x_wraith_user cannot be set by a route",
        ],
    );
}

#[test]
fn routes_that_can_never_match_are_config_errors() {
    // Requests are routed by their normalized path: these routes were accepted and never
    // matched (requests fell through to the next route).
    let text = r#"[[listener]]
name = "a"
address = "127.0.0.1:0"
protocol = "http"

[[route]]
name = "dots"
path = { exact = "/a/../b" }
respond = { status = 200 }

[[route]]
name = "encoded"
path = { prefix = "/%61dmin/" }
respond = { status = 200 }

[[route]]
name = "none"
methods = []
respond = { status = 200 }

[[route]]
name = "fine"
path = { prefix = "/api/" }
methods = ["get"]
respond = { status = 200 }

[[route]]
name = "dotfiles"
path = { prefix = "/." }
respond = { status = 404 }

[[route]]
name = "dotdot-names"
path = { prefix = "/x/.." }
respond = { status = 404 }
"#;
    let out = refused_config(
        text,
        &[
            "8:18: route[0].path.exact: path \"/a/../b\" can never match: requests are routed by their normalized path; write \"/b\"",
            "13:19: route[1].path.prefix: path \"/%61dmin/\" can never match: requests are routed by their normalized path; write \"/admin/\"",
            "18:11: route[2].methods: an empty list matches no request",
        ],
    );
    assert_eq!(out.matches("error:").count(), 3, "{out}");
}

/// More worker threads than the OS gives (here: no address space left for their stacks)
/// is an error that says so, and the process exits; tokio's panic used to leave it hanging,
/// not listening.
#[test]
fn worker_threads_the_os_refuses_end_the_start_with_an_error() {
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("wraith.toml"),
        "[server]\nworker_threads = 1024\n\n[[listener]]\nname = \"http\"\naddress = \"127.0.0.1:0\"\nprotocol = \"http\"\n\n[[route]]\nname = \"r\"\nrespond = { status = 200 }\n",
    )
    .unwrap();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_wraith"));
    cmd.args(["serve", "-c", "wraith.toml"])
        .current_dir(dir.path());
    // 2 GiB of address space: the server starts in well under that with a few threads, and
    // 1024 stacks of 2 MiB do not fit beside it.
    // SAFETY: setrlimit is async-signal-safe, and only the child's limit changes.
    unsafe {
        cmd.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 2 << 30,
                rlim_max: 2 << 30,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let (code, _, stderr) = command_within(cmd, Duration::from_secs(30)).unwrap();
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains(
            "wraith: cannot start the async runtime (server.worker_threads = 1024): OS can't spawn worker thread"
        ),
        "{stderr}"
    );
    assert!(stderr.contains("ulimit -u, ulimit -v"), "{stderr}");
}

/// `wraith serve` on a one-listener config under an open-file limit of `soft`/`hard`, its
/// stderr read to the end on a thread (a closed pipe would fail the server's later log
/// writes). Returns once it listens: the child, the listener's address, and the reader,
/// which yields every log line after the child exits.
fn serve_with_open_files(
    dir: &tempfile::TempDir,
    soft: u64,
    hard: u64,
) -> (
    std::process::Child,
    std::net::SocketAddr,
    std::thread::JoinHandle<Vec<String>>,
) {
    use std::io::BufRead;
    use std::os::unix::process::CommandExt;
    std::fs::write(
        dir.path().join("wraith.toml"),
        "[[listener]]\nname = \"http\"\naddress = \"127.0.0.1:0\"\nprotocol = \"http\"\n\n[[route]]\nname = \"r\"\nrespond = { status = 200 }\n",
    )
    .unwrap();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_wraith"));
    cmd.args(["serve", "-c", "wraith.toml"])
        .current_dir(dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    // SAFETY: setrlimit is async-signal-safe, and only the child's limit changes.
    unsafe {
        cmd.pre_exec(move || {
            let limit = libc::rlimit {
                rlim_cur: soft,
                rlim_max: hard,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    let stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut lines = Vec::new();
        for line in stderr.lines().map_while(Result::ok) {
            if line.contains("\"listening\"") {
                let _ = tx.send(line.clone());
            }
            lines.push(line);
        }
        lines
    });
    let listening: serde_json::Value =
        serde_json::from_str(&rx.recv_timeout(Duration::from_secs(30)).unwrap()).unwrap();
    let addr = listening["address"].as_str().unwrap().parse().unwrap();
    (child, addr, reader)
}

/// SIGTERM to `child`; its exit status.
fn stop_child(child: &mut std::process::Child) -> std::process::ExitStatus {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    child.wait().unwrap()
}

/// The soft open-file limit is raised to the hard one at start (a default soft limit of 1024
/// was reached long before the default max_connections: accept failed, new clients hung),
/// and a hard limit below what the listeners' max_connections allow is warned about.
#[test]
fn serve_raises_the_open_file_limit_and_warns_when_the_hard_one_is_too_low() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, _, reader) = serve_with_open_files(&dir, 512, 2048);
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.id())).unwrap();
    assert!(stop_child(&mut child).success());
    let lines = reader.join().unwrap();
    let files = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap()
        .split_whitespace()
        .skip(3)
        .take(2)
        .collect::<Vec<_>>();
    assert_eq!(files, ["2048", "2048"], "{limits}");
    assert!(
        lines
            .iter()
            .any(|l| l.contains("the open-file limit (2048) is below")
                && l.contains("10000 connections")),
        "{}",
        lines.join("\n")
    );
}

/// Out of descriptors, every accept fails (retried every 50 ms): that is one warning per
/// 10 s, with the count, not a line per retry (78 lines in 4 s before).
#[test]
fn failing_accepts_are_logged_once_per_interval() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, addr, reader) = serve_with_open_files(&dir, 64, 64);
    // More connections than descriptors: accept fails from some point on, and keeps failing.
    let held: Vec<_> = (0..100)
        .filter_map(|_| std::net::TcpStream::connect(addr).ok())
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    drop(held);
    stop_child(&mut child);
    let lines = reader.join().unwrap();
    let warnings = lines.iter().filter(|l| l.contains("accept failed")).count();
    assert_eq!(warnings, 1, "{}", lines.join("\n"));
}

/// Empty lists and a log path two sinks share are errors at the line that says so, like
/// every other error in the file.
#[test]
fn empty_lists_and_shared_log_paths_are_refused_where_they_are_written() {
    let text = r#"[[listener]]
name = "a"
address = "127.0.0.1:0"
protocol = "https"
tls = { cert = "c.pem", key = "k.pem", versions = [], key_exchange = [] }

[[route]]
name = "r"
respond = { status = 200 }

[log.json]
path = "access.log"

[log.combined]
path = "./access.log"
"#;
    let out = refused_config(
        text,
        &[
            "5:51: listener[0].tls.versions: at least one TLS version is needed",
            "5:70: listener[0].tls.key_exchange: at least one group is needed",
            "15:8: log.combined.path: ",
        ],
    );
    assert!(
        out.contains("./access.log is also the path of log.json"),
        "{out}"
    );
}
