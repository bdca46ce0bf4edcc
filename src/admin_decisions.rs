//! The decisions endpoints of the admin API (dispatched from `admin`):
//!
//! - `GET /v1/decisions` lists live decisions; filters: `ip` (decisions containing this
//!   address), `value` (exactly this address or range), `origin` (one without a `:` also
//!   selects its family: `wazuh` selects `wazuh:wraith-ban`), `type`, `source`
//!   (`local` | `crowdsec`).
//! - `POST /v1/decisions` adds a local decision. Body: `{"ip": "192.0.2.1"}` or
//!   `{"cidr": "192.0.2.0/24"}` (or `"value"` with either), optional `"type"` (default
//!   `ban`), `"duration"` (default `4h`; `90s`, `30m`, `1d`, ...; at most a year), `"reason"`,
//!   `"origin"` (default `admin`). Adding the same (origin, scope, value, type) again replaces
//!   it (a new expiry). A JSON array of such objects adds them all at once (bulk load;
//!   the whole array is refused if one entry is bad); the answer is `{"added": n}`.
//! - `DELETE /v1/decisions/<ip-or-cidr>` lifts local decisions on exactly that value;
//!   `origin` and `type` narrow it. CrowdSec decisions belong to the LAPI and are never
//!   removed here (use `cscli decisions delete`).
//!
//! Every change to local decisions is written to the state file at once.

use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::decisions::store::{now_ms, to_wall_ms, Filter};
use crate::decisions::{parse_value, valid_kind, Decision, Scope, Source};
use crate::runtime::Runtime;

/// The longest a local decision may last.
const MAX_DURATION: Duration = Duration::from_secs(366 * 86_400);

/// A 400 with a message.
fn bad(msg: impl Into<String>) -> (StatusCode, Value) {
    (StatusCode::BAD_REQUEST, json!({"error": msg.into()}))
}

pub(crate) async fn handle(rt: &Arc<Runtime>, req: Request<Incoming>) -> (StatusCode, Value) {
    let path = req.uri().path().to_string();
    let query = parse_query(req.uri().query().unwrap_or(""));
    let query = match query {
        Ok(q) => q,
        Err(e) => return bad(e),
    };
    match (req.method().clone(), path.as_str()) {
        (Method::GET, "/v1/decisions") => {
            // A scan and a sort over up to a million decisions, and their JSON: off the
            // async workers, which serve requests.
            let rt = rt.clone();
            match tokio::task::spawn_blocking(move || list(&rt, &query)).await {
                Ok(answer) => answer,
                Err(_) => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    json!({"error": "listing the decisions failed"}),
                ),
            }
        }
        (Method::POST, "/v1/decisions") => {
            let body = match Limited::new(req.into_body(), 64 << 20).collect().await {
                Ok(b) => b.to_bytes(),
                Err(_) => return bad("request body missing, unreadable or over 64MiB"),
            };
            add(rt, &body).await
        }
        (Method::DELETE, p) if p.starts_with("/v1/decisions/") => {
            let raw = &p["/v1/decisions/".len()..];
            match percent_decode(raw) {
                Ok(value) => delete(rt, &value, &query).await,
                Err(e) => bad(e),
            }
        }
        (Method::DELETE, "/v1/decisions") => match query.iter().find(|(k, _)| k == "value") {
            Some((_, v)) => {
                let v = v.clone();
                delete(rt, &v, &query).await
            }
            None => {
                bad("DELETE needs the value: /v1/decisions/<ip-or-cidr> or ?value=<ip-or-cidr>")
            }
        },
        (_, "/v1/decisions") => (
            StatusCode::METHOD_NOT_ALLOWED,
            json!({"error": "use GET, POST or DELETE on /v1/decisions"}),
        ),
        _ => (
            StatusCode::METHOD_NOT_ALLOWED,
            json!({"error": "use DELETE on /v1/decisions/<ip-or-cidr>"}),
        ),
    }
}

fn list(rt: &Runtime, query: &[(String, String)]) -> (StatusCode, Value) {
    let mut filter = Filter::default();
    let mut limit = usize::MAX;
    for (k, v) in query {
        match k.as_str() {
            "limit" => match v.parse::<usize>() {
                Ok(n) => limit = n,
                Err(_) => return bad(format!("limit={v:?} is not a number")),
            },
            "ip" => match v.parse::<std::net::IpAddr>() {
                Ok(ip) => filter.contains = Some(ip),
                Err(_) => return bad(format!("ip={v:?} is not an IP address")),
            },
            "value" => match value_of(v) {
                Ok((_, net)) => filter.value = Some(net),
                Err(e) => return bad(e),
            },
            "origin" => filter.origin = Some(v.clone()),
            "type" => filter.kind = Some(v.clone()),
            "source" => {
                filter.source = Some(match v.as_str() {
                    "local" => Source::Local,
                    "crowdsec" => Source::Crowdsec,
                    _ => return bad(format!("source={v:?}: expected local or crowdsec")),
                })
            }
            other => {
                return bad(format!(
                    "unknown filter {other:?} (expected ip, value, origin, type, source or limit)"
                ))
            }
        }
    }
    let now = now_ms();
    let all = rt.gateway.decisions.list(&filter);
    // `count` is every match; `decisions` the first `limit` of them.
    let decisions: Vec<Value> = all.iter().take(limit).map(|d| to_json(d, now)).collect();
    (
        StatusCode::OK,
        json!({
            "count": all.len(),
            "truncated": decisions.len() < all.len(),
            "decisions": decisions,
        }),
    )
}

