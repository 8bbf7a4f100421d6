//! `tandem sample-app`: a small HTTP server for demos and tests. `/` names its site and
//! instance and counts requests; `/healthz` answers 200 or 503; `POST /fail` and
//! `POST /recover` toggle that; `/burn?ms=N` burns CPU for N milliseconds (at most 10 s).

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
}

pub fn run(listen: SocketAddr, site: String, instance: Option<String>) -> ExitCode {
    let instance = instance
        .or_else(|| std::env::var("TANDEM_INSTANCE").ok())
        .unwrap_or_else(|| listen.to_string());
    let app = Arc::new(App {
        site,
        instance,
        requests: AtomicU64::new(0),
        failing: AtomicBool::new(false),
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
