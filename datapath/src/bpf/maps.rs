//! Map operations on raw descriptors, on plain `#[repr(C)]` keys and values: the batch
//! commands aya 0.14 lacks (`BPF_MAP_LOOKUP_BATCH`, `BPF_MAP_UPDATE_BATCH`), and the element
//! commands on a descriptor that is shared between controllers (a typed handle holds a
//! duplicate of the owner's descriptor, never a pin path).

use std::os::fd::{AsRawFd as _, BorrowedFd, OwnedFd};

use crate::{Error, Result};

// --- Raw map syscalls. aya 0.14 has no batch operations; these are the few the collector
// needs, on plain `#[repr(C)]` keys and values. ---

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

/// `union bpf_attr` for the element commands.
#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// `union bpf_attr` for the batch commands.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// `union bpf_attr` for `BPF_MAP_CREATE` (the fields up to `map_flags`).
#[repr(C)]
#[derive(Default)]
struct CreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
}

fn sys_bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid, initialised `#[repr(C)]` prefix of `union bpf_attr` whose
    // pointers (if any) the caller keeps alive for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn map_error(what: &str, error: std::io::Error) -> Error {
    Error::io(what.to_string(), error)
}

pub fn lookup<K: Copy, V: Copy + Default>(map: BorrowedFd<'_>, key: &K) -> Result<Option<V>> {
    let mut value = V::default();
    let mut attr = ElemAttr {
        map_fd: map.as_raw_fd() as u32,
        key: key as *const K as u64,
        value: &mut value as *mut V as u64,
        ..Default::default()
    };
    match sys_bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) {
        Ok(_) => Ok(Some(value)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(map_error("BPF_MAP_LOOKUP_ELEM", e)),
    }
}

/// Deletes `key`; false when it was already gone.
pub fn delete<K: Copy>(map: BorrowedFd<'_>, key: &K) -> Result<bool> {
    let mut attr = ElemAttr {
        map_fd: map.as_raw_fd() as u32,
        key: key as *const K as u64,
        ..Default::default()
    };
    match sys_bpf(BPF_MAP_DELETE_ELEM, &mut attr) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(map_error("BPF_MAP_DELETE_ELEM", e)),
    }
}

/// Every entry of a hash map of `K -> V`, `batch_size` entries per `BPF_MAP_LOOKUP_BATCH`
/// call, the walk bounded by the map's own size ([`map_layout`], which also refuses a map whose
/// key or value size is not `K`'s or `V`'s).
pub fn lookup_all<K: Copy + Default, V: Copy + Default>(
    map: BorrowedFd<'_>,
    batch_size: u32,
) -> Result<Vec<(K, V)>> {
    let layout = map_layout(map)?;
    layout.expect_types::<K, V>()?;
    lookup_batch_all(map, layout.max_entries, batch_size)
}

