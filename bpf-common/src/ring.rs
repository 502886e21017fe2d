//! Ring-buffer wake-up arithmetic, shared by the kernel programs and tested here.

/// Whether a record of `len` bytes, written when `waiting` bytes already wait in the ring,
/// takes what waits past another multiple of `step`: the writer then wakes the reader, and
/// otherwise leaves it to the reader's timer. A few wake-ups per ring's worth of data however
/// fast records come, where waking on every record past one mark would wake on each of them
/// once the reader falls behind. `step` 0 never wakes.
#[inline(always)]
pub const fn crosses_wake_mark(waiting: u64, len: u64, step: u64) -> bool {
    step != 0 && (waiting + len) / step > waiting / step
}

#[cfg(test)]
mod tests {
    use super::crosses_wake_mark;

    #[test]
    fn a_record_wakes_the_reader_only_when_it_crosses_a_mark() {
        // Below the first mark, and ending exactly before it.
        assert!(!crosses_wake_mark(0, 80, 1000));
        assert!(!crosses_wake_mark(900, 99, 1000));
        // Reaching the mark, and passing it.
        assert!(crosses_wake_mark(900, 100, 1000));
        assert!(crosses_wake_mark(990, 80, 1000));
        // The record after the one that crossed does not wake again.
        assert!(!crosses_wake_mark(1070, 80, 1000));
        // The next mark wakes again; so does a record spanning several.
        assert!(crosses_wake_mark(1990, 80, 1000));
        assert!(crosses_wake_mark(10, 5000, 1000));
    }

    #[test]
    fn a_flood_wakes_once_per_step_not_once_per_record() {
        let (step, len) = (64 * 1024, 80);
        let mut waiting = 0;
        let mut wakes = 0;
        for _ in 0..100_000 {
            if crosses_wake_mark(waiting, len, step) {
                wakes += 1;
            }
            waiting += len;
        }
        assert_eq!(wakes, (100_000 * len / step) as usize);
    }

    #[test]
    fn step_zero_never_wakes() {
        assert!(!crosses_wake_mark(0, 80, 0));
        assert!(!crosses_wake_mark(u64::MAX / 2, 80, 0));
    }
}
