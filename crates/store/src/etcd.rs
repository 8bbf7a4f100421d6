//! The store on an etcd cluster (v3 API, etcd 3.4 and later), through the `etcd-client` crate.
//!
//! - Every key lives under one root (`/tandem/CLUSTER/`), so clusters can share an etcd.
//! - **Session**: an etcd lease of `session_ttl` granted at connect and kept alive every third
//!   of it. [`Scope::Session`] records are attached to it, so etcd deletes them once this
//!   process has been silent for `session_ttl` (killed, frozen, cut off). When the session is
//!   found expired (the process was cut off longer than that), a new one is granted and every
//!   session record this process still holds is written again.
//! - **Leases with fencing terms**, as Patroni keeps its leader key: `leases/NAME` holds
//!   `{"holder","term"}` attached to an etcd lease of the lease's time to live (whole seconds,
//!   rounded up: etcd's granularity), and `terms/NAME` the last term, written in the same
//!   transaction, so terms never go back. Renewal is a keep-alive of that etcd lease; a fenced
//!   write is a transaction that compares the lease record first.
//! - Requests need an etcd leader (`require_leader`): a member cut off from its quorum answers
//!   with an error at once instead of serving stale data or hanging.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, KeyValue,
    LeaseKeepAliveStream, LeaseKeeper, PutOptions, Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tonic::Code as tonic_code;

use crate::{
    BATCH_LIMIT, Batch, BoxFuture, Change, Connection, Expect, Lease, Listing, Record, Scope,
    Store, StoreError, Watch, keys,
};

/// How to reach etcd.
#[derive(Clone, Debug)]
pub struct EtcdOptions {
    /// Client URLs of the members (`http://192.0.2.10:2379`).
    pub endpoints: Vec<String>,
    /// The cluster's name: keys live under `/tandem/NAME/`.
    pub cluster: String,
    /// This process's session: its session records vanish this long after it goes silent.
    pub session_ttl: Duration,
    /// Longest wait for one request. Default 2 s.
    pub request_timeout: Duration,
    /// TLS, for `https://` endpoints. Default none.
    pub tls: Option<EtcdTls>,
}

/// TLS to etcd, as its `--trusted-ca-file` and `--client-cert-auth` expect: PEM contents.
#[derive(Clone, Default)]
pub struct EtcdTls {
    /// The CA certificate(s) that sign the members' certificates.
    pub ca: Vec<u8>,
    /// This client's certificate chain and private key, when members ask for one.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for EtcdTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("EtcdTls")
            .field("client_certificate", &self.identity.is_some())
            .finish()
    }
}

impl EtcdOptions {
    pub fn new(endpoints: Vec<String>, cluster: &str, session_ttl: Duration) -> Self {
        EtcdOptions {
            endpoints,
            cluster: cluster.to_string(),
            session_ttl,
            request_timeout: Duration::from_secs(2),
            tls: None,
        }
    }
}

/// What `leases/NAME` holds. Written with serde_json in this field order, so a transaction can
/// compare the bytes.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
struct Holder {
    holder: String,
    term: u64,
}

fn holder_bytes(holder: &str, term: u64) -> Vec<u8> {
    serde_json::to_vec(&Holder {
        holder: holder.to_string(),
        term,
    })
    .unwrap_or_default()
}

type Keeper = (LeaseKeeper, LeaseKeepAliveStream);

#[derive(Debug, Default)]
struct Session {
    /// The etcd lease id of the current session; 0 before the first grant.
    id: i64,
    generation: u64,
    /// Session records this process holds, to write again under a new session.
    records: BTreeMap<String, Vec<u8>>,
}

/// The etcd store.
pub struct Etcd {
    client: Client,
    root: String,
    options: EtcdOptions,
    session: Mutex<Session>,
    /// Etcd lease ids of the leases this process holds, by lease name.
    held: Mutex<HashMap<String, i64>>,
    keepers: tokio::sync::Mutex<HashMap<i64, Keeper>>,
    connection: watch::Sender<Connection>,
    /// Wakes the session keeper early (a request failed for want of the session).
    check_session: Notify,
    task: Mutex<Option<AbortHandle>>,
    /// Successful writes, for [`Store::writes`].
    writes: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Etcd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Etcd")
            .field("endpoints", &self.options.endpoints)
            .field("root", &self.root)
            .finish_non_exhaustive()
    }
}

