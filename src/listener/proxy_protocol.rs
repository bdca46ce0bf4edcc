//! The PROXY protocol (HAProxy's, versions 1 and 2): the header a layer-4 load balancer
//! (HAProxy `send-proxy`, AWS NLB, ...) puts before a connection's bytes to say whose
//! connection it forwards. mTLS cannot be terminated before Wraith (the client certificate
//! would stay with the balancer), so behind a TCP balancer this header is the only way to
//! know the client's address: for bans, rate limits, per-client limits, X-Forwarded-For and
//! the logs.
//!
//! The header is read before anything else (TLS, HTTP), peeked at first and then consumed to
//! its exact length, so the bytes after it stay in the socket for the TLS or HTTP layer that
//! follows. Spec: <https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt>.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// The longest version 1 header, CRLF included (spec §2.1).
const V1_MAX: usize = 107;
const V1_PREFIX: &[u8] = b"PROXY ";
/// Version 2's signature (spec §2.2).
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// The most a version 2 header may take, addresses and TLVs included. The spec allows
/// 64 KiB; what balancers send (addresses, a VPC endpoint id, an SSL summary, a unique id)
/// fits a few hundred bytes.
pub const V2_MAX: usize = 4096;

/// What a header says about the connection: `None` when it forwards no addresses (v1
/// `UNKNOWN`, v2 `LOCAL` — the balancer's own health checks — or an address family other
/// than IPv4/IPv6), in which case the connection's own addresses stand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addresses {
    /// The client's address and port.
    pub source: SocketAddr,
    /// The address and port the client connected to (the balancer's front end).
    pub destination: SocketAddr,
}

/// Why a connection's PROXY header was refused.
#[derive(Debug)]
pub enum Error {
    /// The peer is not in `server.trusted_proxies`, which alone may send the header.
    Untrusted,
    /// The connection does not begin with a PROXY header.
    Missing,
    /// A header that breaks the spec.
    Malformed(&'static str),
    /// A version 2 header declaring more than `V2_MAX` bytes.
    TooLarge(usize),
    /// No complete header within the time allowed.
    Timeout,
    /// The peer closed the connection before the header was complete.
    Closed,
    /// The peer closed (or reset) the connection without sending anything: a balancer's
    /// TCP health check.
    Empty,
    Io(io::Error),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Untrusted => f.write_str(
                "the peer is not in server.trusted_proxies, which alone may send the PROXY protocol header",
            ),
            Error::Missing => {
                f.write_str("the connection does not begin with a PROXY protocol header")
            }
            Error::Malformed(what) => write!(f, "malformed PROXY protocol header: {what}"),
            Error::TooLarge(n) => write!(
                f,
                "PROXY protocol v2 header of {n} bytes (at most {V2_MAX} accepted)"
            ),
            Error::Timeout => {
                f.write_str("no complete PROXY protocol header within header_read_timeout")
            }
            Error::Closed => {
                f.write_str("connection closed before its PROXY protocol header was complete")
            }
            Error::Empty => f.write_str("connection closed before sending anything"),
            Error::Io(e) => write!(f, "reading the PROXY protocol header: {e}"),
        }
    }
}

/// A header found at the start of `buf`: its length and what it says.
#[derive(Debug, PartialEq, Eq)]
pub struct Header {
    pub len: usize,
    pub addresses: Option<Addresses>,
}

/// Reads the header `stream` begins with, within `timeout`, consuming exactly its bytes.
pub async fn read(stream: &mut TcpStream, timeout: Duration) -> Result<Option<Addresses>, Error> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = vec![0u8; V2_MAX];
    let mut seen = 0;
    let header = loop {
        let n =
            match tokio::time::timeout_at(deadline, super::conn::peek_more(stream, &mut buf, seen))
                .await
            {
                Err(_) => return Err(Error::Timeout),
                Ok(Err(_)) | Ok(Ok(0)) if seen == 0 => return Err(Error::Empty),
                Ok(Err(e)) => return Err(Error::Io(e)),
                Ok(Ok(n)) => n,
            };
        if let Some(header) = parse(&buf[..n])? {
            break header;
        }
        if n == seen {
            // No more will come: the peer closed its side (`peek_more`).
            return Err(Error::Closed);
        }
        seen = n;
    };
    // The bytes are there (peeked): this read does not wait.
    stream
        .read_exact(&mut buf[..header.len])
        .await
        .map_err(Error::Io)?;
    Ok(header.addresses)
}