/// A decision as the API shows it.
pub fn to_json(d: &Decision, now_ms: u64) -> Value {
    let wall = to_wall_ms(d.until_ms);
    let until = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(wall) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        });
    json!({
        "source": d.source.to_string(),
        "origin": &*d.origin,
        "scope": d.scope.as_str(),
        "value": d.value.to_string(),
        "type": &*d.kind,
        "until": until,
        "expires_in_secs": d.until_ms.saturating_sub(now_ms) / 1000,
        "reason": d.reason,
    })
}

/// The body of `POST /v1/decisions`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewDecision {
    ip: Option<String>,
    cidr: Option<String>,
    value: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    duration: Option<String>,
    reason: Option<String>,
    origin: Option<String>,
}

/// `192.0.2.1` -> (Ip, /32); `192.0.2.0/24` -> (Range, /24).
fn value_of(s: &str) -> Result<(Scope, ipnet::IpNet), String> {
    if s.contains('/') {
        parse_value(Scope::Range, s).map(|n| (Scope::Range, n))
    } else {
        parse_value(Scope::Ip, s).map(|n| (Scope::Ip, n))
    }
}

/// Builds the decision a POST asks for, or says exactly what is wrong with it.
fn new_decision(body: &[u8]) -> Result<Decision, String> {
    let req: NewDecision = serde_json::from_slice(body).map_err(|e| {
        format!(
            "body must be a JSON object like {{\"ip\": \"192.0.2.1\", \"duration\": \"4h\"}}: {e}"
        )
    })?;
    build(req)
}

/// A JSON array of decisions (bulk load: one table rebuild for all of them).
/// The decisions of a JSON array, each checked as it is read, and at most `cap` of them: a
/// large array is never held twice (its requests, then its decisions), and one longer than
/// `max_local` allows is refused as soon as that is known. Read into a `Vec` of requests
/// first, a 64 MiB array took about 1 GB.
fn new_decisions(body: &[u8], cap: usize) -> Result<Vec<Decision>, (StatusCode, String)> {
    use serde::de::{Deserializer, Error, SeqAccess, Visitor};
    struct Checked<'a>(usize, &'a std::cell::Cell<bool>);
    impl<'de> Visitor<'de> for Checked<'_> {
        type Value = Vec<Decision>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON array of decision objects")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<Decision>, A::Error> {
            let mut out = Vec::new();
            while let Some(r) = seq.next_element::<NewDecision>()? {
                if out.len() == self.0 {
                    self.1.set(true);
                    return Err(A::Error::custom(format!(
                        "more than {} decisions ([decisions] max_local)",
                        self.0
                    )));
                }
                let i = out.len();
                out.push(build(r).map_err(|e| A::Error::custom(format!("decision {i}: {e}")))?);
            }
            Ok(out)
        }
    }
    let over = std::cell::Cell::new(false);
    let mut de = serde_json::Deserializer::from_slice(body);
    de.deserialize_seq(Checked(cap, &over))
        .and_then(|all| de.end().map(|()| all))
        .map_err(|e| {
            let status = if over.get() {
                StatusCode::INSUFFICIENT_STORAGE
            } else {
                StatusCode::BAD_REQUEST
            };
            (
                status,
                format!("body must be a JSON array of decision objects: {e}"),
            )
        })
}

