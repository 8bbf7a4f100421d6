//! Multi-site labs on one machine: a Linux network namespace per site, joined by a bridge, with
//! real processes (etcd members, Tandem nodes) inside and faults a test switches on and off.
//!
//! Needs root (`ip netns`); CI runs as root. Nothing is created in the root namespace.
//!
//! # Topology
//!
//! ```text
//!                         namespace  tdm-PID-N   (the "switch")
//!                        ┌──────────────────────────────────────┐
//!                        │                 br0                  │
//!                        │   s1 ──────┬──── s2 ────┬──── s100   │   one bridge, one port
//!                        └───┼────────┼─────┼──────┼─────┼──────┘   (veth end) per site
//!                            │ veth         │ veth       │ veth
//!            tdm-PID-N-edge  │   tdm-PID-N-region        │   tdm-PID-N-client
//!          ┌─────────────────┴─┐  ┌──────────┴────────┐  ┌─┴──────────────────┐
//!          │ eth0 198.18.1.10  │  │ eth0 198.18.2.10  │  │ eth0 198.18.100.10 │
//!          │      198.18.1.11… │  │      …            │  │                    │
//!          │ lo   127.0.0.1    │  │ lo   127.0.0.1    │  │ lo   127.0.0.1     │
//!          └───────────────────┘  └───────────────────┘  └────────────────────┘
//! ```
//!
//! # Addressing
//!
//! Site `i` (0-based, in the order given to [`Lab::new`]) owns `198.18.(i+1).0/24`; the optional
//! client namespace ([`Lab::with_client`], site name [`CLIENT`]) owns `198.18.100.0/24`. Every
//! namespace gets host `.10` ([`MAIN_HOST`]); [`Lab::add_ip`] adds more (a load balancer
//! frontend, an instance, a database member each get their own address). Addresses are put on
//! `eth0` with a `/16` prefix, so every address of every site is on-link: one L2 segment, no
//! routes. Each namespace has its own loopback (`127.0.0.1` works inside, and is private to the
//! site) and its own port space, so fixed ports (etcd's 2379/2380) never clash between sites or
//! between labs.
//!
//! Addresses stay inside `198.18.0.0/15`, the range reserved for network benchmarking
//! (RFC 2544, RFC 5735): it is never routed on the Internet and is unlikely to be used on the
//! machine's own networks, and as it only exists inside the lab's namespaces, the machine's
//! interfaces and routes are untouched and a test can never reach or disturb a real host.
//!
//! # Processes
//!
//! [`Lab::command`] builds `ip netns exec NS program`; `ip` enters the namespace and `exec`s the
//! program, so the child's pid is the program's pid (signals reach it directly).
//! [`Lab::spawn`] runs such a command with its output in a log file of the lab and returns a
//! [`Proc`] guard. [`Lab::in_site`] runs a closure on a thread inside a site's namespace: the
//! sockets it creates stay in that namespace, so a test can listen or connect "from" a site
//! without a helper process (create `std` sockets there, then convert them with `from_std`).
//!
//! # Faults
//!
//! - [`Lab::cut`] / [`Lab::heal`]: the site's port on the bridge goes down / up: a full
//!   partition of the site. Packets are lost silently (a connection attempt times out; it only
//!   fails with "no route to host" after the neighbour entry expires, seconds later), as on a
//!   real broken link. The site's own addresses keep working inside the site.
//! - [`Lab::cut_route`] / [`Lab::heal_route`]: from one site only, one destination becomes
//!   unreachable (`ip route add unreachable IP/32` in that site's namespace). A `blackhole` route
//!   would make `connect` fail with the odd `EINVAL` and `prohibit` with `EACCES`; `unreachable`
//!   gives `EHOSTUNREACH` ("No route to host") at once, which is what a prober sees when a router
//!   reports the host unreachable, and what it must treat as a failure without waiting for its
//!   timeout.
//!
//! # Cleanup
//!
//! Dropping the [`Lab`] (also while a test panics) kills every process inside its namespaces
//! (`ip netns pids`, `SIGKILL`), deletes the namespaces (which removes the bridge and veths) and
//! removes its temporary directory, after printing the tail of every log in it if the thread is
//! panicking. A process killed before it could drop its lab (a test timed out by nextest, a
//! `kill -9`) leaves its namespaces behind: their names carry the creating pid, and
//! [`Lab::new`] first removes, with their processes, the namespaces and directories of pids that
//! are no longer alive. By hand: `ip netns list | grep ^tdm-`.
//!
//! # Example
//!
//! ```no_run
//! # async fn demo() {
//! use testkit::netns::Lab;
//! let lab = Lab::with_client(&["edge", "region", "witness"]);
//! let etcd = lab.etcd_cluster(&["edge", "region", "witness"]);
//! etcd.wait_healthy().await;
//! let mut node = lab.command("edge", "tandem");
//! node.args(["up", "topology.toml", "--node", "edge-1"]);
//! let _node = lab.spawn(node, "edge-1");
//! lab.cut("edge");
//! let out = lab.command("client", "dig").arg("@198.18.2.10").output();
//! # }
//! ```

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::fs::File;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use nix::sched::CloneFlags;
use nix::sys::signal::kill;
use nix::unistd::Pid;

