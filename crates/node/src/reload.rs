//! Reloading the topology file while running (SIGHUP, `tandem reload`, `POST /v1/reload`).
//!
//! A reload is asked through one node: it reads its file, says what changed (added, removed
//! and changed items by section) and what applies now — scale set definitions (a changed
//! template rolls through as an upgrade) — and what needs a restart: everything else. Then it
//! records the reload as intent with the new file's hash; every node reads its own file again
//! and applies it when the hash matches, or says it runs another file.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use event::{Event, Source};

/// The file and the text this node runs.
#[derive(Clone, Debug)]
pub(crate) struct Reloader {
    file: PathBuf,
    running: Arc<Mutex<Running>>,
}

#[derive(Debug)]
struct Running {
    /// The file this process started with: what is in effect outside scale sets.
    started: String,
    /// The file last applied (scale sets are as it says).
    text: String,
    hash: String,
}

impl Reloader {
    pub(crate) fn new(config: &crate::Config, hash: String) -> Self {
        Reloader {
            file: config.file.clone(),
            running: Arc::new(Mutex::new(Running {
                started: config.text.clone(),
                text: config.text.clone(),
                hash,
            })),
        }
    }

    fn running(&self) -> MutexGuard<'_, Running> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The API's hook: reads the file and plans the reload, applying nothing.
    pub(crate) fn hook(&self) -> api::Reload {
        let me = self.clone();
        api::Reload(Arc::new(move || me.plan()))
    }

    fn read(&self) -> Result<(String, model::Topology), api::ReloadRefused> {
        let text = std::fs::read_to_string(&self.file).map_err(|e| api::ReloadRefused {
            message: format!("cannot read {}: {e}", self.file.display()),
            diagnostics: None,
        })?;
        let source = model::Source::new(self.file.display().to_string(), text.clone());
        let checked = model::check(source).map_err(|d| api::ReloadRefused {
            message: format!(
                "{} has {}; keeping the running topology",
                self.file.display(),
                model::diag::plural(d.items.len(), "problem")
            ),
            diagnostics: Some(d.render()),
        })?;
        for d in &checked.warnings.items {
            tracing::warn!(code = d.code.as_str(), at = %checked.warnings.location(d), help = %d.help, "{}", d.message);
        }
        Ok((text, checked.topology))
    }

    fn plan(&self) -> Result<api::ReloadPlan, api::ReloadRefused> {
        let (text, _) = self.read()?;
        let hash = cluster::topology_hash(text.as_bytes());
        let applies_now = |c: &model::diff::Change| {
            c.section == "scale_set" && matches!(c.kind, model::diff::ChangeKind::Changed(_))
        };
        // Scale sets against the file last applied; the rest against the file started with,
        // which is still in effect however many reloads have passed.
        let (now, restart) = {
            let r = self.running();
            let now: Vec<_> = model::diff::diff(&r.text, &text)
                .into_iter()
                .filter(applies_now)
                .collect();
            let restart: Vec<_> = model::diff::diff(&r.started, &text)
                .into_iter()
                .filter(|c| !applies_now(c))
                .collect();
            (now, restart)
        };
        let response = api::types::ReloadResponse {
            unchanged: now.is_empty() && restart.is_empty(),
            applied: now
                .iter()
                .map(|c| format!("{c}: applied (a changed template rolls through as an upgrade)"))
                .collect(),
            needs_restart: restart
                .iter()
                .map(|c| format!("{c}: needs a restart"))
                .collect(),
        };
        Ok(api::ReloadPlan { hash, response })
    }

    /// Applies a reload asked through node `by` for the file of `hash`: this node's own file
    /// must be that one.
    pub(crate) async fn apply(&self, api: &api::Api, hash: &str, by: &str) {
        let (text, topology) = match self.read() {
            Ok(t) => t,
            Err(e) => {
                api.events.record(Event::new(
                    Source::Node,
                    api.node
                        .as_ref()
                        .map_or("local".to_string(), |n| n.name().to_string()),
                    "reload-failed",
                    format!(
                        "{}{}",
                        e.message,
                        e.diagnostics.map(|d| format!("\n{d}")).unwrap_or_default()
                    ),
                ));
                return;
            }
        };
        let mine = cluster::topology_hash(text.as_bytes());
        if mine == self.running().hash {
            return; // already running this file
        }
        let subject = api
            .node
            .as_ref()
            .map_or("local".to_string(), |n| n.name().to_string());
        if mine != hash {
            api.events.record(Event::new(
                Source::Node,
                subject,
                "topology-mismatch",
                format!(
                    "a reload through {by} asks for topology {} but this node's file {} is {}: copy the same file to every node, then reload again",
                    &hash[..12.min(hash.len())],
                    self.file.display(),
                    &mine[..12]
                ),
            ));
            return;
        }
        let mut applied = Vec::new();
        for set in &api.scale_sets {
            if let Some(config) = topology.scale_set(&set.name) {
                set.reload(config.clone());
                applied.push(set.name.clone());
            }
        }
        {
            let mut r = self.running();
            r.text = text;
            r.hash = mine.clone();
        }
        if let Some(n) = &api.node
            && let Err(e) = n.update_topology(&mine).await
        {
            tracing::warn!(error = %e, "cannot record the new topology's hash");
        }
        tracing::info!(file = %self.file.display(), scale_sets = ?applied, "reloaded");
        api.events.record(Event::new(
            Source::Node,
            subject,
            "reloaded",
            format!(
                "reloaded {} (topology {}); scale sets applied: {}",
                self.file.display(),
                &mine[..12],
                if applied.is_empty() {
                    "none".into()
                } else {
                    applied.join(", ")
                }
            ),
        ));
    }
}
