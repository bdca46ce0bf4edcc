//! Policy test cases for `wraith test`: every `[[case]]` in `<policy dir>/tests/*.toml` is a
//! request (who, method, URL, source IP, time, ...) routed through the real router and decided
//! by the real engine, then compared with the expected `allow`/`deny` and, optionally, the
//! policies expected to decide it. The report reads like a test runner's and ends with the
//! policies no case exercised.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use http::Method;
use serde::Deserialize;
use toml::Spanned;

use super::entities::parse_time;
use super::{Effect, PolicyEngine, Probe};
use crate::config::Config;
use crate::identity::{split_spiffe, Identity};
use crate::router::Router;

/// One test file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CaseFile {
    #[serde(default)]
    case: Vec<Spanned<Case>>,
}

/// `[[case]]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    #[serde(default)]
    method: Option<String>,
    /// `https://host/path?query`; or `host` and `path`.
    #[serde(default)]
    url: Option<String>,
    #[serde(default)]
    host: Option<String>,
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    source_ip: Option<String>,
    /// RFC 3339; default: now.
    #[serde(default)]
    time: Option<String>,
    #[serde(default)]
    protocol: Option<String>,
    #[serde(default)]
    listener: Option<String>,
    #[serde(default)]
    tls_version: Option<String>,
    #[serde(default)]
    tls_group: Option<String>,
    #[serde(default)]
    early_data: bool,
    /// Decide against this route instead of routing the request.
    #[serde(default)]
    route: Option<String>,
    /// Absent: an anonymous client.
    #[serde(default)]
    identity: Option<CaseIdentity>,
    expect: String,
    /// The policies expected to determine the decision (any order).
    #[serde(default)]
    policies: Option<Vec<String>>,
}

/// `[case.identity]`: fields of a certificate, or the certificate itself.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CaseIdentity {
    #[serde(default)]
    cert: Option<String>,
    #[serde(default)]
    spiffe_id: Option<String>,
    #[serde(default)]
    cn: Option<String>,
    #[serde(default)]
    o: Vec<String>,
    #[serde(default)]
    ou: Vec<String>,
    #[serde(default)]
    dns: Vec<String>,
    #[serde(default)]
    email: Vec<String>,
}

/// What running the cases found.
#[derive(Debug, Default)]
pub struct Report {
    pub passed: usize,
    pub failed: usize,
    /// Problems that stopped a file from running (parse errors), with file:line.
    pub errors: Vec<String>,
    /// The runner's output, ready to print.
    pub output: String,
    /// `@id`s of policies no case's decision was determined by.
    pub unexercised: Vec<String>,
}

/// The directory with the case files for a config.
pub fn tests_dir(config: &Config) -> Option<PathBuf> {
    config.policy.as_ref().map(|p| p.dir.join("tests"))
}

/// Runs every case file in the policy directory's `tests/`.
pub fn run(config: &Config, engine: &PolicyEngine, router: &Router) -> Report {
    let mut report = Report::default();
    let Some(dir) = tests_dir(config) else {
        return report;
    };
    let mut files: Vec<PathBuf> = match std::fs::read_dir(&dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect(),
        Err(_) => Vec::new(),
    };
    files.sort();
    let mut exercised = BTreeSet::new();
    for file in &files {
        run_file(config, engine, router, file, &mut report, &mut exercised);
    }
    if let Some(c) = engine.compiled() {
        report.unexercised = c
            .policies
            .iter()
            .filter(|p| !exercised.contains(p.id.as_str()))
            .map(|p| p.id.clone())
            .collect();
        let total = c.policies.len();
        let _ = writeln!(
            report.output,
            "\ncoverage: {} of {total} policies decided at least one case",
            total - report.unexercised.len()
        );
        for id in &report.unexercised {
            if let Some(info) = c.info(id) {
                let _ = writeln!(
                    report.output,
                    "  not exercised: {id} ({}:{})",
                    info.file.display(),
                    info.line
                );
            }
        }
    }
    if files.is_empty() {
        let _ = writeln!(report.output, "no policy test cases in {}", dir.display());
    }
    report
}

