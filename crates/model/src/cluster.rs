//! Cluster mode: `[cluster]` (how nodes coordinate) and `[[node]]` (which process runs which
//! site), and the placement checks that make sure every site's tiers have a node to run them.

use std::net::IpAddr;
use std::time::Duration;

use toml::de::DeValue;

use crate::binds::Proto;
use crate::diag::Code;
use crate::read::{Cx, FromToml, Section, Value, integer, parsed, string};
use crate::types::*;

pub(crate) const CLUSTER_KEYS: &[&str] = &[
    "name",
    "etcd",
    "lease_ttl",
    "health_quorum",
    "etcd_ca",
    "etcd_cert",
    "etcd_key",
];
pub(crate) const NODE_KEYS: &[&str] = &["name", "site", "api", "dns"];

/// etcd's shortest lease (its election timeout × 1.5 with default settings, rounded up).
const MIN_LEASE_TTL: Duration = Duration::from_secs(2);
const MAX_LEASE_TTL: Duration = Duration::from_secs(300);

impl FromToml for Quorum {
    const EXAMPLE: &'static str = "\"majority\"";
    fn from_toml(cx: &mut Cx, key: &str, v: &Value<'_>) -> Option<Self> {
        if let DeValue::Integer(_) = v.get_ref() {
            return integer(cx, key, v, 1, 1000).map(|n| Quorum::Count(n as u32));
        }
        let s = string(cx, key, v)?;
        if s == "majority" {
            return Some(Quorum::Majority);
        }
        cx.error(
            Code::BadChoice,
            v.span(),
            format!("`{key}` cannot be {s:?}"),
            "write \"majority\" (more than half of the live nodes) or a number of nodes, such as 2",
        );
        None
    }
}

/// An etcd client URL: `http://ip:port` or `https://host:port`; a bare `host:port` means http.
struct EtcdEndpoint(String);

impl FromToml for EtcdEndpoint {
    const EXAMPLE: &'static str = "\"http://192.0.2.10:2379\"";
    fn from_toml(cx: &mut Cx, key: &str, v: &Value<'_>) -> Option<Self> {
        parsed(
            cx,
            key,
            v,
            Code::BadAddress,
            "etcd endpoint",
            "write an etcd client URL, such as \"http://192.0.2.10:2379\"",
            |s| {
                let url = if s.contains("://") {
                    s.to_string()
                } else {
                    format!("http://{s}")
                };
                let rest = url
                    .strip_prefix("http://")
                    .or_else(|| url.strip_prefix("https://"))?;
                let (host, port) = rest.trim_end_matches('/').rsplit_once(':')?;
                let port_ok = port.parse::<u16>().is_ok_and(|p| p > 0);
                (port_ok && !host.is_empty() && !rest.trim_end_matches('/').contains('/'))
                    .then(|| EtcdEndpoint(url.trim_end_matches('/').to_string()))
            },
        )
    }
}

pub(crate) fn cluster(cx: &mut Cx, s: Section<'_, '_>) -> Option<Cluster> {
    let name: Option<Name> = cx.or(s, "name", Name::new("tandem", s.span()));
    let etcd: Option<Vec<EtcdEndpoint>> = cx.req(s, "etcd");
    let lease_ttl: Option<Duration> = cx.or(s, "lease_ttl", Duration::from_secs(5));
    let health_quorum = cx.or(s, "health_quorum", Quorum::Majority);
    if let Some(d) = lease_ttl
        && !(MIN_LEASE_TTL..=MAX_LEASE_TTL).contains(&d)
    {
        let span = s.get("lease_ttl").map_or_else(|| s.span(), |v| v.span());
        cx.error(
            Code::OutOfRange,
            span,
            format!(
                "`lease_ttl` of {} is out of range",
                crate::units::format_duration(d)
            ),
            "use a duration from 2s (etcd's shortest lease) to 5m",
        );
        return None;
    }
    if let Some(list) = &etcd
        && list.is_empty()
    {
        let span = s.get("etcd").map_or_else(|| s.span(), |v| v.span());
        cx.error(
            Code::MissingKey,
            span,
            "`etcd` lists no endpoints",
            "list the client URLs of the etcd members, such as [\"http://192.0.2.10:2379\"]",
        );
        return None;
    }
    if let Some(n) = &name
        && !crate::parse::valid_name(n)
    {
        cx.error(
            Code::BadName,
            n.span(),
            format!("invalid cluster name {:?}", n.as_str()),
            "use 1 to 63 letters, digits, '-', '_' or '.', starting with a letter or digit",
        );
        return None;
    }
    let etcd_tls = etcd_tls(cx, s, etcd.as_deref().unwrap_or_default());
    Some(Cluster {
        etcd_tls: etcd_tls?,
        span: s.span(),
        quorum_span: s
            .get("health_quorum")
            .map_or_else(|| s.span(), |v| v.span()),
        name: name?,
        etcd: etcd?.into_iter().map(|e| e.0).collect(),
        lease_ttl: lease_ttl?,
        health_quorum: health_quorum?,
    })
}

