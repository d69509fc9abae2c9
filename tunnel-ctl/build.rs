//! Builds the eBPF programs (`tunnel-ebpf`, target bpfel-unknown-none, nightly + bpf-linker) into
//! OUT_DIR so that `tunnel-ctl` can embed the object. `cargo xtask setup` installs what this needs.
use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let root_dir = manifest_dir.join("../tunnel-ebpf");
    let root_dir = root_dir
        .canonicalize()
        .map_err(|e| anyhow::anyhow!("{}: {e}", root_dir.display()))?;
    let root_dir = root_dir
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("non-UTF-8 path {}", root_dir.display()))?;
    // aya-build replays the nested cargo's stderr as `cargo:warning`s (and cargo replays those
    // on every build); keep that cargo quiet so only real diagnostics show up.
    // SAFETY: build scripts are single-threaded.
    unsafe { std::env::set_var("CARGO_TERM_QUIET", "true") };
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "tunnel-ebpf",
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
