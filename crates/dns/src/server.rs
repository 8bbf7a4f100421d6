//! The authoritative server: answering one query from the current tables (a pure function),
//! and the UDP and TCP front ends that feed it.
//!
//! UDP runs on plain threads, one `SO_REUSEPORT` socket each, so the kernel spreads queries
//! over cores with no lock and no async machinery on the hot path. TCP (truncated answers,
//! zone-less clients) runs on tokio.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::rrl::{Class, Limiter, Verdict};
use crate::table::{Client, Empty, Lookup, NsRecord, Tables};
use crate::wire::{self, Reject, Writer, rcode, rtype};

/// Transports, for metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Udp = 0,
    Tcp = 1,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
        }
    }
}

/// Response codes counted, in this order.
pub const RCODES: [(&str, u8); 6] = [
    ("NOERROR", rcode::NOERROR),
    ("FORMERR", rcode::FORMERR),
    ("SERVFAIL", rcode::SERVFAIL),
    ("NXDOMAIN", rcode::NXDOMAIN),
    ("NOTIMP", rcode::NOTIMP),
    ("REFUSED", rcode::REFUSED),
];

/// Query counters, shared by every socket. Relaxed atomics: counts, not synchronisation.
#[derive(Debug)]
pub struct Metrics {
    /// `[transport][rcode index]`; BADVERS counts as FORMERR.
    pub responses: [[AtomicU64; 6]; 2],
    /// Per profile (index of the topology), queries answered from it.
    pub by_profile: Vec<AtomicU64>,
    /// Responses truncated for UDP.
    pub truncated: AtomicU64,
    /// Datagrams dropped unanswered (not a query).
    pub dropped: AtomicU64,
    /// Per profile, changes of the endpoints answered.
    pub answer_changes: Vec<AtomicU64>,
    /// UDP responses not sent: over the rate limit ([`crate::rrl`]).
    pub rrl_dropped: AtomicU64,
    /// UDP responses over the rate limit sent truncated instead (TC, no records: a slip).
    pub rrl_slipped: AtomicU64,
}

impl Metrics {
    pub fn new(profiles: usize) -> Self {
        Metrics {
            responses: Default::default(),
            by_profile: (0..profiles).map(|_| AtomicU64::new(0)).collect(),
            truncated: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            answer_changes: (0..profiles).map(|_| AtomicU64::new(0)).collect(),
            rrl_dropped: AtomicU64::new(0),
            rrl_slipped: AtomicU64::new(0),
        }
    }

