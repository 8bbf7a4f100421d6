//! Any datagram sent to the DNS server: parsing and answering never panic, and every answer
//! is a well-formed message no larger than the transport allows.
#![no_main]

use std::sync::OnceLock;

use dns::server::{Metrics, Transport, answer};
use dns::table::{HealthView, Overrides, Tables};
use libfuzzer_sys::fuzz_target;

struct AllOnline;

impl HealthView for AllOnline {
    fn status(&self, _: &str) -> Option<health::Status> {
        Some(health::Status::Online)
    }
    fn latency(&self, _: &str) -> Option<std::time::Duration> {
        None
    }
}

fn tables() -> &'static (Tables, Metrics) {
    static T: OnceLock<(Tables, Metrics)> = OnceLock::new();
    T.get_or_init(|| {
        let text = include_str!("../../examples/two-site.toml");
        let t = model::parse(model::Source::new("two-site.toml", text)).expect("valid example");
        let tables = Tables::build(&t, &AllOnline, &Overrides::default(), 1, None);
        (tables, Metrics::new(t.profiles.len()))
    })
}

fuzz_target!(|data: &[u8]| {
    let (tables, metrics) = tables();
    let mut out = Vec::new();
    for transport in [Transport::Udp, Transport::Tcp] {
        if answer(tables, data, [127, 0, 0, 1].into(), transport, &mut out, metrics) {
            assert!(out.len() >= 12);
            if transport == Transport::Udp {
                assert!(out.len() <= 4096);
            }
        }
    }
});
