//! Any text as routes.yaml: a configuration or a list of problems, never a panic.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Err(e) = hookrelay::config::load_str(text, Path::new("/nonexistent/routes.yaml"), &|_| Some("v".into()))
        {
            assert!(!e.to_string().is_empty());
        }
    }
});
