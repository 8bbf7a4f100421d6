//! The autoscaler and the scale-set controller on virtual time.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use health::Status;
use model::{Amount, AutoscaleRule, Capacity, Metric, Repair, RepairAction, ScaleIn, Threshold};
use proptest::prelude::*;
use scaleset::controller::{MAX_FAILED_REPAIRS, REPAIR_SUSPENSION};
use scaleset::{Action, Autoscaler, Controller, Decision, Phase, Policy, Sample};
use tokio::time::Instant;

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn rule(
    metric: Metric,
    threshold: Threshold,
    window: u64,
    change: i32,
    cooldown: u64,
) -> AutoscaleRule {
    AutoscaleRule {
        metric,
        threshold,
        window: secs(window),
        change,
        cooldown: secs(cooldown),
    }
}

fn cap(min: u32, max: u32, initial: u32) -> Capacity {
    Capacity { min, max, initial }
}

fn cpu(x: f64) -> Sample {
    Sample {
        cpu: x,
        ..Sample::default()
    }
}

/// Feeds one sample a second from `from` for `n` seconds, returning the last time.
fn feed(a: &mut Autoscaler, from: Instant, n: u64, s: Sample) -> Instant {
    for i in 0..n {
        a.observe(from + secs(i), s);
    }
    from + secs(n - 1)
}

#[test]
fn a_rule_fires_only_once_its_window_is_covered() {
    let t0 = Instant::now();
    let mut a = Autoscaler::new(vec![rule(Metric::Cpu, Threshold::Above(70.0), 10, 1, 60)]);
    let t = feed(&mut a, t0, 5, cpu(95.0));
    assert_eq!(a.decide(t, 2, cap(1, 5, 2)), None, "half a window");
    let t = feed(&mut a, t + secs(1), 6, cpu(95.0));
    let Some(Decision::Scale { from, to, reason }) = a.decide(t, 2, cap(1, 5, 2)) else {
        panic!("no scale-out")
    };
    assert_eq!((from, to), (2, 3));
    assert_eq!(reason, "cpu 95.0 above 70 over 10s (rule 1, change +1)");
    // Cooldown: the same breach does nothing for 60 s, then fires again.
    let t = feed(&mut a, t + secs(1), 30, cpu(95.0));
    assert_eq!(a.decide(t, 3, cap(1, 5, 2)), None);
    let t = feed(&mut a, t + secs(1), 31, cpu(95.0));
    assert!(matches!(
        a.decide(t, 3, cap(1, 5, 2)),
        Some(Decision::Scale { to: 4, .. })
    ));
}

#[test]
fn any_scale_out_rule_fires_and_the_largest_change_wins_within_max() {
    let t0 = Instant::now();
    let mut a = Autoscaler::new(vec![
        rule(Metric::Cpu, Threshold::Above(70.0), 5, 1, 60),
        rule(Metric::Connections, Threshold::Above(100.0), 5, 3, 60),
    ]);
    let s = Sample {
        cpu: 80.0,
        connections: 150.0,
        connection_rate: 0.0,
    };
    let t = feed(&mut a, t0, 6, s);
    assert!(matches!(
        a.decide(t, 2, cap(1, 10, 2)),
        Some(Decision::Scale { to: 5, .. })
    ));
    // Clamped to max.
    let mut a = Autoscaler::new(vec![rule(
        Metric::Connections,
        Threshold::Above(100.0),
        5,
        3,
        60,
    )]);
    let t = feed(&mut a, t0, 6, s);
    assert!(matches!(
        a.decide(t, 3, cap(1, 4, 2)),
        Some(Decision::Scale { to: 4, .. })
    ));
    // At max already: nothing.
    assert_eq!(a.decide(t, 4, cap(1, 4, 2)), None);
}

#[test]
fn scale_in_needs_every_scale_in_rule_and_takes_the_smallest_change() {
    let t0 = Instant::now();
    let rules = vec![
        rule(Metric::Cpu, Threshold::Below(20.0), 5, -2, 60),
        rule(Metric::Connections, Threshold::Below(10.0), 5, -1, 60),
    ];
    let mut a = Autoscaler::new(rules.clone());
    let busy = Sample {
        cpu: 5.0,
        connections: 50.0,
        connection_rate: 0.0,
    };
    let t = feed(&mut a, t0, 6, busy);
    assert_eq!(
        a.decide(t, 4, cap(1, 10, 2)),
        None,
        "connections still high"
    );
    let mut a = Autoscaler::new(rules);
    let idle = Sample {
        cpu: 5.0,
        connections: 1.0,
        connection_rate: 0.0,
    };
    let t = feed(&mut a, t0, 6, idle);
    assert!(matches!(
        a.decide(t, 4, cap(1, 10, 2)),
        Some(Decision::Scale { to: 3, .. })
    ));
    // Never below min.
    assert_eq!(a.decide(t + secs(120), 1, cap(1, 10, 2)), None);
}

