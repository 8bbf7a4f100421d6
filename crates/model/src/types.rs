//! The validated topology: what every other crate reads. Defaults and units are stated on each
//! field; the topology file spells every field the same way.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::ops::Deref;
use std::path::PathBuf;
use std::time::Duration;

use crate::diag::Span;
use crate::read::choice;
use crate::units::{Cidr, PortRange, StatusRange};

/// A name or a reference to one, remembering where the file wrote it. Compares by text only.
#[derive(Clone, Debug, Eq)]
pub struct Name {
    text: String,
    span: Span,
}

impl Name {
    pub fn new(text: impl Into<String>, span: Span) -> Self {
        Name {
            text: text.into(),
            span,
        }
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Where the topology file wrote it.
    pub fn span(&self) -> Span {
        self.span.clone()
    }
}

impl PartialEq for Name {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl std::hash::Hash for Name {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.text.hash(state);
    }
}

impl Deref for Name {
    type Target = str;
    fn deref(&self) -> &str {
        &self.text
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// A whole deployment: the validated contents of one topology file.
#[derive(Clone, Debug)]
pub struct Topology {
    pub tandem: Settings,
    /// `[cluster]`: present in cluster mode, with `nodes`.
    pub cluster: Option<Cluster>,
    /// `[[node]]`: the processes that run the sites; empty in the single-process default.
    pub nodes: Vec<Node>,
    pub sites: Vec<Site>,
    pub dns: Option<Dns>,
    pub geo: Geo,
    pub monitors: Vec<Monitor>,
    pub profiles: Vec<Profile>,
    pub load_balancers: Vec<LoadBalancer>,
    pub scale_sets: Vec<ScaleSet>,
    pub databases: Vec<Database>,
    pub apps: Vec<App>,
}

impl Topology {
    pub fn monitor(&self, name: &str) -> Option<&Monitor> {
        self.monitors.iter().find(|m| m.name.as_str() == name)
    }
    pub fn site(&self, name: &str) -> Option<&Site> {
        self.sites.iter().find(|s| s.name.as_str() == name)
    }
    pub fn profile(&self, name: &str) -> Option<&Profile> {
        self.profiles.iter().find(|p| p.name.as_str() == name)
    }
    pub fn load_balancer(&self, name: &str) -> Option<&LoadBalancer> {
        self.load_balancers.iter().find(|l| l.name.as_str() == name)
    }
    pub fn scale_set(&self, name: &str) -> Option<&ScaleSet> {
        self.scale_sets.iter().find(|s| s.name.as_str() == name)
    }
    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.name.as_str() == name)
    }
    pub fn database(&self, name: &str) -> Option<&Database> {
        self.databases.iter().find(|d| d.name.as_str() == name)
    }
    pub fn app(&self, name: &str) -> Option<&App> {
        self.apps.iter().find(|a| a.name.as_str() == name)
    }
    /// Where an endpoint runs: its `site`, else its load balancer's site; `None` for an
    /// address, CNAME or nested profile without `site`.
    pub fn endpoint_site<'a>(&'a self, e: &'a Endpoint) -> Option<&'a str> {
        if let Some(s) = &e.site {
            return Some(s.as_str());
        }
        match &e.target {
            Target::LoadBalancer(lb) => self.load_balancer(lb).map(|l| l.site.as_str()),
            _ => None,
        }
    }
}

/// How many live vantage points must say an endpoint is Degraded before it is, for DNS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quorum {
    /// More than half of the live nodes (default).
    Majority,
    /// At least this many (or all live nodes, when fewer are alive).
    Count(u32),
}

impl Quorum {
    /// Votes needed among `live` voters (at least one).
    pub fn needed(self, live: usize) -> usize {
        let live = live.max(1);
        match self {
            Quorum::Majority => live / 2 + 1,
            Quorum::Count(n) => (n as usize).clamp(1, live),
        }
    }
}