pub(crate) fn node(cx: &mut Cx, s: Section<'_, '_>) -> Option<Node> {
    let name = crate::parse::name(cx, s);
    let site: Option<Name> = cx.req(s, "site");
    // A node's API is another machine's address, not the single process's default.
    let api: Option<std::net::SocketAddr> = match s.get("api") {
        Some(_) => cx.req(s, "api"),
        None => {
            cx.missing(s, "api", "\"192.0.2.10:7400\"");
            None
        }
    };
    let dns: Option<Vec<std::net::SocketAddr>> = cx.or(s, "dns", Vec::new());
    let what = format!("node `{}`", name.as_deref().unwrap_or("?"));
    let mark = cx.bind_mark();
    if let Some(api) = api {
        let span = s.get("api").map(|v| v.span());
        cx.bind(format!("the API of {what}"), api, Proto::Tcp, span);
    }
    if let (Some(dns), Some(v)) = (&dns, s.get("dns")) {
        for (addr, span) in dns.iter().zip(crate::parse::item_spans(v)) {
            cx.bind(
                format!("a DNS listener of {what}"),
                *addr,
                Proto::Both,
                Some(span),
            );
            cx.v6only();
        }
    }
    cx.binds_in_site(mark, site.as_deref());
    Some(Node {
        name: name?,
        site: site?,
        api: api?,
        dns: dns?,
    })
}

/// `etcd_ca` exactly when the endpoints are `https://` (all or none of them), `etcd_cert` and
/// `etcd_key` together and only with TLS.
fn etcd_tls(cx: &mut Cx, s: Section<'_, '_>, endpoints: &[EtcdEndpoint]) -> Option<EtcdTls> {
    let ca: Option<String> = cx.opt(s, "etcd_ca")?;
    let cert: Option<String> = cx.opt(s, "etcd_cert")?;
    let key: Option<String> = cx.opt(s, "etcd_key")?;
    let span_of = |key: &str| s.get(key).map_or_else(|| s.span(), |v| v.span());
    let https = endpoints
        .iter()
        .filter(|e| e.0.starts_with("https://"))
        .count();
    if https > 0 && https < endpoints.len() {
        cx.error(
            Code::BadAddress,
            span_of("etcd"),
            "`etcd` mixes https:// and http:// endpoints",
            "use https:// for every member (with etcd_ca) or for none",
        );
        return None;
    }
    if https > 0 && ca.is_none() {
        cx.error(
            Code::MissingKey,
            span_of("etcd"),
            "https:// etcd endpoints need `etcd_ca`",
            "add etcd_ca: the CA certificate (PEM) that signs the etcd members' certificates (etcd's --trusted-ca-file)",
        );
        return None;
    }
    if https == 0 && !endpoints.is_empty() {
        for k in ["etcd_ca", "etcd_cert", "etcd_key"] {
            if s.get(k).is_some() {
                cx.error(
                    Code::NotAllowedHere,
                    span_of(k),
                    format!("`{k}` with http:// etcd endpoints"),
                    "write the endpoints as https://…:2379 to talk TLS to etcd, or remove the TLS keys",
                );
                return None;
            }
        }
    }
    if cert.is_some() != key.is_some() {
        let (has, lacks) = if cert.is_some() {
            ("etcd_cert", "etcd_key")
        } else {
            ("etcd_key", "etcd_cert")
        };
        cx.error(
            Code::MissingKey,
            span_of(has),
            format!("`{has}` without `{lacks}`"),
            "give both: this node's client certificate (etcd_cert) and its private key (etcd_key), as PEM files",
        );
        return None;
    }
    Some(EtcdTls {
        ca: ca.map(Into::into),
        cert: cert.map(Into::into),
        key: key.map(Into::into),
    })
}

