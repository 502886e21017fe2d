//! Unit tests on small hand-built BTF blobs.

use super::*;
use proptest::prelude::*;

/// A tiny BTF writer: types get ids 1, 2, ... in the order they are added.
struct Builder {
    types: Vec<u8>,
    strings: Vec<u8>,
    next_id: u32,
}

impl Builder {
    fn new() -> Self {
        Builder {
            types: Vec::new(),
            strings: vec![0],
            next_id: 1,
        }
    }

    fn str(&mut self, s: &str) -> u32 {
        if s.is_empty() {
            return 0;
        }
        let off = self.strings.len() as u32;
        self.strings.extend_from_slice(s.as_bytes());
        self.strings.push(0);
        off
    }

    fn u32(&mut self, v: u32) {
        self.types.extend_from_slice(&v.to_le_bytes());
    }

    /// A type record header with a name offset as given (possibly out of range).
    fn rec_raw(&mut self, name_off: u32, kind: u32, vlen: u32, kind_flag: bool, x: u32) -> u32 {
        self.u32(name_off);
        self.u32((u32::from(kind_flag) << 31) | (kind << 24) | vlen);
        self.u32(x);
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    fn rec(&mut self, name: &str, kind: u32, vlen: u32, kind_flag: bool, x: u32) -> u32 {
        let off = self.str(name);
        self.rec_raw(off, kind, vlen, kind_flag, x)
    }

    fn int_enc(&mut self, name: &str, size: u32, bit_offset: u32, nr_bits: u32) -> u32 {
        let id = self.rec(name, KIND_INT, 0, false, size);
        self.u32((bit_offset << 16) | nr_bits);
        id
    }

    fn int(&mut self, name: &str, size: u32) -> u32 {
        self.int_enc(name, size, 0, size * 8)
    }

    fn ptr(&mut self, target: u32) -> u32 {
        self.rec("", KIND_PTR, 0, false, target)
    }

    fn modifier(&mut self, kind: u32, target: u32) -> u32 {
        self.rec("", kind, 0, false, target)
    }

    fn typedef(&mut self, name: &str, target: u32) -> u32 {
        self.rec(name, KIND_TYPEDEF, 0, false, target)
    }

    fn array(&mut self, elem: u32, index: u32, nelems: u32) -> u32 {
        let id = self.rec("", KIND_ARRAY, 0, false, 0);
        self.u32(elem);
        self.u32(index);
        self.u32(nelems);
        id
    }

    /// A struct or union; members are (name, type, bit offset, bitfield size). With
    /// `kind_flag` the bitfield size is packed into the offset's top byte.
    fn composite(
        &mut self,
        kind: u32,
        name: &str,
        size: u32,
        kind_flag: bool,
        members: &[(&str, u32, u32, u32)],
    ) -> u32 {
        let id = self.rec(name, kind, members.len() as u32, kind_flag, size);
        for &(m, ty, bit_offset, bits) in members {
            let off = self.str(m);
            self.u32(off);
            self.u32(ty);
            self.u32(if kind_flag {
                (bits << 24) | bit_offset
            } else {
                bit_offset
            });
        }
        id
    }

    fn structure(&mut self, name: &str, size: u32, members: &[(&str, u32, u32)]) -> u32 {
        let members: Vec<_> = members.iter().map(|&(n, t, o)| (n, t, o, 0)).collect();
        self.composite(KIND_STRUCT, name, size, false, &members)
    }

    fn union(&mut self, name: &str, size: u32, members: &[(&str, u32, u32)]) -> u32 {
        let members: Vec<_> = members.iter().map(|&(n, t, o)| (n, t, o, 0)).collect();
        self.composite(KIND_UNION, name, size, false, &members)
    }

    fn func_proto(&mut self, ret: u32, params: &[(&str, u32)]) -> u32 {
        let id = self.rec("", KIND_FUNC_PROTO, params.len() as u32, false, ret);
        for &(p, ty) in params {
            let off = self.str(p);
            self.u32(off);
            self.u32(ty);
        }
        id
    }

    fn enumeration(&mut self, name: &str, values: &[(&str, u32)]) -> u32 {
        let id = self.rec(name, KIND_ENUM, values.len() as u32, false, 4);
        for &(v, val) in values {
            let off = self.str(v);
            self.u32(off);
            self.u32(val);
        }
        id
    }

    fn build(&self) -> Vec<u8> {
        blob(&self.types, &self.strings)
    }
}

/// A BTF blob of a type section and a string section, header lengths as given.
fn blob_with(types: &[u8], strings: &[u8], type_len: u32, str_len: u32) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&MAGIC.to_le_bytes());
    out.push(VERSION);
    out.push(0);
    for v in [24, 0, type_len, types.len() as u32, str_len] {
        out.extend_from_slice(&u32::to_le_bytes(v));
    }
    out.extend_from_slice(types);
    out.extend_from_slice(strings);
    out
}

