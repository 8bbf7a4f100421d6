//! Answer tables: everything a query needs, computed when health or configuration changes
//! (never per query), and published whole. A query does one hash lookup and, for the methods
//! that depend on the client or on chance, one cheap pick.
//!
//! Which endpoints are answered: `Online` and `CheckingEndpoint` (no result yet: innocent until
//! proven otherwise, as Azure Traffic Manager does); never `Degraded`, `Disabled` or `Stopped`.
//! When none is available the profile's `all_down` decides: `serve-all` answers as if every
//! enabled endpoint were available (Azure's and Route 53's behaviour), `nodata` answers with no
//! records, `servfail` with SERVFAIL.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use health::Status;
use model::units::Cidr;
use model::{AllDown, Location, Profile, Routing, Target, Topology};
use serde::{Deserialize, Serialize};

use crate::wire::{self, rtype};

/// What the tables need to know of health.
pub trait HealthView {
    /// Status of a probe target; `None` when it is not probed.
    fn status(&self, target: &str) -> Option<Status>;
    /// Latency of the target's last probe.
    fn latency(&self, target: &str) -> Option<Duration>;
}

/// One record of an answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rr {
    pub rtype: u16,
    pub rdata: Box<[u8]>,
}

impl Rr {
    fn address(ip: IpAddr) -> Rr {
        match ip {
            IpAddr::V4(a) => Rr {
                rtype: rtype::A,
                rdata: Box::new(a.octets()),
            },
            IpAddr::V6(a) => Rr {
                rtype: rtype::AAAA,
                rdata: Box::new(a.octets()),
            },
        }
    }

    /// The record's data as text: an address, or a host name.
    pub fn text(&self) -> String {
        match self.rtype {
            rtype::A if self.rdata.len() == 4 => {
                let o: [u8; 4] = [self.rdata[0], self.rdata[1], self.rdata[2], self.rdata[3]];
                std::net::Ipv4Addr::from(o).to_string()
            }
            rtype::AAAA if self.rdata.len() == 16 => {
                let mut o = [0u8; 16];
                o.copy_from_slice(&self.rdata);
                std::net::Ipv6Addr::from(o).to_string()
            }
            _ => wire::name_to_string(&self.rdata),
        }
    }

    pub fn type_name(&self) -> &'static str {
        match self.rtype {
            rtype::A => "A",
            rtype::AAAA => "AAAA",
            rtype::CNAME => "CNAME",
            _ => "?",
        }
    }
}

/// What one endpoint answers.
#[derive(Clone, Debug)]
enum Choice {
    Records(Vec<Rr>),
    /// A nested profile, answered through at query time.
    Profile(usize),
}

/// How a profile picks, with unavailable endpoints already left out.
#[derive(Clone, Debug)]
enum Pick {
    One(Choice),
    Weighted {
        total: u64,
        /// Cumulative weight and choice.
        items: Vec<(u64, Choice)>,
    },
    /// Multivalue: every record, at most `max` of each type per answer.
    All {
        max: usize,
        records: Vec<Rr>,
    },
    Subnet {
        /// Longest prefix first.
        rules: Vec<(Cidr, Choice)>,
        fallback: Option<Choice>,
    },
    Geo {
        /// Area name (or `*`) to the first available endpoint of its list.
        areas: HashMap<String, Choice>,
    },
    Performance {
        /// Available endpoints with their locations.
        candidates: Vec<(Location, Choice)>,
        /// For clients of unknown location: the lowest measured probe latency.
        by_latency: Box<Choice>,
    },
    Nodata,
    Servfail,
}

/// Why a query got no records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Empty {
    /// The name exists, with no record of that type (or `all_down = "nodata"`).
    Nodata,
    /// `all_down = "servfail"`, or nesting that could not be answered.
    Servfail,
}

/// The state of one endpoint, for the API.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EndpointView {
    pub name: String,
    pub target: String,
    pub status: Status,
    pub priority: Option<u32>,
    pub weight: u32,
    /// Whether the current answer may include it.
    pub answered: bool,
}

