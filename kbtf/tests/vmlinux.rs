//! The reader against the running kernel's BTF, `/sys/kernel/btf/vmlinux` (skipped, with a note,
//! where the file is absent).
//!
//! The answers are compared with what `bpftool btf dump file /sys/kernel/btf/vmlinux format raw`
//! says at test time (an independent decoder: its text output is parsed here and walked by the
//! same lookup rules), for the members the daemon needs and for every direct named member of
//! every struct. The constants below are the answers on the kernel they were recorded on
//! ([`RECORDED_ON`], from `bpftool`); they are asserted only on that kernel, since another
//! kernel (version or config) may lay the structs out differently.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;

use kbtf::{Btf, BtfError, VMLINUX_PATH};

/// The kernel release (`/proc/sys/kernel/osrelease`) the constants were recorded on.
const RECORDED_ON: &str = "6.18.44-fc-v1272";

/// (struct, member path, byte offset) on [`RECORDED_ON`].
const OFFSETS: &[(&str, &[&str], u32)] = &[
    ("task_struct", &["pid"], 1264),
    ("task_struct", &["tgid"], 1268),
    ("task_struct", &["real_parent"], 1280),
    ("task_struct", &["group_leader"], 1328),
    ("task_struct", &["start_boottime"], 1560),
    ("task_struct", &["mm"], 1136),
    ("task_struct", &["comm"], 1752),
    ("mm_struct", &["arg_start"], 488),
    ("mm_struct", &["arg_end"], 496),
    ("linux_binprm", &["filename"], 96),
    ("linux_binprm", &["file"], 64),
    ("file", &["f_path"], 64),
    ("path", &["dentry"], 8),
    ("dentry", &["d_name"], 32),
    ("dentry", &["d_name", "name"], 40),
    ("sock_common", &["skc_daddr"], 0),
    ("sock_common", &["skc_dport"], 12),
    ("sock_common", &["skc_family"], 16),
];

/// (struct, member path, size in bytes) on [`RECORDED_ON`].
const SIZES: &[(&str, &[&str], u32)] = &[
    ("task_struct", &["comm"], 16),
    ("task_struct", &["pid"], 4),
    ("task_struct", &["real_parent"], 8),
    ("task_struct", &["start_boottime"], 8),
    ("dentry", &["d_name"], 16),
    ("sock_common", &["skc_daddr"], 4),
    ("sock_common", &["skc_dport"], 2),
    ("sock_common", &["skc_family"], 2),
];

/// (typedef, parameter count) on [`RECORDED_ON`].
const PROTOS: &[(&str, usize)] = &[("btf_trace_sched_process_exec", 4)];

