//! Reading each section of the topology file into typed values, with the checks that need only
//! that section. Cross-references are checked in `validate`.

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use toml::de::DeValue;

use crate::binds::Proto;
use crate::diag::Code;
use crate::read::{Cx, FromToml, Section, Value, integer, parsed, string};
use crate::types::*;
use crate::units::{self, Cidr, PortRange, StatusRange};

const ROOT_KEYS: &[&str] = &[
    "tandem",
    "cluster",
    "node",
    "site",
    "dns",
    "geo",
    "monitor",
    "profile",
    "load_balancer",
    "scale_set",
    "database",
    "app",
];

/// Longest probe interval accepted, and the shortest.
const MIN_INTERVAL: Duration = Duration::from_millis(100);
const MAX_INTERVAL: Duration = Duration::from_secs(3600);
/// DNS TTLs above a day make failover meaningless.
const MAX_TTL: Duration = Duration::from_secs(86_400);

impl FromToml for Name {
    const EXAMPLE: &'static str = "\"name\"";
    fn from_toml(cx: &mut Cx, key: &str, v: &Value<'_>) -> Option<Self> {
        string(cx, key, v).map(|s| Name::new(s, v.span()))
    }
}

/// Names appear in URLs, metrics and commands: keep them to a safe alphabet.
pub(crate) fn valid_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && s.len() <= 63
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Reads the `name` key of a section.
pub(crate) fn name(cx: &mut Cx, s: Section<'_, '_>) -> Option<Name> {
    let name: Name = cx.req(s, "name")?;
    if !valid_name(&name) {
        cx.error(
            Code::BadName,
            name.span(),
            format!("invalid {} name {:?}", s.what, name.as_str()),
            "use 1 to 63 letters, digits, '-', '_' or '.', starting with a letter or digit",
        );
        return None;
    }
    Some(name)
}

/// A DNS name, lower-cased and without the trailing dot.
fn domain(cx: &mut Cx, s: Section<'_, '_>, key: &str) -> Option<Name> {
    let raw: Name = cx.req(s, key)?;
    dns_name(cx, key, raw)
}

/// Checks a DNS name read for `key`; lower-cased and without the trailing dot.
fn dns_name(cx: &mut Cx, key: &str, raw: Name) -> Option<Name> {
    let lower = raw.trim_end_matches('.').to_ascii_lowercase();
    let ok = !lower.is_empty()
        && lower.len() <= 253
        && lower.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        });
    if !ok {
        cx.error(
            Code::BadDomain,
            raw.span(),
            format!("invalid DNS name {:?} for `{key}`", raw.as_str()),
            "use dot-separated labels of letters, digits and '-', such as \"www.shop.test\"",
        );
        return None;
    }
    Some(Name::new(lower, raw.span()))
}

impl FromToml for PortRange {
    const EXAMPLE: &'static str = "\"20000-20099\"";
    fn from_toml(cx: &mut Cx, key: &str, v: &Value<'_>) -> Option<Self> {
        if let DeValue::Integer(_) = v.get_ref() {
            let p = integer(cx, key, v, 1, 65535)?;
            return PortRange::parse(&p.to_string());
        }
        parsed(
            cx,
            key,
            v,
            Code::BadPortRange,
            "port range",
            "write a port or an ascending range of ports from 1 to 65535, such as \"20000-20099\"",
            PortRange::parse,
        )
    }
}

impl FromToml for StatusRange {
    const EXAMPLE: &'static str = "[\"200-299\"]";
    fn from_toml(cx: &mut Cx, key: &str, v: &Value<'_>) -> Option<Self> {
        let help = "write a status or an ascending range within 100-599, such as \"200-299\"";
        if let DeValue::Integer(_) = v.get_ref() {
            let n = integer(cx, key, v, 100, 599)?;
            return StatusRange::parse(&n.to_string());
        }
        parsed(
            cx,
            key,
            v,
            Code::BadStatusRange,
            "status range",
            help,
            StatusRange::parse,
        )
    }
}

impl FromToml for Cidr {
    const EXAMPLE: &'static str = "[\"10.0.0.0/8\"]";
    fn from_toml(cx: &mut Cx, key: &str, v: &Value<'_>) -> Option<Self> {
        parsed(
            cx,
            key,
            v,
            Code::BadAddress,
            "prefix",
            "write an address and a prefix length, such as \"10.1.0.0/16\" or \"2001:db8::/32\"",
            Cidr::parse,
        )
    }
}

/// A byte size such as `"1MB"`.
struct Size(u64);

impl FromToml for Size {
    const EXAMPLE: &'static str = "\"1MB\"";
    fn from_toml(cx: &mut Cx, key: &str, v: &Value<'_>) -> Option<Self> {
        if let DeValue::Integer(_) = v.get_ref() {
            return integer(cx, key, v, 0, i64::MAX).map(|n| Size(n as u64));
        }
        parsed(
            cx,
            key,
            v,
            Code::BadSize,
            "size",
            "write a number of bytes with a unit (B, KB, MB, GB, KiB, MiB, GiB), such as \"1MB\"",
            units::parse_size,
        )
        .map(Size)
    }
}

impl FromToml for Amount {
    const EXAMPLE: &'static str = "\"20%\"";
    fn from_toml(cx: &mut Cx, key: &str, v: &Value<'_>) -> Option<Self> {
        if let DeValue::Integer(_) = v.get_ref() {
            return integer(cx, key, v, 1, 10_000).map(|n| Amount::Count(n as u32));
        }
        parsed(
            cx,
            key,
            v,
            Code::OutOfRange,
            "amount",
            "write a count of instances such as 2, or a share from 1% to 100% such as \"20%\"",
            |s| {
                let n: u32 = s.strip_suffix('%')?.trim().parse().ok()?;
                (1..=100).contains(&n).then_some(Amount::Percent(n))
            },
        )
    }
}

/// A duration bounded to `min..=max`, reported with the key's name.
fn duration_in(
    cx: &mut Cx,
    s: Section<'_, '_>,
    key: &str,
    default: Duration,
    min: Duration,
    max: Duration,
) -> Option<Duration> {
    let d = cx.or(s, key, default)?;
    if d < min || d > max {
        let span = s.get(key).map_or_else(|| cx.header_span(s), |v| v.span());
        cx.error(
            Code::OutOfRange,
            span,
            format!("`{key}` of {} is out of range", units::format_duration(d)),
            format!(
                "use a duration from {} to {}",
                units::format_duration(min),
                units::format_duration(max)
            ),
        );
        return None;
    }
    Some(d)
}

/// A whole number bounded to `min..=max` with a default.
fn number_in(
    cx: &mut Cx,
    s: Section<'_, '_>,
    key: &str,
    default: u32,
    min: u32,
    max: u32,
) -> Option<u32> {
    match s.get(key) {
        Some(v) => integer(cx, key, v, i64::from(min), i64::from(max)).map(|n| n as u32),
        None => Some(default),
    }
}

/// A required whole number in `min..=max`.
fn required_in(cx: &mut Cx, s: Section<'_, '_>, key: &str, min: u32, max: u32) -> Option<u32> {
    match s.get(key) {
        Some(v) => integer(cx, key, v, i64::from(min), i64::from(max)).map(|n| n as u32),
        None => cx.req::<u32>(s, key),
    }
}

