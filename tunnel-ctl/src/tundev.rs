//! The TUN device: the slow path's door between the kernel's routing and the controller.
//!
//! The 4over6 server and client open theirs with offloads ([`open`]): `IFF_VNET_HDR` with
//! `TUNSETOFFLOAD` (checksum, TSO, USO), so one read brings a 64 KiB TCP super-packet that
//! [`Reader`] splits into MTU-sized packets (checksums filled in), and [`Writer`] coalesces
//! consecutive packets of one flow into one GSO write (GRO in user space). The splitting and
//! coalescing are tun-rs's (a port of wireguard-go's). Where the kernel refuses offloads the
//! device is opened without them and every read and write is one packet, as before.
//! Several queues (`IFF_MULTI_QUEUE`) let several readers take the kernel's packets at once.
use std::{io, io::IoSlice, sync::Arc};

use anyhow::{Context as _, Result};
use bytes::{Bytes, BytesMut};
use tun_rs::{AsyncDevice, DeviceBuilder, GROTable, VIRTIO_NET_HDR_LEN};

/// Default MTU of the TUN device; a 103 frame then stays within 2053 bytes (SPEC §3).
pub const TUN_MTU: u32 = 1500;

/// Packets [`Reader`] takes from one read: a 64 KiB super-packet of the smallest segments
/// the kernel makes (wireguard-go's and tun-rs's batch size).
pub const READ_BATCH: usize = tun_rs::IDEAL_BATCH_SIZE;

/// Largest packet handed on: a 103 or 102 carries at most 4,096 bytes of data.
const SEGMENT_MAX: usize = crate::protocol::frame::MAX_DATA;

/// One queue of a TUN device.
pub struct Tun {
    dev: AsyncDevice,
    /// Reads and writes carry a virtio-net header (`IFF_VNET_HDR`).
    offload: bool,
    /// The coalescing table of the queue's writers (about 1 MiB: one per queue, not one per
    /// session), held for one flush.
    gro: std::sync::Mutex<GROTable>,
}

/// A zero virtio-net header: one whole packet, checksum complete.
const PLAIN_HDR: [u8; VIRTIO_NET_HDR_LEN] = [0; VIRTIO_NET_HDR_LEN];

impl std::fmt::Debug for Tun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tun")
            .field("offload", &self.offload)
            .finish()
    }
}

impl Tun {
    /// Writes one packet (with its zero virtio-net header when offloads are on).
    pub async fn send(&self, pkt: &[u8]) -> io::Result<usize> {
        if self.offload {
            let n = self
                .dev
                .send_vectored(&[IoSlice::new(&PLAIN_HDR), IoSlice::new(pkt)])
                .await?;
            Ok(n.saturating_sub(VIRTIO_NET_HDR_LEN))
        } else {
            self.dev.send(pkt).await
        }
    }

    /// Whether this queue uses offloads.
    pub fn offload(&self) -> bool {
        self.offload
    }
}

/// Creates (or opens) TUN device `name`, one queue, no offloads, no packet information
/// headers: one read is one packet. Addresses, MTU and routes are set with rtnetlink by the
/// caller.
pub fn create(name: &str) -> Result<Arc<Tun>> {
    let mut queues = open(name, 1, false)?;
    Ok(queues.remove(0))
}

/// Creates (or opens) TUN device `name` with `queues` queues (`IFF_MULTI_QUEUE` when more
/// than one) and, when `offload`, the kernel's TUN offloads. Offloads the kernel refuses are
/// logged and done without; every other failure is an error that says what to do.
pub fn open(name: &str, queues: usize, offload: bool) -> Result<Vec<Arc<Tun>>> {
    let queues = queues.max(1);
    let build = |offload: bool| {
        DeviceBuilder::new()
            .name(name)
            .with(|b| {
                b.offload(offload).multi_queue(queues > 1);
            })
            .build_async()
    };
    let (first, offload) = match build(offload) {
        Ok(dev) => (dev, offload),
        Err(e) if offload => match build(false) {
            Ok(dev) => {
                tracing::warn!(
                    "TUN {name}: the kernel refused offloads ({e}); reading and writing one \
                     packet at a time"
                );
                (dev, false)
            }
            Err(e) => anyhow::bail!("creating TUN device {name}: {}", why(&e)),
        },
        Err(e) => anyhow::bail!("creating TUN device {name}: {}", why(&e)),
    };
    let mut devs = Vec::with_capacity(queues);
    for i in 1..queues {
        let dev = first
            .try_clone()
            .with_context(|| format!("opening queue {i} of TUN device {name}"))?;
        devs.push(dev);
    }
    devs.insert(0, first);
    Ok(devs
        .into_iter()
        .map(|dev| {
            Arc::new(Tun {
                dev,
                offload,
                gro: std::sync::Mutex::new(GROTable::default()),
            })
        })
        .collect())
}