/// Every entry of a hash or LRU hash map of `K -> V` (plain `#[repr(C)]` types of the map's
/// key and value sizes) holding at most `max_entries`, read with `BPF_MAP_LOOKUP_BATCH`,
/// `batch_size` entries per call.
///
/// The kernel walks the map bucket by bucket and hands back a bucket index as the resume
/// token, so an entry deleted between two calls neither restarts nor derails the walk (as it
/// does with `BPF_MAP_GET_NEXT_KEY`); entries inserted or deleted during the walk may or may
/// not be in the result. Every call consumes at least one bucket, so the number of calls is
/// bounded by the bucket count (`max_entries` rounded up to a power of two) plus the retries
/// that grow the buffer when one bucket holds more entries than fit.
/// One `BPF_MAP_LOOKUP_BATCH` call into the caller's buffers: from the start of the map
/// (`token_in` `None`) or from a previous call's resume token, up to `keys.len()` entries.
/// `values` holds `values_per_key` values for each key (the possible CPUs of a per-CPU map, else
/// 1). Returns how many entries were copied and whether the walk reached the end of the map
/// (ENOENT, which is not an error). The buffers are reused from call to call, so a caller that
/// reads a small array on every packet (the kernel fuzzer) allocates nothing.
pub fn lookup_batch<K: Copy, V: Copy>(
    map: BorrowedFd<'_>,
    token_in: Option<&mut u64>,
    token_out: &mut u64,
    keys: &mut [K],
    values: &mut [V],
    values_per_key: usize,
) -> std::result::Result<(usize, bool), std::io::Error> {
    let count = keys.len().min(u32::MAX as usize);
    if values.len() < count * values_per_key.max(1) {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    }
    let mut attr = BatchAttr {
        in_batch: token_in.map_or(0, |t| t as *mut u64 as u64),
        out_batch: token_out as *mut u64 as u64,
        keys: keys.as_mut_ptr() as u64,
        values: values.as_mut_ptr() as u64,
        count: count as u32,
        map_fd: map.as_raw_fd() as u32,
        ..Default::default()
    };
    let result = sys_bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
    let filled = (attr.count as usize).min(count);
    match result {
        Ok(_) => Ok((filled, false)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok((filled, true)),
        Err(e) => Err(e),
    }
}

pub fn lookup_batch_all<K: Copy + Default, V: Copy + Default>(
    map: BorrowedFd<'_>,
    max_entries: u32,
    batch_size: u32,
) -> Result<Vec<(K, V)>> {
    const MAX_BATCH: u32 = 1 << 20;
    let mut batch_size = batch_size.clamp(1, MAX_BATCH);
    let max_calls = u64::from(max_entries.max(1)).next_power_of_two() + 64;
    let mut out = Vec::new();
    // The hash maps' token is a bucket index (u32); 8 bytes leave room either way.
    let mut token_in = 0u64;
    let mut token_out = 0u64;
    let mut first = true;
    let mut keys = vec![K::default(); batch_size as usize];
    let mut values = vec![V::default(); batch_size as usize];
    for _ in 0..max_calls {
        keys.resize(batch_size as usize, K::default());
        values.resize(batch_size as usize, V::default());
        let result = lookup_batch(
            map,
            (!first).then_some(&mut token_in),
            &mut token_out,
            &mut keys,
            &mut values,
            1,
        );
        let filled = match result {
            Ok((filled, false)) => filled,
            // The end of the map; the last call may still have returned some.
            Ok((filled, true)) => {
                out.extend(
                    keys.iter()
                        .copied()
                        .zip(values.iter().copied())
                        .take(filled),
                );
                return Ok(out);
            }
            // One bucket holds more entries than fit: retry that bucket with room for more.
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && batch_size < MAX_BATCH => {
                batch_size *= 2;
                continue;
            }
            Err(e) => return Err(map_error("BPF_MAP_LOOKUP_BATCH", e)),
        };
        out.extend(
            keys.iter()
                .copied()
                .zip(values.iter().copied())
                .take(filled),
        );
        token_in = token_out;
        first = false;
    }
    Err(Error::InvalidArgument(format!(
        "BPF_MAP_LOOKUP_BATCH did not reach the end of a map of {max_entries} entries in \
         {max_calls} calls"
    )))
}

/// What the kernel says a map is (the start of `struct bpf_map_info`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct MapLayout {
    pub map_type: u32,
    pub id: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub map_flags: u32,
}

impl MapLayout {
    /// An error unless the map's keys are `K`s and its values `V`s, by size. A pinned map
    /// left by a build with another ABI would otherwise be read as garbage.
    pub fn expect_types<K, V>(&self) -> Result<()> {
        let (key, value) = (size_of::<K>() as u32, size_of::<V>() as u32);
        if (self.key_size, self.value_size) == (key, value) {
            return Ok(());
        }
        Err(Error::InvalidArgument(format!(
            "map id {} has {}-byte keys and {}-byte values, this build expects {key} and {value}",
            self.id, self.key_size, self.value_size
        )))
    }
}

const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;

/// `union bpf_attr` for `BPF_OBJ_GET_INFO_BY_FD`.
#[repr(C)]
#[derive(Default)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// The type, key and value sizes and capacity of `map`.
pub fn map_layout(map: BorrowedFd<'_>) -> Result<MapLayout> {
    let mut layout = MapLayout::default();
    let mut attr = InfoAttr {
        bpf_fd: map.as_raw_fd() as u32,
        // The kernel copies at most this much of its (longer) `struct bpf_map_info`.
        info_len: size_of::<MapLayout>() as u32,
        info: &mut layout as *mut MapLayout as u64,
    };
    sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)
        .map_err(|e| map_error("BPF_OBJ_GET_INFO_BY_FD", e))?;
    Ok(layout)
}

