//! Text mutations of YAML documents, shared by the `fuzz_policy` and `fuzz_config` targets
//! (see `docs/fuzzing.md`): line edits, token and value replacements from a dictionary of
//! valid and invalid words, raw character insertions and truncations, all on character
//! boundaries.

// Each target uses a part of these helpers.
#![allow(dead_code)]

use proptest::prelude::*;
use proptest::sample::Index;

/// Words every YAML fuzz target tries: YAML syntax, scalars of every type, edge values.
pub const YAML_WORDS: &[&str] = &[
    "",
    " ",
    "\n",
    "\n  ",
    "\t",
    "- ",
    ": ",
    ":",
    ",",
    "[",
    "]",
    "{",
    "}",
    "[]",
    "{}",
    "'",
    "\"",
    "#",
    "# comment",
    "&a ",
    "*a",
    "&a [1]",
    "<<: *a",
    "!!str ",
    "!!int ",
    "!!binary ",
    "!tag ",
    "? ",
    "|",
    ">",
    "---",
    "...",
    "%YAML 1.1\n---\n",
    "~",
    "null",
    "true",
    "false",
    "yes",
    "no",
    "0",
    "-1",
    "1",
    "65535",
    "65536",
    "4294967295",
    "4294967296",
    "18446744073709551616",
    "1e3",
    "0x50",
    "0o17",
    "+80",
    "80.0",
    ".inf",
    "-.inf",
    ".nan",
    "\"\"",
    "''",
    "\u{0}",
    "\u{7f}",
    "\u{85}",
    "\u{feff}",
    "\u{2028}",
    "é",
    "🦀",
    "a b",
    "x\ny",
    "\"\\u0000\"",
    "\"a\\nb\"",
    "'it''s'",
    "\\",
    "%",
    "@",
    "`",
];

#[derive(Clone, Debug)]
pub enum TextMutation {
    DeleteLine(Index),
    DuplicateLine(Index),
    SwapLines(Index, Index),
    /// Indentation of a line changed by this many spaces (removed when negative).
    Indent(Index, i8),
    /// A whole "word" (run of non-separator characters) replaced by a dictionary word.
    ReplaceWord(Index, Index),
    /// What follows `: ` on a line replaced by a dictionary word.
    ReplaceValue(Index, Index),
    /// A dictionary word inserted at a character position.
    InsertWord(Index, Index),
    InsertChar(Index, char),
    DeleteChars(Index, u8),
    Truncate(Index),
}

pub fn text_mutation() -> impl Strategy<Value = TextMutation> {
    prop_oneof![
        2 => any::<Index>().prop_map(TextMutation::DeleteLine),
        1 => any::<Index>().prop_map(TextMutation::DuplicateLine),
        1 => (any::<Index>(), any::<Index>()).prop_map(|(a, b)| TextMutation::SwapLines(a, b)),
        2 => (any::<Index>(), -4i8..=4).prop_map(|(i, n)| TextMutation::Indent(i, n)),
        4 => (any::<Index>(), any::<Index>()).prop_map(|(i, w)| TextMutation::ReplaceWord(i, w)),
        4 => (any::<Index>(), any::<Index>()).prop_map(|(i, w)| TextMutation::ReplaceValue(i, w)),
        2 => (any::<Index>(), any::<Index>()).prop_map(|(i, w)| TextMutation::InsertWord(i, w)),
        1 => (any::<Index>(), any::<char>()).prop_map(|(i, c)| TextMutation::InsertChar(i, c)),
        1 => (any::<Index>(), 1u8..16).prop_map(|(i, n)| TextMutation::DeleteChars(i, n)),
        1 => any::<Index>().prop_map(TextMutation::Truncate),
    ]
}

fn is_separator(c: char) -> bool {
    c.is_whitespace() || ":,[]{}\"'#".contains(c)
}

