//! The decision store. Writers (the admin API, the CrowdSec bridge, the expiry janitor) edit
//! a source's lookup `Table` under a mutex and publish the edited table through `ArcSwap`;
//! readers (the accept loop, the request pipeline) only ever load the current table, so they
//! never block and never see a half-applied update. The table is the only copy of the
//! decisions the store holds (listings, saves and deletes read it too), and an edit copies
//! only the part of it that changes (see `table`). A lookup allocates nothing and reads the
//! clock only when something matched.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::table::{Hit, Table};
use super::{action_for, Action, Decision, Key, Scope, Source};
use crate::config::Fallback;
use crate::proxy::headers::net_contains;

/// The decisions' clock, in milliseconds on the Unix epoch's scale: the wall clock when the
/// process first asked, moved on by the boot-time clock since (monotonic, and unlike
/// `Instant` it goes on while the machine or VM is suspended, so a ban does not outlast its
/// duration by a pause). A decision lasts what it was
/// given (`now_ms() + duration`) whatever happens to the wall clock meanwhile: an NTP step or
/// a clock set by hand neither ends a ban early nor stretches it. The wall clock is used
/// only where a time leaves or enters the process (`to_wall_ms`, `from_wall_ms`): the state
/// file and the times the admin API shows.
pub fn now_ms() -> u64 {
    let (wall, boot) = *anchor();
    wall.saturating_add(boot_ms().saturating_sub(boot))
}

/// The wall clock and the boot-time clock read together, once per process.
fn anchor() -> &'static (u64, u64) {
    static ANCHOR: OnceLock<(u64, u64)> = OnceLock::new();
    ANCHOR.get_or_init(|| (wall_ms(), boot_ms()))
}

/// Milliseconds since boot, suspended time included (`CLOCK_BOOTTIME`).
fn boot_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    if unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) } != 0 {
        return 0;
    }
    (ts.tv_sec as u64)
        .saturating_mul(1000)
        .saturating_add(ts.tv_nsec as u64 / 1_000_000)
}

/// Milliseconds since the Unix epoch by the wall clock, now.
fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The wall-clock time of `at`, a time on `now_ms`'s clock: the same distance from now.
pub fn to_wall_ms(at: u64) -> u64 {
    shift(at, now_ms(), wall_ms())
}

/// The time on `now_ms`'s clock of `wall`, a wall-clock time: the same distance from now.
pub fn from_wall_ms(wall: u64) -> u64 {
    shift(wall, wall_ms(), now_ms())
}

/// `at`, read on a clock that says `from_now`, moved to a clock that says `to_now`.
fn shift(at: u64, from_now: u64, to_now: u64) -> u64 {
    if at >= from_now {
        to_now.saturating_add(at - from_now)
    } else {
        to_now.saturating_sub(from_now - at)
    }
}

/// What a lookup found for an address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Ban or allow, after the fallback for non-ban types.
    pub action: Action,
    /// Who decided.
    pub origin: Arc<str>,
    /// The decision type as written (`ban`, `captcha`, ...).
    pub kind: Arc<str>,
    /// The address or range that matched.
    pub value: IpNet,
    /// Why: the decision's scenario or note (empty when it has none).
    pub reason: Arc<str>,
}

/// Which decisions a delete or a listing concerns.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Exactly this address or range.
    pub value: Option<IpNet>,
    /// Decisions whose address or range contains this address.
    pub contains: Option<IpAddr>,
    /// This origin; one without a `:` also selects its family (`wazuh` selects
    /// `wazuh:wraith-ban`), one with a `:` only itself.
    pub origin: Option<String>,
    pub kind: Option<String>,
    pub scope: Option<Scope>,
    pub source: Option<Source>,
}

impl Filter {
    /// Whether it selects the decision `hit` of `source`, filed under `value`.
    fn matches(&self, source: Source, value: IpNet, hit: &Hit) -> bool {
        self.value.is_none_or(|v| v == value)
            && self.contains.is_none_or(|ip| net_contains(&value, ip))
            && self
                .origin
                .as_deref()
                .is_none_or(|o| in_family(&hit.origin, o))
            && self.kind.as_deref().is_none_or(|k| k == &*hit.kind)
            && self.scope.is_none_or(|s| s == hit.scope)
            && self.source.is_none_or(|s| s == source)
    }
}

/// Whether `origin` is `filter`, or (for a `filter` without `:`) `filter:<anything>`.
fn in_family(origin: &str, filter: &str) -> bool {
    origin == filter
        || (!filter.contains(':')
            && origin
                .strip_prefix(filter)
                .is_some_and(|rest| rest.starts_with(':')))
}

/// One source's decisions: the published table, and its size for a lookup that skips an
/// empty one without loading it.
struct Partition {
    table: ArcSwap<Table>,
    /// How many decisions the table holds, set after the table is stored (most requests,
    /// on most gateways, meet two empty tables).
    len: AtomicUsize,
}

impl Partition {
    fn new() -> Partition {
        Partition {
            table: ArcSwap::from_pointee(Table::default()),
            len: AtomicUsize::new(0),
        }
    }

    fn lookup(&self, ip: IpAddr, fallback: Fallback) -> Option<Verdict> {
        if self.len.load(Ordering::Acquire) == 0 {
            return None;
        }
        let table = self.table.load();
        let mut now = 0;
        let mut found: Option<Verdict> = None;
        table.visit(ip, |value, hits| {
            if now == 0 {
                now = now_ms();
            }
            // Bans come first in a network's list: its first live decision is a ban if any
            // live one is.
            let Some(hit) = hits.iter().find(|h| h.until_ms > now) else {
                return true;
            };
            let action = action_for(&hit.kind, fallback);
            if action == Action::Ban || found.is_none() {
                found = Some(Verdict {
                    action,
                    origin: hit.origin.clone(),
                    kind: hit.kind.clone(),
                    value,
                    reason: hit.reason.clone(),
                });
            }
            action != Action::Ban
        });
        found
    }
}