/// The state of one profile, for the API.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ProfileView {
    pub name: String,
    pub domain: String,
    pub routing: String,
    pub ttl_seconds: u32,
    pub all_down: bool,
    pub endpoints: Vec<EndpointView>,
    /// What a client without location would be answered now, as `TYPE value`.
    pub answer: Vec<String>,
}

#[derive(Clone, Debug)]
struct ProfileTable {
    ttl: u32,
    pick: Pick,
    /// Depends on the client (subnet, geographic, performance): ECS scope is its prefix.
    uses_client: bool,
}

#[derive(Clone, Debug)]
struct ZoneTable {
    apex: Box<[u8]>,
    labels: usize,
    soa: Box<[u8]>,
    ns: Vec<NsRecord>,
    ttl: u32,
    negative_ttl: u32,
    /// Names that exist in the zone, including empty non-terminals.
    existing: HashSet<Box<[u8]>>,
}

/// One NS record of a zone: the name server's wire name, and its addresses as glue for the
/// additional section (empty when it has none, or is outside every served zone).
#[derive(Clone, Debug)]
pub struct NsRecord {
    pub name: Box<[u8]>,
    pub glue: Box<[Rr]>,
}

/// A MaxMind-format database, opened once and shared by every rebuild.
pub type GeoDatabase = Arc<maxminddb::Reader<Vec<u8>>>;

/// Opens the `[geo] database`, if any.
pub fn open_geo_database(t: &Topology) -> Result<Option<GeoDatabase>, String> {
    match &t.geo.database {
        None => Ok(None),
        Some(path) => maxminddb::Reader::open_readfile(path)
            .map(|r| Some(Arc::new(r)))
            .map_err(|e| format!("cannot read geo database {}: {e}", path.display())),
    }
}

/// What a MaxMind Country or City database says of an address.
#[derive(Debug, Default, Deserialize)]
struct MmdbRecord {
    #[serde(default)]
    country: Option<MmdbCode>,
    #[serde(default)]
    continent: Option<MmdbCode>,
    #[serde(default)]
    location: Option<MmdbLocation>,
}

#[derive(Debug, Default, Deserialize)]
struct MmdbCode {
    #[serde(default)]
    iso_code: Option<String>,
    #[serde(default)]
    code: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct MmdbLocation {
    latitude: Option<f64>,
    longitude: Option<f64>,
}

/// Where a client is.
#[derive(Debug, Default)]
struct Place<'a> {
    /// Names to try in a `geo` map, most specific first: the topology's area, then the
    /// database's country and continent codes. A fixed array: no allocation per query.
    names: [Option<std::borrow::Cow<'a, str>>; 3],
    location: Option<Location>,
}

impl<'a> Place<'a> {
    fn names(&self) -> impl Iterator<Item = &str> {
        self.names.iter().flatten().map(|n| n.as_ref())
    }
}

/// Where clients are: the topology's `[[geo.area]]` prefixes first (operator overrides), then
/// the MaxMind database.
#[derive(Clone, Debug, Default)]
struct GeoIndex {
    /// Longest prefix first: (prefix, area name, area location).
    prefixes: Vec<(Cidr, String, Option<Location>)>,
    database: Option<GeoDatabase>,
}

impl GeoIndex {
    fn lookup(&self, ip: IpAddr) -> Place<'_> {
        let mut place = Place::default();
        if let Some((_, name, loc)) = self.prefixes.iter().find(|(net, _, _)| net.contains(ip)) {
            place.names[0] = Some(name.as_str().into());
            place.location = *loc;
        }
        let record = self
            .database
            .as_ref()
            .and_then(|db| db.lookup(ip).ok())
            .and_then(|r| r.decode::<MmdbRecord>().ok().flatten());
        if let Some(r) = record {
            if let Some(c) = r.country.and_then(|c| c.iso_code) {
                place.names[1] = Some(c.into());
            }
            if let Some(c) = r.continent.and_then(|c| c.code) {
                place.names[2] = Some(c.into());
            }
            if place.location.is_none()
                && let Some(MmdbLocation {
                    latitude: Some(lat),
                    longitude: Some(lon),
                }) = r.location
            {
                place.location = Some(Location { lat, lon });
            }
        }
        place
    }
}

