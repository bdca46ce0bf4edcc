//! The policy stage: Cedar decides whether a principal (the client's certificate identity, or
//! an anonymous client IP) may perform an action (the HTTP method, in groups `read` / `write`)
//! on a resource (the matched route), in a context (path, host, source IP, time, protocol, TLS,
//! early data). **Deny by default**: without a policy that permits, the answer is 403.
//!
//! ```text
//! PolicyEngine (one per snapshot)          built at load: schema-validated policy sets,
//!   ├─ route and action entities           routes' entities, action groups
//!   └─ authorize(Access) -> Permit | Deny  per request: context + one Cedar evaluation
//! ConnCache (one per connection)           the principal entity, built once per connection
//! ```
//!
//! Every decision is a `PolicyDecision`: effect, the ids (`@id`) of the policies that
//! determined it ("no policy permits" when none did), the set, and whether it was enforced or
//! only logged (shadow mode). The access log reads it from the pipeline's record.
//!
//! Submodules: `load` (files -> validated sets), `entities` (Cedar values without JSON),
//! `prune` (per route and method, only the policies that can apply), `cases` (`wraith test`
//! policy cases and coverage).

pub mod cases;
pub mod entities;
pub mod load;
mod prune;

use crate::telemetry::format::printable;
use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwapOption;
use cedar_policy::{Authorizer, Decision, Entities, EntityUid, PolicySet, Request};
use http::Method;

use crate::config::Config;
use crate::error::GatewayError;
use crate::identity::Identity;
use crate::proxy::ConnInfo;
use crate::router::Route;
use entities::{ContextInput, Types, ACTIONS};
pub use load::{Compiled, PolicyMode, SCHEMA};

/// What the policies said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    Allow,
    Deny,
}

/// Why, in one word the logs and the 403 body can carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// At least one permit applied and no forbid.
    Permitted,
    /// A forbid policy applied (forbid overrides permit).
    Forbidden,
    /// No policy permits: the default deny.
    NoPermit,
    /// The request could not be evaluated (fail closed).
    Error,
}

impl Reason {
    /// The text in logs and explain output.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Permitted => "permitted",
            Reason::Forbidden => "forbidden by policy",
            Reason::NoPermit => "no policy permits",
            Reason::Error => "policy evaluation failed",
        }
    }
}

/// One policy decision, as the access log and `wraith policy explain` show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyDecision {
    pub effect: Effect,
    pub reason: Reason,
    /// The `@id`s of the policies that determined the decision (permits on allow, forbids on
    /// an explicit deny; empty on the default deny).
    pub policies: Vec<Arc<str>>,
    /// The policy set that decided.
    pub set: Arc<str>,
    /// The decision was computed and logged but not enforced (`mode = "shadow"`).
    pub shadow: bool,
    /// Policies that failed to evaluate (Cedar skips them); empty normally.
    pub errors: Vec<String>,
}

impl PolicyDecision {
    /// Whether the request is refused (a deny that is not in shadow mode).
    pub fn refuses(&self) -> bool {
        self.effect == Effect::Deny && !self.shadow
    }

    /// The determining policies joined with `,` (`-` when none), for log lines.
    pub fn policy_list(&self) -> String {
        if self.policies.is_empty() {
            return "-".into();
        }
        self.policies.join(",")
    }
}

impl fmt::Display for PolicyDecision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let effect = match (self.effect, self.shadow) {
            (Effect::Allow, _) => "allow",
            (Effect::Deny, false) => "deny",
            (Effect::Deny, true) => "would deny",
        };
        write!(f, "{effect} ({}", self.reason.as_str())?;
        if !self.policies.is_empty() {
            write!(f, ": {}", self.policies.join(", "))?;
        }
        write!(f, "; set {})", self.set)
    }
}

/// A request the policies let through (possibly a shadow-mode "would deny").
#[derive(Debug)]
pub struct Permit {
    pub decision: PolicyDecision,
}

/// A request the policies refuse.
#[derive(Debug)]
pub struct Deny {
    pub decision: PolicyDecision,
}

impl From<&Deny> for GatewayError {
    fn from(d: &Deny) -> GatewayError {
        GatewayError::Forbidden(d.decision.reason)
    }
}

/// What the policy stage needs to know about one request.
pub struct Access<'a> {
    pub route: &'a Route,
    pub method: &'a Method,
    /// Host without port, as routing saw it.
    pub host: Option<&'a str>,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub version: http::Version,
    /// The request arrived as TLS 0-RTT early data.
    pub early_data: bool,
    pub client_ip: IpAddr,
    pub conn: &'a ConnInfo,
}

/// A request described by hand (`wraith test` cases, `wraith policy explain`).
#[derive(Debug, Clone)]
pub struct Probe<'a> {
    /// Index of the route in file order.
    pub route: usize,
    pub identity: Option<&'a Identity>,
    pub method: Method,
    pub host: &'a str,
    pub path: &'a str,
    pub query: &'a str,
    pub source_ip: IpAddr,
    pub listener: &'a str,
    /// `h1`, `h2` or `h3`.
    pub protocol: &'static str,
    pub tls_version: &'a str,
    pub tls_group: &'a str,
    pub early_data: bool,
    pub time: SystemTime,
}

