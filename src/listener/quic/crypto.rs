//! QUIC's TLS session, owned by Wraith. quinn's built-in rustls session keeps its rustls
//! connection private, so the negotiated key-exchange group (needed per connection for the
//! access log, metrics and the policy's `context.tls.group`) and the rustls error behind a
//! failed handshake (needed for the same refusal labels as TCP) would be out of reach. This is
//! the same session over `rustls::quic::ServerConnection` (modelled on quinn-proto's
//! `crypto/rustls.rs`), recording both into a `Handshake` the listener holds.
//!
//! `QuicTls` is the listener-wide part (rustls config, initial cipher suite); `ConnTls` adds one
//! connection's `Handshake` and is handed to quinn through `Incoming::accept_with`.

use std::any::Any;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use quinn_proto::crypto::{
    self, ExportKeyingMaterialError, HeaderKey, KeyPair, Keys, UnsupportedVersion,
};
use quinn_proto::transport_parameters::TransportParameters;
use quinn_proto::{ConnectionId, Side, TransportError, TransportErrorCode};
use rustls::quic::{KeyChange, Secrets, ServerConnection, Suite, Version};
use rustls_pki_types::CertificateDer;

/// What one connection's handshake produced, written by its session and read by the listener.
#[derive(Debug, Default)]
pub struct Handshake {
    /// The negotiated key-exchange group (IANA name), once the server has chosen it.
    group: OnceLock<&'static str>,
    /// The handshake completed: the client's Finished (and certificate, when asked for) was
    /// verified. Before that, application data can only have come as 0-RTT early data.
    complete: AtomicBool,
    /// Full or resumed, once the handshake completed.
    kind: OnceLock<rustls::HandshakeKind>,
    /// Why rustls refused the handshake.
    error: Mutex<Option<rustls::Error>>,
}

impl Handshake {
    /// The negotiated group, e.g. `X25519MLKEM768`.
    pub fn group(&self) -> Option<&'static str> {
        self.group.get().copied()
    }

    /// True once the handshake has completed (client authenticated, nothing replayable left).
    pub fn is_complete(&self) -> bool {
        self.complete.load(Ordering::Acquire)
    }

    /// Whether the handshake was a full one or resumed a previous session (PSK); `None`
    /// until it completed.
    pub fn kind(&self) -> Option<rustls::HandshakeKind> {
        self.kind.get().copied()
    }

    /// The rustls error that ended the handshake, if rustls ended it.
    pub fn error(&self) -> Option<rustls::Error> {
        self.error.lock().ok().and_then(|e| e.clone())
    }
}

/// The listener-wide QUIC TLS configuration.
pub struct QuicTls {
    tls: crate::listener::tls::ServerTls,
    /// The cipher suite of Initial packets (TLS_AES_128_GCM_SHA256, required by QUIC).
    initial: Suite,
}

impl QuicTls {
    /// Wraps a TLS 1.3 rustls config; checks what rustls' QUIC connection demands of it (TLS
    /// 1.3, early data limit 0 or `u32::MAX`) once, here, rather than per connection.
    pub fn new(tls: crate::listener::tls::ServerTls) -> Result<QuicTls, String> {
        let config = tls.config();
        let initial = config
            .crypto_provider()
            .cipher_suites
            .iter()
            .find_map(|cs| match (cs.suite(), cs.tls13()) {
                (rustls::CipherSuite::TLS13_AES_128_GCM_SHA256, Some(s)) => s.quic_suite(),
                _ => None,
            })
            .ok_or("QUIC needs TLS_AES_128_GCM_SHA256, which the provider lacks")?;
        ServerConnection::new(config.clone(), Version::V1, Vec::new())
            .map_err(|e| format!("TLS settings unusable for QUIC: {e}"))?;
        Ok(QuicTls { tls, initial })
    }

    /// The listener's QUIC session cache (`ServerTls::sessions`).
    pub fn sessions(&self) -> crate::listener::tls::SessionCache {
        self.tls.sessions()
    }