/// Every answer, for one moment of health.
#[derive(Clone, Debug)]
pub struct Tables {
    zones: Vec<ZoneTable>,
    profiles: Vec<ProfileTable>,
    names: HashMap<Box<[u8]>, usize>,
    /// The A/AAAA records of name servers inside served zones (names no profile answers).
    hosts: HashMap<Box<[u8]>, Box<[Rr]>>,
    geo: GeoIndex,
    views: Vec<ProfileView>,
}

/// Where a query comes from.
#[derive(Clone, Copy, Debug)]
pub struct Client {
    /// The ECS address, else the resolver's.
    pub addr: IpAddr,
}

/// The outcome of resolving a name.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup {
    /// Not in any zone: REFUSED.
    NotOurs,
    /// In zone `zone` (index), the name does not exist: NXDOMAIN.
    NxDomain { zone: usize },
    /// In zone `zone`, the name exists.
    Found { zone: usize, profile: Option<usize> },
}

/// Inputs of a rebuild besides the topology and health.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    /// Endpoints disabled by the operator: (profile, endpoint).
    pub disabled: HashSet<(String, String)>,
    /// Priority profiles: the endpoint the failback controller lets take traffic.
    pub priority_current: HashMap<String, Option<usize>>,
    /// Profiles of an `[[app]]`: the site the app is active at. Only endpoints of that site
    /// (and endpoints of no site) are answered, whatever their health elsewhere.
    pub active_site: HashMap<String, String>,
}

impl Overrides {
    /// Whether an app keeps endpoint `e` of profile `p` out of the answers (it runs at
    /// another site than the app's active one).
    pub fn outside_active_site(&self, t: &Topology, p: &Profile, e: &model::Endpoint) -> bool {
        let Some(active) = self.active_site.get(p.name.as_str()) else {
            return false;
        };
        t.endpoint_site(e).is_some_and(|s| s != active)
    }
}

impl Tables {
    /// Builds every table. Never fails: the topology was validated.
    pub fn build(
        t: &Topology,
        health: &dyn HealthView,
        o: &Overrides,
        serial: u32,
        database: Option<GeoDatabase>,
    ) -> Self {
        let statuses = endpoint_statuses(t, health, o);
        Self::from_statuses(t, &statuses, health, o, serial, database)
    }

    /// Builds every table from endpoint statuses already computed ([`endpoint_statuses`]);
    /// `health` is then asked only for probe latencies.
    pub fn from_statuses(
        t: &Topology,
        statuses: &[Vec<Status>],
        health: &dyn HealthView,
        o: &Overrides,
        serial: u32,
        database: Option<GeoDatabase>,
    ) -> Self {
        let mut profiles = Vec::with_capacity(t.profiles.len());
        let mut views = Vec::with_capacity(t.profiles.len());
        for (pi, p) in t.profiles.iter().enumerate() {
            let (table, answered, all_down) = profile_table(t, pi, p, statuses, health, o);
            views.push(ProfileView {
                name: p.name.to_string(),
                domain: p.domain.to_string(),
                routing: p.routing.to_string(),
                ttl_seconds: table.ttl,
                all_down,
                endpoints: p
                    .endpoints
                    .iter()
                    .enumerate()
                    .map(|(ei, e)| EndpointView {
                        name: e.name.to_string(),
                        target: target_text(&e.target),
                        status: statuses[pi][ei],
                        priority: e.priority,
                        weight: e.weight,
                        answered: answered[ei],
                    })
                    .collect(),
                answer: Vec::new(),
            });
            profiles.push(table);
        }
        let names: HashMap<Box<[u8]>, usize> = t
            .profiles
            .iter()
            .enumerate()
            .filter_map(|(i, p)| Some((wire::encode_name(&p.domain)?.into_boxed_slice(), i)))
            .collect();
        let hosts = name_server_hosts(t, &names);
        let zones = zone_tables(t, serial, &hosts);
        let mut geo = GeoIndex {
            prefixes: Vec::new(),
            database,
        };
        for a in &t.geo.areas {
            for net in &a.subnets {
                geo.prefixes.push((*net, a.name.to_string(), a.location));
            }
        }
        geo.prefixes
            .sort_by_key(|(net, _, _)| std::cmp::Reverse(net.prefix));
        let mut tables = Tables {
            zones,
            profiles,
            names,
            hosts,
            geo,
            views,
        };
        for i in 0..tables.views.len() {
            let mut answer = Vec::new();
            let outcome = tables.resolve(i, None, rtype::ANY, &mut |rr| {
                answer.push(format!("{} {}", rr.type_name(), rr.text()));
            });
            if let Err(e) = outcome {
                answer.push(format!("{e:?}").to_uppercase());
            }
            tables.views[i].answer = answer;
        }
        tables
    }