fn kernel_btf() -> Option<Btf> {
    if !Path::new(VMLINUX_PATH).exists() {
        eprintln!("note: {VMLINUX_PATH} is absent: skipping the real-kernel BTF test");
        return None;
    }
    Some(Btf::from_sys_fs().expect("the kernel's BTF parses"))
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// One type as `bpftool ... format raw` prints it.
#[derive(Debug, Default)]
struct Rec {
    kind: String,
    name: String,
    /// `key=value` fields of the header line (`size`, `type_id`, `vlen`, `nr_elems`, ...).
    fields: HashMap<String, String>,
    /// Member or parameter lines: name, `type_id`, `bits_offset`, `bitfield_size`.
    members: Vec<(String, u32, u64, u32)>,
}

const ANON: &str = "(anon)";

/// `'name' k=v k=v`: the quoted name and the fields.
fn quoted_and_fields(s: &str) -> Option<(String, HashMap<String, String>)> {
    let open = s.find('\'')?;
    let close = open + 1 + s[open + 1..].find('\'')?;
    let fields = s[close + 1..]
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    Some((s[open + 1..close].to_owned(), fields))
}

/// The dump, by type id.
struct Dump {
    recs: HashMap<u32, Rec>,
    /// Ids in dump order, with kind and name, for first-match lookups.
    order: Vec<u32>,
}

fn num<T: std::str::FromStr>(fields: &HashMap<String, String>, key: &str) -> Option<T> {
    fields.get(key)?.parse().ok()
}

impl Dump {
    fn parse(text: &str) -> Dump {
        let mut recs = HashMap::new();
        let mut order = Vec::new();
        let mut current: Option<u32> = None;
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix('[') {
                let (id, rest) = rest.split_once("] ").expect("a [id] KIND line");
                let id: u32 = id.parse().expect("a numeric type id");
                let (kind, rest) = rest.split_once(' ').unwrap_or((rest, ""));
                let (name, fields) = quoted_and_fields(rest).unwrap_or_default();
                recs.insert(
                    id,
                    Rec {
                        kind: kind.to_owned(),
                        name,
                        fields,
                        members: Vec::new(),
                    },
                );
                order.push(id);
                current = Some(id);
            } else if let Some(rest) = line.strip_prefix('\t') {
                let Some((name, fields)) = quoted_and_fields(rest) else {
                    continue; // DATASEC entries: no name
                };
                let Some(type_id) = num(&fields, "type_id") else {
                    continue; // ENUM values
                };
                let rec = recs
                    .get_mut(&current.expect("a member after a type"))
                    .unwrap();
                rec.members.push((
                    name,
                    type_id,
                    num(&fields, "bits_offset").unwrap_or(0),
                    num(&fields, "bitfield_size").unwrap_or(0),
                ));
            }
        }
        Dump { recs, order }
    }

    fn first(&self, kind: &str, name: &str) -> Option<u32> {
        self.order
            .iter()
            .copied()
            .find(|id| self.recs[id].kind == kind && self.recs[id].name == name)
    }

    fn skip_modifiers(&self, mut id: u32) -> Option<&Rec> {
        for _ in 0..32 {
            let rec = self.recs.get(&id)?;
            match rec.kind.as_str() {
                "TYPEDEF" | "CONST" | "VOLATILE" | "RESTRICT" | "TYPE_TAG" => {
                    id = num(&rec.fields, "type_id")?;
                }
                _ => return Some(rec),
            }
        }
        None
    }

    /// (bit offset, bitfield size, type id) of `name` in `rec`, through anonymous members.
    fn find(&self, rec: &Rec, name: &str, depth: usize) -> Option<(u64, u32, u32)> {
        for (m, type_id, bits, bitfield) in &rec.members {
            if m == name {
                return Some((*bits, *bitfield, *type_id));
            }
            if m == ANON && depth < 32 {
                let inner = self.skip_modifiers(*type_id)?;
                if matches!(inner.kind.as_str(), "STRUCT" | "UNION")
                    && let Some((b, f, t)) = self.find(inner, name, depth + 1)
                {
                    return Some((b + bits, f, t));
                }
            }
        }
        None
    }

    /// Bit offset, bitfield size and type id of a member path, as bpftool sees it.
    fn member(&self, name: &str, path: &[&str]) -> Option<(u64, u32, u32)> {
        let mut rec = &self.recs[&self.first("STRUCT", name)?];
        let mut total = (0, 0, 0);
        for (i, step) in path.iter().enumerate() {
            let (bits, bitfield, type_id) = self.find(rec, step, 0)?;
            total = (total.0 + bits, bitfield, type_id);
            if i + 1 < path.len() {
                rec = self.skip_modifiers(type_id)?;
            }
        }
        Some(total)
    }

    fn size(&self, id: u32, depth: usize) -> Option<u64> {
        let rec = self.skip_modifiers(id)?;
        match rec.kind.as_str() {
            "PTR" => Some(8),
            "ARRAY" if depth < 32 => Some(
                num::<u64>(&rec.fields, "nr_elems")?
                    * self.size(num(&rec.fields, "type_id")?, depth + 1)?,
            ),
            "INT" | "STRUCT" | "UNION" | "ENUM" | "ENUM64" | "FLOAT" => num(&rec.fields, "size"),
            _ => None,
        }
    }

    fn proto_params(&self, typedef: &str) -> Option<usize> {
        let mut rec = self.skip_modifiers(self.first("TYPEDEF", typedef)?)?;
        if rec.kind == "PTR" {
            rec = self.skip_modifiers(num(&rec.fields, "type_id")?)?;
        }
        (rec.kind == "FUNC_PROTO").then(|| num(&rec.fields, "vlen"))?
    }
}

/// The dump, made once for all the tests of this file.
fn bpftool_dump() -> Option<&'static Dump> {
    static DUMP: OnceLock<Option<Dump>> = OnceLock::new();
    DUMP.get_or_init(run_bpftool).as_ref()
}

