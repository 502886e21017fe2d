//! Verdicts: what a program returns and the reason it counts (`bpf_common::reason`,
//! `bpf_common::policy::reason`). Every path of a program ends in one.

/// An action (`A`: the program type's return value) and the reason it is counted under.
#[derive(Clone, Copy)]
pub struct Verdict<A> {
    pub action: A,
    pub reason: u32,
}

/// XDP verdicts: actions are `xdp_action` values.
pub mod xdp {
    use aya_ebpf::bindings::xdp_action;

    pub type Verdict = super::Verdict<u32>;

    #[inline(always)]
    pub const fn pass(reason: u32) -> Verdict {
        Verdict {
            action: xdp_action::XDP_PASS,
            reason,
        }
    }

    #[inline(always)]
    pub const fn drop(reason: u32) -> Verdict {
        Verdict {
            action: xdp_action::XDP_DROP,
            reason,
        }
    }
}

/// TCX verdicts.
pub mod tc {
    /// Let the packet continue (next TCX program, then the stack).
    pub const TCX_NEXT: i32 = -1;
    /// Drop the packet.
    pub const TCX_DROP: i32 = 2;

    pub type Verdict = super::Verdict<i32>;

    #[inline(always)]
    pub const fn pass(reason: u32) -> Verdict {
        Verdict {
            action: TCX_NEXT,
            reason,
        }
    }

    #[inline(always)]
    pub const fn drop(reason: u32) -> Verdict {
        Verdict {
            action: TCX_DROP,
            reason,
        }
    }
}