fn blob(types: &[u8], strings: &[u8]) -> Vec<u8> {
    blob_with(types, strings, types.len() as u32, strings.len() as u32)
}

/// Ids of the sample's types, fixed by the order `sample` adds them.
const INT: u32 = 1;
const PID_T: u32 = 11;
const TASK: u32 = 15;

/// A kernel-like sample: `task` with a pid typedef, kind_flag bitfields, a self pointer, an
/// embedded (const) `qstr` that holds an anonymous union holding an anonymous struct, a char
/// array, typedef/const/volatile chains; an old-style INT bitfield struct; a tracepoint-like
/// typedef to a pointer to a FUNC_PROTO; a typedef loop; a self-nesting anonymous struct.
fn sample() -> Builder {
    let mut b = Builder::new();
    let int = b.int("int", 4); // 1
    let ulong = b.int("long unsigned int", 8); // 2
    let char_ = b.int("char", 1); // 3
    let char_ptr = b.ptr(char_); // 4
    let const_char = b.modifier(KIND_CONST, char_); // 5
    let const_char_ptr = b.ptr(const_char); // 6
    let hash_len = b.structure("", 8, &[("hash", int, 0), ("len", int, 32)]); // 7
    let anon_union = b.union("", 8, &[("", hash_len, 0), ("hash_len", ulong, 0)]); // 8
    let qstr = b.structure(
        "qstr",
        16,
        &[("", anon_union, 0), ("name", const_char_ptr, 64)],
    ); // 9
    let const_qstr = b.modifier(KIND_CONST, qstr); // 10
    let pid_t = b.typedef("pid_t", int); // 11
    assert_eq!(pid_t, PID_T);
    let comm = b.array(char_, int, 16); // 12
    let volatile_qstr = b.modifier(KIND_VOLATILE, const_qstr); // 13
    let qstr_t = b.typedef("qstr_t", volatile_qstr); // 14
    let task_ptr = TASK + 1;
    let task = b.composite(
        KIND_STRUCT,
        "task",
        96,
        true,
        &[
            ("pid", pid_t, 0, 0),
            ("flags", int, 32, 3),
            ("mode", int, 35, 5),
            ("parent", task_ptr, 64, 0),
            ("d_name", const_qstr, 128, 0),
            ("comm", comm, 256, 0),
            ("odd", char_, 389, 0),
            ("alias", qstr_t, 512, 0),
            ("names", TASK + 2, 640, 0),
            ("fn_ptr", TASK + 5, 704, 0),
        ],
    ); // 15
    assert_eq!(task, TASK);
    assert_eq!(b.ptr(task), task_ptr); // 16
    let two_ptrs = b.array(char_ptr, int, 2); // 17
    let void_ptr = b.ptr(0); // 18
    let restrict_ptr = b.modifier(KIND_RESTRICT, void_ptr); // 19
    let tagged = b.modifier(KIND_TYPE_TAG, restrict_ptr); // 20
    assert_eq!(two_ptrs, TASK + 2);
    assert_eq!(void_ptr, TASK + 3);
    assert_eq!(tagged, TASK + 5);
    // Old style: no kind_flag, the INT encoding carries the bitfield.
    let three_bits = b.int_enc("unsigned int", 4, 0, 3); // 21
    b.structure("old", 8, &[("bits", three_bits, 0), ("whole", int, 32)]); // 22
    // btf_trace_exec: typedef -> PTR -> FUNC_PROTO(void *ctx, struct task *, pid_t, char **).
    let char_ptr_ptr = b.ptr(char_ptr); // 23
    let proto = b.func_proto(
        0,
        &[
            ("__data", void_ptr),
            ("", task_ptr),
            ("", pid_t),
            ("argv", char_ptr_ptr),
        ],
    ); // 24
    let proto_ptr = b.ptr(proto); // 25
    b.typedef("btf_trace_exec", proto_ptr); // 26
    b.typedef("direct_proto", proto); // 27
    b.typedef("not_proto", int); // 28
    // A typedef loop: loop_a -> loop_b -> loop_a.
    let loop_a = b.typedef("loop_a", 30); // 29
    b.typedef("loop_b", loop_a); // 30
    b.typedef("loop_ptr", 33); // 31
    b.structure("loopy", 8, &[("x", loop_a, 0)]); // 32
    b.ptr(29); // 33: loop_ptr -> PTR -> loop_a (cycle behind a pointer)
    // A struct with an anonymous member of its own type (a loop through anonymous members).
    b.structure("cyclic", 8, &[("", 34, 0), ("here", int, 32)]); // 34
    // A member typed with a forward declaration and one with a bad type id.
    let fwd = b.rec("opaque", KIND_FWD, 0, false, 0); // 35
    b.structure(
        "odd_types",
        16,
        &[("fwd", fwd, 0), ("bad", 9999, 64), ("void", 0, 96)],
    ); // 36
    b.enumeration("color", &[("RED", 0), ("GREEN", 1)]); // 37
    b.structure("with_enum", 4, &[("c", 37, 0)]); // 38
    // A UNION named like a struct (not a STRUCT), then two structs of one name.
    b.union("dup", 4, &[("u", int, 0)]); // 39
    b.structure("dup", 8, &[("first", int, 0)]); // 40
    b.structure("dup", 8, &[("second", int, 0)]); // 41
    b
}

