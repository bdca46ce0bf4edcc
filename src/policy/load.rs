//! Loading policies: read `*.cedar` files, give every policy the id of its `@id` annotation,
//! validate everything against Wraith's schema, and group the policies into the configured
//! sets. Every problem is reported at once with file, line and column.
//!
//! This runs at config load (serve, reload, `wraith test`), never on the request path.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use cedar_policy::{Effect, Policy, PolicyId, PolicySet, Schema, ValidationMode, Validator};
use miette::Diagnostic;

/// Wraith's Cedar schema, as `wraith policy schema` prints it.
pub const SCHEMA: &str = include_str!("wraith.cedarschema");

/// Parses the built-in schema (it is tested, so this cannot fail in a release).
pub fn schema() -> Result<Schema, String> {
    Schema::from_cedarschema_str(SCHEMA)
        .map(|(s, _)| s)
        .map_err(|e| format!("built-in Cedar schema is invalid: {e}"))
}

/// Whether a policy set's decisions are enforced or only logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyMode {
    /// A deny is a 403.
    Enforce,
    /// A deny is logged ("would deny") and the request goes on.
    Shadow,
}

impl PolicyMode {
    /// Parses `"enforce"` or `"shadow"`.
    pub fn parse(s: &str) -> Option<PolicyMode> {
        match s {
            "enforce" => Some(PolicyMode::Enforce),
            "shadow" => Some(PolicyMode::Shadow),
            _ => None,
        }
    }
}

/// One `[[policy.set]]` as configured.
#[derive(Debug, Clone)]
pub struct SetSpec {
    pub name: String,
    /// Policy files (absolute); `None` means every `*.cedar` file in the policy directory.
    pub files: Option<Vec<PathBuf>>,
    pub mode: PolicyMode,
}