pub use nix::sys::signal::Signal;

/// Every namespace and temporary directory a lab creates starts with this.
pub const PREFIX: &str = "tdm-";
/// The host part every site gets: site `i` is reachable at `198.18.(i+1).10`.
pub const MAIN_HOST: u8 = 10;
/// The name of the client namespace of [`Lab::with_client`].
pub const CLIENT: &str = "client";
/// The third octet of the client's addresses.
const CLIENT_OCTET: u8 = 100;
/// Where `ip netns` keeps its namespaces.
const NETNS_DIR: &str = "/var/run/netns";
/// etcd's client and peer ports inside each site.
const ETCD_CLIENT_PORT: u16 = 2379;
const ETCD_PEER_PORT: u16 = 2380;

static LABS: AtomicU32 = AtomicU32::new(0);

/// A set of sites, each in its own network namespace, on one bridge. See the module docs.
/// Clones share the lab: it is removed when the last one is dropped.
#[derive(Clone)]
pub struct Lab {
    inner: Arc<Inner>,
}

struct Inner {
    /// `tdm-PID-N`: the switch namespace's name, the prefix of the others, the temp dir's name.
    id: String,
    dir: PathBuf,
    sites: Vec<Site>,
    /// Namespaces created so far (the switch first), so a failed setup cleans up what exists.
    created: Vec<String>,
}

struct Site {
    name: String,
    ns: String,
    octet: u8,
    /// This site's port on the bridge (the switch side of its veth pair).
    port: String,
}

impl Lab {
    /// Creates one namespace per site, in this order, each at `198.18.(i+1).10`, joined by a
    /// bridge in a switch namespace. Site names are short lowercase words (`edge`, `region-2`).
    ///
    /// Panics, saying so, when not run as root.
    pub fn new(sites: &[&str]) -> Lab {
        Lab::build(sites, false)
    }

    /// [`Lab::new`] plus a namespace named [`CLIENT`] at `198.18.100.10`: an outside user of
    /// the sites, e.g. for `dig` and `curl` (`lab.command("client", "dig")`).
    pub fn with_client(sites: &[&str]) -> Lab {
        Lab::build(sites, true)
    }

    fn build(sites: &[&str], client: bool) -> Lab {
        assert!(
            nix::unistd::geteuid().is_root(),
            "netns tests need root (CI runs as root)"
        );
        check_names(sites, client);
        remove_stale();
        let id = format!(
            "{PREFIX}{}-{}",
            std::process::id(),
            LABS.fetch_add(1, Ordering::Relaxed)
        );
        let dir = std::env::temp_dir().join(&id);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut inner = Inner {
            id: id.clone(),
            dir,
            sites: Vec::new(),
            created: Vec::new(),
        };
        // From here a panic drops `inner`, which removes whatever was created.
        inner.add_ns(&id);
        ip(&format!("-n {id} link add br0 type bridge"));
        ip(&format!("-n {id} link set br0 up"));
        let octets = (1..).take(sites.len());
        let mut all: Vec<(&str, u8)> = sites.iter().copied().zip(octets).collect();
        if client {
            all.push((CLIENT, CLIENT_OCTET));
        }
        for (name, octet) in all {
            let ns = format!("{id}-{name}");
            let port = format!("s{octet}");
            inner.add_ns(&ns);
            ip(&format!(
                "-n {id} link add {port} type veth peer name eth0 netns {ns}"
            ));
            ip(&format!("-n {id} link set {port} master br0 up"));
            ip(&format!("-n {ns} link set lo up"));
            let main = host_ip(octet, MAIN_HOST);
            ip(&format!("-n {ns} addr add {main}/16 dev eth0"));
            ip(&format!("-n {ns} link set eth0 up"));
            inner.sites.push(Site {
                name: name.to_string(),
                ns,
                octet,
                port,
            });
        }
        Lab {
            inner: Arc::new(inner),
        }
    }

