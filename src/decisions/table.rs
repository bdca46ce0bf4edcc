//! The decisions' lookup table: immutable once published, edited by copying only what an
//! edit touches.
//!
//! One level per prefix length present (IPv4 and IPv6 apart), longest first, so a lookup
//! probes at most 33 (IPv4) or 129 (IPv6) maps and in practice a handful: O(prefix length),
//! no allocation. An IPv4 client is also `::ffff:a.b.c.d`: IPv6 ranges that cover all of
//! `::ffff:0:0/96` (`::/0`, `::/1`) hold it too; they are found when the table is edited, so
//! IPv4 lookups probe only those.
//!
//! Each level is split into shards (a power of two of them, about 2,048 networks each) that
//! tables share through `Arc`: an edit copies the shards it touches and shares the rest, so
//! a CrowdSec delta that bans one address in a table of a million copies one shard (about a
//! thousandth of the table), where rebuilding the whole table took seconds. The writer that
//! publishes the edited table is the only one that ever copies; readers load the current
//! table and never wait.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher};
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::{canonical_net, Decision, Key, Scope, Source};
use crate::proxy::headers::canonical;

/// One decision as the table holds it; the network it is filed under is the rest of its key.
#[derive(Debug, Clone)]
pub(super) struct Hit {
    pub until_ms: u64,
    pub scope: Scope,
    pub origin: Arc<str>,
    pub kind: Arc<str>,
    /// Why: shared by every decision with the same text (a million CrowdSec decisions carry
    /// a few dozen scenarios).
    pub reason: Arc<str>,
}

impl Hit {
    fn of(d: Decision) -> Hit {
        Hit {
            until_ms: d.until_ms,
            scope: d.scope,
            origin: d.origin,
            kind: d.kind,
            reason: d.reason,
        }
    }

    /// Whether this is the decision of `ident` (its network being the key's).
    fn is(&self, ident: &Ident) -> bool {
        self.scope == ident.scope && self.origin == ident.origin && self.kind == ident.kind
    }

    fn ident(&self) -> Ident {
        Ident {
            scope: self.scope,
            origin: self.origin.clone(),
            kind: self.kind.clone(),
        }
    }

    fn is_ban(&self) -> bool {
        &*self.kind == "ban"
    }

    /// The decision this hit is, filed under `value`.
    pub fn decision(&self, source: Source, value: IpNet) -> Decision {
        Decision {
            source,
            origin: self.origin.clone(),
            scope: self.scope,
            value,
            kind: self.kind.clone(),
            until_ms: self.until_ms,
            reason: self.reason.clone(),
        }
    }

    /// The key this hit is stored under, filed under `value`.
    fn key(&self, value: IpNet) -> Key {
        Key {
            origin: self.origin.clone(),
            scope: self.scope,
            value,
            kind: self.kind.clone(),
        }
    }
}

/// A key without its network: what tells apart the decisions filed under one network.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Ident {
    scope: Scope,
    origin: Arc<str>,
    kind: Arc<str>,
}

/// The decisions of one network, strongest first: bans, then the longest-lived.
type Hits = Arc<[Hit]>;

/// An IPv4 (`u32`) or IPv6 (`u128`) network address.
trait Addr: Copy + Eq + Hash + std::fmt::Debug {
    fn mask(self, len: u8) -> Self;
    fn net(self, len: u8) -> IpNet;
}

impl Addr for u32 {
    fn mask(self, len: u8) -> u32 {
        if len == 0 {
            0
        } else {
            self & (u32::MAX << (32 - u32::from(len)))
        }
    }

    fn net(self, len: u8) -> IpNet {
        IpNet::V4(Ipv4Net::new(self.into(), len).unwrap_or_default())
    }
}

impl Addr for u128 {
    fn mask(self, len: u8) -> u128 {
        if len == 0 {
            0
        } else {
            self & (u128::MAX << (128 - u32::from(len)))
        }
    }

    fn net(self, len: u8) -> IpNet {
        IpNet::V6(Ipv6Net::new(self.into(), len).unwrap_or_default())
    }
}

