//! Any body, any event header, into every format parser.
#![no_main]

use hookrelay::config::{EventLocator, Format};
use hookrelay::ingress::formats;
use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (header, body) = data.split_at(data.len().min(usize::from(data.first().copied().unwrap_or(0)) / 4));
    let mut headers = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_bytes(header) {
        headers.insert(HeaderName::from_static("x-event"), v.clone());
        headers.insert(HeaderName::from_static("webhook-id"), v);
    }
    for format in [
        Format::ButterCms,
        Format::CometCms,
        Format::Generic(EventLocator::Pointer("/type".into())),
        Format::Generic(EventLocator::Header(HeaderName::from_static("x-event"))),
    ] {
        if let Ok(parsed) = formats::parse(&format, &headers, body) {
            assert!(!parsed.event.is_empty() && parsed.event.bytes().all(|b| b.is_ascii_graphic()));
        }
    }
});
