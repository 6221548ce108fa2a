//! Feeds arbitrary bytes to the chunk decoder: it must return a clear error or a chunk, never
//! panic. The first 32 bytes of the input are used as the expected model fingerprint half the
//! time, so that inputs can get past the model check.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mistralrs_kvplugin::codec;

fuzz_target!(|data: &[u8]| {
    let model = [7u8; 32];
    let _ = codec::decode(data, &model);
    if data.len() >= 52 {
        let mut chunk_model = [0u8; 32];
        chunk_model.copy_from_slice(&data[20..52]);
        let _ = codec::decode(data, &chunk_model);
    }
});
