//! The smallest io_uring TCP relay: one thread, one ring, a multishot accept, then for each
//! client a connect to the one backend and a recv → send loop each way; an end of stream is
//! passed on as a half-close, and the flow is closed once both ways ended. No health, no
//! timeouts, no limits: it is not a load balancer, only the floor of what relaying through
//! io_uring costs on this machine, for `bench/proxy/run` to set beside Tandem's tokio relay and
//! HAProxy's epoll loop (issue 19 asked whether io_uring would put Tandem 10% ahead).
//!
//! Usage: proxy-uring-sketch LISTEN BACKEND   (IPv4 addresses with ports)

use io_uring::{IoUring, cqueue, opcode, squeue, types};
use std::collections::VecDeque;
use std::net::{SocketAddrV4, TcpListener};
use std::os::fd::{AsRawFd, RawFd};

/// Bytes buffered per direction, as Tandem's relay.
const BUF: usize = 16 * 1024;
/// The multishot accept's user data; every other operation carries `slot << 8 | Op`.
const ACCEPT: u64 = u64::MAX;

#[derive(Clone, Copy, PartialEq, Debug)]
enum Op {
    RecvClient,
    RecvBackend,
    SendClient,
    SendBackend,
    Connect,
    ShutClient,
    ShutBackend,
}

const OPS: [Op; 7] = [
    Op::RecvClient,
    Op::RecvBackend,
    Op::SendClient,
    Op::SendBackend,
    Op::Connect,
    Op::ShutClient,
    Op::ShutBackend,
];
/// Closes, whose completions need nothing.
const CLOSE: u64 = 0xff;

/// One direction: the bytes read and not yet sent.
#[derive(Debug)]
struct Half {
    buf: Vec<u8>,
    len: usize,
    sent: usize,
    ended: bool,
}

impl Half {
    fn new() -> Half {
        // Never zeroed or read by us as a slice: the kernel writes, the kernel reads.
        Half {
            buf: Vec::with_capacity(BUF),
            len: 0,
            sent: 0,
            ended: false,
        }
    }
}

#[derive(Debug)]
struct Flow {
    client: RawFd,
    backend: RawFd,
    /// Client → backend.
    up: Half,
    /// Backend → client.
    down: Half,
    connected: bool,
    /// Operations submitted and not completed: the buffers stay until they are 0.
    pending: u32,
    failed: bool,
}

struct Relay {
    flows: Vec<Option<Flow>>,
    free: Vec<usize>,
    queue: VecDeque<squeue::Entry>,
    backend: libc::sockaddr_in,
}

impl Relay {
    fn flow(&mut self, i: usize) -> &mut Flow {
        self.flows[i]
            .as_mut()
            .expect("a completion for a live flow")
    }

    fn submit(&mut self, i: usize, op: Op, e: squeue::Entry) {
        self.flow(i).pending += 1;
        self.queue
            .push_back(e.user_data(((i as u64) << 8) | op as u64));
    }

    fn recv(&mut self, i: usize, op: Op) {
        let f = self.flow(i);
        let (fd, half) = match op {
            Op::RecvClient => (f.client, &mut f.up),
            _ => (f.backend, &mut f.down),
        };
        let e = opcode::Recv::new(types::Fd(fd), half.buf.as_mut_ptr(), BUF as u32).build();
        self.submit(i, op, e);
    }

    fn send(&mut self, i: usize, op: Op) {
        let f = self.flow(i);
        let (fd, half) = match op {
            Op::SendBackend => (f.backend, &f.up),
            _ => (f.client, &f.down),
        };
        // SAFETY: `sent < len <= BUF`, within the buffer's capacity.
        let from = unsafe { half.buf.as_ptr().add(half.sent) };
        let e = opcode::Send::new(types::Fd(fd), from, (half.len - half.sent) as u32)
            .flags(libc::MSG_NOSIGNAL)
            .build();
        self.submit(i, op, e);
    }

    fn shutdown(&mut self, i: usize, op: Op) {
        let f = self.flow(i);
        let fd = if op == Op::ShutBackend {
            f.backend
        } else {
            f.client
        };
        self.submit(
            i,
            op,
            opcode::Shutdown::new(types::Fd(fd), libc::SHUT_WR).build(),
        );
    }

    fn accepted(&mut self, client: RawFd) {
        // SAFETY: plain system calls on descriptors this relay owns.
        let backend =
            unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        if backend < 0 {
            unsafe { libc::close(client) };
            return;
        }
        let one: libc::c_int = 1;
        for fd in [client, backend] {
            // SAFETY: `one` outlives the call.
            unsafe {
                libc::setsockopt(
                    fd,
                    libc::IPPROTO_TCP,
                    libc::TCP_NODELAY,
                    (&one as *const libc::c_int).cast(),
                    4,
                )
            };
        }
        let flow = Flow {
            client,
            backend,
            up: Half::new(),
            down: Half::new(),
            connected: false,
            pending: 0,
            failed: false,
        };
        let i = match self.free.pop() {
            Some(i) => {
                self.flows[i] = Some(flow);
                i
            }
            None => {
                self.flows.push(Some(flow));
                self.flows.len() - 1
            }
        };
        let addr = (&self.backend as *const libc::sockaddr_in).cast();
        let len = std::mem::size_of::<libc::sockaddr_in>() as u32;
        self.submit(
            i,
            Op::Connect,
            opcode::Connect::new(types::Fd(backend), addr, len).build(),
        );
        // The request is read while the backend connects.
        self.recv(i, Op::RecvClient);
    }