/// Reads the whole file. `None` when any problem was reported.
pub(crate) fn topology(cx: &mut Cx, root: &Value<'_>) -> Option<Topology> {
    let root = cx.section(root, "the topology", ROOT_KEYS)?;
    // Problems in [tandem] are reported; the defaults stand in so the rest is still checked.
    let clustered = root.get("node").is_some();
    let tandem = root
        .get("tandem")
        .and_then(|v| cx.section(v, "[tandem]", SETTINGS_KEYS))
        .and_then(|s| settings(cx, s, clustered))
        .unwrap_or_else(|| Settings {
            state_dir: PathBuf::from(".tandem"),
            api: default_api(),
            tokens: None,
            open_reads: false,
            tls: None,
        });
    let cluster = match root.get("cluster") {
        Some(v) => cx
            .section(v, "[cluster]", crate::cluster::CLUSTER_KEYS)
            .and_then(|s| crate::cluster::cluster(cx, s)),
        None => None,
    };
    let nodes = cx.tables(
        root,
        "node",
        "node",
        crate::cluster::NODE_KEYS,
        crate::cluster::node,
    );
    // In cluster mode each node listens on its own `api`; `[tandem] api` is not bound.
    if root.get("tandem").is_none() && root.get("node").is_none() {
        cx.bind(
            "the API (`[tandem] api`)".into(),
            tandem.api,
            Proto::Tcp,
            None,
        );
    }
    let sites = cx.tables(root, "site", "site", &["name", "role", "location"], site);
    let dns = match root.get("dns") {
        Some(v) => cx
            .section(v, "[dns]", &["listen", "zone", "rrl"])
            .map(|s| dns(cx, s, !nodes.is_empty())),
        None => Some(None),
    };
    let geo = match root.get("geo") {
        Some(v) => cx
            .section(v, "[geo]", &["database", "area"])
            .map(|s| geo(cx, s)),
        None => Some(Geo::default()),
    };
    let monitors = cx.tables(root, "monitor", "monitor", MONITOR_KEYS, monitor);
    let profiles = cx.tables(root, "profile", "profile", PROFILE_KEYS, profile);
    let load_balancers = cx.tables(root, "load_balancer", "load balancer", LB_KEYS, lb);
    let scale_sets = cx.tables(root, "scale_set", "scale set", SCALE_SET_KEYS, scale_set);
    let databases = cx.tables(root, "database", "database", DATABASE_KEYS, database);
    let apps = cx.tables(root, "app", "app", APP_KEYS, app);
    Some(Topology {
        tandem,
        cluster,
        nodes,
        sites,
        dns: dns.flatten(),
        geo: geo.unwrap_or_default(),
        monitors,
        profiles,
        load_balancers,
        scale_sets,
        databases,
        apps,
    })
}

const SETTINGS_KEYS: &[&str] = &[
    "state_dir",
    "api",
    "tokens",
    "open_reads",
    "tls_cert",
    "tls_key",
    "tls_ca",
];

fn default_api() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7400))
}

fn settings(cx: &mut Cx, s: Section<'_, '_>, clustered: bool) -> Option<Settings> {
    let state_dir: Option<String> = cx.or(s, "state_dir", ".tandem".into());
    let api = cx.or(s, "api", default_api());
    if let Some(api) = api {
        cx.bind(
            "the API (`[tandem] api`)".into(),
            api,
            Proto::Tcp,
            s.get("api").map(|v| v.span()),
        );
    }
    let tokens: Option<Option<String>> = cx.opt(s, "tokens");
    let open_reads = cx.or(s, "open_reads", false);
    let tls = tls(cx, s, clustered);
    Some(Settings {
        state_dir: PathBuf::from(state_dir?),
        api: api?,
        tokens: tokens?.map(PathBuf::from),
        open_reads: open_reads?,
        tls: tls?,
    })
}

/// `tls_cert` and `tls_key` together, `tls_ca` only with them, and in cluster mode always with
/// them (nodes ask each other's APIs and must verify them).
fn tls(cx: &mut Cx, s: Section<'_, '_>, clustered: bool) -> Option<Option<Tls>> {
    let cert: Option<String> = cx.opt(s, "tls_cert")?;
    let key: Option<String> = cx.opt(s, "tls_key")?;
    let ca: Option<String> = cx.opt(s, "tls_ca")?;
    match (cert, key) {
        (Some(_), Some(_)) if clustered && ca.is_none() => {
            let span = s.get("tls_cert").map_or_else(|| s.span(), |v| v.span());
            cx.error(
                Code::MissingKey,
                span,
                "in cluster mode the API's TLS needs `tls_ca`",
                "add tls_ca: the CA certificates (PEM) that sign every node's API certificate, so nodes can verify each other",
            );
            None
        }
        (Some(cert), Some(key)) => Some(Some(Tls {
            cert: cert.into(),
            key: key.into(),
            ca: ca.map(PathBuf::from),
        })),
        (None, None) => {
            if let Some(v) = s.get("tls_ca") {
                cx.error(
                    Code::MissingKey,
                    v.span(),
                    "`tls_ca` without `tls_cert` and `tls_key`",
                    "add tls_cert and tls_key (PEM files) to serve the API over TLS, or remove tls_ca",
                );
                return None;
            }
            Some(None)
        }
        (Some(_), None) | (None, Some(_)) => {
            let (has, lacks) = if s.get("tls_cert").is_some() {
                ("tls_cert", "tls_key")
            } else {
                ("tls_key", "tls_cert")
            };
            let span = s.get(has).map_or_else(|| s.span(), |v| v.span());
            cx.error(
                Code::MissingKey,
                span,
                format!("`{has}` without `{lacks}`"),
                "give both: the API's certificate chain (tls_cert) and its private key (tls_key), as PEM files",
            );
            None
        }
    }
}

fn site(cx: &mut Cx, s: Section<'_, '_>) -> Option<Site> {
    let name = name(cx, s);
    let role = cx.req(s, "role");
    let location = opt_location(cx, s);
    Some(Site {
        name: name?,
        role: role?,
        location: location?,
    })
}

/// An optional `location = { lat, lon }`: `Some(None)` when absent, `None` when reported wrong.
fn opt_location(cx: &mut Cx, s: Section<'_, '_>) -> Option<Option<Location>> {
    match s.get("location") {
        Some(v) => cx
            .section(v, "location", &["lat", "lon"])
            .and_then(|l| location(cx, l))
            .map(Some),
        None => Some(None),
    }
}

fn location(cx: &mut Cx, s: Section<'_, '_>) -> Option<Location> {
    let mut coordinate = |key: &str, limit: f64| {
        let v: f64 = cx.req(s, key)?;
        if !(-limit..=limit).contains(&v) {
            let span = s.get(key).map_or_else(|| s.span(), |v| v.span());
            cx.error(
                Code::OutOfRange,
                span,
                format!("`{key}` of {v} is out of range"),
                format!("use degrees from -{limit} to {limit}"),
            );
            return None;
        }
        Some(v)
    };
    let lat = coordinate("lat", 90.0);
    let lon = coordinate("lon", 180.0);
    Some(Location {
        lat: lat?,
        lon: lon?,
    })
}