fn sample_btf() -> Btf {
    Btf::parse(&sample().build()).expect("sample parses")
}

/// Anonymous structs nested `depth` deep, the innermost holding `deep`.
fn nested(depth: u32) -> Btf {
    let mut b = Builder::new();
    let int = b.int("int", 4);
    let mut inner = b.structure("", 4, &[("deep", int, 0)]);
    for _ in 0..depth {
        inner = b.structure("", 4, &[("", inner, 0)]);
    }
    b.structure("top", 4, &[("", inner, 0)]);
    Btf::parse(&b.build()).expect("nested parses")
}

#[test]
fn parses_the_sample() {
    let btf = sample_btf();
    assert_eq!(btf.type_count(), 41);
    assert_eq!(btf.struct_id("task").unwrap(), TASK);
    assert_eq!(btf.struct_id("qstr").unwrap(), 9);
    assert!(format!("{btf:?}").contains("types: 41"));
}

#[test]
fn plain_members() {
    let btf = sample_btf();
    assert_eq!(btf.member_offset("task", &["pid"]).unwrap(), 0);
    assert_eq!(btf.member_offset("task", &["parent"]).unwrap(), 8);
    assert_eq!(btf.member_offset("task", &["d_name"]).unwrap(), 16);
    assert_eq!(btf.member_offset("task", &["comm"]).unwrap(), 32);
    assert_eq!(btf.member_offset("task", &["alias"]).unwrap(), 64);
    assert_eq!(btf.member_offset("task", &["names"]).unwrap(), 80);
    assert_eq!(btf.member_offset("task", &["fn_ptr"]).unwrap(), 88);
    assert_eq!(btf.member_offset("old", &["whole"]).unwrap(), 4);
}

#[test]
fn embedded_struct_offsets_add_up_through_const() {
    let btf = sample_btf();
    assert_eq!(btf.member_offset("qstr", &["name"]).unwrap(), 8);
    assert_eq!(btf.member_offset("task", &["d_name", "name"]).unwrap(), 24);
    // Through typedef -> volatile -> const -> struct.
    assert_eq!(btf.member_offset("task", &["alias", "name"]).unwrap(), 72);
    assert_eq!(btf.member_size("task", &["alias", "name"]).unwrap(), 8);
}

