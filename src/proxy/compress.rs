//! Response compression, per route (off by default: compressing secrets next to
//! attacker-controlled text leaks them, see BREACH).
//!
//! The coding is negotiated from Accept-Encoding (zstd, br, gzip, in the route's order of
//! preference, honouring q-values) and applied while the body streams: data is fed to the
//! encoder as it arrives and flushed whenever the upstream pauses, so a slow or endless
//! stream (server-sent events) reaches the client without waiting for the end. Levels are the
//! fast ones (gzip 1, brotli 2, zstd 1): a gateway compresses on the request path.
//!
//! Never compressed: responses that already have a Content-Encoding, Range requests and
//! partial responses, statuses other than 200, `Cache-Control: no-transform`, media types
//! outside the route's list, bodies known to be smaller than `min_size`. Whenever the route
//! could compress a response, `Vary: Accept-Encoding` is added so caches keep the variants
//! apart. HEAD responses and 304s get the headers of the 200 GET they stand for (Vary,
//! Content-Encoding for HEAD, the weakened ETag).

use std::io::{self, Write};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode};
use http_body::{Body as _, Frame, SizeHint};

use crate::body::{Body, BoxError};
use crate::config::{CompressionConfig, Encoding};

/// Output held back before it is sent as one frame (unless the upstream pauses first).
const FRAME_TARGET: usize = 32 * 1024;

/// What the request asked for, captured before it is forwarded.
#[derive(Debug, Clone, Copy)]
pub struct Wanted {
    /// The coding the client accepts best, if any of the route's.
    pub encoding: Option<Encoding>,
    /// A Range request (its response is never compressed).
    pub range: bool,
    /// A HEAD request.
    pub head: bool,
    /// The request's `If-None-Match` names only strong validators: what the client holds
    /// was sent uncompressed (a compressed one would carry the `W/` Wraith gave it).
    pub holds_strong: bool,
}

impl Wanted {
    pub fn of(config: &CompressionConfig, method: &http::Method, headers: &HeaderMap) -> Wanted {
        Wanted {
            encoding: negotiate(config, headers),
            range: headers.contains_key(header::RANGE),
            head: method == http::Method::HEAD,
            holds_strong: holds_strong(headers),
        }
    }
}

/// Whether `If-None-Match` is present and every entity-tag in it is strong (no `W/`, no `*`).
fn holds_strong(headers: &HeaderMap) -> bool {
    let mut any = false;
    for value in headers.get_all(header::IF_NONE_MATCH) {
        let Ok(v) = value.to_str() else { return false };
        for tag in v.split(',') {
            let tag = tag.trim();
            if tag.is_empty() {
                continue;
            }
            if tag == "*" || tag.starts_with("W/") {
                return false;
            }
            any = true;
        }
    }
    any
}

/// The best of the route's codings that the client accepts (highest q; ties go to the
/// route's order). `identity` is always acceptable, so `None` just means "send as is".
pub fn negotiate(config: &CompressionConfig, headers: &HeaderMap) -> Option<Encoding> {
    let mut best: Option<(Encoding, u16)> = None;
    for enc in &config.algorithms {
        let mut explicit = None;
        let mut star = None;
        for value in headers.get_all(header::ACCEPT_ENCODING) {
            let Ok(v) = value.to_str() else { continue };
            for item in v.split(',') {
                let mut parts = item.split(';');
                let coding = parts.next().unwrap_or("").trim();
                let q = parts
                    .find_map(|p| {
                        let (k, v) = p.split_once('=')?;
                        k.trim()
                            .eq_ignore_ascii_case("q")
                            .then(|| parse_q(v.trim()))
                    })
                    .unwrap_or(1000);
                if coding.eq_ignore_ascii_case(enc.token()) {
                    explicit = Some(q);
                } else if coding == "*" {
                    star = Some(q);
                }
            }
        }
        let q = explicit.or(star).unwrap_or(0);
        if q > 0 && best.is_none_or(|(_, bq)| q > bq) {
            best = Some((*enc, q));
        }
    }
    best.map(|(e, _)| e)
}

