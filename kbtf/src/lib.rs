//! Byte offsets of kernel struct members, read from the running kernel's own BTF.
//!
//! The tracing BPF programs read kernel structs (`task_struct`, `mm_struct`, `linux_binprm`,
//! `dentry`, `sock_common`, ...) with `bpf_probe_read_kernel` at fixed offsets. Those offsets
//! change from kernel to kernel, and the usual answer, CO-RE relocations, is not available here:
//! aya 0.14 does no CO-RE, and aya-obj's `Btf` keeps its member access crate-private. So the
//! daemon reads `/sys/kernel/btf/vmlinux` itself with this crate, asks for the offsets it needs
//! ([`Btf::member_offset`], [`Btf::member_size`]) and hands them to the BPF programs as globals
//! before loading them; [`Btf::typedef_proto_params`] checks a raw tracepoint's arity
//! (`btf_trace_<name>` typedefs).
//!
//! The reader is small and strict: [`Btf::parse`] checks the header and walks every type record
//! once, keeping an index of record offsets; the questions decode records on demand. Nothing
//! panics on malformed input: truncation, bad type ids, unknown kinds and bad string offsets are
//! [`BtfError`]s, typedef/modifier chains are followed at most [`MAX_CHAIN`] steps and anonymous
//! members are searched at most [`MAX_ANON_DEPTH`] levels deep (each anonymous type once per
//! step). Only little-endian, base (not split/module) BTF is read; pointers are 8 bytes.

mod error;

pub use error::BtfError;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::Path;

/// Where the running kernel exposes its BTF.
pub const VMLINUX_PATH: &str = "/sys/kernel/btf/vmlinux";

/// Longest typedef/modifier/array chain followed when resolving one type.
pub const MAX_CHAIN: usize = 32;

/// Deepest nesting of anonymous struct/union members searched for a member name.
pub const MAX_ANON_DEPTH: usize = 32;

const MAGIC: u16 = 0xeb9f;
const VERSION: u8 = 1;
const HEADER_LEN: usize = 24;
const TYPE_LEN: usize = 12;
const PTR_SIZE: u32 = 8;

const KIND_VOID: u32 = 0;
const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FWD: u32 = 7;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_FLOAT: u32 = 16;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

fn kind_name(kind: u32) -> &'static str {
    match kind {
        KIND_VOID => "void",
        KIND_INT => "INT",
        KIND_PTR => "PTR",
        KIND_ARRAY => "ARRAY",
        KIND_STRUCT => "STRUCT",
        KIND_UNION => "UNION",
        KIND_ENUM => "ENUM",
        KIND_FWD => "FWD",
        KIND_TYPEDEF => "TYPEDEF",
        KIND_VOLATILE => "VOLATILE",
        KIND_CONST => "CONST",
        KIND_RESTRICT => "RESTRICT",
        KIND_FUNC => "FUNC",
        KIND_FUNC_PROTO => "FUNC_PROTO",
        KIND_VAR => "VAR",
        KIND_DATASEC => "DATASEC",
        KIND_FLOAT => "FLOAT",
        KIND_DECL_TAG => "DECL_TAG",
        KIND_TYPE_TAG => "TYPE_TAG",
        KIND_ENUM64 => "ENUM64",
        _ => "unknown kind",
    }
}

/// Kinds that only qualify or rename another type.
fn is_modifier(kind: u32) -> bool {
    matches!(
        kind,
        KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG
    )
}

fn is_composite(kind: u32) -> bool {
    matches!(kind, KIND_STRUCT | KIND_UNION)
}