#[test]
fn anonymous_union_and_struct_members() {
    let btf = sample_btf();
    assert_eq!(btf.member_offset("qstr", &["hash_len"]).unwrap(), 0);
    assert_eq!(btf.member_offset("qstr", &["hash"]).unwrap(), 0);
    assert_eq!(btf.member_offset("qstr", &["len"]).unwrap(), 4);
    assert_eq!(btf.member_offset("task", &["d_name", "len"]).unwrap(), 20);
    assert_eq!(btf.member_size("task", &["d_name", "len"]).unwrap(), 4);
    assert_eq!(btf.member_size("task", &["d_name", "hash_len"]).unwrap(), 8);
    assert_eq!(btf.member_offset("cyclic", &["here"]).unwrap(), 4);
    assert_eq!(
        nested(MAX_ANON_DEPTH as u32 - 1)
            .member_offset("top", &["deep"])
            .unwrap(),
        0
    );
}

#[test]
fn sizes() {
    let btf = sample_btf();
    assert_eq!(btf.member_size("task", &["pid"]).unwrap(), 4);
    assert_eq!(btf.member_size("task", &["parent"]).unwrap(), 8);
    assert_eq!(btf.member_size("task", &["d_name"]).unwrap(), 16);
    assert_eq!(btf.member_size("task", &["comm"]).unwrap(), 16);
    assert_eq!(btf.member_size("task", &["alias"]).unwrap(), 16);
    assert_eq!(btf.member_size("task", &["names"]).unwrap(), 16);
    assert_eq!(btf.member_size("task", &["fn_ptr"]).unwrap(), 8);
    assert_eq!(btf.member_size("with_enum", &["c"]).unwrap(), 4);
}

#[test]
fn first_struct_of_a_name_wins() {
    let btf = sample_btf();
    assert_eq!(btf.struct_id("dup").unwrap(), 40);
    assert_eq!(btf.member_offset("dup", &["first"]).unwrap(), 0);
    assert!(matches!(
        btf.member_offset("dup", &["second"]),
        Err(BtfError::MemberNotFound { .. })
    ));
    // A UNION of the name is not a STRUCT.
    assert!(matches!(
        btf.member_offset("dup", &["u"]),
        Err(BtfError::MemberNotFound { .. })
    ));
}

#[test]
fn func_proto_behind_typedef() {
    let btf = sample_btf();
    assert_eq!(btf.typedef_proto_params("btf_trace_exec").unwrap(), 4);
    assert_eq!(btf.typedef_proto_params("direct_proto").unwrap(), 4);
    let sig = btf.typedef_proto_signature("btf_trace_exec").unwrap();
    let got: Vec<_> = sig
        .iter()
        .map(|p| (p.name.as_str(), p.type_name.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            ("__data", "void *"),
            ("", "struct task *"),
            ("", "pid_t"),
            ("argv", "char **"),
        ]
    );
    assert!(matches!(
        btf.typedef_proto_params("not_proto"),
        Err(BtfError::NotFuncProto { ref name, kind: "INT" }) if name == "not_proto"
    ));
    assert!(matches!(
        btf.typedef_proto_params("nope"),
        Err(BtfError::TypedefNotFound(ref n)) if n == "nope"
    ));
    assert!(matches!(
        btf.typedef_proto_params("loop_a"),
        Err(BtfError::ChainTooLong {
            id: 29,
            max: MAX_CHAIN
        })
    ));
    assert!(matches!(
        btf.typedef_proto_params("loop_ptr"),
        Err(BtfError::ChainTooLong {
            id: 29,
            max: MAX_CHAIN
        })
    ));
}

#[test]
fn bitfields_are_errors() {
    let btf = sample_btf();
    let err = btf.member_offset("task", &["flags"]).unwrap_err();
    assert!(
        matches!(
            err,
            BtfError::Bitfield { ref struct_name, ref member, bit_offset: 32, bits: 3 }
                if struct_name == "task" && member == "flags"
        ),
        "{err}"
    );
    assert!(matches!(
        btf.member_offset("task", &["mode"]),
        Err(BtfError::Bitfield {
            bit_offset: 35,
            bits: 5,
            ..
        })
    ));
    assert!(matches!(
        btf.member_size("task", &["mode"]),
        Err(BtfError::Bitfield { .. })
    ));
    // Old style: the INT encoding says 3 bits.
    assert!(matches!(
        btf.member_offset("old", &["bits"]),
        Err(BtfError::Bitfield {
            bit_offset: 0,
            bits: 3,
            ..
        })
    ));
    assert!(matches!(
        btf.member_offset("task", &["odd"]),
        Err(BtfError::Unaligned {
            bit_offset: 389,
            ..
        })
    ));
}