/// `::ffff:0.0.0.0`, the base of the IPv4-mapped addresses.
const MAPPED: u128 = 0xffff << 32;

/// A seeded integer hasher: much cheaper than SipHash for the fixed-width keys here, and the
/// random seed keeps crafted address sets from colliding on purpose.
#[derive(Clone, Copy)]
struct Seeded(u64);

impl BuildHasher for Seeded {
    type Hasher = Mix;
    fn build_hasher(&self) -> Mix {
        Mix(self.0)
    }
}

struct Mix(u64);

impl Hasher for Mix {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = splitmix(self.0 ^ u64::from(*b));
        }
    }
    fn write_u32(&mut self, n: u32) {
        self.0 = splitmix(self.0 ^ u64::from(n));
    }
    fn write_u128(&mut self, n: u128) {
        self.0 = splitmix(splitmix(self.0 ^ (n as u64)) ^ ((n >> 64) as u64));
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Networks per shard a level is built for; a level is split again when its shards hold
/// four times that on average, or gathered when they hold a sixteenth.
const SHARD_TARGET: usize = 2048;
/// At most this many shards per level (a million networks: 512).
const MAX_SHARDS: usize = 4096;

/// Part of a level: the networks whose hash falls in it.
#[derive(Clone)]
struct Shard<A> {
    map: HashMap<A, Hits, Seeded>,
    /// The earliest end of a decision here (`u64::MAX` when none): a purge skips the shards
    /// with nothing due.
    next_end: u64,
}

impl<A: Addr> Shard<A> {
    fn new(seed: Seeded, capacity: usize) -> Shard<A> {
        Shard {
            map: HashMap::with_capacity_and_hasher(capacity, seed),
            next_end: u64::MAX,
        }
    }

    fn recount_next_end(&mut self) {
        self.next_end = self
            .map
            .values()
            .flat_map(|hits| hits.iter())
            .map(|h| h.until_ms)
            .min()
            .unwrap_or(u64::MAX);
    }
}

/// The decisions of one prefix length.
#[derive(Clone)]
struct Level<A> {
    len: u8,
    /// `shards.len() - 1`; `shards.len()` is a power of two.
    mask: usize,
    shards: Box<[Arc<Shard<A>>]>,
    /// Decisions held (all networks, all hits).
    hits: usize,
    /// Networks held: what the shards are sized by (a network holds several decisions when
    /// several origins or types name it).
    nets: usize,
}

impl<A: Addr> Level<A> {
    fn shard_of(&self, seed: Seeded, net: A) -> usize {
        // The upper half of the hash: the shard's own map indexes by the low bits and tags
        // by the top seven.
        (seed.hash_one(net) >> 32) as usize & self.mask
    }

    fn get(&self, seed: Seeded, net: A) -> Option<&Hits> {
        self.shards[self.shard_of(seed, net)].map.get(&net)
    }

    /// A level holding `nets`, split for their number.
    fn build(len: u8, seed: Seeded, nets: Vec<(A, Hits)>) -> Level<A> {
        let count = nets.len().div_ceil(SHARD_TARGET).next_power_of_two();
        let count = count.clamp(1, MAX_SHARDS);
        let mut level = Level {
            len,
            mask: count - 1,
            shards: Box::new([]),
            hits: 0,
            nets: nets.len(),
        };
        let per_shard = nets.len() / count + nets.len() / count / 8 + 1;
        let mut shards: Vec<Shard<A>> = (0..count).map(|_| Shard::new(seed, per_shard)).collect();
        for (net, hits) in nets {
            level.hits += hits.len();
            shards[level.shard_of(seed, net)].map.insert(net, hits);
        }
        for s in &mut shards {
            s.recount_next_end();
        }
        level.shards = shards.into_iter().map(Arc::new).collect();
        level
    }

    /// Whether the level's shards hold far more or far fewer networks than they are built
    /// for.
    fn needs_resplit(&self) -> bool {
        let shards = self.mask + 1;
        (self.nets > shards * SHARD_TARGET * 4 && shards < MAX_SHARDS)
            || (shards > 1 && self.nets < shards * SHARD_TARGET / 16)
    }

    fn nets(&self) -> impl Iterator<Item = (A, &Hits)> {
        self.shards
            .iter()
            .flat_map(|s| s.map.iter().map(|(net, hits)| (*net, hits)))
    }

    /// This level with `edits` applied, or `None` when nothing is left in it. Counts the
    /// decisions the edits' drops found in `removed`.
    fn edited(
        this: Option<&Level<A>>,
        len: u8,
        seed: Seeded,
        edits: HashMap<A, Edit>,
        removed: &mut usize,
    ) -> Option<Level<A>> {
        let rebuild = this.is_none_or(|l| edits.len().saturating_mul(4) >= l.nets);
        let mut level = match this {
            Some(l) if !rebuild => l.clone(),
            _ => {
                // A new level, or an edit of a good part of it: built anew.
                let mut nets: HashMap<A, Hits, Seeded> = HashMap::with_hasher(seed);
                if let Some(l) = this {
                    nets.reserve(l.nets);
                    nets.extend(l.nets().map(|(net, hits)| (net, hits.clone())));
                }
                for (net, edit) in edits {
                    match edit.apply(nets.get(&net).map(|h| &h[..]), removed) {
                        Some(hits) => nets.insert(net, hits),
                        None => nets.remove(&net),
                    };
                }
                return (!nets.is_empty())
                    .then(|| Level::build(len, seed, nets.into_iter().collect()));
            }
        };
        // Copy-on-write: the shards the edits touch, each copied once.
        let mut by_shard: HashMap<usize, Vec<(A, Edit)>> = HashMap::new();
        for (net, edit) in edits {
            by_shard
                .entry(level.shard_of(seed, net))
                .or_default()
                .push((net, edit));
        }
        for (i, edits) in by_shard {
            let shard = Arc::make_mut(&mut level.shards[i]);
            for (net, edit) in edits {
                let old = shard.map.get(&net).map_or(0, |h| h.len());
                let new = edit.apply(shard.map.get(&net).map(|h| &h[..]), removed);
                level.hits = level.hits - old + new.as_ref().map_or(0, |h| h.len());
                level.nets = level.nets - usize::from(old > 0) + usize::from(new.is_some());
                match new {
                    Some(hits) => shard.map.insert(net, hits),
                    None => shard.map.remove(&net),
                };
            }
            shard.recount_next_end();
        }
        if level.hits == 0 {
            return None;
        }
        if level.needs_resplit() {
            let nets = level
                .nets()
                .map(|(net, hits)| (net, hits.clone()))
                .collect();
            return Some(Level::build(len, seed, nets));
        }
        Some(level)
    }
}

/// What an edit does to one network: its drops first, then its sets (a set replaces the
/// decision of its key, as a map insertion would).
#[derive(Default)]
struct Edit {
    drop: Vec<Ident>,
    set: Vec<Hit>,
}

impl Edit {
    /// The network's decisions after the edit (`None`: none left).
    fn apply(self, old: Option<&[Hit]>, removed: &mut usize) -> Option<Hits> {
        let mut hits: Vec<Hit> = old.map(<[Hit]>::to_vec).unwrap_or_default();
        if hits.len() + self.drop.len() + self.set.len() > 16 {
            // Many decisions on one network (a hostile answer can name one address under
            // as many origins and types as it likes): by map, not by scans of the list.
            let mut by_ident: HashMap<Ident, Hit> =
                hits.into_iter().map(|h| (h.ident(), h)).collect();
            for ident in &self.drop {
                *removed += usize::from(by_ident.remove(ident).is_some());
            }
            for hit in self.set {
                by_ident.insert(hit.ident(), hit);
            }
            hits = by_ident.into_values().collect();
        } else {
            for ident in &self.drop {
                if let Some(i) = hits.iter().position(|h| h.is(ident)) {
                    hits.swap_remove(i);
                    *removed += 1;
                }
            }
            for hit in self.set {
                match hits.iter().position(|h| h.is(&hit.ident())) {
                    Some(i) => hits[i] = hit,
                    None => hits.push(hit),
                }
            }
        }
        if hits.is_empty() {
            return None;
        }
        // Bans first, then the longest-lived: the first live hit is the strongest.
        hits.sort_by_key(|h| std::cmp::Reverse((h.is_ban(), h.until_ms)));
        Some(hits.into())
    }
}

/// The immutable lookup structure readers use.
#[derive(Clone)]
pub(super) struct Table {
    seed: Seeded,
    /// One level per prefix length present, longest prefix first.
    v4: Vec<Level<u32>>,
    v6: Vec<Level<u128>>,
    /// The levels of `v6` (by index, longest prefix first) with a range that covers all of
    /// `::ffff:0:0/96`, so every IPv4 client: probed after the IPv4 levels, being broader
    /// than any of them.
    v6_over_v4: Vec<usize>,
    len: usize,
}

impl Default for Table {
    fn default() -> Table {
        Table {
            seed: Seeded(fastrand::u64(..)),
            v4: Vec::new(),
            v6: Vec::new(),
            v6_over_v4: Vec::new(),
            len: 0,
        }
    }
}

/// The edits of one address family, by prefix length and network.
type Edits<A> = HashMap<u8, HashMap<A, Edit>>;

impl Table {
    /// A table of `decisions` (a later one of a key replaces an earlier one).
    pub fn build(decisions: impl IntoIterator<Item = Decision>) -> Table {
        let mut v4: HashMap<u8, HashMap<u32, Vec<Hit>>> = HashMap::new();
        let mut v6: HashMap<u8, HashMap<u128, Vec<Hit>>> = HashMap::new();
        for d in decisions {
            match canonical_net(d.value) {
                IpNet::V4(n) => v4
                    .entry(n.prefix_len())
                    .or_default()
                    .entry(u32::from(n.network()))
                    .or_default()
                    .push(Hit::of(d)),
                IpNet::V6(n) => v6
                    .entry(n.prefix_len())
                    .or_default()
                    .entry(u128::from(n.network()))
                    .or_default()
                    .push(Hit::of(d)),
            }
        }
        fn levels<A: Addr>(
            seed: Seeded,
            by_len: HashMap<u8, HashMap<A, Vec<Hit>>>,
        ) -> Vec<Level<A>> {
            let mut out: Vec<Level<A>> = by_len
                .into_iter()
                .map(|(len, nets)| {
                    let nets = nets
                        .into_iter()
                        .filter_map(|(net, set)| {
                            // One decision per key (the last), strongest first.
                            Edit {
                                drop: Vec::new(),
                                set,
                            }
                            .apply(None, &mut 0)
                            .map(|hits| (net, hits))
                        })
                        .collect();
                    Level::build(len, seed, nets)
                })
                .collect();
            out.sort_by_key(|l| std::cmp::Reverse(l.len));
            out
        }
        let seed = Table::default().seed;
        let (v4, v6) = (levels(seed, v4), levels(seed, v6));
        Table {
            seed,
            len: v4.iter().map(|l| l.hits).sum::<usize>()
                + v6.iter().map(|l| l.hits).sum::<usize>(),
            v6_over_v4: over_v4(&v6, seed),
            v4,
            v6,
        }
    }

    /// How many decisions it holds, live or not yet purged.
    pub fn len(&self) -> usize {
        self.len
    }

    /// This table with the decisions of `drop` removed, then `set` added (each replacing
    /// the decision of its key); and how many of `drop` were there.
    pub fn edited<'a>(
        &self,
        drop: impl IntoIterator<Item = &'a Key>,
        set: impl IntoIterator<Item = Decision>,
    ) -> (Table, usize) {
        let mut v4: Edits<u32> = HashMap::new();
        let mut v6: Edits<u128> = HashMap::new();
        fn edit<'e>(v4: &'e mut Edits<u32>, v6: &'e mut Edits<u128>, value: IpNet) -> &'e mut Edit {
            // Ranges inside ::ffff:0:0/96 are held as IPv4 (parse_value makes them so; a
            // decision built by hand may not be).
            match canonical_net(value) {
                IpNet::V4(n) => v4
                    .entry(n.prefix_len())
                    .or_default()
                    .entry(u32::from(n.network()))
                    .or_default(),
                IpNet::V6(n) => v6
                    .entry(n.prefix_len())
                    .or_default()
                    .entry(u128::from(n.network()))
                    .or_default(),
            }
        }
        for key in drop {
            edit(&mut v4, &mut v6, key.value).drop.push(Ident {
                scope: key.scope,
                origin: key.origin.clone(),
                kind: key.kind.clone(),
            });
        }
        for d in set {
            edit(&mut v4, &mut v6, d.value).set.push(Hit::of(d));
        }
        let mut removed = 0;
        let mut table = Table {
            seed: self.seed,
            v4: edit_levels(&self.v4, self.seed, v4, &mut removed),
            v6: edit_levels(&self.v6, self.seed, v6, &mut removed),
            v6_over_v4: Vec::new(),
            len: 0,
        };
        table.v6_over_v4 = over_v4(&table.v6, self.seed);
        table.len = table.v4.iter().map(|l| l.hits).sum::<usize>()
            + table.v6.iter().map(|l| l.hits).sum::<usize>();
        (table, removed)
    }

    /// The decision of `key`, if held.
    pub fn get(&self, key: &Key) -> Option<&Hit> {
        let ident = Ident {
            scope: key.scope,
            origin: key.origin.clone(),
            kind: key.kind.clone(),
        };
        let hits = match canonical_net(key.value) {
            IpNet::V4(n) => find(&self.v4, n.prefix_len())?.get(self.seed, u32::from(n.network())),
            IpNet::V6(n) => find(&self.v6, n.prefix_len())?.get(self.seed, u128::from(n.network())),
        }?;
        hits.iter().find(|h| h.is(&ident))
    }

    /// Calls `f` with every decision held and the network it is filed under.
    pub fn for_each(&self, mut f: impl FnMut(IpNet, &Hit)) {
        for level in &self.v4 {
            for (net, hits) in level.nets() {
                hits.iter().for_each(|h| f(net.net(level.len), h));
            }
        }
        for level in &self.v6 {
            for (net, hits) in level.nets() {
                hits.iter().for_each(|h| f(net.net(level.len), h));
            }
        }
    }

    /// The keys of the decisions that ended by `now_ms`; only shards with one due are read.
    pub fn expired(&self, now_ms: u64) -> Vec<Key> {
        fn collect<A: Addr>(levels: &[Level<A>], now_ms: u64, out: &mut Vec<Key>) {
            for level in levels {
                for shard in level.shards.iter().filter(|s| s.next_end <= now_ms) {
                    for (net, hits) in &shard.map {
                        for h in hits.iter().filter(|h| h.until_ms <= now_ms) {
                            out.push(h.key(net.net(level.len)));
                        }
                    }
                }
            }
        }
        let mut out = Vec::new();
        collect(&self.v4, now_ms, &mut out);
        collect(&self.v6, now_ms, &mut out);
        out
    }

    /// Every network held that contains `ip` with its decisions (strongest first), longest
    /// prefix first, until `f` says stop.
    pub fn visit(&self, ip: IpAddr, mut f: impl FnMut(IpNet, &[Hit]) -> bool) {
        match canonical(ip) {
            IpAddr::V4(v4) => {
                let a = u32::from(v4);
                for level in &self.v4 {
                    if !probe(level, self.seed, a, &mut f) {
                        return;
                    }
                }
                let mapped = u128::from(v4.to_ipv6_mapped());
                for &i in &self.v6_over_v4 {
                    if !probe(&self.v6[i], self.seed, mapped, &mut f) {
                        return;
                    }
                }
            }
            IpAddr::V6(v6) => {
                let a = u128::from(v6);
                for level in &self.v6 {
                    if !probe(level, self.seed, a, &mut f) {
                        return;
                    }
                }
            }
        }
    }
}