/// `[cluster]`: how the nodes coordinate.
#[derive(Clone, Debug)]
pub struct Cluster {
    /// Key prefix in etcd: `/tandem/NAME/`. Default `tandem`.
    pub name: Name,
    /// Client URLs of the etcd members (`http://ip:2379`).
    pub etcd: Vec<String>,
    /// A node silent this long is gone (its record and votes expire). Default 5 s, 2 s–5 m.
    pub lease_ttl: Duration,
    /// Default majority.
    pub health_quorum: Quorum,
    /// TLS to etcd; used when the endpoints are `https://`.
    pub etcd_tls: EtcdTls,
    /// Where the file sets it, and its `health_quorum` (for diagnostics).
    pub span: Span,
    pub quorum_span: Span,
}

/// `[[node]]`: one Tandem process, which runs its site's tiers.
#[derive(Clone, Debug)]
pub struct Node {
    pub name: Name,
    pub site: Name,
    /// Its REST API, `/metrics` and dashboard.
    pub api: SocketAddr,
    /// Its authoritative DNS listeners (UDP and TCP); none: it serves no DNS.
    pub dns: Vec<SocketAddr>,
}

/// `[tandem]`: process-wide settings.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Where embedded state, instance logs and database data live. Default `.tandem`, relative to
    /// the working directory.
    pub state_dir: PathBuf,
    /// REST API, `/metrics` and dashboard. Default `127.0.0.1:7400`.
    pub api: SocketAddr,
    /// The API's bearer tokens with roles (a TOML file of `[[token]]` name, role, sha256),
    /// relative to the working directory. Default: none, the API is open.
    pub tokens: Option<PathBuf>,
    /// With `tokens`: reads (GET) need no token. Default `false`.
    pub open_reads: bool,
    /// `tls_cert`, `tls_key`, `tls_ca`: the API over TLS. Default: none, plain HTTP.
    pub tls: Option<Tls>,
}

/// TLS for the API: PEM files, relative to the working directory. Every node of a cluster reads
/// the same paths on its own machine (its own certificate there).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tls {
    /// The certificate chain the API presents, leaf first. Other nodes and the CLI check that
    /// it names the API's IP address (a subjectAltName of type IP).
    pub cert: PathBuf,
    /// Its private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// The CA certificates that sign the nodes' API certificates: how a node verifies the
    /// others it asks. Required in cluster mode.
    pub ca: Option<PathBuf>,
}

/// TLS to etcd (`[cluster] etcd_ca`, `etcd_cert`, `etcd_key`), as etcd's `--trusted-ca-file`
/// and `--client-cert-auth` expect: PEM files, relative to the working directory.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EtcdTls {
    /// The CA that signs the etcd members' certificates; required with `https://` endpoints.
    pub ca: Option<PathBuf>,
    /// This node's client certificate and key, for members started with `--client-cert-auth`.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

choice! {
    /// What part a site plays.
    SiteRole { Edge = "edge", Region = "region", Witness = "witness" }
}

/// `[[site]]`: a failure domain.
#[derive(Clone, Debug)]
pub struct Site {
    pub name: Name,
    pub role: SiteRole,
    /// Used by performance routing when no latency measurement exists.
    pub location: Option<Location>,
}

/// A point on Earth, in degrees.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Location {
    pub lat: f64,
    pub lon: f64,
}

/// `[dns]`: the authoritative DNS server.
#[derive(Clone, Debug)]
pub struct Dns {
    /// UDP and TCP listen addresses (single-process mode; in cluster mode each node's `dns`).
    pub listen: Vec<SocketAddr>,
    /// Where the file sets `listen`, if it does.
    pub listen_span: Option<Span>,
    pub zones: Vec<Zone>,
    /// `[dns.rrl]`: response-rate limiting of UDP answers.
    pub rrl: Rrl,
}

