//! The CrowdSec LAPI bridge, in stream mode: a background task pulls
//! `GET /v1/decisions/stream?startup=true` (a full snapshot that replaces the CrowdSec
//! partition of the store), then polls `GET /v1/decisions/stream` for deltas every
//! `update_frequency`, and takes a fresh full snapshot every `resync_interval` and after any
//! error. The request path only reads the store: it never waits on the LAPI.
//!
//! Tolerated on the wire (see the notes on LAPI versions): `null`, `[]` or a missing key for
//! empty lists; Go durations with `ns`/`µs` and negative values; the same deleted decision on
//! several polls; unknown fields. `on_error = "closed"` makes the store refuse every request
//! while the last successful pull is older than `max_staleness` (and before the first one).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use super::store::{now_ms, DecisionStore};
use super::{godur, parse_value, valid_kind, Decision, Key, Scope, Source};
use crate::config::{CrowdsecConfig, OnError};

/// `wraith/<version>`: LAPI splits it on `/` into the bouncer's type and version.
pub fn user_agent() -> String {
    format!("wraith/{}", env!("CARGO_PKG_VERSION"))
}

/// One decision as the LAPI sends it (fields Wraith does not use are ignored).
#[derive(Debug, Deserialize)]
pub struct LapiDecision {
    #[serde(default)]
    pub duration: Option<String>,
    #[serde(default)]
    pub origin: Option<String>,
    pub scope: String,
    pub value: String,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub scenario: Option<String>,
    #[serde(default)]
    pub simulated: Option<bool>,
}

/// A stream response: either list may be `null`, `[]` or absent.
#[derive(Debug, Default, Deserialize)]
pub struct StreamResponse {
    #[serde(default)]
    pub new: Option<Vec<LapiDecision>>,
    #[serde(default)]
    pub deleted: Option<Vec<LapiDecision>>,
}

/// Why a LAPI decision was not taken.
#[derive(Debug, PartialEq, Eq)]
pub enum Skip {
    /// A scope Wraith does not enforce (`Country`, `AS`, `Username`, ...).
    Scope,
    /// Filtered out by `origins`.
    Origin,
    /// Simulated decisions are never enforced.
    Simulated,
    /// Already expired (zero or negative duration).
    Expired,
    /// A value, type or duration that does not parse.
    Invalid(String),
}

/// Converts the `new` entries of a stream response; returns the decisions and the count
/// skipped by reason (for the log).
pub fn convert_new(
    list: Vec<LapiDecision>,
    origins: Option<&[String]>,
    now_ms: u64,
) -> (Vec<Decision>, Vec<Skip>) {
    let mut out = Vec::with_capacity(list.len());
    let mut skipped = Vec::new();
    for d in list {
        match convert_one(d, origins, now_ms) {
            Ok(dec) => out.push(dec),
            Err(s) => skipped.push(s),
        }
    }
    (out, skipped)
}

fn origin_of(d: &LapiDecision) -> &str {
    d.origin
        .as_deref()
        .filter(|o| !o.is_empty())
        .unwrap_or("crowdsec")
}

fn convert_one(d: LapiDecision, origins: Option<&[String]>, now_ms: u64) -> Result<Decision, Skip> {
    let scope = Scope::parse(&d.scope).ok_or(Skip::Scope)?;
    let origin = origin_of(&d);
    if origins.is_some_and(|o| !o.iter().any(|x| x.eq_ignore_ascii_case(origin))) {
        return Err(Skip::Origin);
    }
    if d.simulated == Some(true) {
        return Err(Skip::Simulated);
    }
    let value = parse_value(scope, &d.value).map_err(Skip::Invalid)?;
    if !valid_kind(&d.kind) {
        return Err(Skip::Invalid(format!("invalid decision type {:?}", d.kind)));
    }
    let ms = match &d.duration {
        Some(s) => godur::parse_millis(s).map_err(Skip::Invalid)?,
        None => return Err(Skip::Invalid("decision without a duration".into())),
    };
    if ms <= 0 {
        return Err(Skip::Expired);
    }
    Ok(Decision {
        source: Source::Crowdsec,
        origin: Arc::from(origin),
        scope,
        value,
        kind: Arc::from(d.kind.as_str()),
        until_ms: now_ms.saturating_add(ms as u64),
        reason: d.scenario.unwrap_or_default(),
    })
}

