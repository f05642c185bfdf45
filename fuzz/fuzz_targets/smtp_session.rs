#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| ringmail_fuzz::targets::smtp_session(data));
