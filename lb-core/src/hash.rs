//! Flow hashing for backend selection and source-port allocation.
//!
//! The hash must be identical in the XDP program and on the host (tests and tools predict which
//! backend a flow lands on), cheap in BPF (no loops with unknown bounds, no tables), and mix all
//! of the 5-tuple. This is MurmurHash3's 32-bit block and finalisation steps applied to a fixed
//! number of words.

const C1: u32 = 0xcc9e_2d51;
const C2: u32 = 0x1b87_3593;

#[inline(always)]
const fn mix(hash: u32, word: u32) -> u32 {
    let k = word.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
    (hash ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

#[inline(always)]
const fn finalize(mut hash: u32) -> u32 {
    hash ^= hash >> 16;
    hash = hash.wrapping_mul(0x85eb_ca6b);
    hash ^= hash >> 13;
    hash = hash.wrapping_mul(0xc2b2_ae35);
    hash ^ (hash >> 16)
}

/// Hash of a flow's 5-tuple. Addresses are [`bpf_common::Addr16`] words in network order and
/// ports in network order, as they sit in the packet; `seed` separates independent uses.
#[inline(always)]
pub const fn flow_hash(
    src: &[u32; 4],
    dst: &[u32; 4],
    src_port_be: u16,
    dst_port_be: u16,
    proto: u8,
    seed: u32,
) -> u32 {
    let mut hash = seed ^ (proto as u32);
    hash = mix(hash, src[0]);
    hash = mix(hash, src[1]);
    hash = mix(hash, src[2]);
    hash = mix(hash, src[3]);
    hash = mix(hash, dst[0]);
    hash = mix(hash, dst[1]);
    hash = mix(hash, dst[2]);
    hash = mix(hash, dst[3]);
    hash = mix(hash, ((src_port_be as u32) << 16) | dst_port_be as u32);
    finalize(hash ^ 37)
}

/// The `n`-th hash derived from a flow's hash `hash`: independent-looking values for retries
/// (full-NAT port allocation's later attempts) without re-hashing the whole 5-tuple each time,
/// which in BPF would also keep every tuple word alive across the retry loop.
#[inline(always)]
pub const fn derive(hash: u32, n: u32) -> u32 {
    finalize(mix(hash, n))
}

/// Hash of a socket cookie, for socket-level load balancing: at `connect()` the source port
/// is not chosen yet, so the socket's cookie (unique per socket, for its life) stands in for
/// the 5-tuple. Mixed with the service's VIP key so that one socket spreads independently over
/// different services.
#[inline(always)]
pub const fn cookie_hash(cookie: u64, vip: u32, vip_port_be: u16, proto: u8, seed: u32) -> u32 {
    let mut hash = seed ^ (proto as u32);
    hash = mix(hash, cookie as u32);
    hash = mix(hash, (cookie >> 32) as u32);
    hash = mix(hash, vip);
    hash = mix(hash, vip_port_be as u32);
    finalize(hash ^ 20)
}

/// Seed of the Maglev bucket hash.
pub const SEED_MAGLEV: u32 = 0x4d61_676c;
/// Seed of the full-NAT source-port hash.
pub const SEED_NAT_PORT: u32 = 0x4e41_5450;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_hashes_differ_from_each_other_and_from_the_base() {
        let base = flow_hash(
            &[0x0100_12c6, 0, 0, 0],
            &[0x0164_12c6, 0, 0, 0],
            1000,
            80,
            6,
            1,
        );
        let mut seen = [base; 9];
        for n in 1..9u32 {
            seen[n as usize] = derive(base, n);
        }
        for i in 0..seen.len() {
            for j in i + 1..seen.len() {
                assert_ne!(seen[i], seen[j], "{i} {j}");
            }
        }
        assert_ne!(derive(base, 1), derive(base ^ 1, 1));
    }

    #[test]
    fn every_field_changes_the_hash() {
        let src = [0x0100_12c6, 0, 0, 0];
        let dst = [0x0164_12c6, 0, 0, 0];
        let base = flow_hash(&src, &dst, 1000, 80, 6, SEED_MAGLEV);
        assert_ne!(
            base,
            flow_hash(&[0x0200_12c6, 0, 0, 0], &dst, 1000, 80, 6, SEED_MAGLEV)
        );
        assert_ne!(
            base,
            flow_hash(&src, &[0x0264_12c6, 0, 0, 0], 1000, 80, 6, SEED_MAGLEV)
        );
        assert_ne!(base, flow_hash(&src, &dst, 1001, 80, 6, SEED_MAGLEV));
        assert_ne!(base, flow_hash(&src, &dst, 1000, 81, 6, SEED_MAGLEV));
        assert_ne!(base, flow_hash(&src, &dst, 1000, 80, 17, SEED_MAGLEV));
        assert_ne!(base, flow_hash(&src, &dst, 1000, 80, 6, SEED_NAT_PORT));
    }

    #[test]
    fn socket_cookies_spread_evenly_and_every_field_counts() {
        // Cookies are consecutive numbers: 30,000 of them into 3 buckets, each within 3%.
        let mut buckets = [0u32; 3];
        for cookie in 4_096u64..34_096 {
            let h = cookie_hash(cookie, 0x0164_12c6, 80u16.to_be(), 6, SEED_MAGLEV);
            buckets[(h % 3) as usize] += 1;
        }
        for count in buckets {
            assert!(
                (9_700..=10_300).contains(&count),
                "uneven spread: {buckets:?}"
            );
        }
        let base = cookie_hash(1 << 40, 1, 80, 6, SEED_MAGLEV);
        assert_ne!(
            base,
            cookie_hash(1 << 41, 1, 80, 6, SEED_MAGLEV),
            "the cookie's high half"
        );
        assert_ne!(base, cookie_hash(1 << 40, 2, 80, 6, SEED_MAGLEV));
        assert_ne!(base, cookie_hash(1 << 40, 1, 81, 6, SEED_MAGLEV));
        assert_ne!(base, cookie_hash(1 << 40, 1, 80, 17, SEED_MAGLEV));
    }

    #[test]
    fn source_ports_spread_evenly_over_buckets() {
        // 30,000 client ports into 3 buckets: each within 3% of a third.
        let mut buckets = [0u32; 3];
        for port in 20_000u16..50_000 {
            let h = flow_hash(
                &[0x0100_12c6, 0, 0, 0],
                &[0x0164_12c6, 0, 0, 0],
                port.to_be(),
                80u16.to_be(),
                6,
                SEED_MAGLEV,
            );
            buckets[(h % 3) as usize] += 1;
        }
        for count in buckets {
            assert!(
                (9_700..=10_300).contains(&count),
                "uneven spread: {buckets:?}"
            );
        }
    }
}
