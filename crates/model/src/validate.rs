//! Checks across sections: unique names, references that resolve, nested profiles without
//! cycles, what each DNS name holds (no CNAME beside other data), every address bound once;
//! and, for a valid file, the warnings.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};

use crate::diag::Code;
use crate::parse::unique;
use toml::de::DeValue;

use crate::read::{Cx, Value, suggest};
use crate::types::*;

/// Deepest nesting of profiles allowed (a profile answering through ten others).
pub const MAX_PROFILE_DEPTH: usize = 10;

pub(crate) fn topology(cx: &mut Cx, t: &Topology, names: &Names) {
    unique(cx, t.sites.iter().map(|s| &s.name), "site");
    unique(cx, t.monitors.iter().map(|m| &m.name), "monitor");
    unique(cx, t.profiles.iter().map(|p| &p.name), "profile");
    unique(
        cx,
        t.load_balancers.iter().map(|l| &l.name),
        "load balancer",
    );
    unique(cx, t.scale_sets.iter().map(|s| &s.name), "scale set");
    unique(cx, t.databases.iter().map(|d| &d.name), "database");
    unique(cx, t.apps.iter().map(|a| &a.name), "app");
    if let Some(dns) = &t.dns {
        unique(cx, dns.zones.iter().map(|z| &z.name), "zone");
    }
    profiles(cx, t, names);
    owners(cx, t);
    for n in &t.nodes {
        names.check(cx, "site", &n.site);
    }
    crate::cluster::placement(cx, t, names.cluster_declared);
    crate::binds::check(cx, !t.nodes.is_empty());
    for lb in &t.load_balancers {
        names.check(cx, "site", &lb.site);
        if let Some(probe) = &lb.probe {
            names.check(cx, "monitor", probe);
        }
        match &lb.pool {
            Pool::Addresses(_) => {}
            Pool::ScaleSet { scale_set, port } => {
                if names.check(cx, "scale set", scale_set)
                    && let Some(set) = t.scale_set(scale_set)
                    && !set.ports.contains_key(port)
                {
                    let known: Vec<&str> = set.ports.keys().map(String::as_str).collect();
                    cx.error(
                        Code::UnknownReference,
                        scale_set.span(),
                        format!("scale set `{scale_set}` has no port `{port}`"),
                        suggest(port, &known),
                    );
                }
            }
            Pool::Database { database, .. } => {
                names.check(cx, "database", database);
            }
        }
    }
    for set in &t.scale_sets {
        names.check(cx, "site", &set.site);
        if let Some(h) = &set.health {
            names.check(cx, "monitor", h);
        }
    }
    for db in &t.databases {
        for m in &db.members {
            names.check(cx, "site", &m.site);
        }
        for f in &db.frontends {
            names.check(cx, "site", &f.site);
        }
    }
    let mut profile_owner: HashMap<&str, &Name> = HashMap::new();
    for app in &t.apps {
        for s in &app.sites {
            names.check(cx, "site", s);
        }
        if names.check(cx, "profile", &app.profile)
            && let Some(first) = profile_owner.insert(app.profile.as_str(), &app.name)
        {
            cx.error(
                Code::NotAllowedHere,
                app.profile.span(),
                format!("profile `{}` already belongs to app `{first}`", app.profile),
                "each app answers its own profile (the app decides which site it answers)",
            );
        }
        if let Some(db) = &app.database {
            names.check(cx, "database", db);
        }
        for s in &app.scale_sets {
            names.check(cx, "scale set", s);
        }
        app_sites(cx, t, app);
    }
}