/// A problem in a policy file.
#[derive(Debug, Clone)]
pub struct PolicyError {
    pub file: PathBuf,
    /// 1-based; `None` for problems with the file as a whole.
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub message: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let (Some(l), Some(c)) = (self.line, self.column) {
            write!(f, ":{l}:{c}")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Where a policy came from and what it does (for explain, coverage and error messages).
#[derive(Debug, Clone)]
pub struct PolicyInfo {
    /// The `@id`.
    pub id: String,
    pub file: PathBuf,
    pub line: usize,
    pub effect: Effect,
}

/// One named set, ready to evaluate.
#[derive(Debug, Clone)]
pub struct CompiledSet {
    pub name: String,
    pub mode: PolicyMode,
    pub policies: PolicySet,
}

/// Everything loaded from the policy directory.
#[derive(Debug, Clone)]
pub struct Compiled {
    pub schema: Schema,
    pub sets: Vec<CompiledSet>,
    /// Every policy of every file, in file order.
    pub policies: Vec<PolicyInfo>,
}

impl Compiled {
    /// The policy with this `@id`.
    pub fn info(&self, id: &str) -> Option<&PolicyInfo> {
        self.policies.iter().find(|p| p.id == id)
    }
}

/// A parsed file: its text and its policies (with their @id as policy id).
struct File {
    path: PathBuf,
    text: String,
    policies: Vec<Policy>,
}

/// The stack Cedar parses and validates policies on: its parser and validator recurse as
/// deep as an expression nests (`((((...))))`, a chain of `&&`), and a reload runs on a
/// runtime thread of a few MiB, where a policy that `wraith test` passed on the main
/// thread overflowed it and killed the server. Reserved address space, not memory.
const POLICY_STACK: usize = 256 << 20;
/// Bounds on a policy. Not only parsing recurses on an expression's depth: so do
/// evaluation, pruning and dropping a policy, on runtime threads with far less stack than
/// `POLICY_STACK`. Before Cedar sees the text: the deepest bracket nesting, and the size of
/// one policy (which bounds what the parser, on `POLICY_STACK`, can be asked to nest).
/// After parsing, still on that stack: the depth of the expression tree (`a && b && c`,
/// `1 + 1 + 1`, `if ... else if`, `a.b.c` all nest), as levels of its JSON form (about two
/// per operator). A real policy is nowhere near any of them.
const MAX_NESTING: usize = 64;
const MAX_POLICY_BYTES: usize = 256 << 10;
const MAX_TREE_DEPTH: usize = 400;

/// `compile` on a thread with `POLICY_STACK`, whichever thread asks (the main thread of
/// `wraith test` and `serve`, a blocking-pool thread during a reload): the same policies
/// load the same way everywhere.
pub fn compile_on_own_stack(dir: &Path, sets: &[SetSpec]) -> Result<Compiled, Vec<PolicyError>> {
    let failed = |message: String| {
        vec![PolicyError {
            file: dir.to_path_buf(),
            line: None,
            column: None,
            message,
        }]
    };
    std::thread::scope(|s| {
        let spawned = std::thread::Builder::new()
            .name("wraith-policy".into())
            .stack_size(POLICY_STACK)
            .spawn_scoped(s, || compile(dir, sets));
        match spawned {
            Ok(handle) => handle
                .join()
                .unwrap_or_else(|_| Err(failed("the policy compiler failed (a panic)".into()))),
            Err(e) => Err(failed(format!("cannot start the policy compiler: {e}"))),
        }
    })
}

/// Where `text` nests brackets deeper than `MAX_NESTING`, or the byte offset at which one
/// policy (up to a `;` outside brackets) grows past `MAX_POLICY_BYTES`: with what is wrong.
/// Strings and comments are skipped (a comment ends at `\n` or `\r`, as Cedar's do).
fn too_complex(text: &str) -> Option<(usize, String)> {
    let bytes = text.as_bytes();
    let (mut depth, mut start, mut i) = (0usize, 0usize, 0usize);
    while i < bytes.len() {
        match bytes[i] {
            b'"' => {
                i += 1;
                while i < bytes.len() && bytes[i] != b'"' {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
            }
            b'/' if bytes.get(i + 1) == Some(&b'/') => {
                while i < bytes.len() && bytes[i] != b'\n' && bytes[i] != b'\r' {
                    i += 1;
                }
            }
            b'(' | b'[' | b'{' => {
                depth += 1;
                if depth > MAX_NESTING {
                    return Some((i, format!("brackets nested deeper than {MAX_NESTING}")));
                }
            }
            b')' | b']' | b'}' => depth = depth.saturating_sub(1),
            b';' if depth == 0 => start = i + 1,
            _ => {}
        }
        if i.saturating_sub(start) > MAX_POLICY_BYTES {
            return Some((
                start,
                format!("one policy longer than {} KiB", MAX_POLICY_BYTES >> 10),
            ));
        }
        i += 1;
    }
    None
}

/// How deep a JSON value nests, counted without recursion.
fn json_depth(v: &serde_json::Value) -> usize {
    let (mut deepest, mut stack) = (0, vec![(v, 1)]);
    while let Some((v, d)) = stack.pop() {
        deepest = deepest.max(d);
        match v {
            serde_json::Value::Array(a) => stack.extend(a.iter().map(|x| (x, d + 1))),
            serde_json::Value::Object(o) => stack.extend(o.values().map(|x| (x, d + 1))),
            _ => {}
        }
    }
    deepest
}

/// Reads, parses, names and validates the policies of `sets`.
pub fn compile(dir: &Path, sets: &[SetSpec]) -> Result<Compiled, Vec<PolicyError>> {
    let mut errors = Vec::new();
    let schema = schema().map_err(|m| {
        vec![PolicyError {
            file: PathBuf::from("<built-in schema>"),
            line: None,
            column: None,
            message: m,
        }]
    })?;

    // Which files: the union of every set's list (each read once). Every `*.cedar` entry
    // counts, whatever it is: skipping one that is not a regular file (a dangling symlink, a
    // directory) would silently drop its policies, a `forbid` among them. The read below
    // reports it.
    let all_in_dir = || -> Result<Vec<PathBuf>, PolicyError> {
        let dir_error = |e: std::io::Error| PolicyError {
            file: dir.to_path_buf(),
            line: None,
            column: None,
            message: format!("cannot read policy directory: {e}"),
        };
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(dir_error)? {
            let p = entry.map_err(dir_error)?.path();
            // A hidden entry that is no file is an editor's lock (Emacs locks `x.cedar` with
            // a dangling symlink `.#x.cedar` while it is edited): left out. A hidden regular
            // file is a policy file like any other.
            let hidden = p
                .file_name()
                .is_some_and(|n| n.as_encoded_bytes().starts_with(b"."));
            let lock = hidden && !std::fs::metadata(&p).is_ok_and(|m| m.is_file());
            if !lock && p.extension().is_some_and(|x| x == "cedar") {
                files.push(p);
            }
        }
        files.sort();
        Ok(files)
    };
    let mut set_files: Vec<Vec<PathBuf>> = Vec::new();
    for s in sets {
        match &s.files {
            Some(f) => set_files.push(f.clone()),
            None => match all_in_dir() {
                Ok(f) => set_files.push(f),
                Err(e) => {
                    errors.push(e);
                    set_files.push(Vec::new());
                }
            },
        }
    }
    let mut order: Vec<PathBuf> = Vec::new();
    for f in set_files.iter().flatten() {
        if !order.contains(f) {
            order.push(f.clone());
        }
    }

    let mut files: Vec<File> = Vec::new();
    let mut infos: Vec<PolicyInfo> = Vec::new();
    let mut seen: HashMap<String, (PathBuf, usize)> = HashMap::new();
    for path in &order {
        // Through a symlink, to what it points at: a symlink to a policy file is fine, one to
        // nothing is an error like a missing file. Checked before reading: a FIFO would hang.
        let problem = match std::fs::metadata(path) {
            Ok(m) if m.is_file() => None,
            Ok(m) => Some(format!(
                "not a regular file ({}): policy files must be files",
                crate::files::kind(&m)
            )),
            Err(e) if std::fs::symlink_metadata(path).is_ok_and(|m| m.is_symlink()) => Some(
                format!("cannot read policy file (a symlink whose target cannot be reached): {e}"),
            ),
            Err(e) => Some(format!("cannot read policy file: {e}")),
        };
        if let Some(message) = problem {
            errors.push(PolicyError {
                file: path.clone(),
                line: None,
                column: None,
                message,
            });
            continue;
        }
        let text = match crate::files::read_to_string(path, crate::files::SMALL) {
            Ok(t) => t,
            Err(e) => {
                errors.push(PolicyError {
                    file: path.clone(),
                    line: None,
                    column: None,
                    message: format!("cannot read policy file: {e}"),
                });
                continue;
            }
        };
        let policies = parse_file(path, &text, &mut seen, &mut infos, &mut errors);
        files.push(File {
            path: path.clone(),
            text,
            policies,
        });
    }

    // Validate every policy once, against the schema, in strict mode.
    let mut all = PolicySet::new();
    for f in &files {
        for p in &f.policies {
            // Duplicate ids were reported above and left out.
            let _ = all.add(p.clone());
        }
    }
    let validator = Validator::new(schema.clone());
    let result = validator.validate(&all, ValidationMode::Strict);
    // The validator reports a problem once per request type (action) it occurs in: one line
    // per position is enough.
    let mut reported = std::collections::HashSet::new();
    for e in result.validation_errors() {
        let id = e.policy_id().to_string();
        let file = files
            .iter()
            .find(|f| f.policies.iter().any(|p| p.id().to_string() == id));
        let (line, column) = file
            .and_then(|f| first_label(e).map(|o| line_col(&f.text, o)))
            .map_or((None, None), |(l, c)| (Some(l), Some(c)));
        if !reported.insert((id.clone(), line, column)) {
            continue;
        }
        errors.push(PolicyError {
            file: file.map(|f| f.path.clone()).unwrap_or_default(),
            line,
            column,
            message: format!("policy {id:?} does not match the schema: {}", message(e)),
        });
    }

    // The sets, each its own policy set.
    let mut compiled_sets = Vec::new();
    for (spec, paths) in sets.iter().zip(&set_files) {
        let mut ps = PolicySet::new();
        for path in paths {
            if let Some(f) = files.iter().find(|f| &f.path == path) {
                for p in &f.policies {
                    let _ = ps.add(p.clone());
                }
            }
        }
        compiled_sets.push(CompiledSet {
            name: spec.name.clone(),
            mode: spec.mode,
            policies: ps,
        });
    }

    if !errors.is_empty() {
        errors.sort_by(|a, b| (&a.file, a.line, a.column).cmp(&(&b.file, b.line, b.column)));
        return Err(errors);
    }
    Ok(Compiled {
        schema,
        sets: compiled_sets,
        policies: infos,
    })
}

/// Parses one file; renames each policy to its `@id`. Policies with problems are reported in
/// `errors` and left out; the others are returned (so they are still validated).
fn parse_file(
    path: &Path,
    text: &str,
    seen: &mut HashMap<String, (PathBuf, usize)>,
    infos: &mut Vec<PolicyInfo>,
    errors: &mut Vec<PolicyError>,
) -> Vec<Policy> {
    let at = |offset: usize, message: String| {
        let (l, c) = line_col(text, offset);
        PolicyError {
            file: path.to_path_buf(),
            line: Some(l),
            column: Some(c),
            message,
        }
    };
    if let Some((offset, why)) = too_complex(text) {
        errors.push(at(offset, format!("too complex to load: {why}")));
        return Vec::new();
    }
    let set = match PolicySet::from_str(text) {
        Ok(s) => s,
        Err(errs) => {
            errors.extend(
                errs.iter()
                    .map(|e| at(first_label(e).unwrap_or(0), message(e))),
            );
            return Vec::new();
        }
    };
    if set.templates().next().is_some() {
        errors.push(PolicyError {
            file: path.to_path_buf(),
            line: None,
            column: None,
            message: "policy templates (?principal / ?resource slots) are not supported; write static policies".into(),
        });
        return Vec::new();
    }
    // The parser names policies policy0, policy1, ... in file order.
    let mut parsed: Vec<&Policy> = set.policies().collect();
    parsed.sort_by_key(|p| {
        p.id()
            .to_string()
            .trim_start_matches("policy")
            .parse::<usize>()
            .unwrap_or(usize::MAX)
    });
    let mut out = Vec::new();
    let mut cursor = 0;
    for p in parsed {
        // The policy's own source text locates it in the file.
        let src = p.to_string();
        let offset = text[cursor..]
            .find(src.as_str())
            .map_or(cursor, |i| cursor + i);
        cursor = offset + src.len().min(text.len() - offset);
        let (line, _) = line_col(text, offset);
        let Some(id) = p.annotation("id") else {
            errors.push(at(
                offset,
                "policy has no @id(\"...\") annotation; every policy needs one so decisions can name it".into(),
            ));
            continue;
        };
        if id.is_empty() {
            errors.push(at(offset, "@id is empty".into()));
            continue;
        }
        let depth = p.to_json().map_or(0, |est| json_depth(&est));
        if depth > MAX_TREE_DEPTH {
            errors.push(at(
                offset,
                format!(
                    "too complex to load: its expression nests about {} levels deep (at most \
                     {}); split a long && / || chain into several policies, or test \
                     membership with a set (`[...].contains(...)`)",
                    depth / 2,
                    MAX_TREE_DEPTH / 2
                ),
            ));
            continue;
        }
        if let Some((file, l)) = seen.get(id) {
            errors.push(at(
                offset,
                format!(
                    "duplicate policy id {id:?} (also at {}:{l})",
                    file.display()
                ),
            ));
            continue;
        }
        seen.insert(id.to_string(), (path.to_path_buf(), line));
        infos.push(PolicyInfo {
            id: id.to_string(),
            file: path.to_path_buf(),
            line,
            effect: p.effect(),
        });
        out.push(p.new_id(PolicyId::new(id)));
    }
    out
}

/// The offset of the first labelled span of a diagnostic.
fn first_label(d: &dyn Diagnostic) -> Option<usize> {
    d.labels()
        .and_then(|mut l| l.next())
        .map(|l| l.offset())
        .or_else(|| d.related().and_then(|mut r| r.next().and_then(first_label)))
}

/// A diagnostic's message with its help, on one line.
fn message(d: &dyn Diagnostic) -> String {
    let mut m = d.to_string();
    if let Some(h) = d.help() {
        m.push_str(" (");
        m.push_str(&h.to_string());
        m.push(')');
    }
    m
}

/// 1-based line and column of a byte offset.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[start..].chars().count() + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn all(mode: PolicyMode) -> Vec<SetSpec> {
        vec![SetSpec {
            name: "default".into(),
            files: None,
            mode,
        }]
    }

    /// Every `*.cedar` entry of the directory is read or reported: a dangling symlink, a FIFO
    /// (never opened: it would hang) and a directory are errors naming the entry; a symlink
    /// to a file is read.
    #[test]
    fn entries_that_are_not_regular_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        let target = write(
            other.path(),
            "t.cedar",
            "@id(\"linked\")\nforbid(principal, action, resource);\n",
        );
        std::os::unix::fs::symlink(&target, dir.path().join("linked.cedar")).unwrap();
        // An editor's lock file (Emacs: a dangling symlink) is hidden, and left out.
        std::os::unix::fs::symlink("user@host.1234:1", dir.path().join(".#linked.cedar")).unwrap();
        // A hidden regular file is read like any other.
        write(
            dir.path(),
            ".hidden.cedar",
            "@id(\"hidden\")\nforbid(principal, action, resource);\n",
        );
        let c = compile(dir.path(), &all(PolicyMode::Enforce)).unwrap();
        assert!(c.info("linked").is_some());
        assert!(c.info("hidden").is_some());

        std::os::unix::fs::symlink(other.path().join("gone.cedar"), dir.path().join("a.cedar"))
            .unwrap();
        let fifo = std::ffi::CString::new(dir.path().join("b.cedar").to_str().unwrap()).unwrap();
        // SAFETY: mkfifo with a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        std::fs::create_dir(dir.path().join("c.cedar")).unwrap();
        let errors = compile(dir.path(), &all(PolicyMode::Enforce)).unwrap_err();
        let text: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
        assert_eq!(text.len(), 3, "{text:#?}");
        assert!(
            text[0].contains("a.cedar: cannot read policy file"),
            "{text:#?}"
        );
        assert!(
            text[1].contains("b.cedar: not a regular file (a FIFO)"),
            "{text:#?}"
        );
        assert!(
            text[2].contains("c.cedar: not a regular file (a directory)"),
            "{text:#?}"
        );
    }