    fn complete(&mut self, i: usize, op: Op, res: i32) {
        let f = self.flow(i);
        f.pending -= 1;
        if f.failed {
            return self.release(i);
        }
        if res < 0 && !matches!(op, Op::ShutClient | Op::ShutBackend) {
            return self.fail(i);
        }
        let n = res as usize;
        match op {
            Op::Connect => {
                f.connected = true;
                let (has, ended) = (f.up.len > 0, f.up.ended);
                self.recv(i, Op::RecvBackend);
                if has {
                    self.send(i, Op::SendBackend);
                } else if ended {
                    self.shutdown(i, Op::ShutBackend);
                }
            }
            Op::RecvClient | Op::RecvBackend => {
                let (half, send, shut, ready) = match op {
                    Op::RecvClient => (&mut f.up, Op::SendBackend, Op::ShutBackend, f.connected),
                    _ => (&mut f.down, Op::SendClient, Op::ShutClient, true),
                };
                if n == 0 {
                    half.ended = true;
                    if ready {
                        self.shutdown(i, shut);
                    }
                } else {
                    (half.len, half.sent) = (n, 0);
                    if ready {
                        self.send(i, send);
                    }
                }
            }
            Op::SendBackend | Op::SendClient => {
                let (half, recv) = match op {
                    Op::SendBackend => (&mut f.up, Op::RecvClient),
                    _ => (&mut f.down, Op::RecvBackend),
                };
                half.sent += n;
                if half.sent < half.len {
                    self.send(i, op);
                } else {
                    half.len = 0;
                    self.recv(i, recv);
                }
            }
            Op::ShutClient | Op::ShutBackend => self.release(i),
        }
    }

    /// A reset or refusal: both sockets are shut so that their pending operations complete.
    fn fail(&mut self, i: usize) {
        let f = self.flow(i);
        f.failed = true;
        // SAFETY: descriptors this flow owns.
        unsafe {
            libc::shutdown(f.client, libc::SHUT_RDWR);
            libc::shutdown(f.backend, libc::SHUT_RDWR);
        }
        self.release(i);
    }

    /// Closes a flow that failed or ended both ways, once the kernel holds none of its buffers.
    fn release(&mut self, i: usize) {
        let f = self.flow(i);
        if !(f.failed || (f.up.ended && f.down.ended)) || f.pending > 0 {
            return;
        }
        for fd in [f.client, f.backend] {
            self.queue
                .push_back(opcode::Close::new(types::Fd(fd)).build().user_data(CLOSE));
        }
        self.flows[i] = None;
        self.free.push(i);
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(listen), Some(backend)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: proxy-uring-sketch LISTEN BACKEND");
        std::process::exit(2);
    };
    let listen: SocketAddrV4 = listen.parse().expect("LISTEN: an IPv4 address and port");
    let backend: SocketAddrV4 = backend.parse().expect("BACKEND: an IPv4 address and port");
    let listener = TcpListener::bind(listen).expect("bind LISTEN");
    // Measured best of the setups on this machine: task work run cooperatively, one submitter.
    let mut ring: IoUring = IoUring::builder()
        .setup_single_issuer()
        .setup_coop_taskrun()
        .build(4096)
        .expect("an io_uring (is io_uring_disabled set?)");
    let mut relay = Relay {
        flows: Vec::new(),
        free: Vec::new(),
        queue: VecDeque::new(),
        backend: libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: backend.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(*backend.ip()).to_be(),
            },
            sin_zero: [0; 8],
        },
    };
    let accept = || {
        opcode::AcceptMulti::new(types::Fd(listener.as_raw_fd()))
            .build()
            .user_data(ACCEPT)
    };
    relay.queue.push_back(accept());
    let mut done = Vec::with_capacity(1024);
    loop {
        {
            let mut sq = ring.submission();
            while let Some(e) = relay.queue.front() {
                // SAFETY: every buffer and address an entry points at lives in `relay` until
                // the entry's completion (`pending`).
                if unsafe { sq.push(e) }.is_err() {
                    break;
                }
                relay.queue.pop_front();
            }
        }
        ring.submit_and_wait(1).expect("io_uring_enter");
        done.extend(
            ring.completion()
                .map(|c| (c.user_data(), c.result(), c.flags())),
        );
        for (data, res, flags) in done.drain(..) {
            if data == ACCEPT {
                if res >= 0 {
                    relay.accepted(res);
                }
                if !cqueue::more(flags) {
                    relay.queue.push_back(accept());
                }
            } else if data & 0xff != CLOSE {
                relay.complete((data >> 8) as usize, OPS[(data & 0xff) as usize], res);
            }
        }
    }
}