/// An app moves between its sites: at least two, each once, each with an endpoint of its
/// profile and a member of its database; its scale sets run in its sites.
fn app_sites(cx: &mut Cx, t: &Topology, app: &App) {
    if app.sites.len() < 2 {
        cx.error(
            Code::OutOfRange,
            app.name.span(),
            format!("app `{}` lists {} site(s)", app.name, app.sites.len()),
            "an app moves between sites: list at least two, the preferred first (sites = [\"edge\", \"region\"])",
        );
    }
    let mut seen = HashSet::new();
    for site in &app.sites {
        if !seen.insert(site.as_str()) {
            cx.error(
                Code::DuplicateName,
                site.span(),
                format!("site `{site}` is listed twice"),
                "list each site once, in order of preference",
            );
            continue;
        }
        if t.site(site).is_none() {
            continue;
        }
        if let Some(p) = t.profile(&app.profile)
            && !p
                .endpoints
                .iter()
                .any(|e| t.endpoint_site(e) == Some(site.as_str()))
        {
            cx.error(
                Code::UnknownReference,
                site.span(),
                format!("profile `{}` has no endpoint in site `{site}`", app.profile),
                "the app answers its active site's endpoints: give the profile one there (a load balancer of that site, or `site = …`)",
            );
        }
        if let Some(db) = app.database.as_ref().and_then(|d| t.database(d))
            && !db.members.iter().any(|m| m.site == *site)
        {
            cx.error(
                Code::UnknownReference,
                site.span(),
                format!("database `{}` has no member in site `{site}`", db.name),
                "the app's database moves with it: give it a [[database.member]] in every site of the app",
            );
        }
    }
    if app.standby == Standby::Cold {
        app_cold(cx, t, app);
    }
    for name in &app.scale_sets {
        if let Some(set) = t.scale_set(name)
            && !app.sites.contains(&set.site)
        {
            cx.error(
                Code::NotAllowedHere,
                name.span(),
                format!(
                    "scale set `{name}` runs in site `{}`, not one of the app's sites",
                    set.site
                ),
                "list the scale sets of the app's sites only",
            );
        }
    }
}

/// `standby = "cold"`: the standby sites run nothing until a failover restores the database
/// from its backups and scales their sets up from 0. So the app needs a database with
/// `[database.backup]`, and its sets outside the preferred site `min = 0`.
fn app_cold(cx: &mut Cx, t: &Topology, app: &App) {
    match app.database.as_ref().map(|d| (d, t.database(d))) {
        None => cx.error(
            Code::NotAllowedHere,
            app.name.span(),
            format!("app `{}` has `standby = \"cold\"` but no database", app.name),
            "a cold standby is restored from its database's backups: name the app's `database` (or use `standby = \"warm\"` with sets of `min = 0`)",
        ),
        Some((name, Some(db))) if db.replication == Replication::SyncStrict => cx.error(
            Code::NotAllowedHere,
            name.span(),
            format!(
                "database `{name}` has replication = \"sync-strict\", and app `{}` has `standby = \"cold\"`",
                app.name
            ),
            "with its standby cold no member could acknowledge a commit: use replication = \"sync\" or \"async\"",
        ),
        Some((name, Some(db))) if db.backup.is_none() => cx.error(
            Code::NotAllowedHere,
            name.span(),
            format!(
                "database `{name}` has no valid [database.backup], and app `{}` has `standby = \"cold\"`",
                app.name
            ),
            "a cold standby is restored from the backups: add [database.backup] (its `archive_timeout` bounds the RPO)",
        ),
        _ => {}
    }
    let preferred = app.sites.first();
    for name in &app.scale_sets {
        if let Some(set) = t.scale_set(name)
            && Some(&set.site) != preferred
            && set.capacity.min > 0
        {
            cx.error(
                Code::OutOfRange,
                name.span(),
                format!(
                    "scale set `{name}` keeps {} instance(s) running in `{}`, a cold standby site",
                    set.capacity.min, set.site
                ),
                "a cold standby runs no instances: give it `min = 0` (the app scales it up when it fails over)",
            );
        }
    }
}

/// The names declared of each kind, read from the file itself: an item whose other fields
/// had problems still has its name, so references to it are not reported a second time.
pub(crate) struct Names {
    by_kind: HashMap<&'static str, Vec<String>>,
    /// The file has a `[cluster]` table (even one reported wrong).
    pub(crate) cluster_declared: bool,
}

impl Names {
    pub(crate) fn declared(root: &Value<'_>) -> Self {
        let kinds = [
            ("site", "site"),
            ("monitor", "monitor"),
            ("profile", "profile"),
            ("load_balancer", "load balancer"),
            ("scale_set", "scale set"),
            ("database", "database"),
        ];
        let by_kind = kinds
            .into_iter()
            .map(|(key, kind)| {
                let items = root.get_ref().get(key).map(|v| v.get_ref());
                let names = match items {
                    Some(DeValue::Array(items)) => items
                        .iter()
                        .filter_map(|i| i.get_ref().get("name")?.get_ref().as_str())
                        .map(str::to_string)
                        .collect(),
                    _ => Vec::new(),
                };
                (kind, names)
            })
            .collect();
        let cluster_declared = root.get_ref().get("cluster").is_some();
        Names {
            by_kind,
            cluster_declared,
        }
    }

