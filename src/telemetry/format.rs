//! Turning records into text, on the sinks' writer threads (never on a request thread):
//! JSON lines, nginx `combined`, and the security-events JSON. Field names and layouts are a
//! contract documented in docs/logging.md.
//!
//! Every string value is cut at `FIELD_MAX` bytes (escaped), ending in `TRUNCATED`: what a
//! client sends (path, query, User-Agent, Referer, Host) is bounded only by the request head
//! limit, and Wazuh reads at most 64 KiB of a line (`OS_MAXSTR`). A longer line is cut there:
//! its JSON no longer parses, its combined status is gone, and the request hides from the
//! rules. The SQLite sink keeps whole values.

use std::borrow::Cow;
use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use time::OffsetDateTime;

use super::access_log::{AccessRecord, RouteHost};
use crate::config::{LogConfig, QueryLogging};

/// Most bytes one string value takes in a JSON or combined line, escaped, `TRUNCATED`
/// included. Six client-controlled values at most (path, query, method, Host, User-Agent,
/// Referer) keep a line under about 30 KiB, half of what Wazuh reads of a line.
pub const FIELD_MAX: usize = 4096;

/// The end of a value cut at `FIELD_MAX`: ASCII that needs no escaping and has no space, so
/// the combined format's request target stays one token.
pub const TRUNCATED: &str = "...[truncated]";

/// A security event for `[log.events]`.
#[derive(Debug, Clone)]
pub enum Event {
    /// A request that was denied, rate limited or banned (`event` names which).
    Request {
        event: &'static str,
        record: Arc<AccessRecord>,
    },
    /// A failed TLS handshake.
    Handshake {
        time: SystemTime,
        peer: SocketAddr,
        listener: Arc<str>,
        /// The client certificate was the problem (`mtls_failed`), else `tls_failure`.
        auth: bool,
        reason: String,
    },
    /// A connection refused at accept because its address is banned (no request was read).
    BannedConnection {
        time: SystemTime,
        peer: SocketAddr,
        listener: Arc<str>,
        origin: Arc<str>,
        scenario: Option<Arc<str>>,
    },
    /// A configuration reload.
    Reload {
        time: SystemTime,
        ok: bool,
        generation: u64,
        errors: Vec<String>,
    },
}

/// What the formats need from `[log]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Formatting {
    pub query: QueryLogging,
    /// Lowercase parameter names whose values are redacted.
    pub redact: Vec<String>,
}

impl Formatting {
    pub fn new(config: &LogConfig) -> Formatting {
        Formatting {
            query: config.query,
            redact: config.redact_params.clone(),
        }
    }

    /// The query string as it may be logged.
    pub fn query<'a>(&self, q: Option<&'a str>) -> Option<Cow<'a, str>> {
        let q = q.filter(|q| !q.is_empty())?;
        match self.query {
            QueryLogging::Full => Some(Cow::Borrowed(q)),
            QueryLogging::Omit => None,
            QueryLogging::Redact => Some(redact_query(q, &self.redact)),
        }
    }

    /// The `Referer` as it may be logged: its query string is logged like the request's
    /// (`query`), since a secret in the previous page's URL (an OAuth `code` on a callback)
    /// reaches the logs again through the next request's Referer. The value may hold
    /// obs-text bytes, so it stays bytes.
    pub fn referer<'a>(&self, v: &'a [u8]) -> Cow<'a, [u8]> {
        let Some(i) = v.iter().position(|&b| b == b'?') else {
            return Cow::Borrowed(v);
        };
        let (base, q) = (&v[..i], &v[i + 1..]);
        if q.is_empty() {
            return Cow::Borrowed(v);
        }
        let q = match self.query {
            QueryLogging::Full => return Cow::Borrowed(v),
            QueryLogging::Omit => return Cow::Borrowed(base),
            QueryLogging::Redact => match redact_bytes(q, &self.redact) {
                Cow::Borrowed(_) => return Cow::Borrowed(v),
                Cow::Owned(q) => q,
            },
        };
        let mut out = Vec::with_capacity(base.len() + 1 + q.len());
        out.extend_from_slice(base);
        out.push(b'?');
        out.extend_from_slice(&q);
        Cow::Owned(out)
    }
}

/// Replaces the values of the named parameters (case-insensitive, compared after
/// percent-decoding the name) with `REDACTED`.
pub fn redact_query<'a>(q: &'a str, names: &[String]) -> Cow<'a, str> {
    match redact_bytes(q.as_bytes(), names) {
        Cow::Borrowed(_) => Cow::Borrowed(q),
        // Cut only at ASCII `&` and `=` and joined with ASCII: still UTF-8.
        Cow::Owned(v) => Cow::Owned(text(Cow::Owned(v)).into_owned()),
    }
}

/// `redact_query` over bytes (a Referer's query may hold obs-text).
fn redact_bytes<'a>(q: &'a [u8], names: &[String]) -> Cow<'a, [u8]> {
    let hit = |pair: &[u8]| {
        let mut kv = pair.splitn(2, |&b| b == b'=');
        let key = kv.next().unwrap_or_default();
        kv.next().is_some() && names.iter().any(|n| key_is(key, n))
    };
    if !q.split(|&b| b == b'&').any(hit) {
        return Cow::Borrowed(q);
    }
    let mut out = Vec::with_capacity(q.len());
    for (i, pair) in q.split(|&b| b == b'&').enumerate() {
        if i > 0 {
            out.push(b'&');
        }
        if hit(pair) {
            out.extend_from_slice(pair.split(|&b| b == b'=').next().unwrap_or_default());
            out.extend_from_slice(b"=REDACTED");
        } else {
            out.extend_from_slice(pair);
        }
    }
    Cow::Owned(out)
}

