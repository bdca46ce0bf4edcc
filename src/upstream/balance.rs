//! Endpoint selection: round robin, smooth weighted round robin, least connections, consistent
//! hashing (Maglev) and power-of-two random choices. Every algorithm only chooses among
//! candidates: healthy (`EndpointHealth::is_available`), not already tried by this request,
//! and under their `max_connections`.
//!
//! Tables are built once per upstream (at load or reload), so a pick is O(1) for round robin,
//! weighted, ip_hash and random when the first choice is a candidate, and O(n) over the
//! endpoints' atomic counters for least_connections (a scan of a few cache lines beats a
//! shared, locked heap for the pool sizes a gateway sees).

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use super::Endpoint;
use crate::config::Algorithm;

/// Maglev lookup table size: a prime well above the endpoint count (at most 1000), so each
/// endpoint owns 65+ slots and removing one moves close to 1/N of the keys.
const MAGLEV_SIZE: usize = 65_537;
/// Upper bound on (sequence length × endpoints) when building the weighted sequence.
const MAX_SEQUENCE_WORK: usize = 4_000_000;

/// The per-upstream selection state.
#[derive(Debug)]
pub struct Balancer {
    algorithm: Algorithm,
    /// One period of smooth weighted round robin (endpoint indexes). Drives `weighted`, the
    /// starting point of `least_connections` scans (so ties follow the weights) and the
    /// weighted draws of `random`.
    sequence: Box<[u16]>,
    /// Maglev table (`ip_hash` only).
    maglev: Box<[u16]>,
    next: AtomicUsize,
    /// Smooth weighted round robin's running scores, for when the sequence's next turns
    /// belong to endpoints that are not candidates (down, ejected, full, tried) for longer
    /// than a few skips: then the turn is computed among the candidates alone, as nginx
    /// computes every turn. Rare, so a lock is fine.
    scores: std::sync::Mutex<Vec<i64>>,
}

/// Endpoints a request has already been sent to (retries go elsewhere). No allocation
/// unless the upstream has more than 128 endpoints and a request tried past them.
#[derive(Debug, Default)]
pub struct Tried {
    bits: u128,
    more: Vec<usize>,
    count: usize,
}

impl Tried {
    pub fn insert(&mut self, i: usize) {
        if self.contains(i) {
            return;
        }
        if i < 128 {
            self.bits |= 1 << i;
        } else {
            self.more.push(i);
        }
        self.count += 1;
    }

    #[inline]
    pub fn contains(&self, i: usize) -> bool {
        if i < 128 {
            self.bits & (1 << i) != 0
        } else {
            self.more.contains(&i)
        }
    }

    /// How many distinct endpoints were tried.
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

impl Balancer {
    /// Precomputes the tables for `endpoints` (names and weights).
    pub fn new(algorithm: Algorithm, names: &[&str], weights: &[u32]) -> Balancer {
        let sequence = match algorithm {
            Algorithm::RoundRobin | Algorithm::IpHash => Box::default(),
            _ => smooth_sequence(weights).into_boxed_slice(),
        };
        let maglev = if algorithm == Algorithm::IpHash {
            maglev_table(names, weights, MAGLEV_SIZE).into_boxed_slice()
        } else {
            Box::default()
        };
        Balancer {
            algorithm,
            sequence,
            maglev,
            next: AtomicUsize::new(0),
            scores: std::sync::Mutex::new(vec![0; names.len()]),
        }
    }