fn run_bpftool() -> Option<Dump> {
    for bin in ["bpftool", "/usr/sbin/bpftool", "/sbin/bpftool"] {
        let out = Command::new(bin)
            .args(["btf", "dump", "file", VMLINUX_PATH, "format", "raw"])
            .output();
        match out {
            Ok(out) if out.status.success() => {
                return Some(Dump::parse(&String::from_utf8_lossy(&out.stdout)));
            }
            Ok(out) => eprintln!(
                "note: {bin} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Err(_) => {}
        }
    }
    eprintln!("note: bpftool is not available: not cross-checking against it");
    None
}

#[test]
fn kernel_offsets_sizes_and_protos() {
    let Some(btf) = kernel_btf() else { return };
    let release = kernel_release();
    let dump = bpftool_dump();
    let recorded = release == RECORDED_ON;
    if !recorded {
        eprintln!(
            "note: kernel {release:?} is not {RECORDED_ON:?}: the recorded constants are not asserted"
        );
    }
    for &(name, path, expected) in OFFSETS {
        let got = btf
            .member_offset(name, path)
            .unwrap_or_else(|e| panic!("{name}.{}: {e}", path.join(".")));
        if let Some(dump) = dump {
            let (bits, bitfield, _) = dump.member(name, path).expect("bpftool knows the member");
            assert_eq!(
                (u64::from(got) * 8, 0),
                (bits, bitfield),
                "{name}.{path:?} vs bpftool"
            );
        }
        if recorded {
            assert_eq!(got, expected, "{name}.{path:?}");
        }
    }
    for &(name, path, expected) in SIZES {
        let got = btf.member_size(name, path).unwrap();
        if let Some(dump) = dump {
            let (_, _, type_id) = dump.member(name, path).unwrap();
            assert_eq!(
                Some(u64::from(got)),
                dump.size(type_id, 0),
                "{name}.{path:?} size"
            );
        }
        if recorded {
            assert_eq!(got, expected, "{name}.{path:?} size");
        }
    }
    for &(typedef, expected) in PROTOS {
        let got = btf.typedef_proto_params(typedef).unwrap();
        if let Some(dump) = dump {
            assert_eq!(
                Some(got),
                dump.proto_params(typedef),
                "{typedef} vs bpftool"
            );
        }
        if recorded {
            assert_eq!(got, expected, "{typedef}");
        }
    }
}

#[test]
fn sched_process_exec_signature() {
    let Some(btf) = kernel_btf() else { return };
    let sig = btf
        .typedef_proto_signature("btf_trace_sched_process_exec")
        .unwrap();
    let types: Vec<_> = sig.iter().map(|p| p.type_name.as_str()).collect();
    // The raw tracepoint's arguments: the context, then TP_PROTO's (p, old_pid, bprm).
    assert_eq!(
        types,
        [
            "void *",
            "struct task_struct *",
            "pid_t",
            "struct linux_binprm *"
        ]
    );
}

#[test]
fn kernel_lookup_errors() {
    let Some(btf) = kernel_btf() else { return };
    assert!(matches!(
        btf.member_offset("no_such_struct_kbtf", &["x"]),
        Err(BtfError::StructNotFound(_))
    ));
    assert!(matches!(
        btf.member_offset("task_struct", &["no_such_member"]),
        Err(BtfError::MemberNotFound { .. })
    ));
    // `real_parent` is a pointer: a path cannot go through it.
    assert!(matches!(
        btf.member_offset("task_struct", &["real_parent", "pid"]),
        Err(BtfError::NotComposite { kind: "PTR", .. })
    ));
    // `sock_common.skc_reuse` is a 4-bit bitfield.
    assert!(matches!(
        btf.member_offset("sock_common", &["skc_reuse"]),
        Err(BtfError::Bitfield { bits: 4, .. })
    ));
}

/// Every direct named member of every struct (first of its name): the same offset as bpftool,
/// a bitfield error where bpftool shows a bitfield size, the same size where bpftool's
/// types give one.
#[test]
fn every_struct_member_matches_bpftool() {
    let Some(btf) = kernel_btf() else { return };
    let Some(dump) = bpftool_dump() else { return };
    let mut seen = std::collections::HashSet::new();
    let (mut checked, mut bitfields, mut sized) = (0usize, 0usize, 0usize);
    for id in &dump.order {
        let rec = &dump.recs[id];
        if rec.kind != "STRUCT" || rec.name == ANON || !seen.insert(rec.name.as_str()) {
            continue;
        }
        assert_eq!(
            btf.struct_id(&rec.name).unwrap(),
            *id,
            "struct {}",
            rec.name
        );
        for (member, type_id, bits, bitfield) in &rec.members {
            if member == ANON {
                continue;
            }
            let path = [member.as_str()];
            let got = btf.member_offset(&rec.name, &path);
            if *bitfield != 0 {
                assert!(
                    matches!(got, Err(BtfError::Bitfield { bits: b, .. }) if b == *bitfield),
                    "{}.{member}: {got:?}",
                    rec.name
                );
                bitfields += 1;
            } else if bits % 8 != 0 {
                assert!(
                    matches!(got, Err(BtfError::Unaligned { .. })),
                    "{}.{member}",
                    rec.name
                );
            } else {
                assert_eq!(got.unwrap(), (bits / 8) as u32, "{}.{member}", rec.name);
                if let Some(size) = dump.size(*type_id, 0) {
                    let got = btf.member_size(&rec.name, &path).unwrap();
                    assert_eq!(u64::from(got), size, "{}.{member} size", rec.name);
                    sized += 1;
                }
            }
            checked += 1;
        }
    }
    eprintln!("checked {checked} members ({bitfields} bitfields, {sized} sizes) against bpftool");
    assert!(checked > 1000, "only {checked} members checked");
}
