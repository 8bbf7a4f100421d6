//! `GET /v1/events/stream`: the event log live, as Server-Sent Events.
//!
//! Each event is one SSE message: `id: EPOCH-SEQ` (the log's [`EventLog::epoch`] and the
//! event's sequence number, see [`crate::Numbered`]) and `data: JSON`, the JSON being exactly
//! an item of `GET /v1/events`. A comment line (`: keep-alive`) goes out every
//! [`KEEP_ALIVE`] while nothing happens, so proxies and clients see the stream is alive.
//!
//! Without `Last-Event-ID` the stream starts with the next event recorded (read
//! `/v1/events` for what came before). With `Last-Event-ID: EPOCH-SEQ` of this process's log
//! it first replays the events after `SEQ` still in the log (the last
//! [`crate::EVENT_LOG_SIZE`]), so a client that reconnects misses nothing the log still
//! holds; an id of another run (the process restarted) or one that does not parse is
//! ignored. A client too slow to keep up is caught up from the log in the same way. The
//! stream ends when the API shuts down.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures_util::Stream;
use tokio::sync::broadcast;

use crate::{Api, EventLog, Numbered};

/// How often a keep-alive comment is sent on a quiet stream.
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// The `Last-Event-ID` of a request, as a sequence number of `log`'s run.
fn resume_after(headers: &HeaderMap, log: &EventLog) -> Option<u64> {
    let id = headers.get("last-event-id")?.to_str().ok()?;
    let (epoch, seq) = id.trim().split_once('-')?;
    (epoch.parse::<u64>().ok()? == log.epoch())
        .then(|| seq.parse().ok())
        .flatten()
}

/// What one stream has sent and what it waits on.
struct Tail {
    log: EventLog,
    rx: broadcast::Receiver<Numbered>,
    /// Events to send, in sequence order.
    pending: VecDeque<Numbered>,
    /// The sequence number of the last event sent (or skipped as already known).
    last: u64,
}

impl Tail {
    /// The next event to send; `None` when the API shuts down.
    async fn next(&mut self) -> Option<Numbered> {
        loop {
            while let Some(n) = self.pending.pop_front() {
                if n.seq > self.last {
                    self.last = n.seq;
                    return Some(n);
                }
            }
            tokio::select! {
                () = self.log.closed() => return None,
                r = self.rx.recv() => match r {
                    Ok(n) => self.pending.push_back(n),
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        self.pending.extend(self.log.since(self.last));
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                },
            }
        }
    }
}

fn message(log: &EventLog, n: &Numbered) -> SseEvent {
    let id = format!("{}-{}", log.epoch(), n.seq);
    match serde_json::to_string(&n.event) {
        Ok(json) => SseEvent::default().id(id).data(json),
        // An Event always serialises; should it not, the stream says so instead of ending.
        Err(e) => SseEvent::default()
            .id(id)
            .comment(format!("unserialisable event: {e}")),
    }
}

/// The handler of `GET /v1/events/stream`.
pub(crate) async fn events_stream(
    State(api): State<Api>,
    headers: HeaderMap,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let log = api.events.clone();
    let (now, rx) = log.subscribe_numbered();
    let (last, pending) = match resume_after(&headers, &log) {
        // An id from the future (a client's mistake) resumes from now, not in silence.
        Some(seq) if seq <= now => (seq, log.since(seq).into()),
        Some(_) => (now, VecDeque::new()),
        None => (now, VecDeque::new()),
    };
    let tail = Tail {
        log,
        rx,
        pending,
        last,
    };
    let stream = futures_util::stream::unfold(tail, |mut tail| async move {
        let n = tail.next().await?;
        let msg = message(&tail.log, &n);
        Some((Ok(msg), tail))
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(KEEP_ALIVE).text("keep-alive"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use event::{Event, Source};

    #[tokio::test]
    async fn resumes_after_the_last_id_of_this_run_only() {
        let log = EventLog::new(None);
        for i in 0..3 {
            log.record(Event::new(Source::Drill, "edge", "x", format!("{i}")));
        }
        let mut h = HeaderMap::new();
        h.insert(
            "last-event-id",
            format!("{}-1", log.epoch()).parse().unwrap(),
        );
        assert_eq!(resume_after(&h, &log), Some(1));
        let seqs: Vec<u64> = log.since(1).iter().map(|n| n.seq).collect();
        assert_eq!(seqs, [2, 3]);
        h.insert(
            "last-event-id",
            format!("{}-1", log.epoch() + 1).parse().unwrap(),
        );
        assert_eq!(resume_after(&h, &log), None, "another run's id");
        h.insert("last-event-id", "nonsense".parse().unwrap());
        assert_eq!(resume_after(&h, &log), None);
    }

    #[tokio::test]
    async fn a_lagging_stream_catches_up_from_the_log_in_order() {
        let log = EventLog::new(None);
        let (now, rx) = log.subscribe_numbered();
        assert_eq!(now, 0);
        let mut tail = Tail {
            log: log.clone(),
            rx,
            pending: VecDeque::new(),
            last: now,
        };
        // More than the channel holds: the receiver lags and reads the rest from the log.
        for i in 0..1100 {
            log.record(Event::new(Source::Drill, "edge", "x", format!("{i}")));
        }
        let mut got = Vec::new();
        while got.len() < 1000 {
            got.push(tail.next().await.unwrap().seq);
        }
        assert!(got.windows(2).all(|w| w[0] < w[1]), "in order, no repeats");
        assert_eq!(got.last(), Some(&1100));
        log.close_streams();
        assert_eq!(tail.next().await, None, "ends on shutdown");
    }
}