fn le32(buf: &[u8], pos: usize) -> Option<u32> {
    let bytes = buf.get(pos..pos.checked_add(4)?)?;
    Some(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
}

/// The NUL-terminated string at `off` (offset 0 is always the empty name).
fn str_at(strings: &[u8], off: u32) -> Result<&[u8], BtfError> {
    let bad = || BtfError::StringOutOfRange {
        offset: off,
        len: strings.len(),
    };
    if off == 0 {
        return Ok(b"");
    }
    let rest = usize::try_from(off)
        .ok()
        .and_then(|o| strings.get(o..))
        .ok_or_else(bad)?;
    let nul = rest.iter().position(|&b| b == 0).ok_or_else(bad)?;
    Ok(&rest[..nul])
}

/// One decoded type record header.
#[derive(Clone, Copy, Debug)]
struct Ty {
    id: u32,
    name_off: u32,
    kind: u32,
    vlen: u32,
    kind_flag: bool,
    size_or_type: u32,
    /// Offset of the trailing data in the type section.
    data: usize,
}

impl Ty {
    const VOID: Ty = Ty {
        id: 0,
        name_off: 0,
        kind: KIND_VOID,
        vlen: 0,
        kind_flag: false,
        size_or_type: 0,
        data: 0,
    };
}

fn decode(types: &[u8], id: u32, pos: usize) -> Result<Ty, BtfError> {
    let truncated = || BtfError::TruncatedType { id, offset: pos };
    let name_off = le32(types, pos).ok_or_else(truncated)?;
    let info = le32(types, pos + 4).ok_or_else(truncated)?;
    let size_or_type = le32(types, pos + 8).ok_or_else(truncated)?;
    Ok(Ty {
        id,
        name_off,
        kind: (info >> 24) & 0x1f,
        vlen: info & 0xffff,
        kind_flag: info >> 31 != 0,
        size_or_type,
        data: pos + TYPE_LEN,
    })
}

/// Bytes of trailing data after the 12-byte record, and the stride of its name-carrying
/// entries (0: no names in the trailing data).
fn trailing(ty: &Ty) -> Result<(usize, usize), BtfError> {
    let vlen = ty.vlen as usize;
    Ok(match ty.kind {
        KIND_INT => (4, 0),
        KIND_PTR | KIND_FWD | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT
        | KIND_FUNC | KIND_FLOAT | KIND_TYPE_TAG => (0, 0),
        KIND_ARRAY => (12, 0),
        KIND_STRUCT | KIND_UNION => (12 * vlen, 12),
        KIND_ENUM => (8 * vlen, 8),
        KIND_FUNC_PROTO => (8 * vlen, 8),
        KIND_VAR | KIND_DECL_TAG => (4, 0),
        KIND_DATASEC => (12 * vlen, 0),
        KIND_ENUM64 => (12 * vlen, 12),
        kind => return Err(BtfError::UnknownKind { id: ty.id, kind }),
    })
}

/// A struct/union member as recorded.
#[derive(Clone, Copy, Debug)]
struct Member {
    name_off: u32,
    type_id: u32,
    bit_offset: u32,
    /// Non-zero for a bitfield of a `kind_flag` struct.
    bitfield_size: u32,
}

/// A member found by name, its offset relative to the composite searched.
#[derive(Clone, Copy, Debug)]
struct Found {
    bit_offset: u64,
    bitfield_size: u32,
    type_id: u32,
    /// Whether the struct holding the member encodes bitfields in the member (`kind_flag`).
    kind_flag: bool,
}

/// A function prototype parameter: its name (empty when unnamed, as in tracepoint prototypes)
/// and its type rendered C-like (`void *`, `struct task_struct *`, `pid_t`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Param {
    pub name: String,
    pub type_name: String,
}

/// Parsed BTF: the type and string sections (owned copies), an index of type record offsets,
/// and the first STRUCT and TYPEDEF of every name.
pub struct Btf {
    types: Vec<u8>,
    strings: Vec<u8>,
    /// `offsets[id - 1]` is where type `id` starts in `types`.
    offsets: Vec<u32>,
    structs: HashMap<Vec<u8>, u32>,
    typedefs: HashMap<Vec<u8>, u32>,
}

impl fmt::Debug for Btf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Btf")
            .field("types", &self.offsets.len())
            .field("type_bytes", &self.types.len())
            .field("string_bytes", &self.strings.len())
            .finish()
    }
}

fn section<'a>(
    bytes: &'a [u8],
    section: &'static str,
    hdr_len: u32,
    off: u32,
    len: u32,
) -> Result<&'a [u8], BtfError> {
    let start = u64::from(hdr_len) + u64::from(off);
    let end = start + u64::from(len);
    let err = || BtfError::TruncatedSection {
        section,
        start,
        end,
        len: bytes.len(),
    };
    let s = usize::try_from(start).map_err(|_| err())?;
    let e = usize::try_from(end).map_err(|_| err())?;
    bytes.get(s..e).ok_or_else(err)
}