    /// The crypto config of one connection, recording into `handshake`.
    pub fn for_connection(self: &Arc<Self>, handshake: Arc<Handshake>) -> ConnTls {
        ConnTls {
            shared: self.clone(),
            handshake,
        }
    }
}

/// One connection's crypto config (quinn calls `start_session` once with it).
pub struct ConnTls {
    shared: Arc<QuicTls>,
    handshake: Arc<Handshake>,
}

impl crypto::ServerConfig for QuicTls {
    fn initial_keys(
        &self,
        version: u32,
        dst_cid: &ConnectionId,
    ) -> Result<Keys, UnsupportedVersion> {
        Ok(initial_keys(
            quic_version(version)?,
            dst_cid,
            Side::Server,
            &self.initial,
        ))
    }

    fn retry_tag(&self, version: u32, orig_dst_cid: &ConnectionId, packet: &[u8]) -> [u8; 16] {
        retry_tag(version, orig_dst_cid, packet)
    }

    fn start_session(
        self: Arc<Self>,
        version: u32,
        params: &TransportParameters,
    ) -> Box<dyn crypto::Session> {
        // Connections are accepted with `ConnTls`; this serves connections quinn would accept
        // without one, with a handshake record nobody reads.
        ConnTls {
            shared: self,
            handshake: Arc::default(),
        }
        .session(version, params)
    }
}

impl crypto::ServerConfig for ConnTls {
    fn initial_keys(
        &self,
        version: u32,
        dst_cid: &ConnectionId,
    ) -> Result<Keys, UnsupportedVersion> {
        self.shared.initial_keys(version, dst_cid)
    }

    fn retry_tag(&self, version: u32, orig_dst_cid: &ConnectionId, packet: &[u8]) -> [u8; 16] {
        retry_tag(version, orig_dst_cid, packet)
    }

    fn start_session(
        self: Arc<Self>,
        version: u32,
        params: &TransportParameters,
    ) -> Box<dyn crypto::Session> {
        ConnTls {
            shared: self.shared.clone(),
            handshake: self.handshake.clone(),
        }
        .session(version, params)
    }
}

impl ConnTls {
    fn session(self, version: u32, params: &TransportParameters) -> Box<dyn crypto::Session> {
        // quinn calls this only after `initial_keys` accepted the version.
        let version = quic_version(version).unwrap_or(Version::V1);
        let mut encoded = Vec::new();
        params.write(&mut encoded);
        // Cannot fail: `QuicTls::new` made the same connection from the same config.
        let inner = ServerConnection::new(self.shared.tls.for_connection(), version, encoded)
            .expect("checked by QuicTls::new");
        let inner = rustls::quic::Connection::Server(inner);
        Box::new(Session {
            version,
            got_handshake_data: false,
            next_secrets: None,
            inner,
            suite: self.shared.initial,
            handshake: self.handshake,
        })
    }
}

/// One connection's TLS session.
struct Session {
    version: Version,
    got_handshake_data: bool,
    next_secrets: Option<Secrets>,
    /// Always the `Server` variant; the enum carries the QUIC-level methods.
    inner: rustls::quic::Connection,
    suite: Suite,
    handshake: Arc<Handshake>,
}

/// What `handshake_data()` returns (like quinn's own; the rest is in the `Handshake`).
pub struct HandshakeData {
    /// The negotiated ALPN protocol.
    pub protocol: Option<Vec<u8>>,
    /// The server name the client asked for.
    pub server_name: Option<String>,
}

impl Session {
    fn server_name(&self) -> Option<&str> {
        match &self.inner {
            rustls::quic::Connection::Server(s) => s.server_name(),
            rustls::quic::Connection::Client(_) => None,
        }
    }