/// Whether the raw parameter name `key` is `name` (ASCII case-insensitive) once decoded the
/// way the application will decode it: `%XX` escapes and `+` for a space. Compared raw,
/// `tok%65n=...` would be logged in clear although the application reads it as `token`.
fn key_is(key: &[u8], name: &str) -> bool {
    let name = name.as_bytes();
    if !key.iter().any(|&b| b == b'%' || b == b'+') {
        return key.eq_ignore_ascii_case(name);
    }
    let mut want = name.iter();
    let mut i = 0;
    while i < key.len() {
        let digit = |j: usize| key.get(j).copied().and_then(crate::proxy::path::hex);
        let b = match (key[i], digit(i + 1), digit(i + 2)) {
            (b'%', Some(high), Some(low)) => {
                i += 3;
                high << 4 | low
            }
            (b'+', ..) => {
                i += 1;
                b' '
            }
            (b, ..) => {
                i += 1;
                b
            }
        };
        if !want.next().is_some_and(|n| n.eq_ignore_ascii_case(&b)) {
            return false;
        }
    }
    want.next().is_none()
}

/// `2026-11-25T21:49:15.123456Z`
pub fn rfc3339(t: SystemTime) -> String {
    let dt = OffsetDateTime::from(t);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
        dt.year(),
        u8::from(dt.month()),
        dt.day(),
        dt.hour(),
        dt.minute(),
        dt.second(),
        dt.microsecond()
    )
}

/// `2026-11-25 21:49:15.123` — the form SQLite's date functions compare with.
pub fn sqlite_time(t: SystemTime) -> String {
    let dt = OffsetDateTime::from(t);
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}.{:03}",
        dt.year(),
        u8::from(dt.month()),
        dt.day(),
        dt.hour(),
        dt.minute(),
        dt.second(),
        dt.millisecond()
    )
}

/// `25/Nov/2026:21:49:15 +0000` (nginx `$time_local`, in UTC).
pub fn http_date(t: SystemTime) -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let dt = OffsetDateTime::from(t);
    format!(
        "{:02}/{}/{:04}:{:02}:{:02}:{:02} +0000",
        dt.day(),
        MONTHS[usize::from(u8::from(dt.month())) - 1],
        dt.year(),
        dt.hour(),
        dt.minute(),
        dt.second()
    )
}

/// One time format, with the date and time of day cached for the current second: a writer
/// formats thousands of records per second, all in the same few seconds.
#[derive(Debug)]
pub struct CachedTime {
    second: Option<u64>,
    buf: String,
    /// Length of the cached per-second part.
    prefix: usize,
    style: TimeStyle,
}

/// The time formats of the sinks.
#[derive(Debug, Clone, Copy)]
pub enum TimeStyle {
    /// `2026-11-25T21:49:15.123456Z`
    Rfc3339,
    /// `2026-11-25 21:49:15.123`
    Sqlite,
    /// `25/Nov/2026:21:49:15 +0000`
    Http,
}

impl CachedTime {
    pub fn new(style: TimeStyle) -> CachedTime {
        CachedTime {
            second: None,
            buf: String::with_capacity(32),
            prefix: 0,
            style,
        }
    }

    /// `t` in this format.
    pub fn format(&mut self, t: SystemTime) -> &str {
        let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
        let second = since.as_secs();
        if self.second != Some(second) {
            self.buf.clear();
            self.buf.push_str(&match self.style {
                TimeStyle::Rfc3339 => rfc3339(t),
                TimeStyle::Sqlite => sqlite_time(t),
                TimeStyle::Http => http_date(t),
            });
            self.prefix = match self.style {
                TimeStyle::Rfc3339 | TimeStyle::Sqlite => 19,
                TimeStyle::Http => self.buf.len(),
            };
            self.second = Some(second);
        }
        self.buf.truncate(self.prefix);
        match self.style {
            TimeStyle::Rfc3339 => {
                self.buf.push('.');
                push_padded(&mut self.buf, since.subsec_micros(), 6);
                self.buf.push('Z');
            }
            TimeStyle::Sqlite => {
                self.buf.push('.');
                push_padded(&mut self.buf, since.subsec_millis(), 3);
            }
            TimeStyle::Http => {}
        }
        &self.buf
    }
}

/// `v` as text: borrowed when it is UTF-8 (nearly always), else with U+FFFD for the bad bytes.
/// `from_utf8` validates far faster than `from_utf8_lossy`'s chunk iterator.
pub fn lossy(v: &[u8]) -> Cow<'_, str> {
    match std::str::from_utf8(v) {
        Ok(s) => Cow::Borrowed(s),
        Err(_) => String::from_utf8_lossy(v),
    }
}

/// `lossy` for text that may already be owned (a redacted Referer).
pub fn text(v: Cow<'_, [u8]>) -> Cow<'_, str> {
    match v {
        Cow::Borrowed(v) => lossy(v),
        Cow::Owned(v) => Cow::Owned(
            String::from_utf8(v)
                .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()),
        ),
    }
}

/// Appends `ip` as text (`198.51.100.7`, `2001:db8::1`). IPv4 addresses, nearly every line,
/// are written digit by digit instead of through `fmt`.
pub fn write_ip(out: &mut Vec<u8>, ip: std::net::IpAddr) {
    match ip {
        std::net::IpAddr::V4(v4) => {
            let mut digits = itoa::Buffer::new();
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                out.extend_from_slice(digits.format(octet).as_bytes());
            }
        }
        std::net::IpAddr::V6(_) => {
            let _ = write!(out, "{ip}");
        }
    }
}

/// Appends `n` as exactly `width` decimal digits (zero-padded; `n < 10^width`).
fn push_padded(out: &mut String, n: u32, width: u32) {
    let mut div = 10u32.pow(width.saturating_sub(1));
    while div > 0 {
        out.push(char::from(b'0' + ((n / div) % 10) as u8));
        div /= 10;
    }
}

/// A JSON object written field by field into a buffer.
pub struct JsonObject<'a> {
    out: &'a mut Vec<u8>,
    first: bool,
}