/// Checks one requested decision.
fn build(req: NewDecision) -> Result<Decision, String> {
    let (scope, value) = match (&req.ip, &req.cidr, &req.value) {
        (Some(ip), None, None) => (Scope::Ip, parse_value(Scope::Ip, ip)?),
        (None, Some(c), None) => (Scope::Range, parse_value(Scope::Range, c)?),
        (None, None, Some(v)) => value_of(v)?,
        (None, None, None) => return Err("give the address: \"ip\", \"cidr\" or \"value\"".into()),
        _ => return Err("give only one of \"ip\", \"cidr\" and \"value\"".into()),
    };
    let kind = req.kind.unwrap_or_else(|| "ban".into());
    if !valid_kind(&kind) {
        return Err(format!(
            "type {kind:?} is not valid (a word such as \"ban\" or \"captcha\")"
        ));
    }
    let origin = req.origin.unwrap_or_else(|| "admin".into());
    if !valid_kind(&origin) {
        return Err(format!(
            "origin {origin:?} is not valid (letters, digits, '-', '_', '.', ':')"
        ));
    }
    let duration = match &req.duration {
        None => Duration::from_secs(4 * 3600),
        Some(s) => crate::config::units::parse_duration(s).map_err(|e| format!("duration: {e}"))?,
    };
    if duration.is_zero() {
        return Err("duration must be more than zero".into());
    }
    if duration > MAX_DURATION {
        return Err("duration is longer than a year".into());
    }
    let reason = req.reason.unwrap_or_default();
    if reason.len() > 1024 {
        return Err("reason is longer than 1024 bytes".into());
    }
    Ok(Decision {
        source: Source::Local,
        origin: Arc::from(origin),
        scope,
        value,
        kind: Arc::from(kind),
        until_ms: now_ms() + duration.as_millis() as u64,
        reason: reason.into(),
    })
}

/// `[decisions] max_local` of the running configuration.
fn max_local(rt: &Runtime) -> usize {
    rt.gateway.snapshot().config.decisions.max_local
}

/// Adds local decisions within `max_local`. The store rebuilds its lookup table over every
/// decision (up to a million CrowdSec ones): off the async workers, as the CrowdSec bridge
/// and the expiry janitor do. The outer error: the task did not finish.
async fn insert_local(
    rt: &Arc<Runtime>,
    decisions: Vec<Decision>,
) -> Result<Result<(), String>, tokio::task::JoinError> {
    let (store, cap) = (rt.gateway.decisions.clone(), max_local(rt));
    tokio::task::spawn_blocking(move || store.insert_local(decisions, cap)).await
}

/// A 500 for a blocking task that did not finish (it panicked).
fn internal(e: tokio::task::JoinError) -> (StatusCode, Value) {
    tracing::error!(error = %e, "decisions: a store update failed");
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        json!({"error": format!("the store update failed: {e}")}),
    )
}

async fn add(rt: &Arc<Runtime>, body: &[u8]) -> (StatusCode, Value) {
    if body.trim_ascii_start().starts_with(b"[") {
        // Parsed off the async workers: an array of millions takes a while.
        let (owned, cap) = (body.to_vec(), max_local(rt));
        let all = match tokio::task::spawn_blocking(move || new_decisions(&owned, cap)).await {
            Ok(Ok(all)) => all,
            Ok(Err((status, e))) => return (status, json!({"error": e})),
            Err(e) => return internal(e),
        };
        let n = all.len();
        match insert_local(rt, all).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return (StatusCode::INSUFFICIENT_STORAGE, json!({"error": e})),
            Err(e) => return internal(e),
        }
        tracing::info!(decisions = n, "local decisions added in bulk");
        let mut resp = json!({"added": n});
        if let Err(e) = persist(rt).await {
            resp["warning"] = json!(format!("active, but not saved: {e}"));
        }
        return (StatusCode::CREATED, resp);
    }
    let d = match new_decision(body) {
        Ok(d) => d,
        Err(e) => return bad(e),
    };
    let shown = to_json(&d, now_ms());
    let (origin, value, kind, reason) =
        (d.origin.clone(), d.value, d.kind.clone(), d.reason.clone());
    match insert_local(rt, vec![d]).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return (StatusCode::INSUFFICIENT_STORAGE, json!({"error": e})),
        Err(e) => return internal(e),
    }
    // The reason is whatever the caller sent (a Wazuh alert's text): escaped.
    tracing::info!(origin = %origin, value = %value, kind = %kind, reason = %crate::telemetry::format::printable(&reason), "local decision added");
    let mut resp = json!({"decision": shown});
    if let Err(e) = persist(rt).await {
        resp["warning"] = json!(format!("active, but not saved: {e}"));
    }
    (StatusCode::CREATED, resp)
}

