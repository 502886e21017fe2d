//! Usage errors on one line.
//!
//! clap finds what is wrong with the command line; this module only renders its error as the
//! one line docs/cli.md promises: what was rejected, and what is accepted there (the possible
//! values, the valid subcommands, the options, or the usage line). It reads the error's
//! context ([`clap::Error::get`]) rather than rewriting clap's multi-line text.
use std::ffi::OsString;

use clap::{
    Command,
    error::{ContextKind, ContextValue, ErrorKind},
};

/// The command line `args` (program name first) parsed by `root`, or what to do instead:
/// print clap's help or version text (stdout, exit 0), or one error line (stderr, exit 2).
pub enum Parsed<T> {
    Ok(T),
    /// `--help`, `--version`: clap's own output, printed as is.
    Print(clap::Error),
    /// A usage error, as one line (without the `lb-ctl: error: ` prefix).
    Usage(String),
}

/// Parses `args` into `T` with clap, turning usage errors into one line.
pub fn parse<T: clap::Parser>(args: &[OsString]) -> Parsed<T> {
    match T::try_parse_from(args) {
        Ok(v) => Parsed::Ok(v),
        // DisplayHelp and DisplayVersion go to stdout; everything else is an error.
        Err(e) if !e.use_stderr() => Parsed::Print(e),
        Err(e) => Parsed::Usage(one_line(&e, T::command(), args)),
    }
}

/// One line saying what clap rejected and what is accepted there. `root` is the command that
/// parsed `args`; the subcommand the error is about is found by walking `args` down it.
pub fn one_line(err: &clap::Error, mut root: Command, args: &[OsString]) -> String {
    root.build();
    let (path, cmd) = subcommand_of(&root, args);
    let usage = || usage_of(err, cmd);
    let line = match err.kind() {
        ErrorKind::InvalidValue => {
            let arg = string(err, ContextKind::InvalidArg).unwrap_or_default();
            let valid = strings(err, ContextKind::ValidValue);
            let accepted = if valid.is_empty() {
                format!("usage: {}", usage())
            } else {
                format!("accepted: {}", valid.join(", "))
            };
            // No "did you mean": the accepted values are all there.
            match string(err, ContextKind::InvalidValue) {
                Some(v) if !v.is_empty() => format!("invalid value '{v}' for '{arg}': {accepted}"),
                _ => format!("a value is required for '{arg}': {accepted}"),
            }
        }
        ErrorKind::ValueValidation => {
            let arg = string(err, ContextKind::InvalidArg).unwrap_or_default();
            let value = string(err, ContextKind::InvalidValue).unwrap_or_default();
            // The value parsers of cli.rs say what they accept in their error.
            let why = std::error::Error::source(err)
                .map(ToString::to_string)
                .unwrap_or_else(|| format!("usage: {}", usage()));
            format!("invalid value '{value}' for '{arg}': {why}")
        }
        ErrorKind::UnknownArgument => {
            let arg = string(err, ContextKind::InvalidArg).unwrap_or_default();
            let mut line = if arg.starts_with('-') {
                format!(
                    "unknown option '{arg}' for '{path}': accepted: {}",
                    options_of(cmd).join(", ")
                )
            } else {
                format!(
                    "unexpected argument '{arg}' for '{path}': usage: {}",
                    usage()
                )
            };
            if let Some(s) = string(err, ContextKind::SuggestedArg) {
                line.push_str(&format!("; did you mean '{s}'?"));
            }
            for tip in strings(err, ContextKind::Suggested) {
                line.push_str(&format!("; {tip}"));
            }
            line
        }
        ErrorKind::InvalidSubcommand => {
            let sub = string(err, ContextKind::InvalidSubcommand).unwrap_or_default();
            let mut line = format!(
                "unrecognized subcommand '{sub}' for '{path}': accepted: {}",
                subcommands_of(cmd).join(", ")
            );
            if let Some(s) = strings(err, ContextKind::SuggestedSubcommand).first() {
                line.push_str(&format!("; did you mean '{s}'?"));
            }
            line
        }
        ErrorKind::MissingSubcommand | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let subs = subcommands_of(cmd);
            if subs.is_empty() {
                format!("'{path}' needs arguments: usage: {}", usage())
            } else {
                format!("'{path}' needs a subcommand: accepted: {}", subs.join(", "))
            }
        }
        ErrorKind::MissingRequiredArgument => {
            let missing = strings(err, ContextKind::InvalidArg);
            let noun = if missing.len() == 1 {
                "argument"
            } else {
                "arguments"
            };
            format!(
                "missing {noun} {} for '{path}': usage: {}",
                missing.join(", "),
                usage()
            )
        }
        // The kinds lb-ctl's command line cannot produce today (conflicts, value counts,
        // invalid UTF-8): clap's own first line, and the usage.
        _ => {
            let rendered = err.render().to_string();
            let first = rendered
                .lines()
                .map(str::trim)
                .find(|l| !l.is_empty())
                .unwrap_or("invalid command line");
            let first = first.strip_prefix("error: ").unwrap_or(first);
            format!("{first}: usage: {}", usage())
        }
    };
    single_line(&line)
}