    /// Every profile's state, for the API.
    pub fn views(&self) -> &[ProfileView] {
        &self.views
    }

    /// Finds the zone and profile of a lower-cased wire name.
    pub fn lookup(&self, name: &wire::NameBuf) -> Lookup {
        let Some(zone) = self.zone_of(name) else {
            return Lookup::NotOurs;
        };
        let wire = name.wire();
        let profile = self.names.get(wire).copied();
        if profile.is_some() || self.zones[zone].existing.contains(wire) {
            Lookup::Found { zone, profile }
        } else {
            Lookup::NxDomain { zone }
        }
    }

    /// The addresses of a name server answered at this name (a name no profile answers).
    pub fn host(&self, name: &wire::NameBuf) -> Option<&[Rr]> {
        self.hosts.get(name.wire()).map(|r| &r[..])
    }

    /// The most specific zone containing the name.
    fn zone_of(&self, name: &wire::NameBuf) -> Option<usize> {
        let n = name.label_count();
        self.zones
            .iter()
            .enumerate()
            .filter(|(_, z)| z.labels <= n && name.suffix(n - z.labels) == &z.apex[..])
            .max_by_key(|(_, z)| z.labels)
            .map(|(i, _)| i)
    }

    /// The zone's apex records and TTLs: (apex wire name, labels, SOA rdata, NS rdatas, ttl,
    /// negative ttl).
    pub fn zone(&self, i: usize) -> ZoneRecords<'_> {
        let z = &self.zones[i];
        ZoneRecords {
            labels: z.labels,
            soa: &z.soa,
            ns: &z.ns,
            ttl: z.ttl,
            negative_ttl: z.negative_ttl,
        }
    }

    pub fn ttl(&self, profile: usize) -> u32 {
        self.profiles[profile].ttl
    }

    /// Emits the records answering `qtype` for a profile. `Ok(true)` when the answer depended
    /// on the client (so the ECS scope is the client's prefix).
    pub fn resolve(
        &self,
        profile: usize,
        client: Option<Client>,
        qtype: u16,
        emit: &mut dyn FnMut(&Rr),
    ) -> Result<bool, Empty> {
        self.resolve_in(profile, client, qtype, emit, 0)
    }

    fn resolve_in(
        &self,
        profile: usize,
        client: Option<Client>,
        qtype: u16,
        emit: &mut dyn FnMut(&Rr),
        depth: usize,
    ) -> Result<bool, Empty> {
        if depth > model::MAX_PROFILE_DEPTH {
            return Err(Empty::Servfail);
        }
        let table = &self.profiles[profile];
        let choice = match &table.pick {
            Pick::One(c) => c,
            Pick::Weighted { total, items } => {
                let r = rand::random_range(0..*total);
                match items.iter().find(|(cum, _)| r < *cum) {
                    Some((_, c)) => c,
                    None => return Err(Empty::Servfail),
                }
            }
            Pick::All { max, records } => {
                let mut count = [0usize; 2];
                for rr in records {
                    let slot = usize::from(rr.rtype == rtype::AAAA);
                    if wanted(rr, qtype) && count[slot] < *max {
                        count[slot] += 1;
                        emit(rr);
                    }
                }
                return Ok(false);
            }
            Pick::Subnet { rules, fallback } => {
                let matched = client.and_then(|c| {
                    rules
                        .iter()
                        .find(|(net, _)| net.contains(c.addr))
                        .map(|(_, ch)| ch)
                });
                match matched.or(fallback.as_ref()) {
                    Some(c) => c,
                    None => return Err(Empty::Nodata),
                }
            }
            Pick::Geo { areas } => {
                let place = client.map(|c| self.geo.lookup(c.addr)).unwrap_or_default();
                let chosen = place
                    .names()
                    .find_map(|n| areas.get(n))
                    .or_else(|| areas.get("*"));
                match chosen {
                    Some(c) => c,
                    None => return Err(Empty::Nodata),
                }
            }
            Pick::Performance {
                candidates,
                by_latency,
            } => {
                let here = client.and_then(|c| self.geo.lookup(c.addr).location);
                match here {
                    Some(here) => candidates
                        .iter()
                        .min_by(|a, b| distance_km(here, a.0).total_cmp(&distance_km(here, b.0)))
                        .map_or(&**by_latency, |(_, c)| c),
                    None => by_latency,
                }
            }
            Pick::Nodata => return Err(Empty::Nodata),
            Pick::Servfail => return Err(Empty::Servfail),
        };
        let child_used = match choice {
            Choice::Records(rrs) => {
                for rr in rrs.iter().filter(|rr| wanted(rr, qtype)) {
                    emit(rr);
                }
                false
            }
            Choice::Profile(child) => self.resolve_in(*child, client, qtype, emit, depth + 1)?,
        };
        Ok(table.uses_client || child_used)
    }
}