#[test]
fn lookup_errors() {
    let btf = sample_btf();
    assert!(matches!(
        btf.struct_id("nope"),
        Err(BtfError::StructNotFound(ref n)) if n == "nope"
    ));
    assert!(matches!(
        btf.member_offset("nope", &["pid"]),
        Err(BtfError::StructNotFound(_))
    ));
    let err = btf.member_offset("task", &["d_name", "nam"]).unwrap_err();
    assert!(
        matches!(
            err,
            BtfError::MemberNotFound { ref struct_name, ref member }
                if struct_name == "task" && member == "d_name.nam"
        ),
        "{err}"
    );
    assert_eq!(err.to_string(), "struct task has no member d_name.nam");
    assert!(matches!(
        btf.member_offset("task", &["pidd"]),
        Err(BtfError::MemberNotFound { ref member, .. }) if member == "pidd"
    ));
    assert!(matches!(
        btf.member_offset("task", &[""]),
        Err(BtfError::MemberNotFound { .. })
    ));
    assert!(matches!(
        btf.member_offset("task", &[]),
        Err(BtfError::EmptyPath { ref struct_name }) if struct_name == "task"
    ));
    // A missing member behind a loop of anonymous members terminates.
    assert!(matches!(
        btf.member_offset("cyclic", &["absent"]),
        Err(BtfError::MemberNotFound { .. })
    ));
}

#[test]
fn path_through_a_non_struct() {
    let btf = sample_btf();
    let err = btf.member_offset("task", &["parent", "pid"]).unwrap_err();
    assert!(
        matches!(
            err,
            BtfError::NotComposite { ref struct_name, ref member, kind: "PTR" }
                if struct_name == "task" && member == "parent"
        ),
        "{err}"
    );
    assert!(matches!(
        btf.member_offset("task", &["comm", "x"]),
        Err(BtfError::NotComposite { kind: "ARRAY", .. })
    ));
    assert!(matches!(
        btf.member_offset("task", &["pid", "x"]),
        Err(BtfError::NotComposite { kind: "INT", .. })
    ));
}

#[test]
fn bad_types_behind_members() {
    let btf = sample_btf();
    assert!(matches!(
        btf.member_size("loopy", &["x"]),
        Err(BtfError::ChainTooLong {
            id: 29,
            max: MAX_CHAIN
        })
    ));
    assert!(matches!(
        btf.member_size("odd_types", &["fwd"]),
        Err(BtfError::NoSize {
            id: 35,
            kind: "FWD"
        })
    ));
    assert!(matches!(
        btf.member_size("odd_types", &["void"]),
        Err(BtfError::NoSize {
            id: 0,
            kind: "void"
        })
    ));
    assert_eq!(btf.member_offset("odd_types", &["fwd"]).unwrap(), 0);
    assert!(matches!(
        btf.member_offset("odd_types", &["bad"]),
        Err(BtfError::TypeIdOutOfRange { id: 9999, max: 41 })
    ));
    assert!(matches!(
        btf.member_size("odd_types", &["bad"]),
        Err(BtfError::TypeIdOutOfRange { id: 9999, max: 41 })
    ));
}

#[test]
fn anonymous_nesting_is_bounded() {
    assert!(matches!(
        nested(MAX_ANON_DEPTH as u32).member_offset("top", &["deep"]),
        Err(BtfError::NestingTooDeep { ref struct_name, max: MAX_ANON_DEPTH }) if struct_name == "top"
    ));
}

#[test]
fn oversized_array_is_overflow() {
    let mut b = Builder::new();
    let int = b.int("int", 4);
    let big = b.array(int, int, u32::MAX);
    b.structure("s", 4, &[("a", big, 0)]);
    let btf = Btf::parse(&b.build()).unwrap();
    assert!(matches!(
        btf.member_size("s", &["a"]),
        Err(BtfError::Overflow { ref member, .. }) if member == "a"
    ));
}

