//! Reading typed values out of the spanned TOML tree, recording a diagnostic for every problem
//! instead of stopping at the first one.
//!
//! A reader returns `None` for a value it reported as wrong, so the caller drops the item that
//! holds it and no second, derived error is reported about the same mistake.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use crate::diag::{Code, Diagnostic, Span};
use crate::units;

pub(crate) type Value<'i> = Spanned<DeValue<'i>>;

/// Collects diagnostics while reading.
#[derive(Debug, Default)]
pub(crate) struct Cx {
    pub diags: Vec<Diagnostic>,
    /// Every address the topology binds, noted where it is read (with its span), checked for
    /// clashes in `validate`.
    pub binds: Vec<crate::binds::Bind>,
    /// Byte offset where each line starts, to name lines in help text.
    line_starts: Vec<usize>,
}

/// A table being read as one section of the topology (`[[monitor]]`, `pool = {…}`…).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Section<'a, 'i> {
    pub table: &'a DeTable<'i>,
    /// Byte range of the table (kept as a pair: sections are `Copy`, `Range` is not).
    pub start: usize,
    pub end: usize,
    pub what: &'static str,
}

impl<'a, 'i> Section<'a, 'i> {
    pub fn get(&self, key: &str) -> Option<&'a Value<'i>> {
        self.table
            .iter()
            .find(|(k, _)| k.get_ref().as_ref() == key)
            .map(|(_, v)| v)
    }

    pub fn span(&self) -> Span {
        self.start..self.end
    }

    /// The span of a key itself, for diagnostics about the key rather than its value.
    pub fn key_span(&self, key: &str) -> Option<Span> {
        self.table
            .keys()
            .find(|k| k.get_ref().as_ref() == key)
            .map(|k| k.span())
    }
}

impl Cx {
    pub fn new(text: &str) -> Self {
        let line_starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        Cx {
            diags: Vec::new(),
            binds: Vec::new(),
            line_starts,
        }
    }

    /// 1-based line of a byte offset.
    pub fn line_of(&self, offset: usize) -> usize {
        self.line_starts.partition_point(|s| *s <= offset)
    }

    /// Where to point for a problem with a whole section: the rest of its first line.
    pub fn header_span(&self, s: Section<'_, '_>) -> Span {
        let next_line = self.line_starts.get(self.line_of(s.start)).copied();
        let end = next_line.map_or(s.end, |n| n.saturating_sub(1)).min(s.end);
        s.start..end.max(s.start + 1)
    }

    /// Reports a required key that is absent, with an example of how to write it.
    pub fn missing(&mut self, s: Section<'_, '_>, key: &str, example: &str) {
        let span = self.header_span(s);
        self.error(
            Code::MissingKey,
            span,
            format!("{} is missing required key `{key}`", s.what),
            format!("add `{key} = {example}`"),
        );
    }

    pub fn error(
        &mut self,
        code: Code,
        span: Span,
        message: impl Into<String>,
        help: impl Into<String>,
    ) {
        debug_assert_eq!(code.severity(), crate::diag::Severity::Error);
        self.diags.push(Diagnostic::new(code, span, message, help));
    }

    pub fn warn(
        &mut self,
        code: Code,
        span: Span,
        message: impl Into<String>,
        help: impl Into<String>,
    ) {
        debug_assert_eq!(code.severity(), crate::diag::Severity::Warning);
        self.diags.push(Diagnostic::new(code, span, message, help));
    }

    /// Opens a table as a section and reports every key it does not define.
    pub fn section<'a, 'i>(
        &mut self,
        value: &'a Value<'i>,
        what: &'static str,
        keys: &[&str],
    ) -> Option<Section<'a, 'i>> {
        let DeValue::Table(table) = value.get_ref() else {
            self.wrong_type(value, what, "a table");
            return None;
        };
        let span = value.span();
        for key in table.keys() {
            let k = key.get_ref().as_ref();
            if !keys.contains(&k) {
                self.error(
                    Code::UnknownKey,
                    key.span(),
                    format!("unknown key `{k}` in {what}"),
                    suggest(k, keys),
                );
            }
        }
        Some(Section {
            table,
            start: span.start,
            end: span.end,
            what,
        })
    }