    /// Reports a reference to an undefined name; true when it resolves.
    fn check(&self, cx: &mut Cx, kind: &'static str, r: &Name) -> bool {
        let known: Vec<&str> = self
            .by_kind
            .get(kind)
            .map(|v| v.iter().map(String::as_str).collect())
            .unwrap_or_default();
        if known.contains(&r.as_str()) {
            return true;
        }
        let help = if known.is_empty() {
            format!("no {kind} is defined; add one or remove this reference")
        } else {
            suggest(r, &known)
        };
        cx.error(
            Code::UnknownReference,
            r.span(),
            format!("unknown {kind} `{r}`"),
            help,
        );
        false
    }
}

fn profiles(cx: &mut Cx, t: &Topology, names: &Names) {
    let zones: Vec<&str> = t
        .dns
        .iter()
        .flat_map(|d| d.zones.iter().map(|z| z.name.as_str()))
        .collect();
    for p in &t.profiles {
        if let Some(m) = &p.monitor {
            names.check(cx, "monitor", m);
        }
        let in_zone = zones
            .iter()
            .any(|z| p.domain.as_str() == *z || p.domain.ends_with(&format!(".{z}")));
        if !in_zone {
            cx.error(
                Code::BadDomain,
                p.domain.span(),
                format!("domain `{}` is in no zone served by [dns]", p.domain),
                if zones.is_empty() {
                    "add a [[dns.zone]] that contains it".to_string()
                } else {
                    format!("served zones: {}", zones.join(", "))
                },
            );
        }
        if p.routing == Routing::Geographic {
            geo_areas(cx, t, p);
        }
        if p.routing == Routing::Performance {
            for e in &p.endpoints {
                if endpoint_location(t, e).is_none() {
                    cx.error(
                        Code::MissingKey,
                        e.name.span(),
                        format!("endpoint `{}` of a performance profile has no location", e.name),
                        "set `site = \"…\"` to a site with a `location`, or target a load balancer in one",
                    );
                }
            }
        }
        for e in &p.endpoints {
            match &e.target {
                Target::LoadBalancer(lb) => {
                    names.check(cx, "load balancer", lb);
                }
                Target::Profile(child) => {
                    names.check(cx, "profile", child);
                }
                Target::Address(_) | Target::Cname(_) => {}
            }
            if let Some(site) = &e.site {
                names.check(cx, "site", site);
            }
        }
    }
    nesting(cx, t);
}

/// What each DNS name holds: one profile per domain; no CNAME at a zone apex, which always
/// holds the SOA and NS records, since a name with a CNAME holds nothing else (RFC 1034
/// §3.6.2, RFC 2181 §10.1); a name server's addresses not at a profile's domain.
fn owners(cx: &mut Cx, t: &Topology) {
    let zones: Vec<&Zone> = t.dns.iter().flat_map(|d| &d.zones).collect();
    for (i, p) in t.profiles.iter().enumerate() {
        if let Some(first) = t.profiles[..i].iter().find(|f| f.domain == p.domain) {
            let line = cx.line_of(first.domain.span().start);
            cx.error(
                Code::DuplicateName,
                p.domain.span(),
                format!(
                    "domain `{}` of profile `{}` is already answered by profile `{}`",
                    p.domain, p.name, first.name
                ),
                format!(
                    "a name is answered by one profile (the first is on line {line}): give this one its own domain, or nest one profile in the other"
                ),
            );
        }
        if let Some(zone) = zones.iter().find(|z| z.name == p.domain) {
            for e in &p.endpoints {
                let Some(how) = cname_through(t, &e.target, &mut Vec::new()) else {
                    continue;
                };
                cx.error(
                    Code::CnameConflict,
                    e.name.span(),
                    format!(
                        "endpoint `{}` {how}, but profile `{}` answers the apex of zone `{}`",
                        e.name, p.name, zone.name
                    ),
                    "the apex always holds the zone's SOA and NS records, and a name with a CNAME holds nothing else (RFC 1034 §3.6.2, RFC 2181 §10.1): target an address or a load balancer here, or give the profile a name below the apex",
                );
            }
        }
        for ns in zones.iter().flat_map(|z| &z.nameservers) {
            if ns.name == p.domain && !ns.addresses.is_empty() {
                cx.error(
                    Code::DuplicateName,
                    p.domain.span(),
                    format!(
                        "domain `{}` of profile `{}` is also a name server with addresses",
                        p.domain, p.name
                    ),
                    "a name is answered once: give the name server its addresses or the profile this name, not both",
                );
            }
        }
    }
}

