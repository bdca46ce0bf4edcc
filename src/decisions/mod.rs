//! Remediation decisions: who is refused, by whose word, until when.
//!
//! - `store`: the one in-memory store (local and CrowdSec partitions), the lock-free
//!   longest-prefix lookup the request path uses, and the on-disk file for local decisions.
//! - `crowdsec`: the LAPI stream bridge (a background task; nothing on the request path calls
//!   the LAPI) and the optional AppSec (WAF) forwarding stage.
//! - `stream`: the LAPI's stream answer, parsed within `max_decisions`.
//! - `appsec`: the optional CrowdSec AppSec (WAF) stage.
//! - `wazuh`: parsing Wazuh active-response messages (4.x and 5.x) for `wraith wazuh-ar`.
//! - `godur`: Go `time.Duration` strings as CrowdSec writes them.
//!
//! The pipeline stage is [`check`]: client IP -> `Ok(())` or a typed refusal.

pub mod appsec;
pub mod crowdsec;
pub mod godur;
pub mod store;
pub mod stream;
mod table;
pub mod wazuh;

use std::fmt;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::config::{DecisionsConfig, Fallback};
use crate::error::GatewayError;
pub use store::{DecisionStore, Verdict};

/// Whether a decision names one address or a range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Scope {
    /// One address (CrowdSec `Ip`).
    Ip,
    /// A CIDR range (CrowdSec `Range`).
    Range,
}

impl Scope {
    /// The CrowdSec spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Ip => "Ip",
            Scope::Range => "Range",
        }
    }

    /// Parses `ip`/`Ip`/`range`/`Range` (CrowdSec normalises case).
    pub fn parse(s: &str) -> Option<Scope> {
        if s.eq_ignore_ascii_case("ip") {
            Some(Scope::Ip)
        } else if s.eq_ignore_ascii_case("range") {
            Some(Scope::Range)
        } else {
            None
        }
    }
}

/// Where a decision came from: local ones (admin API, Wazuh) are persisted; CrowdSec ones
/// are owned by the LAPI and replaced on every full sync.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// Added through the admin API (`wraith decisions add`, `wraith wazuh-ar`).
    Local,
    /// Pulled from a CrowdSec LAPI.
    Crowdsec,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Source::Local => "local",
            Source::Crowdsec => "crowdsec",
        })
    }
}

/// What the gateway does for a matched decision, after the fallback for non-ban types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Refuse (403; at accept time, close the connection).
    Ban,
    /// Let the request through.
    Allow,
}

/// One remediation decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Local or CrowdSec.
    pub source: Source,
    /// Who decided: `admin`, `wazuh:<active response>`, CrowdSec's `crowdsec`/`cscli`/`CAPI`/`lists`, ...
    pub origin: Arc<str>,
    /// Ip or Range.
    pub scope: Scope,
    /// The address (as a /32 or /128) or range, host bits cleared.
    pub value: IpNet,
    /// `ban`, `captcha`, or anything custom.
    pub kind: Arc<str>,
    /// When it stops applying, on the decisions' clock (`store::now_ms`: milliseconds since
    /// the Unix epoch, moved on by the monotonic clock).
    pub until_ms: u64,
    /// Why (a scenario, an alert, an operator's note): shared, as a million CrowdSec
    /// decisions carry a few dozen scenarios.
    pub reason: Arc<str>,
}

/// The identity of a decision inside its source: adding the same key again replaces it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    pub origin: Arc<str>,
    pub scope: Scope,
    pub value: IpNet,
    pub kind: Arc<str>,
}

impl Decision {
    /// The key this decision is stored under.
    pub fn key(&self) -> Key {
        Key {
            origin: self.origin.clone(),
            scope: self.scope,
            value: self.value,
            kind: self.kind.clone(),
        }
    }
}

/// Parses a decision value for `scope`: an address for `Ip`, a CIDR (or bare address) for
/// `Range`. IPv4-mapped IPv6 addresses become IPv4, host bits are cleared.
pub fn parse_value(scope: Scope, value: &str) -> Result<IpNet, String> {
    let value = value.trim();
    match scope {
        Scope::Ip => value
            .parse::<IpAddr>()
            .map(|ip| IpNet::from(crate::proxy::headers::canonical(ip)))
            .map_err(|_| format!("{value:?} is not an IP address")),
        Scope::Range => {
            let net = value
                .parse::<IpNet>()
                .or_else(|_| value.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| format!("{value:?} is not a CIDR range (e.g. 192.0.2.0/24)"))?;
            Ok(canonical_net(net.trunc()))
        }
    }
}

/// `::ffff:192.0.2.0/120` -> `192.0.2.0/24`, so mapped and plain addresses match alike.
pub(crate) fn canonical_net(net: IpNet) -> IpNet {
    if let IpNet::V6(v6) = net {
        if let Some(v4) = v6.addr().to_ipv4_mapped() {
            if v6.prefix_len() >= 96 {
                if let Ok(n) = ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96) {
                    return IpNet::V4(n.trunc());
                }
            }
        }
    }
    net
}

/// Whether a decision type is a plain token (`ban`, `captcha`, `throttle`, ...).
pub fn valid_kind(kind: &str) -> bool {
    !kind.is_empty()
        && kind.len() <= 64
        && kind
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'))
}

/// What a decision type means here: `ban` bans; everything else follows the fallback.
pub fn action_for(kind: &str, fallback: Fallback) -> Action {
    if kind == "ban" {
        return Action::Ban;
    }
    match fallback {
        Fallback::Ban => Action::Ban,
        Fallback::Allow => Action::Allow,
    }
}

