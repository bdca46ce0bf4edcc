//! Header rules of a proxy: hop-by-hop removal (RFC 9110 §7.6.1), the forwarding headers
//! (X-Forwarded-*, Forwarded, Via), the request id, and the client address behind trusted
//! proxies. Client-supplied forwarding headers are believed only from `trusted_proxies`.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::Version;
use ipnet::IpNet;

/// `x-request-id`
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static FORWARDED: HeaderName = HeaderName::from_static("forwarded");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Headers that describe one connection, never forwarded (plus any the Connection header names).
/// (`Trailer` is not one: RFC 9110 §6.6.2 makes it end to end, and HTTP/1.1 servers send only
/// the trailer fields it announces.)
const HOP_BY_HOP: [&HeaderName; 7] = [
    &header::CONNECTION,
    &KEEP_ALIVE,
    &PROXY_CONNECTION,
    &header::PROXY_AUTHENTICATE,
    &header::PROXY_AUTHORIZATION,
    &header::TE,
    &header::TRANSFER_ENCODING,
];

/// Whether `name` is a hop-by-hop header.
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(&name) || name == header::UPGRADE
}

/// Removes hop-by-hop headers, including those named by `Connection`. `Upgrade` is kept only
/// when `keep_upgrade` (a WebSocket handshake being proxied). `te: trailers` is kept when
/// `keep_te_trailers` (HTTP/2 upstreams, where gRPC needs it).
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool, keep_te_trailers: bool) {
    // One pass over the (few) header names finds which hop-by-hop headers are there: most
    // messages carry none or only `Connection`, and a removal hashes its name whether or not
    // the header is present.
    let mut present = 0u8;
    for name in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|h| *h == name) {
            present |= 1 << i;
        } else if name == header::UPGRADE && !keep_upgrade {
            present |= UPGRADE_BIT;
        }
    }
    if present == 0 {
        return;
    }
    if present & 1 != 0 {
        // `HOP_BY_HOP[0]` is `Connection`: what it names goes too. Names are collected
        // first (the map cannot change while its values are borrowed); the usual
        // `keep-alive`/`close` name nothing and allocate nothing.
        let listed: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|t| !t.is_empty() && !is_keyword(t.as_bytes()))
            .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
            .filter(|n| !(keep_upgrade && n == header::UPGRADE))
            // The message's own framing and target are not the sender's to drop: a
            // `Connection: host` must not leave the upstream guessing the virtual host.
            .filter(|n| *n != header::HOST && *n != header::CONTENT_LENGTH)
            .collect();
        for n in listed {
            headers.remove(&n);
        }
    }
    let te_trailers = keep_te_trailers
        && present & TE_BIT != 0
        && headers
            .get(header::TE)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(*name);
        }
    }
    if present & UPGRADE_BIT != 0 {
        headers.remove(header::UPGRADE);
    }
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// Bits of `strip_hop_by_hop`'s set of present headers: one per `HOP_BY_HOP` entry, then
/// `Upgrade`.
const TE_BIT: u8 = 1 << 5;
const UPGRADE_BIT: u8 = 1 << HOP_BY_HOP.len();
const _: () = assert!(HOP_BY_HOP.len() < 8);

/// Connection values that name no other header.
fn is_keyword(v: &[u8]) -> bool {
    v.eq_ignore_ascii_case(b"keep-alive") || v.eq_ignore_ascii_case(b"close")
}

/// Whether the request asks for a WebSocket upgrade (HTTP/1.1 `Connection: upgrade` and
/// `Upgrade: websocket`). Other upgrades (h2c above all) are not proxied: their `Upgrade`
/// header is stripped and the request goes on as a plain one.
pub fn upgrade_requested(headers: &HeaderMap, version: Version) -> bool {
    version == Version::HTTP_11
        && is_websocket_upgrade(headers)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// Whether `Upgrade` names exactly the WebSocket protocol.
pub fn is_websocket_upgrade(headers: &HeaderMap) -> bool {
    let mut values = headers.get_all(header::UPGRADE).iter();
    matches!(
        (values.next(), values.next()),
        (Some(v), None) if v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"websocket")
    )
}

/// Whether `ip` is one of `nets` (trusted proxies).
///
/// Trust is granted only by a range of the peer's own family (an IPv4-mapped peer counts as
/// IPv4), as nginx's `set_real_ip_from` does: `::/0` written for "every IPv6 proxy" must not
/// also trust every IPv4 peer. Deny lists match more widely (`net_contains`); an allow list
/// errs the other way.
pub fn is_trusted(nets: &[IpNet], ip: IpAddr) -> bool {
    let ip = canonical(ip);
    nets.iter().any(|n| n.contains(&ip))
}

/// Whether range `net` holds client address `ip`, across the two families: an IPv4 client
/// is also `::ffff:a.b.c.d`, so an IPv6 range that holds that form (`::/0`,
/// `::ffff:0:0/96`, `::ffff:10.0.0.0/104`) holds it, as an IPv4 range holds an IPv4-mapped
/// client. Every deny-list check against a client address goes through here (the decision
/// store's table answers the same by its own probes); trust does not (`is_trusted`).
pub fn net_contains(net: &IpNet, ip: IpAddr) -> bool {
    match (net, canonical(ip)) {
        (IpNet::V4(n), IpAddr::V4(a)) => n.contains(&a),
        (IpNet::V6(n), IpAddr::V4(a)) => n.contains(&a.to_ipv6_mapped()),
        (IpNet::V6(n), IpAddr::V6(a)) => n.contains(&a),
        // Not IPv4-mapped (canonical would have made it IPv4): no IPv4 range holds it.
        (IpNet::V4(_), IpAddr::V6(_)) => false,
    }
}