/// A zone's apex data, for negative answers and apex queries.
#[derive(Clone, Copy, Debug)]
pub struct ZoneRecords<'a> {
    pub labels: usize,
    pub soa: &'a [u8],
    pub ns: &'a [NsRecord],
    pub ttl: u32,
    pub negative_ttl: u32,
}

/// A CNAME answers every type; addresses only their own (or ANY).
fn wanted(rr: &Rr, qtype: u16) -> bool {
    rr.rtype == qtype || rr.rtype == rtype::CNAME || qtype == rtype::ANY
}

fn target_text(t: &Target) -> String {
    match t {
        Target::Address(ip) => format!("address {ip}"),
        Target::Cname(h) => format!("cname {h}"),
        Target::LoadBalancer(lb) => format!("load_balancer {lb}"),
        Target::Profile(p) => format!("profile {p}"),
    }
}

fn secs(d: Duration) -> u32 {
    u32::try_from(d.as_secs()).unwrap_or(u32::MAX)
}

/// The status of every endpoint of every profile, nested profiles after their children.
pub fn endpoint_statuses(t: &Topology, health: &dyn HealthView, o: &Overrides) -> Vec<Vec<Status>> {
    let mut done: Vec<Option<Vec<Status>>> = vec![None; t.profiles.len()];
    for i in 0..t.profiles.len() {
        statuses_of(t, i, health, o, &mut done, 0);
    }
    done.into_iter().map(Option::unwrap_or_default).collect()
}

fn statuses_of(
    t: &Topology,
    i: usize,
    health: &dyn HealthView,
    o: &Overrides,
    done: &mut Vec<Option<Vec<Status>>>,
    depth: usize,
) -> Vec<Status> {
    if let Some(s) = &done[i] {
        return s.clone();
    }
    let p = &t.profiles[i];
    let mut out = Vec::with_capacity(p.endpoints.len());
    for e in &p.endpoints {
        let disabled = !e.enabled
            || o.disabled
                .contains(&(p.name.to_string(), e.name.to_string()));
        let status = if disabled {
            Status::Disabled
        } else if let Target::Profile(child) = &e.target {
            let ci = t.profiles.iter().position(|c| c.name == *child);
            match ci {
                Some(ci) if depth < model::MAX_PROFILE_DEPTH => {
                    let child_statuses = statuses_of(t, ci, health, o, done, depth + 1);
                    if nested_available(t, &t.profiles[ci], &child_statuses, e) {
                        Status::Online
                    } else {
                        Status::Degraded
                    }
                }
                _ => Status::Degraded,
            }
        } else if p.monitor.is_none() {
            Status::Online
        } else {
            health
                .status(&health::endpoint_id(&p.name, &e.name))
                .unwrap_or(Status::CheckingEndpoint)
        };
        out.push(status);
    }
    done[i] = Some(out.clone());
    out
}