/// What went wrong in words an operator can act on (`--tun` names the device).
fn why(io: &io::Error) -> String {
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
             of this kind (pick another --tun)"
        ),
        _ if io.kind() == io::ErrorKind::InvalidInput => {
            format!("{io} (pick another --tun: 1-15 bytes)")
        }
        _ => io.to_string(),
    }
}

/// Room for a read's packets in `buf` (where they are copied to be handed on as `Bytes`):
/// taken 64 KiB at a time, so small packets do not cost an allocation each.
fn reserve_chunk(buf: &mut BytesMut) {
    const CHUNK: usize = 64 * 1024;
    if buf.capacity() - buf.len() < CHUNK / 2 {
        buf.reserve(CHUNK);
    }
}

/// Reads one queue: each read is one packet, or a super-packet split into its segments.
pub struct Reader {
    tun: Arc<Tun>,
    raw: Vec<u8>,
    bufs: Vec<Vec<u8>>,
    sizes: Vec<usize>,
    n: usize,
}

impl Reader {
    pub fn new(tun: Arc<Tun>) -> Reader {
        let raw = vec![
            0u8;
            if tun.offload {
                VIRTIO_NET_HDR_LEN + 65_535
            } else {
                0
            }
        ];
        let (count, first) = if tun.offload {
            (READ_BATCH, SEGMENT_MAX)
        } else {
            (1, 65_536)
        };
        let mut bufs = vec![vec![0u8; SEGMENT_MAX]; count];
        bufs[0].resize(first, 0);
        Reader {
            tun,
            raw,
            bufs,
            sizes: vec![0; count],
            n: 0,
        }
    }

