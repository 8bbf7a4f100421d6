//! The coordination store: leases that make a decision single-owner, each carrying a fencing
//! token (its term).
//!
//! A lease has one holder until it expires. Renewing keeps the term; anyone taking it over after
//! it expired (or was released) gets the next term, so every holder's actions can be told apart
//! and stale ones refused. Terms never go back, across restarts too.
//!
//! [`Embedded`] keeps leases in this process and their terms in a file (one machine); an etcd
//! store for clusters implements the same [`Store`] trait. Expiry runs on `tokio::time`, so
//! tests drive it with virtual time.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::future::Future;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A held lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub holder: String,
    /// The fencing token: grows by one at every change of holder.
    pub term: u64,
    pub expires: Instant,
}

/// Why a lease operation did not succeed.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum StoreError {
    #[error("the lease is held by {holder} (term {term}) for another {left:?}")]
    Held {
        holder: String,
        term: u64,
        left: Duration,
    },
    #[error("the lease was lost (now term {term}{})", holder.as_ref().map(|h| format!(", held by {h}")).unwrap_or_default())]
    Lost { holder: Option<String>, term: u64 },
    #[error("the store is unavailable: {0}")]
    Unavailable(String),
}

/// Leases by key. Every method is atomic.
pub trait Store: Send + Sync + Debug {
    /// Takes the lease when nobody holds it (or it expired): the term grows by one. The
    /// current holder acquiring again just renews.
    fn acquire<'a>(
        &'a self,
        key: &'a str,
        holder: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Lease, StoreError>>;

    /// Extends the lease of `holder` at `term`; fails with `Lost` once it expired or changed
    /// hands: the holder must then behave as if it never had it.
    fn renew<'a>(
        &'a self,
        key: &'a str,
        holder: &'a str,
        term: u64,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Lease, StoreError>>;

    /// Gives the lease up at once (a planned handover); the term is kept.
    fn release<'a>(
        &'a self,
        key: &'a str,
        holder: &'a str,
        term: u64,
    ) -> BoxFuture<'a, Result<(), StoreError>>;

    /// The current lease, if held, and the latest term.
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(Option<Lease>, u64), StoreError>>;
}

#[derive(Clone, Debug)]
struct Record {
    holder: Option<String>,
    term: u64,
    expires: Instant,
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

/// The single-machine store: leases in memory, terms and holders in a JSON file written
/// atomically (temporary file, fsync, rename) whenever a lease changes hands.
#[derive(Debug)]
pub struct Embedded {
    path: Option<PathBuf>,
    state: Mutex<(BTreeMap<String, Record>, BTreeMap<String, u64>)>,
}

impl Embedded {
    /// A store that forgets everything when dropped (tests).
    pub fn in_memory() -> Self {
        Embedded {
            path: None,
            state: Mutex::new(Default::default()),
        }
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
        let mut records = BTreeMap::new();
        let mut ttls = BTreeMap::new();
        for (key, l) in saved.leases {
            let ttl = Duration::from_millis(l.ttl_ms);
            ttls.insert(key.clone(), l.ttl_ms);
            records.insert(
                key,
                Record {
                    holder: l.holder,
                    term: l.term,
                    expires: now + ttl,
                },
            );
        }
        Ok(Embedded {
            path: Some(path.to_path_buf()),
            state: Mutex::new((records, ttls)),
        })
    }

    fn save(
        &self,
        records: &BTreeMap<String, Record>,
        ttls: &BTreeMap<String, u64>,
    ) -> io::Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let saved = Saved {
            leases: records
                .iter()
                .map(|(k, r)| {
                    let lease = SavedLease {
                        holder: r.holder.clone(),
                        term: r.term,
                        ttl_ms: ttls.get(k).copied().unwrap_or(0),
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

    fn with<T>(
        &self,
        f: impl FnOnce(
            &mut BTreeMap<String, Record>,
            &mut BTreeMap<String, u64>,
        ) -> Result<(T, bool), StoreError>,
    ) -> Result<T, StoreError> {
        let mut guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (records, ttls) = &mut *guard;
        let before = (records.clone(), ttls.clone());
        let (out, changed) = f(records, ttls)?;
        if changed && let Err(e) = self.save(records, ttls) {
            // Not durable, not granted: a term that could go back after a restart is no token.
            (*records, *ttls) = before;
            return Err(StoreError::Unavailable(format!(
                "cannot write the store file: {e}"
            )));
        }
        Ok(out)
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
            self.with(|records, ttls| {
                let r = records.entry(key.to_string()).or_insert(Record {
                    holder: None,
                    term: 0,
                    expires: now,
                });
                let live = r.holder.is_some() && r.expires > now;
                if live && r.holder.as_deref() != Some(holder) {
                    return Err(StoreError::Held {
                        holder: r.holder.clone().unwrap_or_default(),
                        term: r.term,
                        left: r.expires - now,
                    });
                }
                let changed = !live;
                if changed {
                    r.term += 1;
                    r.holder = Some(holder.to_string());
                }
                r.expires = now + ttl;
                ttls.insert(key.to_string(), ttl.as_millis() as u64);
                Ok((
                    Lease {
                        holder: holder.to_string(),
                        term: r.term,
                        expires: r.expires,
                    },
                    changed,
                ))
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
            self.with(|records, _| {
                let Some(r) = records.get_mut(key) else {
                    return Err(StoreError::Lost {
                        holder: None,
                        term: 0,
                    });
                };
                if r.holder.as_deref() != Some(holder) || r.term != term || r.expires <= now {
                    return Err(StoreError::Lost {
                        holder: r.holder.clone().filter(|_| r.expires > now),
                        term: r.term,
                    });
                }
                r.expires = now + ttl;
                Ok((
                    Lease {
                        holder: holder.to_string(),
                        term,
                        expires: r.expires,
                    },
                    false,
                ))
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
            self.with(|records, _| match records.get_mut(key) {
                Some(r) if r.holder.as_deref() == Some(holder) && r.term == term => {
                    r.holder = None;
                    Ok(((), true))
                }
                Some(r) => Err(StoreError::Lost {
                    holder: r.holder.clone(),
                    term: r.term,
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
            self.with(|records, _| {
                let Some(r) = records.get(key) else {
                    return Ok(((None, 0), false));
                };
                let lease = match &r.holder {
                    Some(h) if r.expires > now => Some(Lease {
                        holder: h.clone(),
                        term: r.term,
                        expires: r.expires,
                    }),
                    _ => None,
                };
                Ok(((lease, r.term), false))
            })
        })
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