    /// Copies what the listener needs out of rustls as the handshake advances.
    fn record(&self) {
        if self.handshake.group.get().is_none() {
            if let Some(g) = self.inner.negotiated_key_exchange_group() {
                let _ = self
                    .handshake
                    .group
                    .set(crate::listener::tls::group_name(g.name()));
            }
        }
        if !self.inner.is_handshaking() && !self.handshake.complete.load(Ordering::Relaxed) {
            if let Some(kind) = self.inner.handshake_kind() {
                let _ = self.handshake.kind.set(kind);
            }
            self.handshake.complete.store(true, Ordering::Release);
        }
    }
}

impl crypto::Session for Session {
    fn initial_keys(&self, dst_cid: &ConnectionId, side: Side) -> Keys {
        initial_keys(self.version, dst_cid, side, &self.suite)
    }

    fn handshake_data(&self) -> Option<Box<dyn Any>> {
        if !self.got_handshake_data {
            return None;
        }
        Some(Box::new(HandshakeData {
            protocol: self.inner.alpn_protocol().map(<[u8]>::to_vec),
            server_name: self.server_name().map(str::to_string),
        }))
    }

    /// The client's certificate chain, as `Vec<CertificateDer<'static>>` (as quinn's own).
    fn peer_identity(&self) -> Option<Box<dyn Any>> {
        self.inner.peer_certificates().map(|v| -> Box<dyn Any> {
            Box::new(
                v.iter()
                    .map(|c| c.clone().into_owned())
                    .collect::<Vec<CertificateDer<'static>>>(),
            )
        })
    }

    fn early_crypto(&self) -> Option<(Box<dyn HeaderKey>, Box<dyn crypto::PacketKey>)> {
        let keys = self.inner.zero_rtt_keys()?;
        Some((Box::new(keys.header), Box::new(keys.packet)))
    }

    fn early_data_accepted(&self) -> Option<bool> {
        // Only meaningful for clients.
        None
    }

    fn is_handshaking(&self) -> bool {
        self.inner.is_handshaking()
    }

