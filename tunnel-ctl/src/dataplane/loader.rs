//! Loading the embedded eBPF object.
use std::{
    fmt,
    path::Path,
    sync::atomic::{AtomicU8, Ordering},
};

use anyhow::{Context as _, Result, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{MapInfo, ProgramArray},
    programs::SchedClassifier,
};
use aya_log::EbpfLogger;
use aya_obj::maps::PinningType;
use tokio::io::unix::AsyncFd;
use tracing::warn;
use tunnel_common::names;

use super::bpffs;

/// The eBPF object built from `tunnel-ebpf` by build.rs; embedded so there is one file to ship.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tunnel"));

/// Maps only a server (4over6 or lwAFTR) uses. Every other role loads them with one entry
/// each ([`load_without`]): at their default sizes they take about 38 MB of kernel memory,
/// which a CPE running a native client has better uses for.
pub const SERVER_MAPS: &[&str] = &[
    names::BIND_BY_V6,
    names::BIND_CACHE,
    names::BIND_BY_V4,
    names::CLIENT_TRAFFIC,
    names::SOFTWIRES,
    names::SHARED_ADDRS,
    names::B4_ADDRS,
];
/// Maps only a NAPT uses (the MAP-E CE's, and a native client's lwB4): about 13 MB.
pub const NAT_MAPS: &[&str] = &[names::NAT_OUT, names::NAT_IN];

/// As [`load`], with the maps of `unused` (lists such as [`SERVER_MAPS`]) holding one entry.
pub fn load_without(pin_dir: &Path, unused: &[&[&str]]) -> Result<Ebpf> {
    let sizes: Vec<(&str, u32)> = unused
        .iter()
        .flat_map(|l| l.iter().map(|&n| (n, 1)))
        .collect();
    load_sized(pin_dir, &sizes)
}

/// Loads the object. Maps declared as pinned are re-used from `pin_dir` when a previous run left
/// them there (that is how counters and bindings survive a controller restart) and pinned there
/// otherwise. Callers own the directory: `bpffs::remove_pins` on clean shutdown.
pub fn load(pin_dir: &Path) -> Result<Ebpf> {
    load_sized(pin_dir, &[])
}

/// As [`load`], with the maps named in `sizes` holding that many entries instead of the
/// object's default (e.g. `--max-bindings`). A pinned map of another size is replaced.
pub fn load_sized(pin_dir: &Path, sizes: &[(&str, u32)]) -> Result<Ebpf> {
    bpffs::ensure_mounted()?;
    bpffs::create_pin_dir(pin_dir)?;
    raise_memlock_limit();
    replace_foreign_pins_sized(pin_dir, sizes)?;
    let level = LOG_LEVEL.load(Ordering::Relaxed);
    let mut loader = EbpfLoader::new();
    loader.default_map_pin_directory(pin_dir);
    let switch = u8::from(level != 0);
    loader.override_global(aya_log::LEVEL, &level, true);
    loader.override_global(names::LOG_SWITCH, &switch, true);
    for &(name, entries) in sizes {
        loader.map_max_entries(name, entries);
    }
    let mut ebpf = loader
        .load(OBJECT)
        .context("loading the eBPF object (needs root or CAP_BPF + CAP_NET_ADMIN)")?;
    check_names(&ebpf)?;
    install_programs(&mut ebpf, names::TAIL_PROGS, names::TAIL_PROGRAMS)?;
    if level != 0 {
        forward_logs(&mut ebpf)?;
        install_loggers(&mut ebpf)?;
    }
    Ok(ebpf)
}

/// The programs' log level, written into their read-only `AYA_LOG_LEVEL` at load time:
/// 0 (nothing; the verifier then removes every log call) unless [`log_ebpf_debug`] was called.
static LOG_LEVEL: AtomicU8 = AtomicU8::new(0);

/// Makes objects loaded from now on log their rare events (drops with reason and addresses,
/// slow-path hand-offs) at debug level; `-vv` does this. The records reach `tracing` under the
/// target `ebpf` with the program's name in the field `program`.
pub fn log_ebpf_debug() {
    LOG_LEVEL.store(aya_log::Level::Debug as u8, Ordering::Relaxed);
}

/// Reads the object's log ring buffer whenever it has records, for as long as the process
/// runs (each daemon loads its object once), and hands the records to `tracing`.
fn forward_logs(ebpf: &mut Ebpf) -> Result<()> {
    let logger = EbpfLogger::init_with_logger(ebpf, ToTracing).context("eBPF log ring buffer")?;
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        // The ring buffer must stay open for the programs to load; it fills and then drops
        // records (the programs do not wait).
        warn!("eBPF logging is on but nothing reads the records here (no async runtime)");
        std::mem::forget(logger);
        return Ok(());
    };
    let _enter = runtime.enter();
    // SAFETY: the logger owns the ring buffer's descriptor, which stays open and the same for
    // as long as the AsyncFd (its owner) lives.
    let mut fd = unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) }
        .map_err(|e| anyhow::anyhow!("polling the eBPF log ring buffer: {e}"))?;
    runtime.spawn(async move {
        while let Ok(mut ready) = fd.readable_mut().await {
            ready.get_inner_mut().flush();
            ready.clear_ready();
        }
    });
    Ok(())
}

