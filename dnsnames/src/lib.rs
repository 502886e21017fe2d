//! DNS responses seen on the wire turned into learned names.
//!
//! A BPF program copies DNS responses (UDP or TCP from source port 53) to user space as whole
//! Ethernet frames, possibly cut at a snap length. This crate takes those frames apart
//! ([`packet`]), reassembles DNS over TCP ([`tcp`]), decodes each message record by record and
//! keeps only what the question explains ([`wire`]), and holds what was learned in a bounded
//! store keyed by (client, address) ([`store`]).
//!
//! Nothing here is shared between threads: the daemon wraps the store and the reassembler in a
//! mutex itself. Times are nanoseconds of a monotonic clock the caller passes in.

pub mod packet;
pub mod store;
pub mod tcp;
pub mod wire;

pub use packet::{DnsPacket, PACKET_REASONS, PacketError, Transport, dns_packet};
pub use store::{Entry, Inserted, NameStore, Names, StoreConfig, StoreStats};
pub use tcp::{Reassembler, TcpStats};
pub use wire::{Decoded, Learned, Section, WIRE_REASONS, WireError, decode_response, tcp_messages};
