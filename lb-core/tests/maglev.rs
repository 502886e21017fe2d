//! Behaviour of the Maglev table builder: weight precision, disruption, determinism, errors.
#![cfg(feature = "alloc")]

use lb_core::maglev::{MaglevBackend, MaglevError, build_table, is_prime};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

const M: u32 = 65537;

fn keys(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("198.18.{}.{}:8080", i / 250, i % 250 + 1))
        .collect()
}

fn backends<'a>(keys: &'a [String], weights: &[u32]) -> Vec<MaglevBackend<'a>> {
    assert_eq!(keys.len(), weights.len());
    keys.iter()
        .zip(weights)
        .map(|(k, &weight)| MaglevBackend {
            key: k.as_bytes(),
            weight,
        })
        .collect()
}

/// The table with indices replaced by keys, so tables built from different backend lists can
/// be compared by backend identity.
fn owners<'a>(list: &[MaglevBackend<'a>], size: u32) -> Vec<&'a [u8]> {
    let table = build_table(list, size).expect("valid input");
    assert_eq!(table.len(), size as usize);
    table.iter().map(|&i| list[i as usize].key).collect()
}

fn counts(table: &[u32], n: usize) -> Vec<u64> {
    let mut c = vec![0u64; n];
    for &i in table {
        c[i as usize] += 1;
    }
    c
}

/// Largest |share_i - w_i/W| / (w_i/W) over all backends.
fn max_relative_deviation(table: &[u32], weights: &[u32]) -> f64 {
    let total: f64 = weights.iter().map(|&w| f64::from(w)).sum();
    let c = counts(table, weights.len());
    c.iter()
        .zip(weights)
        .map(|(&n, &w)| {
            let want = f64::from(w) / total;
            let got = n as f64 / table.len() as f64;
            (got - want).abs() / want
        })
        .fold(0.0, f64::max)
}

fn changed(a: &[&[u8]], b: &[&[u8]]) -> usize {
    a.iter().zip(b).filter(|(x, y)| x != y).count()
}

#[test]
fn mixed_weights_get_their_share_within_one_percent() {
    let keys = keys(100);
    let mut worst: f64 = 0.0;
    for seed in [1u64, 2, 3, 4, 5] {
        let mut rng = StdRng::seed_from_u64(seed);
        let weights: Vec<u32> = (0..100).map(|_| rng.gen_range(1..=10)).collect();
        let table = build_table(&backends(&keys, &weights), M).expect("valid input");
        let dev = max_relative_deviation(&table, &weights);
        println!(
            "seed {seed}: max relative share deviation {:.5}%",
            dev * 100.0
        );
        assert!(dev <= 0.01, "seed {seed}: deviation {dev}");
        worst = worst.max(dev);
    }
    println!("worst max relative share deviation {:.5}%", worst * 100.0);
}

#[test]
fn counts_are_floor_or_ceil_of_the_exact_share() {
    // 1000 backends with wide weights: shares are too small for a 1% bound, but every count
    // must still be the exact share rounded one way or the other.
    let keys = keys(1000);
    let mut rng = StdRng::seed_from_u64(42);
    let weights: Vec<u32> = (0..1000).map(|_| rng.gen_range(1..=100)).collect();
    let table = build_table(&backends(&keys, &weights), M).expect("valid input");
    let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
    for (i, (&n, &w)) in counts(&table, 1000).iter().zip(&weights).enumerate() {
        let exact = u64::from(M) * u64::from(w);
        let floor = exact / total;
        let ceil = exact.div_ceil(total);
        assert!(
            n == floor || n == ceil,
            "backend {i}: {n} not in [{floor}, {ceil}]"
        );
    }
}

#[test]
fn weights_one_and_two() {
    let keys = keys(2);
    let table = build_table(&backends(&keys, &[1, 2]), M).expect("valid input");
    // 65537/3 = 21845.67 and 43691.33: the larger remainder gets the leftover slot.
    assert_eq!(counts(&table, 2), [21846, 43691]);
}

#[test]
fn equal_weights_split_evenly() {
    for n in [1usize, 2, 7, 10, 100, 1000] {
        let keys = keys(n);
        let table = build_table(&backends(&keys, &vec![3; n]), M).expect("valid input");
        let c = counts(&table, n);
        let (min, max) = (c.iter().min().copied(), c.iter().max().copied());
        let floor = u64::from(M) / n as u64;
        assert_eq!(min, Some(floor), "n = {n}");
        assert!(max <= Some(floor + 1), "n = {n}");
    }
}

#[test]
fn removing_a_backend_disrupts_little() {
    for n in [10usize, 100] {
        let keys = keys(n);
        let full = backends(&keys, &vec![1; n]);
        let before = owners(&full, M);
        for removed in [0, n / 2, n - 1] {
            let mut rest = full.clone();
            rest.remove(removed);
            let after = owners(&rest, M);
            let moved = changed(&before, &after);
            let fraction = moved as f64 / f64::from(M);
            let bound = 1.0 / n as f64 + 0.02;
            println!(
                "remove 1 of {n} (#{removed}): {:.3}% of entries changed (1/N = {:.3}%)",
                fraction * 100.0,
                100.0 / n as f64
            );
            assert!(fraction <= bound, "n = {n}: {fraction} > {bound}");
            // Every entry of the removed backend must have moved, and no entry may name it.
            let gone = full[removed].key;
            assert!(after.iter().all(|&k| k != gone));
        }
    }
}

