//! Frame access for the verifier.
//!
//! Every access reloads `data` and `data_end` from the context with volatile reads and checks
//! `data + off + N <= data_end` right before handing out the pointer. Without the volatile
//! reloads LLVM proves many of these checks redundant from earlier *scalar* comparisons (for
//! example `l4_off + 20 <= ip_end` together with `data + ip_end <= data_end`) and deletes them;
//! the verifier only tracks packet ranges through pointer comparisons and then rejects the
//! load ("invalid access to packet").
//!
//! Offsets are bounded by `lb_core::parse::MAX_FRAME`: XDP frames without multi-buffer fit in
//! one page, and an explicit bound keeps the verifier's packet-pointer range below its 64 KiB
//! limit when it adds a variable offset (the IPv4 total length) to the packet pointer.

use aya_ebpf::{
    bindings::{__sk_buff, xdp_md},
    programs::{TcContext, XdpContext},
};
use lb_core::parse::{self, Frame};

/// An XDP frame: one linear buffer, `data..data_end`.
pub struct XdpFrame {
    ctx: *mut xdp_md,
}

impl XdpFrame {
    #[inline(always)]
    pub fn new(ctx: &XdpContext) -> Self {
        Self { ctx: ctx.ctx }
    }

    /// `(data, data_end)`, freshly read.
    #[inline(always)]
    pub fn bounds(&self) -> (usize, usize) {
        // SAFETY: `ctx` is the program's context pointer for the whole invocation.
        unsafe {
            (
                core::ptr::read_volatile(&(*self.ctx).data) as usize,
                core::ptr::read_volatile(&(*self.ctx).data_end) as usize,
            )
        }
    }
}

impl Frame for XdpFrame {
    #[inline(always)]
    fn fits(&self, len: usize) -> bool {
        let (start, end) = self.bounds();
        parse::span_fits(start, end, len)
    }

    #[inline(always)]
    fn at<const N: usize>(&self, off: usize) -> Option<*mut [u8; N]> {
        let (start, end) = self.bounds();
        parse::span_at::<N>(start, end, off).map(|ptr| ptr as *mut [u8; N])
    }
}

/// A socket buffer at TCX: the linear area `data..data_end` is what can be read directly; the
/// packet itself may be longer (paged fragments).
pub struct TcFrame {
    skb: *mut __sk_buff,
}

impl TcFrame {
    #[inline(always)]
    pub fn new(ctx: &TcContext) -> Self {
        Self { skb: ctx.skb.skb }
    }

    /// `(data, data_end)` of the linear area, freshly read.
    #[inline(always)]
    pub fn bounds(&self) -> (usize, usize) {
        // SAFETY: `skb` is the program's context pointer for the whole invocation.
        unsafe {
            (
                core::ptr::read_volatile(&(*self.skb).data) as usize,
                core::ptr::read_volatile(&(*self.skb).data_end) as usize,
            )
        }
    }
}

impl Frame for TcFrame {
    /// Against the packet's real length (`skb->len`, L2 header included at TCX), not the
    /// linear area: with scatter-gather or GRO the payload sits in page fragments, and judging
    /// the IP total length against `data_end` dropped every such packet as malformed.
    #[inline(always)]
    fn fits(&self, len: usize) -> bool {
        // SAFETY: `skb` is the program's context pointer for the whole invocation.
        let skb_len = unsafe { core::ptr::read_volatile(&(*self.skb).len) } as usize;
        len <= skb_len
    }

    #[inline(always)]
    fn at<const N: usize>(&self, off: usize) -> Option<*mut [u8; N]> {
        let (start, end) = self.bounds();
        parse::span_at::<N>(start, end, off).map(|ptr| ptr as *mut [u8; N])
    }
}

/// Reads a 16-bit field as it sits in the packet.
#[inline(always)]
pub fn load16<F: Frame>(frame: &F, off: usize) -> Option<u16> {
    let ptr = frame.at::<2>(off)?;
    // SAFETY: bounds-checked by `at`; `[u8; 2]` has alignment 1.
    Some(u16::from_ne_bytes(unsafe { *ptr }))
}

/// Writes a 16-bit field as it sits in the packet.
#[inline(always)]
pub fn store16<F: Frame>(frame: &F, off: usize, value: u16) -> Option<()> {
    let ptr = frame.at::<2>(off)?;
    // SAFETY: bounds-checked by `at`; `[u8; 2]` has alignment 1.
    unsafe { *ptr = value.to_ne_bytes() };
    Some(())
}

/// Writes a 32-bit field as it sits in the packet.
#[inline(always)]
pub fn store32<F: Frame>(frame: &F, off: usize, value: u32) -> Option<()> {
    let ptr = frame.at::<4>(off)?;
    // SAFETY: bounds-checked by `at`; `[u8; 4]` has alignment 1.
    unsafe { *ptr = value.to_ne_bytes() };
    Some(())
}

/// Writes an IPv6 header's source and destination addresses (four words each, as they sit in
/// the packet), which lie back to back from `off`: one bounds check for both.
#[inline(always)]
pub fn store_addrs6<F: Frame>(frame: &F, off: usize, src: &[u32; 4], dst: &[u32; 4]) -> Option<()> {
    let ptr = frame.at::<32>(off)?;
    let mut bytes = [0u8; 32];
    let mut i = 0;
    while i < 8 {
        let word = if i < 4 { src[i] } else { dst[i - 4] }.to_ne_bytes();
        bytes[i * 4] = word[0];
        bytes[i * 4 + 1] = word[1];
        bytes[i * 4 + 2] = word[2];
        bytes[i * 4 + 3] = word[3];
        i += 1;
    }
    // SAFETY: bounds-checked by `at`; `[u8; 32]` has alignment 1.
    unsafe { *ptr = bytes };
    Some(())
}
