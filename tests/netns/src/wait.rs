//! Waiting for what the daemon does asynchronously, bounded.
use std::time::{Duration, Instant};

/// Polls `f` every 100 ms until it answers `Some`; panics naming `what` after `within`.
pub fn eventually<T>(what: &str, within: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
