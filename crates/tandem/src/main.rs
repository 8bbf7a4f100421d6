//! `tandem`: the command line. It parses arguments and wires the crates together; the work is
//! done in the libraries.
//!
//! Exit codes: 0 success; 1 the topology is invalid or unreadable; 2 bad command-line usage
//! (including a `--node` the topology does not declare); 3 a runtime failure (an address in
//! use, the API unreachable, a node already running).

mod actions;
mod apps;
mod client;
mod console;
mod sample_app;
mod status;
mod up;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Exit code for an invalid or unreadable topology.
pub const EXIT_INVALID: u8 = 1;
/// Exit code for bad command-line usage (clap's own, and a `--node` the topology lacks).
pub const EXIT_USAGE: u8 = 2;
/// Exit code for a runtime failure.
pub const EXIT_RUNTIME: u8 = 3;

#[derive(Debug, Parser)]
#[command(
    name = "tandem",
    version,
    about = "Active/standby high availability for edge applications",
    after_help = "Exit codes: 0 success, 1 invalid topology, 2 usage error, 3 runtime failure."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// API token, when the topology's `[tandem] tokens` asks for one [env: TANDEM_TOKEN]
    /// (prefer the variable: a flag shows in `ps`).
    #[arg(long, global = true)]
    token: Option<String>,
    /// CA certificate (PEM) of an API served over TLS (`[tandem] tls_cert`): the CLI then talks
    /// HTTPS and checks the API's certificate names its IP address [env: TANDEM_CA].
    #[arg(long, global = true, value_name = "FILE")]
    ca: Option<std::path::PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run what the topology declares: probes, DNS, load balancers, scale sets, databases and
    /// the API. Without [[node]] sections, every site in this process; with them, the sites of
    /// `--node NAME`, coordinated with the other nodes through etcd. SIGHUP (or `tandem
    /// reload`) re-reads the file.
    Up {
        /// The topology file.
        file: PathBuf,
        /// The [[node]] this process is (cluster mode).
        #[arg(long)]
        node: Option<String>,
        /// Do not print the live summary and events on stdout.
        #[arg(long)]
        no_console: bool,
    },
    /// Check a topology file and report every problem in it.
    Validate {
        /// The topology file.
        file: PathBuf,
        /// Also check that this [[node]] exists.
        #[arg(long)]
        node: Option<String>,
        /// Print the problems as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stop or resume answering a DNS profile's endpoint, at once, on every node.
    Endpoint {
        #[command(subcommand)]
        action: actions::Endpoint,
    },
    /// Drain a load balancer backend (no new flows; the rest get `drain_timeout`), or enable it.
    Backend {
        #[command(subcommand)]
        action: actions::Backend,
    },
    /// Show the nodes, DNS profiles, load balancers, scale sets, databases, a drill in
    /// progress and the health of every target, as a running node sees them.
    Status {
        /// API address of the running tandem [env: TANDEM_API] [default: 127.0.0.1:7400].
        #[arg(long)]
        api: Option<SocketAddr>,
        /// Print the API's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Rehearse a failure: `drill outage SITE [--for 60s]` takes a whole site down (its load
    /// balancers stop answering, its instances stop), then restores it; `drill stop` ends it;
    /// `drill restore DB [--to TIME]` restores a backup into a scratch copy and measures it;
    /// `drill app APP` fails an app over and back with clients on its public entry.
    Drill {
        #[command(subcommand)]
        action: actions::Drill,
    },
    /// The whole app (`[[app]]`) across tiers: `app status`, `app plan APP --to SITE`, `app
    /// failover APP --to SITE`, `app failback APP`, `app pin APP SITE`, `app unpin APP`.
    App {
        #[command(subcommand)]
        action: apps::App,
    },
    /// Database operations: `db switchover DB --to SITE` hands the primary over without data
    /// loss.
    Db {
        #[command(subcommand)]
        action: actions::Db,
    },
    /// Backups of a database with pgBackRest ([database.backup]): `backup DB now [--type
    /// full|diff|incr]`, `backup DB list`, `backup DB verify`.
    Backup {
        /// The database's name.
        db: String,
        #[command(subcommand)]
        action: actions::Backup,
    },
    /// Restore a database from its backups ([database.backup]): `restore DB --site SITE [--to
    /// TIME|latest]` brings the whole database back to the newest archived WAL or to TIME,
    /// SITE's member its primary. The copy is made and recovered beside the running members;
    /// then they stop for the swap, SITE's former data is set aside (never deleted) and the
    /// other members rejoin as standbys. Commits after TIME are only in the data set aside.
    Restore {
        /// The database's name.
        db: String,
        /// The site whose member is restored and becomes the primary.
        #[arg(long)]
        site: String,
        /// Restore to this time (RFC 3339, UTC: 2024-05-01T12:00:00Z) instead of the newest
        /// archived WAL.
        #[arg(long, default_value = "latest")]
        to: String,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: actions::Api,
    },
    /// Set a scale set's capacity (within its min and max).
    Scale {
        /// The scale set's name.
        set: String,
        /// The number of instances.
        #[arg(long)]
        to: u32,
        #[command(flatten)]
        api: actions::Api,
    },
    /// Re-read the topology file (on every node) and apply scale set changes (a changed
    /// instance template rolls through as an upgrade); say what needs a restart.
    Reload {
        #[command(flatten)]
        api: actions::Api,
    },
    /// A small HTTP server for demos and tests: `/` names its site and instance, `/healthz`
    /// answers 200 or 503 (`POST /fail`, `POST /recover`), `/burn?ms=N` burns CPU.
    SampleApp {
        /// Address to listen on, ip:port.
        #[arg(long)]
        listen: SocketAddr,
        /// The site it reports.
        #[arg(long)]
        site: String,
        /// The instance name it reports [default: $TANDEM_INSTANCE, else the listen address].
        #[arg(long)]
        instance: Option<String>,
        /// A database frontend, ip:port: `POST /write` and `GET /read` go through it.
        #[arg(long)]
        database: Option<SocketAddr>,
        /// The database role.
        #[arg(long, default_value = "postgres", requires = "database")]
        database_user: String,
        /// A file holding the role's password (Tandem keeps the superuser's in
        /// STATE_DIR/databases/DB/password, mode 0600).
        #[arg(long, requires = "database")]
        database_password_file: Option<PathBuf>,
    },
    /// Internal: the watchdog beside a primary in cluster mode (see `pg::watchdog`): kills the
    /// postmaster's family once the deadline in the file has passed.
    #[command(hide = true)]
    Watchdog {
        #[arg(long)]
        pid: i32,
        #[arg(long)]
        postgres: PathBuf,
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        deadline_file: PathBuf,
    },
    /// Internal: how `tandem up` starts scale set instances, so they die with it.
    #[command(hide = true)]
    ExecInstance {
        #[arg(long)]
        parent: u32,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        command: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    client::set_token(cli.token.or_else(|| std::env::var("TANDEM_TOKEN").ok()));
    // An empty TANDEM_CA is unset, as an empty TANDEM_TOKEN is.
    let ca = cli.ca.or_else(|| {
        std::env::var_os("TANDEM_CA")
            .filter(|v| !v.is_empty())
            .map(Into::into)
    });
    if let Err(e) = client::set_ca(ca.as_deref()) {
        eprintln!("error: {e}");
        return ExitCode::from(EXIT_USAGE);
    }
    match cli.command {
        Command::Up {
            file,
            node,
            no_console,
        } => up::run(&file, node.as_deref(), !no_console),
        Command::Drill { action } => actions::drill(action),
        Command::Db { action } => actions::db(action),
        Command::App { action } => apps::run(action),
        Command::Backup { db, action } => actions::backup(&db, action),
        Command::Restore {
            db,
            site,
            to,
            json,
            api,
        } => actions::restore(&db, &site, &to, json, &api),
        Command::Validate { file, node, json } => validate(&file, node.as_deref(), json),
        Command::Endpoint { action } => actions::endpoint(action),
        Command::Backend { action } => actions::backend(action),
        Command::Status { api, json } => status::run(api, json),
        Command::Scale { set, to, api } => actions::scale(&set, to, &api),
        Command::Reload { api } => actions::reload(&api),
        Command::SampleApp {
            listen,
            site,
            instance,
            database,
            database_user,
            database_password_file,
        } => sample_app::run(
            listen,
            site,
            instance,
            database.map(|a| sample_app::Database::new(a, database_user, database_password_file)),
        ),
        Command::Watchdog {
            pid,
            postgres,
            data,
            deadline_file,
        } => {
            eprintln!("watchdog {}: guarding postmaster {pid}", std::process::id());
            let end = pg::watchdog::run(pid, &postgres, &data, &deadline_file);
            eprintln!("watchdog {}: {end:?}", std::process::id());
            ExitCode::SUCCESS
        }
        Command::ExecInstance { parent, command } => {
            let e = scaleset::driver::exec_instance(parent, &command);
            eprintln!("error: cannot start {:?}: {e}", command.join(" "));
            ExitCode::from(127)
        }
    }
}

fn validate(file: &std::path::Path, node: Option<&str>, json: bool) -> ExitCode {
    match model::load_checked(file) {
        Ok(checked) => {
            if let Some(n) = node
                && let Err(e) = model::find_node(&checked.topology, n)
            {
                eprintln!("error: {e}");
                return ExitCode::from(EXIT_INVALID);
            }
            if json {
                println!("{}", checked.warnings.to_json());
            } else {
                if !checked.warnings.items.is_empty() {
                    eprint!("{}", checked.warnings.render());
                }
                println!("{}: valid ({})", file.display(), summary(&checked.topology));
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            report_load_error(&e, json);
            ExitCode::from(EXIT_INVALID)
        }
    }
}

/// `2 sites, 1 monitor, 1 profile, …`.
fn summary(t: &model::Topology) -> String {
    use model::diag::plural;
    [
        plural(t.sites.len(), "site"),
        plural(t.monitors.len(), "monitor"),
        plural(t.profiles.len(), "profile"),
        plural(t.load_balancers.len(), "load balancer"),
        plural(t.scale_sets.len(), "scale set"),
        plural(t.databases.len(), "database"),
        plural(t.apps.len(), "app"),
    ]
    .join(", ")
}

/// Logs the warnings about a valid topology, one event each.
pub fn log_warnings(warnings: &model::Diagnostics) {
    for d in &warnings.items {
        tracing::warn!(
            code = d.code.as_str(),
            at = %warnings.location(d),
            help = %d.help,
            "{}",
            d.message
        );
    }
}

/// Prints why a topology could not be loaded.
pub fn report_load_error(e: &model::LoadError, json: bool) {
    match (e, json) {
        (model::LoadError::Invalid(d), false) => eprint!("{}", d.render()),
        (model::LoadError::Invalid(d), true) => println!("{}", d.to_json()),
        (other, false) => eprintln!("error: {other}"),
        (other, true) => println!(
            "{}",
            serde_json::json!([{ "file": null, "line": null, "column": null, "code": "E000",
                                  "message": other.to_string(), "help": "check the path and permissions" }])
        ),
    }
}
