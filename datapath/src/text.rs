//! Small text seams shared by the configuration file and the policy file: the interface
//! pattern matcher, the port-range parser and the key-to-line locator of block-style YAML.
//! Each exists once so that the two files cannot drift apart in what they accept.

/// Shell-style match of a whole `name` with `*` (any run of characters, the empty one too)
/// and `?` (exactly one character); no character classes, no escapes.
///
/// Iterative with one backtrack point (the last `*`): a later `*` supersedes an earlier one,
/// since whatever the earlier star could still absorb the later one can absorb as well. That
/// keeps the time at O(pattern × name) even for patterns like `a*a*a*a*b`, where a recursive
/// matcher explores exponentially many splits. Works on characters, so `?` matches one
/// non-ASCII character rather than one byte of it.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    let (mut pi, mut ni) = (0usize, 0usize);
    // (position of the last `*` in the pattern, position in the name it is matched up to)
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ni));
            pi += 1;
        } else if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if let Some((sp, sn)) = star {
            // Let the last star absorb one more character and retry what follows it.
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// An inclusive port range: `PORT` or `MIN-MAX` (spaces around either number allowed), every
/// port from 0 to 65535, `MIN` not above `MAX`.
///
/// What a caller forbids on top (port 0, a single port) is the caller's rule: the policy
/// file accepts both, the full-NAT source range neither.
pub fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let port = |p: &str| {
        p.trim()
            .parse::<u16>()
            .map_err(|_| format!("{p:?} is not a port (0 to 65535) in {s:?}"))
    };
    let (min, max) = match s.split_once('-') {
        Some((a, b)) => (port(a)?, port(b)?),
        None => {
            let p = port(s)?;
            (p, p)
        }
    };
    if min > max {
        return Err(format!("{s:?} is empty: MIN is above MAX"));
    }
    Ok((min, max))
}

/// Whether `line` of a block-style YAML document holds the mapping key `key` (plain, `"…"`
/// or `'…'` quoted, possibly as the first key of a list item), and at which indentation.
fn key_indent(line: &str, key: &str) -> Option<usize> {
    let trimmed = line.trim_start();
    let indent = line.len() - trimmed.len();
    let rest = trimmed.strip_prefix('-').map_or(trimmed, str::trim_start);
    [
        format!("{key}:"),
        format!("\"{key}\":"),
        format!("'{key}':"),
    ]
    .iter()
    .any(|k| rest.starts_with(k.as_str()))
    .then_some(indent)
}

/// The 1-based line of the key at the dotted `path` (given as its segments) in block-style
/// YAML: the first segment at the document's top level (the indentation of its first line
/// of content), each further one after the line of the previous one, indented deeper than
/// it. So `interfaces` is not found as `lb.interfaces`. `None` when some segment is not found
/// that way (flow style, or the key is absent): no line rather than a wrong one.
pub fn line_of(text: &str, path: &[&str]) -> Option<usize> {
    let top = text
        .lines()
        .find(|l| {
            let t = l.trim_start();
            !(t.is_empty() || t.starts_with('#') || t.starts_with('%') || t.starts_with("---"))
        })
        .map_or(0, |l| l.len() - l.trim_start().len());
    let mut start = 0;
    let (mut min_indent, mut max_indent) = (top, top);
    let mut found = None;
    for segment in path {
        let mut hit = None;
        for (i, line) in text.lines().enumerate().skip(start) {
            if let Some(indent) = key_indent(line, segment)
                && (min_indent..=max_indent).contains(&indent)
            {
                hit = Some((i, indent));
                break;
            }
            // A key back at the parent's indentation ends the parent's section: the same
            // name in the next section (`policy.interfaces` after `lb:`) is not ours.
            let t = line.trim_start();
            let content = !(t.is_empty() || t.starts_with('#') || t.starts_with('-'));
            if found.is_some() && content && line.len() - t.len() < min_indent {
                break;
            }
        }
        let (index, indent) = hit?;
        found = Some(index + 1);
        start = index + 1;
        min_indent = indent + 1;
        max_indent = usize::MAX;
    }
    found
}

/// The 1-based lines of every occurrence of the mapping key `key`, at any depth, in file
/// order: for keys that only one kind of item has (each endpoint's `interface:` in a policy
/// file), the k-th line is the k-th item's.
pub fn key_lines(text: &str, key: &str) -> Vec<usize> {
    text.lines()
        .enumerate()
        .filter(|(_, line)| key_indent(line, key).is_some())
        .map(|(i, _)| i + 1)
        .collect()
}