/// Default of `[dns.rrl] responses_per_second`.
pub const RRL_RESPONSES_PER_SECOND: u32 = 20;
/// Default of `[dns.rrl] slip` (BIND 9's default).
pub const RRL_SLIP: u32 = 2;
/// Default of `[dns.rrl] ipv4_prefix` (BIND 9's `ipv4-prefix-length`).
pub const RRL_IPV4_PREFIX: u8 = 24;
/// Default of `[dns.rrl] ipv6_prefix` (BIND 9's `ipv6-prefix-length`).
pub const RRL_IPV6_PREFIX: u8 = 56;
/// Default of `[dns.rrl] table_size`, in buckets (16 bytes each: 1 MiB).
pub const RRL_TABLE_SIZE: u32 = 65_536;

/// `[dns.rrl]`: DNS response-rate limiting (RRL), so the server cannot be used to amplify a
/// flood toward a spoofed source, after BIND 9's `rate-limit` and Knot DNS's `mod-rrl`.
///
/// Every UDP response is charged to a bucket of credit keyed by the client's prefix (`/24`
/// IPv4, `/56` IPv6 by default) and the response's class, as BIND classifies: the same name
/// and type for answers, the zone for NXDOMAIN, one class for every error. A bucket refills at
/// `responses_per_second` and holds at most one second of credit. Over the limit a response
/// is dropped, except every `slip`-th one, sent truncated (TC, no records) so that a real
/// client behind the spoofed address retries over TCP. TCP is never limited: its source cannot
/// be spoofed.
#[derive(Clone, Debug, PartialEq)]
pub struct Rrl {
    /// Default `true` (its cost was measured at noise level: bench/results/dns.md).
    pub enabled: bool,
    /// Responses per second per client prefix and class, 1 to 1,000,000. Default
    /// [`RRL_RESPONSES_PER_SECOND`].
    pub responses_per_second: u32,
    /// 0: drop every limited response; 1: truncate every one; N: truncate every N-th, drop the
    /// others. 0 to 10, as BIND. Default [`RRL_SLIP`].
    pub slip: u32,
    /// Bits of an IPv4 client address that make its prefix, 8 to 32. Default
    /// [`RRL_IPV4_PREFIX`].
    pub ipv4_prefix: u8,
    /// Bits of an IPv6 client address that make its prefix, 16 to 128. Default
    /// [`RRL_IPV6_PREFIX`].
    pub ipv6_prefix: u8,
    /// Buckets in the table, fixed at start, 1,024 to 4,194,304; keys are hashed (with a random
    /// key) into it and share a bucket when they collide, as in Knot. Default
    /// [`RRL_TABLE_SIZE`].
    pub table_size: u32,
    /// Clients never limited. Default the loopback prefixes `127.0.0.0/8` and `::1/128`: the
    /// kernel drops datagrams from them arriving on any other interface, so they cannot be
    /// spoofed from the network.
    pub exempt: Vec<Cidr>,
}

impl Default for Rrl {
    fn default() -> Self {
        Rrl {
            enabled: true,
            responses_per_second: RRL_RESPONSES_PER_SECOND,
            slip: RRL_SLIP,
            ipv4_prefix: RRL_IPV4_PREFIX,
            ipv6_prefix: RRL_IPV6_PREFIX,
            table_size: RRL_TABLE_SIZE,
            exempt: Rrl::default_exempt(),
        }
    }
}

impl Rrl {
    /// `127.0.0.0/8` and `::1/128`.
    pub fn default_exempt() -> Vec<Cidr> {
        ["127.0.0.0/8", "::1/128"]
            .iter()
            .filter_map(|c| Cidr::parse(c))
            .collect()
    }
}

/// `[[dns.zone]]`: a zone served authoritatively.
#[derive(Clone, Debug)]
pub struct Zone {
    /// Lower-case, without the trailing dot.
    pub name: Name,
    /// The zone's name servers; the first is the SOA's primary.
    pub nameservers: Vec<NameServer>,
    /// Mailbox of the zone's administrator, as a name (`hostmaster.shop.test`).
    pub hostmaster: String,
    /// TTL of the SOA and NS records. Default 1 h.
    pub ttl: Duration,
    /// How long resolvers may cache a negative answer (the SOA minimum). Default 30 s.
    pub negative_ttl: Duration,
}

