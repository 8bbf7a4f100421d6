//! Any text given as a topology file: parsing and rendering its diagnostics never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data).into_owned();
    if let Err(d) = model::parse(model::Source::new("fuzz.toml", text)) {
        let _ = d.render();
        let _ = d.to_json();
    }
});
