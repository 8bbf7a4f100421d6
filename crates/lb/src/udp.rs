//! UDP frontends: a flow per client address, kept on one backend while that backend keeps its
//! flows, its replies relayed back, expired after `idle_timeout` without traffic either way.
//! The flow table belongs to the one task that reads the frontend socket, so it needs no lock.
//!
//! A UDP flow has no connection to lose, so it follows the pool, as Azure Load Balancer moves
//! UDP flows to a healthy instance when the probe of theirs fails (Azure Load Balancer health
//! probe documentation): once its backend no longer keeps flows — probed down (with either
//! `on_backend_down`; for UDP `reset` means forget the flow), drained or out of the pool for
//! `drain_timeout`, or its flows reset — the flow's next datagram chooses a backend again. Per
//! datagram that costs one snapshot load and an integer compare; the pool is looked at only
//! when the snapshot changed.
//!
//! With `proxy_protocol`, every datagram to the backend starts with a PROXY protocol v2 header
//! (transport DGRAM, <https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt>): a datagram
//! stands alone, and that is how UDP receivers of PROXY v2 (dnsdist, BIND, PowerDNS) read it.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::balancer::{Backend, Balancer, Keep, Snapshot};
use crate::{proxy_v2, select};

/// Room before each received payload for a PROXY v2 header, so a datagram goes out header
/// first without copying the payload.
const HEADROOM: usize = proxy_v2::MAX_LEN;

struct Flow {
    backend: Arc<Backend>,
    upstream: Arc<UdpSocket>,
    /// Milliseconds since `epoch` of the last datagram either way.
    last: Arc<AtomicU64>,
    /// Set by the reply task when the backend's flows are ended (`Stats::kill`).
    ended: Arc<AtomicBool>,
    /// The snapshot generation the backend was last checked against.
    checked: u64,
    /// While the backend drains or leaves the pool: when the flow must move.
    until: Option<Instant>,
    /// The PROXY v2 header every datagram to the backend starts with.
    header: Option<Vec<u8>>,
    replies: JoinHandle<()>,
}

impl Flow {
    /// Whether the flow must choose a backend again. Cheap unless the snapshot changed.
    fn stale(&mut self, snap: &Snapshot, now: Instant) -> bool {
        if self.ended.load(Ordering::Relaxed) {
            return true;
        }
        if self.checked != snap.generation {
            self.checked = snap.generation;
            self.until = match snap.keeps(self.backend.addr) {
                Keep::Yes => None,
                Keep::Until(t) => Some(t),
                Keep::No => return true,
            };
        }
        self.until.is_some_and(|t| now >= t)
    }
}

impl Drop for Flow {
    fn drop(&mut self) {
        self.replies.abort();
        self.backend.stats.active.fetch_sub(1, Ordering::Relaxed);
    }
}

pub fn socket(addr: SocketAddr) -> io::Result<UdpSocket> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    s.set_reuse_port(true)?;
    s.bind(&addr.into()).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot bind load balancer frontend udp {addr}: {e}"),
        )
    })?;
    s.set_nonblocking(true)?;
    UdpSocket::from_std(s.into())
}

