//! A BPF ring buffer drained onto a bus topic.
//!
//! The reader is ours, over the ring's two mappings, rather than aya's `RingBuf::next`: that one
//! publishes the consumer position after every record, and the kernel reads that position twice
//! for every record it writes (the space check in reserve, the wake-up check in commit), so
//! under a flood the cache line crosses between the writer's and the reader's CPUs several times
//! per record. Here the position is published once per batch, and before every wait.
use std::{
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd},
    ptr::NonNull,
    sync::{
        Arc,
        atomic::{AtomicU32, AtomicU64, Ordering, fence},
    },
    time::Duration,
};

use aya::maps::{MapData, RingBuf};
use tracing::warn;

use crate::{Error, Result, bus::Topic, controller::Cancel};

/// The kernel's ring record header: the length with these two bits, then the page offset.
const HEADER_BYTES: u64 = 8;
const BUSY_BIT: u32 = 1 << 31;
const DISCARD_BIT: u32 = 1 << 30;

/// One shared mapping of the ring's descriptor, unmapped on drop.
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

impl Mapping {
    fn new(fd: BorrowedFd<'_>, len: usize, prot: libc::c_int, offset: usize) -> Result<Self> {
        let offset = libc::off_t::try_from(offset)
            .map_err(|_| Error::InvalidArgument(format!("ring offset {offset}")))?;
        // SAFETY: a fresh shared mapping of a ring buffer descriptor; the kernel checks the
        // length and offset against the ring's layout.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(Error::io(
                "map the ring buffer",
                std::io::Error::last_os_error(),
            ));
        }
        let ptr = NonNull::new(ptr.cast::<u8>())
            .ok_or_else(|| Error::InvalidArgument("ring mapped at 0".into()))?;
        Ok(Self { ptr, len })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: this mapping's own address and length, unmapped once.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// The consumer side of a BPF ring buffer (`BPF_MAP_TYPE_RINGBUF`).
///
/// Layout (kernel/bpf/ringbuf.c): the consumer page (read-write, the consumer position), the
/// producer page (read-only, the producer position), then the data pages, mapped twice in a row
/// so that a record that wraps reads as one slice.
pub struct RingReader {
    fd: OwnedFd,
    consumer: Mapping,
    producer: Mapping,
    page: usize,
    mask: u64,
    /// How far this reader has read; published to the consumer page by [`Self::publish`].
    pos: u64,
    /// The last producer position read.
    producer_pos: u64,
    /// The position last published.
    published: u64,
    /// Runs right after each fence: the tests' stand-in for a kernel writing in that window.
    #[cfg(test)]
    after_fence: fn(&mut RingReader),
}

// SAFETY: the mappings are plain shared memory, reached only through `&mut self` or atomics.
unsafe impl Send for RingReader {}

impl RingReader {
    /// Opens a reader on the ring buffer `ring` (its descriptor is duplicated; the read position
    /// is the ring's own, so a reopened reader goes on where the last one stopped).
    pub fn open(ring: BorrowedFd<'_>) -> Result<Self> {
        let fd = ring
            .try_clone_to_owned()
            .map_err(|e| Error::io("duplicate the ring buffer descriptor", e))?;
        let data_fd = fd
            .try_clone()
            .map_err(|e| Error::io("duplicate the ring buffer descriptor", e))?;
        let info = MapData::from_fd(data_fd)
            .and_then(|m| m.info())
            .map_err(crate::error::map_error("read the ring buffer's size"))?;
        let size = u64::from(info.max_entries());
        if !size.is_power_of_two() {
            return Err(Error::InvalidArgument(format!(
                "ring buffer size {size} is not a power of two"
            )));
        }
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
            .map_err(|_| Error::InvalidArgument("page size".into()))?;
        let data = usize::try_from(size).map_err(|_| Error::InvalidArgument("size".into()))?;
        let consumer = Mapping::new(fd.as_fd(), page, libc::PROT_READ | libc::PROT_WRITE, 0)?;
        let producer = Mapping::new(fd.as_fd(), page + 2 * data, libc::PROT_READ, page)?;
        let mut reader = Self {
            fd,
            consumer,
            producer,
            page,
            mask: size - 1,
            pos: 0,
            producer_pos: 0,
            published: 0,
            #[cfg(test)]
            after_fence: |_| {},
        };
        reader.pos = reader.consumer_pos().load(Ordering::Acquire);
        reader.published = reader.pos;
        reader.producer_pos = reader.load_producer();
        Ok(reader)
    }