    pub fn wrong_type(&mut self, value: &Value<'_>, key: &str, expected: &str) {
        self.error(
            Code::WrongType,
            value.span(),
            format!(
                "`{key}` must be {expected}, found {}",
                type_name(value.get_ref())
            ),
            format!("write `{key}` as {expected}"),
        );
    }

    /// A required key.
    pub fn req<T: FromToml>(&mut self, s: Section<'_, '_>, key: &str) -> Option<T> {
        match s.get(key) {
            Some(v) => T::from_toml(self, key, v),
            None => {
                self.missing(s, key, T::EXAMPLE);
                None
            }
        }
    }

    /// An optional key: `Some(None)` when absent, `None` when reported wrong.
    pub fn opt<T: FromToml>(&mut self, s: Section<'_, '_>, key: &str) -> Option<Option<T>> {
        match s.get(key) {
            Some(v) => T::from_toml(self, key, v).map(Some),
            None => Some(None),
        }
    }

    /// An optional key with a default.
    pub fn or<T: FromToml>(&mut self, s: Section<'_, '_>, key: &str, default: T) -> Option<T> {
        self.opt(s, key).map(|v| v.unwrap_or(default))
    }

    /// An array of tables (`[[site]]`, `[[profile.endpoint]]`), each read by `read`.
    /// Items that had problems are left out of the result.
    pub fn tables<'a, 'i, T>(
        &mut self,
        parent: Section<'a, 'i>,
        key: &str,
        what: &'static str,
        keys: &[&str],
        mut read: impl FnMut(&mut Self, Section<'a, 'i>) -> Option<T>,
    ) -> Vec<T> {
        let Some(value) = parent.get(key) else {
            return Vec::new();
        };
        let items: Vec<&'a Value<'i>> = match value.get_ref() {
            DeValue::Array(items) => items.iter().collect(),
            DeValue::Table(_) => vec![value],
            _ => {
                self.wrong_type(value, key, "an array of tables");
                return Vec::new();
            }
        };
        items
            .into_iter()
            .filter_map(|v| {
                let s = self.section(v, what, keys)?;
                read(self, s)
            })
            .collect()
    }
}