    #[test]
    fn policies_nested_too_deep_or_too_long_are_refused_before_cedar_parses_them() {
        let nested = |n: usize| {
            format!(
                "permit(principal, action, resource) when {{ {}true{} }};",
                "(".repeat(n),
                ")".repeat(n)
            )
        };
        // `{` of the when clause is one level.
        assert_eq!(too_complex(&nested(MAX_NESTING - 1)), None);
        let (at, why) = too_complex(&nested(MAX_NESTING)).unwrap();
        assert!(why.contains("nested deeper than 64"), "{why}");
        assert_eq!(
            at,
            "permit(principal, action, resource) when { ".len() + MAX_NESTING - 1
        );
        let long = |n: usize| {
            format!(
                "permit(principal, action, resource) when {{ {} }};",
                vec!["1"; n].join(" + ")
            )
        };
        let (_, why) = too_complex(&long(MAX_POLICY_BYTES / 4 + 1)).unwrap();
        assert!(why.contains("longer than 256 KiB"), "{why}");
        // Measured per policy, and never inside strings or comments.
        let many = long(1000).repeat(300);
        assert!(many.len() > MAX_POLICY_BYTES);
        assert_eq!(too_complex(&many), None);
        // A comment ends at a lone CR too: the brackets after it count.
        let cr = format!("// x\r{}", "(".repeat(MAX_NESTING + 1));
        assert!(too_complex(&cr).is_some());
        let quoted = format!(
            "// {}\npermit(principal, action, resource) when {{ context.path == \"{}\\\"\" }};",
            "(".repeat(500),
            "&&(".repeat(5000)
        );
        assert_eq!(too_complex(&quoted), None);
    }

