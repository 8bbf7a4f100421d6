//! What changed between two versions of a topology file, section by section, for a reload's
//! answer: items added or removed (by name), and the keys changed in the others.
//!
//! It compares the files' TOML values (not their text), so comments, spacing and key order do
//! not count as changes.

use std::collections::BTreeMap;

use toml::de::{DeTable, DeValue};

/// One changed item.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    /// The section: `tandem`, `dns`, `profile`, `scale_set`…
    pub section: String,
    /// The item's name in an array of tables (`[[profile]]`); `None` for a plain table.
    pub name: Option<String>,
    pub kind: ChangeKind,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChangeKind {
    Added,
    Removed,
    /// The keys whose values changed (added, removed or different).
    Changed(Vec<String>),
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = self.section.replace('_', " ");
        match &self.name {
            Some(n) => write!(f, "{what} {n}")?,
            None => write!(f, "[{}]", self.section)?,
        }
        match &self.kind {
            ChangeKind::Added => f.write_str(": added"),
            ChangeKind::Removed => f.write_str(": removed"),
            ChangeKind::Changed(keys) => write!(f, ": {} changed", keys.join(", ")),
        }
    }
}

/// The changes from `old` to `new` (both valid topology text); empty when they mean the same.
pub fn diff(old: &str, new: &str) -> Vec<Change> {
    let (Ok(a), Ok(b)) = (DeTable::parse(old), DeTable::parse(new)) else {
        return Vec::new();
    };
    let (a, b) = (a.into_inner(), b.into_inner());
    let mut keys: Vec<&str> = a
        .keys()
        .chain(b.keys())
        .map(|k| k.get_ref().as_ref())
        .collect();
    keys.sort();
    keys.dedup();
    let mut out = Vec::new();
    for key in keys {
        let (va, vb) = (get(&a, key), get(&b, key));
        match (items(va), items(vb)) {
            (Some(ia), Some(ib)) => out.extend(compare_items(key, &ia, &ib)),
            (Some(ia), None) if vb.is_none() => {
                out.extend(compare_items(key, &ia, &BTreeMap::new()))
            }
            (None, Some(ib)) if va.is_none() => {
                out.extend(compare_items(key, &BTreeMap::new(), &ib))
            }
            _ => {
                let changed = changed_keys(va, vb);
                if !changed.is_empty() {
                    let kind = match (va, vb) {
                        (None, Some(_)) => ChangeKind::Added,
                        (Some(_), None) => ChangeKind::Removed,
                        _ => ChangeKind::Changed(changed),
                    };
                    out.push(Change {
                        section: key.to_string(),
                        name: None,
                        kind,
                    });
                }
            }
        }
    }
    out
}

/// The items of an array of tables, by name; `None` for any other value.
fn items<'a, 'i>(v: Option<&'a DeValue<'i>>) -> Option<BTreeMap<String, &'a DeValue<'i>>> {
    match v {
        Some(DeValue::Array(list)) => Some(named(list.iter().map(|i| i.get_ref()))),
        _ => None,
    }
}

fn get<'a, 'i>(t: &'a DeTable<'i>, key: &str) -> Option<&'a DeValue<'i>> {
    t.iter()
        .find(|(k, _)| k.get_ref().as_ref() == key)
        .map(|(_, v)| v.get_ref())
}

/// An array of tables by each item's `name` (or `site`, for database members), else position.
fn named<'a, 'i: 'a>(
    items: impl Iterator<Item = &'a DeValue<'i>>,
) -> BTreeMap<String, &'a DeValue<'i>> {
    items
        .enumerate()
        .map(|(i, v)| {
            let name = match v {
                DeValue::Table(t) => {
                    get(t, "name")
                        .or_else(|| get(t, "site"))
                        .and_then(|n| match n {
                            DeValue::String(s) => Some(s.to_string()),
                            _ => None,
                        })
                }
                _ => None,
            };
            (name.unwrap_or_else(|| format!("#{}", i + 1)), v)
        })
        .collect()
}

fn compare_items(
    section: &str,
    a: &BTreeMap<String, &DeValue<'_>>,
    b: &BTreeMap<String, &DeValue<'_>>,
) -> Vec<Change> {
    let mut out = Vec::new();
    let names: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    for name in names {
        let kind = match (a.get(name), b.get(name)) {
            (None, Some(_)) => ChangeKind::Added,
            (Some(_), None) => ChangeKind::Removed,
            (Some(x), Some(y)) => {
                let changed = changed_keys(Some(*x), Some(*y));
                if changed.is_empty() {
                    continue;
                }
                ChangeKind::Changed(changed)
            }
            (None, None) => continue,
        };
        out.push(Change {
            section: section.to_string(),
            name: Some(name.clone()),
            kind,
        });
    }
    out
}

/// The top-level keys of two tables whose values differ (or `[value]` for non-tables).
fn changed_keys(a: Option<&DeValue<'_>>, b: Option<&DeValue<'_>>) -> Vec<String> {
    match (a, b) {
        (Some(DeValue::Table(ta)), Some(DeValue::Table(tb))) => {
            let mut keys: Vec<&str> = ta
                .keys()
                .chain(tb.keys())
                .map(|k| k.get_ref().as_ref())
                .collect();
            keys.sort();
            keys.dedup();
            keys.into_iter()
                .filter(|k| get(ta, k).map(canonical) != get(tb, k).map(canonical))
                .map(str::to_string)
                .collect()
        }
        (a, b) if a.map(canonical) != b.map(canonical) => vec!["value".into()],
        _ => Vec::new(),
    }
}

/// A value as text with tables' keys sorted, to compare meaning rather than layout.
fn canonical(v: &DeValue<'_>) -> String {
    match v {
        DeValue::String(s) => format!("{s:?}"),
        DeValue::Integer(i) => i.to_string(),
        DeValue::Float(f) => f.to_string(),
        DeValue::Boolean(b) => b.to_string(),
        DeValue::Datetime(d) => d.to_string(),
        DeValue::Array(items) => {
            let inner: Vec<String> = items.iter().map(|i| canonical(i.get_ref())).collect();
            format!("[{}]", inner.join(","))
        }
        DeValue::Table(t) => {
            let mut inner: Vec<String> = t
                .iter()
                .map(|(k, v)| format!("{}={}", k.get_ref(), canonical(v.get_ref())))
                .collect();
            inner.sort();
            format!("{{{}}}", inner.join(","))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_what_changed_and_ignores_layout() {
        let old = "[tandem]\napi = \"127.0.0.1:7400\"\n\n[[profile]]\nname = \"www\"\nfailback_hold = \"10s\"\n\n[[scale_set]]\nname = \"web\"\ncommand = [\"a\"]\n";
        let same = "# a comment\n[tandem]\napi   = \"127.0.0.1:7400\"\n[[profile]]\nfailback_hold = \"10s\"\nname = \"www\"\n[[scale_set]]\nname = \"web\"\ncommand = [\"a\"]\n";
        assert!(diff(old, same).is_empty());
        let new = "[tandem]\napi = \"127.0.0.1:7400\"\n\n[[profile]]\nname = \"www\"\nfailback_hold = \"30s\"\n\n[[scale_set]]\nname = \"api\"\ncommand = [\"b\"]\n";
        let text: Vec<String> = diff(old, new).iter().map(ToString::to_string).collect();
        assert_eq!(
            text,
            [
                "profile www: failback_hold changed",
                "scale set api: added",
                "scale set web: removed"
            ]
        );
    }
}