impl<'a> JsonObject<'a> {
    pub fn new(out: &'a mut Vec<u8>) -> JsonObject<'a> {
        out.push(b'{');
        JsonObject { out, first: true }
    }

    /// Keys are field names from this file: plain ASCII, never escaped.
    fn key(&mut self, k: &str) {
        debug_assert!(!k.bytes().any(|b| JSON_ESCAPE[usize::from(b)]));
        if !self.first {
            self.out.push(b',');
        }
        self.first = false;
        self.out.push(b'"');
        self.out.extend_from_slice(k.as_bytes());
        self.out.extend_from_slice(b"\":");
    }

    pub fn str(&mut self, k: &str, v: &str) {
        self.key(k);
        json_string(self.out, v);
    }

    pub fn opt_str(&mut self, k: &str, v: Option<&str>) {
        if let Some(v) = v {
            self.str(k, v);
        }
    }

    /// A header value, lossily decoded (obs-text bytes become U+FFFD).
    pub fn bytes(&mut self, k: &str, v: Option<&[u8]>) {
        if let Some(v) = v {
            self.str(k, &lossy(v));
        }
    }

    /// A value whose text never needs escaping (addresses), written without a copy.
    pub fn display(&mut self, k: &str, v: &dyn std::fmt::Display) {
        self.key(k);
        self.out.push(b'"');
        let _ = write!(self.out, "{v}");
        self.out.push(b'"');
    }

    /// An IP address.
    pub fn ip(&mut self, k: &str, v: std::net::IpAddr) {
        self.key(k);
        self.out.push(b'"');
        write_ip(self.out, v);
        self.out.push(b'"');
    }

    pub fn num(&mut self, k: &str, v: u64) {
        self.key(k);
        self.out
            .extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
    }

    /// A duration in milliseconds with three decimals (`3.412`), without float formatting.
    pub fn millis(&mut self, k: &str, d: std::time::Duration) {
        self.key(k);
        let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let mut buf = itoa::Buffer::new();
        self.out
            .extend_from_slice(buf.format(micros / 1000).as_bytes());
        self.out.push(b'.');
        let frac = micros % 1000;
        if frac < 100 {
            self.out.push(b'0');
        }
        if frac < 10 {
            self.out.push(b'0');
        }
        self.out.extend_from_slice(buf.format(frac).as_bytes());
    }

    pub fn bool(&mut self, k: &str, v: bool) {
        self.key(k);
        self.out
            .extend_from_slice(if v { b"true" } else { b"false" });
    }

    pub fn str_array<'s>(&mut self, k: &str, v: impl Iterator<Item = &'s str>) {
        self.key(k);
        self.out.push(b'[');
        for (i, s) in v.enumerate() {
            if i > 0 {
                self.out.push(b',');
            }
            json_string(self.out, s);
        }
        self.out.push(b']');
    }

    /// Starts a nested object under `k`; finish it with `end`.
    pub fn object(&mut self, k: &str) -> JsonObject<'_> {
        self.key(k);
        JsonObject::new(self.out)
    }

    pub fn end(self) {
        self.out.push(b'}');
    }
}

/// Bytes that need escaping in a JSON string: controls, `"`, `\` and DEL; and the first
/// bytes of the characters a terminal may act on (`terminal_unsafe`), looked at whole.
const fn json_escapes() -> [bool; 256] {
    let mut t = [false; 256];
    let mut i = 0;
    while i < 0x20 {
        t[i] = true;
        i += 1;
    }
    t[b'"' as usize] = true;
    t[b'\\' as usize] = true;
    t[0x7f] = true;
    // U+0080-U+009F; U+061C; U+200E-U+202E, U+2066-U+2069.
    t[0xc2] = true;
    t[0xd8] = true;
    t[0xe2] = true;
    t
}
static JSON_ESCAPE: [bool; 256] = json_escapes();

/// Characters a terminal may act on, beyond the ASCII controls: the C1 controls (U+009B is a
/// CSI to many terminals) and the marks and overrides that reorder text on screen. A log
/// line read with `tail -f` or `jq` in a terminal shows them escaped (`\u009b`), never acts
/// on them: they come from clients (paths, headers, certificate names).
pub fn terminal_unsafe(c: char) -> bool {
    matches!(c,
        '\u{80}'..='\u{9f}'
        | '\u{61c}'
        | '\u{200e}' | '\u{200f}'
        | '\u{2028}'..='\u{202e}'
        | '\u{2066}'..='\u{2069}')
}

/// Text that came from the network (a user agent, a path, a CrowdSec scenario, a Wazuh rule
/// description, an upstream's error) made safe to print on a terminal: control characters
/// (ESC and the C1 range included) and the bidirectional overrides are shown escaped
/// (`\u{1b}`), so no escape sequence or reordering reaches the operator's terminal.
pub fn printable(s: &str) -> Cow<'_, str> {
    escape_unsafe(s, false)
}

/// `printable` for a whole rendered text, whose line breaks stay.
pub fn printable_lines(s: &str) -> Cow<'_, str> {
    escape_unsafe(s, true)
}