/// The keys of the `deleted` entries (their durations are negative and ignored).
pub fn convert_deleted(list: Vec<LapiDecision>) -> Vec<Key> {
    list.into_iter()
        .filter_map(|d| {
            let scope = Scope::parse(&d.scope)?;
            let value = parse_value(scope, &d.value).ok()?;
            Some(Key {
                origin: Arc::from(origin_of(&d)),
                scope,
                value,
                kind: Arc::from(d.kind.as_str()),
            })
        })
        .collect()
}

/// What the bridge reports about itself (for `wraith status` and the admin API).
#[derive(Debug, Default)]
pub struct BridgeStatus {
    /// Milliseconds since the epoch of the last successful pull (0: never).
    pub last_success_ms: AtomicU64,
    /// Successful pulls so far.
    pub pulls: AtomicU64,
    /// Failed pulls so far.
    pub failures: AtomicU64,
    /// The last error, cleared on success.
    pub last_error: Mutex<Option<String>>,
}

/// A running bridge: cancel to stop it.
pub struct Bridge {
    /// The settings it runs with (a reload with other settings restarts it).
    pub config: CrowdsecConfig,
    pub status: Arc<BridgeStatus>,
    stop: CancellationToken,
}

impl Bridge {
    /// Stops the polling task.
    pub fn stop(&self) {
        self.stop.cancel();
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Builds the LAPI HTTP client: rustls with aws-lc-rs, the configured CA (or the system
/// roots) and the optional client certificate for mTLS.
pub fn http_client(config: &CrowdsecConfig) -> Result<reqwest::Client, String> {
    let tls = tls_config(config.ca_cert.as_deref(), config.client_cert.as_ref())?;
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .user_agent(user_agent())
        .timeout(config.timeout)
        .connect_timeout(config.timeout.min(Duration::from_secs(5)))
        .build()
        .map_err(|e| format!("crowdsec: cannot build the HTTP client: {e}"))
}

/// A rustls client config for talking to CrowdSec.
pub fn tls_config(
    ca: Option<&std::path::Path>,
    client: Option<&(std::path::PathBuf, std::path::PathBuf)>,
) -> Result<rustls::ClientConfig, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| format!("crowdsec.ca_cert {}: {e}", path.display()))?;
            for c in certs {
                let c = c.map_err(|e| format!("crowdsec.ca_cert {}: {e}", path.display()))?;
                roots
                    .add(c)
                    .map_err(|e| format!("crowdsec.ca_cert {}: {e}", path.display()))?;
            }
        }
        None => {
            for c in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(c);
            }
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("crowdsec TLS: {e}"))?
        .with_root_certificates(roots);
    let config = match client {
        Some((cert, key)) => {
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
                .and_then(|it| it.collect::<Result<_, _>>())
                .map_err(|e| format!("crowdsec.client_cert {}: {e}", cert.display()))?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| format!("crowdsec.client_key {}: {e}", key.display()))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("crowdsec client certificate: {e}"))?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(config)
}

/// Starts the bridge task for `config`, feeding `store`.
pub fn spawn(
    config: CrowdsecConfig,
    store: Arc<DecisionStore>,
    shutdown: &CancellationToken,
) -> Result<Bridge, String> {
    let client = http_client(&config)?;
    let stop = shutdown.child_token();
    let status = Arc::new(BridgeStatus::default());
    if config.on_error == OnError::Closed {
        // Closed means closed until the LAPI has answered once.
        store.set_refuse_all(true);
    }
    tokio::spawn(run(
        config.clone(),
        client,
        store,
        status.clone(),
        stop.clone(),
    ));
    Ok(Bridge {
        config,
        status,
        stop,
    })
}

