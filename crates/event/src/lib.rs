//! The one event type every part of Tandem records: a health change, an answer change, a
//! backend ejected, an instance replaced, a primary promoted, a drill started, a node gone.
//!
//! An event says when ([`Event::at`]), on which node (cluster mode), which part
//! ([`Source`]), about what (`subject`: a target, profile, load balancer/backend, scale
//! set/instance, database/member, site or node), what happened (`kind`, a short word such as
//! `Degraded` or `ejected`) and why, with the figures behind it (`message`). Decisions taken
//! under a lease carry its fencing `term`.
//!
//! Times serialise as RFC 3339 UTC with milliseconds ([`rfc3339`]) everywhere: API, store,
//! console.

use std::sync::Mutex;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

/// One part's events as a broadcast whose first subscriber gets every event sent since the
/// feed was made: a part that starts work at once (on another runtime worker, maybe before its
/// owner subscribes) loses none of its first events. Later subscribers get the events sent
/// after they subscribe. A subscriber more than `capacity` events behind lags (tokio's
/// `broadcast`: it then skips to the oldest event kept).
#[derive(Debug)]
pub struct Feed {
    sender: broadcast::Sender<Event>,
    first: Mutex<Option<broadcast::Receiver<Event>>>,
}

impl Feed {
    pub fn new(capacity: usize) -> Self {
        let (sender, first) = broadcast::channel(capacity);
        Feed {
            sender,
            first: Mutex::new(Some(first)),
        }
    }

    /// A sender for the part's tasks.
    pub fn sender(&self) -> broadcast::Sender<Event> {
        self.sender.clone()
    }

    /// Sends `e` to every subscriber (none is not an error).
    pub fn send(&self, e: Event) {
        let _ = self.sender.send(e);
    }

    /// The first call: every event since the feed was made; later calls: the events from now.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        let first = self.first.lock().unwrap_or_else(|p| p.into_inner()).take();
        first.unwrap_or_else(|| self.sender.subscribe())
    }
}

/// The part of Tandem an event comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Source {
    /// A probe target changed state.
    Health,
    /// A DNS profile's answer changed.
    Dns,
    /// A load balancer backend changed (ejected, drained, up, down).
    Lb,
    /// A scale set or one of its instances.
    ScaleSet,
    /// A database or one of its members.
    Database,
    /// A drill started or ended.
    Drill,
    /// A node joined, left, lost or found its cluster store.
    Node,
    /// A decision of the cluster (leadership, intent applied).
    Cluster,
    /// An app's move between sites, step by step.
    App,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Health => "health",
            Source::Dns => "dns",
            Source::Lb => "lb",
            Source::ScaleSet => "scale-set",
            Source::Database => "database",
            Source::Drill => "drill",
            Source::Node => "node",
            Source::Cluster => "cluster",
            Source::App => "app",
        }
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Something that happened, with why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    #[serde(with = "time")]
    pub at: SystemTime,
    /// The node that recorded it (cluster mode); `None` in the single-process default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    pub source: Source,
    pub subject: String,
    pub kind: String,
    pub message: String,
    /// The fencing term of the lease the decision was taken under.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub term: Option<u64>,
}

impl Event {
    /// An event now.
    pub fn new(
        source: Source,
        subject: impl Into<String>,
        kind: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Event {
            at: SystemTime::now(),
            node: None,
            source,
            subject: subject.into(),
            kind: kind.into(),
            message: message.into(),
            term: None,
        }
    }

    /// The same event, taken under a lease at `term`.
    pub fn with_term(mut self, term: u64) -> Self {
        self.term = Some(term);
        self
    }

    /// The same event at another time (a change measured elsewhere).
    pub fn at(mut self, at: SystemTime) -> Self {
        self.at = at;
        self
    }
}

/// A time as every API response shows it: RFC 3339 UTC, milliseconds.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// Reads a time written as RFC 3339 (`2024-05-01T12:00:00Z`, `2024-05-01 12:00:00.5Z`; UTC
/// only, as [`rfc3339`] writes it); `None` when it is not one.
pub fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    humantime::parse_rfc3339_weak(s.trim()).ok()
}

/// `#[serde(with = "event::time")]` for times in [`rfc3339`].
pub mod time {
    use std::time::SystemTime;

    pub fn serialize<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_rfc3339_millis(*t))
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        let text: std::borrow::Cow<'de, str> = serde::Deserialize::deserialize(d)?;
        humantime::parse_rfc3339_weak(&text).map_err(serde::de::Error::custom)
    }
}

/// `#[serde(with = "event::opt_time")]` for optional times.
pub mod opt_time {
    use std::time::SystemTime;

    pub fn serialize<S: serde::Serializer>(
        t: &Option<SystemTime>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => super::time::serialize(t, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> Result<Option<SystemTime>, D::Error> {
        let text: Option<std::borrow::Cow<'de, str>> = serde::Deserialize::deserialize(d)?;
        text.map(|t| humantime::parse_rfc3339_weak(&t).map_err(serde::de::Error::custom))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_feeds_first_subscriber_gets_what_was_sent_before_it_and_later_ones_do_not() {
        let feed = Feed::new(8);
        feed.send(Event::new(
            Source::ScaleSet,
            "web/web-1",
            "instance",
            "started",
        ));
        let mut first = feed.subscribe();
        let mut later = feed.subscribe();
        feed.send(Event::new(
            Source::ScaleSet,
            "web/web-2",
            "instance",
            "started",
        ));
        let subjects = |rx: &mut broadcast::Receiver<Event>| {
            std::iter::from_fn(|| rx.try_recv().ok())
                .map(|e| e.subject)
                .collect::<Vec<_>>()
        };
        assert_eq!(subjects(&mut first), ["web/web-1", "web/web-2"]);
        assert_eq!(subjects(&mut later), ["web/web-2"]);
    }

    #[test]
    fn round_trips_through_json_with_millisecond_times() {
        let e =
            Event::new(Source::Database, "orders/edge", "promoted", "promoted edge").with_term(3);
        let json = serde_json::to_string(&e).unwrap();
        assert!(json.contains(r#""source":"database""#), "{json}");
        assert!(
            !json.contains("node"),
            "no node in single-process mode: {json}"
        );
        let back: Event = serde_json::from_str(&json).unwrap();
        assert_eq!(back.term, Some(3));
        let ms = |t: SystemTime| {
            t.duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_millis()
        };
        assert_eq!(ms(back.at), ms(e.at));
        assert_eq!(Source::ScaleSet.as_str(), "scale-set");
    }
}