/// The levels of `v6` (by index) with a range that covers all of `::ffff:0:0/96`.
fn over_v4(v6: &[Level<u128>], seed: Seeded) -> Vec<usize> {
    v6.iter()
        .enumerate()
        .filter(|(_, l)| l.len <= 96 && l.get(seed, MAPPED.mask(l.len)).is_some())
        .map(|(i, _)| i)
        .collect()
}

/// The level of prefix length `len`.
fn find<A>(levels: &[Level<A>], len: u8) -> Option<&Level<A>> {
    levels.iter().find(|l| l.len == len)
}

/// Calls `f` with the network of `level` that holds `a`, if any; false once `f` said stop.
fn probe<A: Addr>(
    level: &Level<A>,
    seed: Seeded,
    a: A,
    f: &mut impl FnMut(IpNet, &[Hit]) -> bool,
) -> bool {
    let net = a.mask(level.len);
    match level.get(seed, net) {
        Some(hits) => f(net.net(level.len), hits),
        None => true,
    }
}

/// `levels` with `edits` applied: levels edited, added or emptied away, longest prefix first.
fn edit_levels<A: Addr>(
    levels: &[Level<A>],
    seed: Seeded,
    edits: Edits<A>,
    removed: &mut usize,
) -> Vec<Level<A>> {
    if edits.is_empty() {
        return levels.to_vec();
    }
    let mut edits = edits;
    let mut out: Vec<Level<A>> = Vec::with_capacity(levels.len() + edits.len());
    for level in levels {
        match edits.remove(&level.len) {
            Some(e) => out.extend(Level::edited(Some(level), level.len, seed, e, removed)),
            None => out.push(level.clone()),
        }
    }
    for (len, e) in edits {
        out.extend(Level::edited(None, len, seed, e, removed));
    }
    out.sort_by_key(|l| std::cmp::Reverse(l.len));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decisions::store::now_ms;

    fn dec(origin: &str, value: &str, kind: &str, until_ms: u64) -> Decision {
        let value: IpNet = value.parse().unwrap();
        Decision {
            source: Source::Crowdsec,
            origin: Arc::from(origin),
            scope: if value.prefix_len() == value.max_prefix_len() {
                Scope::Ip
            } else {
                Scope::Range
            },
            value,
            kind: Arc::from(kind),
            until_ms,
            reason: Arc::from("test"),
        }
    }

    /// Every decision of `t`, sorted, as (key, end).
    fn contents(t: &Table) -> Vec<(Key, u64)> {
        let mut out = Vec::new();
        t.for_each(|value, hit| out.push((hit.key(value), hit.until_ms)));
        out.sort();
        out
    }

    /// The strongest decision holding `ip` by a scan of `model`: the longest-prefix ban,
    /// or else the longest-prefix decision; as (is a ban, network).
    fn strongest(model: &HashMap<Key, u64>, ip: IpAddr, now: u64) -> Option<(bool, IpNet)> {
        let holding = model.iter().filter(|(k, until)| {
            **until > now && crate::proxy::headers::net_contains(&k.value, ip)
        });
        let best = |ban: bool| {
            holding
                .clone()
                .filter(|(k, _)| !ban || &*k.kind == "ban")
                .map(|(k, _)| k.value)
                .max_by_key(IpNet::prefix_len)
        };
        best(true)
            .map(|v| (true, v))
            .or_else(|| best(false).map(|v| (false, v)))
    }

    /// What the table answers for `ip`, the way the store reads it (fallback allow).
    fn answer(t: &Table, ip: IpAddr, now: u64) -> Option<(bool, IpNet)> {
        let mut found = None;
        t.visit(ip, |value, hits| {
            let Some(hit) = hits.iter().find(|h| h.until_ms > now) else {
                return true;
            };
            if hit.is_ban() {
                found = Some((true, value));
                return false;
            }
            found.get_or_insert((false, value));
            true
        });
        found
    }

    /// Random edits (sets, replacements, drops of held and unheld keys, expiries) on a
    /// table large enough to be split into shards, checked after each against a plain map:
    /// the contents, the count, and the lookups of addresses in and around the decisions.
    #[test]
    fn edits_agree_with_a_plain_map() {
        let mut rng = fastrand::Rng::with_seed(7);
        let now = now_ms();
        let origins = ["crowdsec", "CAPI", "cscli"];
        let kinds = ["ban", "captcha"];
        let random_decision = |rng: &mut fastrand::Rng| {
            // Addresses in a /16 so that ranges and addresses overlap often; a few IPv6.
            let value = match rng.u8(..10) {
                0 => format!("2001:db8::{:x}/128", rng.u16(..64)),
                1 => "::/0".to_string(),
                2 => format!("10.1.{}.0/24", rng.u8(..8)),
                3 => "10.0.0.0/8".to_string(),
                _ => format!("10.1.{}.{}/32", rng.u8(..64), rng.u8(..)),
            };
            dec(
                origins[rng.usize(..origins.len())],
                &value,
                kinds[rng.usize(..kinds.len())],
                now + rng.u64(1..100_000),
            )
        };
        let mut model: HashMap<Key, u64> = HashMap::new();
        let first: Vec<Decision> = (0..12_000).map(|_| random_decision(&mut rng)).collect();
        for d in &first {
            model.insert(d.key(), d.until_ms);
        }
        let mut table = Table::build(first);
        assert!(
            table.v4.iter().any(|l| l.mask > 0),
            "the test needs a level split into shards"
        );
        for round in 0..60 {
            let set: Vec<Decision> = (0..rng.usize(0..40))
                .map(|_| random_decision(&mut rng))
                .collect();
            let mut drop: Vec<Key> = model
                .keys()
                .filter(|_| rng.u32(..2_000) == 0)
                .cloned()
                .collect();
            drop.extend((0..3).map(|_| random_decision(&mut rng).key()));
            let mut expected_removed = 0;
            for k in &drop {
                expected_removed += usize::from(model.remove(k).is_some());
            }
            for d in &set {
                model.insert(d.key(), d.until_ms);
            }
            let (next, removed) = table.edited(&drop, set);
            assert_eq!(removed, expected_removed, "round {round}");
            // Every few rounds, time passes and what ended is purged.
            let at = now + round * 2_000;
            let next = if round % 5 == 4 {
                let expired = next.expired(at);
                let (purged, n) = next.edited(&expired, Vec::new());
                model.retain(|_, until| *until > at);
                assert_eq!(n, expired.len());
                purged
            } else {
                next
            };
            table = next;
            let mut want: Vec<(Key, u64)> = model.iter().map(|(k, u)| (k.clone(), *u)).collect();
            want.sort();
            assert_eq!(contents(&table), want, "round {round}");
            assert_eq!(table.len(), model.len());
            for _ in 0..50 {
                let ip: IpAddr = match rng.u8(..6) {
                    0 => format!("2001:db8::{:x}", rng.u16(..64)).parse().unwrap(),
                    1 => format!("10.{}.{}.{}", rng.u8(..3), rng.u8(..64), rng.u8(..))
                        .parse()
                        .unwrap(),
                    _ => format!("10.1.{}.{}", rng.u8(..64), rng.u8(..))
                        .parse()
                        .unwrap(),
                };
                assert_eq!(
                    answer(&table, ip, at),
                    strongest(&model, ip, at),
                    "round {round}, {ip}"
                );
            }
        }
    }

    /// A one-decision edit of a large table copies one shard and shares all the others.
    #[test]
    fn an_edit_copies_only_the_shard_it_touches() {
        let far = now_ms() + 3_600_000;
        let all = (0..100_000u32).map(|i| {
            let a = std::net::Ipv4Addr::from(0x0a00_0000 | i);
            dec("crowdsec", &format!("{a}/32"), "ban", far)
        });
        let table = Table::build(all);
        let level = &table.v4[0];
        assert!(level.mask + 1 >= 32, "{} shards", level.mask + 1);
        let (edited, _) = table.edited(&[], [dec("crowdsec", "10.0.0.5/32", "captcha", far)]);
        let shared = level
            .shards
            .iter()
            .zip(edited.v4[0].shards.iter())
            .filter(|(a, b)| Arc::ptr_eq(a, b))
            .count();
        assert_eq!(shared, level.mask, "all shards but one are shared");
        assert_eq!(edited.len(), 100_001);
        // The original is untouched: readers holding it see what they saw.
        assert_eq!(table.len(), 100_000);
        let ip: IpAddr = "10.0.0.5".parse().unwrap();
        let mut kinds = Vec::new();
        edited.visit(ip, |_, hits| {
            kinds.extend(hits.iter().map(|h| h.kind.to_string()));
            true
        });
        assert_eq!(kinds, ["ban", "captcha"]);
    }

    /// A level that grows past what its shards are built for is split again, and one that
    /// shrinks is gathered; emptied levels go.
    #[test]
    fn levels_split_and_gather_as_they_grow_and_shrink() {
        let far = now_ms() + 3_600_000;
        let d = |i: u32| {
            let a = std::net::Ipv4Addr::from(0x0a00_0000 | i);
            dec("crowdsec", &format!("{a}/32"), "ban", far)
        };
        let mut table = Table::build((0..1_000).map(d));
        assert_eq!(table.v4[0].mask, 0);
        // Grown in steps small enough to be copy-on-write edits.
        let mut n = 1_000;
        while n < 40_000 {
            let step = (n / 5) as u32;
            table = table.edited(&[], (n as u32..n as u32 + step).map(d)).0;
            n += step as usize;
        }
        let shards = table.v4[0].mask + 1;
        assert!(
            shards * SHARD_TARGET * 4 >= n && shards > 1,
            "{shards} shards for {n}"
        );
        // Shrunk back to a handful, in steps.
        while n > 100 {
            let step = (n / 5).max(1) as u32;
            let keys: Vec<Key> = (n as u32 - step..n as u32).map(|i| d(i).key()).collect();
            let (t, removed) = table.edited(&keys, Vec::new());
            assert_eq!(removed, keys.len());
            table = t;
            n -= step as usize;
        }
        assert_eq!(table.len(), n);
        assert_eq!(table.v4[0].mask, 0);
        let keys: Vec<Key> = (0..n as u32).map(|i| d(i).key()).collect();
        let (empty, _) = table.edited(&keys, Vec::new());
        assert!(empty.v4.is_empty() && empty.len() == 0);
    }

    /// A level whose networks each hold several decisions (one per origin) is still edited
    /// by copying one shard: shards are sized by networks, not decisions.
    #[test]
    fn several_decisions_per_network_do_not_make_every_edit_a_rebuild() {
        let far = now_ms() + 3_600_000;
        let all = (0..5_000u32).flat_map(|i| {
            let a = std::net::Ipv4Addr::from(0x0a00_0000 | i);
            (0..10).map(move |o| dec(&format!("lists:{o}"), &format!("{a}/32"), "ban", far))
        });
        let table = Table::build(all);
        let shards = table.v4[0].mask + 1;
        assert!(shards > 1, "{shards} shards");
        let (edited, _) = table.edited(&[], [dec("crowdsec", "10.0.0.5/32", "ban", far)]);
        let shared = table.v4[0]
            .shards
            .iter()
            .zip(edited.v4[0].shards.iter())
            .filter(|(a, b)| Arc::ptr_eq(a, b))
            .count();
        assert_eq!(shared, shards - 1);
        assert_eq!(edited.len(), 50_001);
    }

    /// Hundreds of decisions on one address (one per origin and type) are edited by map, and
    /// each one is found and lifted alone.
    #[test]
    fn many_decisions_on_one_network() {
        let far = now_ms() + 3_600_000;
        let many: Vec<Decision> = (0..500)
            .map(|i| dec(&format!("o{i}"), "192.0.2.1/32", "captcha", far + i))
            .collect();
        let keys: Vec<Key> = many.iter().map(Decision::key).collect();
        let table = Table::build(many);
        assert_eq!(table.len(), 500);
        let (t, removed) = table.edited(&keys[..499], [dec("o0", "192.0.2.1/32", "ban", far)]);
        assert_eq!((removed, t.len()), (499, 2));
        let mut seen = Vec::new();
        t.visit("192.0.2.1".parse().unwrap(), |_, hits| {
            seen.extend(
                hits.iter()
                    .map(|h| (h.origin.to_string(), h.kind.to_string())),
            );
            true
        });
        assert_eq!(
            seen,
            [
                ("o0".into(), "ban".into()),
                ("o499".into(), "captcha".into())
            ]
        );
    }
}