async fn run(
    config: CrowdsecConfig,
    client: reqwest::Client,
    store: Arc<DecisionStore>,
    status: Arc<BridgeStatus>,
    stop: CancellationToken,
) {
    let mut last_ok: Option<Instant> = None;
    let mut last_full: Option<Instant> = None;
    let mut failing = false;
    let mut stale_reported = false;
    tracing::info!(lapi = %config.lapi_url, every = ?config.update_frequency, "crowdsec bridge started");
    loop {
        let full = last_full.is_none_or(|t| t.elapsed() >= config.resync_interval);
        let result = tokio::select! {
            r = pull(&client, &config, full) => r,
            _ = stop.cancelled() => break,
        };
        match result {
            Ok(resp) => {
                let (added, removed, skipped) = apply(&store, &config, resp, full);
                last_ok = Some(Instant::now());
                if full {
                    last_full = last_ok;
                }
                status.last_success_ms.store(now_ms(), Ordering::Relaxed);
                status.pulls.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut e) = status.last_error.lock() {
                    *e = None;
                }
                if failing || stale_reported {
                    tracing::info!(lapi = %config.lapi_url, "crowdsec LAPI reachable again");
                }
                failing = false;
                stale_reported = false;
                if full || added > 0 || removed > 0 {
                    tracing::info!(full, added, removed, skipped, "crowdsec decisions updated");
                }
            }
            Err(e) => {
                status.failures.fetch_add(1, Ordering::Relaxed);
                if !failing {
                    tracing::warn!(lapi = %config.lapi_url, error = %e, "crowdsec LAPI pull failed; keeping the decisions already known");
                }
                if let Ok(mut le) = status.last_error.lock() {
                    *le = Some(e);
                }
                failing = true;
                // The LAPI may have lost its state (restart, new DB): start over with a
                // snapshot once it is back.
                last_full = None;
            }
        }
        let stale = last_ok.is_none_or(|t| t.elapsed() > config.max_staleness);
        match config.on_error {
            OnError::Closed => store.set_refuse_all(stale),
            OnError::Open => {}
        }
        if stale && !stale_reported && last_ok.is_some() {
            stale_reported = true;
            match config.on_error {
                OnError::Closed => {
                    tracing::error!(max_staleness = ?config.max_staleness, "crowdsec decisions are stale; on_error = \"closed\": refusing requests until the LAPI answers")
                }
                OnError::Open => {
                    tracing::warn!(max_staleness = ?config.max_staleness, "crowdsec decisions are stale; on_error = \"open\": serving with the decisions already known")
                }
            }
        }
        // The next pull (a snapshot again if this one failed).
        tokio::select! {
            _ = tokio::time::sleep(config.update_frequency) => {}
            _ = stop.cancelled() => break,
        }
    }
    tracing::info!("crowdsec bridge stopped");
}

/// One request to the stream endpoint.
async fn pull(
    client: &reqwest::Client,
    config: &CrowdsecConfig,
    full: bool,
) -> Result<StreamResponse, String> {
    let scopes: Vec<&str> = config
        .scopes
        .iter()
        .map(|s| match s {
            Scope::Ip => "ip",
            Scope::Range => "range",
        })
        .collect();
    let url = format!(
        "{}/v1/decisions/stream?startup={full}&scopes={}",
        config.lapi_url,
        scopes.join(",")
    );
    let mut req = client.get(&url);
    if let Some(key) = &config.api_key {
        req = req.header("X-Api-Key", &key.0);
    }
    let mut resp = req.send().await.map_err(|e| describe(&e))?;
    let status = resp.status();
    // Read in pieces up to a ceiling: a broken or hostile LAPI cannot make us buffer without
    // bound (a million decisions is ~250 MiB of JSON; the community blocklist is far less).
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| describe(&e))? {
        if body.len() + chunk.len() > MAX_STREAM_BODY {
            return Err(format!(
                "LAPI answer larger than {} MiB: refused (the cache keeps its last good state)",
                MAX_STREAM_BODY >> 20
            ));
        }
        body.extend_from_slice(&chunk);
    }
    if status == reqwest::StatusCode::FORBIDDEN || status == reqwest::StatusCode::UNAUTHORIZED {
        return Err(format!(
            "LAPI refused our credentials ({status}): check the bouncer API key (cscli bouncers list)"
        ));
    }
    if !status.is_success() {
        let text = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
        return Err(format!("LAPI answered {status}: {text}"));
    }
    parse_stream(&body)
}

/// The largest stream answer accepted from the LAPI.
const MAX_STREAM_BODY: usize = 256 << 20;

/// Parses a stream body; `null` as the whole body counts as empty too.
pub fn parse_stream(body: &[u8]) -> Result<StreamResponse, String> {
    let parsed: Option<StreamResponse> = serde_json::from_slice(body)
        .map_err(|e| format!("LAPI sent an unreadable stream response: {e}"))?;
    Ok(parsed.unwrap_or_default())
}

