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
