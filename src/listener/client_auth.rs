//! Which client-certificate rules a connection was let in under, and closing it when a reload
//! changes them.
//!
//! A TLS handshake checks the client certificate once; the connection then serves requests for
//! as long as the client keeps it open (keep-alive, HTTP/2, HTTP/3). So when a reload changes
//! who may connect - `client_auth` mode, the CA bundles, the CRLs (re-read on every reload) or
//! the chain depth - the connections admitted under the old rules must not go on serving. The
//! same holds for a TLS version or key-exchange group the reload stops allowing.
//!
//! Every listener runtime holds a `ClientAuthEpoch`. A reload that leaves a listener's
//! client-authentication settings as they were carries the epoch over to the new snapshot; one
//! that changes them gives the listener a new epoch and revokes the old one, which asks every
//! connection admitted under it to finish (HTTP/1.1: the request in flight, then close; HTTP/2
//! and HTTP/3: GOAWAY) and makes the pipeline refuse requests that arrive on them meanwhile.
//! TLS session resumption cannot get around it: every snapshot builds new rustls configs,
//! whose session caches start empty.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::config::{ClientAuth, ClientAuthMode, ListenerConfig};

/// One stretch of unchanged client-authentication settings of a listener, shared by every
/// snapshot (and every connection) in it.
#[derive(Debug, Default)]
pub struct ClientAuthEpoch {
    /// Cancelled when a reload changes the settings.
    revoked: CancellationToken,
    /// Connections admitted under these settings that are still open (TCP and QUIC).
    open: AtomicUsize,
}

impl ClientAuthEpoch {
    /// The epoch of listener `config` in a new snapshot: the previous one's (the listener with
    /// the same key in the running snapshot) when the settings are the same, else a new one.
    pub fn carry_over(
        config: &ListenerConfig,
        previous: Option<(&ListenerConfig, &Arc<ClientAuthEpoch>)>,
    ) -> Arc<ClientAuthEpoch> {
        match previous {
            Some((old, epoch)) if admits_same_clients(old, config) => epoch.clone(),
            _ => Arc::default(),
        }
    }

    /// Asks every connection admitted under these settings to finish; returns how many were
    /// open (including those still in their handshake).
    pub fn revoke(&self) -> usize {
        // Counted first: an idle connection may be gone before `cancel` returns.
        let open = self.open.load(Ordering::Relaxed);
        self.revoked.cancel();
        open
    }

    /// Whether a reload has replaced these settings.
    pub fn is_revoked(&self) -> bool {
        self.revoked.is_cancelled()
    }

    /// Resolves once a reload has replaced these settings.
    pub async fn revoked(&self) {
        self.revoked.cancelled().await
    }

    /// Counts one connection as admitted under these settings until the guard drops.
    pub fn admit(self: &Arc<Self>) -> Admitted {
        self.open.fetch_add(1, Ordering::Relaxed);
        Admitted(self.clone())
    }
}

/// One open connection of a `ClientAuthEpoch`.
#[derive(Debug)]
pub struct Admitted(Arc<ClientAuthEpoch>);

