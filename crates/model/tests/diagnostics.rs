//! Pins the exact text users see for each kind of diagnostic. Each case is a topology file in
//! `tests/diagnostics/NAME.toml` and the full report expected for it in `NAME.txt` (for a valid
//! file: its warnings, then `valid`).
//! Set `BLESS=1` to rewrite the expectations after an intended change, then review the diff.

#![allow(clippy::unwrap_used)]

use std::path::Path;

fn check(name: &str) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/diagnostics");
    let text = std::fs::read_to_string(dir.join(format!("{name}.toml"))).unwrap();
    let report = match model::check(model::Source::new(format!("{name}.toml"), text)) {
        Ok(c) if c.warnings.items.is_empty() => "valid\n".to_string(),
        Ok(c) => format!("{}valid\n", c.warnings.render()),
        Err(d) => d.render(),
    };
    let expected_path = dir.join(format!("{name}.txt"));
    if std::env::var_os("BLESS").is_some() {
        std::fs::write(&expected_path, &report).unwrap();
    }
    let expected = std::fs::read_to_string(&expected_path).unwrap_or_default();
    assert_eq!(report, expected, "report for {name}.toml differs");
}

macro_rules! cases {
    ($($name:ident),* $(,)?) => {$(
        #[test]
        fn $name() {
            check(stringify!($name));
        }
    )*};
}

cases!(
    syntax,
    cluster_nameservers,
    tls_rules,
    tls_cluster,
    tls_single,
    tls_mixed,
    unknown_keys,
    missing_keys,
    wrong_types,
    bad_values,
    out_of_range,
    duplicates,
    references,
    profile_cycle,
    profile_depth,
    priorities,
    monitor_rules,
    scale_set_rules,
    database_rules,
    routing_rules,
    many_at_once,
    placement,
    cluster_rules,
    cluster_ok,
    cluster_database,
    cluster_addresses,
    cname_at_apex,
    profile_domains,
    nameservers,
    nameserver_errors,
    empty_file,
    nothing_to_run,
    address_clashes,
    address_clash_with_default_api,
    dns_rrl,
    duplicate_names_listed_once,
    backup_rules,
    backup_ok,
    app_rules,
);

#[test]
fn example_topologies_are_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml")
            && let Err(e) = model::load(&path)
        {
            match e {
                model::LoadError::Invalid(d) => panic!("{}", d.render()),
                other => panic!("{other}"),
            }
        }
    }
}

#[test]
fn json_report_locates_each_problem() {
    let text = "[[site]]\nname = \"edge\"\nrole = \"edgy\"\nfoo = 1\n";
    let d = model::parse(model::Source::new("t.toml", text)).unwrap_err();
    let json = d.to_json();
    assert_eq!(
        json,
        serde_json::json!([
            {"file": "t.toml", "line": 3, "column": 8, "severity": "error", "code": "E008",
             "message": "`role` cannot be \"edgy\"", "help": "expected one of: edge, region, witness"},
            {"file": "t.toml", "line": 4, "column": 1, "severity": "error", "code": "E002",
             "message": "unknown key `foo` in site", "help": "expected one of: name, role, location"},
        ])
    );
}

#[test]
fn json_report_marks_warnings() {
    let text = "[[site]]\nname = \"edge\"\nrole = \"edge\"\n";
    let c = model::check(model::Source::new("t.toml", text)).unwrap();
    assert_eq!(
        c.warnings.to_json(),
        serde_json::json!([
            {"file": "t.toml", "line": 1, "column": 1, "severity": "warning", "code": "W001",
             "message": "the topology serves and runs nothing",
             "help": "add a [dns] zone with profiles, a [[load_balancer]], a [[scale_set]] or a [[database]]; examples/quickstart.toml shows them all"},
        ])
    );
}

#[test]
fn example_topologies_have_no_warnings() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let c = model::load_checked(&path).unwrap();
            assert!(c.warnings.items.is_empty(), "{}", c.warnings.render());
        }
    }
}

#[test]
fn example_reads_into_typed_values() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/two-site.toml");
    let t = model::load(&path).unwrap();
    let web = t.monitor("web").unwrap();
    assert_eq!(web.interval, std::time::Duration::from_secs(1));
    assert_eq!(web.timeout, std::time::Duration::from_millis(500));
    assert_eq!((web.tolerated_failures, web.recovery_successes), (1, 2));
    assert_eq!(
        web.headers.get("Host").map(String::as_str),
        Some("www.shop.test")
    );
    let www = t.profile("www").unwrap();
    assert_eq!(www.routing, model::Routing::Priority);
    assert_eq!(www.failback_hold, std::time::Duration::from_secs(30));
    assert_eq!(
        www.endpoints[0].target,
        model::Target::LoadBalancer(model::Name::new("edge-web", 0..0))
    );
    let set = t.scale_set("edge-web").unwrap();
    assert_eq!(
        set.capacity,
        model::Capacity {
            min: 2,
            max: 6,
            initial: 2
        }
    );
    assert_eq!(set.autoscale.len(), 2);
    assert_eq!(set.autoscale[1].change, -1);
    assert_eq!(t.databases[0].max_lag_on_failover, 1_000_000);
    assert_eq!(t.apps[0].sites.len(), 2);
}

#[test]
fn dns_rrl_has_defaults_and_reads_every_key() {
    let base = "[dns]\nlisten = [\"127.0.0.1:5353\"]\n";
    let t = model::parse(model::Source::new("t.toml", base.to_string())).unwrap();
    assert_eq!(t.dns.unwrap().rrl, model::Rrl::default());
    let d = model::Rrl::default();
    assert!(d.enabled);
    assert_eq!(
        (
            d.responses_per_second,
            d.slip,
            d.ipv4_prefix,
            d.ipv6_prefix,
            d.table_size
        ),
        (20, 2, 24, 56, 65_536)
    );
    assert_eq!(
        d.exempt.iter().map(ToString::to_string).collect::<Vec<_>>(),
        ["127.0.0.0/8", "::1/128"]
    );
    let text = format!(
        "{base}[dns.rrl]\nenabled = false\nresponses_per_second = 5\nslip = 0\nipv4_prefix = 32\n\
         ipv6_prefix = 64\ntable_size = 1024\nexempt = []\n"
    );
    let r = model::parse(model::Source::new("t.toml", text))
        .unwrap()
        .dns
        .unwrap()
        .rrl;
    assert_eq!(
        r,
        model::Rrl {
            enabled: false,
            responses_per_second: 5,
            slip: 0,
            ipv4_prefix: 32,
            ipv6_prefix: 64,
            table_size: 1024,
            exempt: Vec::new(),
        }
    );
}
