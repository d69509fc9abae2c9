#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| tunnel_ctl::fuzzing::slow_path(data));