/// IPv4-mapped IPv6 addresses (`::ffff:1.2.3.4`) become plain IPv4.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The client's address: the peer, or — when the peer is a trusted proxy — the right-most
/// address in X-Forwarded-For that is not itself a trusted proxy.
pub fn client_ip(
    headers: &HeaderMap,
    peer: IpAddr,
    trusted: &[IpNet],
    peer_trusted: bool,
) -> IpAddr {
    let peer = canonical(peer);
    if !peer_trusted {
        return peer;
    }
    let mut candidate = peer;
    // Split as bytes: a line with one hop that is not text (a client's `\x80` that a proxy
    // then appended the real address to) must not hide the hops beside it. A hop that is
    // not an address stops the walk at the last good one to its right.
    let hops: Vec<&[u8]> = headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .collect();
    for hop in hops.iter().rev() {
        match std::str::from_utf8(hop).ok().and_then(parse_hop) {
            Some(ip) => {
                candidate = ip;
                if !is_trusted(trusted, ip) {
                    return ip;
                }
            }
            None => return candidate,
        }
    }
    candidate
}

/// An address in X-Forwarded-For: `1.2.3.4`, `2001:db8::1`, `[2001:db8::1]:443`, `1.2.3.4:80`.
fn parse_hop(s: &str) -> Option<IpAddr> {
    let s = s.trim();
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(canonical(ip));
    }
    s.parse::<SocketAddr>().ok().map(|a| canonical(a.ip()))
}

/// What the forwarding headers need to know about the request.
pub struct ForwardInfo<'a> {
    pub peer: IpAddr,
    /// The client's address (the peer, or the one trusted proxies forwarded).
    pub client_ip: IpAddr,
    pub peer_trusted: bool,
    pub https: bool,
    pub host: Option<&'a str>,
    pub version: Version,
    /// The verified client identity; its `x-forwarded-client-cert` is sent upstream.
    pub identity: Option<&'a crate::identity::Identity>,
    /// Forwarded before the client's TLS handshake completed (0-RTT): `Early-Data: 1`.
    pub early_data: bool,
    /// What asks the client's connection to finish; a WebSocket tunnel ends with it.
    pub close: Option<&'a crate::listener::CloseSignal>,
    /// The request body's limit (the route's `max_request_body`, else the listener's).
    pub max_request_body: Option<u64>,
    /// What ends a WebSocket tunnel when the client is banned.
    pub bans: Option<crate::decisions::BanSource<'a>>,
}

/// `x-real-ip`
static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");

/// `early-data` (RFC 8470)
static EARLY_DATA: HeaderName = HeaderName::from_static("early-data");

/// `x-forwarded-client-cert`
pub static X_FORWARDED_CLIENT_CERT: HeaderName = HeaderName::from_static("x-forwarded-client-cert");

/// Removes every header a client could use to pose as someone else to the upstream:
/// `x-forwarded-client-cert` and anything named `x-wraith-*` (Wraith's own namespace), in
/// any spelling with `_` for `-` too (CGI, WSGI, Rack and PHP map both to the same variable),
/// and the `_` spellings of the headers `forwarding` sets (`x_real_ip`,
/// `x_forwarded_for`, ...): those would reach the same variable past the values Wraith set.
/// So do `content_length` and `transfer_encoding`: read as the framing headers by such an
/// upstream, they would frame the request otherwise than Wraith did (nginx drops every
/// field with `_` in its name by default).
pub fn strip_identity_headers(headers: &mut HeaderMap) {
    // Rare in practice: only collect names when one is there.
    if headers.keys().any(poses_as_identity) {
        let names: Vec<HeaderName> = headers
            .keys()
            .filter(|k| poses_as_identity(k))
            .cloned()
            .collect();
        for n in names {
            headers.remove(&n);
        }
    }
}

/// Joins the `cookie` fields of an HTTP/2 or HTTP/3 request into one, `; ` between them, as
/// the request enters (RFC 9113 §8.2.3, RFC 9114 §4.2.1: it must be one before it goes to
/// HTTP/1.1; browsers send each cookie as a field of its own there, and many HTTP/1.1
/// servers read one Cookie header only). The pipeline then sees one field, whatever the
/// protocol: `max_headers` counts it once, and every upstream gets the same header.
pub fn join_cookies(headers: &mut HeaderMap) {
    let mut crumbs = headers.get_all(header::COOKIE).iter();
    let (Some(first), Some(_)) = (crumbs.next(), crumbs.next()) else {
        return;
    };
    let mut joined = first.as_bytes().to_vec();
    for c in headers.get_all(header::COOKIE).iter().skip(1) {
        joined.extend_from_slice(b"; ");
        joined.extend_from_slice(c.as_bytes());
    }
    if let Ok(v) = HeaderValue::from_bytes(&joined) {
        headers.insert(header::COOKIE, v);
    }
}

/// Whether a field may be sent in a trailer section: not framing, routing, connection,
/// authentication or response-control fields (RFC 9110 §6.5.1). HTTP/2 clients refuse the
/// connection-specific ones outright (hyper resets the stream).
pub fn allowed_in_trailers(name: &HeaderName) -> bool {
    !matches!(
        name.as_str(),
        "content-length"
            | "transfer-encoding"
            | "host"
            | "connection"
            | "keep-alive"
            | "te"
            | "trailer"
            | "upgrade"
            | "content-encoding"
            | "content-type"
            | "content-range"
            | "set-cookie"
            | "authorization"
            | "cache-control"
            | "expect"
            | "max-forwards"
            | "pragma"
            | "range"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "proxy-authentication-info"
            | "www-authenticate"
            | "authentication-info"
            | "cookie"
            | "location"
            | "retry-after"
            | "vary"
            | "age"
            | "expires"
            | "date"
            | "alt-svc"
    )
}