fn type_name(v: &DeValue<'_>) -> &'static str {
    match v {
        DeValue::String(_) => "a string",
        DeValue::Integer(_) => "an integer",
        DeValue::Float(_) => "a float",
        DeValue::Boolean(_) => "a boolean",
        DeValue::Datetime(_) => "a date-time",
        DeValue::Array(_) => "an array",
        DeValue::Table(_) => "a table",
    }
}

/// "did you mean" for unknown keys and names, else the list of valid ones (each once, in the
/// order given: a name defined twice is listed once).
pub(crate) fn suggest(found: &str, valid: &[&str]) -> String {
    let mut unique: Vec<&str> = Vec::with_capacity(valid.len());
    for v in valid {
        if !unique.contains(v) {
            unique.push(v);
        }
    }
    let valid = &unique[..];
    let close = valid
        .iter()
        .map(|v| (edit_distance(found, v), v))
        .filter(|(d, v)| *d <= 2.max(v.len() / 3) && *d < v.len())
        .min_by_key(|(d, _)| *d);
    match close {
        Some((_, v)) => format!("did you mean `{v}`?"),
        None if valid.is_empty() => "remove it".to_string(),
        None => format!("expected one of: {}", valid.join(", ")),
    }
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// A value that can be read from TOML, reporting its own problems.
pub(crate) trait FromToml: Sized {
    /// Shown in "add `key = …`" help lines.
    const EXAMPLE: &'static str;
    fn from_toml(cx: &mut Cx, key: &str, v: &Value<'_>) -> Option<Self>;
}

/// Reads a string value, reporting a wrong type.
pub(crate) fn string<'v>(cx: &mut Cx, key: &str, v: &'v Value<'_>) -> Option<&'v str> {
    match v.get_ref() {
        DeValue::String(s) => Some(s.as_ref()),
        _ => {
            cx.wrong_type(v, key, "a string");
            None
        }
    }
}

impl FromToml for String {
    const EXAMPLE: &'static str = "\"…\"";
    fn from_toml(cx: &mut Cx, key: &str, v: &Value<'_>) -> Option<Self> {
        string(cx, key, v).map(str::to_string)
    }
}

impl FromToml for bool {
    const EXAMPLE: &'static str = "true";
    fn from_toml(cx: &mut Cx, key: &str, v: &Value<'_>) -> Option<Self> {
        match v.get_ref() {
            DeValue::Boolean(b) => Some(*b),
            _ => {
                cx.wrong_type(v, key, "a boolean (true or false)");
                None
            }
        }
    }
}

/// An integer in `MIN..=MAX`.
pub(crate) fn integer(cx: &mut Cx, key: &str, v: &Value<'_>, min: i64, max: i64) -> Option<i64> {
    let DeValue::Integer(i) = v.get_ref() else {
        cx.wrong_type(v, key, "an integer");
        return None;
    };
    match i64::from_str_radix(i.as_str(), i.radix()) {
        Ok(n) if (min..=max).contains(&n) => Some(n),
        _ => {
            cx.error(
                Code::OutOfRange,
                v.span(),
                format!("`{key}` is out of range"),
                format!("use a whole number from {min} to {max}"),
            );
            None
        }
    }
}

macro_rules! int_from_toml {
    ($($t:ty),*) => {$(
        impl FromToml for $t {
            const EXAMPLE: &'static str = "80";
            fn from_toml(cx: &mut Cx, key: &str, v: &Value<'_>) -> Option<Self> {
                integer(cx, key, v, <$t>::MIN as i64, <$t>::MAX as i64).map(|n| n as $t)
            }
        }
    )*};
}
int_from_toml!(u16, u32, i32);

impl FromToml for f64 {
    const EXAMPLE: &'static str = "1.0";
    fn from_toml(cx: &mut Cx, key: &str, v: &Value<'_>) -> Option<Self> {
        match v.get_ref() {
            DeValue::Float(f) => f.as_str().parse().ok(),
            DeValue::Integer(i) => i64::from_str_radix(i.as_str(), i.radix())
                .ok()
                .map(|n| n as f64),
            _ => {
                cx.wrong_type(v, key, "a number");
                None
            }
        }
    }
}

impl<T: FromToml> FromToml for Vec<T> {
    const EXAMPLE: &'static str = "[…]";
    fn from_toml(cx: &mut Cx, key: &str, v: &Value<'_>) -> Option<Self> {
        let DeValue::Array(items) = v.get_ref() else {
            cx.wrong_type(v, key, "an array");
            return None;
        };
        let mut ok = true;
        let mut out = Vec::new();
        for item in items.iter() {
            match T::from_toml(cx, key, item) {
                Some(t) => out.push(t),
                None => ok = false,
            }
        }
        ok.then_some(out)
    }
}

/// An inline table of values keyed by free-form names (`ports = { http = "…" }`).
impl<T: FromToml> FromToml for BTreeMap<String, T> {
    const EXAMPLE: &'static str = "{ … }";
    fn from_toml(cx: &mut Cx, key: &str, v: &Value<'_>) -> Option<Self> {
        let DeValue::Table(table) = v.get_ref() else {
            cx.wrong_type(v, key, "a table");
            return None;
        };
        let mut ok = true;
        let mut out = BTreeMap::new();
        for (k, item) in table.iter() {
            let k = k.get_ref().to_string();
            match T::from_toml(cx, &k, item) {
                Some(t) => {
                    out.insert(k, t);
                }
                None => ok = false,
            }
        }
        ok.then_some(out)
    }
}

/// Parses a string value with `parse`, reporting `code` with `help` when it fails.
pub(crate) fn parsed<T>(
    cx: &mut Cx,
    key: &str,
    v: &Value<'_>,
    code: Code,
    what: &str,
    help: &str,
    parse: impl FnOnce(&str) -> Option<T>,
) -> Option<T> {
    let s = string(cx, key, v)?;
    let out = parse(s);
    if out.is_none() {
        cx.error(
            code,
            v.span(),
            format!("invalid {what} {s:?} for `{key}`"),
            help,
        );
    }
    out
}

impl FromToml for Duration {
    const EXAMPLE: &'static str = "\"30s\"";
    fn from_toml(cx: &mut Cx, key: &str, v: &Value<'_>) -> Option<Self> {
        parsed(
            cx,
            key,
            v,
            Code::BadDuration,
            "duration",
            "use a number and a unit (ms, s, m, h, d), such as \"500ms\", \"30s\" or \"4m\"",
            units::parse_duration,
        )
    }
}

impl FromToml for SocketAddr {
    const EXAMPLE: &'static str = "\"127.0.0.1:8080\"";
    fn from_toml(cx: &mut Cx, key: &str, v: &Value<'_>) -> Option<Self> {
        parsed(
            cx,
            key,
            v,
            Code::BadAddress,
            "address",
            "write an IP address and a port, such as \"127.0.0.1:8080\" or \"[::1]:8080\"",
            |s| s.parse().ok(),
        )
    }
}

impl FromToml for IpAddr {
    const EXAMPLE: &'static str = "\"127.0.0.1\"";
    fn from_toml(cx: &mut Cx, key: &str, v: &Value<'_>) -> Option<Self> {
        parsed(
            cx,
            key,
            v,
            Code::BadAddress,
            "IP address",
            "write an IPv4 or IPv6 address without a port, such as \"127.0.1.1\" or \"::1\"",
            |s| s.parse().ok(),
        )
    }
}

/// A string that must be one of a fixed set of choices; see `choice!`.
pub(crate) fn one_of<T: Copy>(
    cx: &mut Cx,
    key: &str,
    v: &Value<'_>,
    all: &[(&'static str, T)],
) -> Option<T> {
    let s = string(cx, key, v)?;
    if let Some((_, t)) = all.iter().find(|(name, _)| *name == s) {
        return Some(*t);
    }
    let names: Vec<&str> = all.iter().map(|(n, _)| *n).collect();
    cx.error(
        Code::BadChoice,
        v.span(),
        format!("`{key}` cannot be {s:?}"),
        format!("expected one of: {}", names.join(", ")),
    );
    None
}

/// Declares an enum read from a fixed set of strings, printed back the same way.
macro_rules! choice {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $name { $($(#[$vmeta])* $variant),+ }

        impl $name {
            /// Every choice with its spelling in the topology file.
            pub const ALL: &'static [(&'static str, $name)] = &[$(($text, $name::$variant)),+];

            /// The spelling in the topology file.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl $crate::read::FromToml for $name {
            const EXAMPLE: &'static str = concat!("\"", choice!(@first $($text),+), "\"");
            fn from_toml(cx: &mut $crate::read::Cx, key: &str, v: &$crate::read::Value<'_>) -> Option<Self> {
                $crate::read::one_of(cx, key, v, Self::ALL)
            }
        }
    };
    (@first $first:literal $(, $rest:literal)*) => { $first };
}
pub(crate) use choice;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_close_keys_and_lists_others() {
        assert_eq!(
            suggest("intervall", &["interval", "timeout"]),
            "did you mean `interval`?"
        );
        assert_eq!(
            suggest("zzz", &["interval", "timeout"]),
            "expected one of: interval, timeout"
        );
    }

    #[test]
    fn names_defined_twice_are_listed_once() {
        assert_eq!(
            suggest("zzz", &["edge-web", "region-web", "edge-web"]),
            "expected one of: edge-web, region-web"
        );
    }
}
