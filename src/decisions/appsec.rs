//! CrowdSec AppSec (WAF) forwarding, CrowdSec >= 1.6: each request is shown to the AppSec
//! listener before it goes upstream. The protocol (docs.crowdsec.net "AppSec protocol"):
//! GET without a body, POST with it (explicit Content-Length); the original headers plus
//! `X-Crowdsec-Appsec-{Ip,Uri,Verb,Host,Api-Key,User-Agent,Http-Version}`. 200 = allow;
//! 403 with `{"action": ..., "http_status": N}` = block (the client gets `http_status`);
//! 401 = bad key, 500 = malformed request; both, a redirect (never followed), and an
//! unreachable or slow WAF follow `on_error`. A client's own `X-Crowdsec-Appsec-*` headers
//! are dropped: only Wraith speaks for the request in that namespace.
//!
//! This is a network call on the request path by design, so it is opt-in, bounded by
//! `timeout`, and the body it buffers is bounded by `max_body`.

use std::net::IpAddr;

use bytes::Bytes;
use http::{HeaderValue, Request, StatusCode};
use http_body_util::{BodyExt, Limited};

use crate::body::Body;
use crate::config::{AppsecConfig, OnError, Secret};
use crate::error::GatewayError;

/// The AppSec client of one snapshot.
pub struct Appsec {
    pub config: AppsecConfig,
    api_key: Option<Secret>,
    client: reqwest::Client,
}

impl Appsec {
    /// Builds the client (plain HTTP or TLS with the CrowdSec CA).
    pub fn new(
        config: AppsecConfig,
        api_key: Option<Secret>,
        ca: Option<&std::path::Path>,
    ) -> Result<Appsec, String> {
        let tls = super::crowdsec::tls_config(ca, None)?;
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            // A redirect is not a verdict (and the API key would follow it): a 3xx is a
            // failure, and `on_error` decides.
            .redirect(reqwest::redirect::Policy::none())
            .timeout(config.timeout)
            .pool_max_idle_per_host(64)
            .build()
            .map_err(|e| format!("crowdsec.appsec: cannot build the HTTP client: {e}"))?;
        Ok(Appsec {
            config,
            api_key,
            client,
        })
    }