/// `[dns]`; `listen` is required unless nodes bring their own listeners (cluster mode).
fn dns(cx: &mut Cx, s: Section<'_, '_>, cluster_mode: bool) -> Option<Dns> {
    let listen: Option<Vec<SocketAddr>> = if cluster_mode {
        cx.or(s, "listen", Vec::new())
    } else {
        cx.req(s, "listen")
    };
    let listen_span = s.get("listen").map(|v| v.span());
    if let (Some(listen), Some(v)) = (&listen, s.get("listen")) {
        for (addr, span) in listen.iter().zip(item_spans(v)) {
            // UDP and TCP; on `[::]` IPv6 only (the listeners set IPV6_V6ONLY).
            cx.bind(
                "a DNS listener (`[dns] listen`)".into(),
                *addr,
                Proto::Both,
                Some(span),
            );
            cx.v6only();
        }
    }
    let zones = cx.tables(
        s,
        "zone",
        "zone",
        &["name", "nameservers", "hostmaster", "ttl", "negative_ttl"],
        |cx, z| {
            let name = domain(cx, z, "name");
            let nameservers = match z.get("nameservers") {
                Some(v) => nameservers(cx, v),
                None => {
                    cx.missing(z, "nameservers", "[…]");
                    None
                }
            };
            let hostmaster = domain(cx, z, "hostmaster");
            let ttl = duration_in(
                cx,
                z,
                "ttl",
                Duration::from_secs(3600),
                Duration::ZERO,
                MAX_TTL,
            );
            let negative_ttl = duration_in(
                cx,
                z,
                "negative_ttl",
                Duration::from_secs(30),
                Duration::ZERO,
                MAX_TTL,
            );
            if nameservers.as_ref().is_some_and(Vec::is_empty) {
                let span = z.get("nameservers").map_or_else(|| z.span(), |v| v.span());
                cx.error(
                    Code::MissingKey,
                    span,
                    "a zone needs at least one name server",
                    "list the host names that serve it, such as [\"ns1.shop.test\"]",
                );
                return None;
            }
            Some(Zone {
                name: name?,
                nameservers: nameservers?,
                hostmaster: hostmaster?.to_string(),
                ttl: ttl?,
                negative_ttl: negative_ttl?,
            })
        },
    );
    let rrl = match s.get("rrl") {
        Some(v) => cx
            .section(v, "[dns.rrl]", RRL_KEYS)
            .and_then(|r| rrl(cx, r)),
        None => Some(Rrl::default()),
    };
    Some(Dns {
        listen: listen?,
        listen_span,
        zones,
        rrl: rrl?,
    })
}

const RRL_KEYS: &[&str] = &[
    "enabled",
    "responses_per_second",
    "slip",
    "ipv4_prefix",
    "ipv6_prefix",
    "table_size",
    "exempt",
];

/// `[dns.rrl]`: every key optional, each bounded (BIND's limits where it has one: slip 0-10).
fn rrl(cx: &mut Cx, s: Section<'_, '_>) -> Option<Rrl> {
    let enabled = cx.or(s, "enabled", true);
    let responses_per_second = number_in(
        cx,
        s,
        "responses_per_second",
        RRL_RESPONSES_PER_SECOND,
        1,
        1_000_000,
    );
    let slip = number_in(cx, s, "slip", RRL_SLIP, 0, 10);
    let ipv4_prefix = number_in(cx, s, "ipv4_prefix", u32::from(RRL_IPV4_PREFIX), 8, 32);
    let ipv6_prefix = number_in(cx, s, "ipv6_prefix", u32::from(RRL_IPV6_PREFIX), 16, 128);
    let table_size = number_in(cx, s, "table_size", RRL_TABLE_SIZE, 1024, 4_194_304);
    let exempt = cx.or(s, "exempt", Rrl::default_exempt());
    Some(Rrl {
        enabled: enabled?,
        responses_per_second: responses_per_second?,
        slip: slip?,
        ipv4_prefix: ipv4_prefix? as u8,
        ipv6_prefix: ipv6_prefix? as u8,
        table_size: table_size?,
        exempt: exempt?,
    })
}

/// The span of each item of an array (or of the value itself when it is not one).
pub(crate) fn item_spans(v: &Value<'_>) -> Vec<std::ops::Range<usize>> {
    match v.get_ref() {
        DeValue::Array(items) => items.iter().map(|i| i.span()).collect(),
        _ => vec![v.span()],
    }
}

/// `nameservers = ["ns1.shop.test", { name = "ns2.shop.test", address = "192.0.2.10" }]`.
fn nameservers(cx: &mut Cx, v: &Value<'_>) -> Option<Vec<NameServer>> {
    let DeValue::Array(items) = v.get_ref() else {
        cx.wrong_type(v, "nameservers", "an array");
        return None;
    };
    let read: Vec<Option<NameServer>> = items.iter().map(|i| nameserver(cx, i)).collect();
    let read: Vec<NameServer> = read.into_iter().collect::<Option<_>>()?;
    let mut ok = true;
    for (i, ns) in read.iter().enumerate() {
        if let Some(first) = read[..i].iter().find(|f| f.name == ns.name) {
            let line = cx.line_of(first.name.span().start);
            cx.error(
                Code::DuplicateName,
                ns.name.span(),
                format!("name server `{}` is listed twice", ns.name),
                format!("list it once (the first is on line {line})"),
            );
            ok = false;
        }
    }
    ok.then_some(read)
}

/// `"ns1.shop.test"` or `{ name = "ns1.shop.test", address = "192.0.2.10" }`, where `address`
/// may be an array of IPv4 and IPv6 addresses.
fn nameserver(cx: &mut Cx, v: &Value<'_>) -> Option<NameServer> {
    const SHAPE: &str = "a host name or { name = \"…\", address = \"…\" }";
    match v.get_ref() {
        DeValue::String(_) => {
            let raw = Name::from_toml(cx, "nameservers", v)?;
            let name = dns_name(cx, "nameservers", raw)?;
            return Some(NameServer {
                name,
                addresses: Vec::new(),
            });
        }
        DeValue::Table(_) => {}
        _ => {
            cx.wrong_type(v, "nameservers", SHAPE);
            return None;
        }
    }
    let s = cx.section(v, "name server", &["name", "address"])?;
    let name = domain(cx, s, "name");
    let addresses = match s.get("address") {
        None => Some(Vec::new()),
        Some(a) => match a.get_ref() {
            DeValue::Array(items) if items.is_empty() => {
                cx.error(
                    Code::MissingKey,
                    a.span(),
                    "`address` lists no addresses",
                    "give at least one IPv4 or IPv6 address, or leave `address` out",
                );
                None
            }
            DeValue::Array(_) => Vec::<IpAddr>::from_toml(cx, "address", a).map(|mut list| {
                let mut seen = Vec::with_capacity(list.len());
                list.retain(|ip| {
                    let new = !seen.contains(ip);
                    seen.push(*ip);
                    new
                });
                list
            }),
            _ => IpAddr::from_toml(cx, "address", a).map(|ip| vec![ip]),
        },
    };
    Some(NameServer {
        name: name?,
        addresses: addresses?,
    })
}

fn geo(cx: &mut Cx, s: Section<'_, '_>) -> Geo {
    let database: Option<Option<String>> = cx.opt(s, "database");
    let areas = cx.tables(
        s,
        "area",
        "geo area",
        &["name", "subnets", "location"],
        |cx, a| {
            let name = name(cx, a);
            let subnets = cx.req(a, "subnets");
            let location = opt_location(cx, a);
            Some(GeoArea {
                name: name?,
                subnets: subnets?,
                location: location?,
            })
        },
    );
    unique(cx, areas.iter().map(|a| &a.name), "geo area");
    Geo {
        database: database.flatten().map(PathBuf::from),
        areas,
    }
}

const MONITOR_KEYS: &[&str] = &[
    "name",
    "protocol",
    "port",
    "path",
    "headers",
    "expected_status",
    "body",
    "interval",
    "timeout",
    "tolerated_failures",
    "recovery_successes",
    "tls_verify",
    "sni",
];

