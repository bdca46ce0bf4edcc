//! Response compression through a real gateway: zstd, br and gzip decode to the original
//! (fixed-length and streamed bodies), and what must never be compressed is not.

mod common;

use std::io::Read;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};

fn text() -> Vec<u8> {
    (0..4000u32)
        .flat_map(|i| format!("{i}: the quick brown fox jumps over the lazy dog\n").into_bytes())
        .collect()
}

async fn origin(req: Request<Incoming>) -> Response<TestBody> {
    let r = Response::builder();
    match req.uri().path() {
        // Conditional GET: "v1" matches weakly, as a 304 (no Content-Type, as many send it).
        "/text"
            if req
                .headers()
                .get("if-none-match")
                .is_some_and(|v| v.to_str().unwrap().contains("\"v1\"")) =>
        {
            r.status(304).header("etag", "\"v1\"").body(full(""))
        }
        "/text" | "/plain/text" => r
            .header("content-type", "text/plain; charset=utf-8")
            .header("etag", "\"v1\"")
            .body(full(text())),
        "/json" => r
            .header("content-type", "application/json")
            .body(full(format!(
                "[{}]",
                vec!["{\"k\": \"value\"}"; 500].join(",")
            ))),
        "/small" => r
            .header("content-type", "text/html")
            .body(full("<p>hi</p>")),
        "/image" => r.header("content-type", "image/png").body(full(text())),
        "/already" => {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            std::io::Write::write_all(&mut gz, &text()).unwrap();
            r.header("content-type", "text/plain")
                .header("content-encoding", "gzip")
                .body(full(gz.finish().unwrap()))
        }
        "/no-transform" => r
            .header("content-type", "text/plain")
            .header("cache-control", "public, no-transform")
            .body(full(text())),
        "/stream" => {
            // Unknown length, several chunks.
            let chunks: Vec<Result<Frame<Bytes>, Box<dyn std::error::Error + Send + Sync>>> =
                text()
                    .chunks(7000)
                    .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
                    .collect();
            r.header("content-type", "text/event-stream")
                .body(StreamBody::new(futures_util::stream::iter(chunks)).boxed())
        }
        _ => r.status(404).body(full("")),
    }
    .unwrap()
}

fn config(upstream: std::net::SocketAddr) -> String {
    format!(
        r#"{}
[[upstream]]
name = "origin"
endpoints = ["{upstream}"]

[[route]]
name = "uncompressed"
path = {{ prefix = "/plain/" }}
upstream = "origin"

[[route]]
name = "compressed"
upstream = "origin"
compression = {{ algorithms = ["zstd", "br", "gzip"], min_size = "1KiB" }}
"#,
        Setup::standard_listeners()
    )
}

fn decode(encoding: &str, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    match encoding {
        "gzip" => {
            flate2::read::GzDecoder::new(body)
                .read_to_end(&mut out)
                .unwrap();
        }
        "br" => brotli::BrotliDecompress(&mut &body[..], &mut out).unwrap(),
        "zstd" => out = zstd::stream::decode_all(body).unwrap(),
        other => panic!("unexpected encoding {other}"),
    }
    out
}

#[tokio::test]
async fn zstd_br_and_gzip_decode_to_the_original() {
    let up = Upstream::start(origin).await;
    let wraith = Setup::new().start(&config(up.addr));
    let client = http_client();
    for (accept, expected) in [
        ("gzip, deflate, br, zstd", "zstd"),
        ("gzip, br", "br"),
        ("gzip", "gzip"),
        ("br;q=0.5, gzip;q=0.9", "gzip"),
    ] {
        for path in ["/text", "/stream", "/json"] {
            let r = client
                .get(wraith.url("http", path))
                .header("accept-encoding", accept)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            assert_eq!(r.headers()["content-encoding"], expected, "{path} {accept}");
            assert_eq!(r.headers()["vary"], "accept-encoding");
            assert!(r.headers().get("content-length").is_none());
            if path == "/text" {
                assert_eq!(
                    r.headers()["etag"],
                    "W/\"v1\"",
                    "a strong ETag becomes weak"
                );
            }
            let body = r.bytes().await.unwrap();
            let original = if path == "/json" {
                format!("[{}]", vec!["{\"k\": \"value\"}"; 500].join(",")).into_bytes()
            } else {
                text()
            };
            assert!(
                body.len() < original.len() / 3,
                "{path} {expected}: {}",
                body.len()
            );
            assert_eq!(decode(expected, &body), original, "{path} {expected}");
        }
    }
    // Also over HTTP/2 (the https listener negotiates h2).
    let pki = wraith.pki();
    let r = https_client(&pki.ca_pem, None)
        .get(wraith.url("https", "/text"))
        .header("accept-encoding", "br")
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.headers()["content-encoding"], "br");
    assert_eq!(decode("br", &r.bytes().await.unwrap()), text());
}

