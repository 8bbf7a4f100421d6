//! One map of every address the topology binds: the API, the DNS listeners (UDP and TCP), each
//! load balancer's frontend and rule ports, each database's frontends (its internal load
//! balancers `DB@SITE`) and members (PostgreSQL and health), and each scale set's port ranges
//! on its `bind` address. Each address is noted with its span where the file is read, and
//! `check` reports every clash at once.
//!
//! Two binds clash when they share a protocol, their ports overlap, and their addresses do:
//! the same address, or a wildcard (`0.0.0.0`, `[::]`) and any address of its family. A `[::]`
//! socket without `IPV6_V6ONLY` also receives IPv4, so it overlaps IPv4 addresses too; the DNS
//! listeners and PostgreSQL set that option, the others do not. A scale set's ports count for
//! TCP and UDP alike, since its instances may use either. Port 0 (the kernel picks) never
//! clashes.
//!
//! Load balancers bind with `SO_REUSEPORT`, so a clash between two of them is not caught by
//! the kernel: both bind, and the kernel splits flows between them.
//!
//! In cluster mode each site's node runs on its own machine: binds clash only within one site
//! (its tiers and its node's API and DNS listeners), and `[tandem] api` is not bound.

use std::net::{IpAddr, SocketAddr};

use crate::diag::{Code, Span};
use crate::read::Cx;

/// Transport protocols of a bind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Proto {
    Tcp,
    Udp,
    Both,
}

impl Proto {
    fn tcp(self) -> bool {
        matches!(self, Proto::Tcp | Proto::Both)
    }
    fn udp(self) -> bool {
        matches!(self, Proto::Udp | Proto::Both)
    }
}

/// One address (or port range) the topology binds.
#[derive(Clone, Debug)]
pub(crate) struct Bind {
    /// What binds it, as messages name it: "load balancer `edge-web`".
    what: String,
    ip: IpAddr,
    /// First and last port.
    ports: (u16, u16),
    proto: Proto,
    /// A `[::]` bind that does not receive IPv4.
    v6only: bool,
    /// Where the file writes it; `None` for a default (the API's address).
    span: Option<Span>,
    /// The site whose machine binds it (cluster mode); `None`: the single process's.
    site: Option<String>,
}

impl Cx {
    /// Notes an address the topology binds.
    pub(crate) fn bind(
        &mut self,
        what: String,
        addr: SocketAddr,
        proto: Proto,
        span: Option<Span>,
    ) {
        self.bind_range(what, addr.ip(), (addr.port(), addr.port()), proto, span);
    }

    /// Notes a range of ports the topology binds on one address.
    pub(crate) fn bind_range(
        &mut self,
        what: String,
        ip: IpAddr,
        ports: (u16, u16),
        proto: Proto,
        span: Option<Span>,
    ) {
        if ports.0 == 0 {
            return; // the kernel picks a free port
        }
        self.binds.push(Bind {
            what,
            ip,
            ports,
            proto,
            v6only: false,
            span,
            site: None,
        });
    }

    /// How many binds are noted so far: pass it to [`Cx::binds_in_site`].
    pub(crate) fn bind_mark(&self) -> usize {
        self.binds.len()
    }

    /// The binds noted since `mark` are made by `site`'s machine.
    pub(crate) fn binds_in_site(&mut self, mark: usize, site: Option<&str>) {
        for b in self.binds.iter_mut().skip(mark) {
            b.site = site.map(str::to_string);
        }
    }

    /// The last bind noted does not receive IPv4 on `[::]` (it sets `IPV6_V6ONLY`).
    pub(crate) fn v6only(&mut self) {
        if let Some(b) = self.binds.last_mut() {
            b.v6only = true;
        }
    }
}

/// Reports every bind that clashes with one before it in the file (defaults count as first),
/// at the later one, naming the earlier one and its line.
/// In cluster mode only binds of one site can clash.
pub(crate) fn check(cx: &mut Cx, cluster_mode: bool) {
    let mut binds = std::mem::take(&mut cx.binds);
    if cluster_mode {
        binds.retain(|b| b.site.is_some());
    }
    binds.sort_by_key(|b| b.span.as_ref().map_or(0, |s| s.start + 1));
    for (i, b) in binds.iter().enumerate() {
        let Some((a, proto)) = binds[..i]
            .iter()
            .filter(|a| !cluster_mode || a.site == b.site)
            .find_map(|a| overlap(a, b).map(|p| (a, p)))
        else {
            continue;
        };
        let Some(span) = b.span.clone() else {
            continue;
        };
        let proto = match proto {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Both => "tcp and udp",
        };
        let first = match &a.span {
            Some(s) => format!(
                "{} binds {} on line {}",
                a.what,
                text(a),
                cx.line_of(s.start)
            ),
            None => format!("{} binds {} by default", a.what, text(a)),
        };
        cx.error(
            Code::AddressInUse,
            span,
            format!(
                "{}: {} ({proto}) is already bound by {}",
                b.what,
                text(b),
                a.what
            ),
            format!("{first}; give each its own address or port"),
        );
    }
    cx.binds = binds;
}

