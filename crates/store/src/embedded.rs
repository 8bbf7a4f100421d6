//! The single-machine store: leases, records and watches in this process; lease holders and
//! terms also in a JSON file written atomically (temporary file, fsync, rename) whenever a
//! lease changes hands, so terms never go back across restarts.
//!
//! Records are not persisted: in the single-process default, operator intent (a disabled
//! endpoint, a capacity) lasts until Tandem stops, as it always has. The process is its own
//! session, so [`Scope::Session`] records live until deleted.

use std::collections::{BTreeMap, VecDeque};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc, watch};
use tokio::time::Instant;

use crate::{
    Batch, BoxFuture, Change, Connection, Expect, Lease, Listing, Record, Scope, Store, StoreError,
    Watch,
};

/// Changes kept for watchers that start from an older revision.
const HISTORY: usize = 4096;

#[derive(Clone, Debug)]
struct Held {
    holder: Option<String>,
    term: u64,
    expires: Instant,
}

#[derive(Debug, Default)]
struct Inner {
    leases: BTreeMap<String, Held>,
    /// Each lease's last time to live, in ms, for the file.
    ttls: BTreeMap<String, u64>,
    records: BTreeMap<String, Record>,
    revision: u64,
    history: VecDeque<Change>,
}

impl Inner {
    fn live(&self, key: &str, now: Instant) -> Option<(&str, u64, Instant)> {
        let l = self.leases.get(key)?;
        match &l.holder {
            Some(h) if l.expires > now => Some((h, l.term, l.expires)),
            _ => None,
        }
    }

    fn check(&self, key: &str, expect: Expect) -> Result<(), StoreError> {
        let now = self.records.get(key).map(|r| r.revision);
        let ok = match expect {
            Expect::Any => true,
            Expect::Absent => now.is_none(),
            Expect::Revision(r) => now == Some(r),
        };
        if ok {
            Ok(())
        } else {
            Err(StoreError::Conflict {
                key: key.to_string(),
                revision: now,
            })
        }
    }

    fn record(&mut self, change: Change, tx: &broadcast::Sender<Change>) {
        if self.history.len() == HISTORY {
            self.history.pop_front();
        }
        self.history.push_back(change.clone());
        let _ = tx.send(change);
    }
}

/// What the state file keeps: who held each lease last and at which term.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Saved {
    leases: BTreeMap<String, SavedLease>,
}

#[derive(Debug, Serialize, Deserialize)]
struct SavedLease {
    holder: Option<String>,
    term: u64,
    ttl_ms: u64,
}

/// The single-machine store.
#[derive(Debug)]
pub struct Embedded {
    path: Option<PathBuf>,
    inner: Mutex<Inner>,
    changes: broadcast::Sender<Change>,
    connection: watch::Sender<Connection>,
}

impl Embedded {
    fn with_inner(path: Option<PathBuf>, inner: Inner) -> Self {
        Embedded {
            path,
            inner: Mutex::new(inner),
            changes: broadcast::Sender::new(HISTORY),
            connection: watch::Sender::new(Connection {
                connected: true,
                since: SystemTime::now(),
                session: 1,
                detail: "embedded".into(),
            }),
        }
    }

    /// A store that forgets everything when dropped (tests, and Tandem without databases).
    pub fn in_memory() -> Self {
        Self::with_inner(None, Inner::default())
    }

    /// Opens (or creates) the store kept in `path`. A lease held when the file was written is
    /// held again for its full time to live from now: a restarted Tandem cannot tell whether
    /// its holder still acts on it.
    pub fn open(path: &Path) -> io::Result<Self> {
        let saved: Saved = match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: not a Tandem store file: {e}", path.display()),
                )
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Saved::default(),
            Err(e) => return Err(e),
        };
        let now = Instant::now();
        let mut inner = Inner::default();
        for (key, l) in saved.leases {
            inner.ttls.insert(key.clone(), l.ttl_ms);
            let held = Held {
                holder: l.holder,
                term: l.term,
                expires: now + Duration::from_millis(l.ttl_ms),
            };
            inner.leases.insert(key, held);
        }
        Ok(Self::with_inner(Some(path.to_path_buf()), inner))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn save(&self, inner: &Inner) -> io::Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let saved = Saved {
            leases: inner
                .leases
                .iter()
                .map(|(k, l)| {
                    let lease = SavedLease {
                        holder: l.holder.clone(),
                        term: l.term,
                        ttl_ms: inner.ttls.get(k).copied().unwrap_or(0),
                    };
                    (k.clone(), lease)
                })
                .collect(),
        };
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(&saved).map_err(io::Error::other)?)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }

    /// Runs `f` on the leases; when it reports a change of holder, the file is written, and
    /// if that fails the change is undone: a term that could go back after a restart is no
    /// token.
    fn with_leases<T>(
        &self,
        f: impl FnOnce(&mut Inner) -> Result<(T, bool), StoreError>,
    ) -> Result<T, StoreError> {
        let mut inner = self.lock();
        let before = (inner.leases.clone(), inner.ttls.clone());
        let (out, changed) = f(&mut inner)?;
        if changed && let Err(e) = self.save(&inner) {
            (inner.leases, inner.ttls) = before;
            return Err(StoreError::Unavailable(format!(
                "cannot write the store file: {e}"
            )));
        }
        Ok(out)
    }

    fn write(&self, key: &str, value: Vec<u8>, expect: Expect) -> Result<u64, StoreError> {
        let mut inner = self.lock();
        inner.check(key, expect)?;
        inner.revision += 1;
        let record = Record {
            value,
            revision: inner.revision,
        };
        inner.records.insert(key.to_string(), record.clone());
        let change = Change::Put {
            key: key.to_string(),
            record,
        };
        inner.record(change, &self.changes);
        Ok(inner.revision)
    }
}

