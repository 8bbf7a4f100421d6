//! Bounds on the API's connections, so a flood of them (or clients that connect and say
//! nothing) cannot exhaust the memory and file descriptors the data plane in the same process
//! needs: at most [`Limits::max_connections`] at once (the next wait in the kernel's accept
//! queue), and each closed after [`Limits::idle_timeout`] with no byte either way. HAProxy's
//! `maxconn` and `timeout client` do the same for its frontends.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

/// The API's connection limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once, TLS handshakes included. Default 1,024.
    pub max_connections: usize,
    /// A connection with no byte read or written for this long is closed. Default 2 min (the
    /// event stream writes a keep-alive every 15 s, so it stays open).
    pub idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 1024,
            idle_timeout: Duration::from_secs(120),
        }
    }
}

/// A connection holding one of the slots, closed when idle too long.
#[derive(Debug)]
pub struct Guarded<IO> {
    io: IO,
    timeout: Duration,
    idle: Pin<Box<Sleep>>,
    _slot: OwnedSemaphorePermit,
}

impl<IO> Guarded<IO> {
    fn new(io: IO, timeout: Duration, slot: OwnedSemaphorePermit) -> Self {
        Guarded {
            io,
            timeout,
            idle: Box::pin(tokio::time::sleep(timeout)),
            _slot: slot,
        }
    }

    fn touch(&mut self) {
        let next = Instant::now() + self.timeout;
        self.idle.as_mut().reset(next);
    }

    /// Pending, unless the connection has been idle too long.
    fn idle_error<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        match self.idle.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "API connection idle too long",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Guarded<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(r) => {
                this.touch();
                Poll::Ready(r)
            }
            Poll::Pending => this.idle_error(cx),
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Guarded<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        match Pin::new(&mut this.io).poll_write(cx, buf) {
            Poll::Ready(r) => {
                this.touch();
                Poll::Ready(r)
            }
            Poll::Pending => this.idle_error(cx),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Accepts TCP connections within the limits: waits for a free slot before accepting.
#[derive(Debug)]
pub struct Slots {
    tcp: TcpListener,
    slots: Arc<Semaphore>,
    limits: Limits,
}

impl Slots {
    pub fn new(tcp: TcpListener, limits: Limits) -> Slots {
        Slots {
            tcp,
            slots: Arc::new(Semaphore::new(limits.max_connections.max(1))),
            limits,
        }
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.tcp.local_addr()
    }

    /// The next connection, once a slot is free. Accept errors (out of file descriptors) are
    /// logged and retried after a second, as axum's own listener does.
    pub async fn accept(&self) -> (Guarded<TcpStream>, SocketAddr) {
        // The semaphore is never closed.
        let Ok(slot) = self.slots.clone().acquire_owned().await else {
            return std::future::pending().await;
        };
        loop {
            match self.tcp.accept().await {
                Ok((stream, peer)) => {
                    return (Guarded::new(stream, self.limits.idle_timeout, slot), peer);
                }
                Err(e) => {
                    tracing::warn!("the API cannot accept a connection: {e}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }
}

impl axum::serve::Listener for Slots {
    type Io = Guarded<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        Slots::accept(self).await
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Slots::local_addr(self)
    }
}