#[test]
fn the_flap_guard_skips_a_scale_in_that_would_trigger_a_scale_out() {
    let t0 = Instant::now();
    let mut a = Autoscaler::new(vec![
        rule(Metric::Cpu, Threshold::Above(70.0), 5, 1, 60),
        rule(Metric::Cpu, Threshold::Below(50.0), 5, -1, 60),
    ]);
    // 45% on 2 instances is 90% on 1: skip.
    let t = feed(&mut a, t0, 6, cpu(45.0));
    let Some(Decision::Skipped { reason }) = a.decide(t, 2, cap(1, 5, 2)) else {
        panic!("not skipped")
    };
    assert_eq!(
        reason,
        "scale-in 2 -> 1 skipped: projected cpu 90.0 above 70 over 5s (rule 1, change +1)"
    );
    // 30% on 3 is 45% on 2: fine.
    assert!(matches!(
        a.decide(t, 3, cap(1, 5, 2)),
        Some(Decision::Scale { to: 2, .. })
    ));
}

fn policy(min: u32, max: u32, initial: u32) -> Policy {
    Policy {
        name: "web".into(),
        capacity: cap(min, max, initial),
        repair: Repair {
            grace_period: secs(10),
            action: RepairAction::Replace,
        },
        upgrade: model::Upgrade {
            max_batch: Amount::Count(1),
            max_unhealthy: Amount::Count(0),
            pause: secs(5),
        },
        scale_in: ScaleIn::Newest,
        probed: true,
        slots: 100,
    }
}

fn starts(actions: &[Action]) -> Vec<String> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Start { id, .. } => Some(id.clone()),
            _ => None,
        })
        .collect()
}

fn retires(actions: &[Action]) -> Vec<String> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Retire { id } => Some(id.clone()),
            _ => None,
        })
        .collect()
}

/// A controller whose initial instances are all Online.
fn online(p: Policy, t0: Instant) -> Controller {
    let mut c = Controller::new(p, vec![], t0);
    let (actions, _) = c.take();
    for id in starts(&actions) {
        c.health(&id, Status::Online, t0);
    }
    c
}

#[test]
fn starts_initial_instances_on_distinct_slots() {
    let t0 = Instant::now();
    let mut c = Controller::new(policy(1, 5, 3), vec![], t0);
    let (actions, _) = c.take();
    assert_eq!(
        actions,
        [
            Action::Start {
                id: "web-0".into(),
                slot: 0,
                version: 0
            },
            Action::Start {
                id: "web-1".into(),
                slot: 1,
                version: 0
            },
            Action::Start {
                id: "web-2".into(),
                slot: 2,
                version: 0
            },
        ]
    );
}

#[test]
fn an_exited_instance_is_replaced_and_its_slot_reused_once_gone() {
    let t0 = Instant::now();
    let mut c = online(policy(1, 5, 2), t0);
    c.exited("web-0", "signal: 9 (SIGKILL)", t0 + secs(1));
    let (actions, notes) = c.take();
    assert_eq!(retires(&actions), ["web-0"]);
    assert_eq!(starts(&actions), ["web-2"], "replacement starts at once");
    assert_eq!(notes[0].message, "replacing: exited: signal: 9 (SIGKILL)");
    // web-0 still holds slot 0 until gone; web-2 took slot 2.
    assert_eq!(c.instance("web-2").unwrap().slot, 2);
    c.gone("web-0", t0 + secs(2));
    assert!(c.instance("web-0").is_none());
    assert!(c.take().0.is_empty());
}

#[test]
fn restart_action_restarts_in_place() {
    let t0 = Instant::now();
    let mut p = policy(1, 5, 1);
    p.repair.action = RepairAction::Restart;
    let mut c = online(p, t0);
    c.exited("web-0", "exit status: 1", t0 + secs(1));
    let (actions, _) = c.take();
    assert_eq!(
        actions,
        [Action::Restart {
            id: "web-0".into(),
            version: 0,
            after: Duration::ZERO
        }]
    );
    assert_eq!(c.instance("web-0").unwrap().restarts, 1);
}