/// Whether an endpoint in this state may be answered.
pub fn available(s: Status) -> bool {
    matches!(s, Status::Online | Status::CheckingEndpoint)
}

/// A nested profile is available when enough of its endpoints are, in all and per family.
fn nested_available(
    t: &Topology,
    child: &Profile,
    statuses: &[Status],
    e: &model::Endpoint,
) -> bool {
    let (mut all, mut v4, mut v6) = (0u32, 0u32, 0u32);
    for (ce, s) in child.endpoints.iter().zip(statuses) {
        if !available(*s) {
            continue;
        }
        all += 1;
        match endpoint_ip(t, &ce.target) {
            Some(IpAddr::V4(_)) => v4 += 1,
            Some(IpAddr::V6(_)) => v6 += 1,
            None => {}
        }
    }
    all >= e.min_child_endpoints && v4 >= e.min_child_ipv4 && v6 >= e.min_child_ipv6
}

fn endpoint_ip(t: &Topology, target: &Target) -> Option<IpAddr> {
    match target {
        Target::Address(ip) => Some(*ip),
        Target::LoadBalancer(lb) => t.load_balancer(lb).map(|lb| lb.frontend.ip()),
        _ => None,
    }
}

fn choice(t: &Topology, target: &Target) -> Choice {
    match target {
        Target::Profile(p) => {
            Choice::Profile(t.profiles.iter().position(|c| c.name == *p).unwrap_or(0))
        }
        Target::Cname(host) => Choice::Records(vec![Rr {
            rtype: rtype::CNAME,
            rdata: wire::encode_name(host)
                .unwrap_or_default()
                .into_boxed_slice(),
        }]),
        other => Choice::Records(endpoint_ip(t, other).map(Rr::address).into_iter().collect()),
    }
}

