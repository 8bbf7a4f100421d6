//! The L4 load balancer: pools of backends chosen by weighted rendezvous hashing ([`select`]),
//! kept current with health and operator actions ([`balancer`]), and the TCP and UDP relays
//! that carry flows ([`tcp`], [`udp`]), optionally announcing the client with PROXY protocol v2
//! ([`proxy_v2`]).

pub mod balancer;
pub mod proxy_v2;
pub mod select;
pub mod splice;
pub mod tcp;
pub mod udp;

use std::io;
use std::sync::Arc;

use model::LbProtocol;
use tokio::task::JoinHandle;

pub use balancer::{BackendHealth, Balancer, View};

/// A load balancer with its listeners running. Dropping it stops them.
#[derive(Debug)]
pub struct Running {
    pub balancer: Arc<Balancer>,
    tasks: Vec<JoinHandle<()>>,
}

impl Running {
    /// Binds every frontend (`listeners` sockets each, sharing the port) and starts relaying.
    /// Must run inside a tokio runtime.
    pub fn start(balancer: Arc<Balancer>, listeners: usize) -> io::Result<Self> {
        let mut tasks = Vec::new();
        for (addr, backend_port) in balancer.frontends() {
            for _ in 0..listeners.max(1) {
                let task = match balancer.config.protocol {
                    LbProtocol::Tcp => tokio::spawn(tcp::serve(
                        tcp::listener(addr)?,
                        balancer.clone(),
                        backend_port,
                    )),
                    LbProtocol::Udp => tokio::spawn(udp::serve(
                        udp::socket(addr)?,
                        balancer.clone(),
                        backend_port,
                    )),
                };
                tasks.push(task);
            }
        }
        Ok(Running { balancer, tasks })
    }

    pub fn stop(&mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop();
    }
}