#[test]
fn an_instance_degraded_for_the_grace_period_is_replaced_not_before() {
    let t0 = Instant::now();
    let mut c = online(policy(1, 5, 1), t0);
    c.health("web-0", Status::Degraded, t0 + secs(20));
    c.tick(t0 + secs(29), None);
    assert!(retires(&c.take().0).is_empty(), "within grace");
    c.tick(t0 + secs(30), None);
    let (actions, notes) = c.take();
    assert_eq!(retires(&actions), ["web-0"]);
    assert_eq!(starts(&actions), ["web-1"]);
    assert_eq!(
        notes[0].message,
        "replacing: Degraded for 10s (grace period 10s)"
    );
    // Recovering in time cancels the repair.
    let mut c = online(policy(1, 5, 1), t0);
    c.health("web-0", Status::Degraded, t0 + secs(20));
    c.health("web-0", Status::Online, t0 + secs(25));
    c.tick(t0 + secs(40), None);
    assert!(c.take().0.is_empty());
}

#[test]
fn repair_backs_off_then_suspends_when_replacements_keep_failing() {
    let t0 = Instant::now();
    let mut c = Controller::new(policy(1, 5, 1), vec![], t0);
    c.take();
    let mut now = t0;
    let mut current = "web-0".to_string();
    let mut gaps = Vec::new();
    for _ in 0..MAX_FAILED_REPAIRS {
        now += secs(1);
        c.exited(&current, "exit status: 127", now);
        let (actions, _) = c.take();
        if let Some(r) = retires(&actions).first() {
            c.gone(r, now);
        }
        // Tick until the replacement starts (backoff) or give up after 60 s.
        let started = now;
        let mut next = starts(&c.take().0);
        while next.is_empty() && now < started + secs(60) {
            now += Duration::from_millis(100);
            c.tick(now, None);
            next = starts(&c.take().0);
        }
        gaps.push(now - started);
        if c.repair_suspended() {
            break;
        }
        current = next.pop().expect("a replacement");
    }
    assert!(c.repair_suspended());
    // Each wait is longer than the one before.
    assert!(gaps.windows(2).take(3).all(|w| w[1] > w[0]), "{gaps:?}");
    // Suspended: nothing starts until the suspension ends.
    c.tick(now + secs(60), None);
    assert!(starts(&c.take().0).is_empty());
    c.tick(now + REPAIR_SUSPENSION + secs(1), None);
    let (actions, notes) = c.take();
    assert_eq!(starts(&actions).len(), 1);
    assert!(notes.iter().any(|n| n.message == "repair resumed"));
}

#[test]
fn manual_scaling_respects_capacity_and_scale_in_policy() {
    let t0 = Instant::now();
    let mut c = online(policy(1, 4, 3), t0);
    assert_eq!(
        c.scale_to(5, t0).unwrap_err(),
        "5 is outside the capacity of web (1..=4)"
    );
    c.scale_to(1, t0).unwrap();
    assert_eq!(retires(&c.take().0), ["web-2", "web-1"], "newest first");
    let mut p = policy(1, 4, 3);
    p.scale_in = ScaleIn::Oldest;
    let mut c = online(p, t0);
    c.scale_to(2, t0).unwrap();
    assert_eq!(retires(&c.take().0), ["web-0"]);
}

#[test]
fn autoscale_drives_the_desired_capacity() {
    let t0 = Instant::now();
    let rules = vec![
        rule(Metric::Cpu, Threshold::Above(70.0), 3, 1, 5),
        rule(Metric::Cpu, Threshold::Below(20.0), 3, -1, 5),
    ];
    let mut p = policy(1, 3, 1);
    p.probed = false; // no repairs in the way
    let mut c = Controller::new(p, rules, t0);
    c.take();
    let mut now = t0;
    for _ in 0..40 {
        now += secs(1);
        c.tick(now, Some(cpu(95.0)));
    }
    assert_eq!(c.desired(), 3, "out to max, never past it");
    let (actions, notes) = c.take();
    assert_eq!(starts(&actions).len(), 2);
    assert!(
        notes[0]
            .message
            .starts_with("autoscale out 1 -> 2: cpu 95.0 above 70")
    );
    for _ in 0..40 {
        now += secs(1);
        c.tick(now, Some(cpu(2.0)));
    }
    assert_eq!(c.desired(), 1, "in to min, never past it");
}

/// Drives a rolling upgrade; new instances come Online unless `bad`.
fn roll(c: &mut Controller, t0: Instant, bad: bool) -> (Vec<String>, usize) {
    let mut now = t0;
    let mut notes = Vec::new();
    let mut min_online = usize::MAX;
    let mut starting: Vec<String> = Vec::new();
    c.set_template(1, now);
    for _ in 0..600 {
        let (actions, n) = c.take();
        notes.extend(n.into_iter().map(|n| n.message));
        for id in retires(&actions) {
            c.gone(&id, now);
        }
        // New instances come Online one step after they start.
        for id in starting.drain(..) {
            if !bad {
                c.health(&id, Status::Online, now);
            }
        }
        starting = starts(&actions);
        let up = c
            .instances()
            .iter()
            .filter(|i| i.phase == Phase::Running && i.health == Status::Online)
            .count();
        min_online = min_online.min(up);
        if !c.upgrading() {
            break;
        }
        now += Duration::from_millis(500);
        c.tick(now, None);
    }
    (notes, min_online)
}

