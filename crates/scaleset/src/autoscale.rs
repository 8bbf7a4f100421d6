//! The autoscaler: a pure state machine over metric samples and virtual time, with the
//! semantics scale-set users know. Scale out when *any* scale-out rule fires (the largest
//! change wins); scale in only when *all* scale-in rules fire (the smallest change wins);
//! each rule has its own cooldown; a flap guard skips a scale-in whose projected load would at
//! once fire a scale-out rule; the result always stays within `min..=max`.
//!
//! Every metric is a per-instance average (CPU percent of one core, active connections, new
//! connections per second), so removing instances is projected to raise it proportionally.

use std::collections::VecDeque;
use std::time::Duration;

use model::{AutoscaleRule, Capacity, Metric, Threshold};
use tokio::time::Instant;

/// One observation of the set, averaged over its live instances.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Sample {
    /// Percent of one core.
    pub cpu: f64,
    pub connections: f64,
    /// New connections per second.
    pub connection_rate: f64,
}

impl Sample {
    pub fn get(&self, m: Metric) -> f64 {
        match m {
            Metric::Cpu => self.cpu,
            Metric::Connections => self.connections,
            Metric::ConnectionRate => self.connection_rate,
        }
    }
}

/// What the autoscaler concluded.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// Change the capacity from `from` to `to`; `reason` carries the figures.
    Scale { from: u32, to: u32, reason: String },
    /// A scale-in was due but the flap guard stopped it.
    Skipped { reason: String },
}

/// Rules, their recent samples and cooldowns.
#[derive(Debug)]
pub struct Autoscaler {
    rules: Vec<AutoscaleRule>,
    samples: VecDeque<(Instant, Sample)>,
    /// Since when samples cover the windows without a gap.
    since: Option<Instant>,
    /// When each rule last caused a change.
    last: Vec<Option<Instant>>,
}

impl Autoscaler {
    pub fn new(rules: Vec<AutoscaleRule>) -> Self {
        let last = vec![None; rules.len()];
        Autoscaler {
            rules,
            samples: VecDeque::new(),
            since: None,
            last,
        }
    }

    pub fn rules(&self) -> &[AutoscaleRule] {
        &self.rules
    }

    /// Records a sample; samples older than the longest window are dropped.
    pub fn observe(&mut self, now: Instant, sample: Sample) {
        self.since.get_or_insert(now);
        self.samples.push_back((now, sample));
        let keep = self
            .rules
            .iter()
            .map(|r| r.window)
            .max()
            .unwrap_or_default();
        while self
            .samples
            .front()
            .is_some_and(|(t, _)| now.saturating_duration_since(*t) > keep)
        {
            self.samples.pop_front();
        }
    }

    /// Forgets the samples (the instances they measured are gone, e.g. after an outage).
    pub fn reset(&mut self) {
        self.samples.clear();
        self.since = None;
    }

    /// The average of `metric` over the last `window`, once samples cover all of it.
    fn average(&self, now: Instant, window: Duration, metric: Metric) -> Option<f64> {
        if now.saturating_duration_since(self.since?) < window {
            return None;
        }
        let (sum, n) = self
            .samples
            .iter()
            .filter(|(t, _)| now.saturating_duration_since(*t) <= window)
            .fold((0.0, 0u32), |(s, n), (_, x)| (s + x.get(metric), n + 1));
        (n > 0).then(|| sum / f64::from(n))
    }

    fn cooled(&self, i: usize, now: Instant) -> bool {
        self.last[i].is_none_or(|t| now.saturating_duration_since(t) >= self.rules[i].cooldown)
    }

    /// Whether rule `i` fires for this average (scaled by `factor` for a projection).
    fn fires(&self, i: usize, avg: f64) -> bool {
        match self.rules[i].threshold {
            Threshold::Above(t) => avg > t,
            Threshold::Below(t) => avg < t,
        }
    }

    fn describe(&self, i: usize, avg: f64) -> String {
        let r = &self.rules[i];
        let (word, t) = match r.threshold {
            Threshold::Above(t) => ("above", t),
            Threshold::Below(t) => ("below", t),
        };
        format!(
            "{} {avg:.1} {word} {t} over {} (rule {}, change {:+})",
            r.metric,
            model::units::format_duration(r.window),
            i + 1,
            r.change
        )
    }

    /// Decides on the capacity for a set now at `current` instances. A decision that changes
    /// the capacity starts the cooldown of the rules behind it.
    pub fn decide(&mut self, now: Instant, current: u32, cap: Capacity) -> Option<Decision> {
        let averages: Vec<Option<f64>> = self
            .rules
            .iter()
            .map(|r| self.average(now, r.window, r.metric))
            .collect();
        // Scale out: any rule; the largest change.
        let out: Vec<usize> = (0..self.rules.len())
            .filter(|&i| self.rules[i].change > 0 && self.cooled(i, now))
            .filter(|&i| averages[i].is_some_and(|a| self.fires(i, a)))
            .collect();
        if let Some(&i) = out.iter().max_by_key(|&&i| self.rules[i].change) {
            let to = current
                .saturating_add(self.rules[i].change.unsigned_abs())
                .min(cap.max);
            if to > current {
                self.last[i] = Some(now);
                let reason = self.describe(i, averages[i].unwrap_or_default());
                return Some(Decision::Scale {
                    from: current,
                    to,
                    reason,
                });
            }
            return None;
        }
        // Scale in: every scale-in rule must fire; the smallest change.
        let ins: Vec<usize> = (0..self.rules.len())
            .filter(|&i| self.rules[i].change < 0)
            .collect();
        if ins.is_empty()
            || !ins
                .iter()
                .all(|&i| self.cooled(i, now) && averages[i].is_some_and(|a| self.fires(i, a)))
        {
            return None;
        }
        let &i = ins
            .iter()
            .min_by_key(|&&i| self.rules[i].change.unsigned_abs())?;
        let to = current
            .saturating_sub(self.rules[i].change.unsigned_abs())
            .max(cap.min);
        if to >= current {
            return None;
        }
        // Flap guard: the same load on fewer instances must not fire a scale-out rule.
        let factor = f64::from(current) / f64::from(to.max(1));
        for o in (0..self.rules.len()).filter(|&o| self.rules[o].change > 0) {
            let Some(projected) = self
                .average(now, self.rules[o].window, self.rules[o].metric)
                .map(|a| a * factor)
            else {
                continue;
            };
            if self.fires(o, projected) {
                return Some(Decision::Skipped {
                    reason: format!(
                        "scale-in {current} -> {to} skipped: projected {}",
                        self.describe(o, projected)
                    ),
                });
            }
        }
        for &r in &ins {
            self.last[r] = Some(now);
        }
        let reason = ins
            .iter()
            .map(|&r| self.describe(r, averages[r].unwrap_or_default()))
            .collect::<Vec<_>>()
            .join("; ");
        Some(Decision::Scale {
            from: current,
            to,
            reason,
        })
    }
}
