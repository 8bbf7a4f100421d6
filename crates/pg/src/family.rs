//! A PostgreSQL server's processes. Every process the postmaster starts makes itself a session
//! and process group leader (`setsid` in `InitPostmasterChild`), so a signal to the
//! postmaster's process group reaches the postmaster alone: its backends, WAL sender and
//! receiver, checkpointer… outlive it, attached to its shared memory (a restart or `pg_rewind`
//! then refuses the data directory). Killing a server means finding its whole family first,
//! through `/proc`, while the postmaster is still there to be its root.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Rounds of looking for processes started while the family is being stopped: each round
/// stops every process found, so a round finds only those forked just before their parent
/// stopped.
const ROUNDS: usize = 16;

/// Every process on the machine with its parent, from `/proc`.
fn parents() -> HashMap<i32, i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return HashMap::new();
    };
    dir.filter_map(|e| {
        let pid: i32 = e.ok()?.file_name().to_str()?.parse().ok()?;
        Some((pid, parent(pid)?))
    })
    .collect()
}

/// The fields of `/proc/PID/stat` after the command name (which is in parentheses and may
/// hold anything): the state first, then the parent.
fn stat(pid: i32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    Some(rest.split_whitespace().map(str::to_string).collect())
}

fn parent(pid: i32) -> Option<i32> {
    stat(pid)?.get(1)?.parse().ok()
}

/// Whether `pid` runs: it exists and is not a zombie (one that exited, its wait missing).
pub fn alive(pid: i32) -> bool {
    stat(pid).is_some_and(|f| f.first().is_some_and(|s| s != "Z"))
}

/// Every process descending from `root`, `root` excluded, parents before their children.
pub fn descendants(root: i32) -> Vec<i32> {
    let table = parents();
    let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
    for (&pid, &ppid) in &table {
        children.entry(ppid).or_default().push(pid);
    }
    let mut found = Vec::new();
    let mut queue = vec![root];
    let mut seen = HashSet::from([root]);
    while let Some(p) = queue.pop() {
        for &c in children.get(&p).map(Vec::as_slice).unwrap_or_default() {
            if seen.insert(c) {
                found.push(c);
                queue.push(c);
            }
        }
    }
    found
}

/// Kills `root` and every process descending from it with SIGKILL; returns the pids
/// signalled. The family is stopped first (SIGSTOP, top down, until a look through `/proc`
/// finds no new member), so no process can start another between the look and the kill;
/// the postmaster dies last, once every child is signalled (its children would otherwise be
/// re-parented out of reach).
pub fn kill_family(root: i32) -> Vec<i32> {
    let pid = |p: i32| Pid::from_raw(p);
    if kill(pid(root), Signal::SIGSTOP).is_err() {
        return Vec::new(); // gone already (or not ours)
    }
    let mut family: Vec<i32> = Vec::new();
    let mut known = HashSet::new();
    for _ in 0..ROUNDS {
        let new: Vec<i32> = descendants(root)
            .into_iter()
            .filter(|p| !known.contains(p))
            .collect();
        if new.is_empty() {
            break;
        }
        for &p in &new {
            let _ = kill(pid(p), Signal::SIGSTOP);
            known.insert(p);
        }
        family.extend(new);
    }
    for &p in family.iter().rev() {
        let _ = kill(pid(p), Signal::SIGKILL);
    }
    let _ = kill(pid(root), Signal::SIGKILL);
    family.push(root);
    family
}

/// Processes running `exe` whose working directory is `data`: a server's processes once its
/// postmaster is gone (PostgreSQL's processes run in their data directory and exec nothing
/// else). Paths are compared resolved.
pub fn in_data_dir(exe: &Path, data: &Path) -> Vec<i32> {
    let (Ok(exe), Ok(data)) = (exe.canonicalize(), data.canonicalize()) else {
        return Vec::new();
    };
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|p| {
            let link = |what: &str| std::fs::read_link(format!("/proc/{p}/{what}")).ok();
            link("exe").as_deref() == Some(exe.as_path())
                && link("cwd").as_deref() == Some(data.as_path())
        })
        .collect()
}

/// SIGKILL to every process [`in_data_dir`]; returns them.
pub fn kill_in_data_dir(exe: &Path, data: &Path) -> Vec<i32> {
    let left = in_data_dir(exe, data);
    for &p in &left {
        let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
    }
    left
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::process::{Command, Stdio};
    use std::time::Duration;
    use tokio::time::Instant;

    /// A shell whose children each lead a session of their own, as PostgreSQL's do: killing
    /// the family kills them all, though none is in the root's process group.
    #[test]
    fn a_family_in_sessions_of_its_own_is_killed_whole() {
        let mut root = Command::new("sh")
            .arg("-c")
            .arg("setsid sleep 300 & setsid sh -c 'sleep 300 & wait' & wait")
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let pid = root.id() as i32;
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut found = descendants(pid);
        // sleep; setsid → sh → sleep
        while found.len() < 3 {
            assert!(Instant::now() < deadline, "children started: {found:?}");
            std::thread::sleep(Duration::from_millis(10));
            found = descendants(pid);
        }
        let killed = kill_family(pid);
        for p in &found {
            assert!(killed.contains(p), "{p} in {killed:?}");
        }
        root.wait().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while found.iter().any(|&p| alive(p)) {
            assert!(Instant::now() < deadline, "survivors of {found:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(kill_family(pid).is_empty(), "nothing left to kill");
    }
}