    /// `tdm-PID-N`: the name of the switch namespace, the prefix of the sites' namespaces
    /// (`tdm-PID-N-SITE`) and the name of the lab's temporary directory.
    pub fn id(&self) -> &str {
        &self.inner.id
    }

    /// Every namespace of the lab, the switch first.
    pub fn namespaces(&self) -> Vec<String> {
        self.inner.created.clone()
    }

    /// The namespace of a site (for `ip netns exec`, `nsenter --net=/var/run/netns/NS`).
    pub fn ns(&self, site: &str) -> &str {
        &self.inner.site(site).ns
    }

    /// The lab's temporary directory: logs of [`Lab::spawn`], etcd data, files a test writes.
    /// Removed when the lab is dropped.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// `198.18.(i+1).host` for the `i`-th site (`198.18.100.host` for the client). Only
    /// [`MAIN_HOST`] exists until [`Lab::add_ip`] adds others.
    pub fn ip(&self, site: &str, host: u8) -> IpAddr {
        host_ip(self.inner.site(site).octet, host)
    }

    /// Adds `198.18.(i+1).host` to the site (idempotent) and returns it.
    pub fn add_ip(&self, site: &str, host: u8) -> IpAddr {
        assert!((1..=254).contains(&host), "host {host} is not in 1..=254");
        let s = self.inner.site(site);
        let addr = host_ip(s.octet, host);
        let cidr = format!("{addr}/16");
        if let Err(e) = try_ip(&format!("-n {} addr add {cidr} dev eth0", s.ns)) {
            let present = e.contains("File exists") || e.contains("already assigned");
            assert!(present, "ip addr add {cidr} in {site}: {e}");
        }
        addr
    }

    /// `ip netns exec NS program`: add arguments, environment, stdio as for any command. When
    /// spawned, its pid is the program's.
    pub fn command(&self, site: &str, program: impl AsRef<OsStr>) -> Command {
        self.inner.command(site, program)
    }

    /// Spawns a command (from [`Lab::command`]) with stdout and stderr appended to
    /// `DIR/NAME.log`; the returned guard kills it when dropped.
    pub fn spawn(&self, command: Command, name: &str) -> Proc {
        self.inner.spawn(command, name)
    }

    /// Runs `f` on a new thread inside the site's namespace and returns its result. Sockets
    /// created by `f` belong to the site for their whole life, whichever thread then uses them;
    /// tokio sockets are made from `std` ones created here (`TcpListener::from_std`).
    pub fn in_site<T: Send>(&self, site: &str, f: impl FnOnce() -> T + Send) -> T {
        let path = Path::new(NETNS_DIR).join(self.ns(site));
        let ns = File::open(&path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    nix::sched::setns(&ns, CloneFlags::CLONE_NEWNET)
                        .unwrap_or_else(|e| panic!("setns {}: {e}", path.display()));
                    f()
                })
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }

    /// Partitions the site: its port on the bridge goes down, so nothing goes in or out
    /// (silently, as on a broken link). Inside the site everything still works.
    pub fn cut(&self, site: &str) {
        self.inner.set_port(site, "down");
    }

    /// Ends [`Lab::cut`].
    pub fn heal(&self, site: &str) {
        self.inner.set_port(site, "up");
    }

    /// From `site` only, `dest` becomes unreachable: connecting to it fails at once with "No
    /// route to host" (an `unreachable` route; see the module docs for why not `blackhole`).
    pub fn cut_route(&self, site: &str, dest: IpAddr) {
        let ns = &self.inner.site(site).ns;
        ip(&format!("-n {ns} route add unreachable {dest}/32"));
    }

    /// Ends [`Lab::cut_route`].
    pub fn heal_route(&self, site: &str, dest: IpAddr) {
        let ns = &self.inner.site(site).ns;
        ip(&format!("-n {ns} route del unreachable {dest}/32"));
    }

    /// Starts one etcd member in each of `sites` on the site's main address (client port 2379,
    /// also on the site's `127.0.0.1`; peer port 2380), as one static cluster, with its data and
    /// log in the lab's directory. Does not wait: see [`EtcdCluster::wait_healthy`]. The
    /// cluster holds on to the lab: its namespaces go when both are dropped.
    pub fn etcd_cluster(&self, sites: &[&str]) -> EtcdCluster {
        EtcdCluster::start_all(
            Lab {
                inner: self.inner.clone(),
            },
            sites,
        )
    }
}