/// What `explain` shows besides the decision: the entities and context Cedar saw.
#[derive(Debug)]
pub struct Explanation {
    pub decision: PolicyDecision,
    /// How many policies of the set could apply to this route and method (the others were
    /// not evaluated).
    pub evaluated: usize,
    pub principal: String,
    pub action: String,
    pub resource: String,
    /// Every entity involved, as Cedar's JSON.
    pub entities: serde_json::Value,
    pub context: serde_json::Value,
}

/// Per-connection policy state, built on the first request and reused by the others: the
/// principal entity and the client address as a Cedar value.
#[derive(Default)]
pub struct ConnCache {
    principal: ArcSwapOption<CachedPrincipal>,
    client: ArcSwapOption<CachedClient>,
    /// Decisions that depend only on the principal (see `Applicable::Evaluate`).
    decisions: std::sync::Mutex<Vec<CachedDecision>>,
}

/// A remembered decision and what it was for.
struct CachedDecision {
    engine: u64,
    route: usize,
    action: usize,
    /// The client address (the anonymous principal's id; behind a trusted proxy it can
    /// change from one request to the next).
    ip: IpAddr,
    decision: PolicyDecision,
}

/// Most decisions remembered per connection.
const CACHED_DECISIONS: usize = 32;

/// The client address as Cedar sees it: the `ip` value and the anonymous principal.
struct CachedClient {
    ip: IpAddr,
    value: cedar_policy_core::ast::Value,
    anonymous: EntityUid,
}

/// A connection's principal entity, for one engine (snapshot).
pub struct CachedPrincipal {
    engine: u64,
    uid: EntityUid,
    entities: Entities,
}

impl Clone for ConnCache {
    /// A copy starts empty; it fills itself on first use.
    fn clone(&self) -> Self {
        ConnCache::default()
    }
}

impl fmt::Debug for ConnCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ConnCache")
    }
}

/// What decides one route and action, worked out at load.
#[derive(Debug)]
enum Applicable {
    /// No policy can apply: the default deny, without evaluating anything.
    Nothing,
    /// Only unconditional permits apply (any principal, no `when` / `unless`): allowed by
    /// them, without evaluating anything.
    AlwaysPermitted(Vec<Arc<str>>),
    /// Evaluate these (the policies of the set that can apply). When none of them reads
    /// `context`, the decision depends only on the principal and is remembered per connection.
    Evaluate {
        set: Box<PolicySet>,
        context_free: bool,
    },
}

impl Applicable {
    fn of(
        shapes: Vec<&prune::PolicyShape>,
        ids: &HashMap<String, Arc<str>>,
    ) -> Result<Applicable, String> {
        let context_free = !shapes.iter().any(|s| s.reads_context);
        let policies: Vec<cedar_policy::Policy> = shapes.iter().map(|s| s.policy.clone()).collect();
        if policies.is_empty() {
            return Ok(Applicable::Nothing);
        }
        let unconditional_permit = |p: &cedar_policy::Policy| {
            p.effect() == cedar_policy::Effect::Permit
                && !p.has_non_scope_constraint()
                && p.principal_constraint() == cedar_policy::PrincipalConstraint::Any
        };
        if policies.iter().all(unconditional_permit) {
            let id = |p: &cedar_policy::Policy| {
                let id: &str = p.id().as_ref();
                ids.get(id).cloned().unwrap_or_else(|| Arc::from(id))
            };
            return Ok(Applicable::AlwaysPermitted(
                policies.iter().map(id).collect(),
            ));
        }
        PolicySet::from_policies(policies)
            .map(|set| Applicable::Evaluate {
                set: Box::new(set),
                context_free,
            })
            .map_err(|e| e.to_string())
    }

    /// How many policies a request evaluates.
    fn evaluated(&self) -> usize {
        match self {
            Applicable::Evaluate { set, .. } => set.policies().count(),
            _ => 0,
        }
    }
}

/// How one route is decided.
#[derive(Debug)]
struct RoutePolicy {
    uid: EntityUid,
    /// Per action (`ACTIONS` order): what decides it; empty when no `[policy]` is configured.
    sets: Vec<Applicable>,
    set_name: Arc<str>,
    shadow: bool,
}

static NEXT_ENGINE: AtomicU64 = AtomicU64::new(1);

/// The policies of one snapshot, ready to decide.
pub struct PolicyEngine {
    id: u64,
    types: Types,
    authorizer: Authorizer,
    compiled: Option<Arc<Compiled>>,
    /// Route and action entities (and nothing per client).
    base: Entities,
    actions: Vec<EntityUid>,
    routes: Vec<RoutePolicy>,
    utc_offset: i32,
    /// `@id` -> shared string, so decisions do not allocate per id.
    ids: HashMap<String, Arc<str>>,
    /// Principal entities by certificate fingerprint, for every connection on this engine:
    /// a client that connects again (a pool rotating its connections, no resumption) is not
    /// built again (~30 µs each). At most `shared_cap`.
    principals: std::sync::Mutex<HashMap<String, Arc<CachedPrincipal>>>,
    shared_cap: usize,
}

