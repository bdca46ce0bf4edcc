//! A real CrowdSec (Debian's package) for tests: a LAPI on a free loopback port from a temp
//! config dir, optionally with the agent reading a log file through Wraith's shipped
//! acquisition settings. Spawned as our child and waited on (the sandbox's PID 1 does not
//! reap orphans). Offline: the Debian package ships its hub.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tempfile::TempDir;

pub const CROWDSEC: &str = "/usr/bin/crowdsec";
pub const CSCLI: &str = "/usr/bin/cscli";
pub const HUB: &str = "/usr/share/crowdsec/hub";
pub const BOUNCER_KEY: &str = "wraith-test-bouncer-key-0123456789";
pub const BOUNCER_KEY_2: &str = "wraith-test-bouncer-key-second-one";

/// Whether Debian's crowdsec is installed. When it is not, a test says so loudly and
/// returns; under CI (where `.ci/install-deps.sh` installs it) a missing binary fails.
pub fn available(test: &str) -> bool {
    if Path::new(CROWDSEC).exists() && Path::new(CSCLI).exists() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!(
            "{test}: {CROWDSEC} is missing under CI; .ci/install-deps.sh should have installed it"
        );
    }
    eprintln!(
        "\n*** SKIPPED {test}: {CROWDSEC} is not installed (run .ci/install-deps.sh). \
         This test proves nothing until it runs. ***\n"
    );
    false
}

/// TLS for the LAPI listener: server certificate and key, and the CA that signs client
/// certificates (bouncers need OU `bouncer-ou`).
pub struct LapiTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

/// A running CrowdSec.
pub struct Crowdsec {
    pub dir: TempDir,
    pub config: PathBuf,
    pub port: u16,
    child: Option<Child>,
    log: Arc<Mutex<Vec<String>>>,
    agent: bool,
    tls: bool,
}

impl Crowdsec {
    /// LAPI only, over TLS with client-certificate authentication for bouncers.
    pub fn lapi_tls(tls: LapiTls) -> Crowdsec {
        Crowdsec::build(None, super::unused_port(), Some(tls))
    }

    /// LAPI only.
    pub fn lapi() -> Crowdsec {
        Crowdsec::new(None, super::unused_port())
    }

    /// LAPI plus the agent, acquiring per the given acquisition file (Wraith's shipped one,
    /// with its path rewritten by the test).
    pub fn with_agent(acquis: &str) -> Crowdsec {
        Crowdsec::new(Some(acquis), super::unused_port())
    }

    /// Like `with_agent`, on a given port (when the gateway must know the URL first).
    pub fn with_agent_on_port(acquis: &str, port: u16) -> Crowdsec {
        Crowdsec::new(Some(acquis), port)
    }

    fn new(acquis: Option<&str>, port: u16) -> Crowdsec {
        Crowdsec::build(acquis, port, None)
    }

