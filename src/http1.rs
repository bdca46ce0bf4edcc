//! HTTP/1.1 wire pieces both codecs use: the server side (`listener::h1`, requests from
//! clients) and the client side (`upstream::h1`, responses from upstreams). Chunked decoding
//! (RFC 9112 §7.1), header token lists and `Content-Length` values.

use bytes::{Buf, Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue};
use http::HeaderMap;

/// Largest chunk-size line (with extensions).
pub(crate) const MAX_CHUNK_LINE: usize = 4096;
/// Largest trailer section.
pub(crate) const MAX_TRAILERS: usize = 16 * 1024;

/// A deadline timer for a deadline that keeps moving later (the next request's idle or
/// response timeout), moved lazily: left set to an earlier deadline, it fires there and is
/// only then set to the current one. A connection that serves requests promptly touches the
/// timer wheel about once per timeout, not once per request (a `tokio::time::timeout` per
/// request registers and removes an entry each time). Made on first use.
#[derive(Default)]
pub(crate) struct LazyDeadline {
    timer: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    /// What `timer` is set to.
    armed: Option<tokio::time::Instant>,
}

impl LazyDeadline {
    /// `Ready` once `due` has passed; otherwise the task is woken by then (perhaps earlier,
    /// spuriously, at an older deadline).
    pub(crate) fn poll_until(
        &mut self,
        due: tokio::time::Instant,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        use std::future::Future;
        use std::task::Poll;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
        loop {
            if self.armed.is_none_or(|armed| armed > due) {
                timer.as_mut().reset(due);
                self.armed = Some(due);
            }
            if timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            if tokio::time::Instant::now() >= due {
                self.armed = None;
                return Poll::Ready(());
            }
            // Fired at an earlier deadline: on to the current one.
            timer.as_mut().reset(due);
            self.armed = Some(due);
        }
    }
}

/// A header value as httparse handed it over, without checking its bytes a second time
/// (`HeaderValue::from_maybe_shared` walks every byte again: ~150 instructions for a
/// typical value, on every header of every request and response).
pub(crate) fn parsed_value(bytes: Bytes) -> HeaderValue {
    // SAFETY (an invariant, not memory safety): httparse, with the default `ParserConfig`
    // both codecs use, accepts exactly HTAB, SP..=`~` and 0x80..=0xFF in a value, which is
    // `HeaderValue`'s own alphabet (`value_alphabet_is_headervalue_s` checks every byte
    // against the httparse in use). Debug builds check each value anyway.
    unsafe { HeaderValue::from_maybe_shared_unchecked(bytes) }
}

/// Appends one field line, `name: value` and CRLF, to a head being encoded.
pub(crate) fn write_field(out: &mut Vec<u8>, name: &HeaderName, value: &HeaderValue) {
    out.extend_from_slice(name.as_str().as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Where a chunked decoder is in the body.
#[derive(Clone, Copy, Debug)]
pub(crate) enum ChunkState {
    Size,
    Data(u64),
    DataEnd,
    Trailers,
}

/// Who sent a chunked body. Clients get the strict reading: every line ends with CRLF
/// (RFC 9112 §7.1); a bare LF, which another hop in front of Wraith might read differently
/// (the chunk-extension and bare-LF desyncs), is an error. Upstreams get the lenient reading
/// RFC 9112 §2.2 allows a recipient (a bare LF ends a line): what they send is re-framed for
/// the client, never passed on as is.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Peer {
    Client,
    Upstream,
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Peer::Client => "the client",
            Peer::Upstream => "upstream",
        })
    }
}

pub(crate) enum Decoded {
    Data(Bytes, ChunkState),
    Continue(ChunkState),
    NeedMore(ChunkState),
    End(Option<HeaderMap>),
}