fn monitor(cx: &mut Cx, s: Section<'_, '_>) -> Option<Monitor> {
    let name = name(cx, s);
    let protocol: Option<Protocol> = cx.req(s, "protocol");
    let port = required_in(cx, s, "port", 1, 65535);
    let path: Option<String> = cx.or(s, "path", "/".into());
    let headers = cx.or(s, "headers", BTreeMap::new());
    let expected_status = cx.or(s, "expected_status", vec![StatusRange::SUCCESS]);
    let body = cx.opt(s, "body");
    let interval = duration_in(
        cx,
        s,
        "interval",
        Duration::from_secs(10),
        MIN_INTERVAL,
        MAX_INTERVAL,
    );
    let timeout = duration_in(
        cx,
        s,
        "timeout",
        Duration::from_secs(5),
        Duration::from_millis(10),
        MAX_INTERVAL,
    );
    let tolerated_failures = number_in(cx, s, "tolerated_failures", 2, 0, 100);
    let recovery_successes = number_in(cx, s, "recovery_successes", 2, 1, 100);
    let tls_verify = cx.or(s, "tls_verify", true);
    let sni = cx.opt(s, "sni");
    if let (Some(p), Some(path)) = (protocol, &path) {
        protocol_keys(cx, s, p);
        if p != Protocol::Tcp && !path.starts_with('/') {
            let span = s.get("path").map_or_else(|| s.span(), |v| v.span());
            cx.error(
                Code::NotAllowedHere,
                span,
                format!("HTTP path {path:?} must start with '/'"),
                format!("write `path = \"/{path}\"`"),
            );
        }
    }
    if let (Some(i), Some(t)) = (interval, timeout)
        && t >= i
    {
        let span = s
            .get("timeout")
            .map_or_else(|| cx.header_span(s), |v| v.span());
        cx.error(
            Code::TimeoutNotBelowInterval,
            span,
            format!(
                "timeout {} is not shorter than interval {}",
                units::format_duration(t),
                units::format_duration(i)
            ),
            "a probe must end before the next one starts: lower `timeout` or raise `interval`",
        );
        return None;
    }
    Some(Monitor {
        name: name?,
        protocol: protocol?,
        port: port? as u16,
        path: path?,
        headers: headers?,
        expected_status: expected_status?,
        body: body?,
        interval: interval?,
        timeout: timeout?,
        tolerated_failures: tolerated_failures?,
        recovery_successes: recovery_successes?,
        tls_verify: tls_verify?,
        sni: sni?,
    })
}

/// HTTP settings on a TCP monitor, and TLS settings on a plain one, are mistakes.
fn protocol_keys(cx: &mut Cx, s: Section<'_, '_>, p: Protocol) {
    let not_for: &[&str] = match p {
        Protocol::Tcp => &[
            "path",
            "headers",
            "expected_status",
            "body",
            "tls_verify",
            "sni",
        ],
        Protocol::Http => &["tls_verify", "sni"],
        Protocol::Https => &[],
    };
    for key in not_for {
        if let Some(span) = s.key_span(key) {
            cx.error(
                Code::NotAllowedHere,
                span,
                format!("`{key}` does not apply to protocol \"{p}\""),
                match p {
                    Protocol::Tcp => format!(
                        "a tcp probe only connects; remove `{key}` or use protocol \"http\""
                    ),
                    _ => format!("`{key}` is for https monitors; remove it or use \"https\""),
                },
            );
        }
    }
}

const PROFILE_KEYS: &[&str] = &[
    "name",
    "domain",
    "routing",
    "ttl",
    "monitor",
    "failback_hold",
    "all_down",
    "max_answers",
    "geo",
    "endpoint",
];

const ENDPOINT_KEYS: &[&str] = &[
    "name",
    "target",
    "priority",
    "weight",
    "subnets",
    "site",
    "enabled",
    "min_child_endpoints",
    "min_child_ipv4",
    "min_child_ipv6",
];

fn profile(cx: &mut Cx, s: Section<'_, '_>) -> Option<Profile> {
    let name = name(cx, s);
    let domain = domain(cx, s, "domain");
    let routing: Option<Routing> = cx.req(s, "routing");
    let ttl = duration_in(
        cx,
        s,
        "ttl",
        Duration::from_secs(30),
        Duration::ZERO,
        MAX_TTL,
    );
    let monitor = cx.opt(s, "monitor");
    let failback_hold = duration_in(
        cx,
        s,
        "failback_hold",
        Duration::from_secs(30),
        Duration::ZERO,
        MAX_INTERVAL,
    );
    let all_down = cx.or(s, "all_down", AllDown::ServeAll);
    let max_answers = number_in(cx, s, "max_answers", 8, 1, 32);
    let geo = match s.get("geo") {
        Some(v) => geo_map(cx, v),
        None => Some(Vec::new()),
    };
    let endpoints = cx.tables(s, "endpoint", "endpoint", ENDPOINT_KEYS, endpoint);
    if endpoints.is_empty() && s.get("endpoint").is_none() {
        cx.error(
            Code::MissingKey,
            cx.header_span(s),
            "profile has no endpoints",
            "add at least one [[profile.endpoint]] after this profile",
        );
    }
    unique(cx, endpoints.iter().map(|e| &e.name), "endpoint");
    match routing {
        Some(Routing::Priority) => priorities(cx, &endpoints),
        Some(Routing::Multivalue) => multivalue(cx, &endpoints),
        Some(Routing::Subnet) => subnets(cx, &endpoints),
        Some(Routing::Geographic) if geo.as_ref().is_some_and(Vec::is_empty) => cx.error(
            Code::MissingKey,
            cx.header_span(s),
            "a geographic profile needs a `geo` map",
            "add `geo = { AREA = [\"endpoint\", …], \"*\" = [\"endpoint\"] }`",
        ),
        _ => {}
    }
    if let (Some(r), Some(map)) = (routing, &geo)
        && r != Routing::Geographic
        && let Some(first) = map.first()
    {
        cx.error(
            Code::NotAllowedHere,
            first.0.span(),
            format!("`geo` does not apply to {r} routing"),
            "remove `geo`, or use routing = \"geographic\"",
        );
    }
    if let Some(map) = &geo {
        for (_, list) in map {
            for e in list {
                if !endpoints.iter().any(|x| x.name == *e) {
                    let known: Vec<&str> = endpoints.iter().map(|x| x.name.as_str()).collect();
                    cx.error(
                        Code::UnknownReference,
                        e.span(),
                        format!("unknown endpoint `{e}` in `geo`"),
                        crate::read::suggest(e, &known),
                    );
                }
            }
        }
    }
    Some(Profile {
        name: name?,
        domain: domain?,
        routing: routing?,
        ttl: ttl?,
        monitor: monitor?,
        failback_hold: failback_hold?,
        all_down: all_down?,
        max_answers: max_answers?,
        geo: geo?,
        endpoints,
    })
}

/// `geo = { AREA = ["endpoint", …] }`, in the file's order.
fn geo_map(cx: &mut Cx, v: &Value<'_>) -> Option<Vec<(Name, Vec<Name>)>> {
    let DeValue::Table(table) = v.get_ref() else {
        cx.wrong_type(v, "geo", "a table of area = [\"endpoint\", …]");
        return None;
    };
    let mut out = Vec::new();
    let mut ok = true;
    for (k, list) in table.iter() {
        let area = Name::new(k.get_ref().as_ref(), k.span());
        match Vec::<Name>::from_toml(cx, &area, list) {
            Some(l) if !l.is_empty() => out.push((area, l)),
            Some(_) => {
                cx.error(
                    Code::OutOfRange,
                    list.span(),
                    format!("area `{area}` lists no endpoints"),
                    "list the endpoints for this area in order of preference",
                );
                ok = false;
            }
            None => ok = false,
        }
    }
    ok.then_some(out)
}

/// Multivalue answers are addresses: endpoints must target an address or a load balancer.
fn multivalue(cx: &mut Cx, endpoints: &[Endpoint]) {
    for e in endpoints {
        if matches!(e.target, Target::Cname(_) | Target::Profile(_)) {
            cx.error(
                Code::NotAllowedHere,
                e.name.span(),
                format!(
                    "endpoint `{}` of a multivalue profile is not an address",
                    e.name
                ),
                "multivalue answers list addresses: target an `address` or a `load_balancer`",
            );
        }
    }
}

