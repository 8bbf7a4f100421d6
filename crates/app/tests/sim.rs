//! The app's decisions ([`app::App`]) simulated on virtual time against a world of sites that
//! fail and return, a database whose primary moves when told (and sometimes by itself), members
//! that fall behind and catch up, scale sets whose instances come Online after a while, and an
//! operator who fails over, fails back, pins and unpins at random. Over many seeds, after every
//! 500 ms tick:
//!
//! - DNS answers the active site only, and every move takes a higher term;
//! - DNS never moves to a site whose database member is not the primary;
//! - a move starts only towards a healthy site;
//! - an automatic failback starts only when the preferred site has been healthy for the hold
//!   and its member has caught up;
//! - a pinned app never starts a move by itself;
//! - a warm or cold standby is scaled up before DNS moves to it;
//! - a cold standby (no running member; its primary lost with its site) is restored only when
//!   no primary is seen, warmed up only while one runs, never at the preferred site, and made
//!   cold again once the app has left it (or a move to it failed);
//! - a promotion the driver reports failed ends its move at once, a report about an earlier
//!   move changes nothing, and after a failed move the app waits before moving by itself;
//! - once faults stop (every site healthy, members caught up, unpinned), the app ends at its
//!   preferred site with its primary there and no move under way (and, cold, every other
//!   site's member cold).

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use app::{Action, App, Command, Config, Observed, Standby};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::time::{Duration, Instant};

const TICK: Duration = Duration::from_millis(500);
const SEEDS: u64 = 400;
const TICKS: usize = 1200;
const QUIET: usize = 400;

struct World {
    sites: Vec<String>,
    healthy: BTreeMap<String, bool>,
    healthy_since: BTreeMap<String, Instant>,
    primary: String,
    caught_up: BTreeMap<String, bool>,
    /// A promotion under way: site, when it happens, whether it is planned (or a restore),
    /// its plan.
    promoting: Option<(String, Instant, Kind, u64)>,
    /// Cold standby: the sites whose member does not run (it runs only as the primary).
    cold: std::collections::BTreeSet<String>,
    cold_world: bool,
    capacity: BTreeMap<String, u32>,
    online: BTreeMap<String, u32>,
    min: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Failover,
    Switchover,
    Restore,
}

impl World {
    /// With a cold standby, a primary whose site is down is gone (no standby took over).
    fn primary_seen(&self) -> Option<String> {
        (!self.cold_world || self.healthy[&self.primary]).then(|| self.primary.clone())
    }

    fn observed(&self) -> Observed {
        let mut caught_up = self.caught_up.clone();
        for s in &self.cold {
            if *s != self.primary {
                caught_up.insert(s.clone(), false);
            }
        }
        Observed {
            healthy: self.healthy.clone(),
            reachable: self.healthy.clone(),
            primary: self.primary_seen(),
            caught_up,
            online: self.online.clone(),
            capacity: self.capacity.clone(),
        }
    }
}

/// How often a cold standby was restored and warmed up in one run.
#[derive(Default)]
struct Seen {
    restores: u32,
    warm_ups: u32,
}