    /// Chooses a candidate, or `None` if `candidate` accepts none. `key` is the request's
    /// hash key (used by `ip_hash` only).
    #[inline]
    pub fn pick(
        &self,
        endpoints: &[Endpoint],
        key: u64,
        candidate: impl Fn(usize) -> bool,
    ) -> Option<usize> {
        let n = endpoints.len();
        if n == 0 {
            return None;
        }
        match self.algorithm {
            // A skipped turn takes the next counter value rather than the next endpoint, so the
            // turns of an unavailable endpoint spread over the others instead of all going to
            // its neighbour. After a bounded number of skips, a scan finds any candidate.
            Algorithm::RoundRobin => {
                for _ in 0..n + 8 {
                    let i = self.next.fetch_add(1, Relaxed) % n;
                    if candidate(i) {
                        return Some(i);
                    }
                }
                (0..n).find(|&i| candidate(i))
            }
            Algorithm::Weighted => self.weighted_turn(endpoints, &candidate),
            // The weighted turn is where the scan starts: among equally loaded candidates
            // (the usual case at low load) it wins, so ties follow the weights.
            Algorithm::LeastConnections => {
                let start = self.weighted_turn(endpoints, &candidate)?;
                least_loaded(endpoints, start, &candidate)
            }
            Algorithm::IpHash => {
                let m = self.maglev.len();
                let mut h = key;
                for attempt in 1..=8u64 {
                    let i = self.maglev[(h % m as u64) as usize] as usize;
                    if candidate(i) {
                        return Some(i);
                    }
                    // Deterministic fallback chain: the same key lands on the same
                    // replacement while its endpoint is away.
                    h = mix64(h ^ attempt.wrapping_mul(0x9E37_79B9_7F4A_7C15));
                }
                let start = (h % n as u64) as usize;
                (0..n).map(|k| (start + k) % n).find(|&i| candidate(i))
            }
            Algorithm::Random => {
                let len = self.sequence.len();
                let mut best: Option<usize> = None;
                // Two weighted draws; the less loaded (relative to weight) wins.
                for _ in 0..4 {
                    let a = self.sequence[fastrand::usize(..len)] as usize;
                    let b = self.sequence[fastrand::usize(..len)] as usize;
                    best = match (candidate(a), candidate(b)) {
                        (true, true) => Some(if lighter(endpoints, b, a) { b } else { a }),
                        (true, false) => Some(a),
                        (false, true) => Some(b),
                        (false, false) => None,
                    };
                    if best.is_some() {
                        break;
                    }
                }
                best.or_else(|| least_loaded(endpoints, fastrand::usize(..n), &candidate))
            }
        }
    }
}

impl Balancer {
    /// The next turn of smooth weighted round robin that falls on a candidate. A skipped
    /// turn takes the next counter value, so an absent endpoint's turns spread over the
    /// others by their weights instead of going to its neighbour in the sequence. When
    /// more turns in a row are not candidates than a few skips cover (a heavy endpoint
    /// away), the turn is computed among the candidates alone.
    fn weighted_turn(
        &self,
        endpoints: &[Endpoint],
        candidate: &impl Fn(usize) -> bool,
    ) -> Option<usize> {
        let n = endpoints.len();
        let len = self.sequence.len();
        if len == 0 {
            return (0..n).find(|&i| candidate(i));
        }
        for _ in 0..2 * n + 8 {
            let i = self.sequence[self.next.fetch_add(1, Relaxed) % len] as usize;
            if candidate(i) {
                return Some(i);
            }
        }
        self.weighted_among_candidates(endpoints, candidate)
    }