fn unavailable(e: etcd_client::Error) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// Worth another attempt (on another member): a failure of the transport, which etcd never
/// saw; and for an idempotent request a lost answer (timed out, cancelled).
fn retry(e: &etcd_client::Error, idempotent: bool) -> bool {
    match e {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        etcd_client::Error::GRpcStatus(s) => match s.code() {
            tonic_code::Unavailable | tonic_code::Unknown => {
                !s.message().contains("lease not found")
            }
            tonic_code::Cancelled | tonic_code::DeadlineExceeded => idempotent,
            _ => false,
        },
        _ => false,
    }
}

/// etcd says the lease is gone (expired or revoked).
fn expired(e: &etcd_client::Error) -> bool {
    e.to_string().contains("lease not found")
}

fn ttl_seconds(ttl: Duration) -> i64 {
    (ttl.as_secs_f64().ceil() as i64).max(1)
}

impl Etcd {
    /// Connects and starts a session. Fails only on arguments that can never work (a malformed
    /// endpoint); an unreachable etcd gives a store that is not connected yet and keeps
    /// trying, so a node can serve from what it has while etcd is away.
    pub async fn connect(options: EtcdOptions) -> Result<Arc<Etcd>, StoreError> {
        // One attempt gets half the request timeout; `call` makes another on another member.
        let attempt = (options.request_timeout / 2).max(Duration::from_millis(500));
        let mut connect = ConnectOptions::new()
            .with_connect_timeout(attempt)
            .with_timeout(attempt)
            .with_keep_alive(Duration::from_secs(1), options.request_timeout)
            .with_require_leader(true);
        if let Some(tls) = &options.tls {
            let mut o = etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(&tls.ca));
            if let Some((cert, key)) = &tls.identity {
                o = o.identity(etcd_client::Identity::from_pem(cert, key));
            }
            connect = connect.with_tls(o);
        }
        let client = Client::connect(&options.endpoints, Some(connect))
            .await
            .map_err(|e| {
                StoreError::Unavailable(format!(
                    "cannot use etcd endpoints {}: {e}",
                    options.endpoints.join(", ")
                ))
            })?;
        let store = Arc::new(Etcd {
            client,
            root: format!("/tandem/{}/", options.cluster),
            session: Mutex::default(),
            held: Mutex::default(),
            keepers: tokio::sync::Mutex::default(),
            connection: watch::Sender::new(Connection {
                connected: false,
                since: SystemTime::now(),
                session: 0,
                detail: "connecting".into(),
            }),
            check_session: Notify::new(),
            task: Mutex::new(None),
            writes: std::sync::atomic::AtomicU64::new(0),
            options,
        });
        let task = tokio::spawn(keep_session(Arc::downgrade(&store)));
        *lock(&store.task) = Some(task.abort_handle());
        Ok(store)
    }

    /// Waits until the first session is granted, at most `deadline`; the reason otherwise.
    pub async fn ready(&self, deadline: Duration) -> Result<(), String> {
        let mut rx = self.connection.subscribe();
        let waited = tokio::time::timeout(deadline, async {
            loop {
                if rx.borrow_and_update().session > 0 {
                    return;
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
        match waited {
            Ok(()) if self.connection.borrow().session > 0 => Ok(()),
            _ => Err(self.connection.borrow().detail.clone()),
        }
    }

    fn key(&self, key: &str) -> String {
        format!("{}{key}", self.root)
    }

    fn strip<'k>(&self, key: &'k [u8]) -> Option<&'k str> {
        std::str::from_utf8(key).ok()?.strip_prefix(&self.root)
    }

    fn client(&self) -> Client {
        self.client.clone()
    }

    /// Records the outcome of a request in the connection state.
    fn seen<T>(&self, r: Result<T, etcd_client::Error>) -> Result<T, StoreError> {
        match r {
            Ok(v) => {
                self.set_connected(true, None);
                Ok(v)
            }
            Err(e) => {
                let text = e.to_string();
                if expired(&e) {
                    // etcd answered: the session is gone, not the connection.
                    self.check_session.notify_one();
                } else {
                    self.set_connected(false, Some(text.clone()));
                }
                Err(StoreError::Unavailable(text))
            }
        }
    }

    /// Runs a request, again when it did not reach etcd (a member down or just gone: the next
    /// attempt goes to another one), and for an `idempotent` request also when its answer was
    /// lost (timed out), within twice the request timeout; the outcome goes to [`Etcd::seen`].
    async fn call<T, Fut>(
        &self,
        idempotent: bool,
        f: impl Fn(Client) -> Fut,
    ) -> Result<T, StoreError>
    where
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let deadline = Instant::now() + self.options.request_timeout * 2;
        let mut pause = Duration::from_millis(20);
        loop {
            let r = f(self.client()).await;
            match &r {
                Err(e) if retry(e, idempotent) && Instant::now() + pause < deadline => {
                    tokio::time::sleep(pause).await;
                    pause *= 2;
                }
                _ => return self.seen(r),
            }
        }
    }

    fn set_connected(&self, connected: bool, why: Option<String>) {
        self.connection.send_if_modified(|c| {
            if c.connected == connected {
                return false;
            }
            c.connected = connected;
            c.since = SystemTime::now();
            c.detail = why.unwrap_or_else(|| "etcd answers".into());
            true
        });
    }

    async fn txn(
        &self,
        txn: Txn,
        idempotent: bool,
    ) -> Result<etcd_client::TxnResponse, StoreError> {
        let resp = self
            .call(idempotent, |mut c| {
                let txn = txn.clone();
                async move { c.txn(txn).await }
            })
            .await?;
        if resp.succeeded() {
            self.writes
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(resp)
    }

    fn session_id(&self) -> i64 {
        lock(&self.session).id
    }

    async fn get_kv(&self, key: &str) -> Result<(Option<KeyValue>, u64), StoreError> {
        let k = self.key(key);
        let mut resp = self
            .call(true, |mut c| {
                let k = k.clone();
                async move { c.get(k, None).await }
            })
            .await?;
        let revision = resp.header().map_or(0, |h| h.revision()) as u64;
        Ok((resp.take_kvs().into_iter().next(), revision))
    }

    fn compare(&self, key: &str, expect: Expect) -> Option<Compare> {
        let k = self.key(key);
        match expect {
            Expect::Any => None,
            Expect::Absent => Some(Compare::create_revision(k, CompareOp::Equal, 0)),
            Expect::Revision(r) => Some(Compare::mod_revision(k, CompareOp::Equal, r as i64)),
        }
    }

    /// The revision a failed comparison found.
    async fn conflict(&self, key: &str) -> StoreError {
        match self.get_kv(key).await {
            Ok((kv, _)) => StoreError::Conflict {
                key: key.to_string(),
                revision: kv.map(|kv| kv.mod_revision() as u64),
            },
            Err(e) => e,
        }
    }

    /// Keeps an etcd lease alive once; its remaining time to live (0: it expired). A stream
    /// that broke (its member gone) is opened again at once, which puts it on another member,
    /// within twice the request timeout, as [`Etcd::call`] does for requests. The streams'
    /// lock is held for one attempt at a time, so the other leases' keep-alives go on between.
    async fn keep_alive(&self, id: i64) -> Result<i64, StoreError> {
        let deadline = Instant::now() + self.options.request_timeout * 2;
        let mut pause = Duration::from_millis(20);
        loop {
            let again = Instant::now() + pause < deadline;
            let outcome = {
                let mut keepers = self.keepers.lock().await;
                self.keep_alive_once(&mut keepers, id).await
            };
            match outcome {
                KeepAlive::Ttl(ttl) => {
                    self.set_connected(true, None);
                    return Ok(ttl);
                }
                KeepAlive::Expired => return Ok(0),
                KeepAlive::Failed(e) if again && retry(&e, true) => {}
                KeepAlive::Failed(e) => return self.seen(Err(e)),
                KeepAlive::Closed if again => {}
                KeepAlive::Closed => {
                    return Err(StoreError::Unavailable("keep-alive stream closed".into()));
                }
                KeepAlive::TimedOut(why) => {
                    self.set_connected(false, Some(why.clone()));
                    return Err(StoreError::Unavailable(why));
                }
            }
            tokio::time::sleep(pause).await;
            pause *= 2;
        }
    }

    /// One keep-alive on the lease's stream, opening it first if needed; a stream that failed
    /// is dropped.
    async fn keep_alive_once(&self, keepers: &mut HashMap<i64, Keeper>, id: i64) -> KeepAlive {
        if let std::collections::hash_map::Entry::Vacant(slot) = keepers.entry(id) {
            match self.client().lease_keep_alive(id).await {
                Ok(k) => {
                    slot.insert(k);
                }
                // Opening a keep-alive stream checks the lease first.
                Err(e) if expired(&e) => return KeepAlive::Expired,
                Err(e) => return KeepAlive::Failed(e),
            }
        }
        let timeout = self.options.request_timeout;
        let Some((keeper, stream)) = keepers.get_mut(&id) else {
            return KeepAlive::Closed;
        };
        let answer = tokio::time::timeout(timeout, async {
            keeper.keep_alive().await?;
            stream.message().await
        })
        .await;
        let outcome = match answer {
            Ok(Ok(Some(resp))) => return KeepAlive::Ttl(resp.ttl()),
            Ok(Ok(None)) => KeepAlive::Closed,
            Ok(Err(e)) if expired(&e) => KeepAlive::Expired,
            Ok(Err(e)) => KeepAlive::Failed(e),
            Err(_) => KeepAlive::TimedOut(format!("no keep-alive answer within {timeout:?}")),
        };
        keepers.remove(&id);
        outcome
    }

    async fn forget_keeper(&self, id: i64) {
        self.keepers.lock().await.remove(&id);
    }

    /// Grants a new session and writes every session record under it.
    async fn new_session(&self) -> Result<(), StoreError> {
        let ttl = ttl_seconds(self.options.session_ttl);
        let grant = self
            .call(true, |mut c| async move { c.lease_grant(ttl, None).await })
            .await?;
        let (old, records) = {
            let s = lock(&self.session);
            (s.id, s.records.clone())
        };
        if old != 0 {
            self.forget_keeper(old).await;
        }
        let id = grant.id();
        for (key, value) in &records {
            let opts = PutOptions::new().with_lease(id);
            self.seen(
                self.client()
                    .put(self.key(key), value.clone(), Some(opts))
                    .await,
            )?;
        }
        let generation = {
            let mut s = lock(&self.session);
            s.id = id;
            s.generation += 1;
            s.generation
        };
        self.connection.send_modify(|c| {
            c.connected = true;
            c.session = generation;
            c.since = SystemTime::now();
            c.detail = format!(
                "session {generation} (etcd lease {id:x}, ttl {ttl}s) at {}",
                self.options.endpoints.join(", ")
            );
        });
        tracing::info!(
            session = generation,
            lease = id,
            records = records.len(),
            "etcd session started"
        );
        Ok(())
    }
}

/// What one keep-alive on a lease's stream came to.
enum KeepAlive {
    /// The lease's remaining time to live, in seconds.
    Ttl(i64),
    /// etcd says the lease is gone.
    Expired,
    /// The stream could not be opened or broke.
    Failed(etcd_client::Error),
    /// The member closed the stream.
    Closed,
    /// No answer within the request timeout.
    TimedOut(String),
}

/// The first pause after a failed keep-alive.
const RETRY_FIRST: Duration = Duration::from_millis(100);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Keeps the session alive every third of its time to live; grants a new one when etcd says
/// it expired (or before the first). A failed attempt is tried again soon (from 100 ms,
/// doubling up to the usual period): the member that held the keep-alive stream may just have
/// gone, and the next attempt goes to another one well within the second a cluster node waits
/// before it says it is isolated.
async fn keep_session(store: std::sync::Weak<Etcd>) {
    let mut retry_in = RETRY_FIRST;
    loop {
        let Some(s) = store.upgrade() else { return };
        let every = s.options.session_ttl / 3;
        let id = s.session_id();
        let outcome = if id == 0 {
            s.new_session().await
        } else {
            match s.keep_alive(id).await {
                Ok(ttl) if ttl > 0 => Ok(()),
                Ok(_) => {
                    tracing::warn!("etcd session expired while cut off; starting a new one");
                    s.new_session().await
                }
                Err(e) => Err(e),
            }
        };
        let wait = match outcome {
            Ok(()) => {
                retry_in = RETRY_FIRST;
                every
            }
            Err(e) => {
                tracing::debug!(error = %e, "etcd session keep-alive failed");
                let wait = retry_in.min(every);
                retry_in = (retry_in * 2).min(every);
                wait
            }
        };
        // Holding `s` while waiting delays the end of a dropped store by one wait at most.
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = s.check_session.notified() => {}
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        if let Some(t) = lock(&self.task).take() {
            t.abort();
        }
    }
}

impl Store for Etcd {
    fn acquire<'a>(
        &'a self,
        key: &'a str,
        holder: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Lease, StoreError>> {
        Box::pin(async move {
            let asked = Instant::now();
            let (lk, tk) = (keys::lease(key), keys::term(key));
            let (current, _) = self.get_kv(&lk).await?;
            if let Some(kv) = &current {
                let h: Option<Holder> = serde_json::from_slice(kv.value()).ok();
                match h {
                    Some(h) if h.holder == holder => {
                        lock(&self.held).insert(key.to_string(), kv.lease());
                        return self.renew(key, holder, h.term, ttl).await;
                    }
                    Some(h) => {
                        let left = self.left(kv.lease()).await;
                        return Err(StoreError::Held {
                            holder: h.holder,
                            term: h.term,
                            left,
                        });
                    }
                    None => {
                        return Err(StoreError::Unavailable(format!(
                            "{lk} holds something that is not a lease record"
                        )));
                    }
                }
            }
            let (term_kv, _) = self.get_kv(&tk).await?;
            let last: u64 = term_kv
                .as_ref()
                .and_then(|kv| std::str::from_utf8(kv.value()).ok()?.parse().ok())
                .unwrap_or(0);
            let term_rev = term_kv.as_ref().map_or(0, |kv| kv.mod_revision());
            let secs = ttl_seconds(ttl);
            let grant = self
                .call(true, |mut c| async move { c.lease_grant(secs, None).await })
                .await?;
            let id = grant.id();
            let term = last + 1;
            let txn = Txn::new()
                .when([
                    Compare::create_revision(self.key(&lk), CompareOp::Equal, 0),
                    Compare::mod_revision(self.key(&tk), CompareOp::Equal, term_rev),
                ])
                .and_then([
                    TxnOp::put(
                        self.key(&lk),
                        holder_bytes(holder, term),
                        Some(PutOptions::new().with_lease(id)),
                    ),
                    TxnOp::put(self.key(&tk), term.to_string(), None),
                ]);
            let resp = self.txn(txn, false).await?;
            if !resp.succeeded() {
                let _ = self.client().lease_revoke(id).await;
                // Someone took it meanwhile: report them.
                return match self.get(key).await? {
                    (Some(l), _) => Err(StoreError::Held {
                        holder: l.holder,
                        term: l.term,
                        left: l.expires.saturating_duration_since(Instant::now()),
                    }),
                    (None, term) => Err(StoreError::Lost { holder: None, term }),
                };
            }
            lock(&self.held).insert(key.to_string(), id);
            Ok(Lease {
                holder: holder.to_string(),
                term,
                expires: crate::deadline(asked, ttl),
            })
        })
    }

    fn renew<'a>(
        &'a self,
        key: &'a str,
        holder: &'a str,
        term: u64,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Lease, StoreError>> {
        Box::pin(async move {
            let asked = Instant::now();
            let known = lock(&self.held).get(key).copied();
            let id = match known {
                Some(id) => id,
                None => {
                    // After a restart: the record tells which etcd lease carries it.
                    let (kv, _) = self.get_kv(&keys::lease(key)).await?;
                    match kv {
                        Some(kv) if kv.value() == holder_bytes(holder, term) => kv.lease(),
                        _ => return Err(self.lost(key).await),
                    }
                }
            };
            match self.keep_alive(id).await? {
                left if left > 0 => {
                    lock(&self.held).insert(key.to_string(), id);
                    Ok(Lease {
                        holder: holder.to_string(),
                        term,
                        expires: crate::deadline(asked, ttl),
                    })
                }
                _ => {
                    lock(&self.held).remove(key);
                    self.forget_keeper(id).await;
                    Err(self.lost(key).await)
                }
            }
        })
    }

    fn release<'a>(
        &'a self,
        key: &'a str,
        holder: &'a str,
        term: u64,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let lk = self.key(&keys::lease(key));
            let txn = Txn::new()
                .when([Compare::value(
                    lk.clone(),
                    CompareOp::Equal,
                    holder_bytes(holder, term),
                )])
                .and_then([TxnOp::delete(lk, None)]);
            let resp = self.txn(txn, false).await?;
            let id = lock(&self.held).remove(key);
            if let Some(id) = id {
                self.forget_keeper(id).await;
                let _ = self.client().lease_revoke(id).await;
            }
            if resp.succeeded() {
                Ok(())
            } else {
                Err(self.lost(key).await)
            }
        })
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(Option<Lease>, u64), StoreError>> {
        Box::pin(async move {
            let (kv, _) = self.get_kv(&keys::lease(key)).await?;
            let (term_kv, _) = self.get_kv(&keys::term(key)).await?;
            let last: u64 = term_kv
                .as_ref()
                .and_then(|kv| std::str::from_utf8(kv.value()).ok()?.parse().ok())
                .unwrap_or(0);
            let lease = match kv {
                Some(kv) => match serde_json::from_slice::<Holder>(kv.value()) {
                    Ok(h) => {
                        let left = self.left(kv.lease()).await;
                        Some(Lease {
                            holder: h.holder,
                            term: h.term,
                            expires: Instant::now() + left,
                        })
                    }
                    Err(_) => None,
                },
                None => None,
            };
            Ok((lease, last))
        })
    }

    fn put<'a>(
        &'a self,
        key: &'a str,
        value: Vec<u8>,
        scope: Scope,
        expect: Expect,
    ) -> BoxFuture<'a, Result<u64, StoreError>> {
        Box::pin(async move {
            let mut opts = PutOptions::new();
            if scope == Scope::Session {
                let id = self.session_id();
                if id == 0 {
                    return Err(StoreError::Unavailable(
                        "no etcd session yet (etcd not reached)".into(),
                    ));
                }
                opts = opts.with_lease(id);
            }
            let op = TxnOp::put(self.key(key), value.clone(), Some(opts));
            let txn = match self.compare(key, expect) {
                Some(c) => Txn::new().when([c]).and_then([op]),
                None => Txn::new().and_then([op]),
            };
            let resp = self.txn(txn, expect == Expect::Any).await?;
            if !resp.succeeded() {
                return Err(self.conflict(key).await);
            }
            {
                let mut s = lock(&self.session);
                if scope == Scope::Session {
                    s.records.insert(key.to_string(), value);
                } else {
                    s.records.remove(key);
                }
            }
            Ok(resp.header().map_or(0, |h| h.revision()) as u64)
        })
    }

    fn put_fenced<'a>(
        &'a self,
        key: &'a str,
        value: Vec<u8>,
        lease: &'a str,
        holder: &'a str,
        term: u64,
    ) -> BoxFuture<'a, Result<u64, StoreError>> {
        Box::pin(async move {
            let txn = Txn::new()
                .when([Compare::value(
                    self.key(&keys::lease(lease)),
                    CompareOp::Equal,
                    holder_bytes(holder, term),
                )])
                .and_then([TxnOp::put(self.key(key), value, None)]);
            let resp = self.txn(txn, true).await?;
            if resp.succeeded() {
                Ok(resp.header().map_or(0, |h| h.revision()) as u64)
            } else {
                Err(self.lost(lease).await)
            }
        })
    }

    fn write_many<'a>(&'a self, batch: Batch) -> BoxFuture<'a, Result<u64, StoreError>> {
        Box::pin(async move {
            let session = self.session_id();
            if session == 0 && batch.puts.iter().any(|(_, _, s)| *s == Scope::Session) {
                return Err(StoreError::Unavailable(
                    "no etcd session yet (etcd not reached)".into(),
                ));
            }
            let mut ops: Vec<TxnOp> = Vec::with_capacity(batch.len());
            for (key, value, scope) in &batch.puts {
                let mut opts = PutOptions::new();
                if *scope == Scope::Session {
                    opts = opts.with_lease(session);
                }
                ops.push(TxnOp::put(self.key(key), value.clone(), Some(opts)));
            }
            for key in &batch.deletes {
                ops.push(TxnOp::delete(self.key(key), None));
            }
            let mut revision = 0;
            for chunk in ops.chunks(BATCH_LIMIT) {
                let resp = self.txn(Txn::new().and_then(chunk.to_vec()), true).await?;
                revision = resp.header().map_or(revision, |h| h.revision() as u64);
            }
            let mut s = lock(&self.session);
            for (key, value, scope) in batch.puts {
                if scope == Scope::Session {
                    s.records.insert(key, value);
                } else {
                    s.records.remove(&key);
                }
            }
            for key in &batch.deletes {
                s.records.remove(key);
            }
            Ok(revision)
        })
    }

    fn delete<'a>(
        &'a self,
        key: &'a str,
        expect: Expect,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let op = TxnOp::delete(self.key(key), None);
            let txn = match self.compare(key, expect) {
                Some(c) => Txn::new().when([c]).and_then([op]),
                None => Txn::new().and_then([op]),
            };
            let resp = self.txn(txn, expect == Expect::Any).await?;
            if !resp.succeeded() {
                return Err(self.conflict(key).await);
            }
            lock(&self.session).records.remove(key);
            let deleted = resp.op_responses().into_iter().any(|r| match r {
                TxnOpResponse::Delete(d) => d.deleted() > 0,
                _ => false,
            });
            Ok(deleted)
        })
    }

    fn read<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Record>, StoreError>> {
        Box::pin(async move {
            let (kv, _) = self.get_kv(key).await?;
            Ok(kv.map(|kv| Record {
                revision: kv.mod_revision() as u64,
                value: kv.value().to_vec(),
            }))
        })
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Listing, StoreError>> {
        Box::pin(async move {
            let opts = GetOptions::new().with_prefix();
            let k = self.key(prefix);
            let resp = self
                .call(true, |mut c| {
                    let (k, opts) = (k.clone(), opts.clone());
                    async move { c.get(k, Some(opts)).await }
                })
                .await?;
            let revision = resp.header().map_or(0, |h| h.revision()) as u64;
            let items = resp
                .kvs()
                .iter()
                .filter_map(|kv| {
                    let key = self.strip(kv.key())?.to_string();
                    let record = Record {
                        value: kv.value().to_vec(),
                        revision: kv.mod_revision() as u64,
                    };
                    Some((key, record))
                })
                .collect();
            Ok((items, revision))
        })
    }

    fn watch<'a>(
        &'a self,
        prefix: &'a str,
        after: u64,
    ) -> BoxFuture<'a, Result<Watch, StoreError>> {
        Box::pin(async move {
            let opts = WatchOptions::new()
                .with_prefix()
                .with_start_revision(after as i64 + 1);
            let k = self.key(prefix);
            let mut stream = self
                .call(true, |mut c| {
                    let (k, opts) = (k.clone(), opts.clone());
                    async move { c.watch(k, Some(opts)).await }
                })
                .await?;
            let (tx, rx) = mpsc::channel(64);
            let root = self.root.clone();
            tokio::spawn(async move {
                loop {
                    let item = match stream.message().await {
                        Ok(Some(resp)) if resp.canceled() => Err(StoreError::Unavailable(format!(
                            "watch canceled: {} (compacted at {})",
                            resp.cancel_reason(),
                            resp.compact_revision()
                        ))),
                        Ok(Some(resp)) => {
                            let changes: Vec<Change> = resp
                                .events()
                                .iter()
                                .filter_map(|e| change(&root, e))
                                .collect();
                            if changes.is_empty() {
                                continue;
                            }
                            Ok(changes)
                        }
                        Ok(None) => Err(StoreError::Unavailable("watch ended".into())),
                        Err(e) => Err(unavailable(e)),
                    };
                    let end = item.is_err();
                    if tx.send(item).await.is_err() || end {
                        return;
                    }
                }
            });
            Ok(rx)
        })
    }

    fn connection(&self) -> watch::Receiver<Connection> {
        self.connection.subscribe()
    }

    fn writes(&self) -> u64 {
        self.writes.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Etcd {
    /// Time left on an etcd lease (zero when it is gone or unknown).
    async fn left(&self, id: i64) -> Duration {
        match self.client().lease_time_to_live(id, None).await {
            Ok(r) if r.ttl() > 0 => Duration::from_secs(r.ttl() as u64),
            _ => Duration::ZERO,
        }
    }

    /// `Lost` with whoever holds the lease now.
    async fn lost(&self, key: &str) -> StoreError {
        match self.get(key).await {
            Ok((lease, term)) => StoreError::Lost {
                holder: lease.map(|l| l.holder),
                term,
            },
            Err(e) => e,
        }
    }
}

fn change(root: &str, e: &etcd_client::Event) -> Option<Change> {
    let kv = e.kv()?;
    let key = std::str::from_utf8(kv.key())
        .ok()?
        .strip_prefix(root)?
        .to_string();
    Some(match e.event_type() {
        EventType::Put => Change::Put {
            key,
            record: Record {
                value: kv.value().to_vec(),
                revision: kv.mod_revision() as u64,
            },
        },
        EventType::Delete => Change::Delete {
            key,
            revision: kv.mod_revision() as u64,
        },
    })
}