    fn read_handshake(&mut self, buf: &[u8]) -> Result<bool, TransportError> {
        if let Err(e) = self.inner.read_hs(buf) {
            let reason = e.to_string();
            if let Ok(mut slot) = self.handshake.error.lock() {
                slot.get_or_insert(e);
            }
            return Err(match self.inner.alert() {
                Some(alert) => TransportError {
                    code: TransportErrorCode::crypto(alert.into()),
                    frame: None,
                    reason,
                },
                None => TransportError {
                    code: TransportErrorCode::PROTOCOL_VIOLATION,
                    frame: None,
                    reason: format!("TLS error: {reason}"),
                },
            });
        }
        self.record();
        if !self.got_handshake_data {
            // rustls gives no explicit signal that the ClientHello was read; the server name
            // or ALPN being known (or the handshake being over) means it was.
            if self.inner.alpn_protocol().is_some()
                || self.server_name().is_some()
                || !self.inner.is_handshaking()
            {
                self.got_handshake_data = true;
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn transport_parameters(&self) -> Result<Option<TransportParameters>, TransportError> {
        match self.inner.quic_transport_parameters() {
            None => Ok(None),
            Some(mut buf) => TransportParameters::read(Side::Server, &mut buf)
                .map(Some)
                .map_err(Into::into),
        }
    }

    fn write_handshake(&mut self, buf: &mut Vec<u8>) -> Option<Keys> {
        let change = self.inner.write_hs(buf);
        self.record();
        let keys = match change? {
            KeyChange::Handshake { keys } => keys,
            KeyChange::OneRtt { keys, next } => {
                self.next_secrets = Some(next);
                keys
            }
        };
        Some(Keys {
            header: KeyPair {
                local: Box::new(keys.local.header),
                remote: Box::new(keys.remote.header),
            },
            packet: KeyPair {
                local: Box::new(keys.local.packet),
                remote: Box::new(keys.remote.packet),
            },
        })
    }

    fn next_1rtt_keys(&mut self) -> Option<KeyPair<Box<dyn crypto::PacketKey>>> {
        let keys = self.next_secrets.as_mut()?.next_packet_keys();
        Some(KeyPair {
            local: Box::new(keys.local),
            remote: Box::new(keys.remote),
        })
    }

    /// Retry packets are only ever received by clients.
    fn is_valid_retry(
        &self,
        _orig_dst_cid: &ConnectionId,
        _header: &[u8],
        _payload: &[u8],
    ) -> bool {
        false
    }

    fn export_keying_material(
        &self,
        output: &mut [u8],
        label: &[u8],
        context: &[u8],
    ) -> Result<(), ExportKeyingMaterialError> {
        self.inner
            .export_keying_material(output, label, Some(context))
            .map(|_| ())
            .map_err(|_| ExportKeyingMaterialError)
    }
}

/// The QUIC versions rustls speaks.
fn quic_version(version: u32) -> Result<Version, UnsupportedVersion> {
    match version {
        0xff00_001d..=0xff00_0020 => Ok(Version::V1Draft),
        0x0000_0001 | 0xff00_0021..=0xff00_0022 => Ok(Version::V1),
        _ => Err(UnsupportedVersion),
    }
}

fn initial_keys(version: Version, dst_cid: &ConnectionId, side: Side, suite: &Suite) -> Keys {
    let side = match side {
        Side::Client => rustls::Side::Client,
        Side::Server => rustls::Side::Server,
    };
    let keys = suite.keys(dst_cid, side, version);
    Keys {
        header: KeyPair {
            local: Box::new(keys.local.header),
            remote: Box::new(keys.remote.header),
        },
        packet: KeyPair {
            local: Box::new(keys.local.packet),
            remote: Box::new(keys.remote.packet),
        },
    }
}

/// The Retry integrity tag (RFC 9001 §5.8): AES-128-GCM over the pseudo-packet with the
/// version's fixed key and nonce.
fn retry_tag(version: u32, orig_dst_cid: &ConnectionId, packet: &[u8]) -> [u8; 16] {
    use aws_lc_rs::aead;
    const KEY_V1: [u8; 16] = [
        0xbe, 0x0c, 0x69, 0x0b, 0x9f, 0x66, 0x57, 0x5a, 0x1d, 0x76, 0x6b, 0x54, 0xe3, 0x68, 0xc8,
        0x4e,
    ];
    const NONCE_V1: [u8; 12] = [
        0x46, 0x15, 0x99, 0xd3, 0x5d, 0x63, 0x2b, 0xf2, 0x23, 0x98, 0x25, 0xbb,
    ];
    const KEY_DRAFT: [u8; 16] = [
        0xcc, 0xce, 0x18, 0x7e, 0xd0, 0x9a, 0x09, 0xd0, 0x57, 0x28, 0x15, 0x5a, 0x6c, 0xb9, 0x6b,
        0xe1,
    ];
    const NONCE_DRAFT: [u8; 12] = [
        0xe5, 0x49, 0x30, 0xf9, 0x7f, 0x21, 0x36, 0xf0, 0x53, 0x0a, 0x8c, 0x1c,
    ];
    let (nonce, key) = match quic_version(version) {
        Ok(Version::V1Draft) => (NONCE_DRAFT, KEY_DRAFT),
        _ => (NONCE_V1, KEY_V1),
    };
    let mut pseudo = Vec::with_capacity(packet.len() + orig_dst_cid.len() + 1);
    pseudo.push(orig_dst_cid.len() as u8);
    pseudo.extend_from_slice(orig_dst_cid);
    pseudo.extend_from_slice(packet);
    let mut tag = [0; 16];
    // A fixed 16-byte key and a 12-byte nonce: AES-128-GCM cannot refuse them.
    if let Ok(unbound) = aead::UnboundKey::new(&aead::AES_128_GCM, &key) {
        let key = aead::LessSafeKey::new(unbound);
        if let Ok(t) = key.seal_in_place_separate_tag(
            aead::Nonce::assume_unique_for_key(nonce),
            aead::Aad::from(pseudo),
            &mut [],
        ) {
            tag.copy_from_slice(t.as_ref());
        }
    }
    tag
}
