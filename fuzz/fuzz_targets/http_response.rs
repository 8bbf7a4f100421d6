//! Any bytes a probed server sends back: head parsing and body framing never panic.
#![no_main]

use health::http1::{Framing, body, parse_head};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((_, head_len, framing))) = parse_head(data) {
        let _ = body(&data[head_len.min(data.len())..], framing);
    }
    for f in [Framing::Chunked, Framing::UntilClose, Framing::Length(16)] {
        let _ = body(data, f);
    }
});