/// The header at the start of `buf`; `None` while it is incomplete.
pub fn parse(buf: &[u8]) -> Result<Option<Header>, Error> {
    if buf.len() >= V2_SIGNATURE.len() && buf.starts_with(V2_SIGNATURE) {
        return parse_v2(buf);
    }
    if buf.starts_with(V1_PREFIX) {
        return parse_v1(buf);
    }
    // Part of either beginning, so far.
    let partial = |whole: &[u8]| whole.starts_with(&buf[..buf.len().min(whole.len())]);
    if partial(V1_PREFIX) || partial(V2_SIGNATURE) {
        return Ok(None);
    }
    Err(Error::Missing)
}

/// `PROXY TCP4 192.0.2.1 198.51.100.1 56324 443\r\n`, `PROXY UNKNOWN ...\r\n`.
fn parse_v1(buf: &[u8]) -> Result<Option<Header>, Error> {
    let window = &buf[..buf.len().min(V1_MAX)];
    let Some(lf) = window.iter().position(|&b| b == b'\n') else {
        if buf.len() >= V1_MAX {
            return Err(Error::Malformed("v1 line longer than 107 bytes"));
        }
        return Ok(None);
    };
    if lf == 0 || window[lf - 1] != b'\r' {
        return Err(Error::Malformed("v1 line not ended by CRLF"));
    }
    let line = std::str::from_utf8(&window[V1_PREFIX.len()..lf - 1])
        .map_err(|_| Error::Malformed("v1 line not ASCII"))?;
    let header = |addresses| {
        Ok(Some(Header {
            len: lf + 1,
            addresses,
        }))
    };
    if line == "UNKNOWN" || line.starts_with("UNKNOWN ") {
        // The balancer does not know (or will not say): the connection's own addresses.
        return header(None);
    }
    let mut fields = line.split(' ');
    let family = fields.next().unwrap_or_default();
    let (Some(src), Some(dst), Some(sport), Some(dport), None) = (
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
    ) else {
        return Err(Error::Malformed(
            "v1 line is not PROXY <family> <source> <destination> <source port> <destination port>",
        ));
    };
    let ip = |s: &str| -> Result<IpAddr, Error> {
        match family {
            "TCP4" => s.parse::<Ipv4Addr>().map(IpAddr::V4),
            "TCP6" => s.parse::<Ipv6Addr>().map(IpAddr::V6),
            _ => return Err(Error::Malformed("v1 family is not TCP4, TCP6 or UNKNOWN")),
        }
        .map_err(|_| Error::Malformed("v1 address not of its family"))
    };
    let port = |s: &str| -> Result<u16, Error> {
        // Decimal, no sign, no leading zero (spec §2.1).
        let plain = !s.is_empty()
            && s.bytes().all(|b| b.is_ascii_digit())
            && (s == "0" || !s.starts_with('0'));
        s.parse::<u16>()
            .ok()
            .filter(|_| plain)
            .ok_or(Error::Malformed("v1 port not a number in 0..=65535"))
    };
    header(Some(Addresses {
        source: SocketAddr::new(ip(src)?, port(sport)?),
        destination: SocketAddr::new(ip(dst)?, port(dport)?),
    }))
}