/// Most principal entities an engine keeps for new connections.
const SHARED_PRINCIPALS: usize = 1024;

/// Most entities all of them may hold together. Each principal carries its own copy of the
/// route and action entities (a map entry of ~200 bytes per route), so with many routes
/// fewer principals are kept: 1,024 with up to ~60 routes, 64 with 1,000 (~13 MB).
const SHARED_ENTITY_BUDGET: usize = 65_536;

impl fmt::Debug for PolicyEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PolicyEngine")
            .field("id", &self.id)
            .field("routes", &self.routes)
            .finish()
    }
}

impl PolicyEngine {
    /// Builds the engine for a config: route entities, action entities, route -> set.
    pub fn build(config: &Config) -> Result<PolicyEngine, String> {
        let types = Types::new()?;
        let compiled = config.policy.as_ref().map(|p| p.compiled.clone());
        let schema = match &compiled {
            Some(c) => c.schema.clone(),
            None => load::schema()?,
        };
        let actions: Vec<EntityUid> = ACTIONS
            .iter()
            .map(|a| types.uid(&types.action, a))
            .collect();
        let groups = [
            types.uid(&types.action, "read"),
            types.uid(&types.action, "write"),
        ];
        let shapes: Vec<Vec<prune::PolicyShape>> = compiled
            .iter()
            .flat_map(|c| c.sets.iter())
            .map(|s| s.policies.policies().map(prune::PolicyShape::of).collect())
            .collect();
        let ids: HashMap<String, Arc<str>> = compiled
            .iter()
            .flat_map(|c| c.policies.iter())
            .map(|p| (p.id.clone(), Arc::from(p.id.as_str())))
            .collect();
        let mut route_entities = Vec::new();
        let mut routes = Vec::new();
        for r in &config.routes {
            route_entities.push(entities::route_entity(&types, r)?);
            let uid = types.uid(&types.route, &r.name);
            let (set, set_name, set_shadow) = match (&config.policy, &compiled) {
                (Some(p), Some(c)) => {
                    let name = r.policy.as_deref().unwrap_or(&p.default_set);
                    let i = c.sets.iter().position(|s| s.name == name).ok_or_else(|| {
                        format!("route {:?}: unknown policy set {name:?}", r.name)
                    })?;
                    (
                        Some(i),
                        Arc::from(name),
                        c.sets[i].mode == PolicyMode::Shadow,
                    )
                }
                _ => (None, Arc::from("-"), false),
            };
            let shadow = match r.policy_mode {
                Some(m) => m == PolicyMode::Shadow,
                None => set_shadow,
            };
            let mut sets = Vec::new();
            for (i, action) in actions.iter().enumerate() {
                let Some(set) = set else { break };
                let group = &groups[usize::from(entities::is_write(i))];
                let applicable = shapes[set]
                    .iter()
                    .filter(|s| s.may_apply(&uid, &r.tags, action, group))
                    .collect();
                sets.push(
                    Applicable::of(applicable, &ids)
                        .map_err(|e| format!("route {:?}: {e}", r.name))?,
                );
            }
            routes.push(RoutePolicy {
                uid,
                sets,
                set_name,
                shadow,
            });
        }
        // With the schema, Cedar adds the action entities and their groups.
        let base = Entities::from_entities(route_entities, Some(&schema))
            .map_err(|e| format!("policy entities: {e}"))?;
        let shared_cap =
            (SHARED_ENTITY_BUDGET / (base.iter().count() + 1)).clamp(1, SHARED_PRINCIPALS);
        Ok(PolicyEngine {
            id: NEXT_ENGINE.fetch_add(1, Ordering::Relaxed),
            types,
            authorizer: Authorizer::new(),
            compiled,
            base,
            actions,
            routes,
            utc_offset: config.policy.as_ref().map_or(0, |p| p.utc_offset),
            ids,
            principals: std::sync::Mutex::new(HashMap::new()),
            shared_cap,
        })
    }

    /// The loaded policies (`None` without a `[policy]` section).
    pub fn compiled(&self) -> Option<&Arc<Compiled>> {
        self.compiled.as_ref()
    }

    /// THE policy stage: decides one request. A shadow-mode deny is a `Permit` whose decision
    /// says "would deny".
    pub fn authorize(&self, access: &Access<'_>) -> Result<Permit, Deny> {
        let decision = match self.route(access.route.index) {
            Some(rp) => self.decide_access(rp, access),
            None => self.error(None, "route unknown to the policy engine".into()),
        };
        if decision.shadow && decision.effect == Effect::Deny {
            tracing::info!(
                route = %access.route.config.name,
                // Client-supplied text escaped, in both log formats.
                principal = %printable(access.conn.identity.as_ref().map_or("-", |i| i.name())),
                client = %access.client_ip,
                method = %access.method,
                path = %printable(access.path),
                reason = %printable(decision.reason.as_str()),
                policies = %decision.policy_list(),
                set = %decision.set,
                "policy would deny (shadow mode): request allowed"
            );
        }
        // (Every decision is logged at debug by the pipeline, with its request id.)
        if decision.refuses() {
            Err(Deny { decision })
        } else {
            Ok(Permit { decision })
        }
    }

