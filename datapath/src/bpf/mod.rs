//! BPF plumbing shared by every controller: loading with the pinned-map layout check and pin
//! directories ([`pins`]), one adopt-or-attach for pinned links ([`links`]), map operations on
//! raw descriptors with the batch commands ([`maps`]), and ring buffer to bus ([`ringbuf`]).
pub mod links;
pub mod maps;
pub mod pins;
pub mod ringbuf;
