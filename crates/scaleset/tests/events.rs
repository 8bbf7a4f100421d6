//! The set's events reach whoever subscribes first, from the first one on.

use std::sync::Arc;
use std::time::Duration;

/// The initial instances start at once, on a runtime worker, maybe before the node subscribes
/// to the set's events: the first subscriber still gets every `started pid` event (the console
/// once missed one, which a test caught).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_subscriber_gets_the_initial_instances_events() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        r#"[tandem]
state_dir = "{state}"

[[site]]
name = "edge"
role = "edge"

[[scale_set]]
name = "web"
site = "edge"
command = ["sleep", "60"]
bind = "127.0.0.1"
ports = {{ http = "29000-29001" }}
capacity = {{ min = 2, max = 2, initial = 2 }}
"#,
        state = dir.path().display()
    );
    let topology = model::parse(model::Source {
        name: "t.toml".into(),
        text,
    })
    .unwrap();
    let set = &topology.scale_sets[0];
    let engine =
        Arc::new(health::Engine::start(Vec::new(), &[], health::Options::default()).unwrap());
    let wiring = scaleset::runner::Wiring::of(set, &topology, engine, &[]);
    let driver: Arc<dyn scaleset::Driver> = Arc::new(scaleset::ProcessDriver { tandem: None });
    let running = scaleset::ScaleSet::start(
        set.clone(),
        driver,
        wiring,
        scaleset::runner::Options::new(dir.path().to_path_buf()),
    );
    testkit::eventually(
        Duration::from_secs(10),
        "both instances running",
        || async {
            let v = running.view();
            (v.instances.len() == 2 && v.instances.iter().all(|i| i.pid.is_some())).then_some(())
        },
    )
    .await;
    let mut events = running.events();
    let mut started = 0;
    while let Ok(e) = events.try_recv() {
        started += usize::from(e.kind == "instance" && e.message.starts_with("started pid"));
    }
    assert_eq!(started, 2, "the initial instances' start events");
}