    fn route(&self, index: usize) -> Option<&RoutePolicy> {
        self.routes.get(index)
    }

    fn decide_access(&self, rp: &RoutePolicy, access: &Access<'_>) -> PolicyDecision {
        let action = entities::action_index(access.method);
        let context_free = matches!(
            rp.sets.get(action),
            Some(Applicable::Evaluate {
                context_free: true,
                ..
            })
        );
        if !context_free {
            return self.evaluate_access(rp, access, action);
        }
        let key = |c: &CachedDecision| {
            c.engine == self.id
                && c.route == access.route.index
                && c.action == action
                && c.ip == access.client_ip
        };
        let cache = &access.conn.policy_cache.decisions;
        if let Some(d) = cache
            .lock()
            .ok()
            .and_then(|c| c.iter().find(|c| key(c)).map(|c| c.decision.clone()))
        {
            return d;
        }
        let decision = self.evaluate_access(rp, access, action);
        if decision.errors.is_empty() {
            if let Ok(mut c) = cache.lock() {
                if c.len() >= CACHED_DECISIONS {
                    c.clear();
                }
                c.push(CachedDecision {
                    engine: self.id,
                    route: access.route.index,
                    action,
                    ip: access.client_ip,
                    decision: decision.clone(),
                });
            }
        }
        decision
    }

    fn evaluate_access(
        &self,
        rp: &RoutePolicy,
        access: &Access<'_>,
        action: usize,
    ) -> PolicyDecision {
        let conn = access.conn;
        let tls = conn.tls.as_ref();
        let host_lower;
        let host = match access.host {
            Some(h) if h.bytes().any(|b| b.is_ascii_uppercase()) => {
                host_lower = h.to_ascii_lowercase();
                host_lower.as_str()
            }
            Some(h) => h,
            None => "",
        };
        let input = ContextInput {
            method: access.method.as_str(),
            host,
            path: access.path,
            query: access.query.unwrap_or(""),
            source_ip: access.client_ip,
            listener: &conn.listener,
            protocol: policy_protocol(access.version),
            tls_version: tls.map_or("", |t| t.version),
            tls_group: tls.and_then(|t| t.group).unwrap_or(""),
            early_data: access.early_data,
            time: SystemTime::now(),
            utc_offset: self.utc_offset,
        };
        let client = match self.cached_client(&conn.policy_cache, access.client_ip) {
            Ok(c) => c,
            Err(e) => return self.error(Some(rp), e),
        };
        let ip = client.value.clone();
        match &conn.identity {
            Some(identity) => match self.cached_principal(&conn.policy_cache, identity) {
                Ok(p) => self.decide(rp, &p.uid, action, &p.entities, &input, ip),
                Err(e) => self.error(Some(rp), e),
            },
            None => self.decide(rp, &client.anonymous, action, &self.base, &input, ip),
        }
    }

    /// The connection's principal entity, built on first use for this engine.
    fn cached_principal(
        &self,
        cache: &ConnCache,
        identity: &Identity,
    ) -> Result<Arc<CachedPrincipal>, String> {
        if let Some(c) = cache.principal.load_full().filter(|c| c.engine == self.id) {
            return Ok(c);
        }
        // The entity is the certificate's alone (`Identity` is read from the leaf, whose
        // SHA-256 the fingerprint is), so a connection with the same certificate shares it.
        let known = self.shared_principals().get(&identity.fingerprint).cloned();
        let c = match known {
            Some(c) => c,
            None => {
                // Built outside the lock: ~30 µs that other connections need not wait for.
                let (uid, entities) = self.client_entities(identity)?;
                let c = Arc::new(CachedPrincipal {
                    engine: self.id,
                    uid,
                    entities,
                });
                let mut shared = self.shared_principals();
                // Full: the set starts again (a client not seen since is built again). The
                // old set is dropped after the lock: freeing it takes a while.
                let old = (shared.len() >= self.shared_cap).then(|| std::mem::take(&mut *shared));
                shared.insert(identity.fingerprint.clone(), c.clone());
                drop(shared);
                drop(old);
                c
            }
        };
        cache.principal.store(Some(c.clone()));
        Ok(c)
    }

    /// The client address as Cedar values: the connection's, unless the address changed
    /// (a trusted proxy forwarding for several clients).
    fn cached_client(&self, cache: &ConnCache, ip: IpAddr) -> Result<Arc<CachedClient>, String> {
        if let Some(c) = cache.client.load_full().filter(|c| c.ip == ip) {
            return Ok(c);
        }
        let c = Arc::new(CachedClient {
            ip,
            value: entities::ip_value(ip)?,
            anonymous: self.types.uid(&self.types.anonymous, &ip.to_string()),
        });
        cache.client.store(Some(c.clone()));
        Ok(c)
    }

