//! BPF plumbing shared by every controller: loading with the pinned-map layout check and pin
//! directories ([`pins`]), one adopt-or-attach for pinned links ([`links`]), map operations on
//! raw descriptors with the batch commands ([`maps`]), and ring buffer to bus ([`ringbuf`]).
pub mod links;
pub mod maps;
pub mod pins;
pub mod ringbuf;

/// How many times a program load is tried when the verifier gives up with EAGAIN.
const LOAD_ATTEMPTS: u32 = 5;

/// Runs `load` (a program's `load`), again when it fails with EAGAIN, at most
/// [`LOAD_ATTEMPTS`] times in all. The verifier stops with EAGAIN when a signal is pending for
/// the loading thread, e.g. a child's SIGCHLD once a handler is installed (tokio's), which a
/// long verification (`xdp_lb` with its log) can meet. libbpf retries the same way.
pub fn load_retrying<T>(
    mut load: impl FnMut() -> std::result::Result<T, aya::programs::ProgramError>,
) -> std::result::Result<T, aya::programs::ProgramError> {
    let mut attempt = 1;
    loop {
        match load() {
            Err(aya::programs::ProgramError::LoadError { io_error, .. })
                if io_error.raw_os_error() == Some(libc::EAGAIN) && attempt < LOAD_ATTEMPTS =>
            {
                attempt += 1;
            }
            other => return other,
        }
    }
}