/// Subnet routing: at most one fallback endpoint, and no prefix claimed twice.
fn subnets(cx: &mut Cx, endpoints: &[Endpoint]) {
    let fallbacks: Vec<&Endpoint> = endpoints.iter().filter(|e| e.subnets.is_empty()).collect();
    for extra in fallbacks.iter().skip(1) {
        cx.error(
            Code::NotAllowedHere,
            extra.name.span(),
            format!(
                "endpoints `{}` and `{}` both have no subnets",
                fallbacks[0].name, extra.name
            ),
            "only one endpoint may be the fallback for clients no subnet matches",
        );
    }
    let mut seen: Vec<(&Cidr, &Name)> = Vec::new();
    for e in endpoints {
        for net in &e.subnets {
            if let Some((_, first)) = seen.iter().find(|(n, _)| *n == net) {
                cx.error(
                    Code::DuplicateName,
                    e.name.span(),
                    format!(
                        "subnet {net} is claimed by endpoints `{first}` and `{}`",
                        e.name
                    ),
                    "give each subnet to one endpoint",
                );
            }
            seen.push((net, &e.name));
        }
    }
}

/// Every endpoint of a priority profile needs a priority, each one different.
fn priorities(cx: &mut Cx, endpoints: &[Endpoint]) {
    let mut seen: BTreeMap<u32, &Name> = BTreeMap::new();
    for e in endpoints {
        match e.priority {
            None => cx.error(
                Code::MissingKey,
                e.name.span(),
                format!(
                    "endpoint `{}` of a priority profile has no priority",
                    e.name
                ),
                "add `priority = N`; the lowest available number gets the traffic",
            ),
            Some(p) => {
                if let Some(first) = seen.insert(p, &e.name) {
                    cx.error(
                        Code::DuplicatePriority,
                        e.name.span(),
                        format!(
                            "endpoints `{first}` and `{}` of profile both have priority {p}",
                            e.name
                        ),
                        "give each endpoint of a priority profile its own priority",
                    );
                }
            }
        }
    }
}

fn endpoint(cx: &mut Cx, s: Section<'_, '_>) -> Option<Endpoint> {
    let name = name(cx, s);
    let target = match s.get("target") {
        Some(v) => cx
            .section(
                v,
                "target",
                &["address", "cname", "load_balancer", "profile"],
            )
            .and_then(|t| target(cx, t)),
        None => {
            cx.missing(s, "target", "{ load_balancer = \"…\" }");
            None
        }
    };
    let priority = match s.get("priority") {
        Some(v) => integer(cx, "priority", v, 1, 1000).map(|n| Some(n as u32)),
        None => Some(None),
    };
    let weight = number_in(cx, s, "weight", 1, 0, 1000);
    let subnets = cx.or(s, "subnets", Vec::new());
    let site = cx.opt(s, "site");
    let enabled = cx.or(s, "enabled", true);
    let min_child_endpoints = number_in(cx, s, "min_child_endpoints", 1, 0, 1000);
    let min_child_ipv4 = number_in(cx, s, "min_child_ipv4", 0, 0, 1000);
    let min_child_ipv6 = number_in(cx, s, "min_child_ipv6", 0, 0, 1000);
    Some(Endpoint {
        name: name?,
        target: target?,
        priority: priority?,
        weight: weight?,
        subnets: subnets?,
        site: site?,
        enabled: enabled?,
        min_child_endpoints: min_child_endpoints?,
        min_child_ipv4: min_child_ipv4?,
        min_child_ipv6: min_child_ipv6?,
    })
}

fn target(cx: &mut Cx, s: Section<'_, '_>) -> Option<Target> {
    if s.table.len() != 1 {
        cx.error(
            Code::NotAllowedHere,
            s.span(),
            "an endpoint target needs exactly one of `address`, `cname`, `load_balancer`, `profile`",
            "write one, such as `target = { load_balancer = \"edge-web\" }`",
        );
        return None;
    }
    if s.get("address").is_some() {
        return cx.req(s, "address").map(Target::Address);
    }
    if s.get("cname").is_some() {
        return domain(cx, s, "cname").map(|n| Target::Cname(n.to_string()));
    }
    if s.get("load_balancer").is_some() {
        return cx.req(s, "load_balancer").map(Target::LoadBalancer);
    }
    cx.req(s, "profile").map(Target::Profile)
}

const LB_KEYS: &[&str] = &[
    "name",
    "site",
    "kind",
    "frontend",
    "protocol",
    "pool",
    "probe",
    "distribution",
    "idle_timeout",
    "idle_reset",
    "drain_timeout",
    "connect_timeout",
    "on_backend_down",
    "all_down",
    "proxy_protocol",
    "rules",
];

fn lb(cx: &mut Cx, s: Section<'_, '_>) -> Option<LoadBalancer> {
    let name = name(cx, s);
    let site = cx.req(s, "site");
    let kind = cx.or(s, "kind", LbKind::Public);
    let frontend: Option<SocketAddr> = cx.req(s, "frontend");
    let protocol = cx.or(s, "protocol", LbProtocol::Tcp);
    let pool = match s.get("pool") {
        Some(v) => cx
            .section(
                v,
                "pool",
                &["addresses", "scale_set", "port", "database", "role"],
            )
            .and_then(|p| pool(cx, p)),
        None => {
            cx.missing(s, "pool", "{ scale_set = \"…\", port = \"…\" }");
            None
        }
    };
    let probe = cx.opt(s, "probe");
    let distribution = cx.or(s, "distribution", Distribution::FiveTuple);
    let idle_timeout = duration_in(
        cx,
        s,
        "idle_timeout",
        Duration::from_secs(240),
        Duration::from_secs(1),
        Duration::from_secs(7200),
    );
    let drain_timeout = duration_in(
        cx,
        s,
        "drain_timeout",
        Duration::from_secs(30),
        Duration::ZERO,
        MAX_INTERVAL,
    );
    let idle_reset = cx.or(s, "idle_reset", false);
    let connect_timeout = duration_in(
        cx,
        s,
        "connect_timeout",
        Duration::from_secs(2),
        Duration::from_millis(10),
        Duration::from_secs(60),
    );
    let on_backend_down = cx.or(s, "on_backend_down", OnBackendDown::Continue);
    let all_down = cx.or(s, "all_down", LbAllDown::Refuse);
    let proxy_protocol = cx.or(s, "proxy_protocol", false);
    let rules = match s.get("rules") {
        Some(v) => lb_rules(cx, v),
        None => Some(Vec::new()),
    };
    let mark = cx.bind_mark();
    if let (Some(f), Some(p)) = (frontend, protocol) {
        let what = format!("load balancer `{}`", written_name(s));
        let proto = match p {
            LbProtocol::Tcp => Proto::Tcp,
            LbProtocol::Udp => Proto::Udp,
        };
        cx.bind(what.clone(), f, proto, s.get("frontend").map(|v| v.span()));
        let rule_spans = s.get("rules").map(|v| match v.get_ref() {
            DeValue::Array(items) => items
                .iter()
                .map(|i| match i.get_ref() {
                    DeValue::Table(t) => t
                        .iter()
                        .find(|(k, _)| k.get_ref().as_ref() == "frontend_port")
                        .map_or(i.span(), |(_, v)| v.span()),
                    _ => i.span(),
                })
                .collect(),
            _ => Vec::new(),
        });
        if let (Some(rules), Some(spans)) = (&rules, rule_spans) {
            for (r, span) in rules.iter().zip(spans) {
                let addr = SocketAddr::new(f.ip(), r.frontend_port);
                cx.bind(format!("{what} (rule port)"), addr, proto, Some(span));
            }
        }
    }
    cx.binds_in_site(mark, site.as_ref().map(|n: &Name| n.as_str()));
    Some(LoadBalancer {
        name: name?,
        site: site?,
        kind: kind?,
        frontend: frontend?,
        protocol: protocol?,
        pool: pool?,
        probe: probe?,
        distribution: distribution?,
        idle_timeout: idle_timeout?,
        idle_reset: idle_reset?,
        drain_timeout: drain_timeout?,
        connect_timeout: connect_timeout?,
        on_backend_down: on_backend_down?,
        all_down: all_down?,
        proxy_protocol: proxy_protocol?,
        rules: rules?,
    })
}