async fn delete(rt: &Arc<Runtime>, value: &str, query: &[(String, String)]) -> (StatusCode, Value) {
    let (scope, net) = match value_of(value) {
        Ok(v) => v,
        Err(e) => return bad(e),
    };
    let mut filter = Filter {
        value: Some(net),
        ..Filter::default()
    };
    for (k, v) in query {
        match k.as_str() {
            "origin" => filter.origin = Some(v.clone()),
            "type" => filter.kind = Some(v.clone()),
            "value" => {}
            other => {
                return bad(format!(
                    "unknown filter {other:?} (expected origin or type)"
                ))
            }
        }
    }
    let (removed, crowdsec) = {
        let store = rt.gateway.decisions.clone();
        let work = move || {
            let removed = store.remove(Source::Local, &filter);
            // For the hint when nothing local matched.
            let crowdsec = removed.is_empty().then(|| {
                store.list(&Filter {
                    value: Some(net),
                    source: Some(Source::Crowdsec),
                    ..Filter::default()
                })
            });
            (removed, crowdsec.unwrap_or_default())
        };
        match tokio::task::spawn_blocking(work).await {
            Ok(done) => done,
            Err(e) => return internal(e),
        }
    };
    if removed.is_empty() {
        let hint = if crowdsec.is_empty() {
            String::new()
        } else {
            " (a CrowdSec decision exists: lift it with `cscli decisions delete`)".into()
        };
        return (
            StatusCode::NOT_FOUND,
            json!({"error": format!("no local {} decision on {net} matches{hint}", scope.as_str()), "deleted": 0}),
        );
    }
    for d in &removed {
        tracing::info!(origin = %d.origin, value = %d.value, kind = %d.kind, "local decision lifted");
    }
    let now = now_ms();
    let mut resp = json!({
        "deleted": removed.len(),
        "decisions": removed.iter().map(|d| to_json(d, now)).collect::<Vec<_>>(),
    });
    if let Err(e) = persist(rt).await {
        resp["warning"] = json!(format!("lifted, but not saved: {e}"));
    }
    (StatusCode::OK, resp)
}

async fn persist(rt: &Arc<Runtime>) -> Result<(), String> {
    let rt = rt.clone();
    let result = tokio::task::spawn_blocking(move || rt.save_decisions())
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r);
    if let Err(e) = &result {
        tracing::error!(error = %e, "cannot save local decisions");
    }
    result
}

/// `a=1&b=x%2Fy` -> [("a","1"), ("b","x/y")].
fn parse_query(q: &str) -> Result<Vec<(String, String)>, String> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            Ok((percent_decode(k)?, percent_decode(v)?))
        })
        .collect()
}

/// Percent-decoding (`+` stays `+`: addresses never contain spaces).
fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent-encoding in {s:?}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} is not UTF-8 once decoded"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_decisions_are_checked() {
        let d = new_decision(br#"{"ip":"192.0.2.1","duration":"90s","reason":"test"}"#).unwrap();
        assert_eq!(d.scope, Scope::Ip);
        assert_eq!(&*d.kind, "ban");
        assert_eq!(&*d.origin, "admin");
        let d = new_decision(br#"{"value":"2001:db8::/32","type":"captcha","origin":"wazuh"}"#)
            .unwrap();
        assert_eq!(d.scope, Scope::Range);
        for (body, why) in [
            (&br#"{"ip":"300.1.1.1"}"#[..], "not an IP"),
            (br#"{"cidr":"192.0.2.0/33"}"#, "not a CIDR"),
            (br#"{"ip":"192.0.2.1","cidr":"192.0.2.0/24"}"#, "only one"),
            (br#"{}"#, "give the address"),
            (br#"{"ip":"192.0.2.1","duration":"10"}"#, "missing unit"),
            (br#"{"ip":"192.0.2.1","duration":"0s"}"#, "more than zero"),
            (
                br#"{"ip":"192.0.2.1","duration":"400d"}"#,
                "longer than a year",
            ),
            (br#"{"ip":"192.0.2.1","type":"b a n"}"#, "not valid"),
            (br#"{"ip":"192.0.2.1","color":"red"}"#, "unknown field"),
            (b"not json", "JSON object"),
        ] {
            let e = new_decision(body).unwrap_err();
            assert!(e.contains(why), "{e:?} should mention {why:?}");
        }
        let all = new_decisions(br#"[{"ip":"192.0.2.1"},{"cidr":"192.0.2.0/24"}]"#, 2).unwrap();
        assert_eq!(all.len(), 2);
        let (st, e) = new_decisions(br#"[{"ip":"192.0.2.1"},{"ip":"x"}]"#, 10).unwrap_err();
        assert_eq!(st, StatusCode::BAD_REQUEST);
        assert!(e.contains("decision 1"), "{e}");
        let (st, e) = new_decisions(br#"[{"ip":"192.0.2.1"},{"ip":"192.0.2.2"}]"#, 1).unwrap_err();
        assert_eq!(st, StatusCode::INSUFFICIENT_STORAGE);
        assert!(
            e.contains("more than 1 decisions ([decisions] max_local)"),
            "{e}"
        );
        let (_, e) = new_decisions(br#"[{"ip":"192.0.2.1"}] x"#, 10).unwrap_err();
        assert!(e.contains("trailing characters"), "{e}");
    }

    #[test]
    fn queries_decode() {
        assert_eq!(
            parse_query("value=192.0.2.0%2F24&origin=wazuh").unwrap(),
            vec![
                ("value".to_string(), "192.0.2.0/24".to_string()),
                ("origin".to_string(), "wazuh".to_string())
            ]
        );
        assert!(parse_query("a=%zz").is_err());
    }
}
