//! A local copy of every record under a prefix, kept current by a list and then a watch from
//! the list's revision; when the watch breaks (the store unreachable, history compacted) the
//! copy is kept as it was, marked stale, and rebuilt from a new list as soon as the store
//! answers. Readers never wait on the store.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock, RwLockReadGuard, Weak};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::AbortHandle;

use crate::{Change, Record, Store};

/// Retry delays after the store failed, doubling from the first to the last.
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);

#[derive(Debug, Default)]
struct State {
    records: BTreeMap<String, Record>,
    /// The store revision the copy reflects: the list's, then each change's.
    revision: u64,
    /// The copy reflects the store (false before the first list and after a broken watch).
    synced: bool,
}

/// A prefix of the store, mirrored locally.
#[derive(Debug)]
pub struct Mirror {
    prefix: String,
    state: RwLock<State>,
    version: watch::Sender<u64>,
    task: std::sync::Mutex<Option<AbortHandle>>,
}

impl Mirror {
    /// Starts mirroring `prefix`; must run inside a tokio runtime.
    pub fn start(store: Arc<dyn Store>, prefix: &str) -> Arc<Mirror> {
        let mirror = Arc::new(Mirror {
            prefix: prefix.to_string(),
            state: RwLock::default(),
            version: watch::Sender::new(0),
            task: std::sync::Mutex::new(None),
        });
        let task = tokio::spawn(run(Arc::downgrade(&mirror), store, prefix.to_string()));
        *mirror.task.lock().unwrap_or_else(|p| p.into_inner()) = Some(task.abort_handle());
        mirror
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn read(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Every record, by key.
    pub fn records(&self) -> BTreeMap<String, Record> {
        self.read().records.clone()
    }

    /// Runs `f` on the records without copying them.
    pub fn with<T>(&self, f: impl FnOnce(&BTreeMap<String, Record>) -> T) -> T {
        f(&self.read().records)
    }

    pub fn get(&self, key: &str) -> Option<Record> {
        self.read().records.get(key).cloned()
    }

    /// The store revision the copy has caught up with: a write at this revision or before is
    /// reflected in it.
    pub fn revision(&self) -> u64 {
        self.read().revision
    }

    /// Waits (at most `deadline`) until the copy reflects revision `r`; whether it does.
    pub async fn caught_up(&self, r: u64, deadline: std::time::Duration) -> bool {
        let mut rx = self.subscribe();
        tokio::time::timeout(deadline, async {
            while self.revision() < r {
                if rx.changed().await.is_err() {
                    return;
                }
            }
        })
        .await
        .is_ok()
            && self.revision() >= r
    }

    /// Whether the copy follows the store now.
    pub fn synced(&self) -> bool {
        self.read().synced
    }

    /// Changes (a counter) whenever the copy changes, or falls out of or back into sync.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    fn update(&self, f: impl FnOnce(&mut State)) {
        {
            let mut st = self.state.write().unwrap_or_else(|p| p.into_inner());
            f(&mut st);
        }
        self.version.send_modify(|v| *v += 1);
    }
}

impl Drop for Mirror {
    fn drop(&mut self) {
        if let Some(t) = self.task.lock().unwrap_or_else(|p| p.into_inner()).take() {
            t.abort();
        }
    }
}

async fn run(mirror: Weak<Mirror>, store: Arc<dyn Store>, prefix: String) {
    let mut delay = RETRY_FIRST;
    loop {
        match store.list(&prefix).await {
            Ok((items, revision)) => {
                let Some(m) = mirror.upgrade() else { return };
                m.update(|st| {
                    st.records = items.into_iter().collect();
                    st.revision = st.revision.max(revision);
                    st.synced = true;
                });
                drop(m);
                if let Ok(mut w) = store.watch(&prefix, revision).await {
                    delay = RETRY_FIRST;
                    while let Some(Ok(batch)) = w.recv().await {
                        let Some(m) = mirror.upgrade() else { return };
                        m.update(|st| apply(st, batch));
                    }
                }
                let Some(m) = mirror.upgrade() else { return };
                m.update(|st| st.synced = false);
            }
            Err(e) => {
                tracing::debug!(%prefix, error = %e, "cannot list; keeping the last copy");
                if mirror.strong_count() == 0 {
                    return;
                }
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(RETRY_MAX);
    }
}

fn apply(st: &mut State, batch: Vec<Change>) {
    for c in batch {
        st.revision = st.revision.max(c.revision());
        match c {
            Change::Put { key, record } => {
                st.records.insert(key, record);
            }
            Change::Delete { key, .. } => {
                st.records.remove(&key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::{Embedded, Expect, Scope};

    async fn until(m: &Mirror, what: &str, f: impl Fn(&BTreeMap<String, Record>) -> bool) {
        let mut rx = m.subscribe();
        tokio::time::timeout(Duration::from_secs(5), async {
            while !m.with(&f) {
                rx.changed().await.unwrap();
            }
        })
        .await
        .unwrap_or_else(|_| panic!("mirror never showed {what}"));
    }

    #[tokio::test]
    async fn follows_puts_and_deletes_under_its_prefix_only() {
        let store: Arc<dyn Store> = Arc::new(Embedded::in_memory());
        store
            .put("a/1", b"x".to_vec(), Scope::Persistent, Expect::Any)
            .await
            .unwrap();
        let m = Mirror::start(store.clone(), "a/");
        until(&m, "the first record", |r| r.contains_key("a/1")).await;
        assert!(m.synced());
        store
            .put("a/2", b"y".to_vec(), Scope::Session, Expect::Absent)
            .await
            .unwrap();
        store
            .put("b/1", b"z".to_vec(), Scope::Persistent, Expect::Any)
            .await
            .unwrap();
        store.delete("a/1", Expect::Any).await.unwrap();
        until(&m, "a/2 alone", |r| {
            r.keys().map(String::as_str).collect::<Vec<_>>() == ["a/2"]
        })
        .await;
        assert_eq!(m.get("a/2").unwrap().value, b"y");
    }

    #[tokio::test]
    async fn compare_and_set_refuses_a_stale_revision() {
        let s = Embedded::in_memory();
        let r1 = s
            .put("k", b"1".to_vec(), Scope::Persistent, Expect::Absent)
            .await
            .unwrap();
        assert!(matches!(
            s.put("k", b"x".to_vec(), Scope::Persistent, Expect::Absent)
                .await,
            Err(crate::StoreError::Conflict {
                revision: Some(r),
                ..
            }) if r == r1
        ));
        let r2 = s
            .put("k", b"2".to_vec(), Scope::Persistent, Expect::Revision(r1))
            .await
            .unwrap();
        assert!(r2 > r1);
        assert!(
            s.put("k", b"3".to_vec(), Scope::Persistent, Expect::Revision(r1))
                .await
                .is_err()
        );
        assert!(s.delete("k", Expect::Revision(r1)).await.is_err());
        assert!(s.delete("k", Expect::Revision(r2)).await.unwrap());
        assert!(!s.delete("k", Expect::Any).await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn a_fenced_write_needs_the_current_term() {
        let s = Embedded::in_memory();
        let ttl = Duration::from_secs(3);
        let a = s.acquire("leader", "n1", ttl).await.unwrap();
        s.put_fenced("d", b"1".to_vec(), "leader", "n1", a.term)
            .await
            .unwrap();
        tokio::time::advance(ttl).await;
        let b = s.acquire("leader", "n2", ttl).await.unwrap();
        assert!(matches!(
            s.put_fenced("d", b"stale".to_vec(), "leader", "n1", a.term)
                .await,
            Err(crate::StoreError::Lost { term, .. }) if term == b.term
        ));
        s.put_fenced("d", b"2".to_vec(), "leader", "n2", b.term)
            .await
            .unwrap();
        assert_eq!(s.read("d").await.unwrap().unwrap().value, b"2");
    }
}
