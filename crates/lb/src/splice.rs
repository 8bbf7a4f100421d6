//! Zero-copy relaying on Linux: bytes move socket → pipe → socket inside the kernel with
//! `splice(2)`, never through user space. The syscalls are nix's safe wrappers; readiness comes
//! from tokio, so a flow waits without blocking a thread.

use nix::fcntl::{OFlag, SpliceFFlags, splice};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Bytes moved per splice call (the default pipe capacity).
const CHUNK: usize = 64 * 1024;

/// A pipe to pass bytes through.
#[derive(Debug)]
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    pub fn new() -> io::Result<Self> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        Ok(Pipe { read, write })
    }
}

fn flags() -> SpliceFFlags {
    SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK
}

/// Moves up to one pipe's worth from `from` to `to` inside the kernel; 0 at end of stream.
pub async fn step(from: &TcpStream, to: &TcpStream, pipe: &Pipe) -> io::Result<usize> {
    let n = loop {
        from.readable().await?;
        match from.try_io(Interest::READABLE, || {
            splice(from.as_fd(), None, pipe.write.as_fd(), None, CHUNK, flags())
                .map_err(io::Error::from)
        }) {
            Ok(n) => break n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    };
    let mut left = n;
    while left > 0 {
        to.writable().await?;
        match to.try_io(Interest::WRITABLE, || {
            splice(pipe.read.as_fd(), None, to.as_fd(), None, left, flags())
                .map_err(io::Error::from)
        }) {
            Ok(m) => left -= m,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}
