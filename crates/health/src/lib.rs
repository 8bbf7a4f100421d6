//! Health probing: probers for http, https and tcp ([`probe`]), the pure per-target state
//! machine ([`state`]), and the engine that runs thousands of probes on their own phases and
//! publishes state changes ([`engine`]). [`targets`] says what a topology asks to probe.

pub mod engine;
pub mod http1;
pub mod probe;
pub mod state;
mod tls;

pub use engine::{Engine, Options, Report, Target, UnknownTarget};
pub use probe::{Destination, Failure, Outcome, Prober};
pub use state::{Change, Health, Status, Thresholds};

use model::{Pool, Target as EndpointTarget, Topology};

/// Every target the topology asks to probe: each endpoint of a monitored profile (its address,
/// host name, or load balancer frontend, on the monitor's port) and each static backend of a
/// probed load balancer (its address, on the monitor's port). Nested-profile endpoints take
/// their health from their children and are not probed.
pub fn targets(t: &Topology) -> Vec<Target> {
    let mut out = Vec::new();
    for p in &t.profiles {
        let Some(monitor) = p.monitor.as_ref().and_then(|m| t.monitor(m)) else {
            continue;
        };
        for e in &p.endpoints {
            let destination = match &e.target {
                EndpointTarget::Address(ip) => Destination::Addr((*ip, monitor.port).into()),
                EndpointTarget::Cname(host) => Destination::Host(host.clone(), monitor.port),
                EndpointTarget::LoadBalancer(lb) => match t.load_balancer(lb) {
                    Some(lb) => Destination::Addr((lb.frontend.ip(), monitor.port).into()),
                    None => continue,
                },
                EndpointTarget::Profile(_) => continue,
            };
            out.push(Target {
                id: endpoint_id(&p.name, &e.name),
                monitor: monitor.name.to_string(),
                destination,
                disabled: !e.enabled,
            });
        }
    }
    for lb in &t.load_balancers {
        let (Some(monitor), Pool::Addresses(backends)) =
            (lb.probe.as_ref().and_then(|m| t.monitor(m)), &lb.pool)
        else {
            continue;
        };
        for b in backends {
            out.push(Target {
                id: backend_id(&lb.name, b.address),
                monitor: monitor.name.to_string(),
                destination: Destination::Addr((b.address.ip(), monitor.port).into()),
                disabled: false,
            });
        }
    }
    out
}

/// The health target id of a profile endpoint.
pub fn endpoint_id(profile: &str, endpoint: &str) -> String {
    format!("profile/{profile}/{endpoint}")
}

/// The health target id of a load balancer's backend.
pub fn backend_id(lb: &str, addr: std::net::SocketAddr) -> String {
    format!("lb/{lb}/{addr}")
}

/// The health target id of a scale set's instance.
pub fn instance_id(scale_set: &str, instance: &str) -> String {
    format!("scaleset/{scale_set}/{instance}")
}