/// One profile's table, which endpoints it may answer, and whether it is all down.
fn profile_table(
    t: &Topology,
    pi: usize,
    p: &Profile,
    statuses: &[Vec<Status>],
    health: &dyn HealthView,
    o: &Overrides,
) -> (ProfileTable, Vec<bool>, bool) {
    let st = &statuses[pi];
    let inside: Vec<bool> = p
        .endpoints
        .iter()
        .map(|e| !o.outside_active_site(t, p, e))
        .collect();
    let mut usable: Vec<bool> = st
        .iter()
        .zip(&inside)
        .map(|(s, i)| *i && available(*s))
        .collect();
    let all_down = !usable.iter().any(|u| *u);
    let ttl = secs(p.ttl);
    let uses_client = matches!(
        p.routing,
        Routing::Subnet | Routing::Geographic | Routing::Performance
    );
    if all_down {
        match p.all_down {
            AllDown::ServeAll => {
                usable = st
                    .iter()
                    .zip(&inside)
                    .map(|(s, i)| *i && *s != Status::Disabled)
                    .collect();
            }
            AllDown::Nodata | AllDown::Servfail => {
                let pick = if p.all_down == AllDown::Nodata {
                    Pick::Nodata
                } else {
                    Pick::Servfail
                };
                let table = ProfileTable {
                    ttl,
                    pick,
                    uses_client: false,
                };
                return (table, vec![false; st.len()], true);
            }
        }
    }
    // Priority answers one endpoint: decided once, for the pick and for what is answered.
    let current = (p.routing == Routing::Priority)
        .then(|| current_priority(p, &usable, o))
        .flatten();
    let pick = match p.routing {
        Routing::Priority => match current {
            Some(i) => Pick::One(choice(t, &p.endpoints[i].target)),
            None => Pick::Nodata,
        },
        Routing::Weighted => weighted_pick(t, p, &usable),
        Routing::Multivalue => Pick::All {
            max: p.max_answers as usize,
            records: p
                .endpoints
                .iter()
                .zip(&usable)
                .filter(|(_, u)| **u)
                .filter_map(|(e, _)| endpoint_ip(t, &e.target).map(Rr::address))
                .collect(),
        },
        Routing::Subnet => {
            let mut rules: Vec<(Cidr, Choice)> = Vec::new();
            let mut fallback = None;
            for (e, _) in p.endpoints.iter().zip(&usable).filter(|(_, u)| **u) {
                if e.subnets.is_empty() {
                    fallback = Some(choice(t, &e.target));
                }
                for net in &e.subnets {
                    rules.push((*net, choice(t, &e.target)));
                }
            }
            rules.sort_by_key(|(net, _)| std::cmp::Reverse(net.prefix));
            Pick::Subnet { rules, fallback }
        }
        Routing::Geographic => {
            let index = |name: &str| p.endpoints.iter().position(|e| e.name.as_str() == name);
            let areas = p
                .geo
                .iter()
                .filter_map(|(area, list)| {
                    let first = list.iter().filter_map(|n| index(n)).find(|&i| usable[i])?;
                    Some((area.to_string(), choice(t, &p.endpoints[first].target)))
                })
                .collect();
            Pick::Geo { areas }
        }
        Routing::Performance => {
            let mut candidates = Vec::new();
            let mut fastest: Option<(Duration, usize)> = None;
            for (i, e) in p.endpoints.iter().enumerate().filter(|(i, _)| usable[*i]) {
                if let Some(loc) = model::endpoint_location(t, e) {
                    candidates.push((loc, choice(t, &e.target)));
                }
                let latency = health
                    .latency(&health::endpoint_id(&p.name, &e.name))
                    .unwrap_or(Duration::MAX);
                if fastest.is_none_or(|(l, _)| latency < l) {
                    fastest = Some((latency, i));
                }
            }
            match fastest {
                Some((_, i)) => Pick::Performance {
                    candidates,
                    by_latency: Box::new(choice(t, &p.endpoints[i].target)),
                },
                None => Pick::Nodata,
            }
        }
    };
    let answered = match p.routing {
        Routing::Priority => (0..st.len()).map(|i| Some(i) == current).collect(),
        _ => usable,
    };
    (
        ProfileTable {
            ttl,
            pick,
            uses_client,
        },
        answered,
        all_down,
    )
}

/// Endpoints of a priority profile in priority order (best first), as indexes.
pub fn priority_order(p: &Profile) -> Vec<usize> {
    let mut order: Vec<usize> = (0..p.endpoints.len()).collect();
    order.sort_by_key(|&i| p.endpoints[i].priority.unwrap_or(u32::MAX));
    order
}

/// The endpoint of a priority profile taking traffic: the failback controller's choice when it
/// is usable, else the best usable one.
fn current_priority(p: &Profile, usable: &[bool], o: &Overrides) -> Option<usize> {
    let order = priority_order(p);
    let from_controller = o
        .priority_current
        .get(p.name.as_str())
        .copied()
        .flatten()
        .and_then(|rank| order.get(rank).copied())
        .filter(|&i| usable[i]);
    from_controller.or_else(|| order.into_iter().find(|&i| usable[i]))
}

/// Weighted: weight-0 endpoints only when no weighted endpoint is usable, then equally.
fn weighted_pick(t: &Topology, p: &Profile, usable: &[bool]) -> Pick {
    let positive: Vec<usize> = (0..p.endpoints.len())
        .filter(|&i| usable[i] && p.endpoints[i].weight > 0)
        .collect();
    let (set, equal) = if positive.is_empty() {
        (
            (0..p.endpoints.len()).filter(|&i| usable[i]).collect(),
            true,
        )
    } else {
        (positive, false)
    };
    let mut total = 0u64;
    let mut items = Vec::with_capacity(set.len());
    for i in set {
        total += if equal {
            1
        } else {
            u64::from(p.endpoints[i].weight)
        };
        items.push((total, choice(t, &p.endpoints[i].target)));
    }
    if total == 0 {
        Pick::Nodata
    } else {
        Pick::Weighted { total, items }
    }
}

/// Whether a wire name is `apex` or below it (compared label by label).
fn within(name: &[u8], apex: &[u8]) -> bool {
    let mut at = 0;
    while at < name.len() {
        if name[at..] == *apex {
            return true;
        }
        at += 1 + usize::from(name[at]);
    }
    false
}