/// A name server of a zone: `"ns1.shop.test"`, or `{ name = "ns1.shop.test", address =
/// "192.0.2.10" }` (`address` may be an array, IPv4 and IPv6).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NameServer {
    /// Host name, lower-case, without the trailing dot.
    pub name: Name,
    /// Where it answers. For a name inside a served zone, Tandem answers these as its A/AAAA
    /// records and as glue with the zone's NS records. Empty when not given.
    pub addresses: Vec<IpAddr>,
}

/// `[geo]`: where clients are, for geographic and performance routing.
#[derive(Clone, Debug, Default)]
pub struct Geo {
    /// A MaxMind-format database (GeoLite2/GeoIP2 Country or City); its country and continent
    /// codes are area names too.
    pub database: Option<PathBuf>,
    pub areas: Vec<GeoArea>,
}

/// `[[geo.area]]`: a named set of client prefixes, with an optional location.
#[derive(Clone, Debug)]
pub struct GeoArea {
    pub name: Name,
    pub subnets: Vec<Cidr>,
    pub location: Option<Location>,
}

choice! {
    /// How a monitor probes.
    Protocol { Http = "http", Https = "https", Tcp = "tcp" }
}

/// `[[monitor]]`: how to probe a target.
#[derive(Clone, Debug)]
pub struct Monitor {
    pub name: Name,
    pub protocol: Protocol,
    pub port: u16,
    /// HTTP(S) request path. Default `/`.
    pub path: String,
    /// Extra request headers; `Host` here overrides the target's host.
    pub headers: BTreeMap<String, String>,
    /// Statuses that count as success. Default `["200-299"]`.
    pub expected_status: Vec<StatusRange>,
    /// A substring the response body must contain (first 64 KiB).
    pub body: Option<String>,
    /// Time between probes of one target. Default 10 s, at least 100 ms.
    pub interval: Duration,
    /// Give up on a probe after this long. Default 5 s, and below `interval`.
    pub timeout: Duration,
    /// Failures tolerated: Degraded after `tolerated_failures + 1` in a row. Default 2.
    pub tolerated_failures: u32,
    /// Successes in a row before a Degraded target is Online again. Default 2.
    pub recovery_successes: u32,
    /// HTTPS only: verify the server certificate. Default true.
    pub tls_verify: bool,
    /// HTTPS only: server name for SNI and verification. Default: the target's host name, or
    /// its `Host` header.
    pub sni: Option<String>,
}

choice! {
    /// How a profile picks its answer.
    Routing {
        Priority = "priority",
        Weighted = "weighted",
        Performance = "performance",
        Geographic = "geographic",
        Multivalue = "multivalue",
        Subnet = "subnet",
    }
}

choice! {
    /// What a profile answers when no endpoint is available.
    AllDown { ServeAll = "serve-all", Nodata = "nodata", Servfail = "servfail" }
}

/// `[[profile]]`: a DNS name answered by a routing method over endpoints.
#[derive(Clone, Debug)]
pub struct Profile {
    pub name: Name,
    /// Lower-case, without the trailing dot.
    pub domain: Name,
    pub routing: Routing,
    /// Default 30 s.
    pub ttl: Duration,
    /// Probes the endpoints; without one, endpoints count as Online.
    pub monitor: Option<Name>,
    /// A recovered higher-priority endpoint must stay Online this long before it takes traffic
    /// back. Default 30 s.
    pub failback_hold: Duration,
    /// Default `serve-all`.
    pub all_down: AllDown,
    /// Multivalue: most addresses in one answer. Default 8.
    pub max_answers: u32,
    /// Geographic: for each area (or `"*"` for any other client), endpoints in order of
    /// preference; the first available one answers.
    pub geo: Vec<(Name, Vec<Name>)>,
    pub endpoints: Vec<Endpoint>,
}

/// What an endpoint points at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// A/AAAA record.
    Address(IpAddr),
    /// CNAME record to a host name.
    Cname(String),
    /// The frontend address of a load balancer.
    LoadBalancer(Name),
    /// Another profile (nesting).
    Profile(Name),
}