    /// Waits for the next read; the packets are then [`Reader::packets`]. A read error is
    /// logged and retried after 100 ms (the device does not go away while the daemon runs);
    /// a super-packet that cannot be split is counted in `bad` and skipped.
    pub async fn read(&mut self, bad: &(dyn Fn(&io::Error) + Sync)) {
        loop {
            match self
                .tun
                .dev
                .recv_multiple(&mut self.raw, &mut self.bufs, &mut self.sizes, 0)
                .await
            {
                Ok(n) => {
                    self.n = n;
                    return;
                }
                Err(e) if e.raw_os_error().is_some() => {
                    tracing::warn!("reading TUN: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                Err(e) => bad(&e),
            }
        }
    }

    /// Reads again if the kernel has more right now (no waiting); false when it has not.
    pub fn try_read(&mut self, bad: &(dyn Fn(&io::Error) + Sync)) -> bool {
        loop {
            match self
                .tun
                .dev
                .try_recv_multiple(&mut self.raw, &mut self.bufs, &mut self.sizes, 0)
            {
                Ok(n) => {
                    self.n = n;
                    return true;
                }
                Err(e) if e.raw_os_error().is_some() || e.kind() == io::ErrorKind::WouldBlock => {
                    self.n = 0;
                    return false;
                }
                Err(e) => bad(&e),
            }
        }
    }

    /// The packets of the last read, each made a whole frame of type `kind` (5-byte header,
    /// then the packet) in `chunk` and appended to `out` as `Bytes` that share it, ready for
    /// [`crate::protocol::frame::write_wire`]. Packets too long for a frame are left out;
    /// returns how many.
    pub fn take_frames(&self, kind: u8, chunk: &mut BytesMut, out: &mut Vec<Bytes>) -> usize {
        use crate::protocol::frame::{HEADER_LEN, MAX_DATA};
        reserve_chunk(chunk);
        let mut ends = [0usize; READ_BATCH];
        let (mut n, mut too_long) = (0, 0);
        for pkt in self.packets() {
            if pkt.len() > MAX_DATA {
                too_long += 1;
                continue;
            }
            chunk.extend_from_slice(&((HEADER_LEN + pkt.len()) as u32).to_le_bytes());
            chunk.extend_from_slice(&[kind]);
            chunk.extend_from_slice(pkt);
            ends[n] = chunk.len();
            n += 1;
        }
        let read = chunk.split().freeze();
        let mut start = 0;
        for &end in &ends[..n] {
            out.push(read.slice(start..end));
            start = end;
        }
        too_long
    }

    /// The packets of the last read.
    pub fn packets(&self) -> impl Iterator<Item = &[u8]> {
        self.bufs[..self.n]
            .iter()
            .zip(&self.sizes)
            .map(|(b, &n)| &b[..n])
    }
}

/// A buffer that grew past this (the head of a coalesced write) is not kept for reuse.
const KEEP_BUF: usize = 4096;
/// Largest coalesced write (an IP packet's limit).
const GSO_MAX: usize = 65_535;

/// The data of a TCP or UDP packet, after its headers.
fn payload(h: &Headers, pkt: &[u8]) -> usize {
    pkt.len() - h.l4 - h.l4_len
}

/// Whether tun-rs can append `pkt` to the coalesced write that `prev` (the packet pushed
/// before it) belongs to, which has `run` bytes so far (one set of headers and the data of
/// each): then `pkt` needs no room of its own.
/// When this says no and tun-rs would say yes, the packet is written alone (slower, never
/// wrong); the reverse only costs a large buffer.
fn continues(prev: &[u8], pkt: &[u8], run: usize) -> bool {
    let (Some(a), Some(b)) = (Headers::of(prev), Headers::of(pkt)) else {
        return false;
    };
    let same_flow = a.proto == b.proto
        && prev[a.addrs.clone()] == pkt[b.addrs.clone()]
        && prev[a.l4..a.l4 + 4] == pkt[b.l4..b.l4 + 4]
        && a.l4_len == b.l4_len;
    if !same_flow || run + payload(&b, pkt) > GSO_MAX || payload(&b, pkt) > payload(&a, prev) {
        return false;
    }
    match a.proto {
        // UDP: same size (the last may be smaller).
        17 => true,
        6 => {
            let flags = |p: &[u8], h: &Headers| p[h.l4 + 13];
            let seq = |p: &[u8], h: &Headers| {
                u32::from_be_bytes([p[h.l4 + 4], p[h.l4 + 5], p[h.l4 + 6], p[h.l4 + 7]])
            };
            // ACK only before (PSH ends a run), ACK or ACK+PSH now, options equal, in order.
            flags(prev, &a) == 0x10
                && matches!(flags(pkt, &b), 0x10 | 0x18)
                && prev[a.l4 + 20..a.l4 + a.l4_len] == pkt[b.l4 + 20..b.l4 + b.l4_len]
                && seq(pkt, &b) == seq(prev, &a).wrapping_add(payload(&a, prev) as u32)
        }
        _ => false,
    }
}

/// Where a TCP or UDP packet's parts are.
struct Headers {
    proto: u8,
    addrs: std::ops::Range<usize>,
    /// Start and length of the TCP or UDP header.
    l4: usize,
    l4_len: usize,
}

impl Headers {
    fn of(pkt: &[u8]) -> Option<Headers> {
        let (proto, addrs, l4) = match pkt.first()? >> 4 {
            4 => (*pkt.get(9)?, 12..20, usize::from(pkt[0] & 0x0f) * 4),
            6 => (*pkt.get(6)?, 8..40, 40),
            _ => return None,
        };
        let l4_len = match proto {
            6 => usize::from(pkt.get(l4 + 12)? >> 4) * 4,
            17 => 8,
            _ => return None,
        };
        (l4_len >= 8 && pkt.len() >= l4 + l4_len).then_some(Headers {
            proto,
            addrs,
            l4,
            l4_len,
        })
    }
}

/// Packets for one queue, written together: with offloads, consecutive TCP or UDP packets of
/// one flow go down as one GSO write (checksums checked first: a packet with a bad one is
/// written alone, as it came). Each session has one; what it keeps between bursts is its
/// buffers for one batch.
pub struct Writer {
    tun: Arc<Tun>,
    batch: Batch,
}

impl Writer {
    pub fn new(tun: Arc<Tun>) -> Writer {
        let batch = Batch::new(tun.offload);
        Writer { tun, batch }
    }

    /// Packets waiting for [`Writer::flush`].
    pub fn len(&self) -> usize {
        self.batch.used
    }

    pub fn is_empty(&self) -> bool {
        self.batch.used == 0
    }

    /// Bytes of the packets waiting (IP packets, no headers).
    pub fn bytes(&self) -> usize {
        self.batch.bytes
    }

    /// Queues a copy of `pkt` for the next flush.
    pub fn push(&mut self, pkt: &[u8]) {
        self.batch.push(pkt);
    }

    /// Writes what was pushed; how many packets that was. On an error some of them may not
    /// have been written. A TUN write does not wait (the kernel takes the packet or drops
    /// it), so this is done in place, under the queue's coalescing table.
    pub fn flush(&mut self) -> io::Result<usize> {
        let n = self.batch.used;
        if n == 0 {
            return Ok(0);
        }
        let b = &mut self.batch;
        let dev: &tun_rs::DeviceImpl = &self.tun.dev;
        // Without offloads tun-rs writes each packet as it is.
        let result = {
            let mut gro = self.tun.gro.lock().unwrap_or_else(|p| p.into_inner());
            dev.send_multiple(&mut gro, &mut b.bufs[..n], b.headroom)
        };
        b.clear();
        result.map(|_| n)
    }
}

/// The buffers of a [`Writer`]: each packet behind room for its virtio-net header, and the
/// first of each run of one flow with room for the whole run (tun-rs coalesces into the
/// head's buffer and does not reallocate it).
struct Batch {
    bufs: Vec<BytesMut>,
    used: usize,
    /// Bytes of the packets pushed (without headers).
    bytes: usize,
    headroom: usize,
    coalesce: bool,
    /// Bytes of the run of one flow the last packet belongs to.
    run: usize,
}

impl Batch {
    fn new(coalesce: bool) -> Batch {
        Batch {
            bufs: Vec::new(),
            used: 0,
            bytes: 0,
            headroom: if coalesce { VIRTIO_NET_HDR_LEN } else { 0 },
            coalesce,
            run: 0,
        }
    }

    fn push(&mut self, pkt: &[u8]) {
        if self.used == self.bufs.len() {
            self.bufs
                .push(BytesMut::with_capacity(self.headroom + 1600));
        }
        let follows =
            self.used > 0 && continues(&self.bufs[self.used - 1][self.headroom..], pkt, self.run);
        self.run = match Headers::of(pkt) {
            Some(h) if follows => self.run + payload(&h, pkt),
            _ => pkt.len(),
        };
        let buf = &mut self.bufs[self.used];
        buf.clear();
        if self.coalesce && !follows {
            buf.reserve(GSO_MAX + 2 * self.headroom);
        }
        buf.resize(self.headroom, 0);
        buf.extend_from_slice(pkt);
        self.used += 1;
        self.bytes += pkt.len();
    }

    /// Empties the batch; the heads' large buffers are given back (a session keeps little
    /// between bursts).
    fn clear(&mut self) {
        for buf in &mut self.bufs[..self.used] {
            if buf.capacity() > KEEP_BUF {
                *buf = BytesMut::with_capacity(self.headroom + 1600);
            }
        }
        self.used = 0;
        self.bytes = 0;
        self.run = 0;
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

/// Reads the next packet from a queue without offloads into `buf`; returns its length. A
/// read error is logged and retried after 100 ms (the device does not go away while the
/// daemon runs).
pub async fn recv(tun: &Tun, buf: &mut [u8]) -> usize {
    debug_assert!(!tun.offload, "a queue with offloads is read with a Reader");
    loop {
        match tun.dev.recv(buf).await {
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

#[cfg(test)]
mod tests {
    use etherparse::PacketBuilder;

    use super::*;

    fn segment(port: u16, seq: u32, len: usize) -> Vec<u8> {
        let mut out = Vec::new();
        PacketBuilder::ipv4([198, 51, 100, 2], [192, 0, 2, 2], 64)
            .tcp(port, 5201, seq, 63)
            .ack(1)
            .write(&mut out, &vec![7u8; len])
            .unwrap();
        out
    }

    /// What tun-rs would write for `batch`: the indexes of the buffers written, and their
    /// lengths (virtio-net header included).
    fn coalesced(batch: &mut Batch) -> Vec<usize> {
        let mut to_write = Vec::new();
        tun_rs::handle_gro(
            &mut batch.bufs[..batch.used],
            batch.headroom,
            &mut Default::default(),
            &mut Default::default(),
            false,
            &mut to_write,
        )
        .unwrap();
        to_write.iter().map(|&i| batch.bufs[i].len()).collect()
    }

    #[test]
    fn consecutive_segments_of_a_flow_become_one_write_per_flow() {
        let mut batch = Batch::new(true);
        for i in 0..4 {
            batch.push(&segment(40000, 1000 + i * 1448, 1448));
        }
        for i in 0..3 {
            batch.push(&segment(40001, 5000 + i * 1448, 1448));
        }
        assert_eq!(batch.bytes, 7 * 1488);
        // Two writes: 4 and 3 segments behind one IP and TCP header each.
        assert_eq!(
            coalesced(&mut batch),
            vec![10 + 40 + 4 * 1448, 10 + 40 + 3 * 1448]
        );
        batch.clear();
        assert!(
            batch.bufs.iter().all(|b| b.capacity() <= KEEP_BUF),
            "the large heads are given back"
        );
    }

    fn segment_psh(port: u16, seq: u32, len: usize) -> Vec<u8> {
        let mut out = Vec::new();
        PacketBuilder::ipv4([198, 51, 100, 2], [192, 0, 2, 2], 64)
            .tcp(port, 5201, seq, 63)
            .ack(1)
            .psh()
            .write(&mut out, &vec![7u8; len])
            .unwrap();
        out
    }

    #[test]
    fn a_run_ends_at_psh_and_at_64_kib_and_the_next_one_coalesces_too() {
        let mut batch = Batch::new(true);
        let mut seq = 1000;
        // A super-packet's segments end with PSH; the next starts a new write.
        for i in 0..3 {
            let pkt = if i == 2 {
                segment_psh(40000, seq, 1448)
            } else {
                segment(40000, seq, 1448)
            };
            batch.push(&pkt);
            seq += 1448;
        }
        // 50 segments: more than one write of at most 64 KiB.
        for _ in 0..50 {
            batch.push(&segment(40000, seq, 1448));
            seq += 1448;
        }
        let writes = coalesced(&mut batch);
        assert_eq!(writes[0], 10 + 40 + 3 * 1448, "{writes:?}");
        assert_eq!(writes.len(), 3, "{writes:?}");
        assert_eq!(
            writes[1..].iter().map(|w| w - 50).sum::<usize>(),
            50 * 1448,
            "{writes:?}"
        );
        assert!(writes.iter().all(|&w| w <= 10 + GSO_MAX), "{writes:?}");
    }

    #[test]
    fn a_segment_with_a_bad_checksum_is_written_alone() {
        let mut batch = Batch::new(true);
        for i in 0..3 {
            let mut pkt = segment(40000, 1000 + i * 1448, 1448);
            if i == 1 {
                pkt[100] ^= 0xff;
            }
            batch.push(&pkt);
        }
        let writes = coalesced(&mut batch);
        assert!(writes.len() >= 2, "{writes:?}");
        assert!(writes.contains(&(10 + 1488)), "{writes:?}");
    }

    #[test]
    fn without_offloads_packets_go_as_they_are() {
        let mut batch = Batch::new(false);
        batch.push(&segment(40000, 1000, 100));
        assert_eq!(batch.headroom, 0);
        assert_eq!(batch.bufs[0].len(), 140);
    }
}
