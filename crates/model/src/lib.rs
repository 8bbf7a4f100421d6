//! The Tandem topology: one TOML file that declares sites, DNS, monitors, profiles, load
//! balancers, scale sets, databases and apps.
//!
//! [`parse`] reads the text into spanned TOML, reads every section into typed values, and checks
//! references across sections, collecting *every* problem as a [`Diagnostic`] located in the
//! file. Only a file without errors becomes a [`Topology`]; [`check`] also returns the warnings
//! about a valid file (checked once it has no errors, so no warning is a consequence of one).

mod binds;
mod cluster;
pub mod diag;
pub mod diff;
mod parse;
mod read;
mod types;
pub mod units;
mod validate;

use std::path::Path;

pub use cluster::find_node;
pub use diag::{Code, Diagnostic, Diagnostics, Severity, Source, Span};
pub use types::*;
pub use validate::{MAX_PROFILE_DEPTH, endpoint_location};

use toml::de::DeTable;

use read::{Cx, Value};

/// Why a topology could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{} has {}", .0.source.name, diag::plural(.0.errors(), "problem"))]
    Invalid(Box<Diagnostics>),
}

/// A valid topology and the warnings about it (none is an error).
#[derive(Clone, Debug)]
pub struct Checked {
    pub topology: Topology,
    pub warnings: Diagnostics,
}

/// Reads and validates a topology file.
pub fn load(path: &Path) -> Result<Topology, LoadError> {
    load_checked(path).map(|c| c.topology)
}

/// Reads and validates a topology file, keeping the warnings.
pub fn load_checked(path: &Path) -> Result<Checked, LoadError> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
        path: name.clone(),
        source,
    })?;
    check(Source::new(name, text)).map_err(|d| LoadError::Invalid(Box::new(d)))
}

/// Validates topology text; `Err` holds every problem found, in source order.
pub fn parse(source: Source) -> Result<Topology, Diagnostics> {
    check(source).map(|c| c.topology)
}

/// Validates topology text, keeping the warnings of a valid file; `Err` holds every error
/// found, in source order.
pub fn check(source: Source) -> Result<Checked, Diagnostics> {
    let mut cx = Cx::new(&source.text);
    let (root, syntax) = DeTable::parse_recoverable(&source.text);
    for e in &syntax {
        let span = e.span().unwrap_or(0..0);
        cx.error(
            Code::Syntax,
            span,
            first_line(e.message()),
            "fix the TOML syntax here; see https://toml.io for the format",
        );
    }
    let topology = if syntax.is_empty() {
        let root = Value::new(0..0, toml::de::DeValue::Table(root.into_inner()));
        let names = validate::Names::declared(&root);
        let topology = parse::topology(&mut cx, &root);
        if let Some(t) = &topology {
            validate::topology(&mut cx, t, &names);
            if cx.diags.is_empty() {
                validate::warnings(&mut cx, t);
            }
        }
        topology
    } else {
        None
    };
    let mut items = cx.diags;
    items.sort_by_key(|d| (d.span.start, d.code.as_str()));
    items.dedup();
    match topology {
        Some(topology) if !items.iter().any(Diagnostic::is_error) => Ok(Checked {
            topology,
            warnings: Diagnostics { source, items },
        }),
        _ => Err(Diagnostics { source, items }),
    }
}

fn first_line(message: &str) -> String {
    message
        .lines()
        .next()
        .unwrap_or("invalid TOML")
        .trim()
        .to_string()
}