fn run_file(
    config: &Config,
    engine: &PolicyEngine,
    router: &Router,
    file: &Path,
    report: &mut Report,
    exercised: &mut BTreeSet<String>,
) {
    let text = match crate::files::read_to_string(file, crate::files::SMALL) {
        Ok(t) => t,
        Err(e) => {
            let msg = format!("{}: cannot read: {e}", file.display());
            let _ = writeln!(report.output, "error: {msg}");
            report.errors.push(msg);
            report.failed += 1;
            return;
        }
    };
    let parsed: CaseFile = match toml::from_str(&text) {
        Ok(c) => c,
        Err(e) => {
            let at = e
                .span()
                .map(|s| {
                    let (l, c) = super::load::line_col(&text, s.start);
                    format!(":{l}:{c}")
                })
                .unwrap_or_default();
            let msg = format!("{}{at}: {}", file.display(), e.message().trim());
            let _ = writeln!(report.output, "error: {msg}");
            report.errors.push(msg);
            report.failed += 1;
            return;
        }
    };
    let _ = writeln!(report.output, "{}", file.display());
    for case in &parsed.case {
        let (line, _) = super::load::line_col(&text, case.span().start);
        let case = case.get_ref();
        let outcome = run_case(config, engine, router, file, case);
        match outcome {
            Ok(result) => {
                exercised.extend(result.policies.iter().cloned());
                let policies_ok = case.policies.as_ref().is_none_or(|want| {
                    let want: BTreeSet<&str> = want.iter().map(String::as_str).collect();
                    let got: BTreeSet<&str> = result.policies.iter().map(String::as_str).collect();
                    want == got
                });
                let actual = match result.effect {
                    Effect::Allow => "allow",
                    Effect::Deny => "deny",
                };
                let decided_by = if result.policies.is_empty() {
                    result.reason.to_string()
                } else {
                    format!("{}: {}", result.reason, result.policies.join(", "))
                };
                if actual == case.expect && policies_ok {
                    report.passed += 1;
                    let _ = writeln!(
                        report.output,
                        "  ok    {} ({actual}, {decided_by})",
                        case.name
                    );
                } else {
                    report.failed += 1;
                    let _ = writeln!(
                        report.output,
                        "  FAIL  {} ({}:{line})",
                        case.name,
                        file.display()
                    );
                    let mut expected = case.expect.clone();
                    if let Some(p) = &case.policies {
                        let _ = write!(expected, " by [{}]", p.join(", "));
                    }
                    let _ = writeln!(report.output, "        expected: {expected}");
                    let _ = writeln!(
                        report.output,
                        "        actual:   {actual} ({decided_by}; route {}, set {})",
                        result.route, result.set
                    );
                }
            }
            Err(e) => {
                report.failed += 1;
                let _ = writeln!(
                    report.output,
                    "  FAIL  {} ({}:{line})\n        {e}",
                    case.name,
                    file.display()
                );
            }
        }
    }
}

/// What one case got.
struct CaseResult {
    effect: Effect,
    reason: &'static str,
    policies: Vec<String>,
    route: String,
    set: String,
}

fn run_case(
    config: &Config,
    engine: &PolicyEngine,
    router: &Router,
    file: &Path,
    case: &Case,
) -> Result<CaseResult, String> {
    if case.expect != "allow" && case.expect != "deny" {
        return Err(format!(
            "expect = {:?}: use \"allow\" or \"deny\"",
            case.expect
        ));
    }
    let request = CaseRequest::from_case(case)?;
    let identity = match &case.identity {
        Some(i) => Some(case_identity(i, file)?),
        None => None,
    };
    let method = request.method.clone();
    let route = match &case.route {
        Some(name) => router
            .routes()
            .iter()
            .find(|r| &*r.config.name == name.as_str())
            .ok_or_else(|| format!("route = {name:?}: no such route"))?,
        None => router
            .find(Some(&request.host), &request.path, &method)
            .ok_or_else(|| {
                format!(
                    "no route matches {} {}{} (set route = \"...\" to test a route directly)",
                    method, request.host, request.path
                )
            })?,
    };
    let listener = match &case.listener {
        Some(l) => l.clone(),
        None => config
            .listeners
            .iter()
            .find(|l| l.tls.is_some() == request.https)
            .map_or_else(String::new, |l| l.name.to_string()),
    };
    let protocol = match case.protocol.as_deref() {
        None if request.https => "h2",
        None | Some("h1") => "h1",
        Some("h2") => "h2",
        Some("h3") => "h3",
        Some(other) => {
            return Err(format!(
                "protocol = {other:?}: use \"h1\", \"h2\" or \"h3\""
            ))
        }
    };
    let default_tls = |v: &'static str| if request.https { v } else { "" };
    let explanation = engine.probe(&Probe {
        route: route.index,
        identity: identity.as_ref(),
        method,
        host: &request.host,
        path: &request.path,
        query: &request.query,
        source_ip: request.source_ip,
        listener: &listener,
        protocol,
        tls_version: case
            .tls_version
            .as_deref()
            .unwrap_or(default_tls("TLSv1.3")),
        tls_group: case
            .tls_group
            .as_deref()
            .unwrap_or(default_tls("X25519MLKEM768")),
        early_data: case.early_data,
        time: request.time,
    })?;
    let d = explanation.decision;
    Ok(CaseResult {
        effect: d.effect,
        reason: d.reason.as_str(),
        policies: d.policies.iter().map(|p| p.to_string()).collect(),
        route: route.config.name.to_string(),
        set: d.set.to_string(),
    })
}