impl Btf {
    /// Parses a BTF blob: checks the header, then walks every type record once, checking that
    /// each has a known kind, fits in the type section and names only valid strings.
    pub fn parse(bytes: &[u8]) -> Result<Btf, BtfError> {
        let hdr = bytes.get(..HEADER_LEN).ok_or(BtfError::TruncatedHeader {
            len: bytes.len(),
            need: HEADER_LEN as u64,
        })?;
        let magic = u16::from_le_bytes([hdr[0], hdr[1]]);
        if magic != MAGIC {
            return Err(BtfError::BadMagic { found: magic });
        }
        if hdr[2] != VERSION {
            return Err(BtfError::BadVersion { found: hdr[2] });
        }
        let field = |i: usize| le32(hdr, 4 + 4 * i).unwrap_or(0);
        let (hdr_len, type_off, type_len, str_off, str_len) =
            (field(0), field(1), field(2), field(3), field(4));
        if (hdr_len as usize) < HEADER_LEN {
            return Err(BtfError::BadHeaderLen { hdr_len });
        }
        if u64::from(hdr_len) > bytes.len() as u64 {
            return Err(BtfError::TruncatedHeader {
                len: bytes.len(),
                need: u64::from(hdr_len),
            });
        }
        let types = section(bytes, "type", hdr_len, type_off, type_len)?;
        let strings = section(bytes, "string", hdr_len, str_off, str_len)?;

        let mut offsets = Vec::new();
        let mut structs = HashMap::new();
        let mut typedefs = HashMap::new();
        let mut pos = 0usize;
        while pos < types.len() {
            // The type section is at most u32::MAX bytes, 12 per record: ids fit in a u32.
            let id = u32::try_from(offsets.len() + 1).unwrap_or(u32::MAX);
            let ty = decode(types, id, pos)?;
            let (extra, stride) = trailing(&ty)?;
            let end = ty.data + extra;
            if end > types.len() {
                return Err(BtfError::TruncatedType { id, offset: pos });
            }
            let name = str_at(strings, ty.name_off)?;
            if stride != 0 {
                for i in 0..ty.vlen as usize {
                    let name_off = le32(types, ty.data + i * stride)
                        .ok_or(BtfError::TruncatedType { id, offset: pos })?;
                    str_at(strings, name_off)?;
                }
            }
            if !name.is_empty() {
                let index = match ty.kind {
                    KIND_STRUCT => Some(&mut structs),
                    KIND_TYPEDEF => Some(&mut typedefs),
                    _ => None,
                };
                if let Some(index) = index {
                    index.entry(name.to_vec()).or_insert(id);
                }
            }
            offsets.push(pos as u32);
            pos = end;
        }
        Ok(Btf {
            types: types.to_vec(),
            strings: strings.to_vec(),
            offsets,
            structs,
            typedefs,
        })
    }

    /// Reads and parses the running kernel's BTF, [`VMLINUX_PATH`].
    pub fn from_sys_fs() -> Result<Btf, BtfError> {
        Btf::from_file(VMLINUX_PATH)
    }

