//! TLS to upstreams: the rustls client configuration of an upstream (CA bundle, optional
//! client certificate, aws-lc-rs), the stream type that carries HTTP/1.1 over TCP or TLS, and
//! the connector that gives hyper's HTTP/2 client TLS connections with ALPN `h2`.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::uri::Authority;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::config::UpstreamTls;

/// Builds the client configuration for an upstream's `https://` endpoints.
pub fn client_config(tls: &UpstreamTls, alpn: &[&[u8]]) -> Result<Arc<ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    let mut found = 0;
    for c in CertificateDer::pem_slice_iter(&tls.ca.pem) {
        let c = c.map_err(|e| format!("CA bundle {}: {e}", tls.ca.path.display()))?;
        // A system bundle may hold a certificate rustls cannot use; skip it like browsers do.
        if roots.add(c).is_ok() {
            found += 1;
        }
    }
    if found == 0 {
        return Err(format!(
            "CA bundle {} holds no usable certificate",
            tls.ca.path.display()
        ));
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| format!("TLS setup: {e}"))?
        .with_root_certificates(roots);
    let mut config = match &tls.client_cert {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert.pem)
                .collect::<Result<_, _>>()
                .map_err(|e| format!("client certificate {}: {e}", cert.path.display()))?;
            if chain.is_empty() {
                return Err(format!(
                    "client certificate {} holds no PEM certificate",
                    cert.path.display()
                ));
            }
            let pk = PrivateKeyDer::from_pem_slice(&key.pem)
                .map_err(|e| format!("client key {}: {e}", key.path.display()))?;
            builder
                .with_client_auth_cert(chain, pk)
                .map_err(|e| format!("client certificate {}: {e}", cert.path.display()))?
        }
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// A configuration no server can satisfy (it trusts no certificate): what `https://`
/// endpoints get when their real one cannot be built, so they fail their handshakes rather
/// than fall back to cleartext.
pub fn refusing_config() -> Result<Arc<ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| format!("TLS setup: {e}"))?
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The name to send as SNI and verify: the configured one, else the endpoint's host.
pub fn server_name(
    configured: Option<&str>,
    authority: &Authority,
) -> io::Result<ServerName<'static>> {
    let host = configured.unwrap_or_else(|| authority.host());
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_string()).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid TLS server name {host:?}: {e}"),
        )
    })
}

/// Resolves and connects to `authority` (IP literals without a lookup).
pub async fn tcp_connect(authority: &Authority, default_port: u16) -> io::Result<TcpStream> {
    let host = authority.host();
    let port = authority.port_u16().unwrap_or(default_port);
    let stream = match host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<std::net::IpAddr>()
    {
        Ok(ip) => TcpStream::connect(std::net::SocketAddr::new(ip, port)).await?,
        Err(_) => TcpStream::connect((host, port)).await?,
    };
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// TCP, then TLS when `tls` is given, all within `timeout`.
pub async fn connect(
    authority: &Authority,
    tls: Option<&(TlsConnector, Option<Arc<str>>)>,
    timeout: Duration,
) -> io::Result<Stream> {
    let fut = async {
        match tls {
            None => Ok(Stream::Tcp(tcp_connect(authority, 80).await?)),
            Some((connector, name)) => {
                let tcp = tcp_connect(authority, 443).await?;
                let name = server_name(name.as_deref(), authority)?;
                let tls = connector.connect(name, tcp).await.map_err(|e| {
                    io::Error::new(e.kind(), format!("TLS handshake with {authority}: {e}"))
                })?;
                Ok(Stream::Tls(Box::new(tls)))
            }
        }
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("connect timed out after {timeout:?}"),
        )),
    }
}

/// An upstream connection: plain TCP or TLS over TCP.
pub enum Stream {
    Tcp(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Stream {
    /// The TCP socket underneath.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Tcp(s) => s,
            Stream::Tls(s) => s.get_ref().0,
        }
    }

    /// Whether the ALPN protocol agreed with the upstream is `h2`.
    pub fn is_h2(&self) -> bool {
        match self {
            Stream::Tcp(_) => false,
            Stream::Tls(s) => s.get_ref().1.alpn_protocol() == Some(b"h2"),
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Tcp(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// A connection handed to hyper's client (HTTP/2 upstreams).
pub struct HyperStream(TokioIo<Stream>);

impl Connection for HyperStream {
    fn connected(&self) -> Connected {
        let c = Connected::new();
        if self.0.inner().is_h2() {
            c.negotiated_h2()
        } else {
            c
        }
    }
}

impl hyper::rt::Read for HyperStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for HyperStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

/// hyper's connector for HTTP/2 upstreams: the URI's authority, over TCP (h2c) or TLS (h2).
#[derive(Clone)]
pub struct Connector {
    /// TLS connector and SNI override, for `h2` upstreams.
    pub tls: Option<Arc<(TlsConnector, Option<Arc<str>>)>>,
    pub timeout: Duration,
}

impl tower_service::Service<http::Uri> for Connector {
    type Response = HyperStream;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<HyperStream>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), io::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let authority = uri.authority().cloned().ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "upstream URI without authority",
                )
            })?;
            let stream = connect(&authority, this.tls.as_deref(), this.timeout).await?;
            Ok(HyperStream(TokioIo::new(stream)))
        })
    }
}