#[tokio::test]
async fn what_must_not_be_compressed_is_not() {
    let up = Upstream::start(origin).await;
    let wraith = Setup::new().start(&config(up.addr));
    let client = http_client();
    let get = |path: &str| {
        client
            .get(wraith.url("http", path))
            .header("accept-encoding", "zstd, br, gzip")
    };

    // Small bodies: not worth it; images: already compressed. Neither varies.
    for path in ["/small", "/image"] {
        let r = get(path).send().await.unwrap();
        assert!(r.headers().get("content-encoding").is_none(), "{path}");
        assert!(r.headers().get("vary").is_none(), "{path}");
    }
    let r = get("/image").send().await.unwrap();
    assert_eq!(r.bytes().await.unwrap(), text());

    // Never re-compressed: the upstream's gzip passes through untouched.
    let r = get("/already").send().await.unwrap();
    assert_eq!(r.headers()["content-encoding"], "gzip");
    assert_eq!(decode("gzip", &r.bytes().await.unwrap()), text());

    // Range requests are not compressed (offsets refer to the identity bytes).
    let r = get("/text")
        .header("range", "bytes=0-99")
        .send()
        .await
        .unwrap();
    assert!(r.headers().get("content-encoding").is_none());

    // no-transform is respected.
    let r = get("/no-transform").send().await.unwrap();
    assert!(r.headers().get("content-encoding").is_none());

    // A client that accepts nothing we offer gets identity, with Vary.
    let r = client
        .get(wraith.url("http", "/text"))
        .header("accept-encoding", "identity")
        .send()
        .await
        .unwrap();
    assert!(r.headers().get("content-encoding").is_none());
    assert_eq!(r.headers()["vary"], "accept-encoding");
    assert_eq!(r.bytes().await.unwrap(), text());

    // Off by default: a route without `compression` never compresses.
    let r = get("/plain/text").send().await.unwrap();
    assert!(r.headers().get("content-encoding").is_none());
    assert!(r.headers().get("vary").is_none());
    assert_eq!(r.bytes().await.unwrap(), text());
}

#[tokio::test]
async fn head_and_304_have_the_headers_of_the_get() {
    let up = Upstream::start(origin).await;
    let wraith = Setup::new().start(&config(up.addr));
    let client = http_client();
    let url = wraith.url("http", "/text");
    let get = client
        .get(&url)
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(get.headers()["content-encoding"], "gzip");
    let etag = get.headers()["etag"].clone();
    assert_eq!(etag, "W/\"v1\"");

    // HEAD: the GET's head (RFC 9110 §9.3.2), without the identity length.
    let head = client
        .head(&url)
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), 200);
    for h in ["content-encoding", "vary", "etag", "content-type"] {
        assert_eq!(head.headers().get(h), get.headers().get(h), "{h}");
    }
    assert!(head.headers().get("content-length").is_none());

    // 304: the Vary and ETag the 200 had (RFC 9110 §15.4.5).
    let revalidated = client
        .get(&url)
        .header("accept-encoding", "gzip")
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(revalidated.status(), 304);
    assert_eq!(revalidated.headers()["etag"], etag);
    assert_eq!(revalidated.headers()["vary"], "accept-encoding");

    // Without a coding in common: identity, the strong ETag, and Vary, for all three.
    for method in [reqwest::Method::GET, reqwest::Method::HEAD] {
        let r = client
            .request(method.clone(), &url)
            .header("accept-encoding", "identity")
            .send()
            .await
            .unwrap();
        assert!(r.headers().get("content-encoding").is_none(), "{method}");
        assert_eq!(r.headers()["etag"], "\"v1\"", "{method}");
        assert_eq!(r.headers()["vary"], "accept-encoding", "{method}");
    }
    let r = client
        .get(&url)
        .header("if-none-match", "\"v1\"")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 304);
    assert_eq!(r.headers()["etag"], "\"v1\"");
    assert_eq!(r.headers()["vary"], "accept-encoding");

    // A client that revalidates with a strong validator holds an uncompressed copy (an
    // image, say, whose 304 has no Content-Type either): the ETag stays strong, even when
    // it now accepts gzip, or its later If-Range and If-Match would fail.
    let r = client
        .get(&url)
        .header("accept-encoding", "gzip")
        .header("if-none-match", "\"v1\"")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 304);
    assert_eq!(r.headers()["etag"], "\"v1\"");

    // What the GET would not compress, the HEAD does not either, nor varies.
    for path in ["/small", "/image"] {
        let r = client
            .head(wraith.url("http", path))
            .header("accept-encoding", "gzip")
            .send()
            .await
            .unwrap();
        assert!(r.headers().get("content-encoding").is_none(), "{path}");
        assert!(r.headers().get("vary").is_none(), "{path}");
    }
}
