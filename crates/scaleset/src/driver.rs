//! Instance drivers: how an instance runs. The process driver runs each instance as a child
//! process in its own process group, with its output in a log file; containers and Kubernetes
//! can come later behind the same trait.

use std::fmt::Debug;
use std::fs::OpenOptions;
use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What to start.
#[derive(Clone, Debug)]
pub struct Spec {
    pub id: String,
    /// Program and arguments, placeholders filled in.
    pub argv: Vec<String>,
    /// Where its stdout and stderr go.
    pub log: PathBuf,
    /// Environment added to Tandem's: `TANDEM_INSTANCE`, `TANDEM_SITE`, `TANDEM_SCALE_SET`.
    pub env: Vec<(String, String)>,
    /// Start from an empty environment instead of Tandem's: `env` is all the process gets.
    pub clear_env: bool,
    /// Outlive Tandem: no parent-death signal, not killed when its handle is dropped (a
    /// database member, adopted by the next Tandem). Stopping it is still Tandem's.
    pub detached: bool,
    /// Run as this user and group (uid, gid) instead of Tandem's own: servers such as
    /// PostgreSQL refuse to run as root.
    pub user: Option<(u32, u32)>,
}

/// Starts instances.
pub trait Driver: Send + Sync + Debug {
    fn start(&self, spec: &Spec) -> io::Result<Box<dyn Instance>>;
}

/// A started instance.
pub trait Instance: Send + Debug {
    /// Its process id, when it is a process.
    fn pid(&self) -> Option<u32>;
    /// Completes when it exits on its own, with how it ended. Cancel-safe.
    fn wait(&mut self) -> BoxFuture<'_, String>;
    /// Asks it to stop, gives it `grace`, then kills it; completes once it is gone.
    fn stop(&mut self, grace: Duration) -> BoxFuture<'_, String>;
}

/// Runs instances as child processes.
#[derive(Clone, Debug, Default)]
pub struct ProcessDriver {
    /// The `tandem` executable. When set, a command named `tandem` runs this executable, and
    /// every instance is started through `tandem exec-instance`, which arranges for the kernel
    /// to kill the instance if Tandem itself dies (even by SIGKILL), then execs the command.
    pub tandem: Option<PathBuf>,
}

impl Driver for ProcessDriver {
    fn start(&self, spec: &Spec) -> io::Result<Box<dyn Instance>> {
        let (program, args) = spec
            .argv
            .split_first()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "empty command"))?;
        if let Some(dir) = spec.log.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&spec.log)?;
        let mut cmd = match self.tandem.as_ref().filter(|_| !spec.detached) {
            Some(tandem) => {
                let mut c = tokio::process::Command::new(tandem);
                c.arg("exec-instance")
                    .arg("--parent")
                    .arg(std::process::id().to_string())
                    .arg("--");
                c.arg(if program == "tandem" {
                    tandem.as_os_str()
                } else {
                    program.as_ref()
                });
                c
            }
            None => tokio::process::Command::new(program),
        };
        if let Some((uid, gid)) = spec.user {
            cmd.uid(uid).gid(gid);
        }
        if spec.clear_env {
            cmd.env_clear();
        }
        cmd.args(args)
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            // Backstop: dropping the handle kills the process (unless it is to outlive us).
            .kill_on_drop(!spec.detached);
        // Started from a long-lived runtime thread: the kernel's parent-death signal follows
        // the thread that forked, so a short-lived blocking thread must not start instances.
        let child = cmd.spawn()?;
        Ok(Box::new(Process { child }))
    }
}

#[derive(Debug)]
struct Process {
    child: tokio::process::Child,
}

fn describe(status: io::Result<std::process::ExitStatus>) -> String {
    match status {
        Ok(s) => s.to_string(),
        Err(e) => format!("wait failed: {e}"),
    }
}

impl Instance for Process {
    fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    fn wait(&mut self) -> BoxFuture<'_, String> {
        Box::pin(async move { describe(self.child.wait().await) })
    }

    fn stop(&mut self, grace: Duration) -> BoxFuture<'_, String> {
        Box::pin(async move {
            let Some(pid) = self.child.id() else {
                return describe(self.child.wait().await); // already reaped
            };
            let group = Pid::from_raw(pid as i32);
            let _ = killpg(group, Signal::SIGTERM);
            if let Ok(s) = tokio::time::timeout(grace, self.child.wait()).await {
                let _ = killpg(group, Signal::SIGKILL); // anything it left in its group
                return describe(s);
            }
            let _ = killpg(group, Signal::SIGKILL);
            format!(
                "{} (killed after {grace:?})",
                describe(self.child.wait().await)
            )
        })
    }
}

/// `tandem exec-instance --parent PID -- COMMAND…`: asks the kernel to SIGKILL this process
/// when its parent dies, checks the parent is still the one that started it, then becomes
/// the instance. Returns only on failure.
pub fn exec_instance(parent: u32, argv: &[String]) -> io::Error {
    use std::os::unix::process::CommandExt as _;
    if let Err(e) = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL) {
        return io::Error::other(format!("cannot set the parent-death signal: {e}"));
    }
    // The parent may have died before the signal was armed.
    if std::os::unix::process::parent_id() != parent {
        return io::Error::other("tandem exited before the instance started");
    }
    let Some((program, args)) = argv.split_first() else {
        return io::Error::new(io::ErrorKind::InvalidInput, "empty command");
    };
    std::process::Command::new(program).args(args).exec()
}

/// CPU time (user + system) a process has used, from `/proc/PID/stat`.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split(' ').skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .filter(|&h| h > 0)
        .unwrap_or(100) as u64;
    Some(Duration::from_micros((utime + stime) * 1_000_000 / hz))
}

/// Keeps a log that a running process appends to under `max` bytes, as logrotate's
/// copytruncate does: past `max`, its content is copied to `LOG.1` (replacing the one before)
/// and the file emptied; the process, writing with `O_APPEND`, carries on at its new end.
/// Lines written between the copy and the truncation are lost. True when it rotated.
pub fn rotate_log(path: &std::path::Path, max: u64) -> io::Result<bool> {
    let len = match std::fs::metadata(path) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    if len <= max {
        return Ok(false);
    }
    let mut old = path.as_os_str().to_owned();
    old.push(".1");
    std::fs::copy(path, &old)?;
    OpenOptions::new().write(true).open(path)?.set_len(0)?;
    Ok(true)
}
