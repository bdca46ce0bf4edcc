//! Which client-certificate rules and TLS parameters a connection was let in under, and
//! closing it when a reload takes them away.
//!
//! A TLS handshake checks the client certificate once; the connection then serves requests for
//! as long as the client keeps it open (keep-alive, HTTP/2, HTTP/3). So when a reload changes
//! who may connect - `client_auth` mode, the CA bundles, the CRLs (re-read on every reload) or
//! the chain depth - the connections admitted under the old rules must not go on serving.
//!
//! Every listener runtime holds a `ClientAuthEpoch`. A reload that leaves a listener's
//! client-authentication settings as they were carries the epoch over to the new snapshot; one
//! that changes them gives the listener a new epoch and revokes the old one, which asks every
//! connection admitted under it to finish (HTTP/1.1: the request in flight, then close; HTTP/2
//! and HTTP/3: GOAWAY) and makes the pipeline refuse requests that arrive on them meanwhile.
//! TLS session resumption cannot get around it: the new rustls configs of a listener with a
//! new epoch (or a `Withdrawal`) start with empty session caches; only a listener whose epoch
//! carries over, with nothing withdrawn, keeps its sessions (`Snapshot::build`).
//!
//! A reload that stops allowing a TLS version or key-exchange group (TLS 1.2 dropped, or the
//! classical groups dropped to require post-quantum key exchange) keeps the epoch and records
//! a `Withdrawal` in it instead: only the connections that negotiated what was withdrawn are
//! asked to finish, the same way. Each connection knows what it negotiated (`Negotiated`) and
//! how many withdrawals it has checked itself against, so the check costs two atomic loads
//! until the next withdrawal. A connection still in its handshake (begun with the old
//! settings) is checked once the handshake says what it negotiated.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::{ClientAuth, ClientAuthMode, ListenerConfig, TlsVersion};

/// One stretch of unchanged client-authentication settings of a listener, shared by every
/// snapshot (and every connection) in it.
#[derive(Debug, Default)]
pub struct ClientAuthEpoch {
    /// Cancelled when a reload changes the settings.
    revoked: CancellationToken,
    /// Connections admitted under these settings that are still open (TCP and QUIC).
    open: AtomicUsize,
    /// Each TLS version and group a reload stopped allowing, by name, with the latest
    /// generation that stopped allowing it: a connection is subject to the withdrawals of
    /// generations after its own, so of several withdrawals of one name only the latest
    /// counts. At most one entry per version and group, however many reloads withdraw them.
    withdrawals: Mutex<Vec<(&'static str, u64)>>,
    /// Withdrawals recorded so far (only grows), read without the lock.
    withdrawn: AtomicUsize,
    /// Woken on every withdrawal.
    withdrawal: Notify,
    /// The listener's CRLs by issuer (the raw DER name) and nextUpdate (Unix seconds): past
    /// it, webpki refuses the certificates that CRL covers, so the connections it let in
    /// must not outlive it either.
    crl_next_updates: Vec<(Vec<u8>, i64)>,
    /// The listener's client CAs: copies that clients send along are not theirs to expire.
    cas: Vec<rustls_pki_types::CertificateDer<'static>>,
}

/// What one reload stopped allowing, by the names `TlsInfo` carries (`TLSv1.2`, `X25519`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Withdrawal {
    pub versions: Vec<&'static str>,
    pub groups: Vec<&'static str>,
}

impl Withdrawal {
    /// What `b` no longer allows of what `a` allowed; `None` when nothing was withdrawn.
    pub fn between(a: &ListenerConfig, b: &ListenerConfig) -> Option<Withdrawal> {
        let (Some(a), Some(b)) = (&a.tls, &b.tls) else {
            return None;
        };
        let w = Withdrawal {
            versions: a
                .versions
                .iter()
                .filter(|v| !b.versions.contains(v))
                .map(|v| version_name(*v))
                .collect(),
            groups: a
                .key_exchange
                .iter()
                .filter(|g| !b.key_exchange.contains(g))
                .map(|g| g.name())
                .collect(),
        };
        (!w.versions.is_empty() || !w.groups.is_empty()).then_some(w)
    }
}

