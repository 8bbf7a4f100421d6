//! The primary's watchdog in cluster mode: a small process of its own beside each primary
//! that kills the postmaster's whole family once the node has not renewed the lease for
//! [`crate::failover::fence_after`] of it. A node that dies or freezes (`kill -9`,
//! `kill -STOP`, an out-of-memory kill) can no longer fence its own primary, and the standby's
//! node promotes once the lease lapses in the store: the watchdog's deadline comes first, so two
//! members never take writes at once. Patroni arms a (soft)dog timer for the same reason; this
//! one ends the server, not the machine.
//!
//! The node arms it by writing a deadline to `FILE` (milliseconds of `CLOCK_MONOTONIC`, which
//! both processes share and no clock change moves), after every renewal, from the moment it
//! asked; it disarms it by removing the file (a fence, a stop, a switchover). The watchdog
//! ends by itself when the file is gone or its postmaster exited.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::time::Instant;

use crate::family;

/// How often the watchdog looks at its deadline: a small part of the third of the smallest
/// lease (1 s) that separates the deadline from the lease's expiry.
const POLL: Duration = Duration::from_millis(50);

/// Milliseconds of `CLOCK_MONOTONIC` at `at` (an instant of this process).
fn monotonic_ms(at: Instant) -> u64 {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| Duration::new(t.tv_sec() as u64, t.tv_nsec() as u32))
        .unwrap_or_default();
    let here = Instant::now();
    let t = if at >= here {
        now + (at - here)
    } else {
        now.saturating_sub(here - at)
    };
    t.as_millis() as u64
}

/// Sets the deadline in `file` to `at` (written aside, then renamed: never half read).
pub fn arm(file: &Path, at: Instant) -> io::Result<()> {
    let tmp = file.with_extension("watchdog.tmp");
    std::fs::write(&tmp, format!("{}\n", monotonic_ms(at)))?;
    std::fs::rename(&tmp, file)
}

/// Removes the deadline: the watchdog ends at its next look.
pub fn disarm(file: &Path) {
    let _ = std::fs::remove_file(file);
}

/// A watchdog process guarding one postmaster.
#[derive(Debug)]
pub struct Guard {
    /// The watchdog's pid and the postmaster it guards.
    pub pid: u32,
    pub postmaster: u32,
}

/// Starts `tandem watchdog` for `postmaster` (armed first, see [`arm`]): in a process group
/// of its own, so it outlives the node; its output in `log`.
pub fn spawn(
    tandem: &Path,
    postmaster: u32,
    postgres: &Path,
    data: &Path,
    file: &Path,
    log: &Path,
) -> io::Result<Guard> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let mut child = tokio::process::Command::new(tandem)
        .arg("watchdog")
        .arg("--pid")
        .arg(postmaster.to_string())
        .arg("--postgres")
        .arg(postgres)
        .arg("--data")
        .arg(data)
        .arg("--deadline-file")
        .arg(file)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .process_group(0)
        .kill_on_drop(false)
        .spawn()?;
    let pid = child.id().unwrap_or_default();
    // Reaped here while this process lives; adopted by init after.
    tokio::spawn(async move {
        let _ = child.wait().await;
    });
    Ok(Guard { pid, postmaster })
}

/// Whether `guard` still watches `postmaster`.
pub fn watches(guard: &Guard, postmaster: u32) -> bool {
    guard.postmaster == postmaster && family::alive(guard.pid as i32)
}

/// What ended a watchdog.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    /// The file was removed: the node stopped guarding.
    Disarmed,
    /// The postmaster exited by itself.
    Gone,
    /// The deadline passed: the postmaster's family was killed (their pids).
    Fenced(Vec<i32>),
}

/// `tandem watchdog`: looks every [`POLL`] until one of [`End`] happens.
pub fn run(postmaster: i32, postgres: &Path, data: &Path, file: &Path) -> End {
    loop {
        if !family::alive(postmaster) {
            return End::Gone;
        }
        let deadline = match std::fs::read_to_string(file) {
            Ok(text) => text.trim().parse::<u64>().ok(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return End::Disarmed,
            Err(_) => None,
        };
        if deadline.is_some_and(|d| monotonic_ms(Instant::now()) >= d) {
            let mut killed = family::kill_family(postmaster);
            killed.extend(family::kill_in_data_dir(postgres, data));
            disarm(file);
            return End::Fenced(killed);
        }
        std::thread::sleep(POLL);
    }
}

/// The deadline file of the member in `site`, in the database's directory.
pub fn file(dir: &Path, site: &str) -> PathBuf {
    dir.join(format!("{site}.watchdog"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A process past its deadline is killed with its family; one whose file is removed is
    /// left alone.
    #[test]
    fn past_the_deadline_the_family_is_killed_and_disarmed_it_is_left() {
        let dir = tempfile::tempdir().unwrap();
        let file = file(dir.path(), "edge");
        let mut child = std::process::Command::new("sleep")
            .arg("300")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        arm(&file, Instant::now() + Duration::from_millis(200)).unwrap();
        let started = Instant::now();
        let end = run(pid, Path::new("/nonexistent"), dir.path(), &file);
        assert_eq!(end, End::Fenced(vec![pid]));
        assert!(started.elapsed() >= Duration::from_millis(150));
        child.wait().unwrap();
        assert!(!file.exists(), "disarmed once it fired");

        let mut child = std::process::Command::new("sleep")
            .arg("300")
            .spawn()
            .unwrap();
        arm(&file, Instant::now() + Duration::from_secs(60)).unwrap();
        disarm(&file);
        assert_eq!(
            run(
                child.id() as i32,
                Path::new("/nonexistent"),
                dir.path(),
                &file
            ),
            End::Disarmed
        );
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