/// Where a YAML file's serde error is, as the daemon reports it: the line, the key (an unknown
/// key named itself, not its parent) and the one-line reason without serde_yaml_ng's own
/// location. `strip_path`: also drop a leading `path: ` that some of its reasons repeat.
pub fn yaml_error(
    e: &serde_path_to_error::Error<serde_yaml_ng::Error>,
    strip_path: bool,
) -> (Option<usize>, String, String) {
    let line = e.inner().location().map(|l| l.line());
    let mut key = e.path().to_string();
    let mut reason = e.inner().to_string();
    if let Some(at) = reason.find(" at line ") {
        reason.truncate(at);
    }
    if strip_path
        && let Some((head, rest)) = reason.split_once(": ")
        && key.starts_with(head)
    {
        reason = rest.to_string();
    }
    if let Some(rest) = reason.strip_prefix("unknown field `")
        && let Some(end) = rest.find('`')
    {
        let name = &rest[..end];
        if key == "." || key.is_empty() {
            key = name.to_string();
        } else if !key.ends_with(name) {
            key = format!("{key}.{name}");
        }
    }
    if key == "." {
        key = "(top level)".to_string();
    }
    (line, key, reason)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    #[test]
    fn glob_semantics() {
        let table = [
            ("veth*", "veth0", true),
            ("veth*", "veth", true),
            ("veth*", "eth0", false),
            ("ep?", "ep1", true),
            ("ep?", "ep12", false),
            ("e?h*", "eth12", true),
            ("eth", "eth0", false),
            ("eth0", "eth0", true),
            ("eth0", "eth01", false),
            ("*", "", true),
            ("*", "anything", true),
            ("veth*", "veth0", true),
            ("veth*", "veth", true),
            ("veth*", "eth0", false),
            ("ep?", "ep1", true),
            ("ep?", "ep12", false),
            ("eth0", "eth0", true),
            ("eth0", "eth01", false),
            ("", "", true),
            ("", "a", false),
            ("?", "", false),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "axxbyy", false),
            ("*a", "aaa", true),
            ("a**", "a", true),
            ("*?*", "", false),
            ("?", "é", true),
            ("e?0", "eé0", true),
            // A star in the name is an ordinary character: the pattern's star still spans.
            ("*a", "*ba", true),
            ("a*", "a*", true),
        ];
        for (p, n, want) in table {
            assert_eq!(glob_match(p, n), want, "{p:?} {n:?}");
        }
    }

    /// A recursive matcher tries every way of splitting the name between the stars: for this
    /// pattern against 200 `a`s that is about C(200, 7) ≈ 10^12 attempts.
    #[test]
    fn glob_pathological_pattern_is_fast() {
        let name = "a".repeat(200);
        let started = Instant::now();
        assert!(!glob_match("a*a*a*a*a*a*a*b", &name));
        assert!(glob_match("a*a*a*a*a*a*a*a", &name));
        let long = "a".repeat(10_000);
        assert!(!glob_match(&format!("{}b", "a*".repeat(50)), &long));
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn port_ranges() {
        assert_eq!(parse_port_range("1024-65535"), Ok((1024, 65535)));
        assert_eq!(parse_port_range("80"), Ok((80, 80)));
        assert_eq!(parse_port_range(" 8000 - 8100 "), Ok((8000, 8100)));
        assert_eq!(parse_port_range("0-65535"), Ok((0, 65535)));
        assert_eq!(parse_port_range("7-7"), Ok((7, 7)));
        for (bad, why) in [
            ("90-80", "is empty: MIN is above MAX"),
            ("65536", "is not a port"),
            ("1-", "is not a port"),
            ("-5", "is not a port"),
            ("1-2-3", "is not a port"),
            ("http", "is not a port"),
            ("", "is not a port"),
        ] {
            let e = parse_port_range(bad).unwrap_err();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
    }

    #[test]
    fn lines_of_keys() {
        let text = "a: 1\nmaps:\n  max_flows: 3\nlb:\n  maps:\n    max_flows: 4\n  \"xdp_mode\": auto\nlist:\n  - interface: x\n  -   'interface': y\n";
        assert_eq!(line_of(text, &["maps", "max_flows"]), Some(3));
        assert_eq!(line_of(text, &["lb", "maps", "max_flows"]), Some(6));
        assert_eq!(line_of(text, &["lb", "xdp_mode"]), Some(7));
        assert_eq!(line_of(text, &["lb", "colour"]), None);
        // Only top-level keys are found as a path's first segment.
        assert_eq!(line_of(text, &["max_flows"]), None);
        assert_eq!(line_of("# c\n\n  a:\n    b: 1\n  b: 2\n", &["b"]), Some(5));
        assert_eq!(line_of(text, &["list", "interface"]), Some(9));
        assert_eq!(key_lines(text, "interface"), [9, 10]);
        let sections = "lb:\n  enabled: true\n# c\npolicy:\n  interfaces: [x]\nlb2:\n  x: 1\n";
        assert_eq!(line_of(sections, &["lb", "interfaces"]), None);
        assert_eq!(line_of(sections, &["policy", "interfaces"]), Some(5));
        assert_eq!(key_lines(text, "max_flows"), [3, 6]);
        // A key is only a key when the colon follows it directly.
        assert_eq!(key_lines("maps_x: 1\nmap: 2\n", "map"), [2]);
    }
}