impl std::fmt::Debug for Lab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sites: Vec<&str> = self.inner.sites.iter().map(|s| s.name.as_str()).collect();
        f.debug_struct("Lab")
            .field("id", &self.inner.id)
            .field("sites", &sites)
            .finish()
    }
}

impl Inner {
    fn site(&self, name: &str) -> &Site {
        self.sites
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| {
                let names: Vec<&str> = self.sites.iter().map(|s| s.name.as_str()).collect();
                panic!("no site {name:?} in this lab (sites: {names:?})")
            })
    }

    /// Creates a namespace. One of the same name can only be left over from a dead process
    /// that had our pid: it is removed first.
    fn add_ns(&mut self, ns: &str) {
        if let Err(e) = try_ip(&format!("netns add {ns}")) {
            assert!(e.contains("File exists"), "ip netns add {ns}: {e}");
            remove_ns(ns);
            ip(&format!("netns add {ns}"));
        }
        self.created.push(ns.to_string());
    }

    /// Sets a site's port on the bridge `up` or `down`.
    fn set_port(&self, site: &str, state: &str) {
        let port = &self.site(site).port;
        ip(&format!("-n {} link set {port} {state}", self.id));
    }

    fn command(&self, site: &str, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.site(site).ns]).arg(program);
        c
    }

    fn spawn(&self, mut command: Command, name: &str) -> Proc {
        let log = self.dir.join(format!("{name}.log"));
        let file = File::options()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap_or_else(|e| panic!("open {}: {e}", log.display()));
        let child = command
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name} ({command:?}): {e}"));
        Proc {
            name: name.to_string(),
            child,
            log,
            reaped: false,
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if std::thread::panicking() {
            print_logs(&self.dir);
        }
        // Sites first, so nothing is left attached to the switch's bridge.
        for ns in self.created.iter().rev() {
            remove_ns(ns);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A process started by [`Lab::spawn`]; killed (`SIGKILL`) and reaped when dropped.
pub struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
    reaped: bool,
}

impl Proc {
    /// The program's pid: `ip netns exec` enters the namespace and execs the program in the
    /// same process (for a moment after spawning, that process is still `ip`).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The file its stdout and stderr go to.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Sends a signal (a no-op once the process has been reaped, so a reused pid is safe).
    pub fn signal(&self, signal: Signal) {
        if !self.reaped {
            let pid = Pid::from_raw(i32::try_from(self.pid()).unwrap());
            // It may have exited on its own: nothing to do then.
            let _ = kill(pid, signal);
        }
    }

    /// Freezes it (`SIGSTOP`): alive, holding its sockets, doing nothing.
    pub fn stop(&self) {
        self.signal(Signal::SIGSTOP);
    }

    /// Resumes it after [`Proc::stop`] (`SIGCONT`).
    pub fn cont(&self) {
        self.signal(Signal::SIGCONT);
    }

    /// Kills it with `SIGKILL` and waits until it is gone.
    pub fn kill9(&mut self) {
        if !self.reaped {
            let _ = self.child.kill();
            let _ = self.child.wait();
            self.reaped = true;
        }
    }

    /// Whether it is still running (it is reaped if it has exited).
    pub fn is_running(&mut self) -> bool {
        if !self.reaped && matches!(self.child.try_wait(), Ok(Some(_))) {
            self.reaped = true;
        }
        !self.reaped
    }
}

impl std::fmt::Debug for Proc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proc")
            .field("name", &self.name)
            .field("pid", &self.pid())
            .finish()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A static etcd cluster, one member per site of a [`Lab`], named after its site. Members are
/// killed when it is dropped (and by the lab's cleanup in any case).
///
/// Timing: heartbeat 100 ms, election timeout 1 s, pre-vote on (as etcd ≥ 3.5 does by default),
/// so a partitioned member rejoins without forcing an election. A leader cut off steps down
/// after about one election timeout; the majority elects a new one within a few seconds.
pub struct EtcdCluster {
    lab: Lab,
    members: Vec<Member>,
    initial_cluster: String,
}

struct Member {
    site: String,
    ip: IpAddr,
    proc: Option<Proc>,
}

impl EtcdCluster {
    fn start_all(lab: Lab, sites: &[&str]) -> EtcdCluster {
        let members: Vec<Member> = sites
            .iter()
            .map(|site| Member {
                site: site.to_string(),
                ip: lab.ip(site, MAIN_HOST),
                proc: None,
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://{}:{ETCD_PEER_PORT}", m.site, m.ip))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = EtcdCluster {
            lab,
            members,
            initial_cluster,
        };
        for site in sites {
            cluster.start(site);
        }
        cluster
    }

    fn member(&self, site: &str) -> &Member {
        self.members
            .iter()
            .find(|m| m.site == site)
            .unwrap_or_else(|| panic!("no etcd member in site {site:?}"))
    }

    fn member_mut(&mut self, site: &str) -> &mut Member {
        self.members
            .iter_mut()
            .find(|m| m.site == site)
            .unwrap_or_else(|| panic!("no etcd member in site {site:?}"))
    }

    /// The client URLs of every member, in the order given: `http://198.18.X.10:2379`.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("http://{}:{ETCD_CLIENT_PORT}", m.ip))
            .collect()
    }

    /// The client URL of the member in `site`.
    pub fn endpoint(&self, site: &str) -> String {
        format!("http://{}:{ETCD_CLIENT_PORT}", self.member(site).ip)
    }

    /// The running process of the member in `site` (to freeze it, read its pid).
    pub fn process(&self, site: &str) -> Option<&Proc> {
        self.member(site).proc.as_ref()
    }

    /// Kills the member in `site` (`SIGKILL`); its data stays.
    pub fn kill(&mut self, site: &str) {
        self.member_mut(site).proc = None;
    }

    /// Starts the member in `site` (again, on its data, after [`EtcdCluster::kill`]). Does not
    /// wait: see [`EtcdCluster::wait_healthy`].
    pub fn start(&mut self, site: &str) {
        let m = self.member(site);
        assert!(m.proc.is_none(), "the etcd member in {site} is running");
        let ip = m.ip;
        let data = self.lab.dir().join(format!("etcd-{site}"));
        let client = format!("http://{ip}:{ETCD_CLIENT_PORT}");
        let peer = format!("http://{ip}:{ETCD_PEER_PORT}");
        let mut cmd = self.lab.command(site, "etcd");
        cmd.args(["--name", site, "--data-dir"])
            .arg(data)
            .args([
                "--listen-client-urls",
                &format!("{client},http://127.0.0.1:{ETCD_CLIENT_PORT}"),
            ])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-token", self.lab.id()])
            .args(["--initial-cluster-state", "new"])
            .args(["--heartbeat-interval", "100", "--election-timeout", "1000"])
            .args([
                "--pre-vote=true",
                "--logger",
                "zap",
                "--log-outputs",
                "stderr",
            ]);
        let proc = self.lab.spawn(cmd, &format!("etcd-{site}"));
        self.member_mut(site).proc = Some(proc);
    }

    /// Runs `etcdctl ARGS` (API v3) inside `site` against that site's member, with a 1 s dial
    /// and a 2 s command timeout; its stdout, or its stderr when it fails. Reads are
    /// linearizable unless `--consistency=s` is given, so they fail without a quorum.
    pub async fn etcdctl(&self, site: &str, args: &[&str]) -> Result<String, String> {
        let mut cmd = self.lab.command(site, "etcdctl");
        cmd.env("ETCDCTL_API", "3")
            .args(["--endpoints", &self.endpoint(site)])
            .args(["--dial-timeout=1s", "--command-timeout=2s"])
            .args(args);
        let mut cmd = tokio::process::Command::from(cmd);
        cmd.kill_on_drop(true);
        match tokio::time::timeout(Duration::from_secs(10), cmd.output()).await {
            Err(_) => Err("etcdctl did not finish within 10 s".into()),
            Ok(Err(e)) => Err(format!("cannot run etcdctl (etcd-client installed?): {e}")),
            Ok(Ok(out)) if out.status.success() => {
                Ok(String::from_utf8_lossy(&out.stdout).into_owned())
            }
            Ok(Ok(out)) => Err(String::from_utf8_lossy(&out.stderr).into_owned()),
        }
    }

    /// Waits (at most 30 s) until every running member serves a linearizable read.
    pub async fn wait_healthy(&self) {
        for m in self.members.iter().filter(|m| m.proc.is_some()) {
            let what = format!("the etcd member in {} to be healthy", m.site);
            crate::eventually(Duration::from_secs(30), &what, || async {
                self.etcdctl(&m.site, &["endpoint", "health"]).await.ok()
            })
            .await;
        }
    }
}

impl std::fmt::Debug for EtcdCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdCluster")
            .field("endpoints", &self.endpoints())
            .finish()
    }
}