impl Store for Embedded {
    fn acquire<'a>(
        &'a self,
        key: &'a str,
        holder: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Lease, StoreError>> {
        Box::pin(async move {
            let now = Instant::now();
            self.with_leases(|inner| {
                let l = inner.leases.entry(key.to_string()).or_insert(Held {
                    holder: None,
                    term: 0,
                    expires: now,
                });
                let live = l.holder.is_some() && l.expires > now;
                if live && l.holder.as_deref() != Some(holder) {
                    return Err(StoreError::Held {
                        holder: l.holder.clone().unwrap_or_default(),
                        term: l.term,
                        left: l.expires - now,
                    });
                }
                let changed = !live;
                if changed {
                    l.term += 1;
                    l.holder = Some(holder.to_string());
                }
                l.expires = now + ttl;
                let lease = Lease {
                    holder: holder.to_string(),
                    term: l.term,
                    expires: l.expires,
                };
                inner.ttls.insert(key.to_string(), ttl.as_millis() as u64);
                Ok((lease, changed))
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
            let now = Instant::now();
            self.with_leases(|inner| {
                let Some(l) = inner.leases.get_mut(key) else {
                    return Err(StoreError::Lost {
                        holder: None,
                        term: 0,
                    });
                };
                if l.holder.as_deref() != Some(holder) || l.term != term || l.expires <= now {
                    return Err(StoreError::Lost {
                        holder: l.holder.clone().filter(|_| l.expires > now),
                        term: l.term,
                    });
                }
                l.expires = now + ttl;
                let lease = Lease {
                    holder: holder.to_string(),
                    term,
                    expires: l.expires,
                };
                Ok((lease, false))
            })
        })
    }

    fn release<'a>(
        &'a self,
        key: &'a str,
        holder: &'a str,
        term: u64,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            self.with_leases(|inner| match inner.leases.get_mut(key) {
                Some(l) if l.holder.as_deref() == Some(holder) && l.term == term => {
                    l.holder = None;
                    Ok(((), true))
                }
                Some(l) => Err(StoreError::Lost {
                    holder: l.holder.clone(),
                    term: l.term,
                }),
                None => Err(StoreError::Lost {
                    holder: None,
                    term: 0,
                }),
            })
        })
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(Option<Lease>, u64), StoreError>> {
        Box::pin(async move {
            let now = Instant::now();
            let inner = self.lock();
            let term = inner.leases.get(key).map_or(0, |l| l.term);
            let lease = inner.live(key, now).map(|(holder, term, expires)| Lease {
                holder: holder.to_string(),
                term,
                expires,
            });
            Ok((lease, term))
        })
    }

