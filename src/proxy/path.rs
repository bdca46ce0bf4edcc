//! Request path normalization, before routing and forwarding: what Wraith matches is exactly
//! what the upstream receives. Without it, `/api/../admin` would match an `/api/` route and
//! reach the upstream's `/admin`.
//!
//! RFC 3986 §6.2.2: percent-encoded unreserved characters are decoded, remaining escapes get
//! uppercase hex, and dot segments are removed (§5.2.4). Runs of slashes become one (as
//! nginx's `merge_slashes`). Encoded slashes (`%2F`) stay encoded.
//!
//! Some forms are refused outright (400, see `refused`), because common upstreams read them
//! differently from Wraith and a route or policy on the path could be walked around:
//! backslashes (IIS, Windows and some Node servers read them as `/`), encoded backslashes and
//! NULs, dot segments with path parameters (`..;`, which Tomcat and Spring read as `..`), and
//! dot segments beside an encoded slash (`..%2F`: nginx and others decode `%2F` before they
//! resolve dot segments, so `/public/..%2Fadmin` would reach their `/admin`).
//! Other path parameters are left out of what routing and policy see (`without_params`).

/// Whether `path` needs none of the work below, decided in one scan: it starts with `/` and
/// holds no byte `refused`, `normalize` or `without_params` look for (`\`, `%`, `;`) and no
/// `/.` or `//`. Nearly every request's path is plain, and then those three (three to five
/// scans) can be skipped: `refused` is `None`, `normalize` is `None` and `without_params`
/// borrows (`plain_paths_need_no_work` checks it over every short path of the bytes that
/// matter).
pub fn is_plain(path: &str) -> bool {
    let b = path.as_bytes();
    if b.first() != Some(&b'/') {
        return false;
    }
    let mut prev = b'/';
    for &c in &b[1..] {
        match c {
            b'\\' | b'%' | b';' => return false,
            b'.' | b'/' if prev == b'/' => return false,
            _ => {}
        }
        prev = c;
    }
    true
}

/// Why `path` is refused, if it is: a form upstreams commonly read differently.
pub fn refused(path: &str) -> Option<&'static str> {
    let b = path.as_bytes();
    if b.contains(&b'\\') {
        return Some("backslash in the request path");
    }
    let has_escape = b.contains(&b'%');
    if has_escape
        && b.windows(3).any(|w| {
            w[0] == b'%'
                && ((w[1] == b'5' && w[2] | 0x20 == b'c') || (w[1] == b'0' && w[2] == b'0'))
        })
    {
        return Some("encoded backslash or NUL in the request path");
    }
    if has_escape
        && b.windows(3)
            .any(|w| w[0] == b'%' && w[1] == b'2' && w[2] | 0x20 == b'f')
    {
        let decoded = decode_unreserved(path);
        let dotted = decoded
            .split('/')
            .filter(|seg| seg.contains("%2F"))
            .any(|seg| {
                // (With its parameters left out: `..;x%2F` is a dot segment to Tomcat too.)
                seg.split("%2F")
                    .map(|p| p.split(';').next().unwrap_or(p))
                    .any(|p| p == "." || p == "..")
            });
        if dotted {
            return Some("dot segment beside an encoded slash in the request path");
        }
    }
    if b.contains(&b';') {
        let decoded = decode_unreserved(path);
        let dotted = decoded.split('/').any(|seg| {
            seg.split_once(';')
                .is_some_and(|(head, _)| head == "." || head == "..")
        });
        if dotted {
            return Some("dot segment with path parameters in the request path");
        }
    }
    None
}

/// The normalized form of `path`, or `None` when it is already normal (the common case, which
/// costs one scan and no allocation).
pub fn normalize(path: &str) -> Option<String> {
    if !needs_work(path) {
        return None;
    }
    let decoded = decode_unreserved(path);
    let out = remove_dot_segments(&decoded);
    (out != path).then_some(out)
}

fn needs_work(path: &str) -> bool {
    let b = path.as_bytes();
    b.contains(&b'%') || b.windows(2).any(|w| w == b"/." || w == b"//") || !path.starts_with('/')
}

fn decode_unreserved(path: &str) -> String {
    let b = path.as_bytes();
    let mut out: Vec<u8> = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                let c = h * 16 + l;
                if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') {
                    out.push(c);
                } else {
                    out.push(b'%');
                    out.push(b[i + 1].to_ascii_uppercase());
                    out.push(b[i + 2].to_ascii_uppercase());
                }
                i += 3;
                continue;
            }
        }
        // Byte for byte: UTF-8 in the path (which `http` accepts) stays what it was.
        out.push(b[i]);
        i += 1;
    }
    // Only ASCII was decoded, so the bytes are still the UTF-8 they came as.
    String::from_utf8(out).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// The value of one hex digit.
pub(crate) fn hex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// The path routing and policy judge: `path` with the parameters of each segment
/// (`;jsessionid=...`, `;x`) left out, as Tomcat, Jetty and Spring read it before they
/// match. Routed on the path as sent, `/api/admin;x/users` would miss an `/api/admin/`
/// route (and a policy on that path) and reach a Java upstream as `/api/admin/users`; judged
/// without the parameters it meets the same rules. The upstream still gets the path as sent.
/// Borrowed (no cost) when there is no `;`.
pub fn without_params(path: &str) -> std::borrow::Cow<'_, str> {
    if !path.as_bytes().contains(&b';') {
        return std::borrow::Cow::Borrowed(path);
    }
    // A segment that is only parameters (`/api/;x/admin`) leaves an empty one, which those
    // servers then merge away as they do `//`: so does this (keeping a trailing slash).
    let mut out = String::with_capacity(path.len());
    let segments: Vec<&str> = path
        .split('/')
        .map(|seg| seg.split_once(';').map_or(seg, |(head, _)| head))
        .collect();
    let last = segments.len() - 1;
    for (i, seg) in segments.iter().enumerate() {
        if !seg.is_empty() {
            out.push('/');
            out.push_str(seg);
        } else if i == last {
            out.push('/');
        }
    }
    if out.is_empty() {
        out.push('/');
    }
    std::borrow::Cow::Owned(out)
}

