//! Replays the checked-in fuzz corpus (`fuzz/corpus/<target>/`) through the same functions the
//! fuzz targets call: inputs that once found a bug, and the seeds, stay fixed in CI.
use std::path::Path;

use tunnel_ctl::fuzzing::TARGETS;

#[test]
fn every_corpus_input_passes_its_target() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    for (name, target) in TARGETS {
        let dir = corpus.join(name);
        let mut inputs: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.expect("directory entry").path())
            .collect();
        inputs.sort();
        assert!(!inputs.is_empty(), "{}: no corpus", dir.display());
        for input in inputs {
            let data = std::fs::read(&input).expect("corpus file");
            let outcome = std::panic::catch_unwind(|| target(&data));
            assert!(outcome.is_ok(), "{name} panics on {}", input.display());
        }
    }
}