/// `[[profile.endpoint]]`.
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub name: Name,
    pub target: Target,
    /// Priority routing: lower answers first; unique in the profile, 1–1000.
    pub priority: Option<u32>,
    /// Weighted routing: 0–1000, default 1; 0 answers only when all others are down.
    pub weight: u32,
    /// Subnet routing: client prefixes sent here.
    pub subnets: Vec<Cidr>,
    /// Where the endpoint runs; performance routing uses the site's location.
    pub site: Option<Name>,
    /// `false` is the Disabled state. Default true.
    pub enabled: bool,
    /// Nested profiles: children that must be available. Default 1.
    pub min_child_endpoints: u32,
    /// Nested profiles: IPv4 children that must be available. Default 0.
    pub min_child_ipv4: u32,
    /// Nested profiles: IPv6 children that must be available. Default 0.
    pub min_child_ipv6: u32,
}

choice! {
    /// Where a load balancer binds.
    LbKind { Public = "public", Internal = "internal" }
}

choice! {
    /// Transport a load balancer forwards.
    LbProtocol { Tcp = "tcp", Udp = "udp" }
}

choice! {
    /// Which flows stick to one backend.
    Distribution {
        FiveTuple = "five-tuple",
        SourceIp = "source-ip",
        SourceIpProtocol = "source-ip-protocol",
    }
}

choice! {
    /// Which database member a pool follows.
    DbRole { Primary = "primary", Replica = "replica" }
}

/// A backend address with its weight (1–1000, default 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backend {
    pub address: SocketAddr,
    pub weight: u32,
}

/// Where a load balancer's backends come from.
#[derive(Clone, Debug)]
pub enum Pool {
    Addresses(Vec<Backend>),
    /// A scale set's instances, on the named port of its `ports`.
    ScaleSet {
        scale_set: Name,
        port: String,
    },
    /// The member of a database in a role.
    Database {
        database: Name,
        role: DbRole,
    },
}

/// `[[load_balancer]]`.
#[derive(Clone, Debug)]
pub struct LoadBalancer {
    pub name: Name,
    pub site: Name,
    pub kind: LbKind,
    pub frontend: SocketAddr,
    pub protocol: LbProtocol,
    pub pool: Pool,
    /// Monitor run against every backend.
    pub probe: Option<Name>,
    /// Default `five-tuple`.
    pub distribution: Distribution,
    /// Default 4 min.
    pub idle_timeout: Duration,
    /// Reset (rather than close) a TCP flow that idles out. Default false.
    pub idle_reset: bool,
    /// A backend being removed gets this long for its flows to finish. Default 30 s.
    pub drain_timeout: Duration,
    /// Give up connecting to a backend (and try the next) after this long. Default 2 s.
    pub connect_timeout: Duration,
    /// What happens to established flows of a backend whose probe fails. Default `continue`.
    pub on_backend_down: OnBackendDown,
    /// New flows when no backend is healthy. Default `refuse`.
    pub all_down: LbAllDown,
    /// Send a PROXY protocol v2 header to backends. Default false.
    pub proxy_protocol: bool,
    /// More frontend ports on the frontend's address, each to a backend port.
    pub rules: Vec<LbRule>,
}

/// `rules = [{ frontend_port = 8443, backend_port = 443 }]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LbRule {
    pub frontend_port: u16,
    pub backend_port: u16,
}

choice! {
    /// Established flows of a backend that goes probe-down.
    OnBackendDown { Continue = "continue", Reset = "reset" }
}

choice! {
    /// New flows when every backend is down.
    LbAllDown { Refuse = "refuse", SendAll = "send-all" }
}

/// `capacity = { min, max, initial }`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    pub min: u32,
    pub max: u32,
    pub initial: u32,
}

choice! {
    /// What repair does to a broken instance.
    RepairAction { Replace = "replace", Restart = "restart" }
}

/// `repair = { … }`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Repair {
    /// An instance Degraded this long is repaired. Default 10 s.
    pub grace_period: Duration,
    /// Default `replace`.
    pub action: RepairAction,
}