/// Version 2: the signature, version and command, family and transport, length, then
/// the addresses and TLVs.
fn parse_v2(buf: &[u8]) -> Result<Option<Header>, Error> {
    if buf.len() < 16 {
        return Ok(None);
    }
    if buf[12] >> 4 != 2 {
        return Err(Error::Malformed("v2 version is not 2"));
    }
    let local = match buf[12] & 0x0f {
        0 => true,
        1 => false,
        _ => return Err(Error::Malformed("v2 command is neither LOCAL nor PROXY")),
    };
    let family = buf[13];
    let len = 16 + usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if len > V2_MAX {
        return Err(Error::TooLarge(len));
    }
    if buf.len() < len {
        return Ok(None);
    }
    if local {
        // The balancer's own connection: the rest of the block, family included, is
        // ignored (spec §2.2), whatever its content.
        return Ok(Some(Header {
            len,
            addresses: None,
        }));
    }
    let body = &buf[16..len];
    let addresses_len = match family {
        0x00 => 0,
        0x11 => 12,
        0x21 => 36,
        // AF_UNIX over a stream: addresses Wraith cannot use; the connection's own stand.
        0x31 => 216,
        0x12 | 0x22 | 0x32 => {
            return Err(Error::Malformed("v2 header of a datagram (UDP) connection"))
        }
        _ => return Err(Error::Malformed("v2 address family or transport unknown")),
    };
    if body.len() < addresses_len {
        return Err(Error::Malformed("v2 length shorter than its addresses"));
    }
    // TLVs (type, 16-bit length, value) must fill the rest exactly; they are not used.
    let mut tlvs = &body[addresses_len..];
    while !tlvs.is_empty() {
        let value = match tlvs {
            [_, hi, lo, ..] => usize::from(u16::from_be_bytes([*hi, *lo])),
            _ => return Err(Error::Malformed("v2 TLV cut short")),
        };
        if tlvs.len() < 3 + value {
            return Err(Error::Malformed("v2 TLV longer than the header"));
        }
        tlvs = &tlvs[3 + value..];
    }
    let addresses = match family {
        0x11 => {
            let ip = |at: usize| {
                IpAddr::V4(Ipv4Addr::from(
                    <[u8; 4]>::try_from(&body[at..at + 4]).unwrap_or_default(),
                ))
            };
            let port = |at: usize| u16::from_be_bytes([body[at], body[at + 1]]);
            Some(Addresses {
                source: SocketAddr::new(ip(0), port(8)),
                destination: SocketAddr::new(ip(4), port(10)),
            })
        }
        0x21 => {
            let ip = |at: usize| {
                IpAddr::V6(Ipv6Addr::from(
                    <[u8; 16]>::try_from(&body[at..at + 16]).unwrap_or_default(),
                ))
            };
            let port = |at: usize| u16::from_be_bytes([body[at], body[at + 1]]);
            Some(Addresses {
                source: SocketAddr::new(ip(0), port(32)),
                destination: SocketAddr::new(ip(16), port(34)),
            })
        }
        _ => None,
    };
    Ok(Some(Header { len, addresses }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2(command: u8, family: u8, body: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.push(0x20 | command);
        h.push(family);
        h.extend_from_slice(&(body.len() as u16).to_be_bytes());
        h.extend_from_slice(body);
        h
    }

    fn inet(tlvs: &[u8]) -> Vec<u8> {
        let mut b = vec![192, 0, 2, 7, 198, 51, 100, 1];
        b.extend_from_slice(&50_000u16.to_be_bytes());
        b.extend_from_slice(&443u16.to_be_bytes());
        b.extend_from_slice(tlvs);
        b
    }

    fn addresses(src: &str, dst: &str) -> Option<Addresses> {
        Some(Addresses {
            source: src.parse().unwrap(),
            destination: dst.parse().unwrap(),
        })
    }

    /// Every prefix of a header is incomplete, not an error; the header then parses to its
    /// exact length whatever follows it.
    fn complete(header: &[u8]) -> Header {
        for n in 0..header.len() {
            assert!(
                matches!(parse(&header[..n]), Ok(None)),
                "prefix of {n} bytes: {:?}",
                parse(&header[..n])
            );
        }
        let mut with_request = header.to_vec();
        with_request.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
        let h = parse(&with_request).unwrap().unwrap();
        assert_eq!(h.len, header.len());
        h
    }

    fn refused(buf: &[u8]) -> String {
        match parse(buf) {
            Err(e) => e.to_string(),
            other => panic!("{buf:?} parsed: {other:?}"),
        }
    }

    #[test]
    fn v1_headers_give_their_addresses() {
        let h = complete(b"PROXY TCP4 192.0.2.7 198.51.100.1 50000 443\r\n");
        assert_eq!(
            h.addresses,
            addresses("192.0.2.7:50000", "198.51.100.1:443")
        );
        let h = complete(b"PROXY TCP6 2001:db8::7 2001:db8::1 0 65535\r\n");
        assert_eq!(
            h.addresses,
            addresses("[2001:db8::7]:0", "[2001:db8::1]:65535")
        );
        // UNKNOWN: whatever follows, the connection's own addresses stand.
        assert_eq!(complete(b"PROXY UNKNOWN\r\n").addresses, None);
        assert_eq!(
            complete(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n").addresses,
            None
        );
        // The longest lines there can be (the spec's 107 bytes is UNKNOWN's).
        let ffff = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff";
        let tcp6 = format!("PROXY TCP6 {ffff} {ffff} 65535 65535\r\n");
        assert!(complete(tcp6.as_bytes()).addresses.is_some());
        let unknown = format!("PROXY UNKNOWN {ffff} {ffff} 65535 65535\r\n");
        assert_eq!(unknown.len(), V1_MAX);
        assert_eq!(complete(unknown.as_bytes()).addresses, None);
    }

    #[test]
    fn v1_lines_off_the_spec_are_refused() {
        for (line, why) in [
            (
                &b"PROXY TCP4 192.0.2.7 198.51.100.1 50000 443\n"[..],
                "CRLF",
            ),
            (b"PROXY TCP4 192.0.2.7 198.51.100.1 050000 443\r\n", "port"),
            (b"PROXY TCP4 192.0.2.7 198.51.100.1 65536 443\r\n", "port"),
            (b"PROXY TCP4 192.0.2.7 198.51.100.1 +1 443\r\n", "port"),
            (b"PROXY TCP4 192.0.2.7 198.51.100.1  443\r\n", "port"),
            (b"PROXY TCP4 2001:db8::7 198.51.100.1 1 443\r\n", "family"),
            (b"PROXY TCP6 192.0.2.7 2001:db8::1 1 443\r\n", "family"),
            (b"PROXY TCP4 192.0.2.07 198.51.100.1 1 443\r\n", "family"),
            (
                b"PROXY UDP4 192.0.2.7 198.51.100.1 1 443\r\n",
                "TCP4, TCP6 or UNKNOWN",
            ),
            (b"PROXY TCP4 192.0.2.7 198.51.100.1 1\r\n", "<family>"),
            (b"PROXY TCP4 192.0.2.7 198.51.100.1 1 443 9\r\n", "<family>"),
            (b"PROXY TCP4 \xff\r\n", "ASCII"),
        ] {
            let e = refused(line);
            assert!(e.contains(why), "{:?}: {e}", String::from_utf8_lossy(line));
        }
        let endless = [b"PROXY ".as_slice(), &[b'x'; 200]].concat();
        assert!(refused(&endless).contains("longer than 107"));
    }

    #[test]
    fn a_connection_without_a_header_is_refused_at_its_first_bytes() {
        for start in [
            &b"G"[..],
            b"GET / HTTP/1.1\r\n",
            b"\x16\x03\x01",
            b"PROXYX",
            b"\r\n\r\n\0\r\nQUIx",
        ] {
            assert!(matches!(parse(start), Err(Error::Missing)), "{start:?}");
        }
        // Lower case is not the header either.
        assert!(matches!(parse(b"proxy TCP4"), Err(Error::Missing)));
    }

    #[test]
    fn v2_headers_give_their_addresses_and_skip_their_tlvs() {
        let h = complete(&v2(1, 0x11, &inet(&[])));
        assert_eq!(
            h.addresses,
            addresses("192.0.2.7:50000", "198.51.100.1:443")
        );
        // An AWS-style TLV (0xEA, a VPC endpoint id) and a NOOP of 0 bytes.
        let tlvs = [&[0xea, 0, 5][..], b"\x01vpce", &[0x04, 0, 0]].concat();
        let h = complete(&v2(1, 0x11, &inet(&tlvs)));
        assert_eq!(
            h.addresses,
            addresses("192.0.2.7:50000", "198.51.100.1:443")
        );
        let mut body = Vec::new();
        body.extend_from_slice(&"2001:db8::7".parse::<Ipv6Addr>().unwrap().octets());
        body.extend_from_slice(&"2001:db8::1".parse::<Ipv6Addr>().unwrap().octets());
        body.extend_from_slice(&[0xc3, 0x50, 0x01, 0xbb]);
        let h = complete(&v2(1, 0x21, &body));
        assert_eq!(
            h.addresses,
            addresses("[2001:db8::7]:50000", "[2001:db8::1]:443")
        );
    }

    #[test]
    fn v2_headers_without_a_client_leave_the_connections_addresses() {
        // LOCAL (a balancer's health check), with or without addresses.
        assert_eq!(complete(&v2(0, 0x00, &[])).addresses, None);
        assert_eq!(complete(&v2(0, 0x11, &inet(&[]))).addresses, None);
        // PROXY over AF_UNSPEC or AF_UNIX.
        assert_eq!(complete(&v2(1, 0x00, &[])).addresses, None);
        assert_eq!(complete(&v2(1, 0x31, &[0; 216])).addresses, None);
    }

    #[test]
    fn v2_local_ignores_its_family_and_the_rest_of_its_block() {
        // Spec §2.2: LOCAL's family is ignored, and so is what follows it, even a family
        // or a length that PROXY would be refused for.
        assert_eq!(complete(&v2(0, 0x11, &[])).addresses, None);
        assert_eq!(complete(&v2(0, 0x21, &inet(&[]))).addresses, None);
        assert_eq!(complete(&v2(0, 0x12, &inet(&[]))).addresses, None);
        assert_eq!(complete(&v2(0, 0x41, &[0xea, 0])).addresses, None);
        // Its length still frames it, and still has a limit.
        let mut large = v2(0, 0x00, &[]);
        large[14..16].copy_from_slice(&(V2_MAX as u16).to_be_bytes());
        assert!(matches!(parse(&large), Err(Error::TooLarge(_))));
    }

    #[test]
    fn v2_headers_off_the_spec_are_refused() {
        let mut wrong_version = v2(1, 0x11, &inet(&[]));
        wrong_version[12] = 0x11;
        assert!(refused(&wrong_version).contains("version"));
        assert!(refused(&v2(2, 0x11, &inet(&[]))).contains("command"));
        assert!(refused(&v2(1, 0x12, &inet(&[]))).contains("datagram"));
        assert!(refused(&v2(1, 0x13, &inet(&[]))).contains("unknown"));
        assert!(refused(&v2(1, 0x41, &inet(&[]))).contains("unknown"));
        assert!(refused(&v2(1, 0x11, &[0; 11])).contains("shorter than its addresses"));
        assert!(refused(&v2(1, 0x21, &inet(&[]))).contains("shorter than its addresses"));
        assert!(refused(&v2(1, 0x11, &inet(&[0xea, 0]))).contains("cut short"));
        assert!(refused(&v2(1, 0x11, &inet(&[0xea, 0, 9, 1]))).contains("longer than the header"));
        // Declared larger than accepted: refused from its first 16 bytes.
        let mut large = v2(1, 0x11, &[]);
        large[14..16].copy_from_slice(&(V2_MAX as u16).to_be_bytes());
        assert!(matches!(parse(&large), Err(Error::TooLarge(n)) if n == V2_MAX + 16));
    }
}
