//! The lwAFTR's softwire lookups (RFC 7596, SPEC §4a): which softwire an IPv4 address and
//! port belong to, and whether an IPv6 address is one of our AFTR addresses. The maps are the
//! controller's; these functions only read them.
use tunnel_common::{
    fastpath::{B4Key, SharedAddr, SoftwireEntry, SoftwireKey},
    mape::psid_of,
};

use crate::maps::{AFTR_ADDRS, B4_ADDRS, SHARED_ADDRS, SOFTWIRES};

/// Why a port names no PSID.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Miss {
    /// The packet has no port (non-first fragment, a protocol without ports) and the address
    /// is split.
    NoPort,
    /// The port is in no set of this address (below 2^(16 − a) with offset a > 0).
    Outside,
}

/// An AFTR address some softwire names (besides the tunnel address).
#[inline(always)]
pub fn is_aftr(addr: &[u8; 16]) -> bool {
    // SAFETY: only the presence is used.
    unsafe { AFTR_ADDRS.get(addr) }.is_some()
}

/// How the ports of `ipv4` (wire order) are split, when softwires use it.
#[inline(always)]
pub fn shared(ipv4: u32) -> Option<SharedAddr> {
    // SAFETY: copied out at once.
    unsafe { SHARED_ADDRS.get(ipv4) }.copied()
}

/// The PSID of `port` on an address split as `addr` (0 for a whole address, port or not).
#[inline(always)]
pub fn psid(addr: &SharedAddr, port: Option<u16>) -> Result<u16, Miss> {
    if addr.psid_len == 0 {
        return Ok(0);
    }
    let port = port.ok_or(Miss::NoPort)?;
    psid_of(addr.psid_offset, addr.psid_len, port).ok_or(Miss::Outside)
}

/// The softwire holding `psid` of `ipv4` (wire order).
#[inline(always)]
pub fn get(ipv4: u32, psid: u16) -> Option<&'static SoftwireEntry> {
    let key = SoftwireKey {
        ipv4,
        psid,
        _pad: 0,
    };
    // SAFETY: the entry's memory lives as long as the map; the controller replaces a
    // softwire's entry whole (a reader sees the old endpoints or the new ones).
    unsafe { SOFTWIRES.get(key) }
}

/// `b4` holds at least one softwire of `ipv4` (wire order).
#[inline(always)]
pub fn b4_holds(b4: &[u8; 16], ipv4: u32) -> bool {
    let key = B4Key { b4: *b4, ipv4 };
    // SAFETY: only the presence is used.
    unsafe { B4_ADDRS.get(key) }.is_some()
}