/// The subcommand `args` name (by name or alias), with its path (`lb-ctl service add`):
/// the deepest one reached by walking the arguments down from `root`. An option that takes a
/// value skips that value, so `--socket service` is not mistaken for a subcommand.
fn subcommand_of<'a>(root: &'a Command, args: &[OsString]) -> (String, &'a Command) {
    let mut cmd = root;
    let mut path = vec![root.get_name().to_owned()];
    let mut words = args.iter().skip(1).map(|a| a.to_string_lossy());
    while let Some(word) = words.next() {
        if word == "--" {
            break;
        }
        if let Some(long) = word.strip_prefix("--") {
            if !long.contains('=') && takes_value(cmd, |a| a.get_long() == Some(long)) {
                words.next();
            }
        } else if let Some(shorts) = word.strip_prefix('-').filter(|s| !s.is_empty()) {
            // `-o json` takes the next word; `-ojson` carries its value.
            let mut chars = shorts.chars();
            if let (Some(c), None) = (chars.next(), chars.next())
                && takes_value(cmd, |a| a.get_short() == Some(c))
            {
                words.next();
            }
        } else if let Some(sub) = cmd.find_subcommand(word.as_ref()) {
            path.push(sub.get_name().to_owned());
            cmd = sub;
        }
    }
    (path.join(" "), cmd)
}

fn takes_value(cmd: &Command, is: impl Fn(&clap::Arg) -> bool) -> bool {
    cmd.get_arguments()
        .find(|a| is(a))
        .is_some_and(|a| a.get_action().takes_values())
}

/// The usage line from the error (clap's, reflecting what was given), else the command's.
fn usage_of(err: &clap::Error, cmd: &Command) -> String {
    let styled = match err.get(ContextKind::Usage) {
        Some(ContextValue::StyledStr(s)) => s.to_string(),
        _ => cmd.clone().render_usage().to_string(),
    };
    let text = styled.trim();
    let text = text.strip_prefix("Usage:").unwrap_or(text);
    // A command with several forms has one usage line each.
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" | ")
}

/// Visible subcommands, each with its visible aliases: `remove|rm`.
fn subcommands_of(cmd: &Command) -> Vec<String> {
    cmd.get_subcommands()
        .filter(|s| !s.is_hide_set())
        .map(|s| {
            std::iter::once(s.get_name())
                .chain(s.get_visible_aliases())
                .collect::<Vec<_>>()
                .join("|")
        })
        .collect()
}

/// Visible options: `--proto`, `-o/--output`.
fn options_of(cmd: &Command) -> Vec<String> {
    cmd.get_arguments()
        .filter(|a| !a.is_positional() && !a.is_hide_set())
        .map(|a| match (a.get_short(), a.get_long()) {
            (Some(s), Some(l)) => format!("-{s}/--{l}"),
            (Some(s), None) => format!("-{s}"),
            (None, Some(l)) => format!("--{l}"),
            (None, None) => a.get_id().to_string(),
        })
        .collect()
}

fn string(err: &clap::Error, kind: ContextKind) -> Option<String> {
    match err.get(kind)? {
        ContextValue::String(s) => Some(s.clone()),
        ContextValue::Strings(v) => v.first().cloned(),
        ContextValue::StyledStr(s) => Some(s.to_string()),
        _ => None,
    }
}

fn strings(err: &clap::Error, kind: ContextKind) -> Vec<String> {
    match err.get(kind) {
        Some(ContextValue::String(s)) => vec![s.clone()],
        Some(ContextValue::Strings(v)) => v.clone(),
        Some(ContextValue::StyledStr(s)) => vec![s.to_string()],
        Some(ContextValue::StyledStrs(v)) => v.iter().map(ToString::to_string).collect(),
        _ => Vec::new(),
    }
}

/// Whatever got in (a value with a newline, a multi-line tip), the answer is one line.
fn single_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}