/// The request part of a case, parsed.
pub struct CaseRequest {
    pub method: Method,
    pub https: bool,
    pub host: String,
    pub path: String,
    pub query: String,
    pub source_ip: IpAddr,
    pub time: SystemTime,
}

impl CaseRequest {
    fn from_case(case: &Case) -> Result<CaseRequest, String> {
        let method = parse_method(case.method.as_deref().unwrap_or("GET"))?;
        let (https, host, path, query) = match &case.url {
            Some(url) => parse_url(url)?,
            None => {
                let path = case
                    .path
                    .clone()
                    .ok_or("give url = \"https://host/path\" or host and path")?;
                (
                    true,
                    judged_host(case.host.as_deref().unwrap_or_default()),
                    judged_path(&path),
                    String::new(),
                )
            }
        };
        let source_ip = match &case.source_ip {
            Some(ip) => parse_ip(ip)?,
            None => IpAddr::from([127, 0, 0, 1]),
        };
        let time = match &case.time {
            Some(t) => parse_time(t)?,
            None => SystemTime::now(),
        };
        Ok(CaseRequest {
            method,
            https,
            host,
            path,
            query,
            source_ip,
            time,
        })
    }
}

/// A method name as the pipeline would see it.
pub fn parse_method(m: &str) -> Result<Method, String> {
    Method::from_bytes(m.to_ascii_uppercase().as_bytes())
        .map_err(|_| format!("invalid method {m:?}"))
}

/// An IP address (`10.1.2.3`, `2001:db8::1`).
pub fn parse_ip(ip: &str) -> Result<IpAddr, String> {
    ip.parse::<IpAddr>()
        .map(crate::proxy::headers::canonical)
        .map_err(|_| format!("invalid IP address {ip:?}"))
}

/// `https://host[:port]/path?query` -> (https, host lowercase without port, normalized path,
/// query).
pub fn parse_url(url: &str) -> Result<(bool, String, String, String), String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("invalid URL {url:?}: {e}"))?;
    let https = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err(format!("URL {url:?} must start with https:// or http://")),
    };
    let host = uri
        .authority()
        .map(|a| judged_host(a.as_str()))
        .unwrap_or_default();
    let raw_path = if uri.path().is_empty() {
        "/"
    } else {
        uri.path()
    };
    Ok((
        https,
        host,
        judged_path(raw_path),
        uri.query().unwrap_or("").to_string(),
    ))
}

/// A test case's host as the pipeline gives it to policies: no port, no trailing dot,
/// lowercase.
fn judged_host(host: &str) -> String {
    let name = crate::proxy::headers::strip_port(host);
    name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase()
}

/// A test case's path as the pipeline gives it to policies: normalized, without segment
/// parameters (`proxy::path`).
fn judged_path(raw: &str) -> String {
    let normal = crate::proxy::path::normalize(raw).unwrap_or_else(|| raw.to_string());
    crate::proxy::path::without_params(&normal).into_owned()
}

fn case_identity(i: &CaseIdentity, file: &Path) -> Result<Identity, String> {
    if let Some(cert) = &i.cert {
        let path = file.parent().unwrap_or(Path::new(".")).join(cert);
        return identity_from_pem(&path);
    }
    let mut id = Identity {
        common_name: i.cn.clone(),
        organizations: i.o.clone(),
        organizational_units: i.ou.clone(),
        dns: i.dns.clone(),
        emails: i.email.clone(),
        ..Identity::default()
    };
    if let Some(s) = &i.spiffe_id {
        let (domain, path) =
            split_spiffe(s).map_err(|e| format!("identity.spiffe_id {s:?}: {e}"))?;
        id.trust_domain = Some(domain.to_string());
        id.spiffe_path = Some(path.to_string());
        id.spiffe_id = Some(s.clone());
    }
    if id.spiffe_id.is_none() && id.common_name.is_none() {
        return Err("[case.identity] needs spiffe_id, cn or cert".into());
    }
    Ok(id)
}

/// The identity of the first certificate in a PEM file.
pub fn identity_from_pem(path: &Path) -> Result<Identity, String> {
    let certs = crate::listener::tls::load_certs(path)?;
    let leaf = certs
        .first()
        .ok_or_else(|| format!("{}: no certificate", path.display()))?;
    Identity::from_der(leaf).map(|(id, _)| id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_cases_see_host_and_path_as_live_requests_do() {
        let (https, host, path, query) =
            parse_url("https://Admin.Example.COM.:8443/api/./admin;x/users?y=1").unwrap();
        assert!(https);
        assert_eq!(host, "admin.example.com");
        assert_eq!(path, "/api/admin/users");
        assert_eq!(query, "y=1");
        assert_eq!(judged_host("API.example.com."), "api.example.com");
        assert_eq!(judged_path("/a/../b;v=1/c"), "/b/c");
    }
}
