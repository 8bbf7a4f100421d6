//! `tandem sample-app`: a small HTTP server for demos and tests. `/` names its site and
//! instance and counts requests; `/healthz` answers 200 or 503; `POST /fail` and
//! `POST /recover` toggle that; `/burn?ms=N` burns CPU for N milliseconds (at most 10 s).
//!
//! With `--database HOST:PORT` (a database frontend) it also writes and reads through it:
//! `POST /write` inserts a row into `tandem_sample` (created when missing) and answers
//! `id=N site=S instance=I member=M` (`M`: the member that committed it); `GET /read` answers
//! `rows=N max_id=N site=S instance=I member=M`. A database error is a 503 with its reason;
//! `/healthz` does not depend on the database (the app's health is its own).

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use serde::Deserialize;

use crate::EXIT_RUNTIME;

#[derive(Debug)]
struct App {
    site: String,
    instance: String,
    requests: AtomicU64,
    failing: AtomicBool,
    database: Option<Database>,
}

/// A database frontend and how to log in; one connection, made again after an error.
#[derive(Debug)]
pub struct Database {
    pub address: SocketAddr,
    pub user: String,
    /// Read at each connection (the password may be created after the instance starts).
    pub password_file: Option<std::path::PathBuf>,
    client: tokio::sync::Mutex<Option<tokio_postgres::Client>>,
}

impl Database {
    pub fn new(
        address: SocketAddr,
        user: String,
        password_file: Option<std::path::PathBuf>,
    ) -> Self {
        Database {
            address,
            user,
            password_file,
            client: tokio::sync::Mutex::new(None),
        }
    }
}

/// Bounds one database round trip: a client through a failover must not hang.
const DB_TIMEOUT: Duration = Duration::from_secs(3);

pub fn run(
    listen: SocketAddr,
    site: String,
    instance: Option<String>,
    database: Option<Database>,
) -> ExitCode {
    let instance = instance
        .or_else(|| std::env::var("TANDEM_INSTANCE").ok())
        .unwrap_or_else(|| listen.to_string());
    let app = Arc::new(App {
        site,
        instance,
        requests: AtomicU64::new(0),
        failing: AtomicBool::new(false),
        database,
    });
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    match runtime.block_on(serve(listen, app)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

async fn serve(listen: SocketAddr, app: Arc<App>) -> anyhow::Result<()> {
    // Caught before listening: a SIGTERM as soon as it is up stops it cleanly.
    let shutdown = crate::up::shutdown_signal()?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
    eprintln!(
        "sample-app {} of site {} listening on {listen}",
        app.instance, app.site
    );
    let router = Router::new()
        .route("/", get(hello))
        .route("/healthz", get(healthz))
        .route("/fail", post(fail))
        .route("/recover", post(recover))
        .route("/burn", get(burn).post(burn))
        .route("/write", post(write))
        .route("/read", get(read))
        .with_state(app);
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
}

async fn hello(State(app): State<Arc<App>>) -> String {
    let n = app.requests.fetch_add(1, Ordering::Relaxed) + 1;
    format!("site={} instance={} requests={n}\n", app.site, app.instance)
}

async fn healthz(State(app): State<Arc<App>>) -> (StatusCode, &'static str) {
    if app.failing.load(Ordering::Relaxed) {
        (StatusCode::SERVICE_UNAVAILABLE, "failing\n")
    } else {
        (StatusCode::OK, "ok\n")
    }
}

async fn fail(State(app): State<Arc<App>>) -> &'static str {
    app.failing.store(true, Ordering::Relaxed);
    eprintln!("health: failing (POST /fail)");
    "failing\n"
}

async fn recover(State(app): State<Arc<App>>) -> &'static str {
    app.failing.store(false, Ordering::Relaxed);
    eprintln!("health: ok (POST /recover)");
    "ok\n"
}

#[derive(Debug, Deserialize)]
struct Burn {
    ms: u64,
}

async fn burn(Query(b): Query<Burn>) -> String {
    let ms = b.ms.min(10_000);
    // On a blocking thread: the burn must not stall the server's other requests.
    let spun = tokio::task::spawn_blocking(move || {
        let until = tokio::time::Instant::now() + Duration::from_millis(ms);
        let mut n: u64 = 0;
        while tokio::time::Instant::now() < until {
            n = std::hint::black_box(n.wrapping_add(1));
        }
        n
    })
    .await
    .unwrap_or(0);
    format!("burned {ms}ms ({spun} spins)\n")
}