    fn put<'a>(
        &'a self,
        key: &'a str,
        value: Vec<u8>,
        _scope: Scope,
        expect: Expect,
    ) -> BoxFuture<'a, Result<u64, StoreError>> {
        Box::pin(async move { self.write(key, value, expect) })
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
            {
                let inner = self.lock();
                let now = Instant::now();
                if inner.live(lease, now).map(|(h, t, _)| (h, t)) != Some((holder, term)) {
                    let current = inner.live(lease, now);
                    return Err(StoreError::Lost {
                        holder: current.map(|(h, _, _)| h.to_string()),
                        term: inner.leases.get(lease).map_or(0, |l| l.term),
                    });
                }
            }
            // Nothing else writes between the check and the write that could matter: the lease
            // can only change hands through this store, and a holder's own writes are ordered.
            self.write(key, value, Expect::Any)
        })
    }

    fn write_many<'a>(&'a self, batch: Batch) -> BoxFuture<'a, Result<u64, StoreError>> {
        Box::pin(async move {
            let mut revision = self.lock().revision;
            for (key, value, _) in batch.puts {
                revision = self.write(&key, value, Expect::Any)?;
            }
            for key in batch.deletes {
                if self.delete(&key, Expect::Any).await? {
                    revision = self.lock().revision;
                }
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
            let mut inner = self.lock();
            inner.check(key, expect)?;
            if inner.records.remove(key).is_none() {
                return Ok(false);
            }
            inner.revision += 1;
            let change = Change::Delete {
                key: key.to_string(),
                revision: inner.revision,
            };
            inner.record(change, &self.changes);
            Ok(true)
        })
    }

    fn read<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Record>, StoreError>> {
        Box::pin(async move { Ok(self.lock().records.get(key).cloned()) })
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Listing, StoreError>> {
        Box::pin(async move {
            let inner = self.lock();
            let items = inner
                .records
                .range(prefix.to_string()..)
                .take_while(|(k, _)| k.starts_with(prefix))
                .map(|(k, r)| (k.clone(), r.clone()))
                .collect();
            Ok((items, inner.revision))
        })
    }

    fn watch<'a>(
        &'a self,
        prefix: &'a str,
        after: u64,
    ) -> BoxFuture<'a, Result<Watch, StoreError>> {
        Box::pin(async move {
            let (backlog, mut rx) = {
                let inner = self.lock();
                let oldest = inner
                    .history
                    .front()
                    .map_or(inner.revision + 1, |c| c.revision());
                if after + 1 < oldest && after < inner.revision {
                    return Err(StoreError::Unavailable(format!(
                        "revision {after} is no longer kept; list again"
                    )));
                }
                let backlog: Vec<Change> = inner
                    .history
                    .iter()
                    .filter(|c| c.revision() > after && c.key().starts_with(prefix))
                    .cloned()
                    .collect();
                // Subscribed under the lock: no change falls between the backlog and the feed.
                (backlog, self.changes.subscribe())
            };
            let (tx, out) = mpsc::channel(64);
            let prefix = prefix.to_string();
            tokio::spawn(async move {
                if !backlog.is_empty() && tx.send(Ok(backlog)).await.is_err() {
                    return;
                }
                loop {
                    let item = match rx.recv().await {
                        Ok(c) if c.revision() > after && c.key().starts_with(&prefix) => {
                            Ok(vec![c])
                        }
                        Ok(_) => continue,
                        Err(broadcast::error::RecvError::Lagged(n)) => {
                            Err(StoreError::Unavailable(format!(
                                "the watch fell {n} changes behind; list again"
                            )))
                        }
                        Err(broadcast::error::RecvError::Closed) => return,
                    };
                    let end = item.is_err();
                    if tx.send(item).await.is_err() || end {
                        return;
                    }
                }
            });
            Ok(out)
        })
    }

    fn connection(&self) -> watch::Receiver<Connection> {
        self.connection.subscribe()
    }

    fn writes(&self) -> u64 {
        self.lock().revision
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const TTL: Duration = Duration::from_secs(3);

    #[tokio::test(start_paused = true)]
    async fn a_lease_is_exclusive_until_it_expires_and_takeover_bumps_the_term() {
        let s = Embedded::in_memory();
        let a = s.acquire("db", "edge", TTL).await.unwrap();
        assert_eq!(a.term, 1);
        let held = s.acquire("db", "region", TTL).await.unwrap_err();
        assert!(matches!(held, StoreError::Held { ref holder, term: 1, .. } if holder == "edge"));
        tokio::time::advance(Duration::from_secs(2)).await;
        s.renew("db", "edge", 1, TTL).await.unwrap();
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(s.acquire("db", "region", TTL).await.is_err(), "renewed");
        tokio::time::advance(Duration::from_millis(1001)).await;
        let b = s.acquire("db", "region", TTL).await.unwrap();
        assert_eq!(b.term, 2);
        let lost = s.renew("db", "edge", 1, TTL).await.unwrap_err();
        assert!(matches!(lost, StoreError::Lost { term: 2, .. }));
    }

    #[tokio::test(start_paused = true)]
    async fn release_hands_over_at_once_and_keeps_terms_growing() {
        let s = Embedded::in_memory();
        s.acquire("db", "edge", TTL).await.unwrap();
        assert!(
            s.release("db", "region", 1).await.is_err(),
            "not the holder"
        );
        s.release("db", "edge", 1).await.unwrap();
        assert_eq!(s.get("db").await.unwrap(), (None, 1));
        assert_eq!(s.acquire("db", "region", TTL).await.unwrap().term, 2);
        assert_eq!(
            s.acquire("db", "region", TTL).await.unwrap().term,
            2,
            "renewal"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn terms_and_holders_survive_a_restart_and_the_lease_is_held_again_for_its_ttl() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.json");
        {
            let s = Embedded::open(&path).unwrap();
            s.acquire("db", "edge", TTL).await.unwrap();
            tokio::time::advance(TTL * 2).await;
            s.acquire("db", "region", TTL).await.unwrap();
        }
        tokio::time::advance(TTL * 10).await;
        let s = Embedded::open(&path).unwrap();
        let (lease, term) = s.get("db").await.unwrap();
        assert_eq!(term, 2);
        assert_eq!(lease.unwrap().holder, "region");
        assert!(s.acquire("db", "edge", TTL).await.is_err());
        tokio::time::advance(TTL).await;
        assert_eq!(s.acquire("db", "edge", TTL).await.unwrap().term, 3);
        std::fs::write(&path, "{not json").unwrap();
        assert!(
            Embedded::open(&path).is_err(),
            "a damaged file is an error, not a reset"
        );
    }
}