/// The `name` of a section as written (for messages about an item whose name may be invalid).
fn written_name<'a>(s: Section<'a, '_>) -> &'a str {
    s.get("name")
        .and_then(|v| v.get_ref().as_str())
        .unwrap_or("?")
}

/// `rules = [{ frontend_port = N, backend_port = M }, …]`.
fn lb_rules(cx: &mut Cx, v: &Value<'_>) -> Option<Vec<LbRule>> {
    let DeValue::Array(items) = v.get_ref() else {
        cx.wrong_type(v, "rules", "an array of { frontend_port, backend_port }");
        return None;
    };
    let rules: Vec<Option<LbRule>> = items
        .iter()
        .map(|item| {
            let r = cx.section(item, "rule", &["frontend_port", "backend_port"])?;
            let frontend_port = required_in(cx, r, "frontend_port", 1, 65535);
            let backend_port = required_in(cx, r, "backend_port", 1, 65535);
            Some(LbRule {
                frontend_port: frontend_port? as u16,
                backend_port: backend_port? as u16,
            })
        })
        .collect();
    rules.into_iter().collect()
}

fn pool(cx: &mut Cx, s: Section<'_, '_>) -> Option<Pool> {
    let sources = ["addresses", "scale_set", "database"];
    let given: Vec<&str> = sources.into_iter().filter(|k| s.get(k).is_some()).collect();
    if given.len() != 1 {
        cx.error(
            Code::NotAllowedHere,
            s.span(),
            "a pool needs exactly one of `addresses`, `scale_set`, `database`",
            "write one, such as `pool = { scale_set = \"edge-web\", port = \"http\" }`",
        );
        return None;
    }
    let stray = |cx: &mut Cx, keys: &[&str], source: &str| {
        for key in keys {
            if let Some(span) = s.key_span(key) {
                cx.error(
                    Code::NotAllowedHere,
                    span,
                    format!("`{key}` does not apply to a pool of `{source}`"),
                    format!("remove `{key}`"),
                );
            }
        }
    };
    match given[0] {
        "addresses" => {
            stray(cx, &["port", "role"], "addresses");
            let v = s.get("addresses")?;
            let DeValue::Array(items) = v.get_ref() else {
                cx.wrong_type(v, "addresses", "an array");
                return None;
            };
            let backends: Vec<Option<Backend>> = items.iter().map(|i| backend(cx, i)).collect();
            backends
                .into_iter()
                .collect::<Option<_>>()
                .map(Pool::Addresses)
        }
        "scale_set" => {
            stray(cx, &["role"], "scale_set");
            let scale_set = cx.req(s, "scale_set");
            let port = cx.req(s, "port");
            Some(Pool::ScaleSet {
                scale_set: scale_set?,
                port: port?,
            })
        }
        _ => {
            stray(cx, &["port"], "database");
            let database = cx.req(s, "database");
            let role = cx.or(s, "role", DbRole::Primary);
            Some(Pool::Database {
                database: database?,
                role: role?,
            })
        }
    }
}

/// `"ip:port"` or `{ address = "ip:port", weight = N }`.
fn backend(cx: &mut Cx, v: &Value<'_>) -> Option<Backend> {
    if let DeValue::String(_) = v.get_ref() {
        return SocketAddr::from_toml(cx, "addresses", v)
            .map(|address| Backend { address, weight: 1 });
    }
    let s = cx.section(v, "backend", &["address", "weight"])?;
    let address = cx.req(s, "address");
    let weight = number_in(cx, s, "weight", 1, 1, 1000);
    Some(Backend {
        address: address?,
        weight: weight?,
    })
}

const SCALE_SET_KEYS: &[&str] = &[
    "name",
    "site",
    "command",
    "bind",
    "ports",
    "capacity",
    "health",
    "repair",
    "upgrade",
    "scale_in",
    "stop_grace",
    "log_max_size",
    "autoscale",
];

fn scale_set(cx: &mut Cx, s: Section<'_, '_>) -> Option<ScaleSet> {
    let name = name(cx, s);
    let site = cx.req(s, "site");
    let command: Option<Vec<String>> = cx.req(s, "command");
    let bind: Option<IpAddr> = cx.req(s, "bind");
    let ports: Option<BTreeMap<String, PortRange>> = cx.or(s, "ports", BTreeMap::new());
    let capacity = match s.get("capacity") {
        Some(v) => cx
            .section(v, "capacity", &["min", "max", "initial"])
            .and_then(|c| capacity(cx, c)),
        None => {
            cx.missing(s, "capacity", "{ min = 1, max = 4 }");
            None
        }
    };
    let health = cx.opt(s, "health");
    let repair = match s.get("repair") {
        Some(v) => cx
            .section(v, "repair", &["grace_period", "action"])
            .and_then(|r| {
                let grace_period = cx.or(r, "grace_period", Duration::from_secs(10));
                let action = cx.or(r, "action", RepairAction::Replace);
                Some(Repair {
                    grace_period: grace_period?,
                    action: action?,
                })
            }),
        None => Some(Repair {
            grace_period: Duration::from_secs(10),
            action: RepairAction::Replace,
        }),
    };
    let upgrade = match s.get("upgrade") {
        Some(v) => cx
            .section(v, "upgrade", &["max_batch", "max_unhealthy", "pause"])
            .and_then(|u| {
                let max_batch = cx.or(u, "max_batch", Amount::Percent(20));
                let max_unhealthy = cx.or(u, "max_unhealthy", Amount::Percent(20));
                let pause = cx.or(u, "pause", Duration::from_secs(5));
                Some(Upgrade {
                    max_batch: max_batch?,
                    max_unhealthy: max_unhealthy?,
                    pause: pause?,
                })
            }),
        None => Some(Upgrade {
            max_batch: Amount::Percent(20),
            max_unhealthy: Amount::Percent(20),
            pause: Duration::from_secs(5),
        }),
    };
    let scale_in = cx.or(s, "scale_in", ScaleIn::Newest);
    let stop_grace = duration_in(
        cx,
        s,
        "stop_grace",
        Duration::from_secs(10),
        Duration::ZERO,
        MAX_INTERVAL,
    );
    let log_max_size: Option<Size> = cx.or(s, "log_max_size", Size(10_000_000));
    if let Some(Size(n)) = log_max_size
        && n < 64_000
    {
        let at = s
            .get("log_max_size")
            .map_or(cx.header_span(s), |v| v.span());
        cx.error(
            Code::OutOfRange,
            at,
            format!("`log_max_size` of {n} bytes is below 64kB"),
            "an instance log is rotated past this size: give it room for a few thousand lines (the default is 10MB)",
        );
    }
    let autoscale = cx.tables(
        s,
        "autoscale",
        "autoscale rule",
        &["metric", "above", "below", "window", "change", "cooldown"],
        autoscale_rule,
    );
    if let Some(cmd) = &command
        && cmd.is_empty()
    {
        let span = s.get("command").map_or_else(|| s.span(), |v| v.span());
        cx.error(
            Code::OutOfRange,
            span,
            "`command` is empty",
            "give the program and its arguments, such as [\"tandem\", \"sample-app\"]",
        );
        return None;
    }
    if let (Some(cmd), Some(ports)) = (&command, &ports) {
        command_ports(cx, s, cmd, ports);
    }
    let mark = cx.bind_mark();
    if let (Some(bind), Some(ports)) = (bind, &ports) {
        for (port_name, range) in ports {
            cx.bind_range(
                format!("scale set `{}` (ports `{port_name}`)", written_name(s)),
                bind,
                (range.first, range.last),
                Proto::Both,
                Some(port_value_span(s, port_name)),
            );
        }
    }
    cx.binds_in_site(mark, site.as_ref().map(|n: &Name| n.as_str()));
    if let (Some(c), Some(ports)) = (capacity, &ports) {
        for (port_name, range) in ports {
            if range.len() < c.max {
                let span = port_value_span(s, port_name);
                cx.error(
                    Code::BadPortRange,
                    span,
                    format!(
                        "port range `{port_name}` = {range} holds {} ports but capacity.max is {}",
                        range.len(),
                        c.max
                    ),
                    "each instance needs its own port: widen the range or lower capacity.max",
                );
            }
        }
    }
    Some(ScaleSet {
        name: name?,
        site: site?,
        command: command?,
        bind: bind?,
        ports: ports?,
        capacity: capacity?,
        health: health?,
        repair: repair?,
        upgrade: upgrade?,
        scale_in: scale_in?,
        stop_grace: stop_grace?,
        log_max_size: log_max_size?.0,
        autoscale,
    })
}