    fn shared_principals(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, Arc<CachedPrincipal>>> {
        // Every update is one insert or one clear: a panic elsewhere leaves the map whole.
        self.principals.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The base entities plus a `Wraith::Client` for `identity`.
    fn client_entities(&self, identity: &Identity) -> Result<(EntityUid, Entities), String> {
        let entity = entities::client_entity(&self.types, identity)?;
        let uid = entity.uid();
        let entities = self
            .base
            .clone()
            .add_entities([entity], None)
            .map_err(|e| format!("client entity: {e}"))?;
        Ok((uid, entities))
    }

    /// One Cedar evaluation; `action` indexes `ACTIONS`.
    fn decide(
        &self,
        rp: &RoutePolicy,
        principal: &EntityUid,
        action: usize,
        entities: &Entities,
        input: &ContextInput<'_>,
        ip: cedar_policy_core::ast::Value,
    ) -> PolicyDecision {
        let policies = match rp.sets.get(action) {
            // No [policy] section, or no policy can apply: nothing permits.
            None | Some(Applicable::Nothing) => {
                return self.verdict(rp, Effect::Deny, Reason::NoPermit, Vec::new(), Vec::new())
            }
            Some(Applicable::AlwaysPermitted(ids)) => {
                return self.verdict(
                    rp,
                    Effect::Allow,
                    Reason::Permitted,
                    ids.clone(),
                    Vec::new(),
                )
            }
            Some(Applicable::Evaluate { set, .. }) => set,
        };
        let context = match entities::context_with_ip(input, ip) {
            Ok(c) => c,
            Err(e) => return self.error(Some(rp), e),
        };
        let request = match Request::new(
            principal.clone(),
            self.actions[action].clone(),
            rp.uid.clone(),
            context,
            None,
        ) {
            Ok(r) => r,
            Err(e) => return self.error(Some(rp), format!("request: {e}")),
        };
        let response = self.authorizer.is_authorized(&request, policies, entities);
        let diagnostics = response.diagnostics();
        // Cedar skips a policy whose evaluation fails: a failing `forbid` would let the
        // request through. Fail closed instead.
        let forbid_failed = diagnostics.errors().any(|e| {
            let cedar_policy::AuthorizationError::PolicyEvaluationError(e) = e;
            policies
                .policy(e.policy_id())
                .is_none_or(|p| p.effect() == cedar_policy::Effect::Forbid)
        });
        let policies: Vec<Arc<str>> = diagnostics
            .reason()
            .map(|id| {
                let id: &str = id.as_ref();
                self.ids.get(id).cloned().unwrap_or_else(|| Arc::from(id))
            })
            .collect();
        let errors: Vec<String> = diagnostics.errors().map(|e| e.to_string()).collect();
        if !errors.is_empty() {
            tracing::warn!(errors = ?errors, "policies failed to evaluate and were skipped");
        }
        let (effect, reason) = match response.decision() {
            Decision::Allow if forbid_failed => (Effect::Deny, Reason::Error),
            Decision::Allow => (Effect::Allow, Reason::Permitted),
            Decision::Deny if policies.is_empty() => (Effect::Deny, Reason::NoPermit),
            Decision::Deny => (Effect::Deny, Reason::Forbidden),
        };
        self.verdict(rp, effect, reason, policies, errors)
    }

    fn verdict(
        &self,
        rp: &RoutePolicy,
        effect: Effect,
        reason: Reason,
        policies: Vec<Arc<str>>,
        errors: Vec<String>,
    ) -> PolicyDecision {
        PolicyDecision {
            effect,
            reason,
            policies,
            set: rp.set_name.clone(),
            shadow: rp.shadow,
            errors,
        }
    }

    /// Fail closed: an evaluation problem is a deny (even in shadow mode it is reported).
    fn error(&self, rp: Option<&RoutePolicy>, message: String) -> PolicyDecision {
        tracing::error!(error = %message, "policy evaluation failed; denying");
        PolicyDecision {
            effect: Effect::Deny,
            reason: Reason::Error,
            policies: Vec::new(),
            set: rp.map_or_else(|| Arc::from("-"), |r| r.set_name.clone()),
            shadow: rp.is_some_and(|r| r.shadow),
            errors: vec![message],
        }
    }

    /// Decides a request described by hand and shows what Cedar saw (explain, `wraith test`).
    pub fn probe(&self, probe: &Probe<'_>) -> Result<Explanation, String> {
        let rp = self
            .route(probe.route)
            .ok_or_else(|| format!("no route #{}", probe.route))?;
        let (principal, entities) = match probe.identity {
            Some(identity) => self.client_entities(identity)?,
            None => (
                self.types
                    .uid(&self.types.anonymous, &probe.source_ip.to_string()),
                self.base.clone(),
            ),
        };
        let action = entities::action_index(&probe.method);
        let input = ContextInput {
            method: probe.method.as_str(),
            host: probe.host,
            path: probe.path,
            query: probe.query,
            source_ip: probe.source_ip,
            listener: probe.listener,
            protocol: probe.protocol,
            tls_version: probe.tls_version,
            tls_group: probe.tls_group,
            early_data: probe.early_data,
            time: probe.time,
            utc_offset: self.utc_offset,
        };
        let ip = entities::ip_value(probe.source_ip)?;
        let decision = self.decide(rp, &principal, action, &entities, &input, ip);
        // Only the entities of this request, not every route.
        let involved: Vec<serde_json::Value> = entities
            .iter()
            .filter(|e| {
                let uid = e.uid();
                uid == principal || uid == rp.uid
            })
            .filter_map(|e| e.to_json_value().ok())
            .collect();
        let context = entities::context(&input)?
            .to_json_value()
            .map_err(|e| e.to_string())?;
        Ok(Explanation {
            decision,
            evaluated: rp.sets.get(action).map_or(0, Applicable::evaluated),
            principal: principal.to_string(),
            action: self.actions[action].to_string(),
            resource: rp.uid.to_string(),
            entities: serde_json::Value::Array(involved),
            context,
        })
    }
}

/// The protocol as policies see it: `h1`, `h2` or `h3`.
pub fn policy_protocol(version: http::Version) -> &'static str {
    match version {
        http::Version::HTTP_2 => "h2",
        http::Version::HTTP_3 => "h3",
        _ => "h1",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{load_str, LoadOptions};
    use cedar_policy::Entities;
    use std::path::Path;

    fn identity() -> Identity {
        Identity {
            spiffe_id: Some("spiffe://corp.example/ns/prod/sa/orders".into()),
            trust_domain: Some("corp.example".into()),
            spiffe_path: Some("/ns/prod/sa/orders".into()),
            dns: vec!["orders.internal".into()],
            common_name: Some("orders".into()),
            organizational_units: vec!["payments".into()],
            fingerprint: "ab".repeat(32),
            serial: "01".into(),
            not_before: 1_700_000_000,
            not_after: 1_800_000_000,
            ..Identity::default()
        }
    }

    fn config(dir: &Path, policy: &str) -> Config {
        std::fs::write(dir.join("p.cedar"), policy).unwrap();
        let toml = format!(
            "[[listener]]\nname='l'\naddress='127.0.0.1:0'\nprotocol='http'\n\
             [policy]\ndir = '{}'\n\
             [[route]]\nname = 'api'\ntags = ['api', 'internal']\npath = {{ prefix = '/api/' }}\nrespond = {{ status = 200 }}\n",
            dir.display()
        );
        load_str(&dir.join("wraith.toml"), &toml, LoadOptions::default()).unwrap()
    }

    fn input(now: SystemTime) -> ContextInput<'static> {
        ContextInput {
            method: "PROPFIND",
            host: "api.internal",
            path: "/api/x",
            query: "a=1",
            source_ip: "2001:db8::1".parse().unwrap(),
            listener: "https",
            protocol: "h3",
            tls_version: "TLSv1.3",
            tls_group: "X25519MLKEM768",
            early_data: true,
            time: now,
            utc_offset: -3600,
        }
    }

    /// A probe of route 0 with `i`'s context (not early data).
    fn probe_of<'a>(
        i: &ContextInput<'a>,
        identity: Option<&'a Identity>,
        method: Method,
    ) -> Probe<'a> {
        Probe {
            route: 0,
            identity,
            method,
            host: i.host,
            path: i.path,
            query: i.query,
            source_ip: i.source_ip,
            listener: i.listener,
            protocol: i.protocol,
            tls_version: i.tls_version,
            tls_group: i.tls_group,
            early_data: false,
            time: i.time,
        }
    }

    /// What entities.rs builds must be what the schema declares (a typo there would make
    /// every policy that reads the attribute fail at run time).
    #[test]
    fn entities_and_context_match_the_schema() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(
            dir.path(),
            "@id(\"p\")\npermit(principal, action, resource);\n",
        );
        let schema = load::schema().unwrap();
        let types = Types::new().unwrap();
        let client = entities::client_entity(&types, &identity()).unwrap();
        let route = entities::route_entity(&types, &cfg.routes[0]).unwrap();
        Entities::from_entities([client.clone(), route.clone()], Some(&schema)).unwrap();
        let ctx = entities::context(&input(SystemTime::now())).unwrap();
        let anonymous = types.uid(&types.anonymous, "2001:db8::1");
        for action in ACTIONS {
            for principal in [client.uid(), anonymous.clone()] {
                Request::new(
                    principal,
                    types.uid(&types.action, action),
                    route.uid(),
                    ctx.clone(),
                    Some(&schema),
                )
                .unwrap_or_else(|e| panic!("{action}: {e}"));
            }
        }
    }

    #[test]
    fn probe_reads_identity_context_and_groups() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(
            dir.path(),
            r#"
@id("payments-write-internal")
permit (principal is Wraith::Client, action in Wraith::Action::"write", resource)
when {
  principal.ou.contains("payments") && principal.trust_domain == "corp.example" &&
  resource.tags.contains("internal") && context.protocol == "h3" &&
  context.source_ip.isInRange(ip("2001:db8::/32")) && context.query == "a=1" &&
  context.method == "PROPFIND" && context.local.hour >= 0 &&
  principal.not_after > context.time
};

@id("no-early-writes")
forbid (principal, action in Wraith::Action::"write", resource) when { context.early_data };
"#,
        );
        let engine = PolicyEngine::build(&cfg).unwrap();
        let id = identity();
        let i = input(entities::parse_time("2025-03-04T10:00:00Z").unwrap());
        let probe = |early_data: bool| Probe {
            early_data,
            ..probe_of(&i, Some(&id), Method::from_bytes(b"PROPFIND").unwrap())
        };
        let allowed = engine.probe(&probe(false)).unwrap();
        assert_eq!(
            allowed.decision.effect,
            Effect::Allow,
            "{:?}",
            allowed.decision
        );
        assert_eq!(&*allowed.decision.policies[0], "payments-write-internal");
        assert_eq!(allowed.action, "Wraith::Action::\"OTHER\"");
        assert_eq!(allowed.evaluated, 2);
        let denied = engine.probe(&probe(true)).unwrap();
        assert_eq!(denied.decision.reason, Reason::Forbidden);
        assert_eq!(&*denied.decision.policies[0], "no-early-writes");
        // Both policies are about writes: a GET evaluates neither (and is denied by default).
        let get = engine
            .probe(&Probe {
                method: Method::GET,
                ..probe(false)
            })
            .unwrap();
        assert_eq!(get.evaluated, 0);
        assert_eq!(get.decision.reason, Reason::NoPermit);
    }

    #[test]
    fn a_forbid_that_fails_to_evaluate_denies() {
        let dir = tempfile::tempdir().unwrap();
        // The forbid overflows a Long at 10:00 (a run-time error Cedar skips the policy for).
        let cfg = config(
            dir.path(),
            r#"
@id("allow-all")
permit (principal, action, resource);

@id("overflowing-forbid")
forbid (principal, action, resource) when { context.local.hour * 9223372036854775807 > 0 };
"#,
        );
        let engine = PolicyEngine::build(&cfg).unwrap();
        let i = input(entities::parse_time("2025-03-04T10:00:00Z").unwrap());
        let decided = engine.probe(&probe_of(&i, None, Method::GET)).unwrap();
        assert_eq!(
            decided.decision.effect,
            Effect::Deny,
            "{:?}",
            decided.decision
        );
        assert_eq!(decided.decision.reason, Reason::Error);
        assert!(!decided.decision.errors.is_empty());
    }

    #[test]
    fn principal_is_built_once_per_connection_and_engine() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(
            dir.path(),
            "@id(\"p\")\npermit(principal, action, resource);\n",
        );
        let engine = PolicyEngine::build(&cfg).unwrap();
        let cache = ConnCache::default();
        let id = identity();
        let a = engine.cached_principal(&cache, &id).unwrap();
        let b = engine.cached_principal(&cache, &id).unwrap();
        assert!(Arc::ptr_eq(&a, &b), "second request reuses the entity");
        // A reload builds a new engine: the connection's entity is rebuilt for it.
        let next = PolicyEngine::build(&cfg).unwrap();
        let c = next.cached_principal(&cache, &id).unwrap();
        assert!(!Arc::ptr_eq(&a, &c));
        assert_eq!(
            c.uid.to_string(),
            "Wraith::Client::\"spiffe://corp.example/ns/prod/sa/orders\""
        );
    }

    #[test]
    fn a_new_connection_with_a_known_certificate_shares_its_principal() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(
            dir.path(),
            "@id(\"p\")\npermit(principal, action, resource);\n",
        );
        let engine = PolicyEngine::build(&cfg).unwrap();
        let id = identity();
        let first = engine.cached_principal(&ConnCache::default(), &id).unwrap();
        let again = engine.cached_principal(&ConnCache::default(), &id).unwrap();
        assert!(
            Arc::ptr_eq(&first, &again),
            "built again for the same certificate"
        );
        // Another certificate (another fingerprint), even with the same names, is its own.
        let other = Identity {
            fingerprint: "cd".repeat(32),
            common_name: Some("other".into()),
            ..identity()
        };
        let theirs = engine
            .cached_principal(&ConnCache::default(), &other)
            .unwrap();
        assert!(!Arc::ptr_eq(&first, &theirs));
        assert_eq!(
            theirs
                .entities
                .get(&theirs.uid)
                .and_then(|e| e.attr("cn"))
                .map(|v| format!("{:?}", v.unwrap())),
            Some(format!(
                "{:?}",
                cedar_policy::EvalResult::String("other".into())
            ))
        );
        // Bounded: past its cap the set starts again.
        assert_eq!(
            engine.shared_cap, SHARED_PRINCIPALS,
            "few routes: the full count"
        );
        for i in 0..SHARED_PRINCIPALS {
            let many = Identity {
                fingerprint: format!("{i:064x}"),
                ..identity()
            };
            engine
                .cached_principal(&ConnCache::default(), &many)
                .unwrap();
        }
        assert!(engine.shared_principals().len() <= SHARED_PRINCIPALS);
        // Many routes: fewer principals, as each copies every route's entity.
        let mut many = config(
            dir.path(),
            "@id(\"p\")\npermit(principal, action, resource);\n",
        );
        let template = many.routes[0].clone();
        many.routes = (0..2000)
            .map(|i| {
                let mut r = template.clone();
                r.name = format!("r{i}").into();
                r
            })
            .collect();
        let big = PolicyEngine::build(&many).unwrap();
        assert!(big.shared_cap < 64, "{}", big.shared_cap);
        let rebuilt = engine.cached_principal(&ConnCache::default(), &id).unwrap();
        assert!(!Arc::ptr_eq(&first, &rebuilt), "kept past the bound");
    }

    #[test]
    fn without_a_policy_section_nothing_is_permitted() {
        let cfg = load_str(
            Path::new("w.toml"),
            "[[listener]]\nname='l'\naddress='127.0.0.1:0'\nprotocol='http'\n[[route]]\nname='r'\nrespond={status=200}\n",
            LoadOptions::default(),
        )
        .unwrap();
        assert!(cfg
            .warnings
            .iter()
            .any(|w| w.contains("no [policy] section")));
        let engine = PolicyEngine::build(&cfg).unwrap();
        let x = engine
            .probe(&Probe {
                route: 0,
                identity: None,
                method: Method::GET,
                host: "",
                path: "/",
                query: "",
                source_ip: "127.0.0.1".parse().unwrap(),
                listener: "l",
                protocol: "h1",
                tls_version: "",
                tls_group: "",
                early_data: false,
                time: SystemTime::now(),
            })
            .unwrap();
        assert_eq!(x.decision.effect, Effect::Deny);
        assert_eq!(x.decision.reason, Reason::NoPermit);
    }
}