    /// nginx's smooth weighted round robin over the candidates only: each gains its weight,
    /// the richest is chosen and pays the candidates' total.
    #[cold]
    fn weighted_among_candidates(
        &self,
        endpoints: &[Endpoint],
        candidate: &impl Fn(usize) -> bool,
    ) -> Option<usize> {
        let mut scores = self
            .scores
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if scores.len() != endpoints.len() {
            scores.resize(endpoints.len(), 0);
        }
        let mut total: i64 = 0;
        let mut best: Option<usize> = None;
        for (i, e) in endpoints.iter().enumerate() {
            if !candidate(i) {
                continue;
            }
            let w = i64::from(e.weight.max(1));
            scores[i] = scores[i].saturating_add(w);
            total += w;
            if best.is_none_or(|b| scores[i] > scores[b]) {
                best = Some(i);
            }
        }
        let b = best?;
        scores[b] = scores[b].saturating_sub(total);
        Some(b)
    }
}

/// Whether `a` carries less load than `b` relative to their weights.
#[inline]
fn lighter(endpoints: &[Endpoint], a: usize, b: usize) -> bool {
    let (ea, eb) = (&endpoints[a], &endpoints[b]);
    (ea.in_flight() as u64) * (eb.weight as u64) < (eb.in_flight() as u64) * (ea.weight as u64)
}

/// The candidate with the fewest requests in flight per unit of weight; ties go to the
/// first one found from `start` (which rotates, so ties are shared fairly).
fn least_loaded(
    endpoints: &[Endpoint],
    start: usize,
    candidate: &impl Fn(usize) -> bool,
) -> Option<usize> {
    let n = endpoints.len();
    let mut best: Option<usize> = None;
    for k in 0..n {
        let i = (start + k) % n;
        if !candidate(i) {
            continue;
        }
        best = match best {
            Some(b) if !lighter(endpoints, i, b) => Some(b),
            _ => Some(i),
        };
    }
    best
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// One period of nginx's smooth weighted round robin: each step every endpoint gains its
/// weight, the richest is chosen and pays the total. Spreads each endpoint's turns evenly
/// (weights 5,1,1 give a a b a c a a, never a burst of five).
pub fn smooth_sequence(weights: &[u32]) -> Vec<u16> {
    let n = weights.len();
    if n == 0 {
        return Vec::new();
    }
    let g = weights.iter().copied().fold(0, gcd).max(1);
    let mut w: Vec<u64> = weights.iter().map(|&x| (x / g).max(1) as u64).collect();
    let mut total: u64 = w.iter().sum();
    // Huge pools with large, coprime weights: scale down to keep the table bounded.
    let cap = (MAX_SEQUENCE_WORK / n).max(n) as u64;
    if total > cap {
        for x in &mut w {
            *x = (*x * cap / total).max(1);
        }
        total = w.iter().sum();
    }
    let mut current = vec![0i64; n];
    let mut out = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for i in 0..n {
            current[i] += w[i] as i64;
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total as i64;
        out.push(best as u16);
    }
    out
}

/// A Maglev lookup table (Eisenbud et al., NSDI 2016) of size `m` (prime): each endpoint
/// walks its own permutation of the slots, derived from its name, and claims free ones in
/// turn (heavier endpoints claim proportionally more turns). Endpoints keep their slots when
/// others come and go, apart from a small reshuffle.
pub fn maglev_table(names: &[&str], weights: &[u32], m: usize) -> Vec<u16> {
    const EMPTY: u16 = u16::MAX;
    let n = names.len();
    let mut table = vec![EMPTY; m];
    if n == 0 {
        return table;
    }
    let perms: Vec<(u64, u64)> = names
        .iter()
        .map(|name| {
            let offset = hash_bytes(name.as_bytes(), 0x5157_4a1f) % m as u64;
            let skip = hash_bytes(name.as_bytes(), 0x2d35_8dcc) % (m as u64 - 1) + 1;
            (offset, skip)
        })
        .collect();
    let wmax = weights.iter().copied().max().unwrap_or(1).max(1) as u64;
    let mut next = vec![0u64; n];
    let mut credit = vec![0u64; n];
    let mut filled = 0;
    loop {
        for i in 0..n {
            credit[i] += weights.get(i).copied().unwrap_or(1).max(1) as u64;
            while credit[i] >= wmax {
                credit[i] -= wmax;
                let (offset, skip) = perms[i];
                loop {
                    let c = ((offset + next[i] * skip) % m as u64) as usize;
                    next[i] += 1;
                    if table[c] == EMPTY {
                        table[c] = i as u16;
                        filled += 1;
                        break;
                    }
                }
                if filled == m {
                    return table;
                }
            }
        }
    }
}

/// splitmix64's finalizer: a fast, well-mixed 64-bit hash of a 64-bit value.
#[inline]
pub fn mix64(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// FNV-1a over `bytes` (seeded), then mixed. Keys are short; this is cheap and stable across
/// processes and versions (which matters: every Wraith must map a key the same way).
#[inline]
pub fn hash_bytes(bytes: &[u8], seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix64(h)
}

/// The hash of a client address.
#[inline]
pub fn hash_ip(ip: std::net::IpAddr) -> u64 {
    match ip {
        std::net::IpAddr::V4(v4) => mix64(u32::from(v4) as u64 | 0x4_0000_0000),
        std::net::IpAddr::V6(v6) => {
            let v = u128::from(v6);
            mix64((v as u64) ^ mix64((v >> 64) as u64))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smooth_weighted_has_no_bursts() {
        let seq = smooth_sequence(&[5, 1, 1]);
        assert_eq!(seq, vec![0, 0, 1, 0, 2, 0, 0]);
        let seq = smooth_sequence(&[2, 4, 6]);
        assert_eq!(seq.len(), 6, "weights are reduced by their gcd");
        let count = |i| seq.iter().filter(|&&x| x == i).count();
        assert_eq!((count(0), count(1), count(2)), (1, 2, 3));
    }

    #[test]
    fn smooth_weighted_is_bounded_for_huge_pools() {
        let weights: Vec<u32> = (0..1000).map(|i| 1000 - (i % 7)).collect();
        let seq = smooth_sequence(&weights);
        assert!(seq.len() <= MAX_SEQUENCE_WORK / 1000 + 1000);
        assert!(
            (0..1000u16).all(|i| seq.contains(&i)),
            "every endpoint keeps a turn"
        );
    }

    #[test]
    fn maglev_spreads_evenly_and_by_weight() {
        let names = ["a:1", "b:1", "c:1", "d:1"];
        let t = maglev_table(&names, &[1, 1, 1, 1], MAGLEV_SIZE);
        for i in 0..4u16 {
            let share = t.iter().filter(|&&x| x == i).count() as f64 / MAGLEV_SIZE as f64;
            assert!((share - 0.25).abs() < 0.01, "endpoint {i}: {share}");
        }
        let t = maglev_table(&names[..2], &[3, 1], MAGLEV_SIZE);
        let share = t.iter().filter(|&&x| x == 0).count() as f64 / MAGLEV_SIZE as f64;
        assert!((share - 0.75).abs() < 0.01, "{share}");
    }

    #[test]
    fn maglev_moves_about_one_nth_when_an_endpoint_leaves() {
        let names = [
            "10.0.0.1:80",
            "10.0.0.2:80",
            "10.0.0.3:80",
            "10.0.0.4:80",
            "10.0.0.5:80",
        ];
        let before = maglev_table(&names, &[1; 5], MAGLEV_SIZE);
        // Remove endpoint 2: the others keep their names, so map indexes by name.
        let rest: Vec<&str> = names.iter().copied().filter(|n| *n != names[2]).collect();
        let after = maglev_table(&rest, &[1; 4], MAGLEV_SIZE);
        let moved = (0..MAGLEV_SIZE)
            .filter(|&s| names[before[s] as usize] != rest[after[s] as usize])
            .count() as f64
            / MAGLEV_SIZE as f64;
        // 1/5 must move (the removed endpoint's keys); Maglev adds a little churn.
        assert!((0.2..=1.5 / 5.0).contains(&moved), "moved {moved}");
    }

    #[test]
    fn tried_set() {
        let mut t = Tried::default();
        t.insert(3);
        t.insert(200);
        t.insert(3);
        assert!(t.contains(3) && t.contains(200) && !t.contains(4));
        assert_eq!(t.len(), 2);
    }
}
