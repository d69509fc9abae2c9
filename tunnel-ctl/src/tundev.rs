//! The TUN device: the slow path's door between the kernel's routing and the controller.
use std::sync::Arc;

use anyhow::{Context as _, Result};
use tun::AsyncDevice;

/// Default MTU of the TUN device; a 103 frame then stays within 2053 bytes (SPEC §3).
pub const TUN_MTU: u32 = 1500;

/// Creates (or opens) TUN device `name` without packet information headers. Addresses, MTU
/// and routes are set with rtnetlink by the caller.
pub fn create(name: &str) -> Result<Arc<AsyncDevice>> {
    let mut config = tun::Configuration::default();
    config.tun_name(name);
    config.platform_config(|p| {
        p.ensure_root_privileges(true);
    });
    let dev = tun::create_as_async(&config)
        .map_err(|e| anyhow::anyhow!("creating TUN device {name}: {}", why(&e)))?;
    Ok(Arc::new(dev))
}

/// What went wrong in words an operator can act on (`--tun` names the device).
fn why(e: &tun::Error) -> String {
    let io = match e {
        tun::Error::NameTooLong => {
            return "the name is longer than 15 bytes (pick a shorter --tun)".into();
        }
        tun::Error::InvalidName | tun::Error::Nul(_) => {
            return "not a valid interface name (pick another --tun)".into();
        }
        tun::Error::Io(io) => io,
        other => return other.to_string(),
    };
    match io.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => {
            format!("{io}: creating a TUN device needs root (or CAP_NET_ADMIN)")
        }
        Some(libc::ENOENT) | Some(libc::ENODEV) | Some(libc::ENXIO) => {
            format!("{io}: /dev/net/tun is missing (no TUN support in this kernel or container)")
        }
        Some(libc::EBUSY) => format!(
            "{io}: a TUN device of that name is already open in another process (another \
             daemon? pick another --tun)"
        ),
        Some(libc::EINVAL) => format!(
            "{io}: the name is invalid or belongs to an interface that is not a TUN device \
             (pick another --tun)"
        ),
        _ => io.to_string(),
    }
}

/// clap value parser for `--tun`: a Linux interface name (1-15 bytes, no `/`, `:` or
/// whitespace, not `.` or `..`).
pub fn parse_name(s: &str) -> Result<String, String> {
    if s.is_empty() || s.len() > 15 {
        return Err(format!(
            "{s:?} is {} bytes; interface names have 1-15",
            s.len()
        ));
    }
    if s == "." || s == ".." || s.chars().any(|c| c == '/' || c == ':' || c.is_whitespace()) {
        return Err(format!(
            "{s:?} is not a valid interface name (no '/', ':' or spaces)"
        ));
    }
    Ok(s.to_owned())
}

/// Reads the next packet from `tun` into `buf`; returns its length. A read error is logged
/// and retried after 100 ms (the device does not go away while the daemon runs).
pub async fn recv(tun: &AsyncDevice, buf: &mut [u8]) -> usize {
    loop {
        match tun.recv(buf).await {
            Ok(n) => return n,
            Err(e) => {
                tracing::warn!("reading TUN: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

/// Sets sysctl `name` (dotted, e.g. `net.ipv6.conf.all.forwarding`) to `value` unless it
/// already is, logging `why`.
pub fn ensure_sysctl(name: &str, value: &str, why: &str) -> Result<()> {
    let path = format!("/proc/sys/{}", name.replace('.', "/"));
    if std::fs::read_to_string(&path).unwrap_or_default().trim() != value {
        tracing::info!("setting {name}={value} ({why})");
        std::fs::write(&path, value).with_context(|| format!("setting {name}={value}"))?;
    }
    Ok(())
}

/// Turns on net.ipv4.ip_forward if it is off, logging `why`.
pub fn ensure_ipv4_forwarding(why: &str) -> Result<()> {
    ensure_sysctl("net.ipv4.ip_forward", "1", why)
}

/// Turns on IPv6 forwarding on all interfaces if it is off, logging `why`. Interfaces with
/// accept_ra=1 stop taking router advertisements then (accept_ra=2 keeps them).
pub fn ensure_ipv6_forwarding(why: &str) -> Result<()> {
    ensure_sysctl("net.ipv6.conf.all.forwarding", "1", why)
}
