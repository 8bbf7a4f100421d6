//! What `packaging/` ships: systemd units that systemd itself accepts, a Grafana dashboard that
//! queries only metrics Tandem exports (the README's list, which `operator.rs` checks against
//! `/metrics`), and a Debian package whose every asset exists.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Every `tandem_…` name in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("tandem_") && w.len() > "tandem_".len())
        .map(str::to_string)
        .collect()
}

/// `systemd-analyze verify` on each unit as shipped, but for the binary's path (systemd checks
/// that `ExecStart` names an executable, and this one is not installed): unknown keys, bad
/// values and wrong sections are all errors to it. Where systemd is not PID 1 (containers,
/// CI) this is as far as a unit can be taken.
#[test]
fn the_systemd_units_pass_systemd_analyze_verify() {
    let dir = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_tandem");
    for (unit, as_name) in [
        ("tandem.service", "tandem.service"),
        // A template is verified as one of its instances.
        ("tandem@.service", "tandem@edge-1.service"),
    ] {
        let text = std::fs::read_to_string(root().join("packaging/systemd").join(unit)).unwrap();
        assert!(text.contains("ExecStart=/usr/bin/tandem up "), "{unit}");
        let path = dir.path().join(as_name);
        std::fs::write(&path, text.replace("/usr/bin/tandem", bin)).unwrap();
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&path)
            .output()
            .expect("systemd-analyze is installed (scripts/deps installs systemd)");
        let stderr = String::from_utf8_lossy(&out.stderr);
        // Only complaints about this unit count (the host's own units may have their own).
        let ours: Vec<&str> = stderr.lines().filter(|l| l.contains(as_name)).collect();
        assert!(out.status.success() && ours.is_empty(), "{unit}: {stderr}");
    }
}

#[test]
fn the_grafana_dashboard_queries_only_exported_metrics() {
    let text = std::fs::read_to_string(root().join("packaging/grafana/tandem.json")).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(dash["uid"], "tandem-overview");
    let mut queried = BTreeSet::new();
    let mut ids = BTreeSet::new();
    for p in dash["panels"].as_array().unwrap() {
        assert!(
            ids.insert(p["id"].as_u64().unwrap()),
            "panel ids are unique"
        );
        if p["type"] == "row" {
            continue;
        }
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{} has no query", p["title"]);
        for t in targets {
            queried.extend(metric_names(t["expr"].as_str().unwrap()));
        }
    }
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let named = metric_names(&readme);
    let unknown: Vec<_> = queried.difference(&named).collect();
    assert!(unknown.is_empty(), "queried but not exported: {unknown:?}");
    // Every tier has a panel: at least a metric of each family.
    for family in ["health", "dns", "lb", "scaleset", "db", "cluster", "backup"] {
        let prefix = format!("tandem_{family}_");
        assert!(
            queried.iter().any(|m| m.starts_with(&prefix)),
            "no panel for {family}"
        );
    }
}

/// The assets `[package.metadata.deb]` lists exist (the binary is built by `cargo deb`).
#[test]
fn the_debian_package_ships_files_that_exist() {
    let manifest: toml::Table = std::fs::read_to_string(root().join("crates/tandem/Cargo.toml"))
        .unwrap()
        .parse()
        .unwrap();
    let deb = &manifest["package"]["metadata"]["deb"];
    let assets = deb["assets"].as_array().unwrap();
    let mut dests = BTreeSet::new();
    for a in assets {
        let (src, dest) = (a[0].as_str().unwrap(), a[1].as_str().unwrap());
        dests.insert(dest.to_string());
        if src == "target/release/tandem" {
            assert_eq!(dest, "usr/bin/");
            continue;
        }
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(src);
        assert!(path.is_file(), "{src} is missing");
    }
    assert!(dests.contains("lib/systemd/system/"), "{dests:?}");
    assert_eq!(deb["features"][0].as_str(), Some("cluster"));
}