    /// Opens a reader on an aya ring buffer, which is dropped (it unmaps; the ring stays).
    pub fn from_aya(ring: RingBuf<MapData>) -> Result<Self> {
        Self::open(ring.as_fd())
    }

    fn consumer_pos(&self) -> &AtomicU64 {
        // SAFETY: the consumer page starts with the kernel's `unsigned long consumer_pos`,
        // 8-byte aligned at the start of a page.
        unsafe { self.consumer.ptr.cast::<AtomicU64>().as_ref() }
    }

    fn load_producer(&self) -> u64 {
        // SAFETY: the producer page starts with `producer_pos`; the kernel writes it with a
        // release store after the record header.
        unsafe { self.producer.ptr.cast::<AtomicU64>().as_ref() }.load(Ordering::Acquire)
    }

    fn header(&self, pos: u64) -> &AtomicU32 {
        // The mask keeps the offset inside the first copy of the data pages.
        let offset = self.page + (pos & self.mask) as usize;
        // SAFETY: in bounds (offset + 8 ≤ page + 2 × size), 8-byte aligned (positions are).
        unsafe { self.producer.ptr.add(offset).cast::<AtomicU32>().as_ref() }
    }

    /// Publishes the read position, so the kernel may reuse the space.
    fn publish(&mut self) {
        if self.published != self.pos {
            self.consumer_pos().store(self.pos, Ordering::Release);
            self.published = self.pos;
        }
    }

    /// Hands up to `max` records to `each`, oldest first; answers how many it read and whether
    /// the ring is empty (or its next record still being written) now. When it is, the position
    /// is published and a record committed after this call wakes the descriptor's poller.
    pub fn read(&mut self, max: usize, mut each: impl FnMut(&[u8])) -> (usize, bool) {
        let mut read = 0;
        // The position at which the reader last published and fenced: caught up there again,
        // it may sleep.
        let mut fenced_at = None;
        while read < max {
            if self.pos == self.producer_pos {
                self.producer_pos = self.load_producer();
            }
            let waiting = self.pos == self.producer_pos
                || self.header(self.pos).load(Ordering::Acquire) & BUSY_BIT != 0;
            if waiting {
                if fenced_at == Some(self.pos) {
                    return (read, true);
                }
                // Publish, then look once more: either that sees the next record (or its
                // commit), or the record's writer sees the published position and, as it
                // commits, wakes the poller (kernel/bpf/ringbuf.c, bpf_ringbuf_commit).
                self.publish();
                fence(Ordering::SeqCst);
                #[cfg(test)]
                (self.after_fence)(self);
                self.producer_pos = self.load_producer();
                fenced_at = Some(self.pos);
                continue;
            }
            let header = self.header(self.pos).load(Ordering::Acquire);
            let len = u64::from(header & !(BUSY_BIT | DISCARD_BIT));
            if header & DISCARD_BIT == 0 {
                let start = self.page + ((self.pos + HEADER_BYTES) & self.mask) as usize;
                // SAFETY: the kernel wrote `len` bytes after the header (len < size), and the
                // double mapping makes [start, start + len) contiguous and in bounds.
                let record = unsafe {
                    std::slice::from_raw_parts(self.producer.ptr.add(start).as_ptr(), len as usize)
                };
                each(record);
                read += 1;
            }
            self.pos += (len + HEADER_BYTES).next_multiple_of(8);
        }
        self.publish();
        (read, false)
    }
}

