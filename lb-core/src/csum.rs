//! Incremental Internet-checksum updates (RFC 1624, eqn. 3: `HC' = ~(~HC + ~m + m')`).
//!
//! The XDP program rewrites addresses and ports in place; recomputing a checksum over the
//! whole packet would need a loop over the payload, which is slow and verifier-hostile. The
//! incremental form touches only the changed words.
//!
//! Byte order: every value is taken exactly as it sits in the packet, i.e. read with
//! `u16::from_ne_bytes`/`u32::from_ne_bytes` from the wire bytes. The one's-complement sum is
//! byte-order independent (RFC 1071, section 2(B)), so no swapping is needed as long as the
//! checksum field and the data are read the same way.

/// Folds a wide one's-complement sum into 16 bits with end-around carry.
#[inline(always)]
pub const fn fold(sum: u64) -> u16 {
    let sum = (sum & 0xffff_ffff) + (sum >> 32);
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// New checksum after one 16-bit word of the covered data changed from `old` to `new`.
#[inline(always)]
pub const fn replace_u16(check: u16, old: u16, new: u16) -> u16 {
    let sum = (!check) as u64 + (!old) as u64 + new as u64;
    !fold(sum)
}

/// New checksum after one 32-bit word (e.g. an IPv4 address) changed from `old` to `new`.
#[inline(always)]
pub const fn replace_u32(check: u16, old: u32, new: u32) -> u16 {
    let not_old = !old;
    let sum = (!check) as u64
        + (not_old & 0xffff) as u64
        + (not_old >> 16) as u64
        + (new & 0xffff) as u64
        + (new >> 16) as u64;
    !fold(sum)
}

/// [`replace_u16`] for a UDP checksum: 0 means "no checksum" (RFC 768) and stays 0, and a
/// computed 0 is sent as `0xffff`.
#[inline(always)]
pub const fn udp_replace_u16(check: u16, old: u16, new: u16) -> u16 {
    if check == 0 {
        return 0;
    }
    match replace_u16(check, old, new) {
        0 => 0xffff,
        c => c,
    }
}

/// [`replace_u32`] for a UDP checksum; see [`udp_replace_u16`].
#[inline(always)]
pub const fn udp_replace_u32(check: u16, old: u32, new: u32) -> u16 {
    if check == 0 {
        return 0;
    }
    match replace_u32(check, old, new) {
        0 => 0xffff,
        c => c,
    }
}

/// [`replace_u32`] over an IPv6 address (four words, as they sit in the packet).
#[inline(always)]
pub const fn replace_addr6(check: u16, old: &[u32; 4], new: &[u32; 4]) -> u16 {
    let check = replace_u32(check, old[0], new[0]);
    let check = replace_u32(check, old[1], new[1]);
    let check = replace_u32(check, old[2], new[2]);
    replace_u32(check, old[3], new[3])
}

/// [`replace_addr6`] for a UDP checksum. Over IPv6 the checksum is mandatory (RFC 8200
/// section 8.1), so a computed 0 is sent as `0xffff`; a received 0 (invalid) is left alone for
/// the receiver to drop.
#[inline(always)]
pub const fn udp_replace_addr6(check: u16, old: &[u32; 4], new: &[u32; 4]) -> u16 {
    if check == 0 {
        return 0;
    }
    match replace_addr6(check, old, new) {
        0 => 0xffff,
        c => c,
    }
}

/// Full checksum of `data` (host-side helper for tests and tools; the BPF program only ever
/// updates incrementally). Words are read in memory order, as the incremental helpers expect.
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u64 = 0;
    let mut chunks = data.chunks_exact(2);
    for pair in &mut chunks {
        sum += u16::from_ne_bytes([pair[0], pair[1]]) as u64;
    }
    if let [last] = chunks.remainder() {
        sum += u16::from_ne_bytes([*last, 0]) as u64;
    }
    !fold(sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incremental_matches_full_recompute() {
        // An IPv4 header (RFC 1071 style example) with a changed destination address.
        let mut header: [u8; 20] = [
            0x45, 0x00, 0x00, 0x3c, 0x1c, 0x46, 0x40, 0x00, 0x40, 0x06, 0x00, 0x00, 0xac, 0x10,
            0x0a, 0x63, 0xac, 0x10, 0x0a, 0x0c,
        ];
        let check = checksum(&header);
        header[10..12].copy_from_slice(&check.to_ne_bytes());
        assert_eq!(checksum(&header), 0);

        let old = u32::from_ne_bytes([header[16], header[17], header[18], header[19]]);
        let new = u32::from_ne_bytes([198, 18, 1, 11]);
        header[16..20].copy_from_slice(&new.to_ne_bytes());
        let updated = replace_u32(check, old, new);
        header[10..12].copy_from_slice(&updated.to_ne_bytes());
        assert_eq!(
            checksum(&header),
            0,
            "incrementally updated header must verify"
        );
    }

    #[test]
    fn udp_zero_checksum_stays_zero() {
        assert_eq!(udp_replace_u16(0, 0x1234, 0x5678), 0);
        assert_eq!(udp_replace_u32(0, 0x1234_5678, 0x9abc_def0), 0);
    }
}