async fn write(State(app): State<Arc<App>>) -> (StatusCode, String) {
    let sql = "INSERT INTO tandem_sample (site, instance) VALUES ($1, $2) \
               RETURNING id, current_setting('cluster_name')";
    let (site, instance) = (app.site.clone(), app.instance.clone());
    let answer = query(&app, async move |c: &tokio_postgres::Client| {
        let row = c.query_one(sql, &[&site, &instance]).await?;
        Ok((format!("id={}", row.get::<_, i64>(0)), row.get(1)))
    })
    .await;
    reply(&app, answer)
}

async fn read(State(app): State<Arc<App>>) -> (StatusCode, String) {
    let sql = "SELECT count(*), coalesce(max(id), 0), current_setting('cluster_name') \
               FROM tandem_sample";
    let answer = query(&app, async move |c: &tokio_postgres::Client| {
        let row = c.query_one(sql, &[]).await?;
        let what = format!(
            "rows={} max_id={}",
            row.get::<_, i64>(0),
            row.get::<_, i64>(1)
        );
        Ok((what, row.get(2)))
    })
    .await;
    reply(&app, answer)
}

/// What was done, then who served it end to end: `… site=S instance=I member=M` (`M`: the
/// member that answered, by its `cluster_name`).
fn reply(app: &App, answer: Result<(String, String), String>) -> (StatusCode, String) {
    match answer {
        Ok((what, member)) => (
            StatusCode::OK,
            format!(
                "{what} site={} instance={} member={member}\n",
                app.site, app.instance
            ),
        ),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "database: {e} (site={} instance={})\n",
                app.site, app.instance
            ),
        ),
    }
}

/// Runs `f` on the instance's connection (made, and the table created, when missing);
/// drops the connection after an error so the next request connects afresh (through the
/// frontend, to whichever member is the primary then).
async fn query<T, F>(app: &App, f: F) -> Result<T, String>
where
    F: AsyncFnOnce(&tokio_postgres::Client) -> Result<T, tokio_postgres::Error>,
{
    let Some(db) = &app.database else {
        return Err("no --database given".into());
    };
    let mut slot = db.client.lock().await;
    if slot.is_none() {
        *slot = Some(connect(db).await?);
    }
    let Some(client) = slot.as_ref() else {
        return Err("no connection".into());
    };
    match tokio::time::timeout(DB_TIMEOUT, f(client)).await {
        Ok(Ok(text)) => Ok(text),
        Ok(Err(e)) => {
            *slot = None;
            Err(e.to_string())
        }
        Err(_) => {
            *slot = None;
            Err(format!("no answer within {DB_TIMEOUT:?}"))
        }
    }
}

async fn connect(db: &Database) -> Result<tokio_postgres::Client, String> {
    let password = match &db.password_file {
        Some(p) => Some(
            std::fs::read_to_string(p)
                .map_err(|e| format!("cannot read {}: {e}", p.display()))?
                .trim()
                .to_string(),
        ),
        None => None,
    };
    let mut c = tokio_postgres::Config::new();
    c.host(db.address.ip().to_string())
        .port(db.address.port())
        .user(&db.user)
        .dbname("postgres")
        .application_name("tandem-sample-app")
        .connect_timeout(DB_TIMEOUT);
    if let Some(p) = &password {
        c.password(p);
    }
    let connect = c.connect(tokio_postgres::NoTls);
    let (client, conn) = tokio::time::timeout(DB_TIMEOUT, connect)
        .await
        .map_err(|_| format!("{} did not answer within {DB_TIMEOUT:?}", db.address))?
        .map_err(|e| format!("{}: {e}", db.address))?;
    tokio::spawn(conn);
    // Idempotent; two instances racing may see a duplicate type error, which a retry settles.
    let create = "CREATE TABLE IF NOT EXISTS tandem_sample (\
                  id bigserial PRIMARY KEY, at timestamptz NOT NULL DEFAULT now(), \
                  site text NOT NULL, instance text NOT NULL)";
    match tokio::time::timeout(DB_TIMEOUT, client.batch_execute(create)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(format!("creating tandem_sample: {e}")),
        Err(_) => {
            return Err(format!(
                "creating tandem_sample: no answer within {DB_TIMEOUT:?}"
            ));
        }
    }
    Ok(client)
}