fn port_value_span(s: Section<'_, '_>, port_name: &str) -> std::ops::Range<usize> {
    let ports = s.get("ports");
    let inner = ports.and_then(|p| match p.get_ref() {
        DeValue::Table(t) => t
            .iter()
            .find(|(k, _)| k.get_ref().as_ref() == port_name)
            .map(|(_, v)| v.span()),
        _ => None,
    });
    inner.unwrap_or_else(|| s.span())
}

/// `{port.NAME}` placeholders must name a port of the set.
fn command_ports(
    cx: &mut Cx,
    s: Section<'_, '_>,
    cmd: &[String],
    ports: &BTreeMap<String, PortRange>,
) {
    let span = s.get("command").map_or_else(|| s.span(), |v| v.span());
    let known: Vec<&str> = ports.keys().map(String::as_str).collect();
    for arg in cmd {
        let mut rest = arg.as_str();
        while let Some(start) = rest.find("{port.") {
            let after = &rest[start + 6..];
            let Some(end) = after.find('}') else { break };
            let port = &after[..end];
            if !ports.contains_key(port) {
                cx.error(
                    Code::UnknownReference,
                    span.clone(),
                    format!(
                        "`command` uses {{port.{port}}} but the scale set has no port `{port}`"
                    ),
                    if known.is_empty() {
                        format!("add `ports = {{ {port} = \"20000-20099\" }}`")
                    } else {
                        format!("defined ports: {}", known.join(", "))
                    },
                );
            }
            rest = &after[end..];
        }
    }
}

fn capacity(cx: &mut Cx, s: Section<'_, '_>) -> Option<Capacity> {
    let min = number_in(cx, s, "min", 1, 0, 10_000);
    let max = required_in(cx, s, "max", 1, 10_000);
    let initial = match s.get("initial") {
        Some(_) => number_in(cx, s, "initial", 0, 0, 10_000),
        None => min,
    };
    let (min, max, initial) = (min?, max?, initial?);
    if !(min <= initial && initial <= max) {
        cx.error(
            Code::CapacityOrder,
            s.span(),
            format!("capacity needs min <= initial <= max, found min {min}, initial {initial}, max {max}"),
            "order the numbers so that min <= initial <= max",
        );
        return None;
    }
    Some(Capacity { min, max, initial })
}

fn autoscale_rule(cx: &mut Cx, s: Section<'_, '_>) -> Option<AutoscaleRule> {
    let metric = cx.req(s, "metric");
    let above: Option<Option<f64>> = cx.opt(s, "above");
    let below: Option<Option<f64>> = cx.opt(s, "below");
    let window = cx.or(s, "window", Duration::from_secs(60));
    let cooldown = cx.or(s, "cooldown", Duration::from_secs(300));
    let change = match s.get("change") {
        Some(v) => change(cx, v),
        None => cx.req::<i32>(s, "change"),
    };
    let threshold = match (above?, below?) {
        (Some(a), None) => Threshold::Above(a),
        (None, Some(b)) => Threshold::Below(b),
        _ => {
            cx.error(
                Code::NotAllowedHere,
                cx.header_span(s),
                "an autoscale rule needs exactly one of `above` and `below`",
                "use `above = N` for a scale-out rule or `below = N` for a scale-in rule",
            );
            return None;
        }
    };
    let change = change?;
    let sign_ok = match threshold {
        Threshold::Above(_) => change > 0,
        Threshold::Below(_) => change < 0,
    };
    if !sign_ok {
        let span = s.get("change").map_or_else(|| s.span(), |v| v.span());
        cx.error(
            Code::OutOfRange,
            span,
            format!("`change` of {change:+} does not match the rule's direction"),
            "an `above` rule adds instances (\"+1\"), a `below` rule removes them (\"-1\")",
        );
        return None;
    }
    Some(AutoscaleRule {
        metric: metric?,
        threshold,
        window: window?,
        change,
        cooldown: cooldown?,
    })
}

/// `"+1"`, `"-2"` or an integer.
fn change(cx: &mut Cx, v: &Value<'_>) -> Option<i32> {
    if let DeValue::Integer(_) = v.get_ref() {
        return integer(cx, "change", v, -1000, 1000).map(|n| n as i32);
    }
    parsed(
        cx,
        "change",
        v,
        Code::OutOfRange,
        "change",
        "write a signed count of instances, such as \"+1\" or \"-1\"",
        |s| {
            s.trim_start_matches('+')
                .parse::<i32>()
                .ok()
                .filter(|n| *n != 0 && (-1000..=1000).contains(n))
        },
    )
}

const DATABASE_KEYS: &[&str] = &[
    "name",
    "engine",
    "replication",
    "max_lag_on_failover",
    "failover_timeout",
    "frontends",
    "member",
    "bin_dir",
    "rewind_failure",
    "backup",
];

const BACKUP_KEYS: &[&str] = &[
    "repository",
    "full",
    "differential",
    "archive_timeout",
    "retention_full",
    "drill",
    "drill_table",
];

impl FromToml for Every {
    const EXAMPLE: &'static str = "\"weekly\"";
    fn from_toml(cx: &mut Cx, key: &str, v: &Value<'_>) -> Option<Self> {
        parsed(
            cx,
            key,
            v,
            Code::BadDuration,
            "schedule",
            "write \"hourly\", \"daily\", \"weekly\", \"never\" or a duration of at least 1m such as \"12h\"",
            |s| match s {
                "never" => Some(Every(None)),
                "hourly" => Some(Every(Some(Duration::from_secs(3600)))),
                "daily" => Some(Every(Some(Duration::from_secs(86_400)))),
                "weekly" => Some(Every(Some(Duration::from_secs(7 * 86_400)))),
                other => units::parse_duration(other)
                    .filter(|d| *d >= Duration::from_secs(60))
                    .map(|d| Every(Some(d))),
            },
        )
    }
}