/// The addresses of every name server inside a served zone, by wire name (one name server
/// listed in several zones: every address given), leaving out names a profile answers
/// (`validate` refuses those).
fn name_server_hosts(
    t: &Topology,
    profiles: &HashMap<Box<[u8]>, usize>,
) -> HashMap<Box<[u8]>, Box<[Rr]>> {
    let Some(dns) = &t.dns else {
        return HashMap::new();
    };
    let apexes: Vec<Vec<u8>> = dns
        .zones
        .iter()
        .filter_map(|z| wire::encode_name(&z.name))
        .collect();
    let mut hosts: HashMap<Box<[u8]>, Vec<Rr>> = HashMap::new();
    for ns in dns.zones.iter().flat_map(|z| &z.nameservers) {
        let Some(name) = wire::encode_name(&ns.name) else {
            continue;
        };
        if ns.addresses.is_empty()
            || profiles.contains_key(&name[..])
            || !apexes.iter().any(|a| within(&name, a))
        {
            continue;
        }
        let rrs = hosts.entry(name.into_boxed_slice()).or_default();
        for ip in &ns.addresses {
            let rr = Rr::address(*ip);
            if !rrs.contains(&rr) {
                rrs.push(rr);
            }
        }
    }
    hosts
        .into_iter()
        .map(|(name, rrs)| (name, rrs.into_boxed_slice()))
        .collect()
}

fn zone_tables(t: &Topology, serial: u32, hosts: &HashMap<Box<[u8]>, Box<[Rr]>>) -> Vec<ZoneTable> {
    let Some(dns) = &t.dns else {
        return Vec::new();
    };
    dns.zones
        .iter()
        .map(|z| {
            let apex = wire::encode_name(&z.name).unwrap_or_else(|| vec![0]);
            let labels = z.name.split('.').count();
            let mname = wire::encode_name(z.nameservers.first().map_or("", |n| n.name.as_str()))
                .unwrap_or_else(|| vec![0]);
            let rname = wire::encode_name(&z.hostmaster).unwrap_or_else(|| vec![0]);
            let mut soa = mname;
            soa.extend_from_slice(&rname);
            for v in [serial, 3600, 600, 604_800, secs(z.negative_ttl)] {
                soa.extend_from_slice(&v.to_be_bytes());
            }
            let mut existing = HashSet::new();
            existing.insert(apex.clone().into_boxed_slice());
            let profile_names = t
                .profiles
                .iter()
                .filter_map(|p| wire::encode_name(&p.domain));
            let host_names = hosts.keys().map(|h| h.to_vec());
            for name in profile_names.chain(host_names) {
                if !within(&name, &apex) {
                    continue;
                }
                // The name and every ancestor down to the apex (empty non-terminals).
                let mut at = 0;
                while name.len() - at >= apex.len() {
                    existing.insert(name[at..].to_vec().into_boxed_slice());
                    at += 1 + name[at] as usize;
                }
            }
            ZoneTable {
                apex: apex.into_boxed_slice(),
                labels,
                soa: soa.into_boxed_slice(),
                ns: z
                    .nameservers
                    .iter()
                    .filter_map(|n| wire::encode_name(&n.name))
                    .map(|name| NsRecord {
                        glue: hosts.get(&name[..]).cloned().unwrap_or_default(),
                        name: name.into_boxed_slice(),
                    })
                    .collect(),
                ttl: secs(z.ttl),
                negative_ttl: secs(z.negative_ttl),
                existing,
            }
        })
        .collect()
}

/// Great-circle distance.
pub fn distance_km(a: Location, b: Location) -> f64 {
    let (la1, la2) = (a.lat.to_radians(), b.lat.to_radians());
    let dla = la2 - la1;
    let dlo = (b.lon - a.lon).to_radians();
    let h = (dla / 2.0).sin().powi(2) + la1.cos() * la2.cos() * (dlo / 2.0).sin().powi(2);
    2.0 * 6371.0 * h.sqrt().asin()
}