/// Cleans the trailer section of an upstream's response: out go the fields no trailer may
/// carry (`allowed_in_trailers`). Every client protocol gets the same section; an HTTP/2
/// client would otherwise see a `Set-Cookie` or a `Host` there, and a `Connection` one made
/// hyper reset the stream after the body.
pub fn strip_response_trailers(trailers: &mut HeaderMap) {
    remove_where(trailers, |name| !allowed_in_trailers(name));
}

/// Cleans the trailer section of a request about to go upstream. Out go the fields no
/// trailer may carry (`allowed_in_trailers`: framing, routing, connection-specific, RFC 9110
/// §6.5.1, RFC 9113 §8.2.2; hyper's HTTP/2 client refuses a trailer section holding one, and
/// the stream would hang), and every field the header section could not carry past Wraith:
/// identity (`x-forwarded-client-cert`, `x-wraith-*`), the forwarding headers Wraith sets
/// and the `CLAIMS`, in either spelling. An upstream that merges trailers into its headers
/// must not find there what was stripped from them.
pub fn strip_request_trailers(trailers: &mut HeaderMap) {
    remove_where(trailers, |name| {
        let n = name.as_str();
        !allowed_in_trailers(name)
            || matches!(n, "forwarded" | "via")
            || n.starts_with("proxy-")
            || poses_as_identity(name)
            || FWD.iter().any(|f| f.name() == name)
            || is_claim(n)
    });
}

/// Removes every field whose name `refused` says so (no allocation when none is).
fn remove_where(map: &mut HeaderMap, refused: impl Fn(&HeaderName) -> bool) {
    if map.keys().any(&refused) {
        let names: Vec<HeaderName> = map.keys().filter(|k| refused(k)).cloned().collect();
        for n in names {
            map.remove(&n);
        }
    }
}

/// `x-forwarded-client-cert` or `x-wraith-*` (reading `_` as `-`): the headers that carry a
/// client's identity upstream, which only a verified client certificate sets.
pub fn is_identity_header(name: &str) -> bool {
    let n = name.as_bytes();
    let same = |a: &[u8], b: &[u8]| {
        a.len() == b.len()
            && a.iter()
                .zip(b)
                .all(|(x, y)| x.eq_ignore_ascii_case(y) || (*x == b'_' && *y == b'-'))
    };
    same(n, b"x-forwarded-client-cert") || (n.len() >= 9 && same(&n[..9], b"x-wraith-"))
}

/// `x-forwarded-client-cert` or `x-wraith-*`, reading `_` as `-`; or a forwarding header
/// Wraith sets, or one of the `CLAIMS`, spelt with `_` (from any peer: proxies send the
/// real names).
fn poses_as_identity(name: &HeaderName) -> bool {
    let n = name.as_str().as_bytes();
    let same = |a: &[u8], b: &[u8]| {
        a.len() == b.len()
            && a.iter()
                .zip(b)
                .all(|(x, y)| x == y || (*x == b'_' && *y == b'-'))
    };
    same(n, b"x-forwarded-client-cert")
        || (n.len() >= 9 && same(&n[..9], b"x-wraith-"))
        || (n.contains(&b'_')
            && ([
                &b"x-real-ip"[..],
                b"x-forwarded-for",
                b"x-forwarded-proto",
                b"x-forwarded-host",
                b"x-request-id",
                b"early-data",
                b"content-length",
                b"transfer-encoding",
            ]
            .iter()
            .any(|h| same(n, h))
                || CLAIMS.iter().any(|c| same(n, c.as_bytes()))))
}

/// The headers Wraith sets on a request it forwards: X-Forwarded-For/-Proto/-Host,
/// X-Real-IP, Forwarded, Via, Early-Data and X-Request-Id, worked out once per request.
///
/// An HTTP/1.1 upstream gets them written straight into the request head after the client's
/// headers (`write`), and the client-sent headers they replace are skipped as the head is
/// written (`replaces`): no header-map insertion per request. HTTP/2 upstreams, and routes
/// whose request-header edits must see them, get them in the map (`apply`); both ways send
/// the same headers.
#[derive(Debug, Default)]
pub struct Forwarding {
    /// The header lines Wraith sends (`name: value\r\n`), one after another.
    text: String,
    /// Each of them: which header, and where its value sits in `text`.
    sent: [(Fwd, usize, usize); FWD.len()],
    count: usize,
    /// Where the value being written starts.
    start: usize,
    /// The client is not a trusted proxy: its `CLAIMS` do not pass either.
    drop_claims: bool,
    /// Client-sent headers that do not pass (one bit per `Fwd`).
    dropped: u8,
}

#[derive(Debug, Default, Clone, Copy, PartialEq)]
enum Fwd {
    #[default]
    For,
    RealIp,
    Proto,
    Host,
    Forwarded,
    /// Appended to, never replaced.
    Via,
    EarlyData,
    RequestId,
}

const FWD: [Fwd; 8] = [
    Fwd::For,
    Fwd::RealIp,
    Fwd::Proto,
    Fwd::Host,
    Fwd::Forwarded,
    Fwd::Via,
    Fwd::EarlyData,
    Fwd::RequestId,
];