/// RFC 3986 §5.2.4, on an absolute path. The result always starts with `/`.
fn remove_dot_segments(path: &str) -> String {
    let mut segments: Vec<&str> = Vec::new();
    let trailing_slash = path.ends_with('/') || path.ends_with("/.") || path.ends_with("/..");
    for seg in path.split('/').skip(usize::from(path.starts_with('/'))) {
        match seg {
            // Empty segments: runs of slashes merge (a trailing slash is re-added below).
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(path.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if out.is_empty() || (trailing_slash && !out.ends_with('/')) {
        out.push('/');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{is_plain, normalize, refused, without_params};

    /// Every path of up to five bytes from the ones the checks look at: a plain one needs no
    /// work from any of them.
    #[test]
    fn plain_paths_need_no_work() {
        const BYTES: &[u8] = b"/.%;\\a2fF5c0";
        let mut paths = vec![String::new()];
        let mut plain = 0;
        for _ in 0..5 {
            let mut longer = Vec::new();
            for p in &paths {
                for &b in BYTES {
                    let mut q = p.clone();
                    q.push(b as char);
                    longer.push(q);
                }
            }
            for p in &longer {
                if is_plain(p) {
                    plain += 1;
                    assert_eq!(refused(p), None, "{p}");
                    assert_eq!(normalize(p), None, "{p}");
                    assert!(
                        matches!(without_params(p), std::borrow::Cow::Borrowed(_)),
                        "{p}"
                    );
                }
            }
            paths = longer;
        }
        assert!(plain > 1000, "only {plain} plain paths");
        for p in ["/", "/api/v1/users", "/a.b/c-d_e~f", "/x/"] {
            assert!(is_plain(p), "{p}");
        }
        for p in [
            "", "*", "a/b", "//", "/./", "/a/..", "/a%41", "/a;b", "/a\\b", "/a//b",
        ] {
            assert!(!is_plain(p), "{p}");
        }
    }

    #[test]
    fn path_parameters_are_left_out_for_routing() {
        assert_eq!(without_params("/api/admin;x/users"), "/api/admin/users");
        assert_eq!(without_params("/a;b=c;d/e;jsessionid=1"), "/a/e");
        assert_eq!(without_params("/;x/y"), "/y");
        assert_eq!(without_params("/api/;x/admin"), "/api/admin");
        assert_eq!(without_params("/api/admin;x/"), "/api/admin/");
        assert_eq!(without_params("/;x"), "/");
        assert_eq!(without_params("/plain/path"), "/plain/path");
        assert!(matches!(
            without_params("/plain"),
            std::borrow::Cow::Borrowed(_)
        ));
    }

    fn n(p: &str) -> String {
        normalize(p).unwrap_or_else(|| p.to_string())
    }

    #[test]
    fn dot_segments() {
        assert_eq!(n("/api/../admin"), "/admin");
        assert_eq!(n("/api/./x"), "/api/x");
        assert_eq!(n("/../../etc/passwd"), "/etc/passwd");
        assert_eq!(n("/a/b/.."), "/a/");
        assert_eq!(n("/a/b/."), "/a/b/");
        assert_eq!(n("/a//b"), "/a/b");
        assert_eq!(n("//evil.example/x"), "/evil.example/x");
        assert_eq!(n("/a/b//"), "/a/b/");
        assert_eq!(n("/"), "/");
        assert_eq!(n("/a/.hidden"), "/a/.hidden");
        assert_eq!(n("/a/..."), "/a/...");
    }

    #[test]
    fn percent_encoding() {
        assert_eq!(n("/api/%2e%2e/admin"), "/admin");
        assert_eq!(n("/%61pi"), "/api");
        assert_eq!(n("/a%2fb"), "/a%2Fb");
        assert_eq!(n("/a%2Fb"), "/a%2Fb");
        assert_eq!(n("/a%zz"), "/a%zz");
        assert_eq!(n("/a%4"), "/a%4");
    }

    #[test]
    fn forms_upstreams_read_differently_are_refused() {
        use super::refused;
        for p in [
            "/api/..\\admin",
            "/api/%5cadmin",
            "/api/%5Cadmin",
            "/a%00b",
            "/api/..;/admin",
            "/api/.;/admin",
            "/api/%2e%2e;x=1/admin",
            "/public/..%2Fadmin/x",
            "/public/..%2fadmin",
            "/a/%2e%2e%2fb",
            "/a/%2F..",
            "/a/.%2Fb",
            "/a/x%2F..%2F..%2Fadmin",
            "/a/x%2F..;%2F..;/admin",
        ] {
            assert!(refused(p).is_some(), "{p}");
        }
        for p in [
            "/api/v1;jsessionid=1",
            "/a/b",
            "/a%2Fb",
            "/..x;y",
            "/a;b/c",
            "/files/a%2F.hidden",
            "/files/..x%2Fy",
        ] {
            assert!(refused(p).is_none(), "{p}");
        }
    }

    #[test]
    fn utf8_paths_stay_utf8() {
        assert_eq!(n("/café/%41/../x"), "/café/x");
    }

    #[test]
    fn normal_paths_cost_nothing() {
        assert!(normalize("/api/v1/users").is_none());
        assert!(normalize("/").is_none());
    }
}