    fn build(acquis: Option<&str>, port: u16, tls: Option<LapiTls>) -> Crowdsec {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for sub in [
            "etc/parsers/s00-raw",
            "etc/parsers/s01-parse",
            "etc/parsers/s02-enrich",
            "etc/scenarios",
            "etc/postoverflows",
            "etc/notifications",
            "data",
        ] {
            std::fs::create_dir_all(d.join(sub)).unwrap();
        }
        let config = d.join("etc/config.yaml");
        let tls_block = match &tls {
            None => String::new(),
            Some(t) => format!(
                "    tls:\n      cert_file: {}\n      key_file: {}\n      ca_cert_path: {}\n      client_verification: VerifyClientCertIfGiven\n      bouncers_allowed_ou: [bouncer-ou]\n      agents_allowed_ou: [agent-ou]\n",
                t.cert.display(),
                t.key.display(),
                t.ca.display()
            ),
        };
        std::fs::write(
            &config,
            format!(
                r#"common: {{daemonize: false, log_media: stdout, log_level: info}}
config_paths:
  config_dir: {d}/etc/
  data_dir: {d}/data/
  simulation_path: {d}/etc/simulation.yaml
  hub_dir: {HUB}/
  index_path: {HUB}/.index.json
  notification_dir: {d}/etc/notifications/
  plugin_dir: /usr/lib/crowdsec/plugins/
crowdsec_service: {{acquisition_path: {d}/etc/acquis.yaml, parser_routines: 1}}
db_config: {{type: sqlite, db_path: {d}/data/crowdsec.db, use_wal: true, flush: {{max_age: 7d}}}}
api:
  client: {{credentials_path: {d}/etc/local_api_credentials.yaml, insecure_skip_verify: true}}
  server:
    listen_uri: 127.0.0.1:{port}
    profiles_path: {d}/etc/profiles.yaml
    trusted_ips: [127.0.0.1, "::1"]
{tls_block}prometheus: {{enabled: false}}
"#,
                d = d.display()
            ),
        )
        .unwrap();
        std::fs::write(d.join("etc/simulation.yaml"), "simulation: off\n").unwrap();
        std::fs::write(
            d.join("etc/profiles.yaml"),
            "name: default_ip_remediation\nfilters:\n - Alert.Remediation == true && Alert.GetScope() == \"Ip\"\ndecisions:\n - type: ban\n   duration: 4h\non_success: break\n",
        )
        .unwrap();
        std::fs::write(d.join("etc/acquis.yaml"), acquis.unwrap_or("")).unwrap();
        std::fs::write(d.join("etc/local_api_credentials.yaml"), "").unwrap();
        if acquis.is_some() {
            // Parsers and scenarios: real directories of symlinks to hub files.
            let link = |from: &str, to: &str| {
                std::os::unix::fs::symlink(Path::new(HUB).join(from), d.join(to)).unwrap();
            };
            // s00: syslog-logs.yaml also holds `non-syslog`, which sets the program from
            // the acquisition label (type: nginx).
            link(
                "parsers/s00-raw/crowdsecurity/syslog-logs.yaml",
                "etc/parsers/s00-raw/syslog-logs.yaml",
            );
            link(
                "parsers/s01-parse/crowdsecurity/nginx-logs.yaml",
                "etc/parsers/s01-parse/nginx-logs.yaml",
            );
            for p in ["dateparse-enrich", "http-logs", "whitelists"] {
                link(
                    &format!("parsers/s02-enrich/crowdsecurity/{p}.yaml"),
                    &format!("etc/parsers/s02-enrich/{p}.yaml"),
                );
            }
            for s in [
                "http-probing",
                "http-sensitive-files",
                "http-bad-user-agent",
            ] {
                link(
                    &format!("scenarios/crowdsecurity/{s}.yaml"),
                    &format!("etc/scenarios/{s}.yaml"),
                );
            }
            std::os::unix::fs::symlink("/etc/crowdsec/patterns", d.join("etc/patterns")).unwrap();
            for f in std::fs::read_dir("/usr/share/crowdsec/data").unwrap() {
                let f = f.unwrap();
                std::os::unix::fs::symlink(f.path(), d.join("data").join(f.file_name())).unwrap();
            }
        }
        let mut cs = Crowdsec {
            dir,
            config,
            port,
            child: None,
            log: Arc::new(Mutex::new(Vec::new())),
            agent: acquis.is_some(),
            tls: tls.is_some(),
        };
        let creds = cs.dir.path().join("etc/local_api_credentials.yaml");
        let creds = creds.to_str().unwrap().to_string();
        cs.cscli_ok(&["machines", "add", "wraith-test", "--auto", "-f", &creds]);
        if cs.tls {
            // cscli must reach the LAPI over https too.
            let text = std::fs::read_to_string(&creds).unwrap();
            std::fs::write(&creds, text.replace("url: http://", "url: https://")).unwrap();
        }
        cs.cscli_ok(&["bouncers", "add", "wraith", "-k", BOUNCER_KEY]);
        // A second key: each gateway needs its own bouncer (LAPI keeps one last_pull per
        // bouncer, so two gateways on one key would split the deltas between them).
        cs.cscli_ok(&["bouncers", "add", "wraith-2", "-k", BOUNCER_KEY_2]);
        cs.start();
        cs
    }

    /// `http(s)://127.0.0.1:<port>`
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// Starts (or restarts) the crowdsec process and waits for `/health`.
    pub fn start(&mut self) {
        let mut cmd = Command::new(CROWDSEC);
        cmd.arg("-c").arg(&self.config);
        if !self.agent {
            cmd.arg("-no-cs");
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn crowdsec");
        for out in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let log = self.log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines() {
                    let Ok(line) = line else { break };
                    if std::env::var_os("CROWDSEC_TEST_ECHO").is_some() {
                        eprintln!("crowdsec| {line}");
                    }
                    log.lock().unwrap().push(line);
                }
            });
        }
        self.child = Some(child);
        let from = self.log.lock().unwrap().len();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.tls {
                // No TLS client here: the listening line, then the port, say it is up.
                if self.log.lock().unwrap()[from..]
                    .iter()
                    .any(|l| l.contains("Local API listening"))
                    && std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
                {
                    break;
                }
            } else if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) {
                use std::io::{Read, Write};
                let _ = s.write_all(b"GET /health HTTP/1.0\r\n\r\n");
                let mut buf = String::new();
                let _ = s.read_to_string(&mut buf);
                if buf.contains("\"up\"") {
                    break;
                }
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("crowdsec exited ({status}):\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "crowdsec LAPI not healthy:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        if self.agent {
            assert!(
                self.wait_log(Duration::from_secs(60), "Starting processing data"),
                "crowdsec agent did not start:\n{}",
                self.log()
            );
        }
    }

    /// SIGTERM and wait (the LAPI "goes away").
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Runs cscli against this instance.
    pub fn cscli(&self, args: &[&str]) -> Output {
        Command::new(CSCLI)
            .arg("-c")
            .arg(&self.config)
            .args(args)
            .output()
            .unwrap()
    }

    /// Runs cscli and panics with its output if it fails.
    pub fn cscli_ok(&self, args: &[&str]) -> String {
        let out = self.cscli(args);
        assert!(
            out.status.success(),
            "cscli {args:?} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The process output so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Waits for a log line containing `needle`.
    pub fn wait_log(&self, timeout: Duration, needle: &str) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.log.lock().unwrap().iter().any(|l| l.contains(needle)) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }
}

impl Drop for Crowdsec {
    fn drop(&mut self) {
        self.stop();
    }
}