/// Placement: nodes and `[cluster]` go together; every site with something to run has a
/// node; a witness runs no tier; nobody binds another site's node address; DNS listeners come
/// from the nodes.
pub(crate) fn placement(cx: &mut Cx, t: &Topology, cluster_declared: bool) {
    match (&t.cluster, t.nodes.first()) {
        (None, None) => return,
        // `[cluster]` is there but was reported wrong: nothing more to say about placement.
        (None, Some(_)) if cluster_declared => return,
        (Some(c), None) => {
            cx.error(
                Code::Placement,
                c.span.clone(),
                "[cluster] is set but no [[node]] is declared",
                "declare a [[node]] per machine (name, site, api), or remove [cluster] to run every site in one process",
            );
            return;
        }
        (None, Some(n)) => {
            cx.error(
                Code::Placement,
                n.name.span(),
                "[[node]] needs a [cluster] with the etcd endpoints",
                "add [cluster] with `etcd = [\"http://…:2379\", …]`, or remove the [[node]] sections",
            );
            return;
        }
        (Some(_), Some(_)) => {}
    }
    crate::parse::unique(cx, t.nodes.iter().map(|n| &n.name), "node");
    let nodes_in = |site: &str| t.nodes.iter().filter(|n| n.site.as_str() == site).count();
    let needs_node = |cx: &mut Cx, site: &Name, what: String| {
        let Some(s) = t.site(site) else { return };
        if s.role == SiteRole::Witness {
            cx.error(
                Code::Placement,
                site.span(),
                format!("{what} is in witness site `{site}`"),
                "a witness site only probes and votes: move it to an edge or region site",
            );
        } else if nodes_in(site) == 0 {
            cx.error(
                Code::Placement,
                site.span(),
                format!("{what} is in site `{site}`, which has no [[node]] to run it"),
                format!("add a [[node]] with `site = \"{site}\"`"),
            );
        }
    };
    for lb in &t.load_balancers {
        needs_node(cx, &lb.site, format!("load balancer `{}`", lb.name));
    }
    for set in &t.scale_sets {
        needs_node(cx, &set.site, format!("scale set `{}`", set.name));
    }
    for db in &t.databases {
        for m in &db.members {
            needs_node(cx, &m.site, format!("database `{}`'s member", db.name));
            if nodes_in(&m.site) > 1 {
                cx.error(
                    Code::Placement,
                    m.site.span(),
                    format!(
                        "database `{}` has a member in site `{}`, which has {} nodes: a member runs on its site's one node",
                        db.name,
                        m.site,
                        nodes_in(&m.site)
                    ),
                    "keep one [[node]] in a site with a database member, or move the member",
                );
            }
        }
        for f in &db.frontends {
            needs_node(cx, &f.site, format!("database `{}`'s frontend", db.name));
        }
        if let Some(b) = &db.backup
            && !b.repository.is_absolute()
        {
            cx.error(
                Code::Placement,
                db.name.span(),
                format!(
                    "database `{}` backs up into {}, a relative path, in cluster mode",
                    db.name,
                    b.repository.display()
                ),
                "give `repository` as an absolute path that every member's node mounts (NFS, or a directory the region's node exports): whichever member is primary archives and backs up into it",
            );
        }
    }
    for app in &t.apps {
        // The leader drives an app from one report per site (`apps/APP/sites/SITE`).
        for site in &app.sites {
            if nodes_in(site) > 1 {
                cx.error(
                    Code::Placement,
                    site.span(),
                    format!(
                        "app `{}` runs in site `{site}`, which has {} nodes: an app's site has one node, whose report is the site's",
                        app.name,
                        nodes_in(site)
                    ),
                    "keep one [[node]] in each of the app's sites",
                );
            }
        }
        if app.standby == Standby::Cold {
            cx.error(
                Code::Placement,
                app.name.span(),
                format!(
                    "app `{}` has `standby = \"cold\"`, which runs in the single-process mode only for now",
                    app.name
                ),
                "use `standby = \"warm\"` (its sets may have `min = 0`) in cluster mode: restoring a member on another node is not built yet",
            );
        }
    }
    if let Some(dns) = &t.dns
        && let Some(span) = &dns.listen_span
    {
        cx.error(
            Code::Placement,
            span.clone(),
            "`[dns] listen` does not apply in cluster mode",
            "give each node that serves DNS its listeners: `dns = [\"ip:53\"]` in its [[node]]",
        );
    }
    if let Some(c) = &t.cluster
        && let Quorum::Count(n) = c.health_quorum
        && n as usize > t.nodes.len()
    {
        cx.error(
            Code::OutOfRange,
            c.quorum_span.clone(),
            format!(
                "health_quorum {n} is more than the {} nodes declared",
                t.nodes.len()
            ),
            "use \"majority\" or at most the number of nodes",
        );
    }
    shared_node_addresses(cx, t);
    foreign_addresses(cx, t);
}