#[test]
fn adding_a_backend_disrupts_little() {
    for n in [10usize, 100] {
        let keys = keys(n + 1);
        let all = backends(&keys, &vec![1; n + 1]);
        let before = owners(&all[..n], M);
        let after = owners(&all, M);
        let moved = changed(&before, &after);
        let fraction = moved as f64 / f64::from(M);
        let bound = 1.0 / (n + 1) as f64 + 0.02;
        println!(
            "add 1 to {n}: {:.3}% of entries changed (1/(N+1) = {:.3}%)",
            fraction * 100.0,
            100.0 / (n + 1) as f64
        );
        assert!(fraction <= bound, "n = {n}: {fraction} > {bound}");
    }
}

#[test]
fn removing_a_weighted_backend_disrupts_little() {
    // Not a stated requirement, but weights must not break consistency: removing one backend
    // should move little more than that backend's own share.
    let keys = keys(100);
    let mut rng = StdRng::seed_from_u64(7);
    let weights: Vec<u32> = (0..100).map(|_| rng.gen_range(1..=10)).collect();
    let full = backends(&keys, &weights);
    let before = owners(&full, M);
    let total: u32 = weights.iter().sum();
    for removed in [0usize, 33, 99] {
        let mut rest = full.clone();
        rest.remove(removed);
        let after = owners(&rest, M);
        let fraction = changed(&before, &after) as f64 / f64::from(M);
        let share = f64::from(weights[removed]) / f64::from(total);
        println!(
            "remove weighted #{removed} (share {:.3}%): {:.3}% changed",
            share * 100.0,
            fraction * 100.0
        );
        assert!(fraction <= share + 0.02, "{fraction} > {share} + 2%");
    }
}

#[test]
fn result_does_not_depend_on_backend_order() {
    let keys = keys(100);
    let mut rng = StdRng::seed_from_u64(11);
    let weights: Vec<u32> = (0..100).map(|_| rng.gen_range(1..=10)).collect();
    let list = backends(&keys, &weights);
    let reference = owners(&list, M);
    let mut reversed = list.clone();
    reversed.reverse();
    assert_eq!(owners(&reversed, M), reference);
    for _ in 0..3 {
        let mut shuffled = list.clone();
        shuffled.shuffle(&mut rng);
        assert_eq!(owners(&shuffled, M), reference);
    }
}

#[test]
fn indices_refer_to_the_callers_order() {
    let keys = keys(3);
    let list = backends(&keys, &[1, 1, 1]);
    let reversed: Vec<_> = list.iter().rev().copied().collect();
    let a = build_table(&list, 7).expect("valid input");
    let b = build_table(&reversed, 7).expect("valid input");
    for (&x, &y) in a.iter().zip(&b) {
        assert_eq!(x, 2 - y);
    }
}

#[test]
fn small_table_is_frozen() {
    // Computed by an independent Python implementation of the same algorithm. If this
    // changes, nodes running different versions would disagree and upgrades would reshuffle
    // every flow.
    let list = [
        MaglevBackend {
            key: b"198.18.1.13:80",
            weight: 3,
        },
        MaglevBackend {
            key: b"198.18.1.11:80",
            weight: 1,
        },
        MaglevBackend {
            key: b"198.18.1.12:80",
            weight: 2,
        },
    ];
    assert_eq!(
        build_table(&list, 13).expect("valid input"),
        [0, 0, 0, 2, 2, 2, 0, 1, 0, 1, 2, 0, 0]
    );
}

#[test]
fn single_backend_fills_everything() {
    let list = [MaglevBackend {
        key: b"198.18.1.11:8080",
        weight: 5,
    }];
    for size in [3, 13, M] {
        let table = build_table(&list, size).expect("valid input");
        assert_eq!(table.len(), size as usize);
        assert!(table.iter().all(|&i| i == 0));
    }
}

#[test]
fn as_many_backends_as_slots() {
    let keys = keys(13);
    let table = build_table(&backends(&keys, &[1; 13]), 13).expect("valid input");
    let mut sorted = table.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..13).collect::<Vec<u32>>());
}

