//! Attaching TC programs with TCX links (and the XDP program with an XDP link) that are pinned, so that a restarted controller re-adopts
//! (atomically replaces) its predecessor's attachment instead of leaving a gap in forwarding.
use std::{io, path::Path};

use anyhow::{Context as _, Result, anyhow};
use aya::{
    Ebpf,
    programs::{
        LinkOrder, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, LinkError, PinnedLink},
        tc::TcAttachOptions,
        xdp::XdpLink,
    },
    sys::SyscallError,
};
use tracing::info;

/// Which side of an interface a program runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }

    fn attach_type(self) -> TcAttachType {
        match self {
            Direction::Ingress => TcAttachType::Ingress,
            Direction::Egress => TcAttachType::Egress,
        }
    }
}

/// The pin name of `program`'s link on `iface`.
pub fn link_pin_name(program: &str, iface: &str) -> String {
    format!("link_{program}_{iface}")
}

/// Loads `program` (if not yet loaded) and attaches it to `iface` on `direction`; the link is
/// pinned as `<pin_dir>/link_<program>_<iface>`. If that pin exists (an earlier run), the program
/// replaces the old one on the same link: no moment without a program.
pub fn attach_pinned(
    ebpf: &mut Ebpf,
    program: &str,
    iface: &str,
    direction: Direction,
    pin_dir: &Path,
) -> Result<()> {
    let prog: &mut SchedClassifier = ebpf
        .program_mut(program)
        .ok_or_else(|| anyhow!("eBPF object has no program {program}"))?
        .try_into()
        .with_context(|| format!("{program} is not a TC program"))?;
    if prog.fd().is_err() {
        prog.load()
            .with_context(|| format!("verifier rejected {program}"))?;
    }
    let pin_path = pin_dir.join(link_pin_name(program, iface));
    let link_id = match PinnedLink::from_pin(&pin_path) {
        Ok(old) => {
            let link = FdLink::from(old)
                .try_into()
                .context("pinned link is not a TC link")?;
            info!(
                "re-adopting pinned {} link of {program} on {iface}",
                direction.as_str()
            );
            prog.attach_to_link(link)
                .with_context(|| format!("replacing {program} on {iface}"))?
        }
        Err(LinkError::SyscallError(SyscallError { io_error, .. }))
            if io_error.kind() == io::ErrorKind::NotFound =>
        {
            prog.attach_with_options(
                iface,
                direction.attach_type(),
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            )
            .with_context(|| {
                format!(
                    "attaching {program} to {iface} {} (does the interface exist?)",
                    direction.as_str()
                )
            })?
        }
        Err(e) => {
            return Err(e).with_context(|| format!("opening pinned link {}", pin_path.display()));
        }
    };
    let link = prog.take_link(link_id)?;
    let fd_link: FdLink = link.try_into().context("TC link is not a TCX link")?;
    // The pin, not our fd, keeps the attachment alive; when re-adopting it already names this
    // link. Dropping `fd_link` (or the returned PinnedLink) only closes our descriptor.
    if !pin_path.exists() {
        fd_link
            .pin(&pin_path)
            .with_context(|| format!("pinning link at {}", pin_path.display()))?;
    }
    Ok(())
}

/// As [`attach_pinned`] for an XDP program on `iface` (native XDP where the driver has it,
/// else generic), its link pinned as `<pin_dir>/link_<program>_<iface>`.
pub fn attach_xdp_pinned(
    ebpf: &mut Ebpf,
    program: &str,
    iface: &str,
    pin_dir: &Path,
) -> Result<()> {
    let prog: &mut Xdp = ebpf
        .program_mut(program)
        .ok_or_else(|| anyhow!("eBPF object has no program {program}"))?
        .try_into()
        .with_context(|| format!("{program} is not an XDP program"))?;
    if prog.fd().is_err() {
        prog.load()
            .with_context(|| format!("verifier rejected {program}"))?;
    }
    let pin_path = pin_dir.join(link_pin_name(program, iface));
    let link_id = match PinnedLink::from_pin(&pin_path) {
        Ok(old) => {
            let link: XdpLink = FdLink::from(old)
                .try_into()
                .context("pinned link is not an XDP link")?;
            info!("re-adopting pinned XDP link of {program} on {iface}");
            prog.attach_to_link(link)
                .with_context(|| format!("replacing {program} on {iface}"))?
        }
        Err(LinkError::SyscallError(SyscallError { io_error, .. }))
            if io_error.kind() == io::ErrorKind::NotFound =>
        {
            prog.attach(iface, XdpMode::default())
                .with_context(|| format!("attaching {program} to {iface} (XDP)"))?
        }
        Err(e) => {
            return Err(e).with_context(|| format!("opening pinned link {}", pin_path.display()));
        }
    };
    let link = prog.take_link(link_id)?;
    let fd_link: FdLink = link
        .try_into()
        .context("XDP link is not a BPF link (a kernel without XDP links)")?;
    if !pin_path.exists() {
        fd_link
            .pin(&pin_path)
            .with_context(|| format!("pinning link at {}", pin_path.display()))?;
    }
    Ok(())
}