/// Relays until the task is dropped.
pub async fn serve(front: UdpSocket, lb: Arc<Balancer>, backend_port: Option<u16>) {
    let front = Arc::new(front);
    let local = match front.local_addr() {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(lb = %lb.config.name, error = %e, "udp frontend has no address");
            return;
        }
    };
    let epoch = Instant::now();
    let idle = lb.config.idle_timeout;
    let mut flows: HashMap<SocketAddr, Flow> = HashMap::new();
    let mut buf = vec![0u8; HEADROOM + 65536];
    let mut sweep = tokio::time::interval(idle.min(Duration::from_secs(1)));
    loop {
        let (n, client) = tokio::select! {
            r = front.recv_from(&mut buf[HEADROOM..]) => match r {
                Ok(r) => r,
                Err(_) => continue,
            },
            _ = sweep.tick() => {
                let now = Instant::now();
                let now_ms = now.duration_since(epoch).as_millis() as u64;
                let idle_ms = idle.as_millis() as u64;
                let snap = lb.snapshot();
                // Idle flows, and flows that would move at their next datagram: their backend
                // should not count them meanwhile.
                flows.retain(|_, f| {
                    now_ms.saturating_sub(f.last.load(Ordering::Relaxed)) < idle_ms
                        && !f.stale(&snap, now)
                });
                continue;
            }
        };
        let now = Instant::now();
        let flow = {
            let snap = lb.snapshot();
            match flows.entry(client) {
                Entry::Occupied(mut e) => {
                    if e.get_mut().stale(&snap, now) {
                        let from = e.get().backend.addr;
                        match open(&lb, &snap, &front, client, local, backend_port, epoch) {
                            Some(f) => {
                                tracing::debug!(
                                    lb = %lb.config.name, %client, %from, to = %f.backend.addr,
                                    "udp flow moved"
                                );
                                e.insert(f);
                            }
                            None => {
                                tracing::debug!(
                                    lb = %lb.config.name, %client, %from,
                                    "udp flow dropped: no backend takes flows"
                                );
                                e.remove();
                                continue;
                            }
                        }
                    }
                    e.into_mut()
                }
                Entry::Vacant(slot) => {
                    match open(&lb, &snap, &front, client, local, backend_port, epoch) {
                        Some(f) => slot.insert(f),
                        None => continue, // no backend: drop, as a closed port would
                    }
                }
            }
        };
        flow.last.store(
            now.duration_since(epoch).as_millis() as u64,
            Ordering::Relaxed,
        );
        let datagram = match &flow.header {
            Some(h) => {
                let start = HEADROOM - h.len();
                buf[start..HEADROOM].copy_from_slice(h);
                &buf[start..HEADROOM + n]
            }
            None => &buf[HEADROOM..HEADROOM + n],
        };
        if flow.upstream.send(datagram).await.is_ok() {
            flow.backend
                .stats
                .bytes_in
                .fetch_add(n as u64, Ordering::Relaxed);
        }
    }
}

/// A new flow on the backend the snapshot chooses: a connected socket to it and a task
/// relaying its replies.
fn open(
    lb: &Balancer,
    snap: &Snapshot,
    front: &Arc<UdpSocket>,
    client: SocketAddr,
    local: SocketAddr,
    backend_port: Option<u16>,
    epoch: Instant,
) -> Option<Flow> {
    let key = select::flow_key(lb.config.distribution, client, local, true);
    let candidates = snap
        .eligible
        .iter()
        .map(|&i| (i, snap.backends[i].addr, snap.backends[i].weight));
    let i = select::pick(key, candidates, &[])?;
    let backend = snap.backends[i].clone();
    let mut addr = backend.addr;
    if let Some(p) = backend_port {
        addr.set_port(p);
    }
    let upstream = match connected(addr) {
        Ok(s) => Arc::new(s),
        Err(e) => {
            tracing::debug!(lb = %lb.config.name, backend = %addr, error = %e, "udp flow socket");
            return None;
        }
    };
    backend.stats.total.fetch_add(1, Ordering::Relaxed);
    backend.stats.active.fetch_add(1, Ordering::Relaxed);
    let last = Arc::new(AtomicU64::new(epoch.elapsed().as_millis() as u64));
    let ended = Arc::new(AtomicBool::new(false));
    let replies = tokio::spawn(relay_replies(
        upstream.clone(),
        front.clone(),
        client,
        backend.clone(),
        last.clone(),
        ended.clone(),
        epoch,
    ));
    Some(Flow {
        backend,
        upstream,
        last,
        ended,
        checked: snap.generation,
        until: None,
        header: lb
            .config
            .proxy_protocol
            .then(|| proxy_v2::header(client, local, proxy_v2::Transport::Datagram)),
        replies,
    })
}

/// A socket of our own connected to `addr`, so only its replies arrive on it.
fn connected(addr: SocketAddr) -> io::Result<UdpSocket> {
    let bind: SocketAddr = if addr.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        ([0u16; 8], 0).into()
    };
    let s = std::net::UdpSocket::bind(bind)?;
    s.connect(addr)?;
    s.set_nonblocking(true)?;
    UdpSocket::from_std(s)
}

async fn relay_replies(
    upstream: Arc<UdpSocket>,
    front: Arc<UdpSocket>,
    client: SocketAddr,
    backend: Arc<Backend>,
    last: Arc<AtomicU64>,
    ended: Arc<AtomicBool>,
    epoch: Instant,
) {
    let mut buf = vec![0u8; 65536];
    let mut kill = backend.stats.kill.subscribe();
    kill.mark_unchanged();
    loop {
        tokio::select! {
            r = upstream.recv(&mut buf) => {
                let Ok(n) = r else { continue };
                if front.send_to(&buf[..n], client).await.is_ok() {
                    backend.stats.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
                    last.store(epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
                }
            }
            _ = kill.changed() => {
                // Drained or reset: the flow is forgotten; its next datagram chooses again.
                ended.store(true, Ordering::Relaxed);
                return;
            }
        }
    }
}