/// The name a negotiated TLS version is logged under.
pub fn version_name(v: TlsVersion) -> &'static str {
    match v {
        TlsVersion::Tls12 => "TLSv1.2",
        TlsVersion::Tls13 => "TLSv1.3",
    }
}

/// A TLS version and key-exchange group, as `TlsInfo` names them.
type NegotiatedParams = (&'static str, Option<&'static str>);

/// What one TLS (or QUIC) connection negotiated, and how far it has checked itself against
/// its epoch's withdrawals. Shared by every clone of the connection's `CloseSignal`.
#[derive(Debug)]
pub struct Negotiated {
    /// Unknown until the handshake has chosen them.
    params: Mutex<Option<NegotiatedParams>>,
    /// The generation of the snapshot whose TLS settings its handshake ran under: it is
    /// subject to the withdrawals of later generations only. (Not the withdrawal count at
    /// accept: a reload can swap and withdraw between a connection's snapshot load and that
    /// count, and the connection would handshake under the old settings unchecked.)
    generation: u64,
    /// Withdrawals already checked.
    checked: AtomicUsize,
    /// Set once a withdrawal covered what it negotiated.
    hit: AtomicBool,
    /// When what admitted its client certificate stops holding (`admitted_until`).
    until: std::sync::OnceLock<tokio::time::Instant>,
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
            _ => Arc::new(ClientAuthEpoch::for_listener(config)),
        }
    }

    /// A new epoch for `config`'s client-authentication settings.
    pub fn for_listener(config: &ListenerConfig) -> ClientAuthEpoch {
        let Some(auth) = config
            .tls
            .as_ref()
            .map(|t| &t.client_auth)
            .filter(|a| a.mode != ClientAuthMode::None)
        else {
            return ClientAuthEpoch::default();
        };
        let crl_next_updates = auth
            .crls
            .iter()
            .filter_map(|crl| {
                let (_, crl) = x509_parser::parse_x509_crl(crl).ok()?;
                Some((
                    crl.issuer().as_raw().to_vec(),
                    crl.next_update()?.timestamp(),
                ))
            })
            .collect();
        ClientAuthEpoch {
            crl_next_updates,
            cas: auth.cas.clone(),
            ..ClientAuthEpoch::default()
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

    /// Records that the snapshot of `generation` stopped allowing `w` and asks the
    /// connections that negotiated it (under an earlier generation) to finish.
    pub fn withdraw(&self, generation: u64, w: Withdrawal) {
        let mut all = self.withdrawals.lock().unwrap_or_else(|e| e.into_inner());
        for name in w.versions.into_iter().chain(w.groups) {
            match all.iter_mut().find(|(n, _)| *n == name) {
                Some((_, g)) => *g = (*g).max(generation),
                None => all.push((name, generation)),
            }
        }
        self.withdrawn.fetch_add(1, Ordering::Release);
        drop(all);
        self.withdrawal.notify_waiters();
    }

    /// A connection accepted under the TLS settings of snapshot `generation`: it is subject
    /// to the withdrawals of later generations.
    pub fn negotiating(&self, generation: u64) -> Negotiated {
        Negotiated {
            params: Mutex::new(None),
            generation,
            checked: AtomicUsize::new(0),
            hit: AtomicBool::new(false),
            until: std::sync::OnceLock::new(),
        }
    }

    /// Records when what admitted `conn`'s client certificate stops holding: the earliest
    /// notAfter of the certificates in its chain, and the earliest nextUpdate of the CRLs
    /// that cover them (by issuer). Copies of the listener's CAs, and certificates already
    /// expired (so not in the path the verifier accepted), do not count. Nothing for
    /// connections without a client certificate.
    pub fn admit_until(&self, conn: &Negotiated, chain: &[rustls_pki_types::CertificateDer<'_>]) {
        let now = ::time::OffsetDateTime::now_utc().unix_timestamp();
        // A time in whole seconds holds through that second (webpki refuses only when the
        // clock is past it): what it bounds ends at the start of the next one.
        let mut until: Option<i64> = None;
        let mut sooner = |t: i64| {
            if t >= now {
                let end = t.saturating_add(1);
                until = Some(until.map_or(end, |u| u.min(end)));
            }
        };
        for der in chain {
            if self.cas.iter().any(|ca| ca.as_ref() == der.as_ref()) {
                continue;
            }
            let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
                continue;
            };
            sooner(cert.validity().not_after.timestamp());
            for (issuer, next) in &self.crl_next_updates {
                if issuer.as_slice() == cert.issuer().as_raw() {
                    sooner(*next);
                }
            }
        }
        let Some(until) = until else {
            return;
        };
        let left = Duration::from_secs(until.saturating_sub(now).max(0) as u64)
            .min(crate::config::units::MAX_DURATION);
        let _ = conn.until.set(tokio::time::Instant::now() + left);
    }

    /// Whether a withdrawal covers what `conn` negotiated.
    pub fn withdrew(&self, conn: &Negotiated) -> bool {
        let count = self.withdrawn.load(Ordering::Acquire);
        if count <= conn.checked.load(Ordering::Acquire) {
            return conn.hit.load(Ordering::Acquire);
        }
        let Some(params) = *conn.params.lock().unwrap_or_else(|e| e.into_inner()) else {
            // Still in its handshake: checked once it knows what it negotiated.
            return false;
        };
        let all = self.withdrawals.lock().unwrap_or_else(|e| e.into_inner());
        let (version, group) = params;
        if all
            .iter()
            .any(|(name, g)| *g > conn.generation && (*name == version || group == Some(*name)))
        {
            conn.hit.store(true, Ordering::Release);
        }
        // Under the lock: every withdrawal counted is in what was just checked.
        conn.checked
            .store(self.withdrawn.load(Ordering::Acquire), Ordering::Release);
        conn.hit.load(Ordering::Acquire)
    }

    /// Resolves once a withdrawal covers what `conn` negotiated.
    pub async fn withdrawn(&self, conn: &Negotiated) {
        loop {
            let next = self.withdrawal.notified();
            tokio::pin!(next);
            // Registered before the check, so a withdrawal in between is not missed.
            next.as_mut().enable();
            if self.withdrew(conn) {
                return;
            }
            next.await;
        }
    }
}

impl Negotiated {
    /// Records what the handshake chose (again, when a 0-RTT connection completes).
    pub fn set(&self, version: &'static str, group: Option<&'static str>) {
        *self.params.lock().unwrap_or_else(|e| e.into_inner()) = Some((version, group));
    }

    /// When its client certificate's admission stops holding, once known.
    pub fn until(&self) -> Option<tokio::time::Instant> {
        self.until.get().copied()
    }

    /// Whether that time has come.
    pub fn expired(&self) -> bool {
        self.until()
            .is_some_and(|t| tokio::time::Instant::now() >= t)
    }

    /// Resolves once that time has come (never, without a client certificate).
    pub async fn expiry(&self) {
        let Some(until) = self.until() else {
            return std::future::pending().await;
        };
        // In steps: the timer wheel does not reach years ahead.
        while tokio::time::Instant::now() < until {
            let step = tokio::time::Instant::now() + Duration::from_secs(86_400);
            tokio::time::sleep_until(until.min(step)).await;
        }
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
/// TLS versions and key-exchange groups are not compared here: withdrawing one closes only
/// the connections that negotiated it (`Withdrawal::between`).
pub fn admits_same_clients(a: &ListenerConfig, b: &ListenerConfig) -> bool {
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
                && a.trust_domains == b.trust_domains
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
            proxy_protocol: false,
        }
    }

    fn listener(auth: ClientAuth) -> ListenerConfig {
        let mut l = plain();
        l.tls = Some(TlsConfig {
            cert_path: "server.pem".into(),
            key_path: "server-key.pem".into(),
            ocsp_path: None,
            ocsp: None,
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
            ..ClientAuth::default()
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
        let bound = listener(ClientAuth {
            trust_domains: vec![(
                "test.local".into(),
                vec![CertificateDer::from(b"ca".to_vec())],
            )],
            ..required(b"ca", Some(b"crl-1"))
        });
        for (what, changed) in [
            ("a trust domain bound", &bound),
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
    fn a_tls_version_or_group_no_longer_allowed_is_withdrawn_one_added_is_not() {
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
            let only13 = with(&[v13], &[pq, x], auth.clone());
            let only_pq = with(&[v13, v12], &[pq], auth.clone());
            // The client-certificate rules stay: the epoch is carried over.
            assert!(admits_same_clients(&both, &only13));
            assert_eq!(
                Withdrawal::between(&both, &only13),
                Some(Withdrawal {
                    versions: vec!["TLSv1.2"],
                    groups: vec![],
                })
            );
            assert_eq!(
                Withdrawal::between(&both, &only_pq),
                Some(Withdrawal {
                    versions: vec![],
                    groups: vec!["X25519"],
                })
            );
            // Widened, reordered or the same: nothing withdrawn.
            let narrow = with(&[v13], &[pq], auth.clone());
            assert_eq!(Withdrawal::between(&narrow, &both), None);
            assert_eq!(
                Withdrawal::between(&both, &with(&[v12, v13], &[x, pq], auth.clone())),
                None
            );
            assert_eq!(Withdrawal::between(&both, &both), None);
        }
    }

    #[test]
    fn a_withdrawal_reaches_only_the_connections_that_negotiated_it() {
        let epoch = Arc::new(ClientAuthEpoch::default());
        let tls12 = epoch.negotiating(1);
        tls12.set("TLSv1.2", Some("X25519"));
        let pq = epoch.negotiating(1);
        pq.set("TLSv1.3", Some("X25519MLKEM768"));
        // Accepted before the withdrawal, still in its handshake when it comes.
        let handshaking = epoch.negotiating(1);
        assert!(!epoch.withdrew(&tls12) && !epoch.withdrew(&pq));

        epoch.withdraw(
            2,
            Withdrawal {
                versions: vec!["TLSv1.2"],
                groups: vec![],
            },
        );
        assert!(epoch.withdrew(&tls12));
        assert!(epoch.withdrew(&tls12), "a hit stays a hit");
        assert!(!epoch.withdrew(&pq));
        assert!(!epoch.withdrew(&handshaking));
        handshaking.set("TLSv1.2", Some("X25519"));
        assert!(epoch.withdrew(&handshaking), "checked once it negotiated");
        // Accepted under generation 1's settings, its close signal made only after the
        // withdrawal was recorded (a reload between the two): subject to it all the same.
        let racing = epoch.negotiating(1);
        racing.set("TLSv1.2", Some("X25519"));
        assert!(epoch.withdrew(&racing));

        // Accepted after the withdrawal (under settings without TLS 1.2); a later reload
        // allowing 1.2 again lets new connections negotiate it without being closed.
        let later = epoch.negotiating(2);
        later.set("TLSv1.2", Some("X25519"));
        assert!(!epoch.withdrew(&later));
        epoch.withdraw(
            4,
            Withdrawal {
                versions: vec![],
                groups: vec!["X25519"],
            },
        );
        assert!(epoch.withdrew(&later));
        assert!(!epoch.withdrew(&pq));
        assert!(!epoch.is_revoked(), "withdrawals revoke nothing else");
    }

    /// Reloads that drop TLS 1.2 and allow it again, over and over, keep one entry for it
    /// (the table grew by one per withdrawal), and each connection is still judged by the
    /// withdrawals after its own generation.
    #[test]
    fn repeated_withdrawals_keep_one_entry_per_name() {
        let epoch = Arc::new(ClientAuthEpoch::default());
        let tls12 = Withdrawal {
            versions: vec!["TLSv1.2"],
            groups: vec!["X25519"],
        };
        let mut conns = Vec::new();
        for generation in (2..2000).step_by(2) {
            // Accepted under the generation allowing TLS 1.2 again, before this withdrawal.
            let conn = epoch.negotiating(generation - 1);
            conn.set("TLSv1.2", Some("X25519MLKEM768"));
            assert!(!epoch.withdrew(&conn));
            epoch.withdraw(generation, tls12.clone());
            assert!(epoch.withdrew(&conn), "generation {generation}");
            conns.push(conn);
        }
        assert_eq!(epoch.withdrawals.lock().unwrap().len(), 2);
        // Accepted after the last withdrawal: not covered by any.
        let after = epoch.negotiating(2000);
        after.set("TLSv1.2", Some("X25519"));
        assert!(!epoch.withdrew(&after));
        assert!(conns.iter().all(|c| epoch.withdrew(c)));
    }

    #[tokio::test]
    async fn waiting_connections_wake_on_the_withdrawal_that_covers_them() {
        let epoch = Arc::new(ClientAuthEpoch::default());
        let conn = Arc::new(epoch.negotiating(1));
        conn.set("TLSv1.3", Some("X25519"));
        let waiter = tokio::spawn({
            let (epoch, conn) = (epoch.clone(), conn.clone());
            async move { epoch.withdrawn(&conn).await }
        });
        tokio::task::yield_now().await;
        epoch.withdraw(
            2,
            Withdrawal {
                versions: vec!["TLSv1.2"],
                groups: vec![],
            },
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "not covered: still waiting");
        epoch.withdraw(
            3,
            Withdrawal {
                versions: vec![],
                groups: vec!["X25519"],
            },
        );
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("woken by the withdrawal")
            .unwrap();
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

#[cfg(test)]
mod expiry_tests {
    use super::*;
    use crate::certs::Ca;
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, CertificateRevocationListDer};

    fn crl_of(ca: &Ca, days: i64) -> (Vec<u8>, i64) {
        let pem = ca.revocation_list(&[], days).unwrap();
        let der = CertificateRevocationListDer::from_pem_slice(pem.as_bytes()).unwrap();
        let (_, crl) = x509_parser::parse_x509_crl(&der).unwrap();
        (
            crl.issuer().as_raw().to_vec(),
            crl.next_update().unwrap().timestamp(),
        )
    }

    #[tokio::test]
    async fn a_connection_is_bounded_by_its_own_chain_and_the_crl_that_covers_it() {
        let (a, b) = (Ca::new("A").unwrap(), Ca::new("B").unwrap());
        let leaf = a.issue_client("c", None).unwrap();
        let der = |pem: &str| CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        let (leaf, a_copy) = (der(&leaf.cert_pem), der(&a.cert_pem));
        let epoch = ClientAuthEpoch {
            // B's CRL is due first, but covers none of this chain; A's covers the leaf.
            crl_next_updates: vec![crl_of(&b, 1), crl_of(&a, 2)],
            cas: vec![a_copy.clone()],
            ..ClientAuthEpoch::default()
        };
        let conn = epoch.negotiating(1);
        // The client sends a copy of its CA along: not its to expire.
        epoch.admit_until(&conn, &[leaf, a_copy]);
        let left = conn.until().unwrap() - tokio::time::Instant::now();
        let day = std::time::Duration::from_secs(86_400);
        assert!(
            left > day + day / 2 && left <= 2 * day + std::time::Duration::from_secs(1),
            "{left:?}"
        );
        assert!(!conn.expired());

        // Without a client certificate, nothing bounds the connection.
        let anonymous = epoch.negotiating(1);
        epoch.admit_until(&anonymous, &[]);
        assert_eq!(anonymous.until(), None);
    }
}