/// The decision store shared by the accept loops, the pipeline, the admin API and the bridges.
pub struct DecisionStore {
    /// One table per source: an admin or Wazuh ban edits the (small) local one only.
    local: Partition,
    crowdsec: Partition,
    /// Held by a writer from reading a table to publishing its edit, so no edit is lost to
    /// another made meanwhile.
    writing: Mutex<()>,
    /// Counts the tables published that add decisions, so a `BanWatch` sees a possible new
    /// ban with one load.
    generation: AtomicU64,
    /// Tells waiting `BanWatch`es (tunnels, idle bodies) that a table adding decisions was
    /// published.
    changes: tokio::sync::watch::Sender<u64>,
    /// Set by a CrowdSec bridge with `on_error = "closed"` while its data is too stale.
    refuse_all: AtomicBool,
    /// Held by a save from reading the decisions to the rename: saves run one at a time, so
    /// the file on disk is always the newest complete list (admin calls save concurrently).
    saving: Mutex<()>,
    /// The state file as this store last read or wrote it: its path and (device, inode).
    file: Mutex<Option<(std::path::PathBuf, (u64, u64))>>,
}

impl Default for DecisionStore {
    fn default() -> Self {
        DecisionStore::new()
    }
}

impl DecisionStore {
    /// An empty store.
    pub fn new() -> DecisionStore {
        DecisionStore {
            local: Partition::new(),
            crowdsec: Partition::new(),
            writing: Mutex::new(()),
            generation: AtomicU64::new(0),
            changes: tokio::sync::watch::Sender::new(0),
            refuse_all: AtomicBool::new(false),
            saving: Mutex::new(()),
            file: Mutex::new(None),
        }
    }

    fn writing(&self) -> MutexGuard<'_, ()> {
        // A panic while holding the lock leaves the tables consistent (a table is published
        // whole or not at all).
        self.writing.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn partition(&self, source: Source) -> &Partition {
        match source {
            Source::Local => &self.local,
            Source::Crowdsec => &self.crowdsec,
        }
    }

    /// The strongest live decision for `ip`: any ban wins; otherwise the longest-prefix
    /// non-ban decision (whose action follows `fallback`). `None` on a miss.
    pub fn lookup(&self, ip: IpAddr, fallback: Fallback) -> Option<Verdict> {
        // A ban in either table wins (the local one when both have one); otherwise the
        // longer prefix of the two.
        let local = self.local.lookup(ip, fallback);
        if local.as_ref().is_some_and(|v| v.action == Action::Ban) {
            return local;
        }
        let crowdsec = self.crowdsec.lookup(ip, fallback);
        match (local, crowdsec) {
            (_, Some(c)) if c.action == Action::Ban => Some(c),
            (Some(l), Some(c)) if c.value.prefix_len() > l.value.prefix_len() => Some(c),
            (l, c) => l.or(c),
        }
    }

    /// Whether every request should be refused (CrowdSec closed-mode with stale data).
    pub fn refusing_all(&self) -> bool {
        self.refuse_all.load(Ordering::Relaxed)
    }

    /// Turns closed-mode refusal on or off.
    pub fn set_refuse_all(&self, on: bool) {
        self.refuse_all.store(on, Ordering::Relaxed);
    }

    /// Number of decisions in the published tables (live or not yet purged).
    pub fn len(&self) -> usize {
        self.local.len.load(Ordering::Acquire) + self.crowdsec.len.load(Ordering::Acquire)
    }

    /// Whether the published tables are empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many tables that add decisions have been published: a `BanWatch` looks the
    /// client up again only when it changed (lifting a decision bans nobody).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// A receiver told of each table published that adds decisions.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Publishes `table` as `source`'s (the caller holds `writing`). Only a table that adds
    /// decisions moves the generation on and wakes the waiting `BanWatch`es: the purge that
    /// runs every second with a large CrowdSec list in hand would wake every idle stream
    /// each time otherwise.
    fn publish(&self, source: Source, table: Table, adds: bool) {
        let partition = self.partition(source);
        let len = table.len();
        partition.table.store(Arc::new(table));
        partition.len.store(len, Ordering::Release);
        if adds {
            // After the table: whoever sees the new generation finds the new table.
            let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
            self.changes.send_replace(generation);
        }
    }

    /// Edits `source`'s table (drops, then sets) and publishes it; returns how many of
    /// `drop` were held. The caller holds `writing`.
    fn edit(&self, source: Source, drop: &[Key], set: Vec<Decision>) -> usize {
        let adds = !set.is_empty();
        let (table, removed) = self.partition(source).table.load().edited(drop, set);
        self.publish(source, table, adds);
        removed
    }

    /// Adds (or replaces, by key) decisions and publishes once per source.
    pub fn insert(&self, decisions: impl IntoIterator<Item = Decision>) {
        let _w = self.writing();
        let (local, crowdsec): (Vec<Decision>, Vec<Decision>) = decisions
            .into_iter()
            .partition(|d| d.source == Source::Local);
        for (source, set) in [(Source::Local, local), (Source::Crowdsec, crowdsec)] {
            if !set.is_empty() {
                self.edit(source, &[], set);
            }
        }
    }

    /// Adds (or replaces, by key) local decisions, unless the local partition would then
    /// hold more than `cap`: then nothing is added and the error says so.
    pub fn insert_local(&self, decisions: Vec<Decision>, cap: usize) -> Result<(), String> {
        let _w = self.writing();
        let table = self.local.table.load();
        let mut new_keys: Vec<Key> = decisions
            .iter()
            .map(Decision::key)
            .filter(|k| table.get(k).is_none())
            .collect();
        new_keys.sort_unstable();
        new_keys.dedup();
        let total = table.len() + new_keys.len();
        if total > cap {
            return Err(format!(
                "the local decisions would number {total}, more than decisions.max_local ({cap}): lift some (wraith decisions delete) or raise it"
            ));
        }
        drop(table);
        self.edit(Source::Local, &[], decisions);
        Ok(())
    }