    /// Reads and parses a BTF file (raw BTF, as `/sys/kernel/btf/vmlinux`; not an ELF file).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Btf, BtfError> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| BtfError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Btf::parse(&bytes)
    }

    /// Number of types (ids `1..=type_count()`; id 0 is void).
    pub fn type_count(&self) -> usize {
        self.offsets.len()
    }

    /// The id of the first STRUCT type named `name`.
    pub fn struct_id(&self, name: &str) -> Result<u32, BtfError> {
        self.structs
            .get(name.as_bytes())
            .copied()
            .ok_or_else(|| BtfError::StructNotFound(name.to_owned()))
    }

    /// Byte offset of a member path from the start of struct `name`, e.g.
    /// `("task_struct", &["real_parent"])`, `("dentry", &["d_name", "name"])` (`d_name` is an
    /// embedded `struct qstr`: the offsets add up), `("sock_common", &["skc_daddr"])` (found
    /// inside anonymous unions and structs).
    ///
    /// Each step is looked up by name among the members in declaration order, recursing into
    /// anonymous (empty-name) struct/union members and adding their offsets; the first match
    /// wins. Every step but the last must be an embedded struct or union (after skipping
    /// typedef/const/volatile/restrict/type_tag), not a pointer. A bitfield or a member that
    /// does not start on a byte boundary is an error.
    pub fn member_offset(&self, name: &str, path: &[&str]) -> Result<u32, BtfError> {
        let (bit_offset, _) = self.resolve_path(name, path)?;
        u32::try_from(bit_offset / 8).map_err(|_| BtfError::Overflow {
            struct_name: name.to_owned(),
            member: path.join("."),
        })
    }

    /// Size in bytes of the type of the member at `path` (looked up as in
    /// [`Btf::member_offset`], so a bitfield is an error), resolving typedefs and modifiers;
    /// an array is its element count times its element size, a pointer 8 bytes.
    pub fn member_size(&self, name: &str, path: &[&str]) -> Result<u32, BtfError> {
        let (_, type_id) = self.resolve_path(name, path)?;
        let size = self.type_size(type_id)?;
        u32::try_from(size).map_err(|_| BtfError::Overflow {
            struct_name: name.to_owned(),
            member: path.join("."),
        })
    }

    /// Number of parameters of the FUNC_PROTO behind typedef `typedef_name` (directly, or
    /// through one pointer as the `btf_trace_<tracepoint>` typedefs are), so a caller can check
    /// a raw tracepoint's arity. Tracepoint prototypes count the `void *` context first:
    /// `btf_trace_sched_process_exec` has 4 (`void *`, `struct task_struct *`, `pid_t`,
    /// `struct linux_binprm *`).
    pub fn typedef_proto_params(&self, typedef_name: &str) -> Result<usize, BtfError> {
        Ok(self.typedef_proto(typedef_name)?.vlen as usize)
    }

    /// The parameters of the FUNC_PROTO behind typedef `typedef_name` (found as in
    /// [`Btf::typedef_proto_params`]): names and C-like type names.
    pub fn typedef_proto_signature(&self, typedef_name: &str) -> Result<Vec<Param>, BtfError> {
        let proto = self.typedef_proto(typedef_name)?;
        (0..proto.vlen)
            .map(|i| {
                let rel = 8 * i as usize;
                let name_off = self.data_u32(&proto, rel)?;
                let type_id = self.data_u32(&proto, rel + 4)?;
                Ok(Param {
                    name: self.name_string(name_off)?,
                    type_name: self.type_name(type_id, 0)?,
                })
            })
            .collect()
    }

    fn typedef_proto(&self, typedef_name: &str) -> Result<Ty, BtfError> {
        let id = self
            .typedefs
            .get(typedef_name.as_bytes())
            .copied()
            .ok_or_else(|| BtfError::TypedefNotFound(typedef_name.to_owned()))?;
        let mut ty = self.skip_modifiers(id)?;
        if ty.kind == KIND_PTR {
            ty = self.skip_modifiers(ty.size_or_type)?;
        }
        if ty.kind != KIND_FUNC_PROTO {
            return Err(BtfError::NotFuncProto {
                name: typedef_name.to_owned(),
                kind: kind_name(ty.kind),
            });
        }
        Ok(ty)
    }

    fn ty(&self, id: u32) -> Result<Ty, BtfError> {
        if id == 0 {
            return Ok(Ty::VOID);
        }
        let pos = self
            .offsets
            .get(id as usize - 1)
            .ok_or(BtfError::TypeIdOutOfRange {
                id,
                max: self.offsets.len() as u32,
            })?;
        decode(&self.types, id, *pos as usize)
    }

    fn name(&self, off: u32) -> Result<&[u8], BtfError> {
        str_at(&self.strings, off)
    }

    fn name_string(&self, off: u32) -> Result<String, BtfError> {
        Ok(String::from_utf8_lossy(self.name(off)?).into_owned())
    }

    /// The type `id` after following typedef/const/volatile/restrict/type_tag.
    fn skip_modifiers(&self, id: u32) -> Result<Ty, BtfError> {
        let mut next = id;
        for _ in 0..MAX_CHAIN {
            let ty = self.ty(next)?;
            if !is_modifier(ty.kind) {
                return Ok(ty);
            }
            next = ty.size_or_type;
        }
        Err(BtfError::ChainTooLong { id, max: MAX_CHAIN })
    }

    /// The u32 at `rel` bytes into the trailing data of `ty`.
    fn data_u32(&self, ty: &Ty, rel: usize) -> Result<u32, BtfError> {
        le32(&self.types, ty.data + rel).ok_or(BtfError::TruncatedType {
            id: ty.id,
            offset: ty.data.saturating_sub(TYPE_LEN),
        })
    }

    fn member(&self, ty: &Ty, i: u32) -> Result<Member, BtfError> {
        let rel = 12 * i as usize;
        let name_off = self.data_u32(ty, rel)?;
        let type_id = self.data_u32(ty, rel + 4)?;
        let offset = self.data_u32(ty, rel + 8)?;
        let (bit_offset, bitfield_size) = if ty.kind_flag {
            (offset & 0x00ff_ffff, offset >> 24)
        } else {
            (offset, 0)
        };
        Ok(Member {
            name_off,
            type_id,
            bit_offset,
            bitfield_size,
        })
    }

    /// Searches `comp` (a struct or union) for a member named `name`, recursing into anonymous
    /// struct/union members (each anonymous type once: `visited`).
    fn find_member(
        &self,
        comp: &Ty,
        name: &[u8],
        depth: usize,
        visited: &mut HashSet<u32>,
        struct_name: &str,
    ) -> Result<Option<Found>, BtfError> {
        for i in 0..comp.vlen {
            let m = self.member(comp, i)?;
            let member_name = self.name(m.name_off)?;
            if member_name == name {
                return Ok(Some(Found {
                    bit_offset: u64::from(m.bit_offset),
                    bitfield_size: m.bitfield_size,
                    type_id: m.type_id,
                    kind_flag: comp.kind_flag,
                }));
            }
            if !member_name.is_empty() {
                continue;
            }
            let inner = self.skip_modifiers(m.type_id)?;
            if !is_composite(inner.kind) || !visited.insert(inner.id) {
                continue;
            }
            if depth >= MAX_ANON_DEPTH {
                return Err(BtfError::NestingTooDeep {
                    struct_name: struct_name.to_owned(),
                    max: MAX_ANON_DEPTH,
                });
            }
            if let Some(found) = self.find_member(&inner, name, depth + 1, visited, struct_name)? {
                return Ok(Some(Found {
                    bit_offset: found.bit_offset.saturating_add(u64::from(m.bit_offset)),
                    ..found
                }));
            }
        }
        Ok(None)
    }

    /// Bit width of an old-style (not `kind_flag`) bitfield: an INT member whose encoding has a
    /// bit offset or fewer bits than its size. 0 when not a bitfield.
    fn int_bitfield_bits(&self, type_id: u32) -> Result<u32, BtfError> {
        let ty = self.skip_modifiers(type_id)?;
        if ty.kind != KIND_INT {
            return Ok(0);
        }
        let enc = self.data_u32(&ty, 0)?;
        let (int_offset, nr_bits) = ((enc >> 16) & 0xff, enc & 0xff);
        let full = u64::from(nr_bits) == u64::from(ty.size_or_type) * 8;
        Ok(if int_offset != 0 || !full { nr_bits } else { 0 })
    }

    /// Bit offset from the start of struct `name` and type id of the member at `path`.
    fn resolve_path(&self, name: &str, path: &[&str]) -> Result<(u64, u32), BtfError> {
        if path.is_empty() {
            return Err(BtfError::EmptyPath {
                struct_name: name.to_owned(),
            });
        }
        let mut comp = self.ty(self.struct_id(name)?)?;
        let mut bit_offset = 0u64;
        let mut type_id = 0;
        for (i, step) in path.iter().enumerate() {
            let dotted = || path[..=i].join(".");
            let mut visited = HashSet::from([comp.id]);
            let found = if step.is_empty() {
                None
            } else {
                self.find_member(&comp, step.as_bytes(), 0, &mut visited, name)?
            };
            let found = found.ok_or_else(|| BtfError::MemberNotFound {
                struct_name: name.to_owned(),
                member: dotted(),
            })?;
            bit_offset = bit_offset.saturating_add(found.bit_offset);
            let bits = if found.kind_flag {
                found.bitfield_size
            } else {
                self.int_bitfield_bits(found.type_id)?
            };
            if bits != 0 {
                return Err(BtfError::Bitfield {
                    struct_name: name.to_owned(),
                    member: dotted(),
                    bit_offset,
                    bits,
                });
            }
            type_id = found.type_id;
            if i + 1 < path.len() {
                comp = self.skip_modifiers(found.type_id)?;
                if !is_composite(comp.kind) {
                    return Err(BtfError::NotComposite {
                        struct_name: name.to_owned(),
                        member: dotted(),
                        kind: kind_name(comp.kind),
                    });
                }
            }
        }
        if !bit_offset.is_multiple_of(8) {
            return Err(BtfError::Unaligned {
                struct_name: name.to_owned(),
                member: path.join("."),
                bit_offset,
            });
        }
        Ok((bit_offset, type_id))
    }

    /// Size in bytes of type `id`.
    fn type_size(&self, id: u32) -> Result<u64, BtfError> {
        let mut next = id;
        let mut count = 1u64;
        for _ in 0..MAX_CHAIN {
            let ty = self.ty(next)?;
            match ty.kind {
                k if is_modifier(k) => next = ty.size_or_type,
                KIND_ARRAY => {
                    let elem = self.data_u32(&ty, 0)?;
                    let nelems = self.data_u32(&ty, 8)?;
                    count = count.saturating_mul(u64::from(nelems));
                    next = elem;
                }
                KIND_PTR => return Ok(count.saturating_mul(u64::from(PTR_SIZE))),
                KIND_INT | KIND_STRUCT | KIND_UNION | KIND_ENUM | KIND_ENUM64 | KIND_FLOAT => {
                    return Ok(count.saturating_mul(u64::from(ty.size_or_type)));
                }
                kind => {
                    return Err(BtfError::NoSize {
                        id: ty.id,
                        kind: kind_name(kind),
                    });
                }
            }
        }
        Err(BtfError::ChainTooLong { id, max: MAX_CHAIN })
    }

    /// A C-like name of type `id`: `void *`, `struct task_struct *`, `const char *`, `pid_t`.
    fn type_name(&self, id: u32, depth: usize) -> Result<String, BtfError> {
        if depth >= MAX_CHAIN {
            return Err(BtfError::ChainTooLong { id, max: MAX_CHAIN });
        }
        let ty = self.ty(id)?;
        let name = self.name_string(ty.name_off)?;
        let named = |tag: &str| {
            if name.is_empty() {
                format!("{tag} (anon)")
            } else {
                format!("{tag} {name}")
            }
        };
        let inner = || self.type_name(ty.size_or_type, depth + 1);
        Ok(match ty.kind {
            KIND_VOID => "void".to_owned(),
            KIND_INT | KIND_FLOAT | KIND_TYPEDEF => name,
            KIND_STRUCT => named("struct"),
            KIND_UNION => named("union"),
            KIND_ENUM | KIND_ENUM64 => named("enum"),
            KIND_FWD if ty.kind_flag => named("union"),
            KIND_FWD => named("struct"),
            KIND_PTR => {
                let inner = inner()?;
                if inner.ends_with('*') {
                    format!("{inner}*")
                } else {
                    format!("{inner} *")
                }
            }
            KIND_CONST => format!("const {}", inner()?),
            KIND_VOLATILE => format!("volatile {}", inner()?),
            KIND_RESTRICT => format!("{} restrict", inner()?),
            KIND_TYPE_TAG => inner()?,
            KIND_ARRAY => {
                let elem = self.data_u32(&ty, 0)?;
                let nelems = self.data_u32(&ty, 8)?;
                format!("{}[{nelems}]", self.type_name(elem, depth + 1)?)
            }
            KIND_FUNC_PROTO => format!("fn({} params)", ty.vlen),
            kind => named(kind_name(kind)),
        })
    }
}

#[cfg(test)]
mod tests;
