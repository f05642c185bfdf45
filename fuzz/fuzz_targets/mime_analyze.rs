#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| ringmail_fuzz::targets::mime_analyze(data));
