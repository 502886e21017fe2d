//! Load-time configuration: `.rodata` globals the daemon sets through
//! `EbpfLoader::set_global` (names are ABI). Read them through `bpf_lib::global`, so the compiler
//! cannot fold in the defaults.

use bpf_common::defaults;

#[unsafe(no_mangle)]
pub(crate) static MAGLEV_SIZE: u32 = defaults::MAGLEV_SIZE;
#[unsafe(no_mangle)]
pub(crate) static NAT_PORT_MIN: u16 = defaults::NAT_PORT_MIN;
#[unsafe(no_mangle)]
pub(crate) static NAT_PORT_MAX: u16 = defaults::NAT_PORT_MAX;
#[unsafe(no_mangle)]
pub(crate) static FIB_CACHE_NS: u64 = defaults::FIB_CACHE_NS;
/// Source ports a new full-NAT flow tries before it is dropped as `nat_ports_exhausted`.
#[unsafe(no_mangle)]
pub(crate) static NAT_PORT_TRIES: u32 = 8;
/// New flows per second per CPU above which DSR TCP SYNs make no flow entry; 0: never (see
/// `lb_core::flood`).
#[unsafe(no_mangle)]
pub(crate) static SYN_FLOOD_RATE: u64 = defaults::SYN_FLOOD_RATE;