    /// Adds decisions like `insert`, except that where one of the same key is already held
    /// the one that lasts longer stays: merging a state file never shortens a ban in hand.
    pub fn merge(&self, decisions: impl IntoIterator<Item = Decision>) {
        let _w = self.writing();
        let mut by_source: [HashMap<Key, Decision>; 2] = Default::default();
        for d in decisions {
            let i = usize::from(d.source == Source::Crowdsec);
            merge_into(&mut by_source[i], d);
        }
        for (source, wanted) in [Source::Local, Source::Crowdsec].into_iter().zip(by_source) {
            if wanted.is_empty() {
                continue;
            }
            let table = self.partition(source).table.load();
            let set: Vec<Decision> = wanted
                .into_iter()
                .filter(|(k, d)| table.get(k).is_none_or(|held| d.until_ms > held.until_ms))
                .map(|(_, d)| d)
                .collect();
            drop(table);
            if !set.is_empty() {
                self.edit(source, &[], set);
            }
        }
    }

    /// Removes the decisions of `source` that `filter` selects; returns them.
    pub fn remove(&self, source: Source, filter: &Filter) -> Vec<Decision> {
        let _w = self.writing();
        let mut removed = Vec::new();
        self.partition(source).table.load().for_each(|value, hit| {
            if filter.matches(source, value, hit) {
                removed.push(hit.decision(source, value));
            }
        });
        if !removed.is_empty() {
            let keys: Vec<Key> = removed.iter().map(Decision::key).collect();
            self.edit(source, &keys, Vec::new());
        }
        removed
    }

    /// Replaces every CrowdSec decision with `decisions` (a full stream snapshot).
    pub fn replace_crowdsec(&self, decisions: Vec<Decision>) {
        let _w = self.writing();
        let adds = !decisions.is_empty();
        self.publish(Source::Crowdsec, Table::build(decisions), adds);
    }

    /// Applies one stream delta: `deleted` keys go (repeats are harmless), then `new` ones
    /// are added. Publishes once, and only if something changed; returns (removed, added).
    pub fn apply_crowdsec_delta(&self, deleted: &[Key], new: Vec<Decision>) -> (usize, usize) {
        let _w = self.writing();
        let added = new.len();
        if deleted.is_empty() && new.is_empty() {
            return (0, 0);
        }
        let (table, removed) = self.crowdsec.table.load().edited(deleted, new);
        if removed > 0 || added > 0 {
            self.publish(Source::Crowdsec, table, added > 0);
        }
        (removed, added)
    }

    /// Drops expired decisions; returns how many went. Reads only the parts of the tables
    /// where one is due, so it costs next to nothing when nothing expired.
    pub fn purge_expired(&self) -> usize {
        let now = now_ms();
        let _w = self.writing();
        let mut purged = 0;
        for source in [Source::Local, Source::Crowdsec] {
            let expired = self.partition(source).table.load().expired(now);
            if !expired.is_empty() {
                purged += self.edit(source, &expired, Vec::new());
            }
        }
        purged
    }

    /// Live decisions that `filter` selects, sorted by source, value, origin and type.
    pub fn list(&self, filter: &Filter) -> Vec<Decision> {
        let now = now_ms();
        let mut out: Vec<Decision> = Vec::new();
        for source in [Source::Local, Source::Crowdsec] {
            self.partition(source).table.load().for_each(|value, hit| {
                if hit.until_ms > now && filter.matches(source, value, hit) {
                    out.push(hit.decision(source, value));
                }
            });
        }
        out.sort_by(|a, b| {
            (a.source, a.value, &a.origin, &a.kind).cmp(&(b.source, b.value, &b.origin, &b.kind))
        });
        out
    }

    /// Counts of decisions by source, live or not yet purged: (local, crowdsec).
    pub fn counts(&self) -> (usize, usize) {
        (
            self.local.len.load(Ordering::Acquire),
            self.crowdsec.len.load(Ordering::Acquire),
        )
    }

    /// Writes the live local decisions to `path` atomically (a new temp file + fsync +
    /// rename + directory fsync, mode 0600; the temp file is removed when a step fails). Concurrent saves are serialized, each writing the state
    /// as of its turn, so a later save never loses to an earlier one.
    pub fn save(&self, path: &Path) -> Result<usize, String> {
        self.save_merged(path, &[])
    }

    /// Like `save`, but writes the live local decisions merged (as `merge` would) with
    /// `extra`, without adding `extra` to the store: a reload writes the new state file
    /// before it commits to anything.
    pub fn save_merged(&self, path: &Path, extra: &[Decision]) -> Result<usize, String> {
        let _turn = self.saving.lock().unwrap_or_else(|p| p.into_inner());
        self.write(path, extra)
    }

    /// `save`, unless the file at `path` was replaced by another writer since this store
    /// last read or wrote it (or appeared though it had none): then nothing is written and
    /// the answer is `None`. For the save at exit: a server that drained while a newer one
    /// took over (an overlapping restart) must not put back its older view of the bans.
    pub fn save_unless_replaced(&self, path: &Path) -> Result<Option<usize>, String> {
        let _turn = self.saving.lock().unwrap_or_else(|p| p.into_inner());
        let replaced = {
            let known = self.file.lock().unwrap_or_else(|p| p.into_inner());
            match (known.as_ref(), file_id(path)) {
                (_, None) => false,
                (Some((known, id)), Some(now)) if known == path => *id != now,
                (None, Some(_)) => true,
                (Some(_), Some(_)) => false,
            }
        };
        if replaced {
            return Ok(None);
        }
        self.write(path, &[]).map(Some)
    }