/// Loads the log programs and puts them into the program array the programs tail-call.
fn install_loggers(ebpf: &mut Ebpf) -> Result<()> {
    install_programs(ebpf, names::LOG_PROGS, names::LOG_PROGRAMS)
}

/// Loads `programs` and puts each at its index in the program array `array_name`, for the
/// programs that tail-call them.
fn install_programs(ebpf: &mut Ebpf, array_name: &str, programs: &[&str]) -> Result<()> {
    let mut fds = Vec::with_capacity(programs.len());
    for &name in programs {
        let program: &mut SchedClassifier = ebpf
            .program_mut(name)
            .with_context(|| format!("eBPF object has no program {name}"))?
            .try_into()?;
        program
            .load()
            .with_context(|| format!("loading the tail-called program {name}"))?;
        fds.push(program.fd()?.try_clone()?);
    }
    let map = ebpf
        .map_mut(array_name)
        .with_context(|| format!("eBPF object has no map {array_name}"))?;
    let mut array = ProgramArray::try_from(map)?;
    for (index, fd) in (0u32..).zip(&fds) {
        array.set(index, fd, 0)?;
    }
    Ok(())
}

/// aya-log speaks the `log` crate's interface; this turns each record into a tracing event.
struct ToTracing;

impl log::Log for ToTracing {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        // The eBPF side sets the record's target to the program's name.
        let program = record.target();
        let message = record.args();
        match record.level() {
            log::Level::Error => tracing::error!(target: "ebpf", program, "{message}"),
            log::Level::Warn => tracing::warn!(target: "ebpf", program, "{message}"),
            log::Level::Info => tracing::info!(target: "ebpf", program, "{message}"),
            log::Level::Debug => tracing::debug!(target: "ebpf", program, "{message}"),
            log::Level::Trace => tracing::trace!(target: "ebpf", program, "{message}"),
        }
    }

    fn flush(&self) {}
}

/// What must match for a pinned map to be re-used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Layout {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    flags: u32,
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "type {} key {} B value {} B max {} flags {:#x}",
            self.map_type, self.key_size, self.value_size, self.max_entries, self.flags
        )
    }
}

/// Removes pins in `pin_dir` that hold a map of another layout than this object declares (left
/// there by an older or newer version, or not a map at all), so that the load creates fresh
/// ones. aya re-uses a pinned map by name without comparing it; the programs would then read
/// a binding or a counter with the wrong size. The bindings are lost; the caller rebuilds them
/// from its saved state. Returns the names replaced.
pub fn replace_foreign_pins(pin_dir: &Path) -> Result<Vec<String>> {
    replace_foreign_pins_sized(pin_dir, &[])
}

/// [`replace_foreign_pins`] for an object whose maps in `sizes` get those sizes.
fn replace_foreign_pins_sized(pin_dir: &Path, sizes: &[(&str, u32)]) -> Result<Vec<String>> {
    let object = aya_obj::Object::parse(OBJECT).context("parsing the embedded eBPF object")?;
    let mut replaced = Vec::new();
    for (name, map) in &object.maps {
        if map.pinning() != PinningType::ByName {
            continue;
        }
        let pin = pin_dir.join(name);
        if pin.symlink_metadata().is_err() {
            continue;
        }
        let want = Layout {
            map_type: map.map_type(),
            key_size: map.key_size(),
            value_size: map.value_size(),
            max_entries: sizes
                .iter()
                .find(|(n, _)| n == name)
                .map_or(map.max_entries(), |&(_, entries)| entries),
            flags: map.map_flags(),
        };
        let found = MapInfo::from_pin(&pin).map(|info| Layout {
            map_type: info.map_type().map_or(u32::MAX, |t| t as u32),
            key_size: info.key_size(),
            value_size: info.value_size(),
            max_entries: info.max_entries(),
            flags: info.map_flags(),
        });
        let why = match found {
            Ok(found) if found == want => continue,
            Ok(found) => format!("it has {found}, this version needs {want}"),
            Err(e) => format!("it is not a readable map ({e})"),
        };
        warn!(
            "replacing pinned map {} ({why}; left by another version?)",
            pin.display()
        );
        std::fs::remove_file(&pin).with_context(|| format!("removing {}", pin.display()))?;
        replaced.push(name.clone());
    }
    Ok(replaced)
}

/// Fails when the object lacks a map or program that `tunnel_common::names` promises.
fn check_names(ebpf: &Ebpf) -> Result<()> {
    for map in names::ALL_MAPS {
        if ebpf.map(map).is_none() {
            bail!("eBPF object has no map {map}: tunnel-common and tunnel-ebpf disagree");
        }
    }
    for prog in names::ALL_PROGRAMS.iter().chain(names::LOG_PROGRAMS) {
        if ebpf.program(prog).is_none() {
            bail!("eBPF object has no program {prog}: tunnel-common and tunnel-ebpf disagree");
        }
    }
    Ok(())
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; harmless on newer ones.
fn raise_memlock_limit() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall with a valid pointer to a local.
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) };
}