/// Headers that make claims about the client or the original request, which web frameworks
/// and servers behind a proxy believe (the scheme, port or prefix the client used, its
/// address, the URL before a rewrite): passed on only from `trusted_proxies`. The URL ones
/// are an access-control bypass otherwise (a request routed and authorized as `/public`
/// with `X-Original-URL: /admin` reaches `/admin` on IIS and Symfony-style routers), and so
/// are the method overrides (a POST the policies permit is a DELETE to Express's
/// method-override, Laravel or ASP.NET with `X-HTTP-Method-Override: DELETE`).
pub const CLAIMS: [&str; 17] = [
    "x-forwarded-port",
    "x-forwarded-prefix",
    "x-forwarded-server",
    "x-forwarded-scheme",
    "x-forwarded-ssl",
    "x-url-scheme",
    "front-end-https",
    "x-original-url",
    "x-rewrite-url",
    "x-client-ip",
    "true-client-ip",
    "cf-connecting-ip",
    "fastly-client-ip",
    "x-cluster-client-ip",
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

fn is_claim(name: &str) -> bool {
    // One length check per entry for most names.
    CLAIMS.iter().any(|c| c.len() == name.len() && *c == name)
}

impl Fwd {
    fn name(self) -> &'static HeaderName {
        match self {
            Fwd::For => &X_FORWARDED_FOR,
            Fwd::RealIp => &X_REAL_IP,
            Fwd::Proto => &X_FORWARDED_PROTO,
            Fwd::Host => &X_FORWARDED_HOST,
            Fwd::Forwarded => &FORWARDED,
            Fwd::Via => &header::VIA,
            Fwd::EarlyData => &EARLY_DATA,
            Fwd::RequestId => &X_REQUEST_ID,
        }
    }

    /// `name()` and `": "`, as one piece (a line begins with one copy, not two).
    fn line_start(self) -> &'static str {
        match self {
            Fwd::For => "x-forwarded-for: ",
            Fwd::RealIp => "x-real-ip: ",
            Fwd::Proto => "x-forwarded-proto: ",
            Fwd::Host => "x-forwarded-host: ",
            Fwd::Forwarded => "forwarded: ",
            Fwd::Via => "via: ",
            Fwd::EarlyData => "early-data: ",
            Fwd::RequestId => "x-request-id: ",
        }
    }

    fn bit(self) -> u8 {
        1 << self as u8
    }
}

/// Works out the forwarding headers of a request about to be forwarded. Client-sent ones are
/// believed (appended to, or kept) only from a trusted proxy.
pub fn forwarding(
    headers: &HeaderMap,
    info: &ForwardInfo<'_>,
    request_id: &HeaderValue,
) -> Forwarding {
    let mut f = Forwarding {
        text: String::with_capacity(320),
        drop_claims: !info.peer_trusted,
        ..Forwarding::default()
    };
    let peer = canonical(info.peer);
    let client = canonical(info.client_ip);
    // Formatted once: it goes into X-Forwarded-For, Forwarded and (usually) X-Real-IP.
    let peer_text = IpText::of(peer);
    let peer_text = peer_text.as_str();
    let proto = if info.https { "https" } else { "http" };

    // X-Forwarded-For: append to a trusted chain; otherwise the peer alone.
    f.begin(Fwd::For);
    f.prior(headers, Fwd::For, info.peer_trusted);
    f.text.push_str(peer_text);
    f.replace(Fwd::For);

    // X-Real-IP: always the client address Wraith believes (nginx's usual
    // `proxy_set_header X-Real-IP $remote_addr`); one sent by the client never passes, since
    // upstreams behind nginx-style set-ups often trust it.
    f.begin(Fwd::RealIp);
    if client == peer {
        f.text.push_str(peer_text);
    } else {
        f.text.push_str(IpText::of(client).as_str());
    }
    f.replace(Fwd::RealIp);

    if !(info.peer_trusted && headers.contains_key(&X_FORWARDED_PROTO)) {
        f.begin(Fwd::Proto);
        f.text.push_str(proto);
        f.replace(Fwd::Proto);
    }
    if !(info.peer_trusted && headers.contains_key(&X_FORWARDED_HOST)) {
        match info.host.filter(|h| h.bytes().all(is_value_byte)) {
            Some(host) => {
                f.begin(Fwd::Host);
                f.text.push_str(host);
                f.replace(Fwd::Host);
            }
            None => f.dropped |= Fwd::Host.bit(),
        }
    }

    // Forwarded (RFC 7239): IPv6 and ports must be quoted.
    f.begin(Fwd::Forwarded);
    f.prior(headers, Fwd::Forwarded, info.peer_trusted);
    if peer.is_ipv4() {
        f.text.push_str("for=");
        f.text.push_str(peer_text);
    } else {
        f.text.push_str("for=\"[");
        f.text.push_str(peer_text);
        f.text.push_str("]\"");
    }
    f.text.push_str(";proto=");
    f.text.push_str(proto);
    if let Some(host) = info.host.filter(|h| h.bytes().all(is_token_byte)) {
        f.text.push_str(";host=");
        f.text.push_str(host);
    } else if let Some(host) = info
        .host
        .filter(|h| h.bytes().all(is_value_byte) && !h.contains('"') && !h.contains('\\'))
    {
        f.text.push_str(";host=\"");
        f.text.push_str(host);
        f.text.push('"');
    }
    f.replace(Fwd::Forwarded);

    // Via: ours after whatever came before.
    f.begin(Fwd::Via);
    f.text.push_str(match info.version {
        Version::HTTP_2 => "2 wraith",
        Version::HTTP_3 => "3 wraith",
        Version::HTTP_10 => "1.0 wraith",
        _ => "1.1 wraith",
    });
    f.push(Fwd::Via);

    // RFC 8470 §5.1: an intermediary forwarding early data marks it; one set by a proxy
    // before us stays (it can only make the upstream more careful).
    if info.early_data {
        f.begin(Fwd::EarlyData);
        f.text.push('1');
        f.replace(Fwd::EarlyData);
    }

    // Generated, or kept from a trusted proxy (`request_id`): printable ASCII either way.
    f.begin(Fwd::RequestId);
    f.text.push_str(request_id.to_str().unwrap_or("-"));
    f.replace(Fwd::RequestId);
    f
}

impl Forwarding {
    /// Starts the line of header `which`; its value is written next.
    fn begin(&mut self, which: Fwd) {
        self.text.push_str(which.line_start());
        self.start = self.text.len();
    }