#[test]
fn a_template_change_rolls_through_in_batches_keeping_the_floor() {
    let t0 = Instant::now();
    let mut p = policy(1, 10, 5);
    p.upgrade.max_batch = Amount::Percent(40); // 2 of 5
    let mut c = online(p, t0);
    let (notes, min_online) = roll(&mut c, t0, false);
    assert!(!c.upgrading());
    assert!(c.instances().iter().all(|i| i.version == 1), "{notes:?}");
    assert_eq!(c.instances().len(), 5);
    assert_eq!(min_online, 3, "never fewer than 5 - max_batch serving");
    assert_eq!(
        notes.first().unwrap(),
        "template 0 -> 1: 5 instances to upgrade in batches of 2"
    );
    assert_eq!(
        notes.last().unwrap(),
        "upgrade to template 1 complete: 5 instances upgraded, 0 failed"
    );
}

#[test]
fn a_failing_template_aborts_the_upgrade_and_keeps_the_rest() {
    let t0 = Instant::now();
    let mut p = policy(1, 10, 4);
    p.upgrade.max_batch = Amount::Count(1);
    p.upgrade.max_unhealthy = Amount::Count(0);
    let mut c = online(p, t0);
    let (notes, _) = roll(&mut c, t0, true);
    assert!(!c.upgrading());
    assert!(
        notes
            .iter()
            .any(|n| n.starts_with("upgrade to template 1 aborted: 1 of 1")),
        "{notes:?}"
    );
    let old = c.instances().iter().filter(|i| i.version == 0).count();
    assert!(old >= 3, "the rest keep the old template");
    assert_eq!(c.version(), 0, "new instances use the last good template");
}

#[derive(Clone, Debug)]
enum Op {
    Tick(u8),
    Exit(u8),
    Health(u8, bool),
    Scale(u8),
    Template,
    Gone,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u8..100).prop_map(Op::Tick),
        any::<u8>().prop_map(Op::Exit),
        (any::<u8>(), any::<bool>()).prop_map(|(i, b)| Op::Health(i, b)),
        (0u8..8).prop_map(Op::Scale),
        Just(Op::Template),
        Just(Op::Gone),
    ]
}

proptest! {
    /// Whatever happens, capacity stays within min..=max, the pool never holds more than
    /// desired, and no two instances share ports.
    #[test]
    fn invariants_hold_under_any_sequence(ops in proptest::collection::vec(op(), 1..200)) {
        let t0 = Instant::now();
        let rules = vec![
            rule(Metric::Cpu, Threshold::Above(70.0), 2, 2, 3),
            rule(Metric::Cpu, Threshold::Below(20.0), 2, -1, 3),
        ];
        let mut c = Controller::new(policy(1, 6, 2), rules, t0);
        let mut now = t0;
        let mut retiring: Vec<String> = Vec::new();
        let mut version = 0;
        for op in ops {
            now += Duration::from_millis(700);
            let ids: Vec<String> = c.instances().iter().map(|i| i.id.clone()).collect();
            let pick = |i: u8| ids.get(i as usize % ids.len().max(1)).cloned();
            match op {
                Op::Tick(x) => c.tick(now, Some(cpu(f64::from(x)))),
                Op::Exit(i) => if let Some(id) = pick(i) { c.exited(&id, "x", now) },
                Op::Health(i, up) => if let Some(id) = pick(i) {
                    c.health(&id, if up { Status::Online } else { Status::Degraded }, now)
                },
                Op::Scale(n) => { let _ = c.scale_to(u32::from(n), now); }
                Op::Template => { version += 1; c.set_template(version, now) }
                Op::Gone => for id in retiring.drain(..) { c.gone(&id, now) },
            }
            retiring.extend(retires(&c.take().0));
            prop_assert!((1..=6).contains(&c.desired()));
            let live = c.instances().iter().filter(|i| i.phase == Phase::Running).count();
            prop_assert!(live as u32 <= c.desired(), "live {live} desired {}", c.desired());
            let mut slots: Vec<u32> = c.instances().iter().map(|i| i.slot).collect();
            slots.sort();
            slots.dedup();
            prop_assert_eq!(slots.len(), c.instances().len());
        }
    }
}
