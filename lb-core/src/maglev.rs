//! Weighted Maglev consistent hashing (Eisenbud et al., "Maglev: A Fast and Reliable Software
//! Network Load Balancer", NSDI 2016).
//!
//! Every backend derives a permutation of the table's `M` slots from its key:
//! `offset = h1(key) % M`, `skip = h2(key) % (M - 1) + 1`, `p(j) = (offset + j * skip) % M`.
//! Backends then take turns claiming the next slot of their permutation that nobody has
//! claimed yet, until the table is full. Because a backend's preferences depend only on its own
//! key, adding or removing one backend mostly leaves the other backends' slots where they were.
//!
//! Weights: the paper's weighting (more turns per round for heavier backends) only makes the
//! shares roughly proportional. Here every backend first gets an exact quota,
//! `floor(M * w / W)` plus one for the backends with the largest remainders (largest-remainder
//! apportionment), and stops taking turns once it reaches its quota, so each share is within one
//! slot of `M * w / W`. The order of turns is weighted too: a backend's `k`-th claim happens at
//! virtual time `(k + 1/2) / quota` (stride scheduling), so every backend progresses through
//! its quota at the same relative pace. With equal weights this degenerates to the paper's
//! plain round robin, which keeps the minimal-disruption property.
//!
//! Determinism: backends are processed in key order, never in the caller's order, so the same
//! set of backends yields the same table however the caller lists them (and on every node).
//! The hash is part of that contract: changing it reshuffles every flow on upgrade.

use alloc::collections::BinaryHeap;
use alloc::vec;
use alloc::vec::Vec;
use core::cmp::{Ordering, Reverse};
use core::fmt;

/// One backend as Maglev sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaglevBackend<'a> {
    /// Stable identity bytes, e.g. `b"198.18.1.11:8080"`. The backend's slots follow its key,
    /// so the key must not change while the backend stays the same.
    pub key: &'a [u8],
    /// Relative weight; must be at least 1.
    pub weight: u32,
}

/// Why a table could not be built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MaglevError {
    /// The backend list is empty.
    NoBackends,
    /// The table size is not a prime of at least 3 (the permutations need a prime size to
    /// visit every slot).
    InvalidSize { size: u32 },
    /// More backends than table slots.
    TooManyBackends { size: u32, backends: usize },
    /// The backend at this caller index has weight 0 (remove it instead).
    ZeroWeight { index: usize },
    /// The sum of all weights does not fit in a `u32`.
    WeightOverflow,
    /// Two backends (caller indices) share a key, which would make the result depend on the
    /// order they were listed in.
    DuplicateKey { first: usize, second: usize },
}

impl fmt::Display for MaglevError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MaglevError::NoBackends => write!(f, "no backends"),
            MaglevError::InvalidSize { size } => {
                write!(f, "maglev table size {size} is not a prime of at least 3")
            }
            MaglevError::TooManyBackends { size, backends } => {
                write!(
                    f,
                    "{backends} backends do not fit a maglev table of size {size}"
                )
            }
            MaglevError::ZeroWeight { index } => write!(f, "backend {index} has weight 0"),
            MaglevError::WeightOverflow => write!(f, "total backend weight overflows u32"),
            MaglevError::DuplicateKey { first, second } => {
                write!(f, "backends {first} and {second} have the same key")
            }
        }
    }
}

impl core::error::Error for MaglevError {}

/// Deterministic primality test by trial division (at most ~2^16 / 3 steps for any `u32`).
#[must_use]
pub fn is_prime(n: u32) -> bool {
    if n < 4 {
        return n >= 2;
    }
    if n.is_multiple_of(2) || n.is_multiple_of(3) {
        return false;
    }
    // Every prime above 3 is 6k +- 1. `u64` so that `d * d` cannot overflow near u32::MAX.
    let n = u64::from(n);
    let mut d = 5u64;
    while d * d <= n {
        if n.is_multiple_of(d) || n.is_multiple_of(d + 2) {
            return false;
        }
        d += 6;
    }
    true
}

/// Marks a slot nobody has claimed yet; never a valid index because `backends <= size`.
const EMPTY: u32 = u32::MAX;

/// Seeds of the two hashes. Arbitrary but fixed forever (see the module documentation).
const SEED_OFFSET: u64 = 0x6d61_676c_6576_3031;
const SEED_SKIP: u64 = 0x736b_6970_5f68_3032;