/// One step of the chunked decoder over the buffered bytes.
pub(crate) fn decode_chunk(
    state: ChunkState,
    buf: &mut BytesMut,
    peer: Peer,
) -> Result<Decoded, String> {
    let strict = peer == Peer::Client;
    match state {
        ChunkState::Size => {
            let nl = buf.iter().position(|&b| b == b'\n');
            if nl.unwrap_or(buf.len()) > MAX_CHUNK_LINE {
                return Err(format!("chunk-size line too long from {peer}"));
            }
            let Some(nl) = nl else {
                return Ok(Decoded::NeedMore(state));
            };
            let line = &buf[..nl];
            if strict && !line.ends_with(b"\r") {
                return Err(format!("chunk-size line not ended by CRLF from {peer}"));
            }
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let digits = line
                .iter()
                .position(|b| !b.is_ascii_hexdigit())
                .unwrap_or(line.len());
            // chunk-size [ BWS ";" chunk-ext ]: after the size only whitespace, then nothing
            // or an extension (ignored), with no control characters but HTAB in it.
            // Strict: only SP and HTAB before the extension, and no control character but HTAB
            // anywhere after the size (a lone CR or a form feed would be a line end or
            // whitespace to some other parser).
            if strict
                && line[digits..]
                    .iter()
                    .any(|&b| b.is_ascii_control() && b != b'\t')
            {
                return Err(format!("invalid chunk size from {peer}"));
            }
            let rest = line[digits..].trim_ascii_start();
            if digits == 0
                || digits > 15
                || !(rest.is_empty() || rest.starts_with(b";"))
                || rest.iter().any(|&b| b.is_ascii_control() && b != b'\t')
            {
                return Err(format!("invalid chunk size from {peer}"));
            }
            let size = std::str::from_utf8(&line[..digits])
                .ok()
                .and_then(|s| u64::from_str_radix(s, 16).ok())
                .ok_or_else(|| format!("invalid chunk size from {peer}"))?;
            buf.advance(nl + 1);
            Ok(Decoded::Continue(if size == 0 {
                ChunkState::Trailers
            } else {
                ChunkState::Data(size)
            }))
        }
        ChunkState::Data(remaining) => {
            if buf.is_empty() {
                return Ok(Decoded::NeedMore(state));
            }
            let n = (buf.len() as u64).min(remaining) as usize;
            let data = buf.split_to(n).freeze();
            let left = remaining - n as u64;
            Ok(Decoded::Data(
                data,
                if left == 0 {
                    ChunkState::DataEnd
                } else {
                    ChunkState::Data(left)
                },
            ))
        }
        ChunkState::DataEnd => {
            if buf.len() < 2 {
                if buf.first() == Some(&b'\n') && !strict {
                    buf.advance(1);
                    return Ok(Decoded::Continue(ChunkState::Size));
                }
                return Ok(Decoded::NeedMore(state));
            }
            if &buf[..2] == b"\r\n" {
                buf.advance(2);
            } else if buf[0] == b'\n' && !strict {
                buf.advance(1);
            } else {
                return Err(format!("missing CRLF after chunk data from {peer}"));
            }
            Ok(Decoded::Continue(ChunkState::Size))
        }
        ChunkState::Trailers => {
            // The trailer section ends with the first empty line (CRLF or a bare LF); parse it
            // whole once complete.
            let mut start = 0;
            let mut end = None;
            while let Some(i) = buf[start..].iter().position(|&b| b == b'\n') {
                let nl = start + i;
                if strict && !buf[start..nl].ends_with(b"\r") {
                    return Err(format!("trailer line not ended by CRLF from {peer}"));
                }
                if buf[start..nl]
                    .strip_suffix(b"\r")
                    .unwrap_or(&buf[start..nl])
                    .is_empty()
                {
                    end = Some((start, nl + 1));
                    break;
                }
                start = nl + 1;
            }
            if end.map_or(buf.len(), |(fields_end, _)| fields_end) > MAX_TRAILERS {
                return Err(format!("trailer section too large from {peer}"));
            }
            let Some((fields_end, consumed)) = end else {
                return Ok(Decoded::NeedMore(state));
            };
            let mut trailers = HeaderMap::new();
            for line in buf[..fields_end].split(|&b| b == b'\n') {
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                if line.is_empty() {
                    continue;
                }
                let colon = line
                    .iter()
                    .position(|&b| b == b':')
                    .ok_or_else(|| format!("invalid trailer from {peer}"))?;
                let name = HeaderName::from_bytes(&line[..colon])
                    .map_err(|_| format!("invalid trailer name from {peer}"))?;
                let value = HeaderValue::from_bytes(trim(&line[colon + 1..]))
                    .map_err(|_| format!("invalid trailer value from {peer}"))?;
                trailers.append(name, value);
            }
            buf.advance(consumed);
            Ok(Decoded::End((!trailers.is_empty()).then_some(trailers)))
        }
    }
}