/// A count or a share of the set: `2` or `"20%"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Amount {
    Count(u32),
    Percent(u32),
}

/// `upgrade = { … }`: rolling upgrade policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Upgrade {
    /// Default 20%.
    pub max_batch: Amount,
    /// Default 20%.
    pub max_unhealthy: Amount,
    /// Default 5 s.
    pub pause: Duration,
}

choice! {
    /// Which instances scale-in removes first.
    ScaleIn { Newest = "newest", Oldest = "oldest" }
}

choice! {
    /// What an autoscale rule measures.
    Metric { Cpu = "cpu", Connections = "connections", ConnectionRate = "connection_rate" }
}

/// Whether a rule fires above or below its threshold.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Threshold {
    Above(f64),
    Below(f64),
}

/// `[[scale_set.autoscale]]`.
#[derive(Clone, Debug, PartialEq)]
pub struct AutoscaleRule {
    pub metric: Metric,
    pub threshold: Threshold,
    /// The metric is averaged over this window.
    pub window: Duration,
    /// Instances added (positive) or removed (negative).
    pub change: i32,
    /// Default 5 min.
    pub cooldown: Duration,
}

/// `[[scale_set]]`.
#[derive(Clone, Debug)]
pub struct ScaleSet {
    pub name: Name,
    pub site: Name,
    /// Program and arguments, with `{site}`, `{instance}`, `{address}`, `{port.NAME}` filled in.
    pub command: Vec<String>,
    /// Address the instances listen on.
    pub bind: IpAddr,
    pub ports: BTreeMap<String, PortRange>,
    pub capacity: Capacity,
    pub health: Option<Name>,
    pub repair: Repair,
    pub upgrade: Upgrade,
    /// Default `newest`.
    pub scale_in: ScaleIn,
    /// From SIGTERM to SIGKILL when an instance is stopped. Default 10 s.
    pub stop_grace: Duration,
    /// An instance's log past this many bytes is moved to `INSTANCE.log.1` (the one before
    /// it dropped) and started afresh (logrotate's copytruncate). Default 10 MB, at least 64 kB.
    pub log_max_size: u64,
    pub autoscale: Vec<AutoscaleRule>,
}

choice! {
    /// Database engine.
    Engine { Postgres = "postgres" }
}

choice! {
    /// How commits are replicated. `sync`: a commit waits for the synchronous standby while
    /// there is one, and stops waiting when it has been gone for `failover_timeout` (Patroni's
    /// `synchronous_mode`); `sync-strict`: a commit never completes without a synchronous
    /// standby (Patroni's `synchronous_mode_strict`); `async`: commits never wait.
    Replication { Sync = "sync", SyncStrict = "sync-strict", Async = "async" }
}

impl Replication {
    /// Whether commits wait for a synchronous standby (`sync` or `sync-strict`).
    pub fn is_sync(self) -> bool {
        !matches!(self, Replication::Async)
    }
}

/// `[[database.member]]`.
#[derive(Clone, Debug)]
pub struct Member {
    pub site: Name,
    pub listen: SocketAddr,
    /// Its HTTP health endpoint (`/primary`, `/replica`, `/health`). Default: the `listen`
    /// address on port 8008, as Patroni's REST API.
    pub health: SocketAddr,
}

/// `frontends = { SITE = "ip:port" }`: one internal load balancer address in a site.
#[derive(Clone, Debug)]
pub struct DbFrontend {
    pub site: Name,
    pub address: SocketAddr,
}

/// `[[database]]`.
#[derive(Clone, Debug)]
pub struct Database {
    pub name: Name,
    pub engine: Engine,
    /// Default `sync`.
    pub replication: Replication,
    /// Async only: never promote a standby further behind, in bytes. Default 1 MB.
    pub max_lag_on_failover: u64,
    /// Default 3 s.
    pub failover_timeout: Duration,
    /// Internal load balancer address per site, always pointing at the primary.
    pub frontends: Vec<DbFrontend>,
    pub members: Vec<Member>,
    /// Where PostgreSQL's programs are; default from `pg_config --bindir`.
    pub bin_dir: Option<PathBuf>,
    /// A former primary whose `pg_rewind` fails: cloned afresh (default) or left stopped.
    pub rewind_failure: RewindFailure,
    /// `[database.backup]`: base backups and a continuous WAL archive with pgBackRest.
    pub backup: Option<Backup>,
}