#[test]
fn header_errors() {
    let good = sample().build();
    assert!(matches!(
        Btf::parse(&good[..23]),
        Err(BtfError::TruncatedHeader { len: 23, need: 24 })
    ));
    let mut bad = good.clone();
    bad[0..2].copy_from_slice(&[0xeb, 0x9f]); // big-endian magic
    assert!(matches!(
        Btf::parse(&bad),
        Err(BtfError::BadMagic { found: 0x9feb })
    ));
    let mut bad = good.clone();
    bad[2] = 2;
    assert!(matches!(
        Btf::parse(&bad),
        Err(BtfError::BadVersion { found: 2 })
    ));
    let mut bad = good.clone();
    bad[4..8].copy_from_slice(&16u32.to_le_bytes());
    assert!(matches!(
        Btf::parse(&bad),
        Err(BtfError::BadHeaderLen { hdr_len: 16 })
    ));
    let mut bad = good.clone();
    bad[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        Btf::parse(&bad),
        Err(BtfError::TruncatedHeader { .. })
    ));
    let mut bad = good.clone();
    bad[8..12].copy_from_slice(&u32::MAX.to_le_bytes()); // type_off
    assert!(matches!(
        Btf::parse(&bad),
        Err(BtfError::TruncatedSection {
            section: "type",
            ..
        })
    ));
    let mut bad = good.clone();
    bad[20..24].copy_from_slice(&u32::MAX.to_le_bytes()); // str_len
    assert!(matches!(
        Btf::parse(&bad),
        Err(BtfError::TruncatedSection {
            section: "string",
            ..
        })
    ));
    // An empty BTF (no types, one empty string) is fine.
    let empty = Btf::parse(&blob(&[], &[0])).unwrap();
    assert_eq!(empty.type_count(), 0);
    assert!(matches!(
        empty.struct_id("task"),
        Err(BtfError::StructNotFound(_))
    ));
}

#[test]
fn unknown_kind() {
    let mut b = Builder::new();
    b.int("int", 4);
    b.rec("weird", 20, 0, false, 0);
    assert!(matches!(
        Btf::parse(&b.build()),
        Err(BtfError::UnknownKind { id: 2, kind: 20 })
    ));
    let mut b = Builder::new();
    b.rec("", 0, 0, false, 0); // kind 0 (UNKN) is not a type record either
    assert!(matches!(
        Btf::parse(&b.build()),
        Err(BtfError::UnknownKind { id: 1, kind: 0 })
    ));
}

#[test]
fn string_offsets_out_of_range() {
    let mut b = Builder::new();
    b.int("int", 4);
    let len = b.strings.len() as u32;
    b.rec_raw(len, KIND_STRUCT, 0, false, 0);
    assert!(matches!(
        Btf::parse(&b.build()),
        Err(BtfError::StringOutOfRange { offset, len: l }) if offset == len && l == len as usize
    ));
    // A member name out of range.
    let mut b = Builder::new();
    let int = b.int("int", 4);
    b.structure("s", 4, &[("m", int, 0)]);
    let member_name_at = b.types.len() - 12;
    b.types[member_name_at..member_name_at + 4].copy_from_slice(&1000u32.to_le_bytes());
    assert!(matches!(
        Btf::parse(&b.build()),
        Err(BtfError::StringOutOfRange { offset: 1000, .. })
    ));
    // An unterminated last string.
    let mut b = Builder::new();
    b.int("int", 4);
    b.strings.pop();
    assert!(matches!(
        Btf::parse(&b.build()),
        Err(BtfError::StringOutOfRange { offset: 1, .. })
    ));
}

#[test]
fn truncated_type_records() {
    let mut b = Builder::new();
    b.int("int", 4);
    b.structure("s", 4, &[("m", 1, 0)]);
    let types = &b.types;
    assert!(matches!(
        Btf::parse(&blob(&types[..types.len() - 1], &b.strings)),
        Err(BtfError::TruncatedType { id: 2, offset: 16 })
    ));
    assert!(matches!(
        Btf::parse(&blob(&types[..20], &b.strings)),
        Err(BtfError::TruncatedType { id: 2, offset: 16 })
    ));
    assert!(matches!(
        Btf::parse(&blob(&types[..15], &b.strings)),
        Err(BtfError::TruncatedType { id: 1, offset: 0 })
    ));
}

#[test]
fn io_error_names_the_path() {
    let err = Btf::from_file("/nonexistent/kbtf/vmlinux").unwrap_err();
    assert!(
        matches!(err, BtfError::Io { ref path, .. } if path.as_path() == Path::new("/nonexistent/kbtf/vmlinux"))
    );
    assert!(
        err.to_string()
            .starts_with("reading /nonexistent/kbtf/vmlinux: "),
        "{err}"
    );
}