/// Nodes of two sites are two machines: a node's API address (by which the other nodes pass
/// requests on to it) is its machine's own, so no other site's node may have it, as its API or
/// DNS listener. DNS listeners may share an address (anycast). Loopback addresses are left
/// alone (nodes tried on one machine).
fn shared_node_addresses(cx: &mut Cx, t: &Topology) {
    let specific = |ip: &IpAddr| !ip.is_unspecified() && !ip.is_loopback();
    let all = |n: &Node| -> Vec<(IpAddr, String)> {
        std::iter::once((n.api.ip(), format!("its API {}", n.api)))
            .chain(
                n.dns
                    .iter()
                    .map(|d| (d.ip(), format!("its DNS listener {d}"))),
            )
            .filter(|(ip, _)| specific(ip))
            .collect()
    };
    for (i, n) in t.nodes.iter().enumerate() {
        let ours = all(n);
        let clash = t.nodes[..i]
            .iter()
            .filter(|o| o.site.as_str() != n.site.as_str())
            .find_map(|o| {
                let theirs = all(o);
                // Any of ours on their API, or our API on any of theirs.
                ours.iter()
                    .find(|(ip, _)| {
                        *ip == o.api.ip()
                            || (*ip == n.api.ip() && theirs.iter().any(|(x, _)| x == ip))
                    })
                    .map(|(ip, what)| (o, *ip, what.clone()))
            });
        if let Some((o, ip, what)) = clash {
            cx.error(
                Code::Placement,
                n.name.span(),
                format!(
                    "node `{}` in site `{}` has {what}, but {ip} is an address of node `{}` in site `{}`",
                    n.name, n.site, o.name, o.site
                ),
                "two machines cannot share an address: give each node its own machine's addresses (only DNS listeners may share one, anycast)",
            );
        }
    }
}

/// An address of a node's API or DNS belongs to that node's site: a tier of another site that
/// binds it would run on the wrong machine.
fn foreign_addresses(cx: &mut Cx, t: &Topology) {
    let owner = |ip: IpAddr| -> Option<&Node> {
        t.nodes.iter().find(|n| {
            n.api.ip() == ip && !ip.is_unspecified()
                || n.dns.iter().any(|d| d.ip() == ip && !ip.is_unspecified())
        })
    };
    let check = |cx: &mut Cx, site: &Name, addr: IpAddr, what: String| {
        if let Some(n) = owner(addr)
            && n.site.as_str() != site.as_str()
        {
            cx.error(
                Code::Placement,
                site.span(),
                format!(
                    "{what} in site `{site}` binds {addr}, an address of node `{}` in site `{}`",
                    n.name, n.site
                ),
                "each site's tiers bind addresses of that site's machine",
            );
        }
    };
    for lb in &t.load_balancers {
        check(
            cx,
            &lb.site,
            lb.frontend.ip(),
            format!("load balancer `{}`", lb.name),
        );
    }
    for set in &t.scale_sets {
        check(cx, &set.site, set.bind, format!("scale set `{}`", set.name));
    }
}

/// The node a `--node NAME` names.
pub fn find_node<'t>(t: &'t Topology, name: &str) -> Result<&'t Node, String> {
    t.nodes.iter().find(|n| n.name.as_str() == name).ok_or_else(|| {
        let known: Vec<&str> = t.nodes.iter().map(|n| n.name.as_str()).collect();
        if known.is_empty() {
            format!("the topology declares no [[node]], so there is no node {name:?}: run `tandem up FILE` without --node")
        } else {
            format!(
                "no node {name:?} in the topology; {}",
                crate::read::suggest(name, &known)
            )
        }
    })
}