/// How an endpoint target can answer a CNAME ("is a CNAME to `h`", "nests profile `x`, whose
/// endpoint `y` is a CNAME to `h`"), or `None` when it cannot. `seen` guards against cycles
/// (reported elsewhere).
fn cname_through<'a>(
    t: &'a Topology,
    target: &'a Target,
    seen: &mut Vec<&'a str>,
) -> Option<String> {
    match target {
        Target::Cname(host) => Some(format!("is a CNAME to `{host}`")),
        Target::Profile(child) => {
            if seen.contains(&child.as_str()) {
                return None;
            }
            seen.push(child.as_str());
            let p = t.profile(child)?;
            p.endpoints.iter().find_map(|e| {
                let how = cname_through(t, &e.target, seen)?;
                Some(format!(
                    "nests profile `{child}`, whose endpoint `{}` {how}",
                    e.name
                ))
            })
        }
        Target::Address(_) | Target::LoadBalancer(_) => None,
    }
}

/// Warnings about a valid topology: it runs nothing; a name server inside a served zone has no
/// address (resolvers that follow the delegation find no server); addresses given for a name
/// server outside every served zone are not answered; a DNS node that is none of a zone's name
/// servers (cluster mode: one name server per DNS node, with its address as glue).
pub(crate) fn warnings(cx: &mut Cx, t: &Topology) {
    let zones: Vec<&Zone> = t.dns.iter().flat_map(|d| &d.zones).collect();
    if zones.is_empty()
        && t.load_balancers.is_empty()
        && t.scale_sets.is_empty()
        && t.databases.is_empty()
    {
        cx.warn(
            Code::NothingToRun,
            0..0,
            "the topology serves and runs nothing",
            "add a [dns] zone with profiles, a [[load_balancer]], a [[scale_set]] or a [[database]]; examples/quickstart.toml shows them all",
        );
    }
    let inside = |name: &str| {
        zones
            .iter()
            .any(|z| name == z.name.as_str() || name.ends_with(&format!(".{}", z.name)))
    };
    let has_address = |name: &str| {
        zones
            .iter()
            .flat_map(|z| &z.nameservers)
            .any(|ns| ns.name.as_str() == name && !ns.addresses.is_empty())
            || t.profiles.iter().any(|p| p.domain.as_str() == name)
    };
    for z in &zones {
        for ns in &z.nameservers {
            if !inside(&ns.name) {
                if !ns.addresses.is_empty() {
                    cx.warn(
                        Code::NameServerAddressNotServed,
                        ns.name.span(),
                        format!(
                            "name server `{}` is outside every served zone: its addresses are not answered",
                            ns.name
                        ),
                        "its own zone's servers answer for it; remove `address` here, or serve its zone",
                    );
                }
                continue;
            }
            if !has_address(&ns.name) {
                cx.warn(
                    Code::NameServerWithoutAddress,
                    ns.name.span(),
                    format!(
                        "name server `{}` is inside a served zone but has no address",
                        ns.name
                    ),
                    format!(
                        "resolvers look its address up in this zone and find nothing: write {{ name = \"{}\", address = \"…\" }} with the address it answers on",
                        ns.name
                    ),
                );
            }
        }
    }
    for node in &t.nodes {
        // A wildcard listener says nothing of the address resolvers reach it at.
        let ips: Vec<IpAddr> = node
            .dns
            .iter()
            .map(SocketAddr::ip)
            .filter(|ip| !ip.is_unspecified())
            .collect();
        let Some(first) = ips.first() else { continue };
        for z in &zones {
            let listed = z
                .nameservers
                .iter()
                .flat_map(|ns| &ns.addresses)
                .any(|a| ips.contains(a));
            if !listed {
                cx.warn(
                    Code::DnsNodeNotNameServer,
                    node.name.span(),
                    format!(
                        "DNS node `{}` ({first}) is none of zone `{}`'s name servers: resolvers following the delegation never ask it",
                        node.name, z.name
                    ),
                    format!(
                        "list one name server per DNS node: add {{ name = \"nsN.{}\", address = \"{first}\" }} to the zone's `nameservers`",
                        z.name
                    ),
                );
            }
        }
    }
}