/// A q-value in thousandths (`0.5` -> 500); malformed -> 0.
fn parse_q(s: &str) -> u16 {
    let Some((int, frac)) = s.split_once('.').or(Some((s, ""))) else {
        return 0;
    };
    if frac.len() > 3 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return 0;
    }
    let whole: u16 = match int {
        "0" => 0,
        "1" => 1000,
        _ => return 0,
    };
    let mut f = 0u16;
    for (i, b) in frac.bytes().enumerate() {
        f += (b - b'0') as u16 * [100, 10, 1][i];
    }
    (whole + f).min(1000)
}

/// Whether the media type is in the route's list (`type/*` or exact).
fn compressible(config: &CompressionConfig, headers: &HeaderMap) -> bool {
    let Some(ct) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let media = ct.split(';').next().unwrap_or("").trim();
    config.types.iter().any(|t| match t.strip_suffix("/*") {
        Some(major) => media
            .split_once('/')
            .is_some_and(|(m, _)| m.eq_ignore_ascii_case(major)),
        None => media.eq_ignore_ascii_case(t),
    })
}

/// Compresses `resp` when the route, the request and the response all allow it.
///
/// A HEAD response gets the head the GET would have (RFC 9110 §9.3.2) and a 304 the Vary and
/// ETag of the 200 it stands for (§15.4.5), so caches and conditional requests see one
/// representation: the decision is the same, taken on their headers.
pub fn apply(config: &CompressionConfig, wanted: Wanted, resp: Response<Body>) -> Response<Body> {
    let not_modified = resp.status() == StatusCode::NOT_MODIFIED;
    if wanted.range || !(resp.status() == StatusCode::OK || not_modified) {
        return resp;
    }
    // No body here to compress, only the head of one (HEAD) or a reference to one (304).
    let head_only = wanted.head || not_modified;
    let headers = resp.headers();
    // A 304 often has no Content-Type: the 200's is unknown then, and taken as compressible
    // (an extra Vary costs a cache entry). Its ETag is weakened as a compressed 200's
    // would be, unless the client revalidates with strong validators only: then what it
    // holds was not compressed (Wraith weakens the ETag of what it compresses), and a weak
    // one would break its later strong comparisons (`If-Range`, `If-Match`).
    let typed = if not_modified && !headers.contains_key(header::CONTENT_TYPE) {
        true
    } else {
        compressible(config, headers)
    };
    if headers.contains_key(header::CONTENT_ENCODING)
        || headers.contains_key(header::CONTENT_RANGE)
        || !typed
        || headers.get_all(header::CACHE_CONTROL).iter().any(|v| {
            v.to_str()
                .is_ok_and(|s| s.to_ascii_lowercase().contains("no-transform"))
        })
    {
        return resp;
    }
    let length = || {
        headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse().ok())
    };
    // The body of a HEAD or 304 is empty: only Content-Length tells the GET's size.
    let known = if head_only {
        length()
    } else {
        resp.body().size_hint().exact().or_else(length)
    };
    if known.is_some_and(|n| n < config.min_size) {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    add_vary(&mut parts.headers);
    let Some(encoding) = wanted.encoding else {
        return Response::from_parts(parts, body);
    };
    if head_only {
        let h = &mut parts.headers;
        // The 200's length is that of the identity body; the compressed one has none.
        h.remove(header::CONTENT_LENGTH);
        if !not_modified {
            h.remove(header::ACCEPT_RANGES);
            h.insert(
                header::CONTENT_ENCODING,
                HeaderValue::from_static(encoding.token()),
            );
        }
        if !(not_modified && wanted.holds_strong) {
            weaken_etag(h);
        }
        return Response::from_parts(parts, body);
    }
    let encoder = match Encoder::new(encoding) {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!(error = %e, "cannot start the response encoder; sending uncompressed");
            return Response::from_parts(parts, body);
        }
    };
    let h = &mut parts.headers;
    h.remove(header::CONTENT_LENGTH);
    h.remove(header::ACCEPT_RANGES);
    h.insert(
        header::CONTENT_ENCODING,
        HeaderValue::from_static(encoding.token()),
    );
    weaken_etag(h);
    let body = Body::boxed(CompressBody {
        inner: body,
        encoder,
        dirty: false,
        done: false,
        trailers: None,
    });
    Response::from_parts(parts, body)
}