    fn count(&self, transport: Transport, code: u8, profile: Option<usize>) {
        let i = RCODES.iter().position(|(_, c)| *c == code).unwrap_or(1);
        self.responses[transport as usize][i].fetch_add(1, Ordering::Relaxed);
        if let Some(p) = profile.and_then(|p| self.by_profile.get(p)) {
            p.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Answers one message into `out`. Returns false when nothing should be sent.
pub fn answer(
    tables: &Tables,
    msg: &[u8],
    peer: IpAddr,
    transport: Transport,
    out: &mut Vec<u8>,
    metrics: &Metrics,
) -> bool {
    answer_limited(tables, msg, peer, transport, out, metrics, None)
}

/// A rate limiter and the time to charge responses at (since the limiter's origin).
#[derive(Clone, Copy, Debug)]
pub struct Limit<'a> {
    pub limiter: &'a Limiter,
    pub now: Duration,
}

/// [`answer`], with the response charged to `limit` ([`crate::rrl`]): over the limit it is
/// dropped (false) or sent truncated — TC, the question, no record but our OPT — when it slips.
/// The server passes a limit for UDP only.
pub fn answer_limited(
    tables: &Tables,
    msg: &[u8],
    peer: IpAddr,
    transport: Transport,
    out: &mut Vec<u8>,
    metrics: &Metrics,
    limit: Option<Limit<'_>>,
) -> bool {
    let verdict = |class: Class<'_>| match limit {
        Some(l) => l.limiter.check(peer, class, l.now),
        None => Verdict::Send,
    };
    let q = match wire::parse(msg) {
        Ok(q) => q,
        Err(Reject::Drop) => {
            metrics.dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        Err(Reject::Error {
            id,
            opcode,
            recursion_desired,
            rcode,
        }) => {
            let v = verdict(Class::Error);
            if v == Verdict::Drop {
                metrics.rrl_dropped.fetch_add(1, Ordering::Relaxed);
                return false;
            }
            let mut w = Writer::error(out, id, opcode, recursion_desired, rcode);
            if v == Verdict::Slip {
                w.truncate(wire::HEADER);
                metrics.rrl_slipped.fetch_add(1, Ordering::Relaxed);
            }
            w.finish();
            metrics.count(transport, rcode, None);
            return true;
        }
    };
    let mut w = Writer::new(out, &q, rcode::NOERROR);
    let question_end = w.len();
    if let Some(e) = q.edns
        && e.version > 0
    {
        let v = verdict(Class::Error);
        if v == Verdict::Drop {
            metrics.rrl_dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        if v == Verdict::Slip {
            w.truncate(question_end);
            metrics.rrl_slipped.fetch_add(1, Ordering::Relaxed);
        }
        w.opt(rcode::BADVERS, None);
        w.finish();
        metrics.count(transport, rcode::FORMERR, None);
        return true;
    }
    let r = if !q.is_class_in() {
        Responded::error(rcode::REFUSED)
    } else if let Some(code) = q.meta_rcode() {
        Responded::error(code)
    } else {
        respond(tables, &q, peer, &mut w)
    };
    let code = r.code;
    let class = match (code, r.zone) {
        // NODATA is one class per name whatever the type asked (as BIND keys it), so rotating
        // the type cannot open a fresh bucket for each of 65,536 types.
        (rcode::NOERROR, _) => Class::Answer {
            name: q.name.wire(),
            qtype: if r.answered { q.qtype } else { 0 },
        },
        (rcode::NXDOMAIN, Some(zone)) => Class::NxDomain {
            zone: q
                .name
                .suffix(q.name.label_count() - tables.zone(zone).labels),
        },
        _ => Class::Error,
    };
    let v = verdict(class);
    if v == Verdict::Drop {
        metrics.rrl_dropped.fetch_add(1, Ordering::Relaxed);
        return false;
    }
    w.set_rcode(code);
    if v == Verdict::Slip {
        w.truncate(question_end);
        if let Some(e) = q.edns {
            w.opt(0, e.subnet.map(|s| (s, 0)));
        }
        w.finish();
        metrics.rrl_slipped.fetch_add(1, Ordering::Relaxed);
        metrics.count(transport, code, r.profile);
        return true;
    }
    if let Some(e) = q.edns {
        let scope = |s: wire::ClientSubnet| (s, if r.used_client { s.source_prefix } else { 0 });
        w.opt(0, e.subnet.map(scope));
    }
    let limit = match (transport, q.edns) {
        (Transport::Tcp, _) => usize::from(u16::MAX),
        (Transport::Udp, Some(e)) => usize::from(e.payload).max(wire::CLASSIC_UDP),
        (Transport::Udp, None) => wire::CLASSIC_UDP,
    };
    if w.len() > limit {
        w.truncate(question_end);
        if let Some(e) = q.edns {
            w.opt(0, e.subnet.map(|s| (s, 0)));
        }
        metrics.truncated.fetch_add(1, Ordering::Relaxed);
    }
    w.finish();
    metrics.count(transport, code, r.profile);
    true
}

/// What [`respond`] wrote.
struct Responded {
    code: u8,
    /// The profile answered.
    profile: Option<usize>,
    /// Whether the answer depended on the client.
    used_client: bool,
    /// The served zone the name is in.
    zone: Option<usize>,
    /// Whether the answer section holds records (NOERROR without them is NODATA).
    answered: bool,
}

impl Responded {
    fn error(code: u8) -> Self {
        Responded {
            code,
            profile: None,
            used_client: false,
            zone: None,
            answered: false,
        }
    }
}

/// The body of an answer.
///
/// AA is set on answers from a served zone (NOERROR and NXDOMAIN); never on REFUSED, FORMERR,
/// NOTIMP or BADVERS, and not on a profile's SERVFAIL, which is no authoritative answer.
fn respond(tables: &Tables, q: &wire::Query<'_>, peer: IpAddr, w: &mut Writer<'_>) -> Responded {
    let (zone, profile) = match tables.lookup(&q.name) {
        Lookup::NotOurs => return Responded::error(rcode::REFUSED),
        Lookup::NxDomain { zone } => {
            w.set_authoritative();
            negative(tables, q, zone, w);
            return Responded {
                zone: Some(zone),
                ..Responded::error(rcode::NXDOMAIN)
            };
        }
        Lookup::Found { zone, profile } => (zone, profile),
    };
    let z = tables.zone(zone);
    let at_apex = q.name.label_count() == z.labels;
    let mut answered = false;
    if at_apex && matches!(q.qtype, rtype::SOA | rtype::ANY) {
        w.answer(wire::QUESTION_NAME, rtype::SOA, z.ttl, z.soa);
        answered = true;
    }
    let apex_ns = at_apex && matches!(q.qtype, rtype::NS | rtype::ANY);
    let ns_start = w.len();
    if apex_ns {
        for ns in z.ns {
            w.answer(wire::QUESTION_NAME, rtype::NS, z.ttl, &ns.name);
        }
        answered = true;
    }
    let mut used_client = false;
    if let Some(p) = profile {
        let ttl = tables.ttl(p);
        let client = Client {
            addr: q.edns.and_then(|e| e.subnet).map_or(peer, |s| s.addr),
        };
        let mut cname = false;
        let result = tables.resolve(p, Some(client), q.qtype, &mut |rr| {
            // A name with a CNAME holds nothing else (RFC 1034 §3.6.2, RFC 2181 §10.1): never
            // one at the apex (which holds SOA and NS), beside other records, or two.
            // `validate` refuses such profiles; this keeps the wire right regardless.
            let is_cname = rr.rtype == rtype::CNAME;
            if cname || (is_cname && (at_apex || answered)) {
                return;
            }
            cname = is_cname;
            w.answer(wire::QUESTION_NAME, rr.rtype, ttl, &rr.rdata);
            answered = true;
        });
        match result {
            Ok(used) => used_client = used,
            Err(Empty::Servfail) => {
                return Responded {
                    profile: Some(p),
                    zone: Some(zone),
                    ..Responded::error(rcode::SERVFAIL)
                };
            }
            Err(Empty::Nodata) => {}
        }
    } else if let Some(host) = tables.host(&q.name) {
        for rr in host
            .iter()
            .filter(|rr| rr.rtype == q.qtype || q.qtype == rtype::ANY)
        {
            w.answer(wire::QUESTION_NAME, rr.rtype, z.ttl, &rr.rdata);
            answered = true;
        }
    }
    w.set_authoritative();
    if !answered {
        negative(tables, q, zone, w);
    }
    if apex_ns {
        glue(w, z.ns, ns_start, z.ttl);
    }
    Responded {
        code: rcode::NOERROR,
        profile,
        used_client,
        zone: Some(zone),
        answered,
    }
}

/// The addresses of the zone's name servers in the additional section, after the NS records
/// written from `ns_start`; each owner is a pointer to the name in its NS record.
fn glue(w: &mut Writer<'_>, ns: &[NsRecord], ns_start: usize, ttl: u32) {
    // Each NS record: a 2-byte owner pointer, 10 bytes of type, class, TTL and length, then
    // the name server's name.
    let mut at = ns_start;
    for n in ns {
        let name_at = at + 12;
        at = name_at + n.name.len();
        for rr in n.glue.iter() {
            match Writer::pointer(name_at) {
                Some(owner) => w.additional(owner, rr.rtype, ttl, &rr.rdata),
                None => w.additional_named(&n.name, rr.rtype, ttl, &rr.rdata),
            }
        }
    }
}

/// The zone's SOA in the authority section, for NXDOMAIN and NODATA.
fn negative(tables: &Tables, q: &wire::Query<'_>, zone: usize, w: &mut Writer<'_>) {
    let z = tables.zone(zone);
    let apex_label = q.name.label_count() - z.labels;
    let owner = wire::QUESTION_NAME + q.name.label_offset(apex_label) as u16;
    w.authority(owner, rtype::SOA, z.negative_ttl.min(z.ttl), z.soa);
}

/// Running DNS listeners. Dropping it stops them.
#[derive(Debug)]
pub struct Server {
    /// The addresses bound (with ephemeral ports resolved), UDP and TCP alike.
    pub addrs: Vec<SocketAddr>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    tcp: Vec<tokio::task::JoinHandle<()>>,
}

/// How long a TCP connection may sit idle between queries (RFC 7766 §6.2.3 suggests
/// seconds, not minutes).
pub const TCP_IDLE: Duration = Duration::from_secs(10);
/// How long a TCP connection may sit idle while more than half of [`TCP_MAX_CONNECTIONS`] are
/// open: under pressure idle connections make way at once, as NSD and Knot shorten theirs.
pub const TCP_IDLE_BUSY: Duration = Duration::from_secs(1);
/// TCP connections served at once, at most, over every listener; more are closed as soon as
/// they are accepted.
pub const TCP_MAX_CONNECTIONS: usize = 1024;
/// TCP connections one client may hold at once: an IPv4 address, or an IPv6 /64 (what one
/// host can easily use). Its next ones are closed as soon as they are accepted, so one client
/// cannot take the slots of the others.
pub const TCP_MAX_PER_CLIENT: usize = 32;

/// The limits of DNS over TCP. UDP has its own: response-rate limiting ([`crate::rrl`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpLimits {
    /// Default [`TCP_MAX_CONNECTIONS`].
    pub max_connections: usize,
    /// Default [`TCP_MAX_PER_CLIENT`].
    pub per_client: usize,
    /// Default [`TCP_IDLE`].
    pub idle: Duration,
    /// Default [`TCP_IDLE_BUSY`].
    pub busy_idle: Duration,
}

impl Default for TcpLimits {
    fn default() -> Self {
        TcpLimits {
            max_connections: TCP_MAX_CONNECTIONS,
            per_client: TCP_MAX_PER_CLIENT,
            idle: TCP_IDLE,
            busy_idle: TCP_IDLE_BUSY,
        }
    }
}

impl Server {
    /// Binds UDP and TCP on every address, with `udp_threads` sockets per address, the
    /// default [`TcpLimits`] and no response-rate limiting. Must run inside a tokio runtime (for
    /// TCP).
    pub fn start(
        listen: &[SocketAddr],
        tables: Arc<ArcSwap<Tables>>,
        metrics: Arc<Metrics>,
        udp_threads: usize,
    ) -> io::Result<Server> {
        Self::start_with(
            listen,
            tables,
            metrics,
            udp_threads,
            TcpLimits::default(),
            None,
        )
    }

    /// [`Server::start`] with chosen TCP limits and, with `rrl`, every UDP response charged to
    /// that limiter (one for every socket; TCP is never limited).
    pub fn start_with(
        listen: &[SocketAddr],
        tables: Arc<ArcSwap<Tables>>,
        metrics: Arc<Metrics>,
        udp_threads: usize,
        limits: TcpLimits,
        rrl: Option<Limiter>,
    ) -> io::Result<Server> {
        // One origin for every thread: buckets keep times relative to it.
        let rrl = rrl.map(|limiter| {
            Arc::new(Rate {
                limiter,
                origin: Instant::now(),
            })
        });
        let stop = Arc::new(AtomicBool::new(false));
        let mut server = Server {
            addrs: Vec::new(),
            stop: stop.clone(),
            threads: Vec::new(),
            tcp: Vec::new(),
        };
        let gate = Gate::new(limits);
        for addr in listen {
            let (sockets, listener) = bind_pair(*addr, udp_threads.max(1))?;
            let bound = listener.local_addr()?;
            for socket in sockets {
                let (tables, metrics, stop) = (tables.clone(), metrics.clone(), stop.clone());
                let rrl = rrl.clone();
                server.threads.push(
                    std::thread::Builder::new()
                        .name(format!("tandem-dns-udp-{bound}"))
                        .spawn(move || {
                            serve_udp(socket, &tables, &metrics, rrl.as_deref(), &stop);
                        })?,
                );
            }
            let (tables, metrics, gate) = (tables.clone(), metrics.clone(), gate.clone());
            server
                .tcp
                .push(tokio::spawn(serve_tcp(listener, tables, metrics, gate)));
            server.addrs.push(bound);
        }
        Ok(server)
    }

    /// Stops every listener and waits for the UDP threads.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tcp.drain(..) {
            t.abort();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `n` UDP sockets and a TCP listener on one address. With port 0 the kernel picks the UDP
/// port, which TCP may already use elsewhere: then try another.
fn bind_pair(addr: SocketAddr, n: usize) -> io::Result<(Vec<UdpSocket>, TcpListener)> {
    let attempts = if addr.port() == 0 { 50 } else { 1 };
    let mut last = None;
    for _ in 0..attempts {
        let first = udp_socket(addr)?;
        let bound = first.local_addr()?;
        match tcp_listener(bound) {
            Ok(listener) => {
                let mut sockets = vec![first];
                for _ in 1..n {
                    sockets.push(udp_socket(bound)?);
                }
                return Ok((sockets, listener));
            }
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::from(io::ErrorKind::AddrInUse)))
}

fn udp_socket(addr: SocketAddr) -> io::Result<UdpSocket> {
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    s.set_reuse_port(true)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.bind(&addr.into())
        .map_err(|e| io::Error::new(e.kind(), format!("cannot bind DNS on udp {addr}: {e}")))?;
    let s: UdpSocket = s.into();
    // Wake up now and then to notice a stop.
    s.set_read_timeout(Some(Duration::from_millis(200)))?;
    Ok(s)
}

fn tcp_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.bind(&addr.into())
        .map_err(|e| io::Error::new(e.kind(), format!("cannot bind DNS on tcp {addr}: {e}")))?;
    s.listen(1024)?;
    s.set_nonblocking(true)?;
    TcpListener::from_std(s.into())
}

/// Datagrams taken or sent per system call under load.
const BATCH: usize = 32;

/// The UDP sockets' rate limiter and the origin of the times charged to it.
#[derive(Debug)]
struct Rate {
    limiter: Limiter,
    origin: Instant,
}

/// Serves one UDP socket: `recvmmsg` takes whatever queries are waiting (at least one), they
/// are answered from one load of the tables (and charged to the rate limiter at one reading of
/// the clock), and `sendmmsg` sends every answer at once.
fn serve_udp(
    socket: UdpSocket,
    tables: &ArcSwap<Tables>,
    metrics: &Metrics,
    rrl: Option<&Rate>,
    stop: &AtomicBool,
) {
    use nix::sys::socket::{MsgFlags, MultiHeaders, SockaddrStorage, recvmmsg, sendmmsg};
    use std::io::{IoSlice, IoSliceMut};
    use std::os::fd::AsRawFd;

    let fd = socket.as_raw_fd();
    let mut inbox = vec![[0u8; 4096]; BATCH];
    let mut outbox: Vec<Vec<u8>> = (0..BATCH).map(|_| Vec::with_capacity(1232)).collect();
    let mut received: Vec<(usize, Option<SockaddrStorage>)> = Vec::with_capacity(BATCH);
    let mut replies: Vec<usize> = Vec::with_capacity(BATCH);
    let mut addrs: Vec<Option<SockaddrStorage>> = Vec::with_capacity(BATCH);
    let mut recv_headers = MultiHeaders::<SockaddrStorage>::preallocate(BATCH, None);
    let mut send_headers = MultiHeaders::<SockaddrStorage>::preallocate(BATCH, None);
    while !stop.load(Ordering::Relaxed) {
        received.clear();
        {
            let mut slices: Vec<[IoSliceMut<'_>; 1]> = inbox
                .iter_mut()
                .map(|b| [IoSliceMut::new(&mut b[..])])
                .collect();
            // SO_RCVTIMEO bounds the wait for the first datagram; the rest only if waiting.
            match recvmmsg(
                fd,
                &mut recv_headers,
                slices.iter_mut(),
                MsgFlags::MSG_WAITFORONE,
                None,
            ) {
                Ok(results) => received.extend(results.map(|m| (m.bytes, m.address))),
                Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    tracing::debug!(error = %e, "udp receive failed");
                    continue;
                }
            }
        }
        let tables = tables.load();
        let limit = rrl.map(|r| Limit {
            limiter: &r.limiter,
            now: r.origin.elapsed(),
        });
        replies.clear();
        for (i, (len, addr)) in received.iter().enumerate() {
            let Some(peer) = addr.as_ref().and_then(peer_ip) else {
                continue;
            };
            let msg = &inbox[i][..(*len).min(4096)];
            let out = &mut outbox[i];
            if answer_limited(&tables, msg, peer, Transport::Udp, out, metrics, limit) {
                replies.push(i);
            }
        }
        if replies.is_empty() {
            continue;
        }
        let slices: Vec<[IoSlice<'_>; 1]> = replies
            .iter()
            .map(|&i| [IoSlice::new(&outbox[i])])
            .collect();
        addrs.clear();
        addrs.extend(replies.iter().map(|&i| received[i].1));
        if let Err(e) = sendmmsg(
            fd,
            &mut send_headers,
            slices.iter(),
            &addrs,
            [],
            MsgFlags::empty(),
        ) {
            tracing::debug!(error = %e, "udp send failed");
        }
    }
}

fn peer_ip(a: &nix::sys::socket::SockaddrStorage) -> Option<IpAddr> {
    if let Some(v4) = a.as_sockaddr_in() {
        return Some(IpAddr::V4(v4.ip()));
    }
    a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
}

/// Who may hold a TCP connection: at most `max_connections` in all and `per_client` per
/// client, and whether more than half are taken (idle connections then get `busy_idle`).
#[derive(Debug)]
struct Gate {
    limits: TcpLimits,
    open: Mutex<Open>,
    busy: watch::Sender<bool>,
}

#[derive(Debug, Default)]
struct Open {
    total: usize,
    per_client: HashMap<IpAddr, usize>,
}

/// Why a connection was closed as soon as it was accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Full {
    Server,
    Client,
}

/// A connection's place at the gate, given back when dropped.
#[derive(Debug)]
struct Slot {
    gate: Arc<Gate>,
    client: IpAddr,
}

impl Gate {
    fn new(limits: TcpLimits) -> Arc<Gate> {
        Arc::new(Gate {
            limits,
            open: Mutex::new(Open::default()),
            busy: watch::Sender::new(false),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Open> {
        self.open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes a place for a connection from `peer`, or says why there is none.
    fn admit(self: &Arc<Self>, peer: IpAddr) -> Result<Slot, Full> {
        let client = client_key(peer);
        let mut open = self.lock();
        if open.total >= self.limits.max_connections {
            return Err(Full::Server);
        }
        let mine = open.per_client.entry(client).or_default();
        if *mine >= self.limits.per_client {
            return Err(Full::Client);
        }
        *mine += 1;
        open.total += 1;
        self.update(&open);
        Ok(Slot {
            gate: self.clone(),
            client,
        })
    }

    fn update(&self, open: &Open) {
        let busy = open.total > self.limits.max_connections / 2;
        self.busy
            .send_if_modified(|b| std::mem::replace(b, busy) != busy);
    }

    /// How long a connection may idle now.
    fn idle(&self, busy: bool) -> Duration {
        if busy {
            self.limits.busy_idle
        } else {
            self.limits.idle
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.gate.lock();
        open.total = open.total.saturating_sub(1);
        if let Some(n) = open.per_client.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                open.per_client.remove(&self.client);
            }
        }
        self.gate.update(&open);
    }
}

/// The client a connection counts for: its IPv4 address, or its IPv6 /64.
fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(a) => IpAddr::V6((u128::from(a) & !u128::from(u64::MAX)).into()),
    }
}

async fn serve_tcp(
    listener: TcpListener,
    tables: Arc<ArcSwap<Tables>>,
    metrics: Arc<Metrics>,
    gate: Arc<Gate>,
) {
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            continue;
        };
        let slot = match gate.admit(peer.ip()) {
            Ok(slot) => slot,
            Err(full) => {
                // Over a limit: closing at once is the only fair answer.
                tracing::debug!(client = %peer.ip(), limit = ?full, "DNS TCP connection refused");
                continue;
            }
        };
        let (tables, metrics) = (tables.clone(), metrics.clone());
        tokio::spawn(async move {
            let _ = tcp_connection(stream, peer.ip(), &tables, &metrics, &slot.gate).await;
            drop(slot);
        });
    }
}

/// Serves length-prefixed queries on one connection until it closes or idles out: no query
/// may take longer to arrive than the idle time allowed, which shrinks while the server is
/// busy (connections already waiting notice at once).
async fn tcp_connection(
    mut stream: TcpStream,
    peer: IpAddr,
    tables: &ArcSwap<Tables>,
    metrics: &Metrics,
    gate: &Gate,
) -> io::Result<()> {
    let mut busy = gate.busy.subscribe();
    let mut msg = vec![0u8; usize::from(u16::MAX)];
    let mut out = Vec::with_capacity(4096);
    loop {
        let since = Instant::now();
        let mut len = [0u8; 2];
        if !read_within(&mut stream, &mut len, since, gate, &mut busy).await? {
            return Ok(());
        }
        let len = usize::from(u16::from_be_bytes(len));
        if !read_within(&mut stream, &mut msg[..len], since, gate, &mut busy).await? {
            return Ok(());
        }
        let answered = {
            let tables = tables.load();
            answer(
                &tables,
                &msg[..len],
                peer,
                Transport::Tcp,
                &mut out,
                metrics,
            )
        };
        if answered {
            let mut framed = Vec::with_capacity(out.len() + 2);
            framed.extend_from_slice(&(out.len() as u16).to_be_bytes());
            framed.extend_from_slice(&out);
            let limit = gate.idle(*busy.borrow());
            tokio::time::timeout(limit, stream.write_all(&framed))
                .await
                .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
        }
    }
}

/// Fills `buf` unless the connection closes or stays idle past `since` plus the idle time
/// allowed (re-read whenever the server's pressure changes). `Ok(false)`: close it.
async fn read_within(
    stream: &mut TcpStream,
    buf: &mut [u8],
    since: Instant,
    gate: &Gate,
    busy: &mut watch::Receiver<bool>,
) -> io::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        let deadline = since + gate.idle(*busy.borrow_and_update());
        tokio::select! {
            // `read` is cancel-safe: nothing read is lost when another branch wins.
            r = stream.read(&mut buf[got..]) => match r? {
                0 => return Ok(false),
                n => got += n,
            },
            () = tokio::time::sleep_until(deadline) => return Ok(false),
            r = busy.changed() => {
                if r.is_err() {
                    return Ok(false);
                }
            }
        }
    }
    Ok(true)
}