/// Every question of the tests, asked of any parsed blob: none may panic.
fn ask_everything(btf: &Btf) {
    for name in [
        "task",
        "qstr",
        "old",
        "loopy",
        "cyclic",
        "odd_types",
        "with_enum",
        "dup",
        "",
    ] {
        let _ = btf.struct_id(name);
        for path in [
            &["pid"][..],
            &["parent"],
            &["d_name", "name"],
            &["d_name", "len"],
            &["alias", "name"],
            &["comm"],
            &["names"],
            &["flags"],
            &["bits"],
            &["x"],
            &["here"],
            &["absent"],
            &["fwd"],
            &["bad"],
            &["void"],
            &["c"],
            &["parent", "pid"],
        ] {
            let _ = btf.member_offset(name, path);
            let _ = btf.member_size(name, path);
        }
    }
    for name in [
        "btf_trace_exec",
        "direct_proto",
        "not_proto",
        "loop_a",
        "loop_ptr",
        "pid_t",
    ] {
        let _ = btf.typedef_proto_params(name);
        let _ = btf.typedef_proto_signature(name);
    }
}

#[test]
fn every_prefix_of_the_blob_is_an_error_never_a_panic() {
    let full = sample().build();
    for len in 0..full.len() {
        match Btf::parse(&full[..len]) {
            Err(BtfError::TruncatedHeader { .. }) if len < 24 => {}
            Err(BtfError::TruncatedSection { .. }) if len >= 24 => {}
            other => panic!("prefix {len}: {other:?}"),
        }
    }
    ask_everything(&Btf::parse(&full).unwrap());
}

#[test]
fn every_cut_of_the_type_section_parses_or_fails_cleanly() {
    let b = sample();
    // Record boundaries, from the parse of the whole section.
    let whole = Btf::parse(&b.build()).unwrap();
    let mut boundaries: Vec<usize> = whole.offsets.iter().map(|&o| o as usize).collect();
    boundaries.push(b.types.len());
    for cut in 0..=b.types.len() {
        let types = &b.types[..cut];
        match Btf::parse(&blob(types, &b.strings)) {
            Ok(btf) => {
                assert!(boundaries.contains(&cut), "cut {cut} parsed");
                assert_eq!(
                    btf.type_count(),
                    boundaries.iter().position(|&x| x == cut).unwrap()
                );
                ask_everything(&btf);
            }
            Err(BtfError::TruncatedType { .. }) => assert!(!boundaries.contains(&cut)),
            Err(other) => panic!("cut {cut}: {other:?}"),
        }
    }
    // And every cut of the string section.
    for cut in 0..=b.strings.len() {
        if let Ok(btf) = Btf::parse(&blob(&b.types, &b.strings[..cut])) {
            assert_eq!(cut, b.strings.len());
            ask_everything(&btf);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Random byte changes to the sample blob never panic, whatever they hit.
    #[test]
    fn mutated_blobs_never_panic(
        changes in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..16)
    ) {
        let mut bytes = sample().build();
        for (at, byte) in changes {
            let i = at.index(bytes.len());
            bytes[i] = byte;
        }
        if let Ok(btf) = Btf::parse(&bytes) {
            ask_everything(&btf);
        }
    }

    /// Random type sections behind a valid header never panic.
    #[test]
    fn random_type_sections_never_panic(
        types in prop::collection::vec(any::<u8>(), 0..512),
        strings in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        if let Ok(btf) = Btf::parse(&blob(&types, &strings)) {
            ask_everything(&btf);
            for id in 0..=btf.type_count() as u32 + 1 {
                let _ = btf.type_size(id);
                let _ = btf.type_name(id, 0);
            }
        }
    }
}

#[test]
fn pid_is_a_typedef_of_int() {
    let btf = sample_btf();
    assert_eq!(btf.type_name(PID_T, 0).unwrap(), "pid_t");
    assert_eq!(btf.type_name(INT, 0).unwrap(), "int");
    assert_eq!(btf.type_name(6, 0).unwrap(), "const char *");
    assert_eq!(btf.type_name(12, 0).unwrap(), "char[16]");
    assert_eq!(btf.type_name(20, 0).unwrap(), "void * restrict");
}