fn run(seed: u64) -> Seen {
    let mut count = Seen::default();
    let mut rng = StdRng::seed_from_u64(seed);
    let three = rng.random_bool(0.3);
    let mut sites = vec!["edge".to_string(), "region".to_string()];
    if three {
        sites.push("far".into());
    }
    let database = rng.random_bool(0.8);
    let standby = match rng.random_range(0..3) {
        0 => Standby::Hot,
        1 => Standby::Warm,
        _ if database => Standby::Cold,
        _ => Standby::Warm,
    };
    let cold_world = standby == Standby::Cold;
    let cfg = Config {
        sites: sites.clone(),
        database,
        standby,
        automatic_failback: rng.random_bool(0.8),
        follow_data: rng.random_bool(0.8),
        failback_hold: Duration::from_secs(rng.random_range(1..=30)),
        confirm: Duration::from_secs(rng.random_range(0..=5)),
        step_timeout: Duration::from_secs(rng.random_range(5..=30)),
        restore_timeout: Duration::from_secs(rng.random_range(10..=60)),
    };
    let start = Instant::now();
    let full = 4;
    let min = match standby {
        Standby::Hot => full,
        Standby::Warm => 1,
        Standby::Cold => 0,
    };
    let mut w = World {
        sites: sites.clone(),
        healthy: sites.iter().map(|s| (s.clone(), true)).collect(),
        healthy_since: sites.iter().map(|s| (s.clone(), start)).collect(),
        primary: "edge".into(),
        caught_up: sites.iter().map(|s| (s.clone(), true)).collect(),
        promoting: None,
        cold: if cold_world {
            sites.iter().skip(1).cloned().collect()
        } else {
            Default::default()
        },
        cold_world,
        capacity: sites
            .iter()
            .map(|s| (s.clone(), if s == "edge" { full } else { min }))
            .collect(),
        online: BTreeMap::new(),
        min,
    };
    let mut app = App::new(cfg.clone(), "edge".into(), 0);
    let mut dns = "edge".to_string();
    let mut term = 0;
    let mut pinned = false;
    let mut failed_at: Option<Instant> = None;
    let ctx = |t: usize| format!("seed {seed} tick {t} cfg {cfg:?}");

    for t in 0..TICKS {
        let now = start + TICK * t as u32;
        let faults = t < TICKS - QUIET;
        // The world moves.
        for s in &w.sites {
            let h = w.healthy[s];
            let flip = faults && rng.random_bool(if h { 0.01 } else { 0.05 });
            let h = if flip { !h } else { h || !faults };
            if h && !w.healthy[s] {
                w.healthy_since.insert(s.clone(), now);
                // A member back from an outage is behind.
                if database && *s != w.primary {
                    w.caught_up.insert(s.clone(), false);
                }
            }
            w.healthy.insert(s.clone(), h);
        }
        for s in &w.sites {
            let behind = !w.caught_up[s];
            let catches_up =
                behind && w.healthy[s] && rng.random_bool(if faults { 0.05 } else { 0.2 });
            if *s == w.primary || catches_up {
                w.caught_up.insert(s.clone(), true);
            } else if faults && !behind && rng.random_bool(0.005) {
                w.caught_up.insert(s.clone(), false);
            }
        }
        let mut reported = Vec::new();
        if let Some((site, at, kind, plan)) = w.promoting.clone()
            && now >= at
        {
            // A planned switchover waits for the member to catch up (the database tier's
            // rule); a failover happens if the site is up (sometimes it fails); a restore
            // only while no primary is seen (the lease must have lapsed).
            let seen_before = w.observed();
            let ok = w.healthy[&site]
                && match kind {
                    Kind::Switchover => seen_before.caught_up[&site],
                    Kind::Failover => !w.cold.contains(&site) || site == w.primary,
                    Kind::Restore => w.primary_seen().is_none(),
                }
                && (!faults || rng.random_bool(0.9));
            if ok {
                if kind == Kind::Restore {
                    // The old primary's member comes back behind, and rejoins.
                    let old = w.primary.clone();
                    w.caught_up.insert(old, false);
                }
                w.primary = site;
            } else if rng.random_bool(0.5) {
                // The driver's switchover (or restore) was refused: it says so.
                let step = if kind == Kind::Restore {
                    app::Step::Restore
                } else {
                    app::Step::Promote
                };
                reported = app.action_failed(plan, step, "refused".into(), now);
                if let Some(p) = app.plan() {
                    assert_ne!(
                        p.id,
                        plan,
                        "a failed promotion left its move on: {}",
                        ctx(t)
                    );
                }
            }
            w.promoting = None;
        }
        // Sometimes the database fails over by itself, to a healthy caught-up member that is
        // not cold.
        if database && faults && w.promoting.is_none() && rng.random_bool(0.003) {
            let others: Vec<String> = w
                .sites
                .iter()
                .filter(|s| {
                    **s != w.primary && w.healthy[*s] && w.caught_up[*s] && !w.cold.contains(*s)
                })
                .cloned()
                .collect();
            if !others.is_empty() {
                w.primary = others[rng.random_range(0..others.len())].clone();
            }
        }
        for s in &w.sites {
            let want = if w.healthy[s] { w.capacity[s] } else { 0 };
            let have = w.online.get(s).copied().unwrap_or(0);
            let next = if have < want && rng.random_bool(0.3) {
                have + 1
            } else {
                have.min(want)
            };
            w.online.insert(s.clone(), next);
        }
        // The operator, now and then.
        let seen = w.observed();
        if faults && rng.random_bool(0.01) {
            let site = w.sites[rng.random_range(0..w.sites.len())].clone();
            let cmd = match rng.random_range(0..4) {
                0 => Command::Failover { to: site },
                1 => Command::Failback,
                2 => Command::Pin { site },
                _ => Command::Unpin,
            };
            let pin = matches!(cmd, Command::Pin { .. });
            let unpin = cmd == Command::Unpin;
            if app.command(cmd, &seen, now).is_ok() {
                pinned = (pinned || pin) && !unpin;
            }
        }
        if !faults && pinned {
            app.command(Command::Unpin, &seen, now).unwrap();
            pinned = false;
        }
        assert_eq!(app.pinned(), pinned, "{}", ctx(t));

        // A late report about an earlier move changes nothing.
        if let Some(p) = app.plan()
            && p.id > 1
            && rng.random_bool(0.05)
        {
            let id = p.id;
            let late = app.action_failed(id - 1, app::Step::Promote, "late".into(), now);
            assert!(late.is_empty(), "a stale report ended a move: {}", ctx(t));
            assert_eq!(app.plan().map(|p| p.id), Some(id), "{}", ctx(t));
        }

        let mut actions = app.step(&seen, now);
        reported.append(&mut actions);
        let actions = reported;
        for a in &actions {
            match a {
                Action::MoveStarted { to, reason, .. } => {
                    assert!(seen.healthy[to], "move to an unhealthy site: {}", ctx(t));
                    if let Some(f) = failed_at {
                        assert!(
                            now >= f + app::RETRY_FIRST,
                            "moved by itself {:?} after a failed move: {}",
                            now - f,
                            ctx(t)
                        );
                    }
                    assert!(!pinned, "a pinned app moved by itself: {}", ctx(t));
                    assert!(
                        cfg.follow_data || *reason != app::Reason::DataMoved,
                        "followed its data with follow = \"none\": {}",
                        ctx(t)
                    );
                    if *reason == app::Reason::Failback {
                        let home = &w.sites[0];
                        let held = now.saturating_duration_since(w.healthy_since[home]);
                        assert!(
                            held >= cfg.failback_hold,
                            "failback before the hold: {}",
                            ctx(t)
                        );
                        assert!(
                            !database || w.caught_up[home],
                            "failback before the data caught up: {}",
                            ctx(t)
                        );
                    }
                }
                Action::Event { kind, .. } => match *kind {
                    "app-move-failed" => failed_at = Some(now),
                    "app-move-end" => failed_at = None,
                    _ => {}
                },
                Action::Promote {
                    site,
                    planned,
                    plan,
                    ..
                } => {
                    let delay = Duration::from_millis(rng.random_range(200..5000));
                    let kind = if *planned {
                        Kind::Switchover
                    } else {
                        Kind::Failover
                    };
                    w.promoting = Some((site.clone(), now + delay, kind, *plan));
                }
                Action::Restore { site, plan, .. } => {
                    count.restores += 1;
                    assert!(cold_world, "a restore without a cold standby: {}", ctx(t));
                    assert!(
                        seen.primary.is_none(),
                        "a restore while a primary runs: {}",
                        ctx(t)
                    );
                    assert_ne!(site, &w.sites[0], "the preferred site restored: {}", ctx(t));
                    let delay = Duration::from_millis(rng.random_range(1000..20000));
                    w.promoting = Some((site.clone(), now + delay, Kind::Restore, *plan));
                }
                Action::WarmUp { site } => {
                    count.warm_ups += 1;
                    assert!(cold_world, "a warm-up without a cold standby: {}", ctx(t));
                    assert!(
                        seen.primary.is_some(),
                        "a warm-up with no primary to clone from: {}",
                        ctx(t)
                    );
                    assert_ne!(
                        site,
                        &w.sites[0],
                        "the preferred site warmed up: {}",
                        ctx(t)
                    );
                    w.cold.remove(site);
                    w.caught_up.insert(site.clone(), false);
                }
                Action::Cool { site } => {
                    assert!(cold_world, "cooled without a cold standby: {}", ctx(t));
                    assert_ne!(site, &w.sites[0], "the preferred site cooled: {}", ctx(t));
                    w.cold.insert(site.clone());
                }
                Action::Scale { site, capacity } => {
                    w.capacity.insert(site.clone(), *capacity);
                }
                Action::ScaleDown { site } => {
                    w.capacity.insert(site.clone(), w.min);
                }
                Action::PointDns { site, term: t2 } => {
                    assert!(*t2 > term, "terms only grow: {t2} after {term}: {}", ctx(t));
                    term = *t2;
                    dns = site.clone();
                    if database {
                        assert_eq!(
                            &seen.primary.clone().unwrap(),
                            site,
                            "DNS moved to a site whose member is not the primary: {}",
                            ctx(t)
                        );
                    }
                    assert!(
                        w.capacity[site] >= full,
                        "DNS moved to a standby not scaled up: {}",
                        ctx(t)
                    );
                }
            }
        }
        assert_eq!(
            app.active(),
            dns,
            "DNS answers the active site only: {}",
            ctx(t)
        );
        assert_eq!(app.term(), term, "{}", ctx(t));
    }
    // Quiet: the app is home, with its data, and at rest.
    if cfg.automatic_failback {
        assert_eq!(
            app.active(),
            "edge",
            "not home after the quiet period: {}",
            ctx(TICKS)
        );
        // With `follow = "none"` the data may stay where the database's own failover put it.
        if database && cfg.follow_data {
            assert_eq!(w.primary, "edge", "{}", ctx(TICKS));
            if cold_world {
                let others: std::collections::BTreeSet<String> =
                    w.sites.iter().skip(1).cloned().collect();
                assert_eq!(w.cold, others, "cold standbys left running: {}", ctx(TICKS));
            }
        }
    }
    assert!(
        app.plan().is_none(),
        "a move still under way: {}",
        ctx(TICKS)
    );
    let waits = app.waiting_for(&w.observed(), start + TICK * TICKS as u32);
    assert_eq!(
        waits.is_none(),
        app.active() == "edge",
        "{waits:?}: {}",
        ctx(TICKS)
    );
    count
}

#[test]
fn the_app_moves_safely_over_many_seeds() {
    let (mut restores, mut warm_ups) = (0, 0);
    for seed in 0..SEEDS {
        let seen = run(seed);
        restores += seen.restores;
        warm_ups += seen.warm_ups;
    }
    // The cold standby's paths were exercised, not only allowed.
    assert!(
        restores > 20 && warm_ups > 20,
        "{restores} restores, {warm_ups} warm-ups"
    );
    eprintln!("{restores} restores, {warm_ups} warm-ups over {SEEDS} seeds");
}