/// Makes a strong ETag weak: the bytes differ once compressed, and a strong validator would
/// lie (RFC 9110 §8.8.1).
fn weaken_etag(h: &mut HeaderMap) {
    if let Some(etag) = h.get(header::ETAG) {
        if !etag.as_bytes().starts_with(b"W/") {
            let mut weak = b"W/".to_vec();
            weak.extend_from_slice(etag.as_bytes());
            if let Ok(v) = HeaderValue::from_bytes(&weak) {
                h.insert(header::ETAG, v);
            }
        }
    }
}

/// Adds `Accept-Encoding` to Vary unless it (or `*`) is there already.
fn add_vary(headers: &mut HeaderMap) {
    let present = headers.get_all(header::VARY).iter().any(|v| {
        v.to_str().is_ok_and(|s| {
            s.split(',')
                .any(|t| t.trim() == "*" || t.trim().eq_ignore_ascii_case("accept-encoding"))
        })
    });
    if !present {
        headers.append(header::VARY, HeaderValue::from_static("accept-encoding"));
    }
}

/// A streaming encoder writing into its own buffer.
enum Encoder {
    Gzip(flate2::write::GzEncoder<Vec<u8>>),
    Brotli(Box<brotli::CompressorWriter<Vec<u8>>>),
    Zstd(zstd::stream::write::Encoder<'static, Vec<u8>>),
    Finished,
}

impl Encoder {
    fn new(e: Encoding) -> io::Result<Encoder> {
        Ok(match e {
            Encoding::Gzip => Encoder::Gzip(flate2::write::GzEncoder::new(
                Vec::new(),
                flate2::Compression::new(1),
            )),
            // lgwin 18: a 256 KiB window. The encoder's ring buffer grows with the window, to
            // megabytes per stream at 22 (brotli's default; many times gzip's 32 KiB window),
            // held by every compressed response in flight; at quality 2 the longer reach buys
            // next to nothing in size.
            Encoding::Brotli => Encoder::Brotli(Box::new(brotli::CompressorWriter::new(
                Vec::new(),
                16 * 1024,
                2,
                18,
            ))),
            Encoding::Zstd => Encoder::Zstd(zstd::stream::write::Encoder::new(Vec::new(), 1)?),
        })
    }

