//! Diagnostics: every problem in a topology file, located as `file:line:col`, with a stable code,
//! a message, a help line, and the offending source line underlined.
//!
//! A diagnostic is an *error* (`E…`: the file is invalid) or a *warning* (`W…`: the file is
//! valid and runs, but probably not as meant). The code decides which.

use std::fmt::Write as _;
use std::ops::Range;

/// Byte range into the topology source.
pub type Span = Range<usize>;

/// Stable diagnostic codes. The text users see is pinned by tests; never reuse a code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Code {
    /// The file is not valid TOML.
    Syntax,
    /// A key the section does not define.
    UnknownKey,
    /// A required key is absent.
    MissingKey,
    /// A value of the wrong TOML type.
    WrongType,
    /// A duration such as `"500ms"` that does not parse.
    BadDuration,
    /// A size such as `"1MB"` that does not parse.
    BadSize,
    /// An address (`ip`, `ip:port`, `ip/prefix`) that does not parse.
    BadAddress,
    /// A string outside the allowed set of choices.
    BadChoice,
    /// A number or duration outside its allowed range.
    OutOfRange,
    /// Two items of one kind share a name.
    DuplicateName,
    /// A reference to something that is not defined.
    UnknownReference,
    /// Nested profiles that refer back to themselves.
    ProfileCycle,
    /// Nested profiles deeper than allowed.
    ProfileDepth,
    /// Two endpoints of a priority profile share a priority.
    DuplicatePriority,
    /// A probe timeout that is not below its interval.
    TimeoutNotBelowInterval,
    /// A key that is valid elsewhere but not with the other settings here.
    NotAllowedHere,
    /// Scale set capacity out of order.
    CapacityOrder,
    /// A port range that is empty or too small.
    BadPortRange,
    /// An HTTP status range that does not parse.
    BadStatusRange,
    /// A DNS name outside every served zone, or not a valid name.
    BadDomain,
    /// A name with characters that are not allowed.
    BadName,
    /// Cluster mode: a site without a node, a tier in a witness, an address of another site.
    Placement,
    /// A CNAME where the name must hold other data: at a zone apex (which always has SOA and
    /// NS records), since a name with a CNAME can hold nothing else (RFC 1034 §3.6.2, RFC 2181
    /// §10.1).
    CnameConflict,
    /// Two things the topology binds on one address, port and protocol.
    AddressInUse,
    /// Warning: the topology declares nothing to serve or run.
    NothingToRun,
    /// Warning: a name server inside a served zone without an address, so resolvers that
    /// follow the zone's NS records find no server.
    NameServerWithoutAddress,
    /// Warning: addresses given for a name server outside every served zone, which Tandem
    /// cannot answer for.
    NameServerAddressNotServed,
    /// Warning (cluster mode): a DNS node whose address is none of a zone's name servers, so
    /// resolvers following the delegation never ask it.
    DnsNodeNotNameServer,
}

/// Whether a diagnostic makes the file invalid.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Severity {
    /// The file is invalid: `validate` exits 1, `up` does not start.
    Error,
    /// The file is valid, but probably not as meant: reported, and everything still runs.
    Warning,
}

impl Severity {
    /// As printed: `error` or `warning`.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "error",
            Severity::Warning => "warning",
        }
    }
}

impl Code {
    /// The code as printed: `E001`…
    pub fn as_str(self) -> &'static str {
        match self {
            Code::Syntax => "E001",
            Code::UnknownKey => "E002",
            Code::MissingKey => "E003",
            Code::WrongType => "E004",
            Code::BadDuration => "E005",
            Code::BadSize => "E006",
            Code::BadAddress => "E007",
            Code::BadChoice => "E008",
            Code::OutOfRange => "E009",
            Code::DuplicateName => "E010",
            Code::UnknownReference => "E011",
            Code::ProfileCycle => "E012",
            Code::ProfileDepth => "E013",
            Code::DuplicatePriority => "E014",
            Code::TimeoutNotBelowInterval => "E015",
            Code::NotAllowedHere => "E016",
            Code::CapacityOrder => "E017",
            Code::BadPortRange => "E018",
            Code::BadStatusRange => "E019",
            Code::BadDomain => "E020",
            Code::BadName => "E021",
            Code::CnameConflict => "E022",
            Code::AddressInUse => "E023",
            Code::NothingToRun => "W001",
            Code::NameServerWithoutAddress => "W002",
            Code::NameServerAddressNotServed => "W003",
            Code::DnsNodeNotNameServer => "W004",
            Code::Placement => "E024",
        }
    }

    /// Errors make the file invalid; warnings do not.
    pub fn severity(self) -> Severity {
        match self {
            Code::NothingToRun
            | Code::NameServerWithoutAddress
            | Code::NameServerAddressNotServed
            | Code::DnsNodeNotNameServer => Severity::Warning,
            _ => Severity::Error,
        }
    }
}

/// One problem in a topology file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    pub code: Code,
    pub span: Span,
    pub message: String,
    pub help: String,
}

impl Diagnostic {
    pub fn new(
        code: Code,
        span: Span,
        message: impl Into<String>,
        help: impl Into<String>,
    ) -> Self {
        Diagnostic {
            code,
            span,
            message: message.into(),
            help: help.into(),
        }
    }

