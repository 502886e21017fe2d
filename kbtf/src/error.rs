//! The one error type of the crate.

use std::path::PathBuf;

/// Everything that can go wrong reading BTF or answering a question about it.
///
/// Member errors name the struct the question started from (`struct_name`) and the member path
/// up to and including the step that failed, dotted (`member`, e.g. `d_name.nam`).
#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    /// The BTF file could not be read.
    #[error("reading {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The first two bytes are not the little-endian BTF magic 0xeb9f.
    #[error("bad BTF magic {found:#06x} (expected 0xeb9f, little-endian)")]
    BadMagic { found: u16 },
    /// A BTF version other than 1.
    #[error("unsupported BTF version {found} (expected 1)")]
    BadVersion { found: u8 },
    /// Fewer bytes than the 24-byte header, or than the header's own `hdr_len`.
    #[error("BTF header truncated: {len} bytes, need {need}")]
    TruncatedHeader { len: usize, need: u64 },
    /// `hdr_len` smaller than the 24 bytes of the fields it must hold.
    #[error("BTF header length {hdr_len} is smaller than 24")]
    BadHeaderLen { hdr_len: u32 },
    /// The type or string section runs past the end of the blob.
    #[error("BTF {section} section [{start}, {end}) runs past the end of the {len}-byte blob")]
    TruncatedSection {
        section: &'static str,
        start: u64,
        end: u64,
        len: usize,
    },
    /// A type record (or its trailing data) runs past the end of the type section.
    #[error("BTF type {id} at type-section offset {offset} is truncated")]
    TruncatedType { id: u32, offset: usize },
    /// A reference to a type id that does not exist.
    #[error("type id {id} out of range (the BTF has types 1..={max})")]
    TypeIdOutOfRange { id: u32, max: u32 },
    /// A type record of a kind this reader does not know.
    #[error("type id {id} has unknown kind {kind}")]
    UnknownKind { id: u32, kind: u32 },
    /// A name offset past the string section, or a string with no terminating NUL.
    #[error("string offset {offset} out of range or unterminated (string section is {len} bytes)")]
    StringOutOfRange { offset: u32, len: usize },
    /// No STRUCT type of that name.
    #[error("struct {0:?} not found")]
    StructNotFound(String),
    /// No TYPEDEF of that name.
    #[error("typedef {0:?} not found")]
    TypedefNotFound(String),
    /// An empty member path.
    #[error("empty member path for struct {struct_name:?}")]
    EmptyPath { struct_name: String },
    /// The struct (or an embedded struct on the path) has no member of that name.
    #[error("struct {struct_name} has no member {member}")]
    MemberNotFound { struct_name: String, member: String },
    /// The member is a bitfield: it has no byte offset.
    #[error(
        "{struct_name}.{member} is a {bits}-bit bitfield at bit offset {bit_offset}, not byte-addressable"
    )]
    Bitfield {
        struct_name: String,
        member: String,
        bit_offset: u64,
        bits: u32,
    },
    /// The member starts inside a byte (not a bitfield, but not byte-aligned either).
    #[error("{struct_name}.{member} is at bit offset {bit_offset}, not on a byte boundary")]
    Unaligned {
        struct_name: String,
        member: String,
        bit_offset: u64,
    },
    /// A path step that is not the last names a member that is not an embedded struct/union.
    #[error("{struct_name}.{member} is a {kind}, not an embedded struct or union")]
    NotComposite {
        struct_name: String,
        member: String,
        kind: &'static str,
    },
    /// The typedef does not resolve (through at most one pointer) to a FUNC_PROTO.
    #[error("typedef {name:?} is not a function prototype or a pointer to one (found {kind})")]
    NotFuncProto { name: String, kind: &'static str },
    /// A type that has no size (void, FWD, FUNC, FUNC_PROTO, VAR, DATASEC, DECL_TAG).
    #[error("type id {id} ({kind}) has no size")]
    NoSize { id: u32, kind: &'static str },
    /// A typedef/modifier/array chain longer than the resolution bound (or a loop).
    #[error("type chain from type id {id} is longer than {max} steps (a loop?)")]
    ChainTooLong { id: u32, max: usize },
    /// Anonymous struct/union members nested deeper than the search bound.
    #[error("anonymous members of struct {struct_name} nested deeper than {max} levels")]
    NestingTooDeep { struct_name: String, max: usize },
    /// An offset or size that does not fit in a u32.
    #[error("{struct_name}.{member}: offset or size does not fit in 32 bits")]
    Overflow { struct_name: String, member: String },
}