/// Creates an anonymous hash map of `map_type` (`BPF_MAP_TYPE_LRU_HASH` is 9) for `K -> V`.
/// For tests and benchmarks that need a real kernel map without loading the datapath object.
pub fn create_hash_map<K, V>(map_type: u32, max_entries: u32) -> Result<OwnedFd> {
    use std::os::fd::FromRawFd as _;
    let mut attr = CreateAttr {
        map_type,
        key_size: std::mem::size_of::<K>() as u32,
        value_size: std::mem::size_of::<V>() as u32,
        max_entries,
        map_flags: 0,
    };
    let fd = sys_bpf(BPF_MAP_CREATE, &mut attr).map_err(|e| map_error("BPF_MAP_CREATE", e))?;
    // SAFETY: BPF_MAP_CREATE returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `BPF_MAP_TYPE_LRU_HASH`, the type of `LB_FLOWS` and `LB_NAT_REV`.
pub const BPF_MAP_TYPE_LRU_HASH: u32 = 9;

/// Inserts or replaces `entries`, in batches (one syscall per 8,192 entries).
pub fn update_all<K: Copy, V: Copy>(map: BorrowedFd<'_>, entries: &[(K, V)]) -> Result<()> {
    const CHUNK: usize = 8_192;
    for chunk in entries.chunks(CHUNK) {
        let keys: Vec<K> = chunk.iter().map(|(key, _)| *key).collect();
        let values: Vec<V> = chunk.iter().map(|(_, value)| *value).collect();
        update_batch(map, &keys, values.as_ptr().cast())?;
    }
    Ok(())
}

/// One `BPF_MAP_UPDATE_BATCH` of `keys`, with their values laid out at `values` as the map
/// expects them (one value per key, or one per possible CPU in a per-CPU map).
fn update_batch<K: Copy>(map: BorrowedFd<'_>, keys: &[K], values: *const u8) -> Result<()> {
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values: values as u64,
        count: keys.len() as u32,
        map_fd: map.as_raw_fd() as u32,
        ..Default::default()
    };
    sys_bpf(BPF_MAP_UPDATE_BATCH, &mut attr).map_err(|e| map_error("BPF_MAP_UPDATE_BATCH", e))?;
    Ok(())
}

/// Sets every CPU's value of each of `keys` to `value` in a per-CPU array or hash map, in
/// batches: the kernel takes `cpus` values per key, each padded to 8 bytes.
pub fn update_all_per_cpu<K: Copy, V: Copy>(
    map: BorrowedFd<'_>,
    keys: &[K],
    value: V,
    cpus: usize,
) -> Result<()> {
    const CHUNK: usize = 1_024;
    let slot = size_of::<V>().next_multiple_of(8);
    for chunk in keys.chunks(CHUNK) {
        let mut values = vec![0u8; chunk.len() * cpus * slot];
        for cell in values.chunks_exact_mut(slot) {
            // SAFETY: `cell` is at least `size_of::<V>()` bytes; V is plain data.
            unsafe { std::ptr::write_unaligned(cell.as_mut_ptr().cast::<V>(), value) };
        }
        update_batch(map, chunk, values.as_ptr())?;
    }
    Ok(())
}

/// Inserts or replaces one entry. For tests and benchmarks.
pub fn update<K: Copy, V: Copy>(map: BorrowedFd<'_>, key: &K, value: &V) -> Result<()> {
    let mut attr = ElemAttr {
        map_fd: map.as_raw_fd() as u32,
        key: key as *const K as u64,
        value: value as *const V as u64,
        ..Default::default()
    };
    sys_bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map_err(|e| map_error("BPF_MAP_UPDATE_ELEM", e))?;
    Ok(())
}

/// Every entry of a hash map of `K -> V`, read with `BPF_MAP_LOOKUP_BATCH`. For inspection,
/// tests and benchmarks.
pub fn read_all<K: Copy + Default, V: Copy + Default>(map: BorrowedFd<'_>) -> Result<Vec<(K, V)>> {
    lookup_all(map, 4_096)
}

/// An array map of `u32` created with `BPF_F_MMAPABLE`, written in place through a shared
/// mapping of only the pages a write touches: one mmap and munmap per write, instead of one
/// syscall per entry. The window is unmapped after each write because a mapping of a BPF
/// array is populated whole when it is made, and the whole of `LB_MAGLEV` (tens of MiB) would
/// count as this process's resident memory. The kernel stores array elements 8 bytes apart
/// (`round_up(value_size, 8)`), so entry `i` is the `2i`-th `u32`.
pub struct MappableU32Array {
    fd: OwnedFd,
    entries: usize,
    page: usize,
}