pub(crate) fn trim(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &b[start..end]
}

/// The non-empty comma-separated tokens of a header value, trimmed.
pub(crate) fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

/// `1*DIGIT`, no sign, no overflow.
pub(crate) fn parse_length(s: &[u8]) -> Option<u64> {
    if s.is_empty() {
        return None;
    }
    s.iter().try_fold(0u64, |n, &b| {
        if b.is_ascii_digit() {
            n.checked_mul(10)?.checked_add(u64::from(b - b'0'))
        } else {
            None
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `parsed_value` relies on httparse accepting no byte in a header value that
    /// `HeaderValue` refuses: checked for every byte, in requests and in responses, against
    /// the httparse version in use.
    #[test]
    fn value_alphabet_is_headervalue_s() {
        for b in 0..=255u8 {
            let value = [b'a', b, b'b'];
            let mut req = b"GET / HTTP/1.1\r\nx: ".to_vec();
            req.extend_from_slice(&value);
            req.extend_from_slice(b"\r\n\r\n");
            let mut headers = [httparse::EMPTY_HEADER; 4];
            let mut parsed = httparse::Request::new(&mut headers);
            if let Ok(httparse::Status::Complete(_)) = parsed.parse(&req) {
                let v = parsed.headers[0].value;
                assert!(HeaderValue::from_bytes(v).is_ok(), "request byte {b:#04x}");
            }
            let mut resp = b"HTTP/1.1 200 OK\r\nx: ".to_vec();
            resp.extend_from_slice(&value);
            resp.extend_from_slice(b"\r\n\r\n");
            let mut headers = [httparse::EMPTY_HEADER; 4];
            let mut parsed = httparse::Response::new(&mut headers);
            if let Ok(httparse::Status::Complete(_)) = parsed.parse(&resp) {
                let v = parsed.headers[0].value;
                assert!(HeaderValue::from_bytes(v).is_ok(), "response byte {b:#04x}");
            }
        }
    }

    fn chunks(input: &[u8]) -> Result<(Vec<u8>, Option<HeaderMap>), String> {
        let mut buf = BytesMut::from(input);
        let mut state = ChunkState::Size;
        let mut out = Vec::new();
        loop {
            match decode_chunk(state, &mut buf, Peer::Upstream)? {
                Decoded::Data(d, s) => {
                    out.extend_from_slice(&d);
                    state = s;
                }
                Decoded::Continue(s) => state = s,
                Decoded::NeedMore(_) => return Err("need more".into()),
                Decoded::End(t) => return Ok((out, t)),
            }
        }
    }

    #[test]
    fn chunked_decoding() {
        let (data, trailers) = chunks(b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n").unwrap();
        assert_eq!(data, b"hello world");
        assert!(trailers.is_none());
        let (data, trailers) =
            chunks(b"3\r\nabc\r\n0\r\ngrpc-status: 0\r\nx-t: y\r\n\r\n").unwrap();
        assert_eq!(data, b"abc");
        let t = trailers.unwrap();
        assert_eq!(t["grpc-status"], "0");
        assert_eq!(t["x-t"], "y");
        assert!(chunks(b"zz\r\n").is_err());
        assert!(chunks(b"5\r\nhelloXX").is_err());
        assert!(chunks(b"ffffffffffffffffff\r\n").is_err());
        assert_eq!(chunks(b"5\r\nhel").unwrap_err(), "need more");
        // Whitespace before an extension is allowed; anything else after the size is not.
        assert_eq!(chunks(b"3 ;x=y\r\nabc\r\n0\r\n\r\n").unwrap().0, b"abc");
        assert!(chunks(b"5 6\r\nhello\r\n0\r\n\r\n").is_err());
        assert!(chunks(b"3;x\x00y\r\nabc\r\n0\r\n\r\n").is_err());
        assert!(chunks(b"3;x\ry\r\nabc\r\n0\r\n\r\n").is_err());
        // Limits hold when the terminator came in the same read.
        let mut long = b"3;".to_vec();
        long.extend(std::iter::repeat_n(b'x', MAX_CHUNK_LINE));
        long.extend_from_slice(b"\r\nabc\r\n0\r\n\r\n");
        assert!(chunks(&long).is_err());
        let mut trailers = b"0\r\n".to_vec();
        for i in 0..MAX_TRAILERS / 10 {
            trailers.extend_from_slice(format!("x-{i}: v\r\n").as_bytes());
        }
        trailers.extend_from_slice(b"\r\n");
        assert_eq!(
            chunks(&trailers).unwrap_err(),
            "trailer section too large from upstream"
        );
        // The section ends at its first empty line, whatever the line endings.
        let mut b = BytesMut::from(&b"0\r\nx: y\n\r\nHTTP/1.1 200 OK\r\n\r\n"[..]);
        let mut state = ChunkState::Size;
        loop {
            match decode_chunk(state, &mut b, Peer::Upstream).unwrap() {
                Decoded::Continue(s) => state = s,
                Decoded::End(t) => {
                    assert_eq!(t.unwrap()["x"], "y");
                    break;
                }
                _ => panic!("unexpected"),
            }
        }
        assert_eq!(
            &b[..],
            b"HTTP/1.1 200 OK\r\n\r\n",
            "the next bytes are left alone"
        );
    }

    #[test]
    fn clients_must_end_every_chunk_line_with_crlf() {
        let strict = |input: &[u8]| {
            let mut buf = BytesMut::from(input);
            let mut state = ChunkState::Size;
            let mut out = Vec::new();
            loop {
                match decode_chunk(state, &mut buf, Peer::Client)? {
                    Decoded::Data(d, s) => {
                        out.extend_from_slice(&d);
                        state = s;
                    }
                    Decoded::Continue(s) => state = s,
                    Decoded::NeedMore(_) => return Err("need more".to_string()),
                    Decoded::End(_) => return Ok(out),
                }
            }
        };
        assert_eq!(
            strict(b"5\r\nhello\r\n0\r\nx: y\r\n\r\n").unwrap(),
            b"hello"
        );
        for bad in [
            &b"5\nhello\r\n0\r\n\r\n"[..],
            b"2;ext\nxx\r\n0\r\n\r\n",
            b"5\r\nhello\n0\r\n\r\n",
            b"5\r\nhello\r\n0\r\nx: y\n\r\n",
            b"5\r\nhello\r\n0\r\n\n",
            b"5\r\r\nhello\r\n0\r\n\r\n",
            b"5\r;x\r\nhello\r\n0\r\n\r\n",
            b"5\x0c\r\nhello\r\n0\r\n\r\n",
        ] {
            assert!(
                strict(bad).is_err_and(|e| e != "need more"),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
            // The same bytes from an upstream are read leniently.
            let mut buf = BytesMut::from(bad);
            let mut state = ChunkState::Size;
            let ok = loop {
                match decode_chunk(state, &mut buf, Peer::Upstream) {
                    Ok(Decoded::Data(_, s)) | Ok(Decoded::Continue(s)) => state = s,
                    Ok(Decoded::End(_)) => break true,
                    _ => break false,
                }
            };
            assert!(ok, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    /// Decodes `input` delivered in the pieces `cuts` marks, as a connection would: bytes are
    /// appended and the decoder runs until it needs more. The body, the trailers and the bytes
    /// left after the body, or the error; "incomplete" when the input ran out.
    fn decode_in_pieces(input: &[u8], cuts: &[usize], peer: Peer) -> Result<Decoded2, String> {
        let mut buf = BytesMut::new();
        let mut state = ChunkState::Size;
        let mut body = Vec::new();
        let mut from = 0;
        for &to in cuts.iter().chain(std::iter::once(&input.len())) {
            buf.extend_from_slice(&input[from..to]);
            from = to;
            loop {
                match decode_chunk(state, &mut buf, peer)? {
                    Decoded::Data(d, s) => {
                        body.extend_from_slice(&d);
                        state = s;
                    }
                    Decoded::Continue(s) => state = s,
                    Decoded::NeedMore(s) => {
                        state = s;
                        break;
                    }
                    Decoded::End(t) => {
                        let trailers = t.map(|t| format!("{t:?}"));
                        buf.extend_from_slice(&input[from..]);
                        return Ok((body, trailers, buf.to_vec()));
                    }
                }
            }
        }
        Err("incomplete".into())
    }

    type Decoded2 = (Vec<u8>, Option<String>, Vec<u8>);

    /// A small deterministic generator (xorshift64*): the same cases on every run.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// How a body arrives in pieces must not change how it is read: a decoder that answers
    /// differently for the same bytes split differently is what a desync is made of. Valid
    /// chunked bodies (extensions, trailers, bytes after the end) decode to what was encoded
    /// for both peers, whatever the split; the same bodies with bytes flipped, inserted or
    /// cut give one outcome per peer, whatever the split, and never a panic.
    #[test]
    fn any_split_of_the_same_bytes_decodes_the_same() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let noise = b"\r\n;: \t0aF\x00\x0cxG-";
        // Outcomes of the damaged bodies: refused, read anyway, cut short.
        let mut outcomes = [0usize; 3];
        for case in 0..3000 {
            // A valid body.
            let mut body = Vec::new();
            let mut wire = Vec::new();
            for _ in 0..rng.below(4) {
                let len = 1 + rng.below(40);
                let chunk: Vec<u8> = (0..len).map(|_| rng.below(256) as u8).collect();
                wire.extend_from_slice(format!("{len:x}").as_bytes());
                if rng.below(4) == 0 {
                    wire.extend_from_slice(b" ;name=\"v\"");
                }
                wire.extend_from_slice(b"\r\n");
                wire.extend_from_slice(&chunk);
                wire.extend_from_slice(b"\r\n");
                body.extend_from_slice(&chunk);
            }
            wire.extend_from_slice(b"0\r\n");
            if rng.below(3) == 0 {
                wire.extend_from_slice(b"grpc-status: 0\r\n");
            }
            wire.extend_from_slice(b"\r\n");
            let end = wire.len();
            if rng.below(3) == 0 {
                wire.extend_from_slice(b"GET /next HTTP/1.1\r\n");
            }
            let cuts = |rng: &mut Rng, len: usize| {
                let mut c: Vec<usize> = (0..rng.below(6)).map(|_| rng.below(len + 1)).collect();
                c.sort_unstable();
                c
            };
            for peer in [Peer::Client, Peer::Upstream] {
                let whole = decode_in_pieces(&wire, &[], peer);
                let (got, _, rest) = whole.clone().unwrap_or_else(|e| panic!("case {case}: {e}"));
                assert_eq!(got, body, "case {case}");
                assert_eq!(rest, &wire[end..], "case {case}");
                let split = cuts(&mut rng, wire.len());
                assert_eq!(
                    decode_in_pieces(&wire, &split, peer),
                    whole,
                    "case {case} {split:?}"
                );
            }
            // The same, damaged.
            let mut bad = wire.clone();
            for _ in 0..1 + rng.below(3) {
                let at = rng.below(bad.len());
                match rng.below(3) {
                    0 => bad[at] = noise[rng.below(noise.len())],
                    1 => bad.insert(at, noise[rng.below(noise.len())]),
                    _ => {
                        bad.remove(at);
                    }
                }
                if bad.is_empty() {
                    break;
                }
            }
            for peer in [Peer::Client, Peer::Upstream] {
                let whole = decode_in_pieces(&bad, &[], peer);
                outcomes[match &whole {
                    Err(e) if e == "incomplete" => 2,
                    Err(_) => 0,
                    Ok(_) => 1,
                }] += 1;
                for _ in 0..3 {
                    let split = cuts(&mut rng, bad.len());
                    assert_eq!(
                        decode_in_pieces(&bad, &split, peer),
                        whole,
                        "case {case}, {peer}, {:?} split at {split:?}",
                        String::from_utf8_lossy(&bad)
                    );
                }
            }
        }
        // The damage reached every path (a generator that only made valid bodies would
        // prove nothing).
        assert!(outcomes.iter().all(|&n| n > 200), "{outcomes:?}");
    }
}