/// The protocols two binds share on an overlapping address and port, if any.
fn overlap(a: &Bind, b: &Bind) -> Option<Proto> {
    let proto = match (
        a.proto.tcp() && b.proto.tcp(),
        a.proto.udp() && b.proto.udp(),
    ) {
        (true, true) => Proto::Both,
        (true, false) => Proto::Tcp,
        (false, true) => Proto::Udp,
        (false, false) => return None,
    };
    let ports = a.ports.0 <= b.ports.1 && b.ports.0 <= a.ports.1;
    (ports && (covers(a, b.ip) || covers(b, a.ip))).then_some(proto)
}

/// Whether a bind receives traffic sent to `ip`.
fn covers(b: &Bind, ip: IpAddr) -> bool {
    match (b.ip, ip) {
        (x, y) if x == y => true,
        (IpAddr::V4(x), IpAddr::V4(_)) => x.is_unspecified(),
        (IpAddr::V6(x), IpAddr::V6(_)) => x.is_unspecified(),
        (IpAddr::V6(x), IpAddr::V4(_)) => x.is_unspecified() && !b.v6only,
        (IpAddr::V4(_), IpAddr::V6(_)) => false,
    }
}

/// `127.0.0.1:80`, `[::1]:80`, `127.0.1.1:20000-20099`.
fn text(b: &Bind) -> String {
    let ip = match b.ip {
        IpAddr::V4(a) => a.to_string(),
        IpAddr::V6(a) => format!("[{a}]"),
    };
    if b.ports.0 == b.ports.1 {
        format!("{ip}:{}", b.ports.0)
    } else {
        format!("{ip}:{}-{}", b.ports.0, b.ports.1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bind(addr: &str, proto: Proto, v6only: bool) -> Bind {
        let a: SocketAddr = addr.parse().unwrap_or_else(|_| panic!("{addr}"));
        Bind {
            what: addr.into(),
            ip: a.ip(),
            ports: (a.port(), a.port()),
            proto,
            v6only,
            span: Some(0..1),
            site: None,
        }
    }

    #[test]
    fn clashes_need_a_shared_protocol_port_and_address() {
        let tcp = |a| bind(a, Proto::Tcp, false);
        let udp = |a| bind(a, Proto::Udp, false);
        assert_eq!(
            overlap(&tcp("127.0.0.1:80"), &tcp("127.0.0.1:80")),
            Some(Proto::Tcp)
        );
        assert_eq!(overlap(&tcp("127.0.0.1:80"), &udp("127.0.0.1:80")), None);
        assert_eq!(overlap(&tcp("127.0.0.1:80"), &tcp("127.0.0.1:81")), None);
        assert_eq!(overlap(&tcp("127.0.0.1:80"), &tcp("127.0.0.2:80")), None);
        assert_eq!(
            overlap(
                &bind("127.0.0.1:53", Proto::Both, false),
                &udp("127.0.0.1:53")
            ),
            Some(Proto::Udp)
        );
    }

    #[test]
    fn wildcards_cover_their_family_and_dual_stack_covers_ipv4() {
        let tcp = |a| bind(a, Proto::Tcp, false);
        assert!(overlap(&tcp("0.0.0.0:80"), &tcp("127.0.0.1:80")).is_some());
        assert!(overlap(&tcp("127.0.0.1:80"), &tcp("0.0.0.0:80")).is_some());
        assert!(overlap(&tcp("0.0.0.0:80"), &tcp("[::1]:80")).is_none());
        assert!(overlap(&tcp("[::]:80"), &tcp("[::1]:80")).is_some());
        assert!(overlap(&tcp("[::]:80"), &tcp("127.0.0.1:80")).is_some());
        let v6only = bind("[::]:53", Proto::Both, true);
        assert!(overlap(&v6only, &tcp("127.0.0.1:53")).is_none());
        assert!(overlap(&v6only, &bind("0.0.0.0:53", Proto::Both, false)).is_none());
    }

    #[test]
    fn port_ranges_overlap_by_any_port() {
        let range = |lo, hi| Bind {
            ports: (lo, hi),
            ..bind("127.0.0.1:1", Proto::Both, false)
        };
        assert!(overlap(&range(20000, 20099), &range(20099, 20200)).is_some());
        assert!(overlap(&range(20000, 20099), &range(20100, 20200)).is_none());
    }
}
