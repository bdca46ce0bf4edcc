//! Routing: host + path (+ method) -> the first matching route, in file order.
//!
//! File order is the contract (like nginx `location` regexes and Envoy's route list): put
//! specific routes before general ones. `wraith test` warns about nothing here; a route that
//! can never match because an earlier one shadows it is the reviewer's job.

use std::sync::Arc;

use http::Method;

use crate::config::{HostMatch, PathMatch, RouteConfig};
use crate::ratelimit::Limiter;
use crate::upstream::Upstream;

/// A route ready to serve: its config plus the resolved upstream.
#[derive(Debug)]
pub struct Route {
    pub config: RouteConfig,
    /// Set when the action is `upstream = "..."`.
    pub upstream: Option<Arc<Upstream>>,
    /// The rate limits requests on this route count against (its own or the defaults).
    pub limits: Arc<[Arc<Limiter>]>,
    /// Their names, comma-separated (the access record of a request they all let through).
    pub limit_names: Arc<str>,
    /// Whether one of them is `shared` (counted in Redis: `ratelimit::check_with_shared`).
    pub shared_limits: bool,
    /// Position in file order (indexes per-route state such as the policy engine's).
    pub index: usize,
}

/// All routes of a snapshot, in file order.
#[derive(Debug, Default)]
pub struct Router {
    routes: Vec<Route>,
}

impl Route {
    /// A route with no upstream pool and no rate limits: what policy evaluation, `wraith
    /// policy explain` and `wraith test` need to know about it.
    pub fn bare(config: RouteConfig, index: usize) -> Route {
        Route {
            config,
            upstream: None,
            limits: Arc::from(Vec::new()),
            limit_names: Arc::from(""),
            shared_limits: false,
            index,
        }
    }
}

impl Router {
    /// A router of bare routes (see `Route::bare`) for a config.
    pub fn bare(config: &crate::config::Config) -> Router {
        Router::new(
            config
                .routes
                .iter()
                .enumerate()
                .map(|(i, c)| Route::bare(c.clone(), i))
                .collect(),
        )
    }

    pub fn new(routes: Vec<Route>) -> Router {
        Router { routes }
    }

    /// The first route matching `host` (already stripped of its port), `path` and `method`.
    pub fn find(&self, host: Option<&str>, path: &str, method: &Method) -> Option<&Route> {
        self.routes.iter().find(|r| {
            host_matches(&r.config.host, host)
                && path_matches(&r.config.path, path)
                && r.config.methods.as_ref().is_none_or(|m| m.contains(method))
        })
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }
}

fn host_matches(m: &HostMatch, host: Option<&str>) -> bool {
    match m {
        HostMatch::Any => true,
        HostMatch::Exact(want) => host.is_some_and(|h| trim_dot(h).eq_ignore_ascii_case(want)),
        HostMatch::Suffix(suffix) => host.is_some_and(|h| {
            let h = trim_dot(h);
            h.len() > suffix.len()
                && h.is_char_boundary(h.len() - suffix.len())
                && h[h.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
        }),
    }
}

/// `example.com.` (fully qualified) matches `example.com`.
fn trim_dot(h: &str) -> &str {
    h.strip_suffix('.').unwrap_or(h)
}

fn path_matches(m: &PathMatch, path: &str) -> bool {
    match m {
        // `OPTIONS *` (the asterisk form) is for the catch-all routes.
        PathMatch::Prefix(p) => path.starts_with(p.as_str()) || (path == "*" && p == "/"),
        PathMatch::Exact(p) => path == p,
        PathMatch::Regex(re) => re.is_match(path),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{load_str, LoadOptions};
    use std::path::Path;

    fn router(toml: &str) -> Router {
        let cfg = load_str(Path::new("t.toml"), toml, LoadOptions::default()).unwrap();
        Router::new(
            cfg.routes
                .into_iter()
                .enumerate()
                .map(|(index, config)| Route {
                    config,
                    upstream: None,
                    limits: Arc::from(Vec::new()),
                    limit_names: Arc::from(""),
                    shared_limits: false,
                    index,
                })
                .collect(),
        )
    }

    const LISTENER: &str = "[[listener]]\nname='l'\naddress='127.0.0.1:0'\nprotocol='http'\n";

    #[test]
    fn first_match_in_file_order() {
        let r = router(&format!(
            "{LISTENER}
            [[route]]
            name = 'exact'
            path = {{ exact = '/' }}
            respond = {{ status = 200 }}
            [[route]]
            name = 'api-wild'
            host = '*.example.com'
            path = {{ prefix = '/api/' }}
            methods = ['GET']
            respond = {{ status = 200 }}
            [[route]]
            name = 'regex'
            path = {{ regex = '^/v[0-9]+/' }}
            respond = {{ status = 200 }}
            [[route]]
            name = 'api-host'
            host = 'API.example.com'
            respond = {{ status = 200 }}
            "
        ));
        let find = |h: Option<&str>, p: &str, m: Method| r.find(h, p, &m).map(|r| &*r.config.name);
        assert_eq!(find(None, "/", Method::GET), Some("exact"));
        assert_eq!(
            find(Some("a.example.com"), "/api/x", Method::GET),
            Some("api-wild")
        );
        assert_eq!(
            find(Some("a.b.EXAMPLE.com."), "/api/x", Method::GET),
            Some("api-wild")
        );
        assert_eq!(find(Some("example.com"), "/api/x", Method::GET), None);
        assert_eq!(
            find(Some("api.example.com"), "/api/x", Method::POST),
            Some("api-host")
        );
        assert_eq!(find(None, "/v2/things", Method::GET), Some("regex"));
        assert_eq!(find(None, "/nothing", Method::GET), None);
    }
}
