//! `.npy` calibration token ids (`read_token_ids`): parsed in Rust, then handed to libtorch. Run
//! under AddressSanitizer (cargo fuzz's default), a short or lying file must be an error, never a
//! read past the buffer.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    if let Ok(ids) = scalpel::calib::token_ids_from_bytes(data, Path::new("ids.npy")) {
        assert_eq!(ids.dim(), 2);
        assert!(ids.numel() > 0);
        // Every value is read, as the vocabulary check does.
        let _ = (ids.min().int64_value(&[]), ids.max().int64_value(&[]), ids.sum(tch::Kind::Int64).int64_value(&[]));
    }
});