    /// The save itself; the caller holds `saving`.
    fn write(&self, path: &Path, extra: &[Decision]) -> Result<usize, String> {
        let now = now_ms();
        let file = {
            let mut local: Vec<Decision> = Vec::new();
            self.local.table.load().for_each(|value, hit| {
                local.push(hit.decision(Source::Local, value));
            });
            if extra.iter().any(|d| d.source == Source::Local) {
                let mut m: HashMap<Key, Decision> =
                    local.into_iter().map(|d| (d.key(), d)).collect();
                for d in extra.iter().filter(|d| d.source == Source::Local) {
                    merge_into(&mut m, d.clone());
                }
                local = m.into_values().collect();
            }
            let mut decisions: Vec<StoredDecision> = local
                .iter()
                .filter(|d| d.until_ms > now)
                .map(StoredDecision::from)
                .collect();
            decisions.sort_by(|a, b| (&a.value, &a.origin).cmp(&(&b.value, &b.origin)));
            StateFile {
                version: 1,
                decisions,
            }
        };
        let n = file.decisions.len();
        let mut bytes = serde_json::to_vec_pretty(&file)
            .map_err(|e| format!("cannot encode decisions: {e}"))?;
        bytes.push(b'\n');
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        }
        let tmp = temp_path(path);
        let mut f = create_new(&tmp).map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
        // Created, so ours: removed if a later step fails.
        let done = {
            use std::io::Write;
            f.write_all(&bytes)
                .and_then(|()| f.sync_all())
                .and_then(|()| f.metadata())
                .map_err(|e| format!("cannot write {}: {e}", tmp.display()))
        }
        .and_then(|meta| {
            std::fs::rename(&tmp, path)
                .map(|()| meta)
                .map_err(|e| format!("cannot replace {}: {e}", path.display()))
        });
        drop(f);
        let meta = match done {
            Ok(meta) => meta,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
        {
            use std::os::unix::fs::MetadataExt;
            *self.file.lock().unwrap_or_else(|p| p.into_inner()) =
                Some((path.to_path_buf(), (meta.dev(), meta.ino())));
        }
        // The rename itself survives a crash only once the directory is on disk.
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| format!("cannot sync {}: {e}", dir.display()))?;
        Ok(n)
    }

    /// Loads local decisions saved by `save` and merges them (`merge`: the longer of two
    /// with the same key stays); returns how many unexpired ones the file held.
    pub fn load(&self, path: &Path) -> Result<usize, String> {
        let decisions = Self::read(path)?;
        *self.file.lock().unwrap_or_else(|p| p.into_inner()) =
            file_id(path).map(|id| (path.to_path_buf(), id));
        let n = decisions.len();
        self.merge(decisions);
        Ok(n)
    }

    /// Reads the unexpired local decisions of a file written by `save`, adding them nowhere.
    /// A missing file holds none; a malformed one is an error naming the file and the problem.
    pub fn read(path: &Path) -> Result<Vec<Decision>, String> {
        let text = match crate::files::read_to_string(path, crate::files::LARGE) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        };
        let file: StateFile = serde_json::from_str(&text)
            .map_err(|e| format!("{}: not a Wraith decisions file: {e}", path.display()))?;
        if file.version != 1 {
            return Err(format!(
                "{}: decisions file version {} is not one this Wraith reads (1)",
                path.display(),
                file.version
            ));
        }
        let now = now_ms();
        let mut decisions = Vec::new();
        for (i, s) in file.decisions.into_iter().enumerate() {
            let d = s
                .into_decision()
                .map_err(|e| format!("{}: decision {i}: {e}", path.display()))?;
            if d.until_ms > now {
                decisions.push(d);
            }
        }
        Ok(decisions)
    }
}

/// The (device, inode) of the file at `path` (not followed if a link), if there is one.
fn file_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// Where a save writes before its rename: beside `path`, named for this process and a random
/// number, so nobody can put something at that name beforehand (and two Wraiths, a restart
/// overlapping the old one, never share it).
fn temp_path(path: &Path) -> std::path::PathBuf {
    path.with_extension(format!(
        "tmp.{}.{:016x}",
        std::process::id(),
        fastrand::u64(..)
    ))
}

/// Creates a file that must not exist yet (`O_EXCL`, and `O_NOFOLLOW`: never through a
/// link), mode 0600, for writing. Nothing is created when it fails.
fn create_new(tmp: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(0o600)
        .open(tmp)
}

/// Puts `d` in `map` unless a decision of the same key that ends later is there already.
fn merge_into(map: &mut HashMap<Key, Decision>, d: Decision) {
    match map.entry(d.key()) {
        std::collections::hash_map::Entry::Occupied(mut held) => {
            if d.until_ms > held.get().until_ms {
                held.insert(d);
            }
        }
        std::collections::hash_map::Entry::Vacant(slot) => {
            slot.insert(d);
        }
    }
}

/// The on-disk format of local decisions.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    version: u32,
    decisions: Vec<StoredDecision>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredDecision {
    origin: String,
    scope: String,
    value: String,
    #[serde(rename = "type")]
    kind: String,
    /// Milliseconds since the Unix epoch, by the wall clock.
    until_ms: u64,
    #[serde(default)]
    reason: String,
}

impl From<&Decision> for StoredDecision {
    fn from(d: &Decision) -> Self {
        StoredDecision {
            origin: d.origin.to_string(),
            scope: d.scope.as_str().to_string(),
            value: d.value.to_string(),
            kind: d.kind.to_string(),
            until_ms: to_wall_ms(d.until_ms),
            reason: d.reason.to_string(),
        }
    }
}

