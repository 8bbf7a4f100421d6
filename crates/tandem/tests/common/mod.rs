//! Helpers shared by the `tandem` binary's tests.

#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value;
use testkit::eventually;

pub fn tandem() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tandem"))
}

pub fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("tandem runs")
}

/// A running `tandem up` that is stopped with SIGTERM when dropped.
pub struct Up {
    pub child: Child,
    pub api: SocketAddr,
    pub log: Option<PathBuf>,
}

impl Up {
    /// Its log goes to `tandem.log` beside the topology, printed if the test fails.
    pub fn start(topology: &Path, api: SocketAddr, env: &[(&str, &str)]) -> Self {
        let log = topology.with_file_name("tandem.log");
        let child = tandem()
            .arg("up")
            .arg(topology)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Up {
            child,
            api,
            log: Some(log),
        }
    }

    pub fn status(&self) -> Option<Value> {
        let out = run(tandem().args(["status", "--json", "--api", &self.api.to_string()]));
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).unwrap())
    }

    pub fn target(&self, id: &str) -> Option<Value> {
        let body = self.status()?;
        body["targets"]
            .as_array()?
            .iter()
            .find(|t| t["target"] == id)
            .cloned()
    }

    /// SIGTERM, then the exit status; fails the test if tandem has not exited within 30 s.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        wait_exit(&mut self.child, Duration::from_secs(30))
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Some(text) = self
                .log
                .as_ref()
                .and_then(|l| std::fs::read_to_string(l).ok())
        {
            let tail: Vec<&str> = text.lines().rev().take(60).collect();
            eprintln!("--- tandem log (last lines) ---");
            for l in tail.into_iter().rev() {
                eprintln!("{l}");
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes `dir/topology.toml`: `[tandem]` with the API on `api` and state inside `dir`, then
/// `body`.
pub fn topology_file(dir: &Path, api: SocketAddr, body: &str) -> PathBuf {
    let path = dir.join("topology.toml");
    let state = dir.join("state");
    let text = format!(
        "[tandem]\napi = \"{api}\"\nstate_dir = \"{}\"\n{body}",
        state.display()
    );
    std::fs::write(&path, text).unwrap();
    path
}

pub async fn wait_status(up: &Up, id: &str, status: &str) -> Value {
    eventually(
        Duration::from_secs(10),
        &format!("{id} {status}"),
        || async { up.target(id).filter(|t| t["status"] == status) },
    )
    .await
}

pub async fn recent_events(api: SocketAddr) -> Vec<Value> {
    get_json(api, "/v1/events").await["events"]
        .as_array()
        .unwrap()
        .clone()
}

/// The first recent event whose message contains `text`, waited for up to 20 s.
pub async fn wait_event(api: SocketAddr, text: &str) -> Value {
    eventually(Duration::from_secs(20), text, || async {
        recent_events(api)
            .await
            .into_iter()
            .find(|e| e["message"].as_str().is_some_and(|m| m.contains(text)))
    })
    .await
}

pub async fn http_get(api: SocketAddr, path: &str) -> String {
    exchange(api, format!("GET {path} HTTP/1.0\r\nHost: {api}\r\n\r\n")).await
}

/// A request with any method and no body; the whole response.
pub async fn http_request(addr: SocketAddr, method: &str, path: &str) -> String {
    exchange(
        addr,
        format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n"),
    )
    .await
}

/// How long a test waits for one HTTP exchange with tandem before failing.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

/// Sends a whole HTTP/1.0 request and reads the whole response, within [`HTTP_TIMEOUT`].
async fn exchange(addr: SocketAddr, request: String) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let talk = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    };
    tokio::time::timeout(HTTP_TIMEOUT, talk)
        .await
        .unwrap_or_else(|_| panic!("{addr} did not answer {request:?} within {HTTP_TIMEOUT:?}"))
}

/// The JSON body of a GET.
pub async fn get_json(api: SocketAddr, path: &str) -> Value {
    let resp = http_get(api, path).await;
    let body = resp.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{path}: {e}: {resp}"))
}

/// A POST without a body; the whole response.
pub async fn http_post(addr: SocketAddr, path: &str) -> String {
    exchange(
        addr,
        format!("POST {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Length: 0\r\n\r\n"),
    )
    .await
}

/// A POST with a JSON body; the whole response.
pub async fn http_post_json(addr: SocketAddr, path: &str, json: &str) -> String {
    exchange(
        addr,
        format!(
            "POST {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{json}",
            json.len()
        ),
    )
    .await
}

/// The body of an HTTP response.
pub fn body(resp: &str) -> &str {
    resp.split_once("\r\n\r\n").map_or("", |(_, b)| b)
}

/// The JSON body of a GET, or None while the server is not there yet.
pub async fn try_get_json(api: SocketAddr, path: &str) -> Option<Value> {
    tokio::net::TcpStream::connect(api).await.ok()?;
    Some(get_json(api, path).await)
}

/// The exit status of `child`, which must exit within `deadline` (else it is killed and the
/// test fails).
pub fn wait_exit(child: &mut Child, deadline: Duration) -> std::process::ExitStatus {
    let end = tokio::time::Instant::now() + deadline;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if tokio::time::Instant::now() >= end {
            let _ = child.kill();
            let _ = child.wait();
            panic!("process {} did not exit within {deadline:?}", child.id());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether a process runs (a zombie has exited; only its parent's wait is missing).
pub fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit(')')
            .next()
            .is_some_and(|r| !r.trim_start().starts_with('Z'))
    })
}

/// The pids of a scale set's instances, from its `/v1/scale-sets` entry.
pub fn instance_pids(set: &Value) -> Vec<i32> {
    set["instances"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["pid"].as_i64())
        .map(|p| p as i32)
        .collect()
}