#[cfg(test)]
mod cache_tests {
    use super::*;
    use crate::config::{load_str, LoadOptions};
    use std::net::SocketAddr;

    /// A decision that depends only on the principal is remembered per connection; one that
    /// reads the context is made for every request.
    #[test]
    fn principal_only_decisions_are_remembered_per_connection() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("p.cedar"),
            r#"
@id("clients-read")
permit (principal is Wraith::Client, action in Wraith::Action::"read", resource);

@id("anyone-writes-api-paths")
permit (principal, action in Wraith::Action::"write", resource) when { context.path like "/api/*" };
"#,
        )
        .unwrap();
        let toml = format!(
            "[[listener]]\nname='l'\naddress='127.0.0.1:0'\nprotocol='http'\n[policy]\ndir = '{}'\n\
             [[route]]\nname = 'api'\nrespond = {{ status = 200 }}\n",
            dir.path().display()
        );
        let cfg = load_str(&dir.path().join("w.toml"), &toml, LoadOptions::default()).unwrap();
        let engine = PolicyEngine::build(&cfg).unwrap();
        let route = crate::router::Route::bare(cfg.routes[0].clone(), 0);
        let conn = ConnInfo {
            peer: SocketAddr::from(([10, 0, 0, 1], 4000)),
            local: SocketAddr::from(([10, 0, 0, 2], 443)),
            listener: Arc::from("l"),
            tls: None,
            identity: Some(Arc::new(Identity {
                common_name: Some("svc".into()),
                ..Identity::default()
            })),
            policy_cache: ConnCache::default(),
            limits: Default::default(),
            close: None,
            unnamed_client: false,
        };
        let access = |method: &'static Method, path: &'static str| Access {
            route: &route,
            method,
            host: None,
            path,
            query: None,
            version: http::Version::HTTP_11,
            early_data: false,
            client_ip: conn.peer.ip(),
            conn: &conn,
        };
        let cached = || conn.policy_cache.decisions.lock().unwrap().len();

        let first = engine.authorize(&access(&Method::GET, "/x")).unwrap();
        assert_eq!(cached(), 1);
        let again = engine.authorize(&access(&Method::GET, "/y")).unwrap();
        assert_eq!(first.decision, again.decision);
        assert_eq!(cached(), 1, "served from the cache");

        // Writes read context.path: decided each time, never cached.
        assert!(engine.authorize(&access(&Method::POST, "/api/a")).is_ok());
        assert!(engine.authorize(&access(&Method::POST, "/other")).is_err());
        assert_eq!(cached(), 1);

        // A new engine (reload) does not reuse the old decisions.
        let next = PolicyEngine::build(&cfg).unwrap();
        next.authorize(&access(&Method::GET, "/x")).unwrap();
        assert_eq!(cached(), 2);
    }
}

impl From<&PolicyDecision> for crate::telemetry::access_log::PolicyRecord {
    /// The decision as the access log records it.
    fn from(d: &PolicyDecision) -> Self {
        use crate::telemetry::access_log::Effect as Logged;
        crate::telemetry::access_log::PolicyRecord {
            effect: match d.effect {
                Effect::Allow => Logged::Allow,
                Effect::Deny => Logged::Deny,
            },
            policies: d.policies.clone(),
            reason: (d.effect == Effect::Deny).then(|| Arc::from(d.reason.as_str())),
            shadow: d.shadow,
        }
    }
}
