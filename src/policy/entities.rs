//! Building Cedar's view of a request without JSON: the principal entity (once per
//! connection), route and action entities (once per snapshot), and the context (per request,
//! a dozen already-evaluated values). The shapes follow `wraith.cedarschema`; a unit test
//! checks them against it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;
use cedar_policy::{
    Context, Entity, EntityId, EntityTypeName, EntityUid, RestrictedExpression as Rx,
};
use cedar_policy_core::ast::{self as core, Value};
use cedar_policy_core::evaluator::RestrictedEvaluator;
use cedar_policy_core::extensions::Extensions;
use http::Method;
use smol_str::SmolStr;

use crate::config::{HostMatch, PathMatch, RouteAction, RouteConfig};
use crate::identity::Identity;

/// Entity type names, parsed once.
#[derive(Debug, Clone)]
pub struct Types {
    pub client: EntityTypeName,
    pub anonymous: EntityTypeName,
    pub route: EntityTypeName,
    pub action: EntityTypeName,
}

impl Types {
    pub fn new() -> Result<Types, String> {
        let t = |s: &str| EntityTypeName::from_str(s).map_err(|e| format!("entity type {s}: {e}"));
        Ok(Types {
            client: t("Wraith::Client")?,
            anonymous: t("Wraith::Anonymous")?,
            route: t("Wraith::Route")?,
            action: t("Wraith::Action")?,
        })
    }

    pub fn uid(&self, ty: &EntityTypeName, id: &str) -> EntityUid {
        EntityUid::from_type_name_and_id(ty.clone(), EntityId::new(id))
    }
}

/// The actions of the schema, in the order of `ACTIONS`.
pub const ACTIONS: [&str; 8] = [
    "GET", "HEAD", "OPTIONS", "POST", "PUT", "PATCH", "DELETE", "OTHER",
];

/// Whether the action at this index (in `ACTIONS`) is in the `write` group.
pub fn is_write(index: usize) -> bool {
    index >= 3
}

/// The action a method maps to: its own name, or `OTHER`.
pub fn action_index(method: &Method) -> usize {
    match *method {
        Method::GET => 0,
        Method::HEAD => 1,
        Method::OPTIONS => 2,
        Method::POST => 3,
        Method::PUT => 4,
        Method::PATCH => 5,
        Method::DELETE => 6,
        _ => 7,
    }
}

fn strings<'a>(items: impl IntoIterator<Item = &'a String>) -> Rx {
    Rx::new_set(items.into_iter().map(|s| Rx::new_string(s.clone())))
}

fn string(s: Option<&String>) -> Rx {
    Rx::new_string(s.cloned().unwrap_or_default())
}