/// Serialized JSON made safe to print on a terminal: serde_json escapes only U+0000-U+001F,
/// so DEL, the C1 controls (U+007F-U+009F; U+009B is a CSI) and the bidirectional overrides
/// are rewritten as `\uXXXX`. They can only stand inside strings, where the escape is the
/// same value: the JSON stays valid and means the same.
pub fn json_printable(json: &str) -> Cow<'_, str> {
    let unsafe_char = |c: char| ('\u{7f}'..='\u{9f}').contains(&c) || terminal_unsafe(c);
    if !json.chars().any(unsafe_char) {
        return Cow::Borrowed(json);
    }
    let mut out = String::with_capacity(json.len() + 16);
    for c in json.chars() {
        if unsafe_char(c) {
            // All in the BMP: one escape each.
            out.push_str(&format!("\\u{:04x}", u32::from(c)));
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

fn escape_unsafe(s: &str, keep_newlines: bool) -> Cow<'_, str> {
    let unsafe_char =
        |c: char| (c.is_control() && !(keep_newlines && c == '\n')) || terminal_unsafe(c);
    if !s.chars().any(unsafe_char) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        if unsafe_char(c) {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// Bytes `b` takes in a JSON string at most (a byte of a multi-byte character: one, or six
/// for the first byte of one that may be escaped whole).
fn json_width(b: u8) -> usize {
    match b {
        b'"' | b'\\' | b'\n' | b'\r' | b'\t' => 2,
        b if JSON_ESCAPE[usize::from(b)] => 6,
        _ => 1,
    }
}

/// Where to cut `s` so that its JSON form fits `FIELD_MAX` with `TRUNCATED` after it: `None`
/// when the whole of it fits, else the length of the longest prefix of whole characters
/// that does.
fn json_cut(s: &str) -> Option<usize> {
    // No byte takes more than six: the usual short value needs no counting.
    if s.len() * 6 <= FIELD_MAX || s.bytes().map(json_width).sum::<usize>() <= FIELD_MAX {
        return None;
    }
    let room = FIELD_MAX - TRUNCATED.len();
    let (mut used, mut cut) = (0, 0);
    for (i, b) in s.bytes().enumerate() {
        if s.is_char_boundary(i) {
            if used > room {
                break;
            }
            cut = i;
        }
        used += json_width(b);
    }
    Some(cut)
}

/// Writes `s` as a JSON string (RFC 8259 escaping), cut at `FIELD_MAX`.
fn json_string(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let cut = json_cut(s);
    let bytes = &s.as_bytes()[..cut.unwrap_or(s.len())];
    let mut start = 0;
    while let Some(off) = bytes[start..]
        .iter()
        .position(|&b| JSON_ESCAPE[usize::from(b)])
    {
        let i = start + off;
        out.extend_from_slice(&bytes[start..i]);
        match bytes[i] {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            b if b >= 0x80 => {
                // The first byte of a character (`bytes` ends on a character boundary).
                let c = s[i..].chars().next().unwrap_or('\u{fffd}');
                if terminal_unsafe(c) {
                    let _ = write!(out, "\\u{:04x}", u32::from(c));
                } else {
                    out.extend_from_slice(&bytes[i..i + c.len_utf8()]);
                }
                start = i + c.len_utf8();
                continue;
            }
            b => {
                let _ = write!(out, "\\u{b:04x}");
            }
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    if cut.is_some() {
        out.extend_from_slice(TRUNCATED.as_bytes());
    }
    out.push(b'"');
}

/// One JSON access-log line (with the trailing newline).
pub fn json_line(r: &AccessRecord, f: &Formatting, clock: &mut CachedTime, out: &mut Vec<u8>) {
    let mut o = JsonObject::new(out);
    o.str("time", clock.format(r.time));
    o.bytes("request_id", Some(r.request_id.as_bytes()));
    o.ip("client_ip", r.client_ip);
    if let Some(p) = r.client_port {
        o.num("client_port", u64::from(p));
    }
    o.str("listener", &r.listener);
    o.str("protocol", r.protocol);
    o.opt_str("tls_version", r.tls_version);
    o.opt_str("tls_group", r.tls_group);
    // Only when true: rare, and every other line stays as short as before.
    if r.early_data {
        o.bool("early_data", true);
    }
    if let Some(id) = &r.identity {
        o.str("identity", id.name());
        o.opt_str("spiffe_id", id.spiffe_id.as_deref());
        o.opt_str("cn", id.common_name.as_deref());
        o.str("fingerprint", &id.fingerprint);
    }
    o.str("method", r.method.as_str());
    o.opt_str("host", r.host());
    o.str("path", r.path());
    o.opt_str("query", f.query(r.uri.query()).as_deref());
    o.num("status", u64::from(r.status));
    if let Some(code) = r.grpc_status {
        o.num("grpc_status", u64::from(code));
    }
    o.num("bytes_in", r.bytes_in);
    o.num("bytes_out", r.bytes_out);
    o.millis("duration_ms", r.duration);
    if let Some(t) = r.forward.upstream_time {
        o.millis("upstream_ms", t);
    }
    o.opt_str("route", r.route.as_deref());
    o.opt_str("upstream", r.upstream.as_deref());
    o.opt_str("endpoint", r.forward.endpoint.as_ref().map(|a| a.as_str()));
    if r.forward.attempts > 0 {
        o.num("attempts", u64::from(r.forward.attempts));
    }
    policy_fields(&mut o, r);
    if let Some(rl) = &r.rate_limit {
        o.str("rate_limit", rl.outcome());
        o.str("rate_limiter", &rl.limiter);
    }
    if let Some(b) = &r.ban {
        o.str("ban_origin", &b.origin);
        o.opt_str("ban_scenario", b.scenario.as_deref());
    }
    o.bytes("user_agent", r.user_agent.as_ref().map(|v| v.as_bytes()));
    if let Some(v) = &r.referer {
        o.str("referer", &text(f.referer(v.as_bytes())));
    }
    o.opt_str("error", r.error);
    o.bool("aborted", r.aborted);
    o.end();
    out.push(b'\n');
}

fn policy_fields(o: &mut JsonObject<'_>, r: &AccessRecord) {
    if let Some(p) = &r.policy {
        o.str("decision", p.effect.as_str());
        o.str_array("policies", p.policies.iter().map(|s| &**s));
        o.opt_str("reason", p.reason.as_deref());
        o.bool("shadow", p.shadow);
    }
}

/// Settings of the combined format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CombinedOptions {
    pub vhost: bool,
}

/// One nginx `combined` line:
/// `[vhost ]client - - [time] "METHOD target HTTP/x" status bytes "referer" "agent"`.
///
/// `remote_user` is always `-`: CrowdSec's grok only accepts `[a-zA-Z.@+_%-]+` there (no
/// digits, no `:` or `/`), so no certificate identity can be written faithfully; the JSON and
/// SQLite sinks carry it.
pub fn combined_line(
    r: &AccessRecord,
    f: &Formatting,
    opts: CombinedOptions,
    clock: &mut CachedTime,
    out: &mut Vec<u8>,
) {
    if opts.vhost {
        out.extend_from_slice(vhost(r).as_bytes());
        out.push(b' ');
    }
    write_ip(out, r.client_ip);
    out.extend_from_slice(b" - - [");
    out.extend_from_slice(clock.format(r.time).as_bytes());
    out.extend_from_slice(b"] \"");
    escape_nginx(r.method.as_str().as_bytes(), out);
    out.push(b' ');
    escape_nginx(r.path().as_bytes(), out);
    if let Some(q) = f.query(r.uri.query()) {
        out.push(b'?');
        escape_nginx(q.as_bytes(), out);
    }
    let version = match r.protocol {
        "h2" => "HTTP/2.0",
        "h3" => "HTTP/3.0",
        "h1.0" => "HTTP/1.0",
        _ => "HTTP/1.1",
    };
    let mut digits = itoa::Buffer::new();
    out.push(b' ');
    out.extend_from_slice(version.as_bytes());
    out.extend_from_slice(b"\" ");
    out.extend_from_slice(digits.format(r.status).as_bytes());
    out.push(b' ');
    out.extend_from_slice(digits.format(r.bytes_out).as_bytes());
    out.extend_from_slice(b" \"");
    quoted_header(
        r.referer
            .as_ref()
            .map(|v| f.referer(v.as_bytes()))
            .as_deref(),
        out,
    );
    out.extend_from_slice(b"\" \"");
    quoted_header(r.user_agent.as_ref().map(|v| v.as_bytes()), out);
    out.extend_from_slice(b"\"\n");
}

/// The virtual host: the requested host without port when a route names it and it is a
/// plain name or address; for a wildcard route, the domain the route names (the host's
/// other labels are the client's choice); else the local address. A parser expects a host
/// here, never arbitrary client bytes, nor a name longer than DNS allows, and a host no
/// route names is the client's word only (see `RouteHost`).
fn vhost(r: &AccessRecord) -> String {
    let local = || r.local.ip().to_string();
    if r.route_host == RouteHost::Any {
        return local();
    }
    // The host the route matched, not another the client also sent (an absolute-form
    // target with a Host header of its own).
    let Some(h) = r.routed_host() else {
        return local();
    };
    let name = if let Some(rest) = h.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        h.rsplit_once(':').map_or(h, |(n, p)| {
            if p.bytes().all(|b| b.is_ascii_digit()) {
                n
            } else {
                h
            }
        })
    };
    // `example.com.` is `example.com`, as routing has it.
    let name = name.strip_suffix('.').unwrap_or(name);
    let plain = !name.is_empty()
        && name.len() <= 253
        && (name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
            || name.parse::<std::net::IpAddr>().is_ok());
    if !plain {
        return local();
    }
    match r.route_host {
        RouteHost::Domain(n) => {
            let n = usize::from(n);
            // (ASCII here: every byte is a character boundary.)
            if name.len() > n && name.as_bytes()[name.len() - n - 1] == b'.' {
                name[name.len() - n..].to_ascii_lowercase()
            } else {
                local()
            }
        }
        _ => name.to_ascii_lowercase(),
    }
}

/// `"-"` when absent or empty, else the escaped value.
fn quoted_header(v: Option<&[u8]>, out: &mut Vec<u8>) {
    match v.filter(|v| !v.is_empty()) {
        Some(v) => escape_nginx(v, out),
        None => out.push(b'-'),
    }
}

/// Whether nginx's escaping writes `b` as `\xHH`.
fn nginx_escapes(b: u8) -> bool {
    b == b'"' || b == b'\\' || !(0x20..0x7f).contains(&b)
}

/// nginx's escaping for log variables: `"`, `\`, control and non-ASCII bytes as `\xHH`; cut
/// at `FIELD_MAX` (see `json_cut`).
fn escape_nginx(v: &[u8], out: &mut Vec<u8>) {
    let width = |b: u8| if nginx_escapes(b) { 4 } else { 1 };
    let mut cut = None;
    if v.len() * 4 > FIELD_MAX && v.iter().map(|&b| width(b)).sum::<usize>() > FIELD_MAX {
        let room = FIELD_MAX - TRUNCATED.len();
        let mut used = 0;
        cut = Some(
            v.iter()
                .position(|&b| {
                    used += width(b);
                    used > room
                })
                .unwrap_or(v.len()),
        );
    }
    for &b in &v[..cut.unwrap_or(v.len())] {
        if nginx_escapes(b) {
            let _ = write!(out, "\\x{b:02X}");
        } else {
            out.push(b);
        }
    }
    if cut.is_some() {
        out.extend_from_slice(TRUNCATED.as_bytes());
    }
}

/// One security-event line (see docs/logging.md for the layout Wazuh expects).
pub fn event_line(e: &Event, clock: &mut CachedTime, out: &mut Vec<u8>) {
    let mut o = JsonObject::new(out);
    match e {
        Event::Request { event, record: r } => {
            o.str("timestamp", clock.format(r.time));
            o.display("srcip", &r.client_ip);
            if let Some(p) = r.client_port {
                o.num("srcport", u64::from(p));
            }
            o.opt_str("srcuser", r.identity_name());
            let mut w = o.object("wraith");
            w.str("event", event);
            w.bytes("request_id", Some(r.request_id.as_bytes()));
            w.str("listener", &r.listener);
            w.str("protocol", r.protocol);
            w.opt_str("tls_version", r.tls_version);
            w.opt_str("tls_group", r.tls_group);
            w.opt_str("identity", r.identity_name());
            w.str("method", r.method.as_str());
            w.opt_str("host", r.host());
            w.str("path", r.path());
            w.opt_str("route", r.route.as_deref());
            w.num("status", u64::from(r.status));
            policy_fields(&mut w, r);
            if let Some(rl) = r.rate_limit.as_ref().filter(|rl| rl.limited) {
                w.str("rate_limiter", &rl.limiter);
            }
            if let Some(b) = &r.ban {
                w.str("origin", &b.origin);
                w.opt_str("scenario", b.scenario.as_deref());
            }
            w.bytes("user_agent", r.user_agent.as_ref().map(|v| v.as_bytes()));
            w.end();
        }
        Event::Handshake {
            time,
            peer,
            listener,
            auth,
            reason,
        } => {
            o.str("timestamp", clock.format(*time));
            o.display("srcip", &peer.ip());
            o.num("srcport", u64::from(peer.port()));
            let mut w = o.object("wraith");
            w.str("event", if *auth { "mtls_failed" } else { "tls_failure" });
            w.str("listener", listener);
            w.str("reason", reason);
            w.end();
        }
        Event::BannedConnection {
            time,
            peer,
            listener,
            origin,
            scenario,
        } => {
            o.str("timestamp", clock.format(*time));
            o.display("srcip", &peer.ip());
            o.num("srcport", u64::from(peer.port()));
            let mut w = o.object("wraith");
            w.str("event", "banned");
            w.str("listener", listener);
            w.str("origin", origin);
            w.opt_str("scenario", scenario.as_deref());
            w.end();
        }
        Event::Reload {
            time,
            ok,
            generation,
            errors,
        } => {
            o.str("timestamp", clock.format(*time));
            let mut w = o.object("wraith");
            w.str("event", "config_reload");
            w.str("result", if *ok { "ok" } else { "failed" });
            w.num("generation", *generation);
            if !errors.is_empty() {
                w.str("reason", &errors.join("; "));
            }
            w.end();
        }
    }
    o.end();
    out.push(b'\n');
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::access_log::{BanRecord, Effect, PolicyRecord};
    use http::HeaderValue;

    fn record() -> AccessRecord {
        AccessRecord {
            time: SystemTime::UNIX_EPOCH + std::time::Duration::from_micros(1_764_107_355_123_456),
            request_id: HeaderValue::from_static("abc"),
            client_ip: "198.51.100.7".parse().unwrap(),
            client_port: Some(51234),
            local: "127.0.0.1:8443".parse().unwrap(),
            listener: "https".into(),
            protocol: "h2",
            method: http::Method::GET,
            uri: "/a%20b/c?token=s3cret&page=2".parse().unwrap(),
            host_header: Some(HeaderValue::from_static("api.example.org:8443")),
            user_agent: Some(HeaderValue::from_static("curl/8 \"quoted\"")),
            status: 403,
            bytes_out: 120,
            duration: std::time::Duration::from_micros(3412),
            ..AccessRecord::default()
        }
    }

    fn fmt() -> Formatting {
        Formatting::new(&LogConfig::default())
    }

    #[test]
    fn addresses_and_fractions_are_written_like_display() {
        for ip in [
            "0.0.0.0",
            "198.51.100.7",
            "255.255.255.255",
            "10.0.20.3",
            "2001:db8::1",
            "::ffff:1.2.3.4",
        ] {
            let ip: std::net::IpAddr = ip.parse().unwrap();
            let mut out = Vec::new();
            write_ip(&mut out, ip);
            assert_eq!(String::from_utf8(out).unwrap(), ip.to_string());
        }
        for (n, width, text) in [
            (0, 3, "000"),
            (7, 3, "007"),
            (999, 3, "999"),
            (42, 6, "000042"),
            (123456, 6, "123456"),
        ] {
            let mut out = String::new();
            push_padded(&mut out, n, width);
            assert_eq!(out, text);
        }
    }

    #[test]
    fn json_fields_and_redaction() {
        let mut out = Vec::new();
        json_line(
            &record(),
            &fmt(),
            &mut CachedTime::new(TimeStyle::Rfc3339),
            &mut out,
        );
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["time"], "2025-11-25T21:49:15.123456Z");
        assert_eq!(v["query"], "token=REDACTED&page=2");
        assert_eq!(v["host"], "api.example.org:8443");
        assert_eq!(v["duration_ms"], 3.412);
        assert_eq!(v["user_agent"], "curl/8 \"quoted\"");
        assert!(v.get("route").is_none(), "absent fields are omitted");
        assert_eq!(v["aborted"], false);
    }

    #[test]
    fn redaction_compares_decoded_names() {
        let names = fmt().redact;
        for (q, want) in [
            ("tok%65n=s3cret&page=2", "tok%65n=REDACTED&page=2"),
            ("TOK%45N=s3cret", "TOK%45N=REDACTED"),
            ("%63%6F%64%65=abc", "%63%6F%64%65=REDACTED"),
            ("api%5fkey=k", "api%5fkey=REDACTED"),
            // Not the names: left alone.
            ("tok%65ns=x&to%6B=y&token", "tok%65ns=x&to%6B=y&token"),
            ("tok%6=x&%zz=y&%", "tok%6=x&%zz=y&%"),
        ] {
            assert_eq!(redact_query(q, &names), want, "{q}");
        }
        assert!(matches!(redact_query("page=2", &names), Cow::Borrowed(_)));
    }

    #[test]
    fn referer_query_is_logged_like_the_request_query() {
        let mut r = record();
        r.referer = Some(HeaderValue::from_static(
            "https://app.example.org/callback?code=SplxlOBe&state=xyz&api%4Bey=k",
        ));
        let redacted = "https://app.example.org/callback?code=REDACTED&state=xyz&api%4Bey=REDACTED";
        let json = |f: &Formatting| {
            let mut out = Vec::new();
            json_line(&r, f, &mut CachedTime::new(TimeStyle::Rfc3339), &mut out);
            serde_json::from_slice::<serde_json::Value>(&out).unwrap()["referer"].clone()
        };
        let combined = |f: &Formatting| {
            let mut out = Vec::new();
            let opts = CombinedOptions { vhost: false };
            combined_line(&r, f, opts, &mut CachedTime::new(TimeStyle::Http), &mut out);
            String::from_utf8(out).unwrap()
        };
        assert_eq!(json(&fmt()), redacted);
        assert!(
            combined(&fmt()).contains(&format!("\"{redacted}\"")),
            "{}",
            combined(&fmt())
        );

        let omit = Formatting {
            query: QueryLogging::Omit,
            ..fmt()
        };
        assert_eq!(json(&omit), "https://app.example.org/callback");
        assert!(combined(&omit).contains("\"https://app.example.org/callback\""));
        let full = Formatting {
            query: QueryLogging::Full,
            ..fmt()
        };
        assert_eq!(json(&full), r.referer.as_ref().unwrap().to_str().unwrap());

        // Without a query, and with obs-text around a secret, the bytes are kept as they are.
        assert!(matches!(
            fmt().referer(b"https://x/"),
            Cow::Borrowed(b"https://x/")
        ));
        assert_eq!(
            fmt().referer(b"https://x/\xe9?token=\xff&a=\xfe").as_ref(),
            b"https://x/\xe9?token=REDACTED&a=\xfe"
        );
    }

    #[test]
    fn json_escaping() {
        let mut out = Vec::new();
        json_string(&mut out, "a\"b\\c\nd\u{1}e\u{7f}é");
        assert_eq!(
            String::from_utf8(out.clone()).unwrap(),
            "\"a\\\"b\\\\c\\nd\\u0001e\\u007fé\""
        );
        let v: String = serde_json::from_slice(&out).unwrap();
        assert_eq!(v, "a\"b\\c\nd\u{1}e\u{7f}é");

        // What a terminal may act on is escaped; other characters with the same first
        // bytes are written as they are.
        let text = "x\u{9b}31m\u{85}\u{202e}gpj.exe\u{61c}\u{2066}\u{2028}©€‰中\u{a0}";
        let mut out = Vec::new();
        json_string(&mut out, text);
        assert_eq!(
            String::from_utf8(out.clone()).unwrap(),
            "\"x\\u009b31m\\u0085\\u202egpj.exe\\u061c\\u2066\\u2028©€‰中\u{a0}\""
        );
        let v: String = serde_json::from_slice(&out).unwrap();
        assert_eq!(v, text);
    }

    #[test]
    fn cached_time_matches_uncached() {
        let t0 = SystemTime::UNIX_EPOCH + std::time::Duration::from_micros(1_764_107_355_123_456);
        let t1 = t0 + std::time::Duration::from_micros(1);
        let t2 = t0 + std::time::Duration::from_secs(1);
        for (style, plain) in [
            (TimeStyle::Rfc3339, rfc3339 as fn(SystemTime) -> String),
            (TimeStyle::Sqlite, sqlite_time),
            (TimeStyle::Http, http_date),
        ] {
            let mut c = CachedTime::new(style);
            for t in [t0, t1, t2, t0] {
                assert_eq!(c.format(t), plain(t));
            }
        }
    }

    #[test]
    fn json_identity_and_decisions() {
        let mut r = record();
        r.identity = Some(Arc::new(crate::identity::Identity {
            spiffe_id: Some("spiffe://example.org/billing".into()),
            common_name: Some("billing".into()),
            fingerprint: "9a3e".into(),
            ..Default::default()
        }));
        r.policy = Some(PolicyRecord {
            effect: Effect::Allow,
            policies: vec!["a".into(), "b".into()],
            reason: None,
            shadow: false,
        });
        r.rate_limit = Some(crate::telemetry::access_log::RateLimitRecord {
            limited: false,
            shadow: false,
            limiter: "per-identity".into(),
        });
        let mut out = Vec::new();
        json_line(
            &r,
            &fmt(),
            &mut CachedTime::new(TimeStyle::Rfc3339),
            &mut out,
        );
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["identity"], "spiffe://example.org/billing");
        assert_eq!(v["cn"], "billing");
        assert_eq!(v["fingerprint"], "9a3e");
        assert_eq!(v["decision"], "allow");
        assert_eq!(v["policies"], serde_json::json!(["a", "b"]));
        assert_eq!(v["rate_limit"], "passed");
        assert_eq!(v["rate_limiter"], "per-identity");
        assert!(r.security_event().is_none());
    }

    #[test]
    fn combined_line_is_nginx_shaped() {
        let mut out = Vec::new();
        let opts = CombinedOptions { vhost: true };
        combined_line(
            &AccessRecord {
                route_host: RouteHost::Exact,
                ..record()
            },
            &fmt(),
            opts,
            &mut CachedTime::new(TimeStyle::Http),
            &mut out,
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "api.example.org 198.51.100.7 - - [25/Nov/2025:21:49:15 +0000] \"GET /a%20b/c?token=REDACTED&page=2 HTTP/2.0\" 403 120 \"-\" \"curl/8 \\x22quoted\\x22\"\n"
        );
    }

    #[test]
    fn the_vhost_is_a_host_a_route_names() {
        let line = |route_host, host: &'static str| {
            let mut out = Vec::new();
            let r = AccessRecord {
                route_host,
                host_header: Some(HeaderValue::from_static(host)),
                ..record()
            };
            let opts = CombinedOptions { vhost: true };
            let mut clock = CachedTime::new(TimeStyle::Http);
            combined_line(&r, &fmt(), opts, &mut clock, &mut out);
            let text = String::from_utf8(out).unwrap();
            text.split(' ').next().unwrap().to_string()
        };
        // A catch-all route (or none): whatever Host the client sends, the local address,
        // so a scanner changing it on every request still fills one CrowdSec bucket.
        assert_eq!(line(RouteHost::Any, "a1b2c3.random.example"), "127.0.0.1");
        assert_eq!(
            line(RouteHost::Exact, "API.example.org:8443"),
            "api.example.org"
        );
        assert_eq!(
            line(RouteHost::Exact, "api.example.org."),
            "api.example.org"
        );
        assert_eq!(line(RouteHost::Exact, "[2001:db8::1]:8443"), "2001:db8::1");
        // `*.example.org` (11 bytes after the dot): the domain, not the client's labels.
        assert_eq!(line(RouteHost::Domain(11), "x9.Example.org"), "example.org");
        assert_eq!(
            line(RouteHost::Domain(11), "a.b.example.org:443"),
            "example.org"
        );
        assert_eq!(line(RouteHost::Exact, "bad host"), "127.0.0.1");
        // An absolute-form target was routed on its own authority, whatever Host says.
        let mut out = Vec::new();
        let r = AccessRecord {
            route_host: RouteHost::Exact,
            uri: "http://api.example.org/x".parse().unwrap(),
            host_header: Some(HeaderValue::from_static("zz-random-1.attacker")),
            ..record()
        };
        let mut clock = CachedTime::new(TimeStyle::Http);
        combined_line(
            &r,
            &fmt(),
            CombinedOptions { vhost: true },
            &mut clock,
            &mut out,
        );
        assert!(out.starts_with(b"api.example.org "));
    }

    /// Values longer than `FIELD_MAX` once escaped are cut between two characters (never in
    /// an escape or a UTF-8 sequence) and marked; the line stays short and still parses.
    #[test]
    fn long_client_values_are_cut_and_marked() {
        let mut r = record();
        r.uri = format!("/{}?q={}", "\"".repeat(30_000), "a".repeat(30_000))
            .parse()
            .unwrap();
        r.user_agent = Some(HeaderValue::from_bytes(&[0xff; 30_000]).unwrap());
        r.referer = Some(HeaderValue::from_str(&"é".repeat(20_000)).unwrap());
        r.host_header = Some(HeaderValue::from_str(&"h".repeat(30_000)).unwrap());

        let mut out = Vec::new();
        json_line(
            &r,
            &fmt(),
            &mut CachedTime::new(TimeStyle::Rfc3339),
            &mut out,
        );
        assert!(out.len() < 6 * FIELD_MAX, "{} bytes", out.len());
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        for key in ["path", "query", "user_agent", "referer", "host"] {
            let text = v[key].as_str().unwrap();
            assert!(text.ends_with(TRUNCATED), "{key}: {text}");
        }
        assert!(v["path"].as_str().unwrap().starts_with("/\"\""));
        // Escaped, each value fills its room to within one escape (6 bytes) of the cap.
        let raw = String::from_utf8(out).unwrap();
        let field = |key: &str| {
            let start = raw.find(&format!("\"{key}\":\"")).unwrap() + key.len() + 4;
            let end = start + raw[start..].find(TRUNCATED).unwrap() + TRUNCATED.len();
            end - start
        };
        for key in ["path", "user_agent", "referer"] {
            assert!((FIELD_MAX - 6..=FIELD_MAX).contains(&field(key)), "{key}");
        }

        let mut out = Vec::new();
        let opts = CombinedOptions { vhost: true };
        combined_line(
            &r,
            &fmt(),
            opts,
            &mut CachedTime::new(TimeStyle::Http),
            &mut out,
        );
        let line = String::from_utf8(out).unwrap();
        assert!(line.len() < 5 * FIELD_MAX, "{} bytes", line.len());
        // A host longer than DNS allows is no host: the local address stands in.
        assert!(line.starts_with("127.0.0.1 198.51.100.7 "), "{line}");
        let (target, rest) = line.split_once(" HTTP/2.0\" ").unwrap();
        assert!(target.contains("\\x22...[truncated]?q=aaa"), "{target}");
        assert!(target.ends_with("aaa...[truncated]"), "{target}");
        assert!(rest.starts_with("403 120 \""), "{rest}");
        assert!(rest.ends_with("\\xFF...[truncated]\"\n"), "{rest}");

        let mut out = Vec::new();
        let event = Event::Request {
            event: "policy_denied",
            record: Arc::new(r),
        };
        event_line(&event, &mut CachedTime::new(TimeStyle::Rfc3339), &mut out);
        assert!(out.len() < 4 * FIELD_MAX, "{} bytes", out.len());
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["wraith"]["status"], 403);
        assert!(v["wraith"]["path"].as_str().unwrap().ends_with(TRUNCATED));
    }

    #[test]
    fn event_line_has_wazuh_layout() {
        let mut r = record();
        r.policy = Some(PolicyRecord {
            effect: Effect::Deny,
            policies: vec!["p1".into()],
            reason: Some("no".into()),
            shadow: false,
        });
        r.ban = Some(BanRecord {
            origin: "crowdsec".into(),
            scenario: None,
        });
        let mut out = Vec::new();
        event_line(
            &Event::Request {
                event: "policy_denied",
                record: Arc::new(r),
            },
            &mut CachedTime::new(TimeStyle::Rfc3339),
            &mut out,
        );
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["srcip"], "198.51.100.7");
        assert_eq!(v["wraith"]["event"], "policy_denied");
        assert_eq!(v["wraith"]["policies"][0], "p1");
        assert_eq!(v["wraith"]["origin"], "crowdsec");
        let mut keys: Vec<_> = v.as_object().unwrap().keys().cloned().collect();
        keys.sort();
        assert_eq!(keys, ["srcip", "srcport", "timestamp", "wraith"]);
    }
}