    /// A trusted proxy's values of `which`, joined, then `, `: the chain ours is appended to.
    /// Nothing from anyone else.
    fn prior(&mut self, headers: &HeaderMap, which: Fwd, trusted: bool) {
        if !trusted {
            return;
        }
        for v in headers.get_all(which.name()) {
            // Every line, text or not: leaving one out would drop the hops a proxy appended
            // to it. (Bytes that are not UTF-8 become U+FFFD.)
            self.text.push_str(&String::from_utf8_lossy(v.as_bytes()));
            self.text.push_str(", ");
        }
    }

    /// Ends the line begun last: header `which`, sent after any the client sent.
    fn push(&mut self, which: Fwd) {
        self.sent[self.count] = (which, self.start, self.text.len());
        self.count += 1;
        self.text.push_str("\r\n");
    }

    /// The same, in place of any the client sent.
    fn replace(&mut self, which: Fwd) {
        self.push(which);
        self.dropped |= which.bit();
    }

    /// The headers Wraith sends, in order.
    fn headers(&self) -> impl Iterator<Item = (Fwd, &str)> + '_ {
        self.sent[..self.count]
            .iter()
            .map(|&(which, start, end)| (which, &self.text[start..end]))
    }

    /// Whether a client-sent header named `name` is replaced (or removed), not forwarded.
    pub fn replaces(&self, name: &HeaderName) -> bool {
        FWD.iter()
            .any(|f| self.dropped & f.bit() != 0 && f.name() == name)
            || (self.drop_claims && is_claim(name.as_str()))
    }

    /// How many bytes `write` writes.
    pub fn encoded_len(&self) -> usize {
        self.text.len()
    }

    /// Writes the headers as HTTP/1.1 header lines.
    pub fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.text.as_bytes());
    }

    /// Puts the headers into `headers`, replacing (or appending to) the client's.
    pub fn apply(&self, headers: &mut HeaderMap) {
        let mut sent = 0u8;
        for (which, value) in self.headers() {
            // Built from checked parts: never invalid.
            let Ok(v) = HeaderValue::from_str(value) else {
                continue;
            };
            if self.dropped & which.bit() != 0 {
                // Replaces every value the client sent.
                headers.insert(which.name().clone(), v);
            } else {
                headers.append(which.name().clone(), v);
            }
            sent |= which.bit();
        }
        // Dropped without a value of Wraith's in their place (X-Forwarded-Host without a
        // usable host).
        for f in FWD {
            if self.dropped & !sent & f.bit() != 0 {
                headers.remove(f.name());
            }
        }
        if self.drop_claims && headers.keys().any(|k| is_claim(k.as_str())) {
            let claims: Vec<HeaderName> = headers
                .keys()
                .filter(|k| is_claim(k.as_str()))
                .cloned()
                .collect();
            for name in claims {
                headers.remove(name);
            }
        }
    }
}

/// Bytes a header value may hold (`HeaderValue::from_str`'s rule).
fn is_value_byte(b: u8) -> bool {
    (b >= 0x20 && b != 0x7f) || b == b'\t'
}

/// An address as text, on the stack; IPv4 by hand, since `Display` goes through the
/// formatting machinery and this runs on every request.
struct IpText {
    buf: [u8; 45],
    len: usize,
}

impl IpText {
    fn of(ip: IpAddr) -> IpText {
        let mut t = IpText {
            buf: [0; 45],
            len: 0,
        };
        match ip {
            IpAddr::V4(v4) => {
                for (i, &o) in v4.octets().iter().enumerate() {
                    if i > 0 {
                        t.push(b'.');
                    }
                    if o >= 100 {
                        t.push(b'0' + o / 100);
                    }
                    if o >= 10 {
                        t.push(b'0' + (o / 10) % 10);
                    }
                    t.push(b'0' + o % 10);
                }
            }
            IpAddr::V6(v6) => {
                // At most 39 bytes (eight full groups); the buffer has room for 45.
                let written = write!(t, "{v6}");
                debug_assert!(written.is_ok(), "{v6} did not fit");
            }
        }
        t
    }

    fn push(&mut self, b: u8) {
        self.buf[self.len] = b;
        self.len += 1;
    }

    fn as_str(&self) -> &str {
        // Only ASCII was written.
        std::str::from_utf8(&self.buf[..self.len]).unwrap_or_default()
    }
}

impl std::fmt::Write for IpText {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let end = self.len + s.len();
        let dst = self.buf.get_mut(self.len..end).ok_or(std::fmt::Error)?;
        dst.copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'!' | b'#'
                | b'$'
                | b'%'
                | b'&'
                | b'\''
                | b'*'
                | b'+'
                | b'-'
                | b'.'
                | b'^'
                | b'_'
                | b'`'
                | b'|'
                | b'~'
        )
}

/// The request id: kept from a trusted proxy when it looks sane, generated otherwise.
pub fn request_id(headers: &HeaderMap, peer_trusted: bool) -> HeaderValue {
    if peer_trusted {
        if let Some(v) = headers.get(&X_REQUEST_ID) {
            let b = v.as_bytes();
            if !b.is_empty() && b.len() <= 128 && b.iter().all(|c| c.is_ascii_graphic()) {
                return v.clone();
            }
        }
    }
    new_request_id()
}

/// A fresh random 128-bit id, as 32 lowercase hex digits.
pub fn new_request_id() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let n = fastrand::u128(..);
    let mut out = [0u8; 32];
    for (i, byte) in n.to_be_bytes().iter().enumerate() {
        out[2 * i] = HEX[(byte >> 4) as usize];
        out[2 * i + 1] = HEX[(byte & 0xf) as usize];
    }
    // Owned by the `Bytes` itself: one allocation, and clones (the access record, the
    // response header) only count references. A copied `Vec` would take a second allocation
    // at its first clone.
    HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(out))
        .unwrap_or_else(|_| HeaderValue::from_static("0"))
}