fn describe(e: &reqwest::Error) -> String {
    use std::error::Error;
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

/// Applies a response to the store; returns (added, removed, skipped).
fn apply(
    store: &DecisionStore,
    config: &CrowdsecConfig,
    resp: StreamResponse,
    full: bool,
) -> (usize, usize, usize) {
    let now = now_ms();
    let (new, skipped) = convert_new(resp.new.unwrap_or_default(), config.origins.as_deref(), now);
    for s in skipped
        .iter()
        .filter(|s| matches!(s, Skip::Invalid(_)))
        .take(3)
    {
        tracing::warn!(reason = ?s, "crowdsec decision ignored");
    }
    if full {
        // A snapshot's `deleted` lists expired decisions still in the LAPI database:
        // nothing to remove from a cache being replaced.
        let added = new.len();
        store.replace_crowdsec(new);
        return (added, 0, skipped.len());
    }
    let deleted = convert_deleted(resp.deleted.unwrap_or_default());
    let (removed, added) = store.apply_crowdsec_delta(&deleted, new);
    (added, removed, skipped.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_146_and_178_shapes() {
        let v146 = br#"{"deleted":null,"new":[
 {"duration":"59m59.16866418s","id":1,"origin":"cscli","scenario":"wraith-test","scope":"Ip","type":"ban","value":"1.2.3.4"},
 {"duration":"29m59.168665082s","id":2,"origin":"cscli","scenario":"wraith-range","scope":"Range","type":"captcha","value":"10.20.0.0/16"},
 {"duration":"1m29.168667657s","id":5,"origin":"cscli","scenario":"manual","scope":"Ip","type":"ban","value":"2001:db8::1"},
 {"duration":"2h","id":6,"origin":"cscli","scenario":"geo","scope":"Country","type":"ban","value":"FR"}]}"#;
        let r = parse_stream(v146).unwrap();
        let (new, skipped) = convert_new(r.new.unwrap(), None, 1_000);
        assert_eq!(new.len(), 3);
        assert_eq!(skipped, vec![Skip::Scope]);
        assert_eq!(new[0].until_ms, 1_000 + 3_599_168);
        assert_eq!(new[1].scope, Scope::Range);
        assert_eq!(&*new[1].kind, "captcha");
        assert!(r.deleted.is_none());

        let empty_178 = br#"{"new": [], "deleted": []}"#;
        let r = parse_stream(empty_178).unwrap();
        assert!(r.new.unwrap().is_empty());
        let r = parse_stream(br#"{"deleted":null,"new":null}"#).unwrap();
        assert!(r.new.is_none() && r.deleted.is_none());
        let r = parse_stream(b"{}").unwrap();
        assert!(r.new.is_none());
        let r = parse_stream(b"null").unwrap();
        assert!(r.new.is_none());
        assert!(parse_stream(b"<html>").is_err());
    }

    #[test]
    fn deleted_entries_with_negative_durations_become_keys() {
        let body = br#"{"new":null,"deleted":[
 {"duration":"-143.605213ms","origin":"cscli","scope":"Ip","type":"ban","value":"1.2.3.4","uuid":"x"},
 {"duration":"-25422h25m44.086361839s","origin":"crowdsec","scope":"Range","type":"ban","value":"2001:db8::/32"}]}"#;
        let r = parse_stream(body).unwrap();
        let keys = convert_deleted(r.deleted.unwrap());
        assert_eq!(keys.len(), 2);
        assert_eq!(&*keys[0].origin, "cscli");
        assert_eq!(
            keys[1].value,
            "2001:db8::/32".parse::<ipnet::IpNet>().unwrap()
        );
    }

    #[test]
    fn origin_filter_simulated_and_expired() {
        let list = vec![
            LapiDecision {
                duration: Some("1h".into()),
                origin: Some("CAPI".into()),
                scope: "Ip".into(),
                value: "192.0.2.1".into(),
                kind: "ban".into(),
                scenario: None,
                simulated: None,
            },
            LapiDecision {
                duration: Some("1h".into()),
                origin: Some("crowdsec".into()),
                scope: "ip".into(),
                value: "192.0.2.2".into(),
                kind: "ban".into(),
                scenario: None,
                simulated: Some(true),
            },
            LapiDecision {
                duration: Some("-1s".into()),
                origin: Some("crowdsec".into()),
                scope: "ip".into(),
                value: "192.0.2.3".into(),
                kind: "ban".into(),
                scenario: None,
                simulated: None,
            },
            LapiDecision {
                duration: Some("1h".into()),
                origin: Some("crowdsec".into()),
                scope: "ip".into(),
                value: "not-an-ip".into(),
                kind: "ban".into(),
                scenario: None,
                simulated: None,
            },
        ];
        let origins = vec!["crowdsec".to_string(), "cscli".to_string()];
        let (new, skipped) = convert_new(list, Some(&origins), 0);
        assert!(new.is_empty());
        assert_eq!(skipped[0], Skip::Origin);
        assert_eq!(skipped[1], Skip::Simulated);
        assert_eq!(skipped[2], Skip::Expired);
        assert!(matches!(skipped[3], Skip::Invalid(_)));
    }

    #[test]
    fn user_agent_has_exactly_one_slash() {
        assert_eq!(user_agent().matches('/').count(), 1);
        assert!(user_agent().starts_with("wraith/"));
    }
}
