//! The configuration examples of `README.md` and `docs/*.md` stay valid: every ```` ```toml ````
//! block loads as `wraith test` would load it, so a renamed or removed key, a changed range or
//! a value the code no longer takes breaks this test and not a reader's config.
//!
//! Most blocks are fragments, so each is completed the way a reader would complete it: paths
//! under `/etc/wraith`, `/var/log/wraith`, `/var/lib/wraith` and `/run/wraith` point into a
//! temporary directory holding development certificates (made here), a CRL, key files, an
//! OCSP response for the server certificate (from `openssl ocsp`) and the shipped policies;
//! a block that starts inside a listener (`[listener.tls]`) gets the `[[listener]]` it
//! belongs to; a block without a listener gets a plain one; an upstream a
//! route names but the block does not define gets one endpoint; a policy file a set names but
//! `policies/` lacks gets a harmless policy. Policy test cases (`[[case]]`, checked by
//! `wraith test` itself) are not configurations and are left out. Nothing is bound or
//! started: this is the config loader only (about 1.5 s for every block in a debug build).
//! An example meant to be wrong belongs in a ```` ```text ```` block, which is not checked.

use std::path::{Path, PathBuf};

use wraith::config::{load_str, LoadOptions};

/// The documents whose examples are checked (BENCHMARKS.md holds no configuration).
fn documents() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .expect("docs/ is readable")
        .map(|e| e.expect("docs/ entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .filter(|p| !p.ends_with("BENCHMARKS.md"))
        .collect();
    docs.sort();
    docs.insert(0, root.join("README.md"));
    docs
}

/// The ```` ```toml ```` blocks of a Markdown text, each with the line its first line is on.
fn toml_blocks(text: &str) -> Vec<(usize, String)> {
    let mut blocks = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for (i, line) in text.lines().enumerate() {
        let fence = line.trim_start().starts_with("```");
        match &mut current {
            Some((_, body)) if !fence => {
                body.push_str(line);
                body.push('\n');
            }
            Some(_) => blocks.extend(current.take()),
            None if fence && line.trim() == "```toml" => current = Some((i + 2, String::new())),
            None => {}
        }
    }
    blocks
}

/// A directory with what the examples refer to: certificates, a CRL, key files, policies.
fn fixtures(dir: &Path) {
    let certs = dir.join("certs");
    wraith::certs::init(&certs, false).expect("development certificates");
    let read = |name: &str| std::fs::read_to_string(certs.join(name)).expect("certificate file");
    let ca = wraith::certs::Ca::load(&read("ca.pem"), &read("ca-key.pem")).expect("the dev CA");
    let crl = ca.revocation_list(&[], 30).expect("a CRL");
    std::fs::write(certs.join("ca.crl"), &crl).expect("write the CRL");
    let copies = [
        ("etc/server.pem", "server.pem"),
        ("etc/server-key.pem", "server-key.pem"),
        ("etc/clients-ca.pem", "ca.pem"),
        ("pki/root.pem", "ca.pem"),
        ("pki/partner-root.pem", "ca.pem"),
        ("pki/partner.pem", "ca.pem"),
        ("etc/redis-ca.pem", "ca.pem"),
        ("etc/redis-client.pem", "client.pem"),
        ("etc/redis-client-key.pem", "client-key.pem"),
    ];
    for sub in ["etc", "pki", "log", "lib", "run"] {
        std::fs::create_dir_all(dir.join(sub)).expect("fixture directory");
    }
    for (to, from) in copies {
        std::fs::copy(certs.join(from), dir.join(to)).expect("copy a certificate");
    }
    std::fs::write(dir.join("pki/root.crl"), &crl).expect("write the CRL");
    std::fs::write(dir.join("etc/crowdsec.key"), "0123456789abcdef\n").expect("key file");
    std::fs::write(dir.join("etc/redis-password"), "secret\n").expect("password file");
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    for policies in [dir.join("policies"), dir.join("etc/policies")] {
        std::fs::create_dir_all(&policies).expect("policy directory");
        for entry in std::fs::read_dir(&shipped).expect("policies/ is readable") {
            let path = entry.expect("policies/ entry").path();
            if path.is_file() {
                let name = path.file_name().expect("a file name");
                std::fs::copy(&path, policies.join(name)).expect("copy a policy file");
            }
        }
    }
}

/// `certs/server.ocsp`: what the dev CA's OCSP responder (`openssl ocsp -index`, Debian's
/// openssl, as in tests/ocsp.rs) says about the dev server certificate, for the examples that
/// staple one (only made for those: it runs openssl twice).
fn ocsp_fixture(dir: &Path) {
    use std::process::Command;
    let certs = dir.join("certs");
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-serial", "-in"])
        .arg(certs.join("server.pem"))
        .output()
        .expect("openssl (Debian's openssl package) must be installed");
    let text = String::from_utf8_lossy(&out.stdout);
    let serial = text
        .trim()
        .strip_prefix("serial=")
        .expect("a serial number");
    let index = dir.join("index.txt");
    std::fs::write(
        &index,
        format!("V\t301231000000Z\t\t{serial}\tunknown\t/CN=localhost\n"),
    )
    .expect("write the CA index");
    let ca = certs.join("ca.pem");
    let done = Command::new("openssl")
        .arg("ocsp")
        .arg("-index")
        .arg(&index)
        .arg("-rsigner")
        .arg(&ca)
        .arg("-rkey")
        .arg(certs.join("ca-key.pem"))
        .arg("-CA")
        .arg(&ca)
        .arg("-issuer")
        .arg(&ca)
        .arg("-cert")
        .arg(certs.join("server.pem"))
        .args(["-no_nonce", "-ndays", "2", "-respout"])
        .arg(certs.join("server.ocsp"))
        .output()
        .expect("run openssl ocsp");
    assert!(
        done.status.success(),
        "openssl ocsp failed: {}",
        String::from_utf8_lossy(&done.stderr)
    );
}

/// The block as a reader would complete it in `dir`, or `None` for a block that is no
/// configuration (policy test cases).
fn complete(block: &str, dir: &Path) -> Option<String> {
    let mut text = block.to_string();
    for (from, to) in [
        ("/etc/wraith/", "etc/"),
        ("/var/log/wraith/", "log/"),
        ("/var/lib/wraith/", "lib/"),
        ("/run/wraith/", "run/"),
    ] {
        text = text.replace(from, &format!("{}/{to}", dir.display()));
    }
    let first_table = text
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .unwrap_or("");
    if first_table == "[[case]]" {
        return None;
    }
    if first_table.starts_with("[listener.") {
        text.insert_str(
            0,
            "[[listener]]\nname = \"doc\"\naddress = \"127.0.0.1:0\"\nprotocol = \"https\"\n",
        );
    }
    // What the block defines, read without Wraith's own loader (which is what is tested).
    let doc: toml::Table = text.parse().unwrap_or_default();
    let tables = |key: &str| -> Vec<toml::Table> {
        doc.get(key)
            .and_then(|v| v.as_array())
            .map(|a| a.iter().filter_map(|v| v.as_table().cloned()).collect())
            .unwrap_or_default()
    };
    let mut extra = String::new();
    if !doc.contains_key("listener") {
        extra += "\n[[listener]]\nname = \"doc\"\naddress = \"127.0.0.1:0\"\nprotocol = \"http\"\n";
    }
    let mut upstreams: Vec<String> = tables("upstream")
        .iter()
        .filter_map(|u| u.get("name")?.as_str().map(String::from))
        .collect();
    for route in tables("route") {
        if let Some(name) = route.get("upstream").and_then(|u| u.as_str()) {
            if !upstreams.iter().any(|u| u == name) {
                upstreams.push(name.to_string());
                extra +=
                    &format!("\n[[upstream]]\nname = \"{name}\"\nendpoints = [\"127.0.0.1:9\"]\n");
            }
        }
    }
    let policy = doc.get("policy").and_then(|p| p.as_table());
    let policy_dir = dir.join(
        policy
            .and_then(|p| p.get("dir"))
            .and_then(|d| d.as_str())
            .unwrap_or("policies"),
    );
    let sets = policy
        .and_then(|p| p.get("set"))
        .and_then(|s| s.as_array())
        .cloned()
        .unwrap_or_default();
    for file in sets
        .iter()
        .filter_map(|s| s.get("files")?.as_array().cloned())
        .flatten()
    {
        let Some(file) = file.as_str() else { continue };
        let path = policy_dir.join(file);
        if !path.exists() {
            let id: String = file
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
                .collect();
            let policy = format!(
                "@id(\"doc-{id}\")\npermit (principal, action, resource == Wraith::Route::\"none\");\n"
            );
            std::fs::write(&path, policy).expect("write a policy file");
        }
    }
    Some(text + &extra)
}

#[test]
fn every_toml_example_in_the_docs_loads() {
    let mut checked = 0;
    let mut failures = Vec::new();
    for doc in documents() {
        let text = std::fs::read_to_string(&doc).expect("document is readable");
        let name = doc
            .strip_prefix(env!("CARGO_MANIFEST_DIR"))
            .unwrap_or(&doc)
            .display()
            .to_string();
        for (line, block) in toml_blocks(&text) {
            let dir = tempfile::tempdir().expect("temp dir");
            fixtures(dir.path());
            if block.contains("ocsp_response") {
                ocsp_fixture(dir.path());
            }
            let Some(config) = complete(&block, dir.path()) else {
                continue;
            };
            checked += 1;
            let file = dir.path().join("wraith.toml");
            if let Err(errors) = load_str(&file, &config, LoadOptions::default()) {
                let errors: Vec<String> = errors.0.iter().map(|e| e.to_string()).collect();
                failures.push(format!(
                    "{name}:{line}: the example does not load:\n  {}\n--- as completed:\n{config}",
                    errors.join("\n  ")
                ));
            }
        }
    }
    assert!(checked >= 10, "only {checked} toml examples found");
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn a_broken_example_is_caught() {
    // The check above is only worth something if a wrong key fails it.
    let dir = tempfile::tempdir().expect("temp dir");
    fixtures(dir.path());
    let block = "[listener.limits]\nmax_body = \"10MiB\"\n";
    let config = complete(block, dir.path()).expect("a configuration");
    let errors = load_str(
        &dir.path().join("wraith.toml"),
        &config,
        LoadOptions::default(),
    )
    .expect_err("an unknown key is an error");
    assert!(
        errors.0.iter().any(|e| e.to_string().contains("max_body")),
        "{errors:?}"
    );
}