    pub fn severity(&self) -> Severity {
        self.code.severity()
    }

    pub fn is_error(&self) -> bool {
        self.severity() == Severity::Error
    }
}

/// A topology source: its name as given by the user, and its text.
#[derive(Clone, Debug)]
pub struct Source {
    pub name: String,
    pub text: String,
}

/// A position in a source, both 1-based, the column in characters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Position {
    pub line: usize,
    pub column: usize,
}

impl Source {
    pub fn new(name: impl Into<String>, text: impl Into<String>) -> Self {
        Source {
            name: name.into(),
            text: text.into(),
        }
    }

    /// Line and column of a byte offset (clamped to the text).
    pub fn position(&self, offset: usize) -> Position {
        let offset = floor_char_boundary(&self.text, offset.min(self.text.len()));
        let before = &self.text[..offset];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        Position {
            line,
            column: self.text[line_start..offset].chars().count() + 1,
        }
    }

    /// The text of a 1-based line, without its line ending.
    fn line_text(&self, line: usize) -> &str {
        self.text
            .split('\n')
            .nth(line - 1)
            .unwrap_or("")
            .trim_end_matches('\r')
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// Every problem found in one topology file, in source order.
#[derive(Clone, Debug)]
pub struct Diagnostics {
    pub source: Source,
    pub items: Vec<Diagnostic>,
}

impl Diagnostics {
    /// How many errors (the file is invalid when there is one).
    pub fn errors(&self) -> usize {
        self.items.iter().filter(|d| d.is_error()).count()
    }

    /// Where a diagnostic points: `file:line:column`.
    pub fn location(&self, d: &Diagnostic) -> String {
        let pos = self.source.position(d.span.start);
        format!("{}:{}:{}", self.source.name, pos.line, pos.column)
    }

    /// How many warnings.
    pub fn warnings(&self) -> usize {
        self.items.len() - self.errors()
    }

    /// Human-readable report: each problem with its location, source line and underline, then
    /// a summary line (`error: F has 2 problems`, `… and 1 warning`, or `warning: F has 1
    /// warning` when there are only warnings).
    pub fn render(&self) -> String {
        let mut out = String::new();
        for d in &self.items {
            render_one(&mut out, &self.source, d);
            out.push('\n');
        }
        let (errors, warnings) = (self.errors(), self.warnings());
        let name = &self.source.name;
        let _ = match (errors, warnings) {
            (0, w) => writeln!(out, "warning: {name} has {}", plural(w, "warning")),
            (e, 0) => writeln!(out, "error: {name} has {}", plural(e, "problem")),
            (e, w) => writeln!(
                out,
                "error: {name} has {} and {}",
                plural(e, "problem"),
                plural(w, "warning")
            ),
        };
        out
    }

    /// Machine-readable report: a JSON array of `{file, line, column, severity, code,
    /// message, help}`.
    pub fn to_json(&self) -> serde_json::Value {
        let items = self
            .items
            .iter()
            .map(|d| {
                let pos = self.source.position(d.span.start);
                serde_json::json!({
                    "file": self.source.name,
                    "line": pos.line,
                    "column": pos.column,
                    "severity": d.severity().as_str(),
                    "code": d.code.as_str(),
                    "message": d.message,
                    "help": d.help,
                })
            })
            .collect();
        serde_json::Value::Array(items)
    }
}

/// `1 warning`, `2 warnings`, `2 successes`.
pub fn plural(n: usize, noun: &str) -> String {
    let ending = match (n, noun.ends_with('s')) {
        (1, _) => "",
        (_, true) => "es",
        (_, false) => "s",
    };
    format!("{n} {noun}{ending}")
}

fn render_one(out: &mut String, src: &Source, d: &Diagnostic) {
    let pos = src.position(d.span.start);
    let text = src.line_text(pos.line);
    let gutter = " ".repeat(pos.line.to_string().len());
    // Underline the span on its first line only; at least one caret.
    let line_chars = text.chars().count();
    let span_end = src.position(d.span.end);
    let end_col = if span_end.line == pos.line {
        span_end.column
    } else {
        line_chars + 1
    };
    let width = end_col.saturating_sub(pos.column).max(1);
    let _ = writeln!(
        out,
        "{}[{}]: {}",
        d.severity().as_str(),
        d.code.as_str(),
        d.message
    );
    let _ = writeln!(out, "{gutter}--> {}:{}:{}", src.name, pos.line, pos.column);
    let _ = writeln!(out, "{gutter} |");
    let _ = writeln!(out, "{} | {text}", pos.line);
    let _ = writeln!(
        out,
        "{gutter} | {}{}",
        " ".repeat(pos.column - 1),
        "^".repeat(width)
    );
    let _ = writeln!(out, "{gutter} = help: {}", d.help);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_count_characters_not_bytes() {
        let src = Source::new("t.toml", "a = 1\nb = \"é\" x\n");
        assert_eq!(src.position(0), Position { line: 1, column: 1 });
        let x = src.text.find('x').unwrap();
        assert_eq!(src.position(x), Position { line: 2, column: 9 });
        assert_eq!(src.position(10_000).line, 3);
    }
}