/// Nested profiles must form no cycle and be at most `MAX_PROFILE_DEPTH` deep.
fn nesting(cx: &mut Cx, t: &Topology) {
    fn children(p: &Profile) -> Vec<&Name> {
        p.endpoints
            .iter()
            .filter_map(|e| match &e.target {
                Target::Profile(c) => Some(c),
                _ => None,
            })
            .collect()
    }
    let nested: Vec<&str> = t
        .profiles
        .iter()
        .flat_map(children)
        .map(|n| n.as_str())
        .collect();
    let order = |name: &str| t.profiles.iter().position(|p| p.name.as_str() == name);
    for root in &t.profiles {
        // Depth-first walk from each profile; `path` is the chain of names from the root.
        let mut stack: Vec<(Vec<&str>, &Name)> = children(root)
            .into_iter()
            .map(|c| (vec![root.name.as_str()], c))
            .collect();
        while let Some((path, child)) = stack.pop() {
            if child.as_str() == root.name.as_str() {
                // Report each cycle once, at its member that comes first in the file.
                let first = path.iter().filter_map(|n| order(n)).min();
                if first != order(&root.name) {
                    break;
                }
                let chain = path.join(" -> ");
                cx.error(
                    Code::ProfileCycle,
                    root.name.span(),
                    format!("nested profiles form a cycle: {chain} -> {child}"),
                    "a profile cannot answer through itself; point one endpoint elsewhere",
                );
                break;
            }
            if path.contains(&child.as_str()) {
                continue; // a cycle not through root: reported from its own members
            }
            if path.len() >= MAX_PROFILE_DEPTH {
                if nested.contains(&root.name.as_str()) {
                    break; // reported at the top of the chain
                }
                cx.error(
                    Code::ProfileDepth,
                    root.name.span(),
                    format!(
                        "profile `{}` nests more than {MAX_PROFILE_DEPTH} profiles deep",
                        root.name
                    ),
                    "flatten the nesting: point an endpoint at a load balancer or an address",
                );
                break;
            }
            if let Some(p) = t.profile(child) {
                let mut next = path.clone();
                next.push(child.as_str());
                stack.extend(children(p).into_iter().map(|c| (next.clone(), c)));
            }
        }
    }
}

/// Where an endpoint runs: its own site, or its load balancer's.
pub fn endpoint_location(t: &Topology, e: &Endpoint) -> Option<Location> {
    let site = match (&e.site, &e.target) {
        (Some(site), _) => Some(site),
        (None, Target::LoadBalancer(lb)) => t.load_balancer(lb).map(|lb| &lb.site),
        _ => None,
    };
    t.site(site?)?.location
}

/// Area names of a `geo` map: defined areas, `"*"`, or with a database its codes.
fn geo_areas(cx: &mut Cx, t: &Topology, p: &Profile) {
    if t.geo.database.is_some() {
        return; // country and continent codes come from the database
    }
    let known: Vec<&str> = t.geo.areas.iter().map(|a| a.name.as_str()).collect();
    for (area, _) in &p.geo {
        if area.as_str() != "*" && !known.contains(&area.as_str()) {
            cx.error(
                Code::UnknownReference,
                area.span(),
                format!("unknown geo area `{area}`"),
                if known.is_empty() {
                    "define it with [[geo.area]], or use \"*\" for every client".to_string()
                } else {
                    format!(
                        "{} (or \"*\" for every other client)",
                        suggest(area, &known)
                    )
                },
            );
        }
    }
}
