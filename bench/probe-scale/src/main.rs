//! Probe engine scale: CPU time of Tandem's probe engine for N targets at a given interval,
//! against a local HTTP server in a separate process (so its CPU is not counted as ours).
//!
//! ```text
//! probe-scale [--targets 10000] [--interval 1s] [--seconds 20] [--protocol http|tcp] [--ports 50]
//! ```
//!
//! Prints one Markdown table row: protocol, targets, interval, probes/s achieved, failures, the
//! prober's CPU in cores (1.0 = one core busy) over the measured window, split into user and
//! system time, and the target server's CPU in cores. On loopback the kernel runs the target's
//! side of each TCP handshake inside the prober's `connect()`, so the prober's system time
//! includes work that a remote target would do itself.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

struct Args {
    targets: usize,
    interval: String,
    seconds: u64,
    protocol: String,
    ports: usize,
}

fn args() -> Args {
    let mut a = Args {
        targets: 10_000,
        interval: "1s".into(),
        seconds: 20,
        protocol: "http".into(),
        ports: 50,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    for pair in argv.chunks(2) {
        let v = pair.get(1).cloned().unwrap_or_default();
        match pair[0].as_str() {
            "--targets" => a.targets = v.parse().expect("--targets N"),
            "--interval" => a.interval = v,
            "--seconds" => a.seconds = v.parse().expect("--seconds N"),
            "--protocol" => a.protocol = v,
            "--ports" => a.ports = v.parse().expect("--ports N"),
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

fn main() {
    if std::env::args().nth(1).as_deref() == Some("serve") {
        let ports: usize = std::env::args()
            .nth(2)
            .and_then(|p| p.parse().ok())
            .unwrap_or(50);
        serve(ports);
        return;
    }
    let a = args();
    // The target server: this same program, in its own process.
    let mut server = Command::new(std::env::current_exe().unwrap())
        .args(["serve", &a.ports.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(server.stdout.take().unwrap()).lines();
    let ports: Vec<u16> = (0..a.ports)
        .map(|_| lines.next().unwrap().unwrap().parse().unwrap())
        .collect();

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (probes, failures, (user, system), wall) = runtime.block_on(measure(&a, &ports));
    let (su, ss) = cpu_seconds(&format!("/proc/{}/stat", server.id()));
    drop(server.stdin.take());
    let _ = server.kill();
    let _ = server.wait();

    let rate = probes as f64 / wall;
    let cpu = user + system;
    println!(
        "| {} | {} | {} | {:.0} | {} | {:.3} | {:.3} | {:.3} | {:.1}% | {:.3} |",
        a.protocol,
        a.targets,
        a.interval,
        rate,
        failures,
        cpu / wall,
        user / wall,
        system / wall,
        100.0 * cpu / wall,
        (su + ss) / (wall + 2.0 * parse_interval(&a.interval)),
    );
    std::io::stdout().flush().unwrap();
}

async fn measure(a: &Args, ports: &[u16]) -> (u64, u64, (f64, f64), f64) {
    let timeout = if a.interval.ends_with("ms") {
        "50ms"
    } else {
        "500ms"
    };
    let text = format!(
        "[[monitor]]\nname = \"m\"\nprotocol = \"{}\"\nport = 1\ninterval = \"{}\"\ntimeout = \"{timeout}\"\n",
        a.protocol, a.interval
    );
    let topology = model::parse(model::Source::new("bench.toml", text))
        .unwrap_or_else(|d| panic!("{}", d.render()));
    let targets = (0..a.targets)
        .map(|i| health::Target {
            id: format!("t{i}"),
            monitor: "m".into(),
            destination: health::Destination::Addr(([127, 0, 0, 1], ports[i % ports.len()]).into()),
            disabled: false,
        })
        .collect();
    let engine =
        health::Engine::start(targets, &topology.monitors, health::Options::default()).unwrap();
    let interval = topology.monitors[0].interval;
    // Warm up: every target has been probed at least once.
    tokio::time::sleep(interval * 2).await;
    let count = |engine: &health::Engine| {
        engine
            .reports()
            .iter()
            .fold((0, 0), |(p, f), r| (p + r.probes, f + r.failures))
    };
    let (p0, f0) = count(&engine);
    let cpu0 = cpu_seconds("/proc/self/stat");
    let start = tokio::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(a.seconds)).await;
    let wall = start.elapsed().as_secs_f64();
    let cpu1 = cpu_seconds("/proc/self/stat");
    let (p1, f1) = count(&engine);
    engine.shutdown();
    (p1 - p0, f1 - f0, (cpu1.0 - cpu0.0, cpu1.1 - cpu0.1), wall)
}

/// User and system CPU seconds of a process, from `/proc/PID/stat`.
fn cpu_seconds(stat: &str) -> (f64, f64) {
    let text = std::fs::read_to_string(stat).unwrap_or_default();
    let after = text.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = after.split_whitespace().collect();
    // After the command name: state is field 3; utime and stime are fields 14 and 15.
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let hz = clock_ticks();
    (field(11) / hz, field(12) / hz)
}

fn parse_interval(s: &str) -> f64 {
    model::units::parse_duration(s).map_or(1.0, |d| d.as_secs_f64())
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// A minimal HTTP/1.1 server on `ports` loopback ports: answers every request `200 ok` and
/// closes. Prints each port on a line; exits when stdin closes.
fn serve(ports: usize) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        for _ in 0..ports {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            println!("{}", l.local_addr().unwrap().port());
            tokio::spawn(async move {
                loop {
                    let Ok((mut s, _)) = l.accept().await else { continue };
                    tokio::spawn(async move {
                        let mut buf = [0u8; 2048];
                        let mut seen = 0;
                        while seen < buf.len() {
                            match s.read(&mut buf[seen..]).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => seen += n,
                            }
                            if buf[..seen].windows(4).any(|w| w == b"\r\n\r\n") {
                                let _ = s
                                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
                                    .await;
                                return;
                            }
                        }
                    });
                }
            });
        }
        std::io::stdout().flush().unwrap();
        // Run until the parent closes stdin.
        tokio::task::spawn_blocking(|| {
            let mut sink = String::new();
            let _ = std::io::stdin().read_line(&mut sink);
        })
        .await
        .unwrap();
    });
}