impl AsRawFd for RingReader {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Where [`drain_source`] reads records from: a pollable descriptor and a batched read.
/// The daemon's is [`RingReader`]; the benchmark's baseline wraps aya's `RingBuf::next`.
pub trait RecordSource: AsRawFd {
    /// Hands up to `max` records to `each`, oldest first; answers whether the source is empty
    /// now (and will wake its descriptor's poller for the next record).
    fn read_batch(&mut self, max: usize, each: &mut dyn FnMut(&[u8])) -> bool;
}

impl RecordSource for RingReader {
    fn read_batch(&mut self, max: usize, each: &mut dyn FnMut(&[u8])) -> bool {
        self.read(max, each).1
    }
}

/// Reads up to `max_batch` records of `source`, each handed to `each` with the batch it may
/// add events to; answers the batch and whether the source is empty now.
fn read_records<E>(
    source: &mut impl RecordSource,
    max_batch: usize,
    each: &mut impl FnMut(&[u8], &mut Vec<E>),
) -> (Vec<E>, bool) {
    let mut batch = Vec::new();
    let drained = source.read_batch(max_batch, &mut |record| each(record, &mut batch));
    (batch, drained)
}

/// Like [`drain`], for records of any length: `each` turns one record into any number of
/// events (pushed onto the batch it is given).
pub async fn drain_records<E: Clone + Send + Sync + 'static>(
    ring: RingBuf<MapData>,
    topic: Arc<Topic<E>>,
    max_batch: usize,
    tick: Option<Duration>,
    cancel: Cancel,
    each: impl FnMut(&[u8], &mut Vec<E>) + Send,
) -> Result<()> {
    let reader = RingReader::from_aya(ring)?;
    drain_source(reader, topic, max_batch, tick, cancel, each).await
}