impl Drop for Admitted {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Whether two versions of a listener let exactly the same client certificates in. What is
/// compared is what the verifier uses - the mode, the CA certificates and CRLs as read from
/// their files, the chain depth - not the file names: a bundle moved to another path changes
/// nothing, a CRL rewritten in place does. Without client authentication (a plain listener, or
/// `client_auth = "none"`) the other settings mean nothing and are not compared; but a listener
/// turned from plain HTTP into HTTPS (or back) admits under other rules: its plaintext
/// connections must not outlive the change.
///
/// The TLS parameters count too, in one direction: a reload that stops allowing a TLS version
/// or a key-exchange group the listener allowed before (dropping TLS 1.2, or the classical
/// groups to require post-quantum key exchange) closes the connections that may have been
/// negotiated with it. Allowing more closes nothing.
pub fn admits_same_clients(a: &ListenerConfig, b: &ListenerConfig) -> bool {
    !tls_narrowed(a, b) && same_client_auth(a, b)
}

/// Whether `b` no longer allows a TLS version or key-exchange group that `a` allowed.
fn tls_narrowed(a: &ListenerConfig, b: &ListenerConfig) -> bool {
    match (&a.tls, &b.tls) {
        (Some(a), Some(b)) => {
            a.versions.iter().any(|v| !b.versions.contains(v))
                || a.key_exchange.iter().any(|g| !b.key_exchange.contains(g))
        }
        _ => false,
    }
}

fn same_client_auth(a: &ListenerConfig, b: &ListenerConfig) -> bool {
    fn verified(l: &ListenerConfig) -> Option<&ClientAuth> {
        l.tls
            .as_ref()
            .map(|t| &t.client_auth)
            .filter(|c| c.mode != ClientAuthMode::None)
    }
    match (verified(a), verified(b)) {
        (None, None) => a.tls.is_some() == b.tls.is_some(),
        (Some(a), Some(b)) => {
            a.mode == b.mode
                && a.max_chain_depth == b.max_chain_depth
                && a.cas == b.cas
                && a.crls == b.crls
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TlsConfig;
    use rustls_pki_types::{CertificateDer, CertificateRevocationListDer};

    fn plain() -> ListenerConfig {
        ListenerConfig {
            name: "https".into(),
            address: "127.0.0.1:8443".parse().unwrap(),
            tls: None,
            redirect_https: None,
            limits: Default::default(),
            quic: None,
        }
    }

    fn listener(auth: ClientAuth) -> ListenerConfig {
        let mut l = plain();
        l.tls = Some(TlsConfig {
            cert_path: "server.pem".into(),
            key_path: "server-key.pem".into(),
            versions: Vec::new(),
            alpn: Vec::new(),
            key_exchange: Vec::new(),
            handshake_timeout: std::time::Duration::from_secs(10),
            certified_key: None,
            client_auth: auth,
        });
        l
    }

    fn required(ca: &[u8], crl: Option<&[u8]>) -> ClientAuth {
        ClientAuth {
            mode: ClientAuthMode::Require,
            ca_paths: vec!["ca.pem".into()],
            cas: vec![CertificateDer::from(ca.to_vec())],
            crl_paths: crl.iter().map(|_| "ca.crl".into()).collect(),
            crls: crl
                .iter()
                .map(|c| CertificateRevocationListDer::from(c.to_vec()))
                .collect(),
            max_chain_depth: 4,
        }
    }

    #[test]
    fn what_the_verifier_uses_is_compared_not_the_file_names() {
        let base = listener(required(b"ca", Some(b"crl-1")));
        let moved = {
            let mut a = required(b"ca", Some(b"crl-1"));
            a.ca_paths = vec!["elsewhere/ca.pem".into()];
            a.crl_paths = vec!["elsewhere/ca.crl".into()];
            listener(a)
        };
        assert!(admits_same_clients(&base, &moved));

        let new_crl = listener(required(b"ca", Some(b"crl-2")));
        let no_crl = listener(required(b"ca", None));
        let other_ca = listener(required(b"other ca", Some(b"crl-1")));
        let optional = listener(ClientAuth {
            mode: ClientAuthMode::Optional,
            ..required(b"ca", Some(b"crl-1"))
        });
        let deeper = listener(ClientAuth {
            max_chain_depth: 5,
            ..required(b"ca", Some(b"crl-1"))
        });
        for (what, changed) in [
            ("a CRL rewritten", &new_crl),
            ("the CRL removed", &no_crl),
            ("the CA replaced", &other_ca),
            ("require -> optional", &optional),
            ("another chain depth", &deeper),
        ] {
            assert!(!admits_same_clients(&base, changed), "{what}");
        }
    }

    #[test]
    fn without_client_authentication_nothing_else_counts() {
        let plain = plain();
        let none = listener(ClientAuth {
            max_chain_depth: 9,
            ..ClientAuth::default()
        });
        let none_deeper = listener(ClientAuth {
            max_chain_depth: 3,
            ..ClientAuth::default()
        });
        assert!(admits_same_clients(&none, &none_deeper));
        assert!(admits_same_clients(&plain, &plain));
        // Plain HTTP turned into HTTPS (or back): the plaintext connections must go.
        assert!(!admits_same_clients(&plain, &none));
        assert!(!admits_same_clients(&none, &plain));
        assert!(!admits_same_clients(
            &plain,
            &listener(required(b"ca", None))
        ));
    }

    #[test]
    fn a_tls_version_or_group_no_longer_allowed_counts_one_added_does_not() {
        use crate::config::TlsVersion;
        use crate::listener::tls::KxGroup;
        let with = |versions: &[TlsVersion], groups: &[KxGroup], auth: ClientAuth| {
            let mut l = listener(auth);
            let t = l.tls.as_mut().unwrap();
            t.versions = versions.to_vec();
            t.key_exchange = groups.to_vec();
            l
        };
        let (v12, v13) = (TlsVersion::Tls12, TlsVersion::Tls13);
        let (pq, x) = (KxGroup::X25519MlKem768, KxGroup::X25519);
        for auth in [ClientAuth::default(), required(b"ca", None)] {
            let both = with(&[v13, v12], &[pq, x], auth.clone());
            // Narrowed: connections may use what is gone.
            assert!(!admits_same_clients(
                &both,
                &with(&[v13], &[pq, x], auth.clone())
            ));
            assert!(!admits_same_clients(
                &both,
                &with(&[v13, v12], &[pq], auth.clone())
            ));
            // Widened, reordered or the same: nothing to close.
            let narrow = with(&[v13], &[pq], auth.clone());
            assert!(admits_same_clients(&narrow, &both));
            assert!(admits_same_clients(
                &both,
                &with(&[v12, v13], &[x, pq], auth.clone())
            ));
            assert!(admits_same_clients(&both, &both));
        }
    }

    #[test]
    fn an_epoch_is_carried_over_only_while_the_settings_stay() {
        let old = listener(required(b"ca", Some(b"crl-1")));
        let epoch = ClientAuthEpoch::carry_over(&old, None);
        let same = ClientAuthEpoch::carry_over(&old, Some((&old, &epoch)));
        assert!(Arc::ptr_eq(&epoch, &same));
        let new = listener(required(b"ca", Some(b"crl-2")));
        let next = ClientAuthEpoch::carry_over(&new, Some((&old, &epoch)));
        assert!(!Arc::ptr_eq(&epoch, &next));

        let a = epoch.admit();
        let _b = epoch.admit();
        drop(a);
        assert_eq!(epoch.revoke(), 1);
        assert!(epoch.is_revoked());
        assert!(!next.is_revoked());
    }
}