    #[test]
    fn built_in_schema_parses() {
        schema().unwrap();
    }

    #[test]
    fn ids_come_from_annotations() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "a.cedar",
            "@id(\"one\")\npermit(principal, action, resource);\n\n@id(\"two\")\nforbid(principal, action in Wraith::Action::\"write\", resource);\n",
        );
        let c = compile(dir.path(), &all(PolicyMode::Enforce)).unwrap();
        assert_eq!(c.policies.len(), 2);
        assert_eq!(c.policies[0].id, "one");
        assert_eq!(c.policies[0].line, 1);
        assert_eq!(c.policies[1].id, "two");
        assert_eq!(c.policies[1].line, 4);
        assert!(c.sets[0].policies.policy(&PolicyId::new("two")).is_some());
    }

    #[test]
    fn every_problem_has_a_position() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "a.cedar",
            "@id(\"ok\")\npermit(principal, action, resource);\n\npermit(principal, action, resource);\n",
        );
        write(
            dir.path(),
            "b.cedar",
            "@id(\"ok\")\npermit(principal, action, resource);\n@id(\"typo\")\npermit(principal, action, resource)\nwhen { principal.no_such_attr == \"x\" };\n",
        );
        write(
            dir.path(),
            "c.cedar",
            "@id(\"broken\")\npermit(principal, action resource);\n",
        );
        let errs = compile(dir.path(), &all(PolicyMode::Enforce)).unwrap_err();
        let text: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
        let joined = text.join("\n");
        assert!(
            joined.contains("a.cedar:4:1: policy has no @id"),
            "{joined}"
        );
        assert!(
            joined.contains("b.cedar:1:1: duplicate policy id \"ok\""),
            "{joined}"
        );
        assert!(
            text.iter()
                .any(|t| t.contains("b.cedar:5:")
                    && t.contains("\"typo\" does not match the schema")),
            "{joined}"
        );
        assert!(text.iter().any(|t| t.contains("c.cedar:2:")), "{joined}");
    }
}
