//! Attaching TC programs with TCX links (and the XDP program with an XDP link) that are pinned, so that a restarted controller re-adopts
//! (atomically replaces) its predecessor's attachment instead of leaving a gap in forwarding.
use std::{io, path::Path};

use anyhow::{Context as _, Result, anyhow};
use aya::{
    Ebpf,
    programs::{
        LinkOrder, Program, ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode,
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
    let prog: &mut SchedClassifier = named(ebpf, program, "a TC")?;
    if prog.fd().is_err() {
        prog.load()
            .with_context(|| format!("verifier rejected {program}"))?;
    }
    let pin_path = pin_dir.join(link_pin_name(program, iface));
    let link_id = match pinned(&pin_path)? {
        Some(old) => {
            let link = old.try_into().context("pinned link is not a TC link")?;
            info!(
                "re-adopting pinned {} link of {program} on {iface}",
                direction.as_str()
            );
            prog.attach_to_link(link)
                .with_context(|| format!("replacing {program} on {iface}"))?
        }
        None => prog
            .attach_with_options(
                iface,
                direction.attach_type(),
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            )
            .with_context(|| {
                format!(
                    "attaching {program} to {iface} {} (does the interface exist?)",
                    direction.as_str()
                )
            })?,
    };
    let link = prog.take_link(link_id)?;
    pin(
        link.try_into().context("TC link is not a TCX link")?,
        &pin_path,
    )
}

/// Attaches each `(program, iface)` of `ingress` on ingress and, when given, the XDP
/// `(program, iface)`, all pinned in `pin_dir` (re-adopting an earlier run's links); then
/// removes every other link pin there: links of an earlier run on interfaces this run does not
/// use (or an XDP link a run with --xdp left) would go on forwarding from there.
pub fn attach_ingress_exactly(
    ebpf: &mut Ebpf,
    ingress: &[(&str, &str)],
    xdp: Option<(&str, &str)>,
    pin_dir: &Path,
) -> Result<()> {
    for (program, iface) in ingress {
        attach_pinned(ebpf, program, iface, Direction::Ingress, pin_dir)?;
    }
    let mut keep: Vec<String> = ingress
        .iter()
        .map(|(program, iface)| link_pin_name(program, iface))
        .collect();
    if let Some((program, iface)) = xdp {
        attach_xdp_pinned(ebpf, program, iface, pin_dir)?;
        keep.push(link_pin_name(program, iface));
        info!("decapsulating in XDP on {iface} too (--xdp)");
    }
    super::bpffs::remove_other_links(pin_dir, &keep)?;
    Ok(())
}

/// The object's program `name`, of the type `kind` names.
fn named<'a, T>(ebpf: &'a mut Ebpf, name: &str, kind: &str) -> Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut Program, Error = ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or_else(|| anyhow!("eBPF object has no program {name}"))?
        .try_into()
        .with_context(|| format!("{name} is not {kind} program"))
}

/// The link pinned at `pin_path` by an earlier run, if any.
fn pinned(pin_path: &Path) -> Result<Option<FdLink>> {
    match PinnedLink::from_pin(pin_path) {
        Ok(old) => Ok(Some(FdLink::from(old))),
        Err(LinkError::SyscallError(SyscallError { io_error, .. }))
            if io_error.kind() == io::ErrorKind::NotFound =>
        {
            Ok(None)
        }
        Err(e) => Err(e).with_context(|| format!("opening pinned link {}", pin_path.display())),
    }
}

/// Pins `link` at `pin_path` unless it is already there (a re-adopted link). The pin, not our
/// fd, keeps the attachment alive; dropping `link` only closes our descriptor.
fn pin(link: FdLink, pin_path: &Path) -> Result<()> {
    if !pin_path.exists() {
        link.pin(pin_path)
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
    let prog: &mut Xdp = named(ebpf, program, "an XDP")?;
    if prog.fd().is_err() {
        prog.load()
            .with_context(|| format!("verifier rejected {program}"))?;
    }
    let pin_path = pin_dir.join(link_pin_name(program, iface));
    let link_id = match pinned(&pin_path)? {
        Some(old) => {
            let link: XdpLink = old.try_into().context("pinned link is not an XDP link")?;
            info!("re-adopting pinned XDP link of {program} on {iface}");
            prog.attach_to_link(link)
                .with_context(|| format!("replacing {program} on {iface}"))?
        }
        None => prog
            .attach(iface, XdpMode::default())
            .with_context(|| format!("attaching {program} to {iface} (XDP)"))?,
    };
    let link = prog.take_link(link_id)?;
    let link = link
        .try_into()
        .context("XDP link is not a BPF link (a kernel without XDP links)")?;
    pin(link, &pin_path)
}