impl StoredDecision {
    fn into_decision(self) -> Result<Decision, String> {
        let scope = Scope::parse(&self.scope)
            .ok_or_else(|| format!("unknown scope {:?} (expected Ip or Range)", self.scope))?;
        // Saved as CIDR text whatever the scope; an Ip decision must be a single address.
        let value = super::parse_value(Scope::Range, &self.value)?;
        if scope == Scope::Ip && value.prefix_len() != value.max_prefix_len() {
            return Err(format!(
                "scope Ip with the range {:?} (expected one address)",
                self.value
            ));
        }
        if !super::valid_kind(&self.kind) {
            return Err(format!("invalid type {:?}", self.kind));
        }
        if !super::valid_kind(&self.origin) {
            return Err(format!("invalid origin {:?}", self.origin));
        }
        Ok(Decision {
            source: Source::Local,
            origin: Arc::from(self.origin),
            scope,
            value,
            kind: Arc::from(self.kind),
            until_ms: from_wall_ms(self.until_ms),
            reason: Arc::from(self.reason),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dec(source: Source, origin: &str, value: &str, kind: &str, ttl_ms: u64) -> Decision {
        let value: IpNet = value.parse().unwrap();
        Decision {
            source,
            origin: origin.into(),
            scope: if value.prefix_len() == value.max_prefix_len() {
                Scope::Ip
            } else {
                Scope::Range
            },
            value,
            kind: kind.into(),
            until_ms: now_ms() + ttl_ms,
            reason: "test".into(),
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// The two sources' tables answer as one: a ban in either wins (the local one when both
    /// ban), and between two decisions that are not bans the longer prefix does.
    #[test]
    fn local_and_crowdsec_decisions_are_looked_up_together() {
        let s = DecisionStore::new();
        s.insert([
            dec(Source::Local, "admin", "192.0.2.0/24", "captcha", 60_000),
            dec(Source::Crowdsec, "crowdsec", "192.0.2.7/32", "ban", 60_000),
            dec(
                Source::Crowdsec,
                "crowdsec",
                "198.51.100.0/24",
                "captcha",
                60_000,
            ),
            dec(
                Source::Local,
                "admin",
                "198.51.100.9/32",
                "throttle",
                60_000,
            ),
            dec(Source::Local, "admin", "203.0.113.5/32", "ban", 60_000),
            dec(
                Source::Crowdsec,
                "crowdsec",
                "203.0.113.0/24",
                "ban",
                60_000,
            ),
        ]);
        let at = |a: &str| s.lookup(ip(a), Fallback::Allow).unwrap();
        let v = at("192.0.2.7");
        assert_eq!((v.action, &*v.origin), (Action::Ban, "crowdsec"));
        let v = at("192.0.2.8");
        assert_eq!((v.action, &*v.kind), (Action::Allow, "captcha"));
        let v = at("198.51.100.9");
        assert_eq!(&*v.kind, "throttle", "the longer prefix");
        let v = at("198.51.100.10");
        assert_eq!((&*v.kind, &*v.origin), ("captcha", "crowdsec"));
        let v = at("203.0.113.5");
        assert_eq!((v.action, &*v.origin), (Action::Ban, "admin"));
        assert!(s.lookup(ip("192.0.3.1"), Fallback::Ban).is_none());
        assert_eq!(s.len(), 6);
    }

    /// The cost of a lookup that misses, with bench/decisions.py's `loaded` set (100,000
    /// addresses and 10,000 ranges, IPv4 and IPv6). Run with
    /// `cargo test --release --lib lookup_cost -- --ignored --nocapture`.
    #[test]
    #[ignore = "measurement; meaningful only in a release build"]
    fn lookup_cost_with_the_bench_decisions() {
        let mut rng = fastrand::Rng::with_seed(1);
        let mut all = Vec::new();
        for i in 0..110_000u32 {
            let (value, scope) = match (i < 100_000, i % 2 == 0) {
                (true, true) => (
                    format!(
                        "{}/32",
                        std::net::Ipv4Addr::from(rng.u32(0x0b00_0000..0xdf00_0000))
                    ),
                    "Ip",
                ),
                (true, false) => (
                    format!("2001:db8:{:x}::{:x}/128", rng.u16(..), rng.u16(..)),
                    "Ip",
                ),
                (false, true) => (
                    format!(
                        "{}/{}",
                        std::net::Ipv4Addr::from(rng.u32(0x0b00_0000..0xdf00_0000)),
                        rng.u8(16..=28)
                    ),
                    "Range",
                ),
                (false, false) => (
                    format!("2001:db8:{:x}::/{}", rng.u16(..), rng.u8(32..=64)),
                    "Range",
                ),
            };
            let mut d = dec(Source::Crowdsec, "crowdsec", &value, "ban", 3_600_000);
            d.value = d.value.trunc();
            d.scope = Scope::parse(scope).unwrap();
            all.push(d);
        }
        let s = DecisionStore::new();
        s.replace_crowdsec(all);
        let n = 2_000_000u32;
        let client = ip("127.0.0.1");
        let t = std::time::Instant::now();
        let mut hits = 0;
        for _ in 0..n {
            hits += usize::from(
                s.lookup(std::hint::black_box(client), Fallback::Ban)
                    .is_some(),
            );
        }
        assert_eq!(hits, 0);
        eprintln!("a missed lookup: {:?}", t.elapsed() / n);
    }

    #[test]
    fn clock_shift_keeps_the_distance_from_now() {
        // A wall clock a day ahead of the decisions' clock: a decision that ends in an hour
        // is saved as an hour after the wall clock's now, and read back the same way.
        let day = 86_400_000;
        let (store_now, wall_now) = (1_000 * day, 1_001 * day);
        assert_eq!(
            shift(store_now + 3_600_000, store_now, wall_now),
            wall_now + 3_600_000
        );
        assert_eq!(
            shift(wall_now + 3_600_000, wall_now, store_now),
            store_now + 3_600_000
        );
        assert_eq!(shift(store_now - 5, store_now, wall_now), wall_now - 5);
        assert_eq!(shift(5, 10, 3), 0, "before the epoch saturates");
        assert_eq!(shift(u64::MAX, 0, 10), u64::MAX);
        // Round trip through the real clocks (read a few microseconds apart).
        let at = now_ms() + 3_600_000;
        assert!(from_wall_ms(to_wall_ms(at)).abs_diff(at) <= 2);
    }

    #[test]
    fn longest_prefix_lookup_v4_and_v6() {
        let s = DecisionStore::new();
        s.insert([
            dec(Source::Local, "admin", "192.0.2.7/32", "ban", 60_000),
            dec(Source::Crowdsec, "cscli", "198.51.100.0/24", "ban", 60_000),
            dec(Source::Crowdsec, "cscli", "2001:db8:1::/48", "ban", 60_000),
            dec(
                Source::Local,
                "admin",
                "2001:db8:2::5/128",
                "captcha",
                60_000,
            ),
        ]);
        let fb = Fallback::Ban;
        assert_eq!(s.lookup(ip("192.0.2.7"), fb).unwrap().action, Action::Ban);
        assert!(s.lookup(ip("192.0.2.8"), fb).is_none());
        let v = s.lookup(ip("198.51.100.200"), fb).unwrap();
        assert_eq!(v.value, "198.51.100.0/24".parse::<IpNet>().unwrap());
        assert_eq!(&*v.origin, "cscli");
        assert!(s.lookup(ip("198.51.101.1"), fb).is_none());
        assert!(s.lookup(ip("2001:db8:1:ffff::1"), fb).is_some());
        assert!(s.lookup(ip("2001:db8:3::1"), fb).is_none());
        // IPv4-mapped IPv6 peers match IPv4 decisions.
        assert!(s.lookup(ip("::ffff:192.0.2.7"), fb).is_some());
        // captcha follows the fallback.
        assert_eq!(
            s.lookup(ip("2001:db8:2::5"), Fallback::Allow)
                .unwrap()
                .action,
            Action::Allow
        );
        assert_eq!(
            s.lookup(ip("2001:db8:2::5"), Fallback::Ban).unwrap().action,
            Action::Ban
        );
    }

    #[test]
    fn a_ban_on_a_range_beats_a_captcha_on_the_address() {
        let s = DecisionStore::new();
        s.insert([
            dec(Source::Local, "admin", "203.0.113.9/32", "captcha", 60_000),
            dec(
                Source::Crowdsec,
                "crowdsec",
                "203.0.113.0/24",
                "ban",
                60_000,
            ),
        ]);
        let v = s.lookup(ip("203.0.113.9"), Fallback::Allow).unwrap();
        assert_eq!(v.action, Action::Ban);
        assert_eq!(&*v.kind, "ban");
    }

    #[test]
    fn ipv6_ranges_that_cover_the_mapped_space_hold_ipv4_clients() {
        let s = DecisionStore::new();
        s.insert([
            dec(Source::Crowdsec, "crowdsec", "::/1", "ban", 60_000),
            dec(Source::Local, "admin", "2001:db8::/32", "ban", 60_000),
        ]);
        let net = |n: &str| n.parse::<IpNet>().unwrap();
        for client in ["192.0.2.1", "::ffff:192.0.2.1", "::1"] {
            let v = s.lookup(ip(client), Fallback::Allow).expect(client);
            assert_eq!((v.action, v.value), (Action::Ban, net("::/1")), "{client}");
        }
        assert!(s.lookup(ip("8000::1"), Fallback::Ban).is_none());

        // Longest prefix first across the families: an IPv4 /24 is narrower than ::/0.
        let s = DecisionStore::new();
        s.insert([
            dec(Source::Local, "admin", "192.0.2.0/24", "captcha", 60_000),
            dec(Source::Crowdsec, "crowdsec", "::/0", "throttle", 60_000),
            // Built by hand in its mapped form: held as the IPv4 range it is.
            dec(
                Source::Local,
                "admin",
                "::ffff:203.0.113.0/120",
                "ban",
                60_000,
            ),
        ]);
        let v = s.lookup(ip("192.0.2.7"), Fallback::Allow).unwrap();
        assert_eq!((&*v.kind, v.value), ("captcha", net("192.0.2.0/24")));
        let v = s.lookup(ip("198.51.100.1"), Fallback::Allow).unwrap();
        assert_eq!((&*v.kind, v.value), ("throttle", net("::/0")));
        let v = s.lookup(ip("203.0.113.5"), Fallback::Allow).unwrap();
        assert_eq!((v.action, v.value), (Action::Ban, net("203.0.113.0/24")));
        // Listing by the address a client has finds the same ranges.
        let found: Vec<IpNet> = s
            .list(&Filter {
                contains: Some(ip("192.0.2.7")),
                ..Filter::default()
            })
            .iter()
            .map(|d| d.value)
            .collect();
        assert_eq!(found, [net("192.0.2.0/24"), net("::/0")]);
    }

    /// Only a table that adds decisions moves the generation on (and wakes the watches):
    /// lifts and purges ban nobody.
    #[test]
    fn only_additions_move_the_generation_on() {
        let s = DecisionStore::new();
        let mut changes = s.changes();
        let mut gone = dec(Source::Crowdsec, "crowdsec", "192.0.2.1/32", "ban", 0);
        gone.until_ms = now_ms() - 1;
        s.insert([gone]);
        assert_eq!(s.generation(), 1);
        assert!(changes.has_changed().unwrap());
        changes.mark_unchanged();
        assert_eq!(s.purge_expired(), 1);
        s.insert([dec(Source::Local, "admin", "192.0.2.2/32", "ban", 60_000)]);
        assert_eq!(s.generation(), 2);
        changes.mark_unchanged();
        let lifted = s.remove(
            Source::Local,
            &Filter {
                value: Some("192.0.2.2/32".parse().unwrap()),
                ..Filter::default()
            },
        );
        assert_eq!(lifted.len(), 1);
        s.apply_crowdsec_delta(&[lifted[0].key()], Vec::new());
        assert_eq!(s.generation(), 2);
        assert!(!changes.has_changed().unwrap());
        s.replace_crowdsec(vec![dec(
            Source::Crowdsec,
            "CAPI",
            "198.51.100.0/24",
            "ban",
            60_000,
        )]);
        assert_eq!(s.generation(), 3);
    }

    #[test]
    fn expired_decisions_do_not_match_and_are_purged() {
        let s = DecisionStore::new();
        let mut d = dec(Source::Local, "admin", "192.0.2.1/32", "ban", 0);
        d.until_ms = now_ms() - 1;
        s.insert([
            d,
            dec(Source::Local, "admin", "192.0.2.2/32", "ban", 60_000),
        ]);
        assert!(s.lookup(ip("192.0.2.1"), Fallback::Ban).is_none());
        assert!(s.lookup(ip("192.0.2.2"), Fallback::Ban).is_some());
        assert_eq!(s.purge_expired(), 1);
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn sources_are_separate_partitions() {
        let s = DecisionStore::new();
        s.insert([
            dec(Source::Local, "wazuh", "192.0.2.1/32", "ban", 60_000),
            dec(Source::Crowdsec, "crowdsec", "192.0.2.1/32", "ban", 60_000),
        ]);
        let filter = Filter {
            value: Some("192.0.2.1/32".parse().unwrap()),
            origin: Some("wazuh".into()),
            ..Filter::default()
        };
        assert_eq!(s.remove(Source::Local, &filter).len(), 1);
        let v = s.lookup(ip("192.0.2.1"), Fallback::Ban).unwrap();
        assert_eq!(&*v.origin, "crowdsec");
        // A full CrowdSec snapshot never touches local decisions.
        s.insert([dec(Source::Local, "admin", "192.0.2.9/32", "ban", 60_000)]);
        s.replace_crowdsec(Vec::new());
        assert!(s.lookup(ip("192.0.2.1"), Fallback::Ban).is_none());
        assert!(s.lookup(ip("192.0.2.9"), Fallback::Ban).is_some());
    }

    #[test]
    fn an_origin_filter_without_a_colon_selects_its_family() {
        let s = DecisionStore::new();
        s.insert([
            dec(Source::Local, "wazuh", "192.0.2.1/32", "ban", 60_000),
            dec(
                Source::Local,
                "wazuh:wraith-ban",
                "192.0.2.1/32",
                "ban",
                60_000,
            ),
            dec(
                Source::Local,
                "wazuh:wraith-ban-long",
                "192.0.2.1/32",
                "ban",
                60_000,
            ),
            dec(Source::Local, "wazuhx", "192.0.2.1/32", "ban", 60_000),
        ]);
        let origins = |o: &str| -> Vec<String> {
            let f = Filter {
                origin: Some(o.into()),
                ..Filter::default()
            };
            s.list(&f).iter().map(|d| d.origin.to_string()).collect()
        };
        assert_eq!(
            origins("wazuh"),
            ["wazuh", "wazuh:wraith-ban", "wazuh:wraith-ban-long"]
        );
        assert_eq!(origins("wazuh:wraith-ban"), ["wazuh:wraith-ban"]);
        assert_eq!(origins("wazuh:"), Vec::<String>::new());
        let one = Filter {
            origin: Some("wazuh:wraith-ban".into()),
            ..Filter::default()
        };
        assert_eq!(s.remove(Source::Local, &one).len(), 1);
        assert_eq!(s.counts().0, 3);
    }

    #[test]
    fn repeated_deletes_are_harmless() {
        let s = DecisionStore::new();
        let d = dec(Source::Crowdsec, "cscli", "192.0.2.1/32", "ban", 60_000);
        let key = d.key();
        s.apply_crowdsec_delta(&[], vec![d]);
        assert_eq!(
            s.apply_crowdsec_delta(std::slice::from_ref(&key), vec![]),
            (1, 0)
        );
        assert_eq!(
            s.apply_crowdsec_delta(std::slice::from_ref(&key), vec![]),
            (0, 0)
        );
        assert!(s.lookup(ip("192.0.2.1"), Fallback::Ban).is_none());
    }

    #[test]
    fn concurrent_saves_leave_the_newest_complete_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = Arc::new(dir.path().join("decisions.json"));
        let s = Arc::new(DecisionStore::new());
        // Lists of different lengths, saved from many threads at once while they change.
        let threads: Vec<_> = (0..8u8)
            .map(|t| {
                let (s, path) = (s.clone(), path.clone());
                std::thread::spawn(move || {
                    for i in 0..25u8 {
                        s.insert([dec(
                            Source::Local,
                            "admin",
                            &format!("10.{t}.{i}.0/24"),
                            "ban",
                            60_000,
                        )]);
                        s.save(&path).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        // Every save finished after the last insert of its thread; the last one saw all.
        let fresh = DecisionStore::new();
        assert_eq!(fresh.load(&path).unwrap(), 200);
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name() != "decisions.json")
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn a_save_never_writes_through_a_link_at_the_old_temp_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("decisions.json");
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "precious\n").unwrap();
        // The name saves used to write through, planted by someone who can write here.
        let planted = path.with_extension(format!("tmp.{}", std::process::id()));
        std::os::unix::fs::symlink(&victim, &planted).unwrap();
        let s = DecisionStore::new();
        s.insert([dec(Source::Local, "admin", "192.0.2.1/32", "ban", 60_000)]);
        assert_eq!(s.save(&path).unwrap(), 1);
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_file(), "{meta:?}");
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777,
            0o600
        );
        assert_eq!(DecisionStore::new().load(&path).unwrap(), 1);
        assert!(std::fs::symlink_metadata(&planted).unwrap().is_symlink());
    }

    /// The save at exit leaves alone a state file another writer replaced (a newer server
    /// that took over while this one drained), and one that appeared where there was none;
    /// it writes over its own.
    #[test]
    fn the_save_at_exit_leaves_a_file_another_writer_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("decisions.json");
        let ban = |value: &str| dec(Source::Local, "admin", value, "ban", 60_000);
        let values = |path: &Path| -> Vec<IpNet> {
            DecisionStore::read(path)
                .unwrap()
                .iter()
                .map(|d| d.value)
                .collect()
        };
        let old = DecisionStore::new();
        old.insert([ban("192.0.2.1/32")]);
        old.save(&path).unwrap();
        // Its own file, untouched since: written.
        assert_eq!(old.save_unless_replaced(&path).unwrap(), Some(1));
        let new = DecisionStore::new();
        new.load(&path).unwrap();
        new.insert([ban("192.0.2.2/32")]);
        new.save(&path).unwrap();
        assert_eq!(old.save_unless_replaced(&path).unwrap(), None);
        let net = |s: &str| s.parse::<IpNet>().unwrap();
        assert_eq!(values(&path), [net("192.0.2.1/32"), net("192.0.2.2/32")]);
        // A server that found no file, and one appeared since.
        let other = dir.path().join("other.json");
        let empty = DecisionStore::new();
        empty.load(&other).unwrap();
        new.save(&other).unwrap();
        assert_eq!(empty.save_unless_replaced(&other).unwrap(), None);
        assert_eq!(values(&other).len(), 2);
        // No file at all: written.
        std::fs::remove_file(&other).unwrap();
        assert_eq!(empty.save_unless_replaced(&other).unwrap(), Some(0));
    }

    #[test]
    fn a_failed_save_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        // A directory where the state file goes: the rename fails (root or not).
        let path = dir.path().join("decisions.json");
        std::fs::create_dir(&path).unwrap();
        let s = DecisionStore::new();
        s.insert([dec(Source::Local, "admin", "192.0.2.1/32", "ban", 60_000)]);
        let e = s.save(&path).unwrap_err();
        assert!(e.contains("cannot replace"), "{e}");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["decisions.json"]);
    }

    #[test]
    fn local_decisions_round_trip_through_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/decisions.json");
        let s = DecisionStore::new();
        s.insert([
            dec(Source::Local, "wazuh", "192.0.2.1/32", "ban", 60_000),
            dec(Source::Local, "admin", "2001:db8::/32", "ban", 60_000),
            dec(Source::Crowdsec, "cscli", "198.51.100.1/32", "ban", 60_000),
        ]);
        assert_eq!(s.save(&path).unwrap(), 2);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let t = DecisionStore::new();
        assert_eq!(t.load(&path).unwrap(), 2);
        assert!(t.lookup(ip("192.0.2.1"), Fallback::Ban).is_some());
        assert!(t.lookup(ip("2001:db8:ffff::1"), Fallback::Ban).is_some());
        assert!(t.lookup(ip("198.51.100.1"), Fallback::Ban).is_none());
        // Missing file: empty; garbage: a clear error.
        assert_eq!(t.load(&dir.path().join("none.json")).unwrap(), 0);
        std::fs::write(&path, "{not json").unwrap();
        let e = t.load(&path).unwrap_err();
        assert!(e.contains("not a Wraith decisions file"), "{e}");
        // Well-formed JSON that says something else: each named.
        let entry = |origin: &str, scope: &str, value: &str| {
            format!(
                r#"{{"version":1,"decisions":[{{"origin":"{origin}","scope":"{scope}","value":"{value}","type":"ban","until_ms":{}}}]}}"#,
                u64::MAX / 2
            )
        };
        for (text, says) in [
            (r#"{"version":2,"decisions":[]}"#.to_string(), "version 2"),
            (
                entry("admin", "Ip", "192.0.2.0/24"),
                "scope Ip with the range",
            ),
            (entry("ad min", "Ip", "192.0.2.1/32"), "invalid origin"),
        ] {
            std::fs::write(&path, &text).unwrap();
            let e = t.load(&path).unwrap_err();
            assert!(e.contains(says), "{text}: {e}");
        }
    }

    #[test]
    fn merging_a_file_keeps_the_later_end_and_counts_what_it_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("decisions.json");
        let file = DecisionStore::new();
        file.insert([
            dec(Source::Local, "admin", "192.0.2.1/32", "ban", 60_000),
            dec(Source::Local, "admin", "192.0.2.2/32", "ban", 3_600_000),
        ]);
        file.save(&path).unwrap();
        let s = DecisionStore::new();
        s.insert([
            dec(Source::Local, "admin", "192.0.2.1/32", "ban", 86_400_000),
            dec(Source::Local, "admin", "192.0.2.2/32", "ban", 60_000),
            dec(Source::Local, "admin", "192.0.2.3/32", "ban", 60_000),
        ]);
        let until = |s: &DecisionStore, v: &str| {
            let filter = Filter {
                value: Some(v.parse().unwrap()),
                ..Filter::default()
            };
            s.list(&filter)[0].until_ms
        };
        let day = now_ms() + 86_000_000;
        // Written merged, the store itself untouched.
        let read = DecisionStore::read(&path).unwrap();
        assert_eq!(s.save_merged(&path, &read).unwrap(), 3);
        assert!(until(&s, "192.0.2.2/32") < now_ms() + 120_000);
        let t = DecisionStore::new();
        assert_eq!(t.load(&path).unwrap(), 3);
        assert!(until(&t, "192.0.2.1/32") > day);
        assert!(until(&t, "192.0.2.2/32") > now_ms() + 3_000_000);
        // Two read, three held: the count is what the file gave.
        file.save(&path).unwrap();
        assert_eq!(s.load(&path).unwrap(), 2);
        assert_eq!(s.counts().0, 3);
        assert!(until(&s, "192.0.2.1/32") > day);
        assert!(until(&s, "192.0.2.2/32") > now_ms() + 3_000_000);
    }

    #[test]
    fn many_decisions_publish_and_match() {
        let s = DecisionStore::new();
        let mut all = Vec::new();
        for i in 0..20_000u32 {
            let a = std::net::Ipv4Addr::from(0x0A00_0000 + i * 3);
            all.push(dec(
                Source::Crowdsec,
                "crowdsec",
                &format!("{a}/32"),
                "ban",
                60_000,
            ));
        }
        for i in 0..2_000u32 {
            let a = std::net::Ipv4Addr::from(0x6400_0000 + (i << 8));
            all.push(dec(
                Source::Crowdsec,
                "crowdsec",
                &format!("{a}/24"),
                "ban",
                60_000,
            ));
        }
        s.replace_crowdsec(all);
        assert_eq!(s.len(), 22_000);
        assert!(s.lookup(ip("10.0.0.3"), Fallback::Ban).is_some());
        assert!(s.lookup(ip("10.0.0.4"), Fallback::Ban).is_none());
        assert!(s.lookup(ip("100.0.5.77"), Fallback::Ban).is_some());
    }
}