/// Applies `m` to `text`, with words from `words` (the target's own words first, then
/// [`YAML_WORDS`]).
pub fn apply(text: &str, m: &TextMutation, words: &[&str]) -> String {
    let word = |i: &Index| -> String {
        let all = words.len() + YAML_WORDS.len();
        let n = i.index(all);
        if n < words.len() {
            words[n].to_string()
        } else {
            YAML_WORDS[n - words.len()].to_string()
        }
    };
    let mut lines: Vec<String> = text.split('\n').map(str::to_string).collect();
    let chars: Vec<char> = text.chars().collect();
    match m {
        TextMutation::DeleteLine(i) => {
            lines.remove(i.index(lines.len()));
        }
        TextMutation::DuplicateLine(i) => {
            let at = i.index(lines.len());
            let line = lines[at].clone();
            lines.insert(at, line);
        }
        TextMutation::SwapLines(a, b) => {
            let (a, b) = (a.index(lines.len()), b.index(lines.len()));
            lines.swap(a, b);
        }
        TextMutation::Indent(i, n) => {
            let at = i.index(lines.len());
            let line = &lines[at];
            lines[at] = if *n >= 0 {
                format!("{}{line}", " ".repeat(*n as usize))
            } else {
                let strip = line
                    .chars()
                    .take((-*n) as usize)
                    .take_while(|c| *c == ' ')
                    .count();
                line[strip..].to_string()
            };
        }
        TextMutation::ReplaceWord(i, w) => {
            // Word spans as char ranges.
            let mut spans = Vec::new();
            let mut start = None;
            for (k, c) in chars.iter().enumerate() {
                match (start, is_separator(*c)) {
                    (None, false) => start = Some(k),
                    (Some(s), true) => {
                        spans.push((s, k));
                        start = None;
                    }
                    _ => {}
                }
            }
            if let Some(s) = start {
                spans.push((s, chars.len()));
            }
            if spans.is_empty() {
                return word(w);
            }
            let (s, e) = spans[i.index(spans.len())];
            let mut out: String = chars[..s].iter().collect();
            out.push_str(&word(w));
            out.extend(&chars[e..]);
            return out;
        }
        TextMutation::ReplaceValue(i, w) => {
            let with_value: Vec<usize> = (0..lines.len())
                .filter(|k| lines[*k].contains(": "))
                .collect();
            if with_value.is_empty() {
                return format!("{text}{}", word(w));
            }
            let at = with_value[i.index(with_value.len())];
            let key_end = lines[at].find(": ").expect("filtered") + 2;
            lines[at] = format!("{}{}", &lines[at][..key_end], word(w));
        }
        TextMutation::InsertWord(i, w) => {
            let at = i.index(chars.len() + 1);
            let mut out: String = chars[..at].iter().collect();
            out.push_str(&word(w));
            out.extend(&chars[at..]);
            return out;
        }
        TextMutation::InsertChar(i, c) => {
            let at = i.index(chars.len() + 1);
            let mut out: String = chars[..at].iter().collect();
            out.push(*c);
            out.extend(&chars[at..]);
            return out;
        }
        TextMutation::DeleteChars(i, n) => {
            let at = i.index(chars.len() + 1);
            let end = (at + usize::from(*n)).min(chars.len());
            let mut out: String = chars[..at].iter().collect();
            out.extend(&chars[end..]);
            return out;
        }
        TextMutation::Truncate(i) => {
            let at = i.index(chars.len() + 1);
            return chars[..at].iter().collect();
        }
    }
    lines.join("\n")
}

/// `seed` with `mutations` applied in order.
pub fn mutate(seed: &str, mutations: &[TextMutation], words: &[&str]) -> String {
    mutations
        .iter()
        .fold(seed.to_string(), |text, m| apply(&text, m, words))
}

/// Text made of dictionary words and random characters: reaches the parsers' corners faster
/// than uniform random strings.
pub fn word_soup(words: &'static [&'static str]) -> impl Strategy<Value = String> {
    proptest::collection::vec(
        prop_oneof![
            4 => any::<Index>().prop_map(move |i| {
                let all = words.len() + YAML_WORDS.len();
                let n = i.index(all);
                if n < words.len() { words[n] } else { YAML_WORDS[n - words.len()] }.to_string()
            }),
            1 => any::<char>().prop_map(String::from),
        ],
        0..40,
    )
    .prop_map(|parts| parts.concat())
}

/// The ```yaml block that follows `heading` in a Markdown document.
pub fn yaml_block_after(markdown: &str, heading: &str) -> String {
    let from = markdown.find(heading).expect("heading present");
    let rest = &markdown[from..];
    let start = rest.find("```yaml\n").expect("a yaml block") + "```yaml\n".len();
    let end = rest[start..].find("```").expect("closed block");
    rest[start..start + end].to_string()
}

/// Lines of `text` as a YAML parser counts them: `\r\n`, `\n`, `\r`, NEL and the Unicode line
/// and paragraph separators each end a line.
pub fn yaml_lines(text: &str) -> usize {
    let mut breaks = 0;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\r' => {
                if chars.peek() == Some(&'\n') {
                    chars.next();
                }
                breaks += 1;
            }
            '\n' | '\u{85}' | '\u{2028}' | '\u{2029}' => breaks += 1,
            _ => {}
        }
    }
    breaks + 1
}

/// A rejected document's message is one non-empty line (it is logged, shown by `lb-ctl` and
/// returned by the API as one line). A key or value quoted in the reason once kept its line
/// breaks (`regression_*_error_is_one_line` in the targets).
pub fn check_message(message: &str) -> Result<(), TestCaseError> {
    prop_assert!(!message.trim().is_empty(), "empty error message");
    prop_assert!(
        !message.contains(['\n', '\r']),
        "error message is not one line: {:?}",
        message
    );
    Ok(())
}