/// `[database.backup]`: pgBackRest base backups, continuous WAL archiving from whichever
/// member is primary, and restore drills.
#[derive(Clone, Debug, PartialEq)]
pub struct Backup {
    /// The pgBackRest repository (`repo1-path`): a directory that must exist and be writable
    /// by the database user. Relative paths are relative to Tandem's working directory, as
    /// `state_dir` is.
    pub repository: PathBuf,
    /// How often a full backup is taken (`"weekly"`, `"daily"`, `"hourly"` or a duration of at
    /// least 1 minute; `"never"`: only on request). Default weekly.
    pub full: Option<Duration>,
    /// How often a differential backup is taken between full ones. Default never.
    pub differential: Option<Duration>,
    /// PostgreSQL's `archive_timeout`: a WAL segment with any write in it is archived at least
    /// this often, the RPO bound when no standby survives. Default 60 s, from 1 s to 1 h.
    pub archive_timeout: Duration,
    /// Full backups kept (`repo1-retention-full`), with the differentials and WAL they need.
    /// Default 2, from 1 to 100.
    pub retention_full: u32,
    /// How often a restore drill runs by itself. Default never (on request only).
    pub drill: Option<Duration>,
    /// The table whose rows a restore drill counts (`"schema.table"` or `"table"`).
    pub drill_table: Option<String>,
}

/// A schedule: `"hourly"`, `"daily"`, `"weekly"`, a duration (at least 1 minute), or `"never"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Every(pub Option<Duration>);

choice! {
    /// What happens to a former primary that `pg_rewind` cannot bring back.
    RewindFailure { Clone = "clone", Stop = "stop" }
}

choice! {
    /// How ready the standby site is.
    Standby { Hot = "hot", Warm = "warm", Cold = "cold" }
}

choice! {
    /// Whether traffic returns to the preferred site by itself.
    Failback { Automatic = "automatic", Manual = "manual" }
}

choice! {
    /// What an app does when its database fails over on its own: follow its data to the new
    /// primary's site, or keep its compute and DNS where they are.
    Follow { Data = "data", None = "none" }
}

/// `[[app]]`: the failover unit.
#[derive(Clone, Debug)]
pub struct App {
    pub name: Name,
    /// Sites in order of preference.
    pub sites: Vec<Name>,
    pub profile: Name,
    pub database: Option<Name>,
    pub scale_sets: Vec<Name>,
    /// Default `hot`.
    pub standby: Standby,
    /// Default `automatic`.
    pub failback: Failback,
    /// Default `data`.
    pub follow: Follow,
}

impl Database {
    /// The internal load balancers its `frontends` stand for, named `DATABASE@SITE`: TCP,
    /// pool = the current primary, flows reset when it goes, pooled connections may idle an hour.
    pub fn frontend_balancers(&self) -> Vec<LoadBalancer> {
        self.frontends
            .iter()
            .map(|f| LoadBalancer {
                name: Name::new(format!("{}@{}", self.name, f.site), self.name.span()),
                site: f.site.clone(),
                kind: LbKind::Internal,
                frontend: f.address,
                protocol: LbProtocol::Tcp,
                pool: Pool::Database {
                    database: self.name.clone(),
                    role: DbRole::Primary,
                },
                probe: None,
                distribution: Distribution::FiveTuple,
                idle_timeout: Duration::from_secs(3600),
                idle_reset: false,
                drain_timeout: Duration::ZERO,
                connect_timeout: Duration::from_secs(2),
                on_backend_down: OnBackendDown::Reset,
                all_down: LbAllDown::Refuse,
                proxy_protocol: false,
                rules: Vec::new(),
            })
            .collect()
    }
}