/// `[database.backup]`.
fn backup(cx: &mut Cx, s: Section<'_, '_>) -> Option<Backup> {
    let repository: Option<String> = cx.req(s, "repository");
    if let (Some(r), Some(v)) = (&repository, s.get("repository"))
        && r.trim().is_empty()
    {
        cx.error(
            Code::OutOfRange,
            v.span(),
            "`repository` is empty",
            "give the directory pgBackRest keeps backups and WAL in, such as \"/srv/tandem-backups/orders\"",
        );
        return None;
    }
    let full = cx.or(s, "full", Every(Some(Duration::from_secs(7 * 86_400))));
    let differential = cx.or(s, "differential", Every(None));
    let archive_timeout = duration_in(
        cx,
        s,
        "archive_timeout",
        Duration::from_secs(60),
        Duration::from_secs(1),
        MAX_INTERVAL,
    );
    let retention_full = number_in(cx, s, "retention_full", 2, 1, 100);
    let drill = cx.or(s, "drill", Every(None));
    let drill_table: Option<Option<String>> = cx.opt(s, "drill_table");
    let drill_table = match drill_table {
        Some(Some(t)) if !valid_table(&t) => {
            let span = s.get("drill_table").map(|v| v.span()).unwrap_or_default();
            cx.error(
                Code::BadName,
                span,
                format!("invalid table name {t:?} for `drill_table`"),
                "write \"schema.table\" or \"table\" with letters, digits and underscores",
            );
            None
        }
        other => other,
    };
    Some(Backup {
        repository: PathBuf::from(repository?),
        full: full?.0,
        differential: differential?.0,
        archive_timeout: archive_timeout?,
        retention_full: retention_full?,
        drill: drill?.0,
        drill_table: drill_table?,
    })
}

/// `table` or `schema.table`, each part an unquoted SQL identifier.
fn valid_table(s: &str) -> bool {
    let part = |p: &str| {
        p.chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && p.len() <= 63
            && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    };
    let parts: Vec<&str> = s.split('.').collect();
    parts.len() <= 2 && parts.iter().all(|p| part(p))
}

/// Patroni's REST API port: what HAProxy users already point `check port` at.
const DB_HEALTH_PORT: u16 = 8008;

fn database(cx: &mut Cx, s: Section<'_, '_>) -> Option<Database> {
    let name = name(cx, s);
    let engine = cx.or(s, "engine", Engine::Postgres);
    let replication = cx.or(s, "replication", Replication::Sync);
    let max_lag: Option<Size> = cx.or(s, "max_lag_on_failover", Size(1_000_000));
    let failover_timeout = duration_in(
        cx,
        s,
        "failover_timeout",
        Duration::from_secs(3),
        Duration::from_secs(1),
        MAX_INTERVAL,
    );
    let db = written_name(s);
    let frontends = match s.get("frontends") {
        Some(v) => db_frontends(cx, v, db),
        None => Some(Vec::new()),
    };
    let members = cx.tables(
        s,
        "member",
        "database member",
        &["site", "listen", "health"],
        |cx, m| {
            let site: Option<Name> = cx.req(m, "site");
            let listen: Option<SocketAddr> = cx.req(m, "listen");
            let health: Option<Option<SocketAddr>> = cx.opt(m, "health");
            let listen = listen?;
            let health = health?;
            let what = format!(
                "database `{db}` member `{}`",
                site.as_deref().unwrap_or("?")
            );
            let listen_span = m.get("listen").map(|v| v.span());
            let mark = cx.bind_mark();
            // PostgreSQL sets IPV6_V6ONLY: on `[::]` it takes IPv6 only.
            cx.bind(what.clone(), listen, Proto::Tcp, listen_span.clone());
            cx.v6only();
            let (health, health_what, health_span) = match health {
                Some(h) => (h, "", m.get("health").map(|v| v.span())),
                None => (
                    SocketAddr::new(listen.ip(), DB_HEALTH_PORT),
                    " (default port 8008)",
                    listen_span,
                ),
            };
            cx.bind(
                format!("the health endpoint of {what}{health_what}"),
                health,
                Proto::Tcp,
                health_span,
            );
            cx.binds_in_site(mark, site.as_deref());
            Some(Member {
                site: site?,
                listen,
                health,
            })
        },
    );
    let bin_dir: Option<Option<String>> = cx.opt(s, "bin_dir");
    let rewind_failure = cx.or(s, "rewind_failure", RewindFailure::Clone);
    let backup = match s.get("backup") {
        Some(v) => cx
            .section(v, "[database.backup]", BACKUP_KEYS)
            .map(|b| backup(cx, b)),
        None => Some(None),
    };
    if s.get("member").is_none() {
        cx.error(
            Code::MissingKey,
            cx.header_span(s),
            "database has no members",
            "add a [[database.member]] for each site that runs the database",
        );
    }
    if replication.is_some_and(Replication::is_sync) && members.len() == 1 {
        cx.error(
            Code::OutOfRange,
            cx.header_span(s),
            "synchronous replication needs at least two members",
            "add a standby [[database.member]] in another site, or use replication = \"async\"",
        );
    }
    let mut seen = HashSet::new();
    for m in &members {
        if !seen.insert(m.site.as_str()) {
            cx.error(
                Code::DuplicateName,
                m.site.span(),
                format!("database has two members in site `{}`", m.site),
                "run one member per site",
            );
        }
    }
    Some(Database {
        name: name?,
        engine: engine?,
        replication: replication?,
        max_lag_on_failover: max_lag?.0,
        failover_timeout: failover_timeout?,
        frontends: frontends?,
        members,
        bin_dir: bin_dir?.map(PathBuf::from),
        rewind_failure: rewind_failure?,
        backup: backup?,
    })
}

fn db_frontends(cx: &mut Cx, v: &Value<'_>, db: &str) -> Option<Vec<DbFrontend>> {
    let DeValue::Table(table) = v.get_ref() else {
        cx.wrong_type(v, "frontends", "a table of site = \"ip:port\"");
        return None;
    };
    let mut out = Vec::new();
    let mut ok = true;
    for (k, item) in table.iter() {
        match SocketAddr::from_toml(cx, k.get_ref(), item) {
            Some(address) => {
                let site = k.get_ref().as_ref();
                let mark = cx.bind_mark();
                cx.bind(
                    format!("load balancer `{db}@{site}` (database `{db}` frontend)"),
                    address,
                    Proto::Tcp,
                    Some(item.span()),
                );
                cx.binds_in_site(mark, Some(site));
                out.push(DbFrontend {
                    site: Name::new(site, k.span()),
                    address,
                });
            }
            None => ok = false,
        }
    }
    ok.then_some(out)
}

const APP_KEYS: &[&str] = &[
    "name",
    "sites",
    "profile",
    "database",
    "scale_sets",
    "standby",
    "failback",
    "follow",
];

fn app(cx: &mut Cx, s: Section<'_, '_>) -> Option<App> {
    let name = name(cx, s);
    let sites = cx.req(s, "sites");
    let profile = cx.req(s, "profile");
    let database = cx.opt(s, "database");
    let scale_sets = cx.or(s, "scale_sets", Vec::new());
    let standby = cx.or(s, "standby", Standby::Hot);
    let failback = cx.or(s, "failback", Failback::Automatic);
    let follow = cx.or(s, "follow", Follow::Data);
    Some(App {
        name: name?,
        sites: sites?,
        profile: profile?,
        database: database?,
        scale_sets: scale_sets?,
        standby: standby?,
        failback: failback?,
        follow: follow?,
    })
}

/// Reports each name used twice in one kind.
pub(crate) fn unique<'a>(cx: &mut Cx, names: impl Iterator<Item = &'a Name>, kind: &str) {
    let mut seen: Vec<&Name> = Vec::new();
    for n in names {
        if let Some(first) = seen.iter().find(|s| **s == n) {
            let line = cx.line_of(first.span().start);
            cx.error(
                Code::DuplicateName,
                n.span(),
                format!("{kind} `{n}` is defined twice"),
                format!("rename one of them; the first is on line {line}"),
            );
        } else {
            seen.push(n);
        }
    }
}
