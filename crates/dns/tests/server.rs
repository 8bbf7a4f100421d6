//! The authoritative server over real UDP and TCP sockets, queried with hickory-built messages:
//! the protocol behaviour and every routing method.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dns::manager::Manager;
use dns::rrl::Limiter;
use dns::server::{Server, TcpLimits};
use dns::table::HealthView;
use health::Status;
use hickory_proto::op::{Edns, Message, Query, ResponseCode};
use hickory_proto::rr::rdata::opt::{ClientSubnet, EdnsOption};
use hickory_proto::rr::{Name, RData, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Health the test sets directly: routing is pure logic over it.
#[derive(Default)]
struct Health {
    status: Mutex<HashMap<String, Status>>,
    latency: Mutex<HashMap<String, Duration>>,
}

impl Health {
    fn set(&self, profile: &str, endpoint: &str, s: Status) {
        self.status
            .lock()
            .unwrap()
            .insert(health::endpoint_id(profile, endpoint), s);
    }
}

impl HealthView for Health {
    fn status(&self, target: &str) -> Option<Status> {
        self.status.lock().unwrap().get(target).copied()
    }
    fn latency(&self, target: &str) -> Option<Duration> {
        self.latency.lock().unwrap().get(target).copied()
    }
}

const ZONE: &str = r#"
[dns]
listen = ["127.0.0.1:0"]
[[dns.zone]]
name = "shop.test"
nameservers = ["ns1.shop.test", "ns2.shop.test"]
hostmaster = "hostmaster.shop.test"
negative_ttl = "15s"

[[monitor]]
name = "web"
protocol = "tcp"
port = 80
"#;

struct Fixture {
    health: Arc<Health>,
    manager: Arc<Manager>,
    server: Server,
}

fn topology(text: &str) -> model::Topology {
    match model::parse(model::Source::new("test.toml", text)) {
        Ok(t) => t,
        Err(d) => panic!("{}", d.render()),
    }
}

impl Fixture {
    fn new(profiles: &str) -> Self {
        Self::from_topology(topology(&format!("{ZONE}\n{profiles}")))
    }

    /// A server for a topology built in the test, which `validate` may not have let through.
    fn from_topology(topology: model::Topology) -> Self {
        Self::with_rrl(topology, 1, None)
    }

    /// A server with `udp_threads` UDP sockets and, given a limiter, response-rate limiting.
    fn with_rrl(topology: model::Topology, udp_threads: usize, rrl: Option<Limiter>) -> Self {
        let topology = Arc::new(topology);
        let health = Arc::new(Health::default());
        let manager = Manager::new(topology, health.clone()).unwrap();
        let server = Server::start_with(
            &["127.0.0.1:0".parse().unwrap()],
            manager.tables(),
            manager.metrics.clone(),
            udp_threads,
            TcpLimits::default(),
            rrl,
        )
        .unwrap();
        Fixture {
            health,
            manager,
            server,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.server.addrs[0]
    }

    fn set(&self, profile: &str, endpoint: &str, s: Status) {
        self.health.set(profile, endpoint, s);
        self.manager.rebuild(tokio::time::Instant::now());
    }

    fn udp(&self, msg: &Message) -> Message {
        Message::from_vec(&self.udp_raw(&msg.to_vec().unwrap()).unwrap()).unwrap()
    }

    fn udp_raw(&self, bytes: &[u8]) -> Option<Vec<u8>> {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s.send_to(bytes, self.addr()).unwrap();
        let mut buf = [0u8; 65535];
        let n = s.recv(&mut buf).ok()?;
        Some(buf[..n].to_vec())
    }

    async fn tcp(&self, msg: &Message) -> Message {
        let s = tokio::net::TcpStream::connect(self.addr()).await.unwrap();
        Message::from_vec(&exchange(s, &msg.to_vec().unwrap()).await.unwrap()).unwrap()
    }

    /// One query over a new TCP connection from a chosen loopback address; `None` when the
    /// server closes the connection instead of answering.
    async fn tcp_from(&self, source: &str, bytes: &[u8]) -> Option<Vec<u8>> {
        exchange(connect_from(source, self.addr()).await, bytes).await
    }

    /// The addresses answered for `name`, sorted, from a client in `subnet` (ECS) if given.
    fn ask(&self, name: &str, rtype: RecordType, subnet: Option<&str>) -> Vec<String> {
        let mut q = query(name, rtype);
        if let Some(net) = subnet {
            let mut edns = Edns::new();
            edns.set_max_payload(1232);
            let cs: ClientSubnet = net.parse().unwrap();
            edns.options_mut().insert(EdnsOption::Subnet(cs));
            q.set_edns(edns);
        }
        let r = self.udp(&q);
        assert_eq!(r.metadata.response_code, ResponseCode::NoError, "{name}");
        let mut out: Vec<String> = r.answers.iter().map(|a| rdata_text(&a.data)).collect();
        out.sort();
        out
    }
}

impl Fixture {
    /// The ECS option echoed for a query from `subnet`: (source prefix, scope prefix).
    fn ecs_echo(&self, name: &str, subnet: &str) -> (u8, u8) {
        let mut q = query(name, RecordType::A);
        let mut edns = Edns::new();
        edns.options_mut()
            .insert(EdnsOption::Subnet(subnet.parse().unwrap()));
        q.set_edns(edns);
        let r = self.udp(&q);
        let Some(EdnsOption::Subnet(echo)) = r
            .edns
            .as_ref()
            .unwrap()
            .option(hickory_proto::rr::rdata::opt::EdnsCode::Subnet)
        else {
            panic!("no ECS echoed for {name}")
        };
        (echo.source_prefix(), echo.scope_prefix())
    }
}

/// One length-prefixed query and its answer over a TCP connection.
async fn exchange(mut s: tokio::net::TcpStream, bytes: &[u8]) -> Option<Vec<u8>> {
    s.write_all(&(bytes.len() as u16).to_be_bytes())
        .await
        .ok()?;
    s.write_all(bytes).await.ok()?;
    let mut len = [0u8; 2];
    s.read_exact(&mut len).await.ok()?;
    let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
    s.read_exact(&mut buf).await.ok()?;
    Some(buf)
}

/// A TCP connection to `server` from a loopback address of the test's choosing.
async fn connect_from(source: &str, server: SocketAddr) -> tokio::net::TcpStream {
    let s = tokio::net::TcpSocket::new_v4().unwrap();
    s.bind(format!("{source}:0").parse().unwrap()).unwrap();
    s.connect(server).await.unwrap()
}

fn query(name: &str, rtype: RecordType) -> Message {
    let mut m = Message::query();
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
    m
}

fn rdata_text(d: &RData) -> String {
    match d {
        RData::A(a) => a.to_string(),
        RData::AAAA(a) => a.to_string(),
        RData::CNAME(c) => format!("cname {}", c.0),
        other => format!("{other:?}"),
    }
}

const PRIORITY: &str = r#"
[[profile]]
name = "www"
domain = "www.shop.test"
routing = "priority"
monitor = "web"
ttl = "5s"
failback_hold = "30s"
  [[profile.endpoint]]
  name = "edge"
  target = { address = "10.0.1.10" }
  priority = 1
  [[profile.endpoint]]
  name = "region"
  target = { address = "10.0.2.10" }
  priority = 2
"#;

#[tokio::test]
async fn authoritative_answers_with_the_question_echoed() {
    let f = Fixture::new(PRIORITY);
    let r = f.udp(&query("WwW.sHoP.tEsT.", RecordType::A));
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    assert!(r.metadata.authoritative);
    assert!(!r.metadata.recursion_available);
    assert_eq!(
        r.queries[0].name().to_string(),
        "WwW.sHoP.tEsT.",
        "0x20 case kept"
    );
    assert_eq!(r.answers.len(), 1);
    assert_eq!(r.answers[0].ttl, 5);
    assert_eq!(rdata_text(&r.answers[0].data), "10.0.1.10");
    let t = f.tcp(&query("www.shop.test.", RecordType::A)).await;
    assert_eq!(rdata_text(&t.answers[0].data), "10.0.1.10");
}

#[tokio::test]
async fn negative_answers_carry_the_soa() {
    let f = Fixture::new(PRIORITY);
    let nx = f.udp(&query("nope.shop.test.", RecordType::A));
    assert_eq!(nx.metadata.response_code, ResponseCode::NXDomain);
    assert!(nx.metadata.authoritative);
    assert!(nx.answers.is_empty());
    assert_eq!(nx.authorities.len(), 1);
    let soa = &nx.authorities[0];
    assert_eq!(soa.name.to_string(), "shop.test.");
    assert_eq!(soa.ttl, 15, "negative TTL");
    let RData::SOA(s) = &soa.data else {
        panic!("not an SOA")
    };
    assert_eq!(s.mname.to_string(), "ns1.shop.test.");
    assert_eq!(s.minimum, 15);

    let nodata = f.udp(&query("www.shop.test.", RecordType::AAAA));
    assert_eq!(nodata.metadata.response_code, ResponseCode::NoError);
    assert!(nodata.answers.is_empty());
    assert_eq!(nodata.authorities[0].record_type(), RecordType::SOA);

    let apex = f.udp(&query("shop.test.", RecordType::NS));
    let mut ns: Vec<String> = apex
        .answers
        .iter()
        .map(|a| format!("{:?}", a.data))
        .collect();
    ns.sort();
    assert_eq!(ns.len(), 2);
    assert!(ns[0].contains("ns1.shop.test"), "{ns:?}");
    let soa = f.udp(&query("shop.test.", RecordType::SOA));
    assert_eq!(soa.answers[0].record_type(), RecordType::SOA);
}

#[tokio::test]
async fn refuses_names_outside_its_zones_and_bad_classes() {
    let f = Fixture::new(PRIORITY);
    let r = f.udp(&query("example.com.", RecordType::A));
    assert_eq!(r.metadata.response_code, ResponseCode::Refused);
    assert!(r.answers.is_empty());
    let r = f.udp(&query("shopXtest.", RecordType::A));
    assert_eq!(r.metadata.response_code, ResponseCode::Refused);
    let mut chaos = query("www.shop.test.", RecordType::A);
    chaos.queries[0].set_query_class(hickory_proto::rr::DNSClass::CH);
    assert_eq!(f.udp(&chaos).metadata.response_code, ResponseCode::Refused);
}

#[tokio::test]
async fn garbage_gets_formerr_or_silence_and_the_server_keeps_answering() {
    let f = Fixture::new(PRIORITY);
    // A header claiming one question, followed by junk.
    let mut junk = vec![0xab, 0xcd, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    junk.extend_from_slice(&[0xff; 20]);
    let r = Message::from_vec(&f.udp_raw(&junk).unwrap()).unwrap();
    assert_eq!(r.metadata.id, 0xabcd);
    assert_eq!(r.metadata.response_code, ResponseCode::FormErr);
    // Too short to be a query: dropped. The first reply on the socket is the next query's.
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    s.send_to(&[1, 2, 3], f.addr()).unwrap();
    let next = query("www.shop.test.", RecordType::A);
    s.send_to(&next.to_vec().unwrap(), f.addr()).unwrap();
    let mut buf = [0u8; 512];
    let n = s.recv(&mut buf).unwrap();
    assert_eq!(
        Message::from_vec(&buf[..n]).unwrap().metadata.id,
        next.metadata.id
    );
    // An update (opcode 5): NOTIMP.
    let mut update = query("www.shop.test.", RecordType::A).to_vec().unwrap();
    update[2] = 0x28;
    let r = Message::from_vec(&f.udp_raw(&update).unwrap()).unwrap();
    assert_eq!(r.metadata.response_code, ResponseCode::NotImp);
    assert_eq!(f.ask("www.shop.test.", RecordType::A, None), ["10.0.1.10"]);
}

#[tokio::test]
async fn edns_version_1_gets_badvers() {
    let f = Fixture::new(PRIORITY);
    let mut q = query("www.shop.test.", RecordType::A);
    let mut edns = Edns::new();
    edns.set_version(1);
    q.set_edns(edns);
    let r = f.udp(&q);
    // Extended rcode 16 is BADVERS (hickory decodes the shared number as BADSIG).
    assert_eq!(u16::from(r.metadata.response_code), 16);
}

fn multivalue(n: usize) -> String {
    let mut s = String::from(
        "[[profile]]\nname = \"many\"\ndomain = \"many.shop.test\"\nrouting = \"multivalue\"\nmax_answers = 32\n",
    );
    for i in 0..n {
        s.push_str(&format!(
            "  [[profile.endpoint]]\n  name = \"e{i}\"\n  target = {{ address = \"2001:db8::{:x}\" }}\n",
            i + 1
        ));
    }
    s
}

#[tokio::test]
async fn large_answers_truncate_over_udp_and_come_whole_over_tcp() {
    let f = Fixture::new(&multivalue(32));
    // 32 AAAA records do not fit in 512 bytes: TC, no answers.
    let r = f.udp(&query("many.shop.test.", RecordType::AAAA));
    assert!(r.metadata.truncation);
    assert!(r.answers.is_empty());
    // The client's EDNS buffer is honoured: 1232 bytes hold them.
    let mut big = query("many.shop.test.", RecordType::AAAA);
    let mut edns = Edns::new();
    edns.set_max_payload(1232);
    big.set_edns(edns);
    let r = f.udp(&big);
    assert!(!r.metadata.truncation);
    assert_eq!(r.answers.len(), 32);
    assert_eq!(r.edns.as_ref().unwrap().max_payload(), 1232);
    // TCP has no such limit.
    let r = f.tcp(&query("many.shop.test.", RecordType::AAAA)).await;
    assert!(!r.metadata.truncation);
    assert_eq!(r.answers.len(), 32);
}

#[tokio::test]
async fn priority_fails_over_at_once_and_answers_checking_endpoints() {
    let f = Fixture::new(PRIORITY);
    // Nothing probed yet: CheckingEndpoint is answered.
    assert_eq!(f.ask("www.shop.test.", RecordType::A, None), ["10.0.1.10"]);
    f.set("www", "edge", Status::Online);
    f.set("www", "region", Status::Online);
    f.set("www", "edge", Status::Degraded);
    assert_eq!(f.ask("www.shop.test.", RecordType::A, None), ["10.0.2.10"]);
    // Back Online: held (30 s) before traffic returns.
    f.set("www", "edge", Status::Online);
    assert_eq!(f.ask("www.shop.test.", RecordType::A, None), ["10.0.2.10"]);
    // The operator disables the region: no hold for a failover.
    f.manager.set_enabled("www", "region", false).unwrap();
    assert_eq!(f.ask("www.shop.test.", RecordType::A, None), ["10.0.1.10"]);
}

/// An app's active site: only that site's endpoints (and endpoints of no site) are answered,
/// whatever the routing would pick; with all of them down, serve-all stays inside the site.
#[tokio::test]
async fn an_apps_active_site_is_the_only_one_answered() {
    let sites = r#"
[[site]]
name = "edge"
role = "edge"
[[site]]
name = "region"
role = "region"
"#;
    let f = Fixture::new(&format!(
        r#"{sites}
[[profile]]
name = "www"
domain = "www.shop.test"
routing = "multivalue"
monitor = "web"
  [[profile.endpoint]]
  name = "edge-a"
  target = {{ address = "10.0.1.10" }}
  site = "edge"
  [[profile.endpoint]]
  name = "edge-b"
  target = {{ address = "10.0.1.11" }}
  site = "edge"
  [[profile.endpoint]]
  name = "region"
  target = {{ address = "10.0.2.10" }}
  site = "region"
  [[profile.endpoint]]
  name = "anywhere"
  target = {{ address = "10.0.9.10" }}
{}"#,
        PRIORITY
            .replace("name = \"www\"", "name = \"api\"")
            .replace("www.shop.test", "api.shop.test")
            .replace(
                "target = { address = \"10.0.1.10\" }",
                "target = { address = \"10.0.1.10\" }\n  site = \"edge\""
            )
            .replace(
                "target = { address = \"10.0.2.10\" }",
                "target = { address = \"10.0.2.10\" }\n  site = \"region\""
            )
    ));
    let mut events = f.manager.events();
    for e in ["edge-a", "edge-b", "region", "anywhere"] {
        f.set("www", e, Status::Online);
    }
    let all = ["10.0.1.10", "10.0.1.11", "10.0.2.10", "10.0.9.10"];
    assert_eq!(f.ask("www.shop.test.", RecordType::A, None), all);
    f.manager.set_active_site("www", Some("region")).unwrap();
    assert_eq!(
        f.ask("www.shop.test.", RecordType::A, None),
        ["10.0.2.10", "10.0.9.10"]
    );
    let e = events.try_recv().unwrap();
    assert!(
        e.message.ends_with("the app is active at region"),
        "{}",
        e.message
    );
    // Everything of the active site down: serve-all answers it, never the other site.
    f.set("www", "region", Status::Degraded);
    f.set("www", "anywhere", Status::Degraded);
    assert_eq!(
        f.ask("www.shop.test.", RecordType::A, None),
        ["10.0.2.10", "10.0.9.10"]
    );
    f.manager.set_active_site("www", None).unwrap();
    assert_eq!(
        f.ask("www.shop.test.", RecordType::A, None),
        ["10.0.1.10", "10.0.1.11"]
    );

    // Priority: the active site's endpoint even while a better one elsewhere is Online, and
    // the best one of the site again as soon as the app comes back.
    f.set("api", "edge", Status::Online);
    f.set("api", "region", Status::Online);
    assert_eq!(f.ask("api.shop.test.", RecordType::A, None), ["10.0.1.10"]);
    f.manager.set_active_site("api", Some("region")).unwrap();
    assert_eq!(f.ask("api.shop.test.", RecordType::A, None), ["10.0.2.10"]);
    f.manager.set_active_site("api", Some("edge")).unwrap();
    assert_eq!(f.ask("api.shop.test.", RecordType::A, None), ["10.0.1.10"]);
    assert!(f.manager.set_active_site("nope", Some("edge")).is_err());
}

#[tokio::test]
async fn all_down_behaviours() {
    for (mode, expect) in [
        ("serve-all", Some("10.0.1.10")),
        ("nodata", None),
        ("servfail", None),
    ] {
        let f = Fixture::new(&PRIORITY.replace(
            "ttl = \"5s\"",
            &format!("ttl = \"5s\"\nall_down = \"{mode}\""),
        ));
        f.set("www", "edge", Status::Degraded);
        f.set("www", "region", Status::Degraded);
        let r = f.udp(&query("www.shop.test.", RecordType::A));
        match (mode, expect) {
            ("servfail", _) => assert_eq!(r.metadata.response_code, ResponseCode::ServFail),
            (_, Some(ip)) => assert_eq!(rdata_text(&r.answers[0].data), ip),
            _ => {
                assert_eq!(r.metadata.response_code, ResponseCode::NoError);
                assert!(r.answers.is_empty());
                assert_eq!(r.authorities[0].record_type(), RecordType::SOA);
            }
        }
        let view = &f.manager.views()[0];
        assert!(view.all_down, "{mode}");
    }
}

#[tokio::test]
async fn weighted_splits_by_weight_and_uses_weight_zero_only_as_backup() {
    let f = Fixture::new(
        r#"
[[profile]]
name = "split"
domain = "split.shop.test"
routing = "weighted"
monitor = "web"
  [[profile.endpoint]]
  name = "a"
  target = { address = "10.0.0.1" }
  weight = 1
  [[profile.endpoint]]
  name = "b"
  target = { address = "10.0.0.2" }
  weight = 3
  [[profile.endpoint]]
  name = "backup"
  target = { address = "10.0.0.9" }
  weight = 0
"#,
    );
    let mut counts: HashMap<String, u32> = HashMap::new();
    for _ in 0..2000 {
        for ip in f.ask("split.shop.test.", RecordType::A, None) {
            *counts.entry(ip).or_default() += 1;
        }
    }
    let b = counts["10.0.0.2"];
    // Expect 1500 of 2000; binomial sd ≈ 19, so ±120 is over 6 sd.
    assert!((1380..=1620).contains(&b), "{counts:?}");
    assert!(
        !counts.contains_key("10.0.0.9"),
        "weight 0 unused while others are up"
    );
    f.set("split", "a", Status::Degraded);
    f.set("split", "b", Status::Degraded);
    assert_eq!(f.ask("split.shop.test.", RecordType::A, None), ["10.0.0.9"]);
}

#[tokio::test]
async fn multivalue_answers_available_addresses_up_to_the_limit() {
    let f = Fixture::new(
        r#"
[[profile]]
name = "mv"
domain = "mv.shop.test"
routing = "multivalue"
monitor = "web"
max_answers = 2
  [[profile.endpoint]]
  name = "a"
  target = { address = "10.0.0.1" }
  [[profile.endpoint]]
  name = "b"
  target = { address = "10.0.0.2" }
  [[profile.endpoint]]
  name = "c"
  target = { address = "10.0.0.3" }
  [[profile.endpoint]]
  name = "v6"
  target = { address = "2001:db8::1" }
"#,
    );
    assert_eq!(
        f.ask("mv.shop.test.", RecordType::A, None),
        ["10.0.0.1", "10.0.0.2"]
    );
    f.set("mv", "a", Status::Degraded);
    assert_eq!(
        f.ask("mv.shop.test.", RecordType::A, None),
        ["10.0.0.2", "10.0.0.3"]
    );
    assert_eq!(
        f.ask("mv.shop.test.", RecordType::AAAA, None),
        ["2001:db8::1"]
    );
}

#[tokio::test]
async fn subnet_routing_uses_ecs_else_the_resolver_and_echoes_the_scope() {
    let f = Fixture::new(
        r#"
[[profile]]
name = "nets"
domain = "nets.shop.test"
routing = "subnet"
monitor = "web"
  [[profile.endpoint]]
  name = "wide"
  target = { address = "10.0.0.1" }
  subnets = ["198.51.0.0/16"]
  [[profile.endpoint]]
  name = "narrow"
  target = { address = "10.0.0.2" }
  subnets = ["198.51.100.0/24"]
  [[profile.endpoint]]
  name = "local"
  target = { address = "10.0.0.3" }
  subnets = ["127.0.0.0/8"]
  [[profile.endpoint]]
  name = "rest"
  target = { cname = "fallback.example.net" }
"#,
    );
    let ask = |net| f.ask("nets.shop.test.", RecordType::A, net);
    assert_eq!(ask(Some("198.51.100.0/24")), ["10.0.0.2"], "longest prefix");
    assert_eq!(ask(Some("198.51.7.0/24")), ["10.0.0.1"]);
    assert_eq!(
        ask(None),
        ["10.0.0.3"],
        "the resolver's own address without ECS"
    );
    assert_eq!(ask(Some("203.0.113.0/24")), ["cname fallback.example.net."]);
    f.set("nets", "narrow", Status::Degraded);
    assert_eq!(
        ask(Some("198.51.100.0/24")),
        ["10.0.0.1"],
        "next match when down"
    );

    // The scope echoed is the source prefix: the answer depended on all of it.
    assert_eq!(f.ecs_echo("nets.shop.test.", "198.51.100.0/24"), (24, 24));
}

#[tokio::test]
async fn an_answer_that_does_not_depend_on_the_client_has_scope_zero() {
    // RFC 7871 §7.2.1: scope 0 lets a resolver cache the answer for every client.
    let f = Fixture::new(PRIORITY);
    assert_eq!(f.ecs_echo("www.shop.test.", "198.51.100.0/24"), (24, 0));
}

const AREAS: &str = r#"
[[geo.area]]
name = "eu"
subnets = ["192.0.2.0/24"]
location = { lat = 50.1, lon = 8.7 }
[[geo.area]]
name = "us"
subnets = ["198.51.100.0/24"]
location = { lat = 40.7, lon = -74.0 }
"#;

const SITES: &str = r#"
[[site]]
name = "frankfurt"
role = "edge"
location = { lat = 50.1, lon = 8.6 }
[[site]]
name = "newyork"
role = "edge"
location = { lat = 40.7, lon = -74.1 }
"#;

/// A performance profile over one endpoint in each site.
const FAST: &str = r#"
[[profile]]
name = "fast"
domain = "fast.shop.test"
routing = "performance"
monitor = "web"
  [[profile.endpoint]]
  name = "fra"
  target = { address = "10.0.0.1" }
  site = "frankfurt"
  [[profile.endpoint]]
  name = "nyc"
  target = { address = "10.0.0.2" }
  site = "newyork"
"#;

#[tokio::test]
async fn geographic_routing_fails_over_to_the_areas_next_choice() {
    let f = Fixture::new(&format!(
        r#"{AREAS}
[[profile]]
name = "geo"
domain = "geo.shop.test"
routing = "geographic"
monitor = "web"
geo = {{ eu = ["fra", "nyc"], us = ["nyc", "fra"], "*" = ["nyc"] }}
  [[profile.endpoint]]
  name = "fra"
  target = {{ address = "10.0.0.1" }}
  [[profile.endpoint]]
  name = "nyc"
  target = {{ address = "10.0.0.2" }}
"#
    ));
    let ask = |net| f.ask("geo.shop.test.", RecordType::A, Some(net));
    assert_eq!(ask("192.0.2.0/24"), ["10.0.0.1"]);
    assert_eq!(ask("198.51.100.0/24"), ["10.0.0.2"]);
    assert_eq!(ask("203.0.113.0/24"), ["10.0.0.2"], "everyone else");
    f.set("geo", "fra", Status::Degraded);
    assert_eq!(ask("192.0.2.0/24"), ["10.0.0.2"], "eu does not go dark");
    // The answer depended on where the client is: the scope is the whole source prefix.
    assert_eq!(f.ecs_echo("geo.shop.test.", "192.0.2.0/24"), (24, 24));
    assert_eq!(f.ecs_echo("geo.shop.test.", "203.0.113.0/24"), (24, 24));
}

#[tokio::test]
async fn performance_routing_picks_the_nearest_site_else_the_fastest_probe() {
    let f = Fixture::new(&format!("{AREAS}{SITES}{FAST}"));
    f.health.latency.lock().unwrap().insert(
        health::endpoint_id("fast", "fra"),
        Duration::from_millis(40),
    );
    f.health
        .latency
        .lock()
        .unwrap()
        .insert(health::endpoint_id("fast", "nyc"), Duration::from_millis(3));
    f.manager.rebuild(tokio::time::Instant::now());
    let ask = |net| f.ask("fast.shop.test.", RecordType::A, Some(net));
    assert_eq!(ask("192.0.2.0/24"), ["10.0.0.1"], "eu client: Frankfurt");
    assert_eq!(ask("198.51.100.0/24"), ["10.0.0.2"], "us client: New York");
    assert_eq!(
        ask("203.0.113.0/24"),
        ["10.0.0.2"],
        "unknown location: fastest probe"
    );
    f.set("fast", "fra", Status::Degraded);
    assert_eq!(ask("192.0.2.0/24"), ["10.0.0.2"]);
    assert_eq!(f.ecs_echo("fast.shop.test.", "192.0.2.0/24"), (24, 24));
}

#[tokio::test]
async fn nested_profiles_need_min_child_ipv4_and_ipv6() {
    let f = Fixture::new(
        r#"
[[profile]]
name = "top"
domain = "dual.shop.test"
routing = "priority"
  [[profile.endpoint]]
  name = "edge-pool"
  target = { profile = "edge" }
  priority = 1
  min_child_ipv4 = 1
  min_child_ipv6 = 1
  [[profile.endpoint]]
  name = "region"
  target = { address = "10.0.2.1" }
  priority = 2

[[profile]]
name = "edge"
domain = "edge.dual.shop.test"
routing = "multivalue"
monitor = "web"
  [[profile.endpoint]]
  name = "v4"
  target = { address = "10.0.1.1" }
  [[profile.endpoint]]
  name = "v6"
  target = { address = "2001:db8::1" }
"#,
    );
    let ask = |t| f.ask("dual.shop.test.", t, None);
    assert_eq!(ask(RecordType::A), ["10.0.1.1"]);
    assert_eq!(ask(RecordType::AAAA), ["2001:db8::1"]);
    f.set("edge", "v6", Status::Degraded);
    assert_eq!(
        ask(RecordType::A),
        ["10.0.2.1"],
        "no IPv6 endpoint left is below min_child_ipv6 = 1, even for A"
    );
    f.set("edge", "v6", Status::Online);
    f.set("edge", "v4", Status::Degraded);
    assert_eq!(
        ask(RecordType::A),
        ["10.0.2.1"],
        "no IPv4 endpoint left is below min_child_ipv4 = 1"
    );
    assert!(ask(RecordType::AAAA).is_empty(), "the region has no IPv6");
}

#[tokio::test]
async fn nested_profiles_answer_through_and_need_min_child_endpoints() {
    let f = Fixture::new(
        r#"
[[profile]]
name = "top"
domain = "app.shop.test"
routing = "priority"
  [[profile.endpoint]]
  name = "edge-pool"
  target = { profile = "edge" }
  priority = 1
  min_child_endpoints = 2
  [[profile.endpoint]]
  name = "region"
  target = { address = "10.0.2.1" }
  priority = 2

[[profile]]
name = "edge"
domain = "edge.app.shop.test"
routing = "multivalue"
monitor = "web"
  [[profile.endpoint]]
  name = "a"
  target = { address = "10.0.1.1" }
  [[profile.endpoint]]
  name = "b"
  target = { address = "10.0.1.2" }
  [[profile.endpoint]]
  name = "c"
  target = { address = "10.0.1.3" }
"#,
    );
    assert_eq!(
        f.ask("app.shop.test.", RecordType::A, None),
        ["10.0.1.1", "10.0.1.2", "10.0.1.3"]
    );
    f.set("edge", "a", Status::Degraded);
    assert_eq!(
        f.ask("app.shop.test.", RecordType::A, None),
        ["10.0.1.2", "10.0.1.3"]
    );
    f.set("edge", "b", Status::Degraded);
    assert_eq!(
        f.ask("app.shop.test.", RecordType::A, None),
        ["10.0.2.1"],
        "one child left is below min_child_endpoints = 2"
    );
    // An empty non-terminal between apex and names is NODATA, not NXDOMAIN.
    let r = f.udp(&query("app.shop.test.", RecordType::TXT));
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
}

#[tokio::test]
async fn views_show_states_and_answers() {
    let f = Fixture::new(PRIORITY);
    f.set("www", "edge", Status::Degraded);
    let v = &f.manager.views()[0];
    assert_eq!(v.answer, ["A 10.0.2.10"]);
    assert_eq!(v.endpoints[0].status, Status::Degraded);
    assert!(!v.endpoints[0].answered);
    assert!(v.endpoints[1].answered);
}

/// The manager on virtual time: failover is immediate, failback waits for the hold, and a
/// primary flapping every few seconds for two minutes moves traffic back at most once per hold.
#[tokio::test]
async fn failback_waits_for_the_hold_and_flapping_moves_at_most_once_per_hold() {
    let f = Fixture::new(PRIORITY);
    let mut events = f.manager.events();
    let t0 = tokio::time::Instant::now();
    let at = |s: u64| t0 + Duration::from_secs(s);
    let answer = |f: &Fixture| f.manager.views()[0].answer.clone();
    f.health.set("www", "edge", Status::Online);
    f.health.set("www", "region", Status::Online);
    f.manager.rebuild(at(0));
    assert_eq!(answer(&f), ["A 10.0.1.10"]);

    f.health.set("www", "edge", Status::Degraded);
    f.manager.rebuild(at(1));
    assert_eq!(answer(&f), ["A 10.0.2.10"], "failover at once");
    let e = events.try_recv().unwrap();
    assert_eq!((e.subject.as_str(), e.kind.as_str()), ("www", "answer"));
    assert_eq!(e.message, "edge -> region: edge Online -> Degraded");

    f.health.set("www", "edge", Status::Online);
    f.manager.rebuild(at(2));
    f.manager.rebuild(at(31));
    assert_eq!(answer(&f), ["A 10.0.2.10"], "29 s of a 30 s hold");
    f.manager.rebuild(at(32));
    assert_eq!(
        answer(&f),
        ["A 10.0.1.10"],
        "failback once the hold is over"
    );
    let e = events.try_recv().unwrap();
    assert_eq!(e.message, "region -> edge: failback hold ended");
    assert!(events.try_recv().is_err(), "one event per change of answer");

    // Flapping: down 2 s, up 5 s, for two minutes; rebuilt every second.
    let mut failbacks = Vec::new();
    let mut last = answer(&f);
    for s in 40..160u64 {
        let up = (s - 40) % 7 >= 2;
        f.health.set(
            "www",
            "edge",
            if up { Status::Online } else { Status::Degraded },
        );
        f.manager.rebuild(at(s));
        let now = answer(&f);
        if now != last && now == ["A 10.0.1.10"] {
            failbacks.push(s);
        }
        last = now;
    }
    assert!(
        failbacks.is_empty(),
        "a flapping edge never stays up for a hold: {failbacks:?}"
    );
    // Once it stays up, it gets the traffic back exactly one hold later.
    f.health.set("www", "edge", Status::Online);
    f.manager.rebuild(at(160));
    f.manager.rebuild(at(189));
    assert_eq!(answer(&f), ["A 10.0.2.10"]);
    f.manager.rebuild(at(190));
    assert_eq!(answer(&f), ["A 10.0.1.10"]);
}

/// A node following the cluster leader's failback decisions: it moves back only when the
/// leader says so; when the leader's endpoint fails here it fails over at once, and a stale
/// decision (a leader cut off, never deciding again) cannot bring traffic back before this
/// node's own hold; a new decision is followed at once.
#[tokio::test]
async fn a_follower_moves_back_when_the_leader_decides_and_never_on_a_stale_decision() {
    use dns::manager::Decision;
    let f = Fixture::new(PRIORITY);
    let t0 = tokio::time::Instant::now();
    let at = |s: u64| t0 + Duration::from_secs(s);
    let answer = |f: &Fixture| f.manager.views()[0].answer.clone();
    let follow = |f: &Fixture, endpoint: &str, revision: u64| {
        let d = Decision {
            endpoint: Some(endpoint.to_string()),
            revision,
        };
        f.manager
            .follow(Some([("www".to_string(), d)].into_iter().collect()));
    };
    let mut events = f.manager.events();
    f.health.set("www", "edge", Status::Online);
    f.health.set("www", "region", Status::Online);
    follow(&f, "region", 1);
    f.manager.rebuild(at(0));
    assert_eq!(
        answer(&f),
        ["A 10.0.2.10"],
        "the leader's choice, not the best"
    );
    follow(&f, "edge", 2);
    f.manager.rebuild(at(1));
    assert_eq!(
        answer(&f),
        ["A 10.0.1.10"],
        "the leader moved back: at once"
    );
    // The leader is cut off and keeps saying edge; edge fails here.
    f.health.set("www", "edge", Status::Degraded);
    f.manager.rebuild(at(2));
    assert_eq!(answer(&f), ["A 10.0.2.10"], "failover never waits");
    f.health.set("www", "edge", Status::Online);
    f.manager.rebuild(at(3));
    f.manager.rebuild(at(32));
    assert_eq!(
        answer(&f),
        ["A 10.0.2.10"],
        "a stale decision does not skip the hold"
    );
    f.manager.rebuild(at(33));
    assert_eq!(
        answer(&f),
        ["A 10.0.1.10"],
        "back after this node's own 30 s hold"
    );
    // A new leader decides: followed at once.
    f.health.set("www", "edge", Status::Degraded);
    f.manager.rebuild(at(40));
    follow(&f, "region", 3);
    f.health.set("www", "edge", Status::Online);
    f.manager.rebuild(at(41));
    assert_eq!(answer(&f), ["A 10.0.2.10"]);
    follow(&f, "edge", 4);
    f.manager.rebuild(at(42));
    assert_eq!(
        answer(&f),
        ["A 10.0.1.10"],
        "the leader's failback, before the local hold"
    );
    // Each move back says who made it.
    let mut backs = Vec::new();
    while let Ok(e) = events.try_recv() {
        if e.message.starts_with("region -> edge") {
            backs.push(e.message);
        }
    }
    assert_eq!(
        backs,
        [
            "region -> edge: the cluster leader's decision",
            "region -> edge: failback hold ended",
            "region -> edge: the cluster leader's decision",
        ]
    );
}

/// A MaxMind-format City database: 192.0.2.0/24 in Germany (Europe), 198.51.100.0/24 in the
/// United States (North America), each with coordinates.
fn city_database(dir: &std::path::Path) -> std::path::PathBuf {
    use maxminddb_writer::paths::IpAddrWithMask;
    #[derive(serde::Serialize)]
    struct Code {
        iso_code: &'static str,
    }
    #[derive(serde::Serialize)]
    struct Continent {
        code: &'static str,
    }
    #[derive(serde::Serialize)]
    struct Loc {
        latitude: f64,
        longitude: f64,
    }
    #[derive(serde::Serialize)]
    struct City {
        country: Code,
        continent: Continent,
        location: Loc,
    }
    let mut db = maxminddb_writer::Database::default();
    db.metadata.database_type = "GeoLite2-City".into();
    db.metadata.binary_format_major_version = 2;
    db.metadata.languages = vec!["en".into()];
    for (net, country, continent, lat, lon) in [
        ("192.0.2.0/24", "DE", "EU", 50.1, 8.7),
        ("198.51.100.0/24", "US", "NA", 40.7, -74.0),
    ] {
        let data = db
            .insert_value(City {
                country: Code { iso_code: country },
                continent: Continent { code: continent },
                location: Loc {
                    latitude: lat,
                    longitude: lon,
                },
            })
            .unwrap();
        db.insert_node(net.parse::<IpAddrWithMask>().unwrap(), data);
    }
    let path = dir.join("city.mmdb");
    db.write_to(std::fs::File::create(&path).unwrap()).unwrap();
    path
}

#[tokio::test]
async fn a_maxmind_database_gives_countries_continents_and_locations() {
    let dir = tempfile::tempdir().unwrap();
    let db = city_database(dir.path());
    let f = Fixture::new(&format!(
        r#"
[geo]
database = "{db}"

{SITES}
[[profile]]
name = "geo"
domain = "geo.shop.test"
routing = "geographic"
monitor = "web"
geo = {{ DE = ["fra", "nyc"], NA = ["nyc", "fra"], "*" = ["nyc"] }}
  [[profile.endpoint]]
  name = "fra"
  target = {{ address = "10.0.0.1" }}
  [[profile.endpoint]]
  name = "nyc"
  target = {{ address = "10.0.0.2" }}

{FAST}
"#,
        db = db.display()
    ));
    let geo = |net| f.ask("geo.shop.test.", RecordType::A, Some(net));
    assert_eq!(geo("192.0.2.0/24"), ["10.0.0.1"], "country DE");
    assert_eq!(geo("198.51.100.0/24"), ["10.0.0.2"], "continent NA");
    assert_eq!(geo("203.0.113.0/24"), ["10.0.0.2"], "not in the database");
    f.set("geo", "fra", Status::Degraded);
    assert_eq!(geo("192.0.2.0/24"), ["10.0.0.2"], "DE's next choice");
    let fast = |net| f.ask("fast.shop.test.", RecordType::A, Some(net));
    assert_eq!(fast("192.0.2.0/24"), ["10.0.0.1"], "nearest to Germany");
    assert_eq!(fast("198.51.100.0/24"), ["10.0.0.2"], "nearest to New York");
}

#[test]
fn an_unreadable_geo_database_is_a_clear_error() {
    let text = format!("{ZONE}\n[geo]\ndatabase = \"/nonexistent/city.mmdb\"\n");
    let t = Arc::new(model::parse(model::Source::new("t.toml", text.clone())).unwrap());
    let err = Manager::new(t, Arc::new(Health::default())).unwrap_err();
    assert!(
        err.starts_with("cannot read geo database /nonexistent/city.mmdb"),
        "{err}"
    );
    // A cluster node that serves no DNS only decides failback: it needs no geo database.
    let t = Arc::new(model::parse(model::Source::new("t.toml", text)).unwrap());
    let deciding = Manager::deciding(t, Arc::new(Health::default()));
    assert!(deciding.decisions().is_empty());
}

// ---------------------------------------------------------------- regressions (issue 13)

/// The header of a raw reply: ID, the two flag bytes, the four section counts.
fn header(r: &[u8]) -> (u16, u8, u8, [u16; 4]) {
    assert!(r.len() >= 12, "{r:?}");
    let count = |i: usize| u16::from_be_bytes([r[i], r[i + 1]]);
    (
        u16::from_be_bytes([r[0], r[1]]),
        r[2],
        r[3],
        [count(4), count(6), count(8), count(10)],
    )
}

const AA: u8 = 0x04;

/// Both transports' raw replies to one raw query.
async fn both(f: &Fixture, m: &[u8]) -> [Vec<u8>; 2] {
    [
        f.udp_raw(m).expect("a UDP reply"),
        f.tcp_from("127.0.0.1", m).await.expect("a TCP reply"),
    ]
}

const APEX_CNAME: &str = r#"
[dns]
listen = ["127.0.0.1:0"]
[[dns.zone]]
name = "shop.test"
nameservers = [{ name = "ns1.shop.test", address = "192.0.2.53" }]
hostmaster = "hostmaster.shop.test"
[[dns.zone]]
name = "mixed.test"
nameservers = ["ns1.shop.test"]
hostmaster = "hostmaster.shop.test"

[[profile]]
name = "apex"
domain = "shop.test"
routing = "priority"
  [[profile.endpoint]]
  name = "child"
  target = { profile = "child" }
  priority = 1

[[profile]]
name = "child"
domain = "cdn.shop.test"
routing = "priority"
  [[profile.endpoint]]
  name = "cdn"
  target = { address = "10.0.0.1" }
  priority = 1

[[profile]]
name = "mixed"
domain = "mixed.test"
routing = "weighted"
  [[profile.endpoint]]
  name = "origin"
  target = { address = "10.0.0.2" }
  [[profile.endpoint]]
  name = "cdn"
  target = { address = "10.0.0.3" }
"#;

/// Issue 13: a CNAME at a zone apex answered SOA and NS queries with the CNAME beside them.
/// `validate` refuses such a profile (E022, `cname_at_apex` fixture); should one reach the
/// tables anyway (here built past validation), the server never puts a CNAME beside other data
/// of its owner: not at the apex through a nested profile, nor through a weighted profile's
/// CNAME endpoint, for any type; below the apex the same CNAME is answered.
#[tokio::test]
async fn a_cname_never_shares_its_owner_with_other_data() {
    let mut t = topology(APEX_CNAME);
    t.profiles[1].endpoints[0].target = model::Target::Cname("shop.cdn.example".into());
    t.profiles[2].endpoints[1].target = model::Target::Cname("mixed.cdn.example".into());
    let f = Fixture::from_topology(t);

    let below = f.udp(&query("cdn.shop.test.", RecordType::A));
    let answers: Vec<String> = below.answers.iter().map(|a| rdata_text(&a.data)).collect();
    assert_eq!(answers, ["cname shop.cdn.example."]);

    for (name, qtype, expect) in [
        ("shop.test.", RecordType::SOA, &[RecordType::SOA][..]),
        ("shop.test.", RecordType::NS, &[RecordType::NS]),
        (
            "shop.test.",
            RecordType::ANY,
            &[RecordType::SOA, RecordType::NS],
        ),
        ("shop.test.", RecordType::A, &[]),
        ("shop.test.", RecordType::AAAA, &[]),
        ("mixed.test.", RecordType::SOA, &[RecordType::SOA]),
        ("mixed.test.", RecordType::NS, &[RecordType::NS]),
    ] {
        let r = f.udp(&query(name, qtype));
        assert_eq!(
            r.metadata.response_code,
            ResponseCode::NoError,
            "{name} {qtype}"
        );
        let types: Vec<RecordType> = r.answers.iter().map(|a| a.record_type()).collect();
        assert_eq!(types, expect, "{name} {qtype}");
    }
    // The weighted apex answers its address or, when the CNAME endpoint is picked, nothing.
    for _ in 0..100 {
        let r = f.udp(&query("mixed.test.", RecordType::A));
        let answers: Vec<String> = r.answers.iter().map(|a| rdata_text(&a.data)).collect();
        assert!(answers.is_empty() || answers == ["10.0.0.2"], "{answers:?}");
    }
}

/// Issue 13: NOTIMP copied RD. A query with an opcode Tandem does not implement gets NOTIMP
/// with its ID and opcode and nothing else of the query: no RD (NSD and gdnsd copy it), no AA,
/// TC, AD or CD, no section; over UDP and TCP, for every opcode but QUERY.
#[tokio::test]
async fn an_unknown_opcode_gets_notimp_with_no_flag_of_the_query() {
    let f = Fixture::new(PRIORITY);
    for opcode in [1u8, 2, 3, 4, 5, 6, 15] {
        let mut m = query("www.shop.test.", RecordType::A).to_vec().unwrap();
        m[2] = (opcode << 3) | 0x07; // AA, TC, RD
        m[3] = 0x30; // AD, CD
        for reply in both(&f, &m).await {
            let (id, flags, low, counts) = header(&reply);
            assert_eq!(id, u16::from_be_bytes([m[0], m[1]]));
            assert_eq!(
                flags,
                0x80 | (opcode << 3),
                "opcode {opcode}: QR and opcode only"
            );
            assert_eq!(low, 4, "opcode {opcode}: NOTIMP, no RA, AD or CD");
            assert_eq!(counts, [0; 4], "opcode {opcode}: no section");
            assert_eq!(reply.len(), 12);
        }
    }
}

/// Issue 13, neighbour: FORMERR to a standard query copies RD (RFC 1035 §4.1.1) and keeps the
/// opcode, and sets no other flag of the query.
#[tokio::test]
async fn formerr_copies_rd_and_nothing_else() {
    let f = Fixture::new(PRIORITY);
    for (rd, expect) in [(0x01, 0x81), (0x00, 0x80)] {
        let mut m = query("www.shop.test.", RecordType::A).to_vec().unwrap();
        m[5] = 2; // two questions
        m[2] = 0x06 | rd; // AA, TC
        m[3] = 0x30; // AD, CD
        for reply in both(&f, &m).await {
            let (_, flags, low, counts) = header(&reply);
            assert_eq!((flags, low, counts), (expect, 1, [0; 4]));
        }
    }
}

/// Issue 13: records outside the additional section were not checked, so a query holding an
/// OPT record (or any record) in its answer or authority section was answered. A query has
/// none there: FORMERR, as BIND answers, over UDP and TCP. The same OPT in the additional
/// section is EDNS and answered.
#[tokio::test]
async fn records_outside_the_additional_section_are_formerr() {
    let f = Fixture::new(PRIORITY);
    let base = query("www.shop.test.", RecordType::A).to_vec().unwrap();
    let a_record = [0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 30, 0, 4, 10, 0, 0, 1];
    let opt = [0, 0, 41, 0x04, 0xd0, 0, 0, 0, 0, 0, 0];
    for (count, record) in [
        (6, &a_record[..]),
        (8, &a_record[..]),
        (6, &opt[..]),
        (8, &opt[..]),
    ] {
        let mut m = base.clone();
        m[count + 1] = 1;
        m.extend_from_slice(record);
        for reply in both(&f, &m).await {
            let (id, flags, low, counts) = header(&reply);
            assert_eq!(id, u16::from_be_bytes([m[0], m[1]]));
            assert_eq!(low & 0x0f, 1, "FORMERR for a record counted at {count}");
            assert_eq!(flags & AA, 0);
            assert_eq!(counts, [0; 4]);
        }
    }
    let mut m = base.clone();
    m[11] = 1;
    m.extend_from_slice(&opt);
    let r = Message::from_vec(&f.udp_raw(&m).unwrap()).unwrap();
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    assert_eq!(rdata_text(&r.answers[0].data), "10.0.1.10");
    assert!(r.edns.is_some());
}

/// Issue 13: AXFR and IXFR got an empty NOERROR with the SOA. Tandem serves no zone
/// transfers: REFUSED over TCP and UDP, at the apex and below (as NSD, BIND and PowerDNS
/// answer when transfers are not allowed). The other meta-types, as BIND: the obsolete MAILB
/// and MAILA are NOTIMP, OPT, TKEY, TSIG and unassigned ones FORMERR; ANY is answered. The
/// question is echoed; AA is not set.
#[tokio::test]
async fn zone_transfers_are_refused_and_meta_types_not_answered() {
    let f = Fixture::new(PRIORITY);
    for (qtype, rcode) in [
        (252, 5),
        (251, 5),
        (253, 4),
        (254, 4),
        (41, 1),
        (128, 1),
        (200, 1),
        (249, 1),
        (250, 1),
    ] {
        for name in ["shop.test.", "www.shop.test.", "nope.shop.test."] {
            let m = query(name, RecordType::from(qtype)).to_vec().unwrap();
            for reply in both(&f, &m).await {
                let (_, flags, low, counts) = header(&reply);
                assert_eq!(low & 0x0f, rcode, "{name} type {qtype}");
                assert_eq!(flags & AA, 0, "{name} type {qtype}");
                assert_eq!(counts, [1, 0, 0, 0], "{name} type {qtype}");
            }
        }
    }
    let r = f.udp(&query("www.shop.test.", RecordType::ANY));
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    assert_eq!(r.answers.len(), 1);
    // As an operator would try it (dig waits on its own thread: TCP is served on this one).
    let (ip, port) = (f.addr().ip().to_string(), f.addr().port().to_string());
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("dig")
            .args([&format!("@{ip}"), "-p", &port, "shop.test", "AXFR"])
            .args(["+time=2", "+tries=1"])
            .output()
            .expect("dig is installed (scripts/test installs dnsutils)")
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Transfer failed"), "{text}");
    assert!(!text.contains("IN\tSOA"), "{text}");
}

/// Issue 13: AA was set on REFUSED and FORMERR. AA is set only on answers from a served zone
/// (NOERROR, NODATA and NXDOMAIN in it), never on REFUSED, FORMERR, NOTIMP, BADVERS or a
/// meta-type's error, nor on a profile's SERVFAIL (no authoritative answer).
#[tokio::test]
async fn aa_only_on_answers_from_served_zones() {
    let f =
        Fixture::new(&PRIORITY.replace("ttl = \"5s\"", "ttl = \"5s\"\nall_down = \"servfail\""));
    let raw = |name: &str, qtype: RecordType| query(name, qtype).to_vec().unwrap();
    let mut two_questions = raw("www.shop.test.", RecordType::A);
    two_questions[5] = 2;
    let mut notify = raw("shop.test.", RecordType::SOA);
    notify[2] = 4 << 3;
    let mut chaos = query("www.shop.test.", RecordType::A);
    chaos.queries[0].set_query_class(hickory_proto::rr::DNSClass::CH);
    let mut badvers = query("www.shop.test.", RecordType::A);
    let mut edns = Edns::new();
    edns.set_version(1);
    badvers.set_edns(edns);
    for (what, m, aa) in [
        ("answer", raw("www.shop.test.", RecordType::A), true),
        ("nodata", raw("www.shop.test.", RecordType::AAAA), true),
        ("apex", raw("shop.test.", RecordType::SOA), true),
        ("nxdomain", raw("nope.shop.test.", RecordType::A), true),
        ("refused", raw("example.com.", RecordType::A), false),
        ("chaos", chaos.to_vec().unwrap(), false),
        ("formerr", two_questions, false),
        ("notimp", notify, false),
        ("badvers", badvers.to_vec().unwrap(), false),
        ("axfr", raw("shop.test.", RecordType::AXFR), false),
    ] {
        for reply in both(&f, &m).await {
            assert_eq!(header(&reply).1 & AA != 0, aa, "{what}");
        }
    }
    f.set("www", "edge", Status::Degraded);
    f.set("www", "region", Status::Degraded);
    let r = f.udp(&query("www.shop.test.", RecordType::A));
    assert_eq!(r.metadata.response_code, ResponseCode::ServFail);
    assert!(!r.metadata.authoritative);
}

const NAME_SERVERS: &str = r#"
[dns]
listen = ["127.0.0.1:0"]
[[dns.zone]]
name = "shop.test"
nameservers = [
  { name = "ns1.shop.test", address = ["192.0.2.53", "2001:db8::53"] },
  { name = "ns2.dns.shop.test", address = "192.0.2.54" },
  "ns.provider.example",
]
hostmaster = "hostmaster.shop.test"
ttl = "1h"

[[monitor]]
name = "web"
protocol = "tcp"
port = 80
"#;

/// Issue 13: `nameservers = ["ns1.shop.test"]` gave NS records whose target answered
/// NXDOMAIN. A name server carries its addresses: answered as A and AAAA at its name (also
/// below an empty non-terminal), and as glue in the additional section of the apex's NS and
/// ANY answers; a name server outside the zones gets none, and the plain form stays valid.
#[tokio::test]
async fn in_zone_name_servers_answer_their_addresses_and_glue() {
    let f = Fixture::from_topology(topology(&format!("{NAME_SERVERS}\n{PRIORITY}")));
    let dig = |name: &str, qtype: &str| testkit::dig(f.addr(), name, &[qtype]).unwrap();
    assert_eq!(dig("ns1.shop.test", "A"), ["192.0.2.53"]);
    assert_eq!(dig("NS1.shop.test", "AAAA"), ["2001:db8::53"]);
    assert_eq!(dig("ns2.dns.shop.test", "A"), ["192.0.2.54"]);
    assert!(dig("ns2.dns.shop.test", "AAAA").is_empty());

    let r = f.udp(&query("ns1.shop.test.", RecordType::A));
    assert!(r.metadata.authoritative);
    assert_eq!(r.answers[0].ttl, 3600, "the zone's TTL");
    let ent = f.udp(&query("dns.shop.test.", RecordType::A));
    assert_eq!(
        ent.metadata.response_code,
        ResponseCode::NoError,
        "an empty non-terminal"
    );
    assert!(ent.answers.is_empty());
    let other = f.udp(&query("ns.provider.example.", RecordType::A));
    assert_eq!(other.metadata.response_code, ResponseCode::Refused);

    for (qtype, answers) in [(RecordType::NS, 3), (RecordType::ANY, 4)] {
        for r in [
            f.udp(&query("shop.test.", qtype)),
            f.tcp(&query("shop.test.", qtype)).await,
        ] {
            assert!(r.metadata.authoritative);
            assert_eq!(r.answers.len(), answers, "{qtype}");
            let mut glue: Vec<String> = r
                .additionals
                .iter()
                .map(|a| format!("{} {}", a.name, rdata_text(&a.data)))
                .collect();
            glue.sort();
            assert_eq!(
                glue,
                [
                    "ns1.shop.test. 192.0.2.53",
                    "ns1.shop.test. 2001:db8::53",
                    "ns2.dns.shop.test. 192.0.2.54",
                ],
                "{qtype}"
            );
        }
    }
    // Other answers carry no glue.
    let soa = f.udp(&query("shop.test.", RecordType::SOA));
    assert!(soa.additionals.is_empty());
    let www = f.udp(&query("www.shop.test.", RecordType::A));
    assert!(www.additionals.is_empty());
}

/// Issue 13: one client holding 1,024 idle TCP connections blocked every new TCP query for
/// the 10 s idle timeout. One client (an address) may hold `TCP_MAX_PER_CLIENT` connections;
/// its next ones are closed at once, and other clients are answered, over TCP and UDP.
#[tokio::test]
async fn one_client_cannot_starve_dns_over_tcp() {
    use dns::server::{TCP_MAX_CONNECTIONS, TCP_MAX_PER_CLIENT};
    let f = Fixture::new(PRIORITY);
    let mut hog = Vec::new();
    for _ in 0..TCP_MAX_CONNECTIONS + 16 {
        hog.push(connect_from("127.0.0.2", f.addr()).await);
    }
    let q = query("www.shop.test.", RecordType::A).to_vec().unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(5), f.tcp_from("127.0.0.3", &q))
        .await
        .expect("answered at once, not after the idle timeout")
        .expect("answered, not closed");
    let r = Message::from_vec(&reply).unwrap();
    assert_eq!(rdata_text(&r.answers[0].data), "10.0.1.10");
    assert_eq!(f.ask("www.shop.test.", RecordType::A, None), ["10.0.1.10"]);
    let open = testkit::eventually(Duration::from_secs(5), "the excess closed", || {
        let open = open_count(&hog);
        async move { (open <= TCP_MAX_PER_CLIENT).then_some(open) }
    })
    .await;
    assert_eq!(open, TCP_MAX_PER_CLIENT, "the first ones are kept");
}

/// Issue 13, neighbour: many clients each within their limit. Once more than half of
/// `TCP_MAX_CONNECTIONS` are open, idle connections get `TCP_IDLE_BUSY` instead of the 10 s
/// `TCP_IDLE`, so they make way well before it, and newcomers are answered.
#[tokio::test]
async fn idle_tcp_connections_make_way_when_the_server_is_busy() {
    use dns::server::{TCP_MAX_CONNECTIONS, TCP_MAX_PER_CLIENT};
    let f = Fixture::new(PRIORITY);
    let mut idle = Vec::new();
    let mut source = 10;
    while idle.len() <= TCP_MAX_CONNECTIONS / 2 + 64 {
        for _ in 0..TCP_MAX_PER_CLIENT {
            idle.push(connect_from(&format!("127.0.1.{source}"), f.addr()).await);
        }
        source += 1;
    }
    // Closed well before the 10 s idle timeout, down to at most half the slots.
    testkit::eventually(Duration::from_secs(5), "idle connections closed", || {
        let open = open_count(&idle);
        async move { (open <= TCP_MAX_CONNECTIONS / 2).then_some(()) }
    })
    .await;
    let q = query("www.shop.test.", RecordType::A).to_vec().unwrap();
    assert!(f.tcp_from("127.0.0.3", &q).await.is_some());
}

/// How many of these connections the server still holds open (no end of stream yet).
fn open_count(conns: &[tokio::net::TcpStream]) -> usize {
    conns
        .iter()
        .filter(|c| {
            matches!(
                c.try_read(&mut [0u8; 1]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
            )
        })
        .count()
}

/// Issue 18: response-rate limiting. A flood of UDP queries from one source (127.0.0.2: with
/// the default /24 its client is 127.0.0.0/24) gets one second's worth of answers (the limit),
/// then mostly silence: every second limited response (slip 2) comes back truncated, TC and no
/// record, so a real client would retry over TCP; the others are dropped, and both are
/// counted. Meanwhile 127.0.1.3 (another /24: its own bucket) is answered normally, TCP from
/// the flooded source too, and once the flood stops the bucket refills and the source is
/// answered again over UDP.
/// NODATA answers share one bucket per name whatever the type asked (as BIND keys them): a
/// flood rotating through query types gets no more full answers than one type would.
#[tokio::test]
async fn rotating_the_query_type_does_not_escape_the_limit() {
    use std::sync::atomic::Ordering;
    const RATE: u32 = 10;
    let rrl = model::Rrl {
        responses_per_second: RATE,
        slip: 0,
        exempt: Vec::new(),
        ..model::Rrl::default()
    };
    let t = topology(&format!("{ZONE}\n{PRIORITY}"));
    let f = Fixture::with_rrl(t, 2, Some(Limiter::new(&rrl)));
    let flood = UdpSocket::bind("127.0.0.2:0").unwrap();
    flood.set_nonblocking(true).unwrap();
    let mut answered = 0u32;
    let mut buf = [0u8; 4096];
    let started = tokio::time::Instant::now();
    for (i, qtype) in (1000u16..1400).enumerate() {
        // Types www has no record of: every answer is NODATA.
        let mut m = query("www.shop.test.", RecordType::Unknown(qtype));
        m.metadata.id = i as u16;
        flood.send_to(&m.to_vec().unwrap(), f.addr()).unwrap();
        while let Ok(n) = flood.recv(&mut buf) {
            let (_, flags, _, counts) = header(&buf[..n]);
            assert_eq!(flags & 0x02, 0, "slip 0 sends nothing truncated");
            assert_eq!(counts[1], 0, "NODATA");
            answered += 1;
        }
    }
    let sent_for = started.elapsed();
    let m = &f.manager.metrics;
    testkit::eventually(Duration::from_secs(5), "the flood counted", || {
        let seen = m.rrl_dropped.load(Ordering::Relaxed) + u64::from(answered);
        async move { (seen >= 50).then_some(()) }
    })
    .await;
    while let Ok(n) = flood.recv(&mut buf) {
        let _ = header(&buf[..n]);
        answered += 1;
    }
    let allowed = RATE + (sent_for.as_secs_f64() * f64::from(RATE)).ceil() as u32 + 1;
    assert!(
        answered <= allowed,
        "{answered} NODATA answers for rotating types, at most {allowed}"
    );
    assert!(m.rrl_dropped.load(Ordering::Relaxed) > 0);
}

#[tokio::test]
async fn a_udp_flood_from_one_source_is_rate_limited_and_slips_while_others_are_answered() {
    use std::sync::atomic::Ordering;
    const RATE: u32 = 10;
    const FLOOD: u16 = 400;
    let rrl = model::Rrl {
        responses_per_second: RATE,
        slip: 2,
        exempt: Vec::new(),
        ..model::Rrl::default()
    };
    let t = topology(&format!("{ZONE}\n{PRIORITY}"));
    let f = Fixture::with_rrl(t, 2, Some(Limiter::new(&rrl)));
    let m = &f.manager.metrics;
    let flood = UdpSocket::bind("127.0.0.2:0").unwrap();
    flood.set_nonblocking(true).unwrap();
    let other = UdpSocket::bind("127.0.1.3:0").unwrap();
    other
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let q = |id: u16| {
        let mut m = query("www.shop.test.", RecordType::A);
        m.metadata.id = id;
        m.to_vec().unwrap()
    };
    let (mut answered, mut slipped) = (0u32, 0u32);
    let mut buf = [0u8; 4096];
    let drain = |answered: &mut u32, slipped: &mut u32| {
        let mut buf = [0u8; 4096];
        while let Ok(n) = flood.recv(&mut buf) {
            let (_, flags, _, counts) = header(&buf[..n]);
            if flags & 0x02 != 0 {
                assert_eq!(counts, [1, 0, 0, 0], "a slip: the question, no record");
                *slipped += 1;
            } else {
                assert_eq!(counts[1], 1, "a whole answer");
                *answered += 1;
            }
        }
    };
    let started = tokio::time::Instant::now();
    for id in 0..FLOOD {
        flood.send_to(&q(id), f.addr()).unwrap();
        if id % 80 == 40 {
            // Another prefix, at the same time: answered in full, not truncated.
            other.send_to(&q(60_000 + id), f.addr()).unwrap();
            let n = other.recv(&mut buf).expect("127.0.1.3 is answered");
            let r = Message::from_vec(&buf[..n]).unwrap();
            assert!(!r.metadata.truncation, "127.0.1.3 is not limited");
            assert_eq!(r.metadata.id, 60_000 + id);
            assert_eq!(rdata_text(&r.answers[0].data), "10.0.1.10");
        }
        drain(&mut answered, &mut slipped);
    }
    let sent_for = started.elapsed();
    // The last replies: every slip the server counted has arrived.
    testkit::eventually(Duration::from_secs(5), "every slip received", || {
        drain(&mut answered, &mut slipped);
        let done = u64::from(slipped) >= m.rrl_slipped.load(Ordering::Relaxed);
        async move { done.then_some(()) }
    })
    .await;
    let dropped = m.rrl_dropped.load(Ordering::Relaxed);
    let slips = m.rrl_slipped.load(Ordering::Relaxed);
    // What the server saw of the flood (the kernel may drop some when the socket's buffer is
    // full): NOERROR responses over UDP (answers and slips, 5 of them to 127.0.1.3) and drops.
    let noerror = m.responses[0][0].load(Ordering::Relaxed);
    let full_answers = noerror - 5 - slips;
    let seen = full_answers + slips + dropped;
    eprintln!(
        "{FLOOD} queries in {sent_for:?}, {seen} seen by the server: {answered} answered, \
         {slipped} slipped, {dropped} dropped"
    );
    assert!(
        seen >= 50,
        "the flood reached the server: {seen} of {FLOOD}"
    );
    // One second's worth at once, plus the refill while the flood lasted.
    let allowed = RATE + (sent_for.as_secs_f64() * f64::from(RATE)).ceil() as u32 + 1;
    assert!(
        answered >= 1 && answered <= allowed,
        "{answered} answered, at most {allowed}"
    );
    assert!(
        full_answers <= u64::from(allowed),
        "{full_answers} answers sent"
    );
    assert!(slipped > 0, "some limited responses slip");
    assert_eq!(u64::from(slipped), slips, "every slip counted and received");
    assert!(dropped > seen / 3, "most are dropped: {dropped} of {seen}");
    // Slip 2: every second limited response is a slip (the split is even, give or take one).
    assert!(
        dropped.abs_diff(slips) <= 1,
        "{dropped} dropped, {slips} slipped"
    );
    // TCP from the flooded source is never limited.
    let reply = f
        .tcp_from("127.0.0.2", &q(1))
        .await
        .expect("answered over TCP");
    let r = Message::from_vec(&reply).unwrap();
    assert!(!r.metadata.truncation);
    assert_eq!(rdata_text(&r.answers[0].data), "10.0.1.10");
    // The flood over, the bucket refills: the source is answered again over UDP.
    flood.set_nonblocking(false).unwrap();
    flood
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    testkit::eventually(Duration::from_secs(5), "127.0.0.2 answered again", || {
        flood.send_to(&q(7), f.addr()).unwrap();
        let reply = flood.recv(&mut buf).ok().map(|n| buf[..n].to_vec());
        async move {
            let r = Message::from_vec(&reply?).ok()?;
            (!r.metadata.truncation && !r.answers.is_empty()).then_some(())
        }
    })
    .await;
}

/// Clients in `exempt` (loopback by default) are never limited, and without a limiter the
/// server limits nothing: no count moves.
#[tokio::test]
async fn exempt_clients_and_servers_without_rrl_are_not_limited() {
    use std::sync::atomic::Ordering;
    let rrl = model::Rrl {
        responses_per_second: 1,
        ..model::Rrl::default()
    };
    let t = || topology(&format!("{ZONE}\n{PRIORITY}"));
    for f in [
        Fixture::with_rrl(t(), 1, Some(Limiter::new(&rrl))),
        Fixture::with_rrl(t(), 1, None),
    ] {
        for _ in 0..50 {
            assert_eq!(f.ask("www.shop.test.", RecordType::A, None), ["10.0.1.10"]);
        }
        let m = &f.manager.metrics;
        assert_eq!(m.rrl_dropped.load(Ordering::Relaxed), 0);
        assert_eq!(m.rrl_slipped.load(Ordering::Relaxed), 0);
    }
}