/// `Wraith::Client` for a verified certificate.
pub fn client_entity(types: &Types, id: &Identity) -> Result<Entity, String> {
    let attrs: HashMap<String, Rx> = [
        ("spiffe_id", string(id.spiffe_id.as_ref())),
        ("trust_domain", string(id.trust_domain.as_ref())),
        ("spiffe_path", string(id.spiffe_path.as_ref())),
        ("dns", strings(&id.dns)),
        ("email", strings(&id.emails)),
        ("cn", string(id.common_name.as_ref())),
        ("o", strings(&id.organizations)),
        ("ou", strings(&id.organizational_units)),
        ("subject", Rx::new_string(id.subject.clone())),
        ("serial", Rx::new_string(id.serial.clone())),
        ("fingerprint", Rx::new_string(id.fingerprint.clone())),
        ("not_before", datetime_rx(id.not_before)?),
        ("not_after", datetime_rx(id.not_after)?),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    Entity::new(types.uid(&types.client, id.name()), attrs, HashSet::new())
        .map_err(|e| format!("client entity for {:?}: {e}", id.name()))
}

/// A datetime for entity attributes, without re-parsing the constructor's name (which
/// `RestrictedExpression::new_datetime` does on every call).
fn datetime_rx(secs: i64) -> Result<Rx, String> {
    let name = extension_name(Extension::Datetime)?;
    Ok(Rx::from(core::RestrictedExpr::call_extension_fn(
        name,
        [core::RestrictedExpr::val(datetime(
            secs.saturating_mul(1000),
        ))],
    )))
}

/// `Wraith::Route` for a configured route.
pub fn route_entity(types: &Types, route: &RouteConfig) -> Result<Entity, String> {
    let host = match &route.host {
        HostMatch::Any => "*".to_string(),
        HostMatch::Exact(h) => h.clone(),
        HostMatch::Suffix(s) => format!("*{s}"),
    };
    let path = match &route.path {
        PathMatch::Prefix(p) | PathMatch::Exact(p) => p.clone(),
        PathMatch::Regex(r) => r.as_str().to_string(),
    };
    let upstream = match &route.action {
        RouteAction::Upstream(u) => u.to_string(),
        _ => String::new(),
    };
    let attrs: HashMap<String, Rx> = [
        ("name", Rx::new_string(route.name.to_string())),
        ("host", Rx::new_string(host)),
        ("path", Rx::new_string(path)),
        ("upstream", Rx::new_string(upstream)),
        ("tags", strings(&route.tags)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    Entity::new(types.uid(&types.route, &route.name), attrs, HashSet::new())
        .map_err(|e| format!("route entity {:?}: {e}", route.name))
}

/// What the context is made of (all borrowed; nothing here outlives the request).
#[derive(Debug, Clone)]
pub struct ContextInput<'a> {
    pub method: &'a str,
    pub host: &'a str,
    pub path: &'a str,
    pub query: &'a str,
    pub source_ip: IpAddr,
    pub listener: &'a str,
    pub protocol: &'static str,
    pub tls_version: &'a str,
    pub tls_group: &'a str,
    pub early_data: bool,
    pub time: SystemTime,
    /// Seconds east of UTC for `context.local`.
    pub utc_offset: i32,
}

/// The request context.
///
/// Built from evaluated Cedar values (cedar-policy-core), not from restricted expressions:
/// going through Cedar's expression evaluator costs a regex-based datetime parse and an
/// evaluator pass per request. The IP value is evaluated here; callers that see the same
/// address again pass it in with `context_with_ip`. `time` has second precision (`time` and
/// `local` of the current second are cached, and so is the `tls` record).
pub fn context(input: &ContextInput<'_>) -> Result<Context, String> {
    context_with_ip(input, ip_value(input.source_ip)?)
}

/// The request context with an already evaluated `ip` value for `source_ip`.
pub fn context_with_ip(input: &ContextInput<'_>, source_ip: Value) -> Result<Context, String> {
    let secs = input
        .time
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let clock = clock_values(secs, input.utc_offset)?;
    let tls = tls_value(input.tls_version, input.tls_group);
    let key = SmolStr::new_static;
    // Keys in sorted order: the map is built by appending.
    let attrs: BTreeMap<SmolStr, Value> = [
        (key("early_data"), Value::from(input.early_data)),
        (key("host"), Value::from(input.host)),
        (key("listener"), Value::from(input.listener)),
        (key("local"), clock.local.clone()),
        (key("method"), Value::from(input.method)),
        (key("path"), Value::from(input.path)),
        (key("protocol"), Value::from(input.protocol)),
        (key("query"), Value::from(input.query)),
        (key("source_ip"), source_ip),
        (key("time"), clock.time.clone()),
        (key("tls"), tls),
    ]
    .into_iter()
    .collect();
    Ok(Context::from(core::Context::Value(Arc::new(attrs))))
}

/// The context values that change once a second.
struct Clock {
    secs: i64,
    utc_offset: i32,
    /// `context.time`
    time: Value,
    /// `context.local`
    local: Value,
}

/// `time` and `local` for a second; the last one is cached (requests within the same second
/// share it).
fn clock_values(secs: i64, utc_offset: i32) -> Result<Arc<Clock>, String> {
    static LAST: ArcSwapOption<Clock> = ArcSwapOption::const_empty();
    if let Some(c) = LAST
        .load_full()
        .filter(|c| c.secs == secs && c.utc_offset == utc_offset)
    {
        return Ok(c);
    }
    let local_secs = secs + i64::from(utc_offset);
    let days = local_secs.div_euclid(86_400);
    let secs_of_day = local_secs.rem_euclid(86_400);
    // 1970-01-01 was a Thursday (ISO weekday 4).
    let weekday = (days + 3).rem_euclid(7) + 1;
    let local = Value::record(
        [
            ("weekday", Value::from(weekday)),
            ("hour", Value::from(secs_of_day / 3600)),
            ("minute", Value::from(secs_of_day % 3600 / 60)),
        ],
        None,
    );
    let c = Arc::new(Clock {
        secs,
        utc_offset,
        time: extension_value(Extension::Datetime, &datetime(secs * 1000))?,
        local,
    });
    LAST.store(Some(c.clone()));
    Ok(c)
}

/// `context.tls`; the last one is cached (nearly every connection negotiates the same).
fn tls_value(version: &str, group: &str) -> Value {
    static LAST: ArcSwapOption<(String, String, Value)> = ArcSwapOption::const_empty();
    if let Some(t) = LAST
        .load()
        .as_ref()
        .filter(|t| t.0 == version && t.1 == group)
    {
        return t.2.clone();
    }
    let v = Value::record(
        [
            ("version", Value::from(version)),
            ("group", Value::from(group)),
        ],
        None,
    );
    LAST.store(Some(Arc::new((
        version.to_string(),
        group.to_string(),
        v.clone(),
    ))));
    v
}

/// The extension constructors the context uses, parsed once (parsing a name runs Cedar's
/// parser, whose lexer builds a regex cache: far too slow for every request).
fn extension_name(func: Extension) -> Result<core::Name, String> {
    static NAMES: std::sync::OnceLock<Result<[core::Name; 2], String>> = std::sync::OnceLock::new();
    let names = NAMES.get_or_init(|| {
        let parse = |s: &str| core::Name::parse_unqualified_name(s).map_err(|e| e.to_string());
        Ok([parse("ip")?, parse("datetime")?])
    });
    match names {
        Ok(n) => Ok(n[func as usize].clone()),
        Err(e) => Err(e.clone()),
    }
}

/// An extension constructor of the context.
#[derive(Clone, Copy)]
enum Extension {
    Ip = 0,
    Datetime = 1,
}

/// Evaluates one extension constructor call, e.g. `ip("10.0.0.1")`.
fn extension_value(func: Extension, arg: &str) -> Result<Value, String> {
    let name = extension_name(func)?;
    let expr = core::RestrictedExpr::call_extension_fn(name, [core::RestrictedExpr::val(arg)]);
    RestrictedEvaluator::new(Extensions::all_available())
        .interpret(expr.as_borrowed())
        .map_err(|e| format!("{arg:?}: {e}"))
}

/// Cedar's `ip` value of an address.
pub fn ip_value(ip: IpAddr) -> Result<Value, String> {
    extension_value(Extension::Ip, &ip.to_string())
}

/// `YYYY-MM-DDThh:mm:ss.sssZ` for milliseconds since the epoch (Cedar's datetime format).
pub fn datetime(millis: i64) -> String {
    let secs = millis.div_euclid(1000);
    let ms = millis.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Parses `+01:00`, `-05:30`, `Z` or `+00:00` into seconds east of UTC.
pub fn parse_utc_offset(s: &str) -> Result<i32, String> {
    if s == "Z" {
        return Ok(0);
    }
    let bad =
        || format!("invalid UTC offset {s:?} (expected e.g. \"+01:00\", \"-05:30\" or \"Z\")");
    let (sign, rest) = match s.as_bytes().first() {
        Some(b'+') => (1, &s[1..]),
        Some(b'-') => (-1, &s[1..]),
        _ => return Err(bad()),
    };
    let (h, m) = rest.split_once(':').ok_or_else(bad)?;
    if h.len() != 2 || m.len() != 2 {
        return Err(bad());
    }
    let h: i32 = h.parse().map_err(|_| bad())?;
    let m: i32 = m.parse().map_err(|_| bad())?;
    if h > 14 || m > 59 {
        return Err(bad());
    }
    Ok(sign * (h * 3600 + m * 60))
}

/// Parses an RFC 3339 time (`2025-03-04T10:00:00Z`, `...+01:00`) for `wraith test` and explain.
pub fn parse_time(s: &str) -> Result<SystemTime, String> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map_err(|e| {
            format!("invalid time {s:?} (expected RFC 3339, e.g. \"2025-03-04T10:00:00Z\"): {e}")
        })?;
    let nanos = t.unix_timestamp_nanos();
    if nanos < 0 {
        return Err(format!("time {s:?} is before 1970"));
    }
    Ok(UNIX_EPOCH + std::time::Duration::from_nanos(nanos as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(datetime(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(datetime(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(datetime(1_741_082_400_123), "2025-03-04T10:00:00.123Z");
        assert_eq!(datetime(-1), "1969-12-31T23:59:59.999Z");
    }

    #[test]
    fn offsets() {
        assert_eq!(parse_utc_offset("Z"), Ok(0));
        assert_eq!(parse_utc_offset("+01:00"), Ok(3600));
        assert_eq!(parse_utc_offset("-05:30"), Ok(-19_800));
        assert!(parse_utc_offset("1:00").is_err());
        assert!(parse_utc_offset("+25:00").is_err());
    }

    #[test]
    fn local_time_fields() {
        // 2025-03-04 is a Tuesday; 10:00Z is 11:00 at +01:00.
        let input = ContextInput {
            method: "GET",
            host: "h",
            path: "/",
            query: "",
            source_ip: "10.0.0.1".parse().unwrap(),
            listener: "l",
            protocol: "h2",
            tls_version: "TLSv1.3",
            tls_group: "X25519MLKEM768",
            early_data: false,
            time: parse_time("2025-03-04T10:00:00Z").unwrap(),
            utc_offset: 3600,
        };
        let ctx = context(&input).unwrap();
        let json = ctx.to_json_value().unwrap();
        assert_eq!(json["local"]["weekday"], 2);
        assert_eq!(json["local"]["hour"], 11);
        assert_eq!(json["protocol"], "h2");
        // Sunday 23:30 UTC is Monday 00:30 at +01:00.
        let late = ContextInput {
            time: parse_time("2025-03-09T23:30:00Z").unwrap(),
            ..input
        };
        let json = context(&late).unwrap().to_json_value().unwrap();
        assert_eq!(json["local"]["weekday"], 1);
        assert_eq!(json["local"]["hour"], 0);
        assert_eq!(json["local"]["minute"], 30);
    }
}