/// The request's host, held by reference count rather than copied (it outlives the request
/// when the request moves on to the upstream).
pub enum Host {
    Authority(http::uri::Authority),
    Header(HeaderValue),
    Missing,
}

impl Host {
    /// From the URI authority (HTTP/2, HTTP/3, absolute-form) or the (first) Host header,
    /// `host_header`: the access record found it already (`AccessRecord::start`).
    pub fn of(uri: &http::Uri, host_header: Option<&HeaderValue>) -> Host {
        match (uri.authority(), host_header) {
            (Some(a), _) => Host::Authority(a.clone()),
            (None, Some(v)) => Host::Header(v.clone()),
            (None, None) => Host::Missing,
        }
    }

    /// The host's name, judged and taken in one pass: `Err` unless the host is `name[:port]`
    /// or `[IPv6][:port]` (no userinfo, path or list; no empty label, so routing, policy
    /// and the upstream see the same name), `Ok(None)` when there is none (HTTP/1.0), the
    /// name otherwise, without its port and without the trailing dot of a fully qualified
    /// name.
    pub fn checked_name(&self) -> Result<Option<&str>, InvalidHost> {
        let raw = match self {
            Host::Authority(a) => a.as_str().as_bytes(),
            Host::Header(v) => v.as_bytes(),
            Host::Missing => return Ok(None),
        };
        let (name, port) = if let Some(rest) = raw.strip_prefix(b"[") {
            let end = rest.iter().position(|&b| b == b']').ok_or(InvalidHost)?;
            let literal = &rest[..end];
            if literal.is_empty()
                || !literal
                    .iter()
                    .all(|b| b.is_ascii_hexdigit() || matches!(b, b':' | b'.'))
            {
                return Err(InvalidHost);
            }
            (literal, &rest[end + 1..])
        } else {
            let mut colon = raw.len();
            // A leading dot is an empty label, as is `..`; one trailing dot is allowed.
            let mut after_dot = true;
            for (i, &b) in raw.iter().enumerate() {
                match b {
                    b'.' if after_dot => return Err(InvalidHost),
                    b'.' => after_dot = true,
                    b':' => {
                        colon = i;
                        break;
                    }
                    b if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' => after_dot = false,
                    _ => return Err(InvalidHost),
                }
            }
            (&raw[..colon], &raw[colon..])
        };
        let port_ok = port.is_empty()
            || (port.len() > 1
                && port.len() <= 6
                && port[0] == b':'
                && port[1..].iter().all(u8::is_ascii_digit));
        if !port_ok {
            return Err(InvalidHost);
        }
        let name = name.strip_suffix(b".").unwrap_or(name);
        // (ASCII by now: the check cannot fail.)
        std::str::from_utf8(name).map(Some).map_err(|_| InvalidHost)
    }
}

/// A Host that is not `name[:port]` or `[IPv6][:port]`.
#[derive(Debug, PartialEq)]
pub struct InvalidHost;

/// The request's host without port, from the URI authority (HTTP/2, HTTP/3) or Host.
pub fn request_host<'a>(uri: &'a http::Uri, headers: &'a HeaderMap) -> Option<&'a str> {
    let raw = match uri.authority() {
        Some(a) => a.as_str(),
        None => headers.get(header::HOST)?.to_str().ok()?,
    };
    Some(strip_port(raw))
}