/// The decisions stage: refuses a client the store bans, or every client while a
/// CrowdSec bridge configured `on_error = "closed"` is too stale to trust.
///
/// Runs after routing (so the access log names the route) and before policy and rate
/// limits (a banned client should not consume anyone's quota). Cost on a miss: one
/// ArcSwap load plus one hash probe per distinct prefix length in the store.
pub fn check(
    store: &DecisionStore,
    config: &DecisionsConfig,
    client: IpAddr,
) -> Result<(), GatewayError> {
    if store.refusing_all() {
        return Err(GatewayError::DecisionsUnavailable);
    }
    match store.lookup(client, config.fallback) {
        Some(v) if v.action == Action::Ban => Err(GatewayError::Banned {
            origin: v.origin,
            kind: v.kind,
            reason: v.reason,
        }),
        _ => Ok(()),
    }
}

/// Keeps a client that is banned from holding on to what it started before: a response
/// still streaming (a download, an event stream) and a WebSocket tunnel end when a ban on
/// the client is published, not when they would have ended. Taken before the request's own
/// ban check, so a ban published while the upstream answered counts too.
#[derive(Clone)]
pub struct BanWatch {
    store: Arc<DecisionStore>,
    client: IpAddr,
    fallback: Fallback,
    /// The store's generation last looked at.
    seen: u64,
}

/// What a `BanWatch` is made from, borrowed: the watch itself (a reference count) is made
/// only for what needs one.
#[derive(Clone, Copy)]
pub struct BanSource<'a> {
    pub store: &'a Arc<DecisionStore>,
    pub config: &'a DecisionsConfig,
    pub client: IpAddr,
    /// The store's generation when the request's own ban check was about to run.
    pub since: u64,
}

impl BanSource<'_> {
    pub fn watch(&self) -> BanWatch {
        BanWatch::since(self.store, self.config, self.client, self.since)
    }
}

impl BanWatch {
    /// A watch over `client`, for bans published after the store's generation `since`.
    pub fn since(
        store: &Arc<DecisionStore>,
        config: &DecisionsConfig,
        client: IpAddr,
        since: u64,
    ) -> BanWatch {
        BanWatch {
            seen: since,
            store: store.clone(),
            client,
            fallback: config.fallback,
        }
    }

    /// The ban on the client, if one was published since the last look. One atomic load when
    /// nothing was (a response body asks at every frame).
    pub fn check(&mut self) -> Option<Verdict> {
        let generation = self.store.generation();
        if generation == self.seen {
            return None;
        }
        self.seen = generation;
        self.store
            .lookup(self.client, self.fallback)
            .filter(|v| v.action == Action::Ban)
    }

    /// Waits until a ban on the client is published.
    pub async fn banned(mut self) -> Verdict {
        // Subscribed before the first look: a table published in between wakes the wait.
        let mut changes = self.store.changes();
        loop {
            if let Some(v) = self.check() {
                return v;
            }
            if changes.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }
}

/// A `BanWatch` for a body being relayed: it looks at each piece that passes (one atomic
/// load), and while the body waits for its sender it waits on the store's change signal
/// (made the first time it waits), so an idle body is cut too.
pub struct BodyBans {
    watch: BanWatch,
    idle: Option<Pin<Box<dyn Future<Output = Verdict> + Send>>>,
}

impl BodyBans {
    pub fn new(watch: BanWatch) -> BodyBans {
        BodyBans { watch, idle: None }
    }

    /// The ban on the client published since the last look, given what the body's last
    /// poll gave (a piece: a look; nothing yet: the wait, polled with `cx`).
    pub fn poll<T, E>(
        &mut self,
        polled: &Poll<Option<Result<T, E>>>,
        cx: &mut Context<'_>,
    ) -> Option<Verdict> {
        match polled {
            Poll::Ready(Some(Ok(_))) => self.watch.check(),
            Poll::Pending => {
                let watch = &self.watch;
                let idle = self
                    .idle
                    .get_or_insert_with(|| Box::pin(watch.clone().banned()));
                match idle.as_mut().poll(cx) {
                    Poll::Ready(ban) => Some(ban),
                    Poll::Pending => None,
                }
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_canonical() {
        assert_eq!(
            parse_value(Scope::Ip, "::ffff:192.0.2.1").unwrap(),
            "192.0.2.1/32".parse::<IpNet>().unwrap()
        );
        assert_eq!(
            parse_value(Scope::Range, "192.0.2.77/24").unwrap(),
            "192.0.2.0/24".parse::<IpNet>().unwrap()
        );
        assert_eq!(
            parse_value(Scope::Range, "::ffff:192.0.2.0/120").unwrap(),
            "192.0.2.0/24".parse::<IpNet>().unwrap()
        );
        assert!(parse_value(Scope::Ip, "192.0.2.0/24").is_err());
        assert!(parse_value(Scope::Range, "nonsense").is_err());
    }

    #[test]
    fn kinds_and_fallback() {
        assert!(valid_kind("ban"));
        assert!(valid_kind("captcha"));
        assert!(!valid_kind(""));
        assert!(!valid_kind("b an"));
        assert_eq!(action_for("ban", Fallback::Allow), Action::Ban);
        assert_eq!(action_for("captcha", Fallback::Ban), Action::Ban);
        assert_eq!(action_for("captcha", Fallback::Allow), Action::Allow);
        assert_eq!(action_for("throttle", Fallback::Allow), Action::Allow);
    }
}