    /// The AppSec stage: `Ok(request)` (its body buffered when it had one) or a refusal.
    pub async fn inspect(
        &self,
        req: Request<Body>,
        client_ip: IpAddr,
    ) -> Result<Request<Body>, GatewayError> {
        let (parts, body) = req.into_parts();
        let bytes = if http_body::Body::is_end_stream(&body) {
            Bytes::new()
        } else {
            match Limited::new(body, self.config.max_body).collect().await {
                Ok(c) => c.to_bytes(),
                Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                    return Err(GatewayError::PayloadTooLarge {
                        limit: self.config.max_body as u64,
                    })
                }
                Err(_) => return Err(GatewayError::BadRequest("request body could not be read")),
            }
        };
        let verdict = self.ask(&parts, &bytes, client_ip).await;
        let req = Request::from_parts(parts, Body::full(bytes));
        match verdict {
            Ok(()) => Ok(req),
            Err(Refusal::Blocked { action, status }) => {
                Err(GatewayError::AppsecBlocked { action, status })
            }
            Err(Refusal::Failed(reason)) => match self.config.on_error {
                OnError::Open => {
                    tracing::warn!(error = %reason, "crowdsec appsec failed; on_error = \"open\": letting the request through");
                    Ok(req)
                }
                OnError::Closed => Err(GatewayError::AppsecUnavailable { reason }),
            },
        }
    }

    async fn ask(
        &self,
        parts: &http::request::Parts,
        body: &Bytes,
        client_ip: IpAddr,
    ) -> Result<(), Refusal> {
        let method = if body.is_empty() {
            reqwest::Method::GET
        } else {
            reqwest::Method::POST
        };
        let mut headers = reqwest::header::HeaderMap::new();
        for (k, v) in &parts.headers {
            // The X-Crowdsec-Appsec-* headers are Wraith's word about the request: a client's
            // own (a User-Agent or Transaction-Id Wraith does not set) never reaches the WAF.
            if !crate::proxy::headers::is_hop_by_hop(k)
                && k != http::header::HOST
                && k != http::header::CONTENT_LENGTH
                && !k.as_str().starts_with(APPSEC_PREFIX)
            {
                headers.append(k.clone(), v.clone());
            }
        }
        // As the client sent it, bytes beyond ASCII too: without this header CrowdSec drops
        // the User-Agent, and a client could hide it from the rules with one such byte.
        // Every User-Agent field a client sent, joined: with the first one only, a harmless
        // one in front would hide the next from the WAF while the upstream gets both.
        let mut agents = parts.headers.get_all(http::header::USER_AGENT).iter();
        if let Some(first) = agents.next() {
            let mut ua = first.clone();
            for more in agents {
                let joined = [ua.as_bytes(), b", ", more.as_bytes()].concat();
                if let Ok(v) = HeaderValue::from_bytes(&joined) {
                    ua = v;
                }
            }
            headers.insert("x-crowdsec-appsec-user-agent", ua);
        }
        let uri = parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string();
        let host = crate::proxy::headers::request_host(&parts.uri, &parts.headers)
            .unwrap_or("")
            .to_string();
        let version = match parts.version {
            http::Version::HTTP_10 => "10",
            http::Version::HTTP_2 => "20",
            http::Version::HTTP_3 => "30",
            _ => "11",
        };
        let mut set = |name: &'static str, value: &str| {
            if let Ok(v) = HeaderValue::from_str(value) {
                headers.insert(name, v);
            }
        };
        set("x-crowdsec-appsec-ip", &client_ip.to_string());
        set("x-crowdsec-appsec-uri", &uri);
        set("x-crowdsec-appsec-verb", parts.method.as_str());
        set("x-crowdsec-appsec-host", &host);
        set("x-crowdsec-appsec-http-version", version);
        if let Some(k) = &self.api_key {
            set("x-crowdsec-appsec-api-key", &k.0);
        }
        let mut req = self
            .client
            .request(method, &self.config.url)
            .headers(headers);
        if !body.is_empty() {
            req = req
                .header(http::header::CONTENT_LENGTH, body.len())
                .body(body.clone());
        }
        let resp = req
            .send()
            .await
            .map_err(|e| Refusal::Failed(format!("appsec request failed: {e}")))?;
        let status = resp.status();
        match status.as_u16() {
            200 => Ok(()),
            403 => {
                // The verdict is a few dozen bytes; what is past VERDICT_MAX is not read (a
                // hostile or broken WAF would have it buffered per request), and such an
                // answer blocks with the defaults, as an unreadable one does.
                let v: serde_json::Value = read_verdict(resp)
                    .await
                    .and_then(|b| serde_json::from_slice(&b).ok())
                    .unwrap_or_default();
                let action = v["action"].as_str().unwrap_or("ban").to_string();
                let status = v["http_status"]
                    .as_u64()
                    .and_then(|n| u16::try_from(n).ok())
                    .and_then(|n| StatusCode::from_u16(n).ok())
                    .filter(|s| s.is_client_error() || s.is_server_error())
                    .unwrap_or(StatusCode::FORBIDDEN);
                Err(Refusal::Blocked { action, status })
            }
            401 => Err(Refusal::Failed(
                "appsec rejected the bouncer API key (401)".into(),
            )),
            // 3xx (redirects are not followed), 500 (malformed request), anything else.
            _ => Err(Refusal::Failed(format!("appsec answered {status}"))),
        }
    }
}

/// The most of a 403 answer's body read for its verdict.
const VERDICT_MAX: usize = 4096;

/// The body of a 403 answer, if it is at most `VERDICT_MAX` bytes.
async fn read_verdict(mut resp: reqwest::Response) -> Option<Vec<u8>> {
    if resp
        .content_length()
        .is_some_and(|n| n > VERDICT_MAX as u64)
    {
        return None;
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.ok()? {
        if body.len() + chunk.len() > VERDICT_MAX {
            return None;
        }
        body.extend_from_slice(&chunk);
    }
    Some(body)
}

/// The headers that carry Wraith's account of the request to the WAF (lowercase, as
/// `HeaderName` holds them).
const APPSEC_PREFIX: &str = "x-crowdsec-appsec-";

enum Refusal {
    Blocked { action: String, status: StatusCode },
    Failed(String),
}