fn host_ip(octet: u8, host: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(198, 18, octet, host))
}

fn check_names(sites: &[&str], client: bool) {
    assert!(
        (1..usize::from(CLIENT_OCTET)).contains(&sites.len()),
        "a lab has 1 to {} sites",
        CLIENT_OCTET - 1
    );
    let mut seen = BTreeSet::new();
    for s in sites {
        assert!(
            !s.is_empty()
                && s.len() <= 32
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'),
            "site name {s:?}: use 1 to 32 of a-z, 0-9, -"
        );
        assert!(seen.insert(*s), "site {s:?} given twice");
        assert!(
            !(client && *s == CLIENT),
            "site name {CLIENT:?} is the client's"
        );
    }
}

/// Runs `ip ARGS` (split on spaces: names never contain any); its stdout, or its stderr when it
/// fails.
fn try_ip(args: &str) -> Result<String, String> {
    let out = Command::new("ip")
        .args(args.split_whitespace())
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run ip (iproute2 installed?): {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

fn ip(args: &str) -> String {
    try_ip(args).unwrap_or_else(|e| panic!("ip {args}: {e}"))
}

/// Kills every process in a namespace, then deletes it; errors are ignored (another process
/// may be removing the same stale namespace), busy namespaces retried for about a second.
fn remove_ns(ns: &str) {
    for _ in 0..100 {
        let pids = try_ip(&format!("netns pids {ns}")).unwrap_or_default();
        let pids: Vec<i32> = pids
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
        if pids.is_empty() {
            break;
        }
        for pid in pids {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    for _ in 0..50 {
        match try_ip(&format!("netns delete {ns}")) {
            Ok(_) => return,
            Err(e) if e.contains("No such file") => return,
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// The pid encoded in a name `tdm-PID-…`, if it is one of ours.
fn creator(name: &str) -> Option<u32> {
    name.strip_prefix(PREFIX)?.split('-').next()?.parse().ok()
}

/// Removes the namespaces (with their processes) and temporary directories left by labs whose
/// process is gone.
fn remove_stale() {
    let dead = |pid: u32| !Path::new(&format!("/proc/{pid}")).exists();
    let list = try_ip("netns list").unwrap_or_default();
    let mut stale: Vec<&str> = list
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|ns| creator(ns).is_some_and(dead))
        .collect();
    // Sites before their switch (`tdm-PID-N-SITE` sorts after `tdm-PID-N`).
    stale.sort_unstable_by(|a, b| b.cmp(a));
    for ns in stale {
        remove_ns(ns);
    }
    if let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) {
        for e in entries.flatten() {
            let name = e.file_name();
            if creator(&name.to_string_lossy()).is_some_and(dead) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

/// Prints the last lines of every log in a lab's directory (to the test's captured output).
fn print_logs(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut logs: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    logs.sort();
    for log in logs {
        let text = std::fs::read(&log).unwrap_or_default();
        let text = String::from_utf8_lossy(&text);
        let lines: Vec<&str> = text.lines().collect();
        let tail = &lines[lines.len().saturating_sub(40)..];
        eprintln!("---- last {} lines of {}", tail.len(), log.display());
        for l in tail {
            eprintln!("{l}");
        }
    }
}