/// FNV-1a over the key starting from a seed-dependent basis, then SplitMix64's finaliser: FNV
/// alone leaves the low bits (which `% M` mostly keeps) weakly mixed for short, similar keys
/// such as `"10.0.0.1:80"` and `"10.0.0.2:80"`.
fn hash(key: &[u8], seed: u64) -> u64 {
    const FNV_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = FNV_OFFSET_BASIS ^ splitmix64(seed);
    for &b in key {
        h ^= u64::from(b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    splitmix64(h)
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A backend's walk through its permutation.
struct Walk {
    /// Caller's index, written into the table.
    index: u32,
    /// Next slot of the permutation to try.
    slot: u32,
    skip: u32,
}

/// The next turn of every backend whose quota is `quota`, at virtual time
/// `(2 * k + 1) / (2 * quota)` for its `k`-th claim. Backends with the same quota always take
/// their turns at the same times, so they are scheduled as one group.
#[derive(PartialEq, Eq)]
struct GroupTurn {
    /// `2 * k + 1`.
    num: u64,
    /// The group's quota (the common factor 2 cancels out of the comparison).
    quota: u64,
    /// Index into the groups.
    group: u32,
}

impl GroupTurn {
    fn same_time(&self, other: &Self) -> bool {
        u128::from(self.num) * u128::from(other.quota)
            == u128::from(other.num) * u128::from(self.quota)
    }
}

impl Ord for GroupTurn {
    fn cmp(&self, other: &Self) -> Ordering {
        // a/2p < b/2q  <=>  a*q < b*p. u128 because a <= 2^33 and q <= 2^32. Groups have
        // distinct quotas, so the tie-break makes the order total; turns at the same time are
        // merged by key order anyway.
        let lhs = u128::from(self.num) * u128::from(other.quota);
        let rhs = u128::from(other.num) * u128::from(self.quota);
        lhs.cmp(&rhs).then(self.quota.cmp(&other.quota))
    }
}

impl PartialOrd for GroupTurn {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// The order in which backends claim slots, as positions in key order: every turn of every
/// backend sorted by (virtual time, key order). `quotas` is indexed by position and sums to
/// the table size, which is the length of the result.
///
/// Equal weights give at most two distinct quotas, so scheduling by quota group makes the
/// heap hold two entries instead of one per backend.
fn turn_order(quotas: &[u32]) -> Vec<u32> {
    let mut groups: Vec<(u32, Vec<u32>)> = Vec::new();
    let mut by_quota: Vec<(u32, u32)> = quotas
        .iter()
        .zip(0u32..)
        .filter(|&(&q, _)| q > 0)
        .map(|(&q, pos)| (q, pos))
        .collect();
    // By quota, then by position, so each group's members come out in key order.
    by_quota.sort_unstable();
    for (quota, pos) in by_quota {
        match groups.last_mut() {
            Some((q, members)) if *q == quota => members.push(pos),
            _ => groups.push((quota, vec![pos])),
        }
    }
    let total: u64 = quotas.iter().map(|&q| u64::from(q)).sum();
    let mut order = Vec::with_capacity(total as usize);
    let mut heap: BinaryHeap<Reverse<GroupTurn>> = groups
        .iter()
        .zip(0u32..)
        .map(|(&(quota, _), group)| {
            Reverse(GroupTurn {
                num: 1,
                quota: u64::from(quota),
                group,
            })
        })
        .collect();
    let mut due: Vec<GroupTurn> = Vec::new();
    let mut merged: Vec<u32> = Vec::new();
    while let Some(Reverse(first)) = heap.pop() {
        due.clear();
        while heap
            .peek()
            .is_some_and(|Reverse(next)| next.same_time(&first))
        {
            if let Some(Reverse(next)) = heap.pop() {
                due.push(next);
            }
        }
        if due.is_empty() {
            order.extend_from_slice(&groups[first.group as usize].1);
        } else {
            // Several groups at the same instant (e.g. quotas 1 and 3 at 1/2 = 3/6): their
            // members interleave by key order, as one backend-by-backend schedule would.
            merged.clear();
            merged.extend_from_slice(&groups[first.group as usize].1);
            for turn in &due {
                merged.extend_from_slice(&groups[turn.group as usize].1);
            }
            merged.sort_unstable();
            order.extend_from_slice(&merged);
        }
        due.push(first);
        for turn in due.drain(..) {
            // `num = 2k + 1` and a group has `quota` turns, k < quota.
            if turn.num + 2 < 2 * turn.quota {
                heap.push(Reverse(GroupTurn {
                    num: turn.num + 2,
                    ..turn
                }));
            }
        }
    }
    order
}

/// Builds a Maglev lookup table of `size` entries, each an index into `backends`.
///
/// Backend `i` owns `floor(size * w_i / W)` or one more of the entries (`W` = total weight).
/// A backend may own no entry at all if `size` is small compared to the total weight.
///
/// # Errors
/// See [`MaglevError`]: empty `backends`, `size` not a prime >= 3, more backends than slots,
/// a zero weight, a total weight above `u32::MAX`, or two backends with the same key.
pub fn build_table(backends: &[MaglevBackend<'_>], size: u32) -> Result<Vec<u32>, MaglevError> {
    if backends.is_empty() {
        return Err(MaglevError::NoBackends);
    }
    if size < 3 || !is_prime(size) {
        return Err(MaglevError::InvalidSize { size });
    }
    let too_many = MaglevError::TooManyBackends {
        size,
        backends: backends.len(),
    };
    // `size <= u32::MAX`, so after this check every index fits a u32 and none equals EMPTY.
    let count = u32::try_from(backends.len()).map_err(|_| too_many)?;
    if count > size {
        return Err(too_many);
    }
    let mut total: u32 = 0;
    for (index, b) in backends.iter().enumerate() {
        if b.weight == 0 {
            return Err(MaglevError::ZeroWeight { index });
        }
        total = total
            .checked_add(b.weight)
            .ok_or(MaglevError::WeightOverflow)?;
    }

    let mut order: Vec<u32> = (0..count).collect();
    order.sort_unstable_by(|&a, &b| backends[a as usize].key.cmp(backends[b as usize].key));
    for pair in order.windows(2) {
        if let [a, b] = *pair
            && backends[a as usize].key == backends[b as usize].key
        {
            let (first, second) = (a.min(b) as usize, a.max(b) as usize);
            return Err(MaglevError::DuplicateKey { first, second });
        }
    }

    let quotas = quotas(backends, &order, size, total);

    let m = u64::from(size);
    let mut walks: Vec<Walk> = order
        .iter()
        .map(|&index| {
            let key = backends[index as usize].key;
            // Both casts are lossless: the values are reduced modulo a u32.
            let slot = (hash(key, SEED_OFFSET) % m) as u32;
            let skip = (hash(key, SEED_SKIP) % (m - 1) + 1) as u32;
            Walk { index, slot, skip }
        })
        .collect();

    let mut table = vec![EMPTY; size as usize];
    // Which slots are claimed, one bit each: 8 KiB for M = 65537, so the probes (about
    // M ln M of them, most of the build) hit L1 instead of the 256 KiB table.
    let mut claimed = vec![0u64; (size as usize).div_ceil(64)];
    // The quotas sum to `size`, so the table is full after the last turn, and a backend taking
    // a turn always finds a free slot: its permutation visits every slot because `skip` is in
    // 1..size and `size` is prime.
    for pos in turn_order(&quotas) {
        let w = &mut walks[pos as usize];
        loop {
            let slot = w.slot;
            // slot + skip < 2 * size <= 2^33, so wrap by one subtraction without overflow.
            w.slot = if w.slot >= size - w.skip {
                w.slot - (size - w.skip)
            } else {
                w.slot + w.skip
            };
            let (word, bit) = ((slot / 64) as usize, 1u64 << (slot % 64));
            if claimed[word] & bit == 0 {
                claimed[word] |= bit;
                table[slot as usize] = w.index;
                break;
            }
        }
    }
    debug_assert!(!table.contains(&EMPTY), "quotas must sum to the table size");
    Ok(table)
}

/// Largest-remainder apportionment of `size` slots by weight, in key order (`order`). Equal
/// remainders go to the earlier key, so the result depends only on the set of backends.
fn quotas(backends: &[MaglevBackend<'_>], order: &[u32], size: u32, total: u32) -> Vec<u32> {
    let m = u64::from(size);
    let w_total = u64::from(total);
    let mut quotas = Vec::with_capacity(order.len());
    let mut remainders = Vec::with_capacity(order.len());
    let mut assigned: u64 = 0;
    for (pos, &index) in order.iter().enumerate() {
        // m * w < 2^64; the quotient is at most m, so it fits a u32.
        let share = m * u64::from(backends[index as usize].weight);
        let quota = share / w_total;
        assigned += quota;
        quotas.push(quota as u32);
        remainders.push((share % w_total, pos));
    }
    // Each remainder is below `w_total`, so fewer than `order.len()` slots are left over.
    let left = (m - assigned) as usize;
    if left > 0 {
        remainders.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        for &(_, pos) in remainders.iter().take(left) {
            quotas[pos] += 1;
        }
    }
    quotas
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_seeds_are_independent() {
        // Equal offsets and skips for every key would make all permutations collide.
        let keys: [&[u8]; 4] = [b"", b"a", b"198.18.1.11:8080", b"198.18.1.12:8080"];
        for key in keys {
            assert_ne!(hash(key, SEED_OFFSET), hash(key, SEED_SKIP));
        }
        assert_ne!(
            hash(b"198.18.1.11:8080", SEED_OFFSET),
            hash(b"198.18.1.12:8080", SEED_OFFSET)
        );
    }

    #[test]
    fn hash_is_stable() {
        // Tables must be identical on every node and across upgrades, so the hash is frozen:
        // if this fails, the hash changed and every flow would be reshuffled on upgrade.
        // The values were cross-checked with an independent Python implementation (and
        // splitmix64(0) against the published first SplitMix64 output, 0xe220a8397b1dcdaf).
        assert_eq!(splitmix64(0), 0xe220_a839_7b1d_cdaf);
        assert_eq!(
            hash(b"198.18.1.11:8080", SEED_OFFSET),
            1_923_304_714_282_744_324
        );
        assert_eq!(
            hash(b"198.18.1.11:8080", SEED_SKIP),
            13_095_827_464_378_176_971
        );
    }

    /// Every turn of every backend sorted by (virtual time, position): the schedule
    /// `turn_order` must produce, written the slow and obvious way.
    fn naive_turn_order(quotas: &[u32]) -> Vec<u32> {
        let mut turns: Vec<(u64, u64, u32)> = Vec::new();
        for (pos, &q) in (0u32..).zip(quotas) {
            for k in 0..u64::from(q) {
                turns.push((2 * k + 1, u64::from(q), pos));
            }
        }
        turns.sort_by(|a, b| {
            (u128::from(a.0) * u128::from(b.1))
                .cmp(&(u128::from(b.0) * u128::from(a.1)))
                .then(a.2.cmp(&b.2))
        });
        turns.into_iter().map(|t| t.2).collect()
    }

    #[test]
    fn turn_order_is_the_sorted_schedule() {
        let cases: [&[u32]; 7] = [
            &[1],
            &[3, 3, 2],
            &[1, 3, 3],
            &[1, 1, 3, 3, 9],
            &[0, 5, 0, 15, 45, 5],
            &[7, 6, 7, 6, 6, 7, 21, 35],
            &[2, 6, 10, 30, 1, 3, 5, 15],
        ];
        for quotas in cases {
            assert_eq!(turn_order(quotas), naive_turn_order(quotas), "{quotas:?}");
        }
    }

    proptest::proptest! {
        #[test]
        fn turn_order_matches_the_naive_schedule(
            quotas in proptest::collection::vec(0u32..40, 1..30)
        ) {
            proptest::prop_assert_eq!(turn_order(&quotas), naive_turn_order(&quotas));
        }
    }

    #[test]
    fn quotas_use_largest_remainders() {
        let backends = [
            MaglevBackend {
                key: b"a",
                weight: 1,
            },
            MaglevBackend {
                key: b"b",
                weight: 1,
            },
            MaglevBackend {
                key: b"c",
                weight: 1,
            },
        ];
        // 7 / 3: all remainders equal, so the first key in order gets the extra slot.
        assert_eq!(quotas(&backends, &[0, 1, 2], 7, 3), [3, 2, 2]);
        assert_eq!(quotas(&backends, &[2, 0, 1], 7, 3), [3, 2, 2]);
        let weighted = [
            MaglevBackend {
                key: b"a",
                weight: 1,
            },
            MaglevBackend {
                key: b"b",
                weight: 2,
            },
        ];
        // 65537 / 3 = 21845 r 2, 2 * 65537 / 3 = 43691 r 1: the leftover slot goes to "a".
        assert_eq!(quotas(&weighted, &[0, 1], 65537, 3), [21846, 43691]);
    }
}