/// `example.com:8443` -> `example.com`; `[::1]:8443` -> `::1`.
pub fn strip_port(host: &str) -> &str {
    // Byte scans from the end: this runs several times per request on short strings, where
    // `rfind` with a char pattern costs more than the whole scan.
    let b = host.as_bytes();
    let host = match b.iter().rposition(|&c| c == b'@') {
        Some(i) => &host[i + 1..],
        None => host,
    };
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    // A port is the run of digits after the last ':'.
    let b = host.as_bytes();
    let digits = b.iter().rev().take_while(|c| c.is_ascii_digit()).count();
    match b.len().checked_sub(digits + 1) {
        Some(colon) if b[colon] == b':' => &host[..colon],
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hm(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn strips_hop_by_hop_and_connection_named() {
        let mut h = hm(&[
            ("connection", "keep-alive, x-secret"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("proxy-authorization", "Basic x"),
            ("upgrade", "websocket"),
            ("x-kept", "yes"),
        ]);
        strip_hop_by_hop(&mut h, false, false);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn connection_cannot_drop_host_or_length_and_trailer_is_end_to_end() {
        let mut h = hm(&[
            ("connection", "host, content-length, x-gone"),
            ("host", "api.internal"),
            ("content-length", "3"),
            ("x-gone", "1"),
            ("trailer", "grpc-status"),
        ]);
        strip_hop_by_hop(&mut h, false, false);
        assert_eq!(h.get("host").unwrap(), "api.internal");
        assert_eq!(h.get("content-length").unwrap(), "3");
        assert_eq!(h.get("trailer").unwrap(), "grpc-status");
        assert!(!h.contains_key("x-gone"));
    }

    #[test]
    fn only_websocket_upgrades_are_upgrades() {
        let ws = hm(&[("connection", "Upgrade"), ("upgrade", "WebSocket")]);
        assert!(upgrade_requested(&ws, Version::HTTP_11));
        for other in ["h2c", "websocket, h2c", "TLS/1.2"] {
            let h = hm(&[
                ("connection", "Upgrade, HTTP2-Settings"),
                ("upgrade", other),
            ]);
            assert!(!upgrade_requested(&h, Version::HTTP_11), "{other}");
        }
        let two = hm(&[
            ("connection", "Upgrade"),
            ("upgrade", "websocket"),
            ("upgrade", "h2c"),
        ]);
        assert!(!upgrade_requested(&two, Version::HTTP_11));
    }

    #[test]
    fn identity_headers_go_in_every_spelling() {
        let mut h = hm(&[
            ("x-forwarded-client-cert", "Hash=1"),
            ("x-forwarded-client_cert", "Hash=2"),
            ("x_forwarded_client_cert", "Hash=3"),
            ("x-wraith-user", "admin"),
            ("x_wraith_user", "admin"),
            ("x-wraith_role", "admin"),
            ("x-wraithless", "kept"),
            ("x-forwarded-client-certs", "kept"),
            // `_` spellings of what `forwarding` sets.
            ("x_forwarded_for", "6.6.6.6"),
            ("x_real_ip", "6.6.6.6"),
            ("early_data", "0"),
            ("x-request_id", "spoof"),
            ("x_original_url", "/admin"),
            ("true_client_ip", "6.6.6.6"),
            // The real names are `forwarding`'s to replace or drop, not removed here.
            ("early-data", "0"),
            ("x-original-url", "/admin"),
        ]);
        strip_identity_headers(&mut h);
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort();
        assert_eq!(
            left,
            [
                "early-data",
                "x-forwarded-client-certs",
                "x-original-url",
                "x-wraithless"
            ]
        );
    }

    #[test]
    fn hosts_are_names_or_ip_literals_with_a_port() {
        let h = |v: &str| Host::Header(HeaderValue::from_str(v).unwrap());
        for ok in [
            "api.internal",
            "api.internal:8443",
            "127.0.0.1:80",
            "[::1]:8443",
            "[::1]",
            "a_b.local",
            "x.",
        ] {
            assert!(h(ok).checked_name().is_ok(), "{ok}");
        }
        for bad in [
            "internal@public.example",
            "a.com/x",
            "a, b",
            "a b",
            "[::1",
            "[zz]",
            "a:b",
            "a:",
            "a:1234567",
            "[::1]x",
            "admin.example.com..",
            ".admin.example.com",
            "admin..example.com:443",
        ] {
            assert_eq!(h(bad).checked_name(), Err(InvalidHost), "{bad}");
        }
        for (host, name) in [
            ("Admin.Example.com.:443", "Admin.Example.com"),
            ("api.internal", "api.internal"),
            ("127.0.0.1:80", "127.0.0.1"),
            ("[::1]:8443", "::1"),
            ("[::ffff:1.2.3.4]", "::ffff:1.2.3.4"),
            ("x.", "x"),
            ("", ""),
        ] {
            assert_eq!(h(host).checked_name(), Ok(Some(name)), "{host}");
        }
        assert_eq!(Host::Missing.checked_name(), Ok(None));
    }

    #[test]
    fn keeps_upgrade_and_te_trailers_when_asked() {
        let mut h = hm(&[
            ("connection", "Upgrade"),
            ("upgrade", "websocket"),
            ("te", "trailers"),
        ]);
        strip_hop_by_hop(&mut h, true, true);
        assert_eq!(h.get("upgrade").unwrap(), "websocket");
        assert_eq!(h.get("te").unwrap(), "trailers");
        assert!(!h.contains_key("connection"));
    }

    #[test]
    fn each_hop_by_hop_header_goes_on_its_own() {
        // The bits `strip_hop_by_hop` relies on.
        assert!(*HOP_BY_HOP[0] == header::CONNECTION);
        assert!(*HOP_BY_HOP[TE_BIT.trailing_zeros() as usize] == header::TE);
        for name in HOP_BY_HOP.iter().map(|n| n.as_str()).chain(["upgrade"]) {
            for (keep_upgrade, keep_te) in [(false, false), (false, true)] {
                let mut h = hm(&[(name, "gzip"), ("x-kept", "yes")]);
                strip_hop_by_hop(&mut h, keep_upgrade, keep_te);
                assert!(!h.contains_key(name), "{name}");
                assert_eq!(h.len(), 1, "{name}");
            }
        }
        // Kept only when asked and only as `trailers`.
        let mut h = hm(&[("te", "trailers"), ("upgrade", "websocket")]);
        strip_hop_by_hop(&mut h, true, false);
        assert!(!h.contains_key("te"));
        assert_eq!(h.get("upgrade").unwrap(), "websocket");
    }

    #[test]
    fn ranges_hold_clients_of_either_family_by_their_mapped_form() {
        let holds = |net: &str, ip: &str| net_contains(&net.parse().unwrap(), ip.parse().unwrap());
        for (net, ip, expect) in [
            // IPv6 ranges that cover ::ffff:0:0/96 hold IPv4 clients, plain or mapped.
            ("::/0", "192.0.2.1", true),
            ("::/1", "192.0.2.1", true),
            ("::ffff:0:0/80", "192.0.2.1", true),
            ("::ffff:0:0/96", "::ffff:192.0.2.1", true),
            ("::ffff:192.0.2.0/120", "192.0.2.77", true),
            ("::ffff:192.0.2.0/120", "198.51.100.1", false),
            ("8000::/1", "192.0.2.1", false),
            ("2001:db8::/32", "192.0.2.1", false),
            ("::/0", "2001:db8::1", true),
            // IPv4 ranges hold IPv4-mapped clients, never other IPv6 ones.
            ("192.0.2.0/24", "::ffff:192.0.2.9", true),
            ("0.0.0.0/0", "::ffff:192.0.2.9", true),
            ("0.0.0.0/0", "2001:db8::1", false),
            ("0.0.0.0/0", "::192.0.2.9", false),
        ] {
            assert_eq!(holds(net, ip), expect, "{net} holds {ip}");
        }
        // trusted_proxies does not: trust comes from a range of the peer's own family.
        let v6 = ["::/0".parse().unwrap()];
        assert!(!is_trusted(&v6, "10.0.0.2".parse().unwrap()));
        assert!(!is_trusted(&v6, "::ffff:10.0.0.2".parse().unwrap()));
        assert!(is_trusted(&v6, "2001:db8::1".parse().unwrap()));
        let v4 = ["10.0.0.0/8".parse().unwrap()];
        assert!(is_trusted(&v4, "::ffff:10.0.0.2".parse().unwrap()));
        assert!(!is_trusted(
            &["10.0.0.0/8".parse().unwrap()],
            "2001:db8::1".parse().unwrap()
        ));
    }

    #[test]
    fn client_ip_walks_trusted_chain() {
        let trusted = vec!["10.0.0.0/8".parse().unwrap()];
        let h = hm(&[
            ("x-forwarded-for", "203.0.113.9, 198.51.100.1"),
            ("x-forwarded-for", "10.1.1.1"),
        ]);
        let peer: IpAddr = "10.0.0.2".parse().unwrap();
        assert_eq!(
            client_ip(&h, peer, &trusted, true),
            "198.51.100.1".parse::<IpAddr>().unwrap()
        );
        // An untrusted peer's header is ignored.
        let peer: IpAddr = "192.0.2.5".parse().unwrap();
        assert_eq!(client_ip(&h, peer, &trusted, false), peer);
        // Garbage stops the walk at the last good address.
        let h = hm(&[("x-forwarded-for", "nonsense, 10.2.2.2")]);
        assert_eq!(
            client_ip(&h, "10.0.0.2".parse().unwrap(), &trusted, true),
            "10.2.2.2".parse::<IpAddr>().unwrap()
        );
        // A hop that is not even text (a client's, with the address a trusted proxy appended
        // on the same line) does not hide that address: the client is not the proxy.
        let mut h = HeaderMap::new();
        h.append(
            "x-forwarded-for",
            HeaderValue::from_bytes(b"\x80, 203.0.113.5").unwrap(),
        );
        assert_eq!(
            client_ip(&h, "10.0.0.2".parse().unwrap(), &trusted, true),
            "203.0.113.5".parse::<IpAddr>().unwrap()
        );
        // And the chain sent upstream keeps that line.
        let info = ForwardInfo {
            peer: "10.0.0.2".parse().unwrap(),
            client_ip: "203.0.113.5".parse().unwrap(),
            peer_trusted: true,
            https: false,
            host: Some("h"),
            version: Version::HTTP_11,
            identity: None,
            early_data: false,
            close: None,
            max_request_body: None,
            bans: None,
        };
        let mut out = h.clone();
        forwarding(&h, &info, &HeaderValue::from_static("id")).apply(&mut out);
        assert_eq!(out["x-forwarded-for"], "\u{fffd}, 203.0.113.5, 10.0.0.2");
    }

    #[test]
    fn forwarding_line_starts_are_the_header_names() {
        for f in FWD {
            assert_eq!(f.line_start(), format!("{}: ", f.name()), "{f:?}");
        }
    }

    #[test]
    fn forwarding_headers_replace_untrusted_and_append_trusted() {
        let info = |trusted| ForwardInfo {
            peer: "2001:db8::7".parse().unwrap(),
            client_ip: "2001:db8::7".parse().unwrap(),
            peer_trusted: trusted,
            https: true,
            host: Some("api.example.com"),
            version: Version::HTTP_2,
            identity: None,
            early_data: false,
            close: None,
            max_request_body: None,
            bans: None,
        };
        let mut h = hm(&[
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-proto", "gopher"),
        ]);
        forwarding(&h, &info(false), &HeaderValue::from_static("id")).apply(&mut h);
        assert_eq!(h.get("x-forwarded-for").unwrap(), "2001:db8::7");
        assert_eq!(h.get("x-forwarded-proto").unwrap(), "https");
        assert_eq!(h.get("x-forwarded-host").unwrap(), "api.example.com");
        assert_eq!(
            h.get("forwarded").unwrap(),
            "for=\"[2001:db8::7]\";proto=https;host=api.example.com"
        );
        assert_eq!(h.get("via").unwrap(), "2 wraith");

        let mut h = hm(&[("x-forwarded-for", "203.0.113.1")]);
        forwarding(&h, &info(true), &HeaderValue::from_static("id")).apply(&mut h);
        assert_eq!(
            h.get("x-forwarded-for").unwrap(),
            "203.0.113.1, 2001:db8::7"
        );
    }

    #[test]
    fn ip_formatting() {
        for ip in [
            "0.0.0.0",
            "1.2.3.4",
            "10.20.30.40",
            "255.255.255.255",
            "192.168.100.9",
            "2001:db8::1",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            "::ffff:255.255.255.255",
            "1111:2222:3333:4444:5555:6666:255.255.255.255",
        ] {
            let parsed: IpAddr = ip.parse().unwrap();
            assert_eq!(IpText::of(parsed).as_str(), parsed.to_string());
        }
    }

    #[test]
    fn request_ids() {
        let h = hm(&[("x-request-id", "abc-123")]);
        assert_eq!(request_id(&h, true), "abc-123");
        assert_ne!(request_id(&h, false), "abc-123");
        let a = new_request_id();
        let b = new_request_id();
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
    }

    #[test]
    fn hosts() {
        assert_eq!(strip_port("example.com:8443"), "example.com");
        assert_eq!(strip_port("[::1]:8443"), "::1");
        assert_eq!(strip_port("[::1]"), "::1");
        assert_eq!(strip_port("example.com"), "example.com");
        assert_eq!(strip_port("example.com:"), "example.com");
        assert_eq!(strip_port(":80"), "");
        assert_eq!(strip_port("user@example.com:80"), "example.com");
        assert_eq!(strip_port("a:b:c"), "a:b:c");
        assert_eq!(strip_port("host:8x"), "host:8x");
        assert_eq!(strip_port("8080"), "8080");
    }
}
