//! A BPF ring buffer drained onto a bus topic.
use std::{sync::Arc, time::Duration};

use aya::maps::{MapData, RingBuf};
use tracing::warn;

use crate::{Error, Result, bus::Topic, controller::Cancel};

/// Reads up to `max_batch` records of `ring`, each handed to `each` with the batch it may add
/// events to; answers the batch and whether the ring is empty now.
fn read_records<E>(
    ring: &mut RingBuf<MapData>,
    max_batch: usize,
    each: &mut impl FnMut(&[u8], &mut Vec<E>),
) -> (Vec<E>, bool) {
    let mut batch = Vec::new();
    for _ in 0..max_batch {
        let Some(item) = ring.next() else {
            return (batch, true);
        };
        each(&item, &mut batch);
    }
    (batch, false)
}

/// Like [`drain`], for records of any length: `each` turns one record into any number of
/// events (pushed onto the batch it is given).
pub async fn drain_records<E: Clone + Send + Sync + 'static>(
    ring: RingBuf<MapData>,
    topic: Arc<Topic<E>>,
    max_batch: usize,
    tick: Option<Duration>,
    mut cancel: Cancel,
    mut each: impl FnMut(&[u8], &mut Vec<E>) + Send,
) -> Result<()> {
    // SAFETY: the ring buffer owns its descriptor and moves into the AsyncFd, which
    // deregisters it before dropping it.
    let mut fd = unsafe { tokio::io::unix::AsyncFd::register(ring) }
        .map_err(|e| Error::io("poll the ring buffer", e.into_parts().1))?;
    loop {
        tokio::select! {
            ready = fd.readable_mut() => {
                let mut guard = ready.map_err(|e| Error::io("ring buffer failed", e))?;
                let (batch, drained) = read_records(guard.get_inner_mut(), max_batch, &mut each);
                topic.publish_batch(batch);
                if drained {
                    guard.clear_ready();
                } else {
                    tokio::task::yield_now().await;
                }
            }
            _ = tokio::time::sleep(tick.unwrap_or(Duration::MAX)), if tick.is_some() => {
                let (batch, _) = read_records(fd.get_mut(), max_batch, &mut each);
                topic.publish_batch(batch);
            }
            _ = cancel.cancelled() => return Ok(()),
        }
    }
}

/// Reads `ring` until `cancel`, turning each record of at least `size_of::<R>()` bytes into an
/// event with `convert` and publishing them on `topic`, one batch per wake-up (one lock and one
/// wake-up per subscriber, not per event). Each wake-up reads at most `max_batch` records
/// before yielding, so a flood cannot starve the other tasks of the runtime.
///
/// `tick`: for a ring whose programs wake the reader only when much is waiting
/// (`BPF_RB_NO_WAKEUP` below a watermark), the longest a record waits to be read.
pub async fn drain<R: Copy, E: Clone + Send + Sync + 'static>(
    ring: RingBuf<MapData>,
    topic: Arc<Topic<E>>,
    max_batch: usize,
    tick: Option<Duration>,
    cancel: Cancel,
    mut convert: impl FnMut(R) -> E + Send,
) -> Result<()> {
    drain_records(ring, topic, max_batch, tick, cancel, move |item, batch| {
        if item.len() < std::mem::size_of::<R>() {
            warn!(bytes = item.len(), "short ring buffer record skipped");
            return;
        }
        // SAFETY: the record holds at least one `R`, a plain-old-data struct of the ABI.
        let record: R = unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<R>()) };
        batch.push(convert(record));
    })
    .await
}

/// The ring buffer `name` of `bpf`, taken out of the object.
pub fn take(bpf: &mut aya::Ebpf, name: &str) -> Result<RingBuf<MapData>> {
    let map = bpf
        .take_map(name)
        .ok_or_else(|| Error::InvalidArgument(format!("map {name} missing")))?;
    RingBuf::try_from(map).map_err(crate::error::map_error(format!("open {name}")))
}

/// A reader of the ring buffer behind `fd` (a duplicate of its descriptor, kept by its
/// owner): each run of a controller's loop opens one, and the ring keeps its read position.
pub fn reopen(fd: &std::os::fd::OwnedFd, name: &str) -> Result<RingBuf<MapData>> {
    let dup = fd
        .try_clone()
        .map_err(|e| Error::io(format!("duplicate the descriptor of {name}"), e))?;
    let data = MapData::from_fd(dup).map_err(crate::error::map_error(format!("open {name}")))?;
    RingBuf::try_from(aya::maps::Map::RingBuf(data)).map_err(crate::error::map_error(format!(
        "open {name} as a ring buffer"
    )))
}