/// [`drain_records`] over any [`RecordSource`].
pub async fn drain_source<E: Clone + Send + Sync + 'static>(
    source: impl RecordSource,
    topic: Arc<Topic<E>>,
    max_batch: usize,
    tick: Option<Duration>,
    mut cancel: Cancel,
    mut each: impl FnMut(&[u8], &mut Vec<E>) + Send,
) -> Result<()> {
    // SAFETY: the source owns its descriptor and moves into the AsyncFd, which deregisters it
    // before dropping it.
    let mut fd = unsafe { tokio::io::unix::AsyncFd::register(source) }
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

#[cfg(test)]
mod tests {
    //! The reader's state machine over plain memory laid out as the kernel lays out a ring; the
    //! tests play the kernel's part (reserve, commit, discard). Its behaviour against the real
    //! kernel (wake-ups, a full ring, wraps) is tested in `perf/tests/ring_reader.rs`.
    use std::{cell::Cell, os::fd::OwnedFd};

    use super::*;

    const SIZE: u64 = 1 << 14;

    impl Mapping {
        fn anonymous(len: usize) -> Self {
            // SAFETY: a fresh private anonymous mapping.
            let ptr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            assert_ne!(ptr, libc::MAP_FAILED);
            Self {
                ptr: NonNull::new(ptr.cast()).expect("mapped"),
                len,
            }
        }
    }

    fn fake_ring() -> RingReader {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let fd: OwnedFd = std::fs::File::open("/dev/null").expect("/dev/null").into();
        RingReader {
            fd,
            consumer: Mapping::anonymous(page),
            producer: Mapping::anonymous(page + 2 * SIZE as usize),
            page,
            mask: SIZE - 1,
            pos: 0,
            producer_pos: 0,
            published: 0,
            after_fence: |_| {},
        }
    }

    /// The kernel's side of the fake ring.
    fn kernel_producer_pos(r: &RingReader) -> &AtomicU64 {
        // SAFETY: the first word of the (anonymous, writable) producer page.
        unsafe { r.producer.ptr.cast::<AtomicU64>().as_ref() }
    }

    fn published(r: &RingReader) -> u64 {
        r.consumer_pos().load(Ordering::Acquire)
    }

    /// Reserves a record of `data.len()` bytes and fills it; answers its header's position.
    fn reserve(r: &RingReader, data: &[u8]) -> u64 {
        let at = kernel_producer_pos(r).load(Ordering::Relaxed);
        r.header(at)
            .store(data.len() as u32 | BUSY_BIT, Ordering::Relaxed);
        let start = r.page + ((at + HEADER_BYTES) & r.mask) as usize;
        // SAFETY: in bounds of the fake producer mapping (records here never wrap).
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                r.producer.ptr.as_ptr().add(start),
                data.len(),
            );
        }
        kernel_producer_pos(r).store(
            at + (data.len() as u64 + HEADER_BYTES).next_multiple_of(8),
            Ordering::Release,
        );
        at
    }

    fn commit(r: &RingReader, at: u64, discard: bool) {
        let header = r.header(at);
        let len = header.load(Ordering::Relaxed) & !BUSY_BIT;
        header.store(
            if discard { len | DISCARD_BIT } else { len },
            Ordering::Release,
        );
    }

    fn write(r: &RingReader, data: &[u8]) {
        let at = reserve(r, data);
        commit(r, at, false);
    }

    fn read_all(r: &mut RingReader, max: usize) -> (Vec<Vec<u8>>, bool) {
        let mut got = Vec::new();
        let (n, drained) = r.read(max, |record| got.push(record.to_vec()));
        assert_eq!(n, got.len());
        (got, drained)
    }

    #[test]
    fn records_come_in_order_and_the_position_is_published_when_drained() {
        let mut r = fake_ring();
        for data in [&b"one"[..], b"second record", b"3"] {
            write(&r, data);
        }
        let (got, drained) = read_all(&mut r, 10);
        assert_eq!(got, [&b"one"[..], b"second record", b"3"]);
        assert!(drained);
        assert_eq!(published(&r), 16 + 24 + 16);
        assert_eq!(read_all(&mut r, 10), (vec![], true));
    }

    #[test]
    fn a_batch_cut_at_max_is_published_and_not_drained() {
        let mut r = fake_ring();
        for i in 0..5u8 {
            write(&r, &[i; 8]);
        }
        let (got, drained) = read_all(&mut r, 2);
        assert_eq!((got.len(), drained), (2, false));
        assert_eq!(published(&r), 2 * 16);
        let (got, drained) = read_all(&mut r, 10);
        assert_eq!(got, [[2u8; 8], [3; 8], [4; 8]]);
        assert!(drained);
        assert_eq!(published(&r), 5 * 16);
    }

    thread_local! {
        static WRITES_IN_WINDOW: Cell<u32> = const { Cell::new(0) };
    }

    #[test]
    fn a_record_written_between_publishing_and_looking_again_is_read_and_then_published() {
        // The race that lost wake-ups: the reader publishes, a record lands before its second
        // look, it reads that record, and must publish again before it may sleep (else the
        // kernel, seeing an older position, wakes nobody for the next record).
        let mut r = fake_ring();
        WRITES_IN_WINDOW.set(0);
        r.after_fence = |r| {
            if WRITES_IN_WINDOW.get() < 3 {
                WRITES_IN_WINDOW.set(WRITES_IN_WINDOW.get() + 1);
                write(r, b"late");
            }
        };
        write(&r, b"first");
        let (got, drained) = read_all(&mut r, 100);
        assert_eq!(got, [&b"first"[..], b"late", b"late", b"late"]);
        assert!(drained);
        assert_eq!(
            published(&r),
            r.pos,
            "drained, so everything read is published"
        );
        assert_eq!(r.pos, 4 * 16);
    }

    #[test]
    fn a_record_still_being_written_stops_the_read_at_its_position() {
        let mut r = fake_ring();
        write(&r, b"done");
        let busy = reserve(&r, b"being written");
        let (got, drained) = read_all(&mut r, 10);
        assert_eq!((got, drained), (vec![b"done".to_vec()], true));
        // Published at the busy record: its commit sees the reader there and wakes it.
        assert_eq!(published(&r), busy);
        commit(&r, busy, false);
        assert_eq!(
            read_all(&mut r, 10),
            (vec![b"being written".to_vec()], true)
        );
        assert_eq!(published(&r), busy + 24);
    }

    #[test]
    fn discarded_records_are_skipped() {
        let mut r = fake_ring();
        write(&r, b"kept");
        let dropped = reserve(&r, b"discarded");
        commit(&r, dropped, true);
        write(&r, b"kept too");
        assert_eq!(
            read_all(&mut r, 10),
            (vec![b"kept".to_vec(), b"kept too".to_vec()], true)
        );
        assert_eq!(published(&r), 16 + 24 + 16);
    }
}