impl MappableU32Array {
    /// `None` when `map` was created without `BPF_F_MMAPABLE` (a map pinned by an older
    /// build), which the caller then writes with syscalls.
    pub fn open(map: BorrowedFd<'_>) -> Result<Option<Self>> {
        let layout = map_layout(map)?;
        if layout.map_flags & bpf_common::BPF_F_MMAPABLE == 0 || layout.value_size != 4 {
            return Ok(None);
        }
        let fd = map
            .try_clone_to_owned()
            .map_err(|e| Error::io("duplicate the LB_MAGLEV descriptor", e))?;
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
        Ok(Some(Self {
            fd,
            entries: layout.max_entries as usize,
            page,
        }))
    }

    /// Writes `values` to entries `first..first + values.len()`; a range beyond the map is an
    /// error, before anything is written.
    pub fn write_range(&self, first: u32, values: &[u32]) -> Result<()> {
        self.with_window(first, values.len(), |cells| {
            for (cell, value) in cells.zip(values) {
                cell.store(*value, std::sync::atomic::Ordering::Relaxed);
            }
            // The VIP update that publishes the table is a syscall after this; the fence keeps
            // the stores before it on weakly ordered CPUs too.
            std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        })
    }

    /// Maps the pages that hold entries `first..first + count`, hands `f` those entries in
    /// order, and unmaps them.
    fn with_window(
        &self,
        first: u32,
        count: usize,
        f: impl FnOnce(&mut dyn Iterator<Item = &std::sync::atomic::AtomicU32>),
    ) -> Result<()> {
        let first = first as usize;
        if first.saturating_add(count) > self.entries {
            return Err(Error::InvalidArgument(format!(
                "entries {first}..{} beyond the {} entries of the mapped array",
                first.saturating_add(count),
                self.entries
            )));
        }
        if count == 0 {
            return Ok(());
        }
        let element = ARRAY_STRIDE_U32S * 4;
        let start = first * element;
        let end = (first + count) * element;
        let offset = start - start % self.page;
        let len = (end - offset).next_multiple_of(self.page);
        // SAFETY: a new shared mapping of the map's own pages, at a page-aligned offset inside
        // the map (checked above); the kernel checks length and flags again.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                self.fd.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(Error::io(
                "map LB_MAGLEV into memory",
                std::io::Error::last_os_error(),
            ));
        }
        // SAFETY: the mapping holds every 8-byte element from `offset` to `offset + len`;
        // `AtomicU32` has the layout of `u32`, and other writers (none) and the programs
        // (readers) reach the same memory only atomically or from the kernel.
        let words: &[std::sync::atomic::AtomicU32] = unsafe {
            std::slice::from_raw_parts(ptr.cast::<std::sync::atomic::AtomicU32>(), len / 4)
        };
        let skip = (start - offset) / 4;
        f(&mut words[skip..].iter().step_by(ARRAY_STRIDE_U32S).take(count));
        // SAFETY: unmaps exactly the mapping made above; nothing borrows it any more.
        unsafe {
            libc::munmap(ptr, len);
        }
        Ok(())
    }
}

/// `u32`s per array element: the kernel rounds an array's value size up to 8 bytes.
const ARRAY_STRIDE_U32S: usize = 2;

/// A program's per-CPU reason counters (`u64` per reason, `names[i]` for reason `i`), taken
/// out of its object.
pub fn take_reasons(bpf: &mut aya::Ebpf, name: &str) -> Result<ReasonCounters> {
    let map = bpf
        .take_map(name)
        .ok_or_else(|| Error::InvalidArgument(format!("map {name} missing")))?;
    let map = aya::maps::PerCpuArray::try_from(map)
        .map_err(crate::error::map_error(format!("open {name}")))?;
    Ok(ReasonCounters {
        map,
        name: name.to_string(),
    })
}

/// A per-CPU array of reason counters.
pub struct ReasonCounters {
    map: aya::maps::PerCpuArray<aya::maps::MapData, u64>,
    name: String,
}

impl ReasonCounters {
    /// Each reason of `names` (index = reason id), summed over the CPUs.
    pub fn sums(
        &self,
        names: &[&'static str],
    ) -> Result<std::collections::BTreeMap<&'static str, u64>> {
        let mut out = std::collections::BTreeMap::new();
        for (i, name) in names.iter().enumerate() {
            let per_cpu = self
                .map
                .get(&(i as u32), 0)
                .map_err(crate::error::map_error(format!("read {}", self.name)))?;
            out.insert(*name, per_cpu.iter().sum());
        }
        Ok(out)
    }
}
