//! UDP frontends: a flow per client address, pinned to one backend, its replies relayed back,
//! expired after `idle_timeout` without traffic either way. The flow table belongs to the one
//! task that reads the frontend socket, so it needs no lock.
//!
//! With `proxy_protocol`, every datagram to the backend starts with a PROXY protocol v2 header
//! (transport DGRAM, <https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt>): a datagram
//! stands alone, and that is how UDP receivers of PROXY v2 (dnsdist, BIND, PowerDNS) read it.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::balancer::{Backend, Balancer};
use crate::{proxy_v2, select};

/// Room before each received payload for a PROXY v2 header, so a datagram goes out header
/// first without copying the payload.
const HEADROOM: usize = proxy_v2::MAX_LEN;

struct Flow {
    backend: Arc<Backend>,
    upstream: Arc<UdpSocket>,
    /// Milliseconds since `epoch` of the last datagram either way.
    last: Arc<AtomicU64>,
    /// The PROXY v2 header every datagram to the backend starts with.
    header: Option<Vec<u8>>,
    replies: JoinHandle<()>,
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
    let local = front.local_addr().ok();
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
                let now = epoch.elapsed().as_millis() as u64;
                let idle_ms = idle.as_millis() as u64;
                flows.retain(|_, f| now.saturating_sub(f.last.load(Ordering::Relaxed)) < idle_ms);
                continue;
            }
        };
        let now = epoch.elapsed().as_millis() as u64;
        let flow = match flows.entry(client) {
            Entry::Occupied(f) => f.into_mut(),
            Entry::Vacant(slot) => {
                let Some(local) = local else { continue };
                match open(&lb, &front, client, local, backend_port, epoch).await {
                    Some(flow) => slot.insert(flow),
                    None => continue, // no backend: drop, as a closed port would
                }
            }
        };
        flow.last.store(now, Ordering::Relaxed);
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

/// A new flow: a connected socket to the chosen backend and a task relaying its replies.
async fn open(
    lb: &Balancer,
    front: &Arc<UdpSocket>,
    client: SocketAddr,
    local: SocketAddr,
    backend_port: Option<u16>,
    epoch: Instant,
) -> Option<Flow> {
    let snap = lb.snapshot();
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
    let bind: SocketAddr = if addr.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        ([0u16; 8], 0).into()
    };
    let upstream = UdpSocket::bind(bind).await.ok()?;
    upstream.connect(addr).await.ok()?;
    let upstream = Arc::new(upstream);
    backend.stats.total.fetch_add(1, Ordering::Relaxed);
    backend.stats.active.fetch_add(1, Ordering::Relaxed);
    let last = Arc::new(AtomicU64::new(epoch.elapsed().as_millis() as u64));
    let replies = tokio::spawn(relay_replies(
        upstream.clone(),
        front.clone(),
        client,
        backend.clone(),
        last.clone(),
        epoch,
    ));
    Some(Flow {
        backend,
        upstream,
        last,
        header: lb
            .config
            .proxy_protocol
            .then(|| proxy_v2::header(client, local, proxy_v2::Transport::Datagram)),
        replies,
    })
}

async fn relay_replies(
    upstream: Arc<UdpSocket>,
    front: Arc<UdpSocket>,
    client: SocketAddr,
    backend: Arc<Backend>,
    last: Arc<AtomicU64>,
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
                // Drained or reset: let the flow idle out at once.
                last.store(0, Ordering::Relaxed);
                return;
            }
        }
    }
}
