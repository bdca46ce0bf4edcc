//! Which policies can apply to a route and an action at all, decided once per snapshot, so a
//! request evaluates only those (Cedar evaluates every policy of the set it is given).
//!
//! A policy is left out for a (route, action) when
//! - its action scope excludes the action (`action == ...`, `action in [...]` with the
//!   `read` / `write` groups resolved),
//! - its resource scope names another route (`resource == / in Wraith::Route::"..."`), or
//! - its first `when` condition *begins* with `resource.tags.contains("t")` terms (the leading
//!   top-level `&&` terms) and the route has no tag `t`.
//!
//! Every such policy evaluates to "does not apply" for every request on that route and action,
//! and a policy that does not apply never changes a decision, so pruning is invisible except in
//! cost. Only *leading* tag terms count: Cedar evaluates `&&` from the left and stops at the
//! first false term, so a term before the tag test can still fail (an overflow, a missing
//! attribute), and a failing `forbid` denies. Such a policy is evaluated, not pruned.

use cedar_policy::{ActionConstraint, EntityUid, Policy, ResourceConstraint};
use serde_json::Value;

/// What is known about a policy before any request: its scope and its required route tags.
pub(super) struct PolicyShape {
    pub policy: Policy,
    /// Tags a route must carry for the policy to apply.
    required_tags: Vec<String>,
    /// The policy's conditions read `context` (else its outcome depends only on the
    /// principal, the route and the action).
    pub reads_context: bool,
}

impl PolicyShape {
    pub fn of(policy: &Policy) -> PolicyShape {
        let mut required_tags = Vec::new();
        // Unreadable as JSON: assume the worst (no tag known, context read).
        let mut reads_context = true;
        // The policy's JSON form (EST) is read once, at load; never on the request path.
        if let Ok(est) = policy.to_json() {
            reads_context = false;
            // Conditions are evaluated in order: the tag tests leading the first ones, up to
            // the first term that is not one.
            let mut leading = true;
            for c in est["conditions"].as_array().into_iter().flatten() {
                if leading {
                    leading = c["kind"] == "when" && leading_tags(&c["body"], &mut required_tags);
                }
                reads_context |= mentions_context(&c["body"]);
            }
        }
        PolicyShape {
            policy: policy.clone(),
            required_tags,
            reads_context,
        }
    }

    /// Whether the policy can apply to requests with `action` (member of `group`) on the route
    /// `route` tagged `tags`.
    pub fn may_apply(
        &self,
        route: &EntityUid,
        tags: &[String],
        action: &EntityUid,
        group: &EntityUid,
    ) -> bool {
        let action_ok = match self.policy.action_constraint() {
            ActionConstraint::Any => true,
            ActionConstraint::Eq(a) => a == *action,
            ActionConstraint::In(list) => list.iter().any(|a| a == action || a == group),
        };
        // Routes have no parents: `resource in R` holds only for R itself.
        let resource_ok = match self.policy.resource_constraint() {
            ResourceConstraint::Any | ResourceConstraint::Is(_) => true,
            ResourceConstraint::Eq(r)
            | ResourceConstraint::In(r)
            | ResourceConstraint::IsIn(_, r) => r == *route,
        };
        action_ok && resource_ok && self.required_tags.iter().all(|t| tags.contains(t))
    }
}

/// Whether an expression (EST) refers to the `context` variable anywhere.
fn mentions_context(e: &Value) -> bool {
    match e {
        Value::Object(map) => map
            .iter()
            .any(|(k, v)| (k == "Var" && v == "context") || mentions_context(v)),
        Value::Array(items) => items.iter().any(mentions_context),
        _ => false,
    }
}

/// Collects the `resource.tags.contains("t")` terms that lead a condition's top-level `&&`
/// terms, left to right, up to the first other term; true when every term was one (so the
/// next condition's leading terms count too).
fn leading_tags(body: &Value, out: &mut Vec<String>) -> bool {
    if let Some(and) = body.get("&&") {
        return leading_tags(&and["left"], out) && leading_tags(&and["right"], out);
    }
    let Some(c) = body.get("contains") else {
        return false;
    };
    let receiver = &c["left"]["."];
    if receiver["attr"] == "tags" && receiver["left"]["Var"] == "resource" {
        if let Some(tag) = c["right"]["Value"].as_str() {
            out.push(tag.to_string());
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn shape(src: &str) -> PolicyShape {
        PolicyShape::of(&Policy::from_str(src).unwrap())
    }

    fn uid(s: &str) -> EntityUid {
        EntityUid::from_str(s).unwrap()
    }

    #[test]
    fn scope_and_tags_decide_what_may_apply() {
        let api = uid(r#"Wraith::Route::"api""#);
        let admin = uid(r#"Wraith::Route::"admin""#);
        let get = uid(r#"Wraith::Action::"GET""#);
        let read = uid(r#"Wraith::Action::"read""#);
        let post = uid(r#"Wraith::Action::"POST""#);
        let write = uid(r#"Wraith::Action::"write""#);
        let tags = ["api".to_string()];

        let any = shape("permit(principal, action, resource);");
        assert!(any.may_apply(&api, &tags, &get, &read));

        let reads = shape(r#"permit(principal, action in Wraith::Action::"read", resource);"#);
        assert!(reads.may_apply(&api, &tags, &get, &read));
        assert!(!reads.may_apply(&api, &tags, &post, &write));

        let listed = shape(
            r#"permit(principal, action in [Wraith::Action::"POST", Wraith::Action::"GET"], resource);"#,
        );
        assert!(listed.may_apply(&api, &tags, &post, &write));

        let one_route = shape(r#"permit(principal, action, resource == Wraith::Route::"admin");"#);
        assert!(one_route.may_apply(&admin, &[], &get, &read));
        assert!(!one_route.may_apply(&api, &tags, &get, &read));

        let tagged = shape(
            r#"forbid(principal, action, resource)
               when { resource.tags.contains("admin") && context.path != "/" && principal has cn }
               unless { resource.tags.contains("api") };"#,
        );
        assert!(
            !tagged.may_apply(&api, &tags, &get, &read),
            "needs tag admin"
        );
        assert!(tagged.may_apply(&admin, &["admin".to_string()], &get, &read));

        // A term before the tag test may fail (an overflow here), and a failing forbid
        // denies on every route: not pruned.
        let fails_first = shape(
            r#"forbid(principal, action, resource)
               when { context.local.hour * 9223372036854775807 * 2 > 0 && resource.tags.contains("t") };"#,
        );
        assert!(fails_first.may_apply(&api, &tags, &get, &read));
        // So does a second condition's tag test after a first that is not all tags.
        let later = shape(
            r#"permit(principal, action, resource)
               when { principal has cn } when { resource.tags.contains("admin") };"#,
        );
        assert!(later.may_apply(&api, &tags, &get, &read));
        let both = shape(
            r#"permit(principal, action, resource)
               when { resource.tags.contains("ops") } when { resource.tags.contains("admin") };"#,
        );
        assert!(!both.may_apply(&admin, &["ops".to_string()], &get, &read));
        assert!(both.may_apply(
            &admin,
            &["ops".to_string(), "admin".to_string()],
            &get,
            &read
        ));

        // Only top-level && terms count: under || the tag is not required.
        let either = shape(
            r#"permit(principal, action, resource)
               when { resource.tags.contains("admin") || resource.tags.contains("ops") };"#,
        );
        assert!(either.may_apply(&api, &tags, &get, &read));
        assert!(!either.reads_context);
        assert!(tagged.reads_context, "context.path");
    }
}