#[test]
fn errors() {
    let keys = keys(5);
    let ok = backends(&keys, &[1; 5]);
    assert_eq!(build_table(&[], M), Err(MaglevError::NoBackends));
    for size in [0, 1, 2, 4, 9, 65535, 65536, u32::MAX] {
        assert_eq!(
            build_table(&ok, size),
            Err(MaglevError::InvalidSize { size }),
            "size {size}"
        );
    }
    assert_eq!(
        build_table(&ok, 3),
        Err(MaglevError::TooManyBackends {
            size: 3,
            backends: 5
        })
    );
    assert!(build_table(&ok, 5).is_ok());
    assert_eq!(
        build_table(&backends(&keys, &[1, 1, 0, 1, 1]), M),
        Err(MaglevError::ZeroWeight { index: 2 })
    );
    assert_eq!(
        build_table(
            &backends(&keys[..2], &[u32::MAX / 2 + 1, u32::MAX / 2 + 1]),
            M
        ),
        Err(MaglevError::WeightOverflow)
    );
    // A total of exactly u32::MAX is still fine.
    assert!(build_table(&backends(&keys[..2], &[u32::MAX - 1, 1]), M).is_ok());
    let dup = [
        MaglevBackend {
            key: b"a",
            weight: 1,
        },
        MaglevBackend {
            key: b"b",
            weight: 1,
        },
        MaglevBackend {
            key: b"a",
            weight: 2,
        },
    ];
    assert_eq!(
        build_table(&dup, 7),
        Err(MaglevError::DuplicateKey {
            first: 0,
            second: 2
        })
    );
    assert_eq!(
        MaglevError::InvalidSize { size: 4 }.to_string(),
        "maglev table size 4 is not a prime of at least 3"
    );
}

#[test]
fn primes() {
    // Against a sieve for small numbers.
    let limit = 20_000usize;
    let mut sieve = vec![true; limit];
    sieve[0] = false;
    sieve[1] = false;
    for i in 2..limit {
        if sieve[i] {
            for j in (i * i..limit).step_by(i) {
                sieve[j] = false;
            }
        }
    }
    for (n, &prime) in sieve.iter().enumerate() {
        assert_eq!(is_prime(u32::try_from(n).expect("small")), prime, "{n}");
    }
    for p in [65537u32, 65521, 1_000_003, 4_294_967_291] {
        assert!(is_prime(p), "{p}");
    }
    // 65537 * 65521 > u32::MAX, so use squares and products of primes that fit.
    for c in [
        65535u32,
        65536,
        4_294_967_295,
        65521 * 65519,
        4_294_967_291 - 2,
    ] {
        assert!(!is_prime(c), "{c}");
    }
}

/// FNV-1a over the table's entries, so a whole table can be pinned in one number.
fn digest(table: &[u32]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &i in table {
        for b in i.to_le_bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// Weights from a fixed linear congruential generator: unlike `StdRng`, its sequence can never
/// change under a dependency upgrade, and these tables are pinned.
fn lcg_weights(n: usize, seed: u64, max: u32) -> Vec<u32> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (x >> 33) as u32 % max + 1
        })
        .collect()
}

#[test]
fn tables_are_pinned() {
    // Every node must build the same table from the same backends, before and after an
    // upgrade, or flows move. These digests were taken from the first (binary-heap) builder;
    // a faster builder must reproduce them bit for bit. The cases cover equal weights (two
    // quota groups), weights with many distinct quotas, quotas that tie in virtual time across
    // groups (weights 1 and 3), and tables smaller than the total weight.
    let cases: Vec<(&str, usize, Vec<u32>, u32)> = vec![
        ("1 backend", 1, vec![1], M),
        ("2 equal", 2, vec![1; 2], M),
        ("3 equal", 3, vec![1; 3], M),
        ("10 equal", 10, vec![1; 10], M),
        ("100 equal", 100, vec![1; 100], M),
        ("1000 equal", 1000, vec![1; 1000], M),
        ("1 and 3", 2, vec![1, 3], M),
        ("1,3,9,27", 4, vec![1, 3, 9, 27], 251),
        ("100 weighted", 100, lcg_weights(100, 7, 10), M),
        ("1000 weighted", 1000, lcg_weights(1000, 11, 100), M),
        ("50 heavy in 251", 50, lcg_weights(50, 13, 1000), 251),
        ("13 in 13", 13, vec![1; 13], 13),
        ("ties 1,3,3 in 7", 3, vec![1, 3, 3], 7),
        ("ties 1,1,3,3,9 in 17", 5, vec![1, 1, 3, 3, 9], 17),
    ];
    let mut got = Vec::new();
    for (name, n, weights, size) in &cases {
        let k = keys(*n);
        let table = build_table(&backends(&k, weights), *size).expect("valid input");
        got.push(format!("{name}: {:#018x}", digest(&table)));
    }
    let want = [
        "1 backend: 0x4ebe9b86711e13f5",
        "2 equal: 0x6eb7b5760b6249d5",
        "3 equal: 0x3581b6568d985f07",
        "10 equal: 0xe3566ac0476e664c",
        "100 equal: 0x5045f865ad77a72c",
        "1000 equal: 0xd7a2ff69e78920e9",
        "1 and 3: 0x1f215a8e32914914",
        "1,3,9,27: 0x4a658bb72e6f8295",
        "100 weighted: 0xe6063b92674b4c3b",
        "1000 weighted: 0xae27408b696ce920",
        "50 heavy in 251: 0x2b20a150aa0a3078",
        "13 in 13: 0x3f63f1e64ab8da79",
        "ties 1,3,3 in 7: 0x4dfdea8096beda66",
        "ties 1,1,3,3,9 in 17: 0x40d02044ba999ea1",
    ];
    assert_eq!(got, want);
}