    fn write(&mut self, data: &[u8]) -> io::Result<()> {
        match self {
            Encoder::Gzip(e) => e.write_all(data),
            Encoder::Brotli(e) => e.write_all(data),
            Encoder::Zstd(e) => e.write_all(data),
            Encoder::Finished => Ok(()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Encoder::Gzip(e) => e.flush(),
            Encoder::Brotli(e) => e.flush(),
            Encoder::Zstd(e) => e.flush(),
            Encoder::Finished => Ok(()),
        }
    }

    fn buffered(&mut self) -> usize {
        self.out().map_or(0, |o| o.len())
    }

    fn out(&mut self) -> Option<&mut Vec<u8>> {
        match self {
            Encoder::Gzip(e) => Some(e.get_mut()),
            Encoder::Brotli(e) => Some(e.get_mut()),
            Encoder::Zstd(e) => Some(e.get_mut()),
            Encoder::Finished => None,
        }
    }

    fn take(&mut self) -> Bytes {
        self.out()
            .map(|o| Bytes::from(std::mem::take(o)))
            .unwrap_or_default()
    }

    /// Ends the stream and returns the rest of the output.
    fn finish(&mut self) -> io::Result<Bytes> {
        let out = match std::mem::replace(self, Encoder::Finished) {
            Encoder::Gzip(e) => e.finish()?,
            Encoder::Brotli(e) => e.into_inner(),
            Encoder::Zstd(e) => e.finish()?,
            Encoder::Finished => Vec::new(),
        };
        Ok(Bytes::from(out))
    }
}

/// A body compressed as it streams.
struct CompressBody {
    inner: Body,
    encoder: Encoder,
    /// Input was written since the last flush.
    dirty: bool,
    done: bool,
    trailers: Option<HeaderMap>,
}

impl http_body::Body for CompressBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            if this.done {
                return Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(t))));
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => {
                    // The upstream paused: send what the encoder has, so streams flow.
                    if this.dirty {
                        this.dirty = false;
                        this.encoder.flush()?;
                        let out = this.encoder.take();
                        if !out.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::data(out))));
                        }
                    }
                    return Poll::Pending;
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        this.encoder.write(&data)?;
                        this.dirty = true;
                        if this.encoder.buffered() >= FRAME_TARGET {
                            return Poll::Ready(Some(Ok(Frame::data(this.encoder.take()))));
                        }
                    }
                    Err(frame) => {
                        if let Ok(t) = frame.into_trailers() {
                            this.trailers = Some(t);
                        }
                    }
                },
                Poll::Ready(None) => {
                    this.done = true;
                    let out = this.encoder.finish()?;
                    if !out.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(out))));
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> CompressionConfig {
        CompressionConfig {
            algorithms: vec![Encoding::Zstd, Encoding::Brotli, Encoding::Gzip],
            min_size: 10,
            types: vec!["text/*".into(), "application/json".into()],
        }
    }

    fn accept(v: &str) -> Option<Encoding> {
        let mut h = HeaderMap::new();
        h.insert(header::ACCEPT_ENCODING, HeaderValue::from_str(v).unwrap());
        negotiate(&config(), &h)
    }

    #[test]
    fn negotiation_honours_q_values_and_server_order() {
        assert_eq!(accept("gzip, br, zstd"), Some(Encoding::Zstd));
        assert_eq!(accept("gzip, br"), Some(Encoding::Brotli));
        assert_eq!(accept("gzip;q=1, br;q=0.5"), Some(Encoding::Gzip));
        assert_eq!(accept("zstd;q=0, gzip"), Some(Encoding::Gzip));
        assert_eq!(accept("*"), Some(Encoding::Zstd));
        assert_eq!(accept("*;q=0"), None);
        assert_eq!(accept("identity"), None);
        assert_eq!(accept("deflate"), None);
        assert_eq!(negotiate(&config(), &HeaderMap::new()), None);
        assert_eq!(parse_q("0.001"), 1);
        assert_eq!(parse_q("1.000"), 1000);
        assert_eq!(parse_q("2"), 0);
    }

    #[test]
    fn media_types() {
        let c = config();
        let ct = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_str(v).unwrap());
            compressible(&c, &h)
        };
        assert!(ct("text/html; charset=utf-8"));
        assert!(ct("Application/JSON"));
        assert!(!ct("image/png"));
        assert!(!ct("application/octet-stream"));
    }

    #[tokio::test]
    async fn streams_decode_to_the_original() {
        use http_body_util::BodyExt;
        let text: Vec<u8> = (0..200_000u32)
            .flat_map(|i| format!("line {i} of a compressible text\n").into_bytes())
            .collect();
        for enc in [Encoding::Gzip, Encoding::Brotli, Encoding::Zstd] {
            let resp = Response::builder()
                .header("content-type", "text/plain")
                .body(Body::full(text.clone()))
                .unwrap();
            let wanted = Wanted {
                encoding: Some(enc),
                range: false,
                head: false,
                holds_strong: false,
            };
            let resp = apply(&config(), wanted, resp);
            assert_eq!(resp.headers()["content-encoding"], enc.token());
            assert_eq!(resp.headers()["vary"], "accept-encoding");
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            assert!(body.len() < text.len() / 4, "{enc:?}: {}", body.len());
            if enc == Encoding::Brotli {
                // WBITS, the stream's first bits: 1, then 1 (= 17 + 1) in three bits.
                assert_eq!(body[0] & 0x0f, 0b0011, "a 2^18 window");
            }
            let decoded = match enc {
                Encoding::Gzip => {
                    let mut out = Vec::new();
                    io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&body[..]), &mut out)
                        .unwrap();
                    out
                }
                Encoding::Brotli => {
                    let mut out = Vec::new();
                    brotli::BrotliDecompress(&mut &body[..], &mut out).unwrap();
                    out
                }
                Encoding::Zstd => zstd::stream::decode_all(&body[..]).unwrap(),
            };
            assert_eq!(decoded, text, "{enc:?}");
        }
    }
}
