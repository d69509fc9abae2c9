//! The in-band path with and without the kernel's TUN offloads (issue: in-band throughput).
//! With them a read of the TUN brings a super-packet that is split into MTU-sized 103/102
//! packets, and the packets from the tunnel go down in few GSO writes; without them
//! (`--no-tun-offload`, or a kernel that refuses) every read and write is one packet. The wire
//! is the same either way: every 103 carries one IP packet of at most the TUN's MTU.
use std::{
    io::Read as _,
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    os::fd::AsRawFd as _,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use tunnel_tests::{
    Ns, counter,
    fourover6::{FourOverSix, INTERNET_HOST, RawPeer, server_args},
    transfer::tcp_transfer,
};

/// Packets the TUN device `dev` in `ns` took from its user (writes) and gave to it (reads):
/// the kernel's own counters, one per read or write whatever its size.
fn tun_rw(ns: &Ns, dev: &str) -> Result<(u64, u64)> {
    let out = ns.run(&["ip", "-s", "-j", "link", "show", "dev", dev])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    let s = &v[0]["stats64"];
    let n = |k: &str| {
        s[k]["packets"]
            .as_u64()
            .context("ip -s -j: no packet count")
    };
    Ok((n("rx")?, n("tx")?))
}

/// What the server's TUN saw over a 20 MB upload and a 20 MB download of one client.
struct Transfers {
    /// The kernel's counts of the TUN's writes and reads.
    writes: u64,
    reads: u64,
    /// The server's counts of packets written to and read from it.
    to_tun: u64,
    from_tun: u64,
    /// The server's log.
    log: String,
}

/// A client that uploads and downloads 20 MB over TCP, server and client started with
/// `extra`.
fn transfers(extra: &[&str]) -> Result<Transfers> {
    let mut t = FourOverSix::start(&server_args(extra))?;
    let ns = t.client_ns()?;
    let (_, addr) = t.start_client(&ns, extra)?;
    let addr: Ipv4Addr = addr.parse()?;
    assert_eq!(ns.ping(INTERNET_HOST, 3)?, 3, "pings over the tunnel");
    let before = tun_rw(&t.server, "tun4o6")?;
    let stats_before = t.server_stats()?;
    tcp_transfer(
        &ns,
        &t.internet,
        format!("{INTERNET_HOST}:9000").parse()?,
        20 << 20,
        1,
    )
    .context("20 MB upload")?;
    tcp_transfer(
        &t.internet,
        &ns,
        SocketAddr::new(addr.into(), 9001),
        20 << 20,
        2,
    )
    .context("20 MB download")?;
    let after = tun_rw(&t.server, "tun4o6")?;
    let stats = t.server_stats()?;
    let delta = |k: &str| counter(&stats, k) - counter(&stats_before, k);
    let run = Transfers {
        writes: after.0 - before.0,
        reads: after.1 - before.1,
        to_tun: delta("inband_packets_to_tun"),
        from_tun: delta("inband_packets_from_tun"),
        log: t.lab.daemon_log(&t.server_instance).unwrap_or_default(),
    };
    // 20 MB each way is ~14,000 full-sized packets each way.
    ensure!(
        run.to_tun > 14_000 && run.from_tun > 14_000,
        "{} packets to the TUN, {} from it",
        run.to_tun,
        run.from_tun
    );
    Ok(run)
}

#[test]
fn offloads_make_few_tun_writes_and_reads_and_without_them_every_packet_is_one() -> Result<()> {
    let on = transfers(&[])?;
    ensure!(
        on.log.contains("offloads on"),
        "the server should say it uses offloads:\n{}",
        on.log
    );
    ensure!(
        on.writes * 4 < on.to_tun,
        "with offloads the client's packets should go down in GSO writes: {} writes for {} \
         packets",
        on.writes,
        on.to_tun
    );
    ensure!(
        on.reads * 4 < on.from_tun,
        "with offloads the TUN should give super-packets: {} reads for {} packets",
        on.reads,
        on.from_tun
    );

    let off = transfers(&["--no-tun-offload"])?;
    ensure!(
        off.log.contains("one packet per read and write"),
        "the server should say it reads and writes one packet at a time:\n{}",
        off.log
    );
    // Keepalives and pings aside, one write per packet and one read per packet.
    ensure!(
        off.writes >= off.to_tun,
        "{} writes for {} packets",
        off.writes,
        off.to_tun
    );
    ensure!(
        off.reads >= off.from_tun,
        "{} reads for {} packets",
        off.reads,
        off.from_tun
    );
    Ok(())
}

/// UDP_SEGMENT (linux/udp.h): the socket's datagrams are cut into segments of this size by
/// the kernel, as late as it can (a GSO super-packet up to the TUN).
const UDP_SEGMENT: libc::c_int = 103;

#[test]
fn a_third_party_client_reading_2048_bytes_gets_every_103_whole_during_a_gso_download() -> Result<()>
{
    let mut t = FourOverSix::start(&server_args(&[]))?;
    let ns = t.client_ns()?;
    let mut peer = RawPeer::connect(&ns)?;
    let text = peer.lease()?;
    let lease: Ipv4Addr = text.split(' ').next().unwrap_or_default().parse()?;

    // The internet host sends 64,000-byte UDP GSO writes (segments of 1,400 bytes) to the
    // lease as fast as it can, for 2 s: the server's TUN gets them as super-packets.
    let sender = t.internet.enter(|| UdpSocket::bind("0.0.0.0:0"))??;
    let segment: libc::c_int = 1_400;
    // SAFETY: setsockopt on our socket with a pointer to a local c_int and its size.
    let rc = unsafe {
        libc::setsockopt(
            sender.as_raw_fd(),
            libc::SOL_UDP,
            UDP_SEGMENT,
            (&raw const segment).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    ensure!(rc == 0, "UDP_SEGMENT: {}", std::io::Error::last_os_error());
    sender.connect(SocketAddr::new(lease.into(), 9))?;
    let before = tun_rw(&t.server, "tun4o6")?;
    let blast = std::thread::spawn(move || -> Result<u64> {
        let payload = vec![0x5a_u8; 64_000];
        let (start, mut sent) = (Instant::now(), 0);
        while start.elapsed() < Duration::from_secs(2) {
            // A full queue on the way is the test's point, not an error.
            if sender.send(&payload).is_ok() {
                sent += 1;
            }
        }
        Ok(sent)
    });

    // The peer reads like a seed-004 client: the 5-byte header, then the data into a
    // 2,048-byte buffer. Every 103 must fit and hold one whole IPv4 datagram.
    let (mut whole, mut buf) = (0u64, [0u8; 2048]);
    peer.stream.set_read_timeout(Some(Duration::from_secs(3)))?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        ensure!(Instant::now() < deadline, "still reading after 20 s");
        let mut header = [0u8; 5];
        match peer.stream.read_exact(&mut header) {
            Ok(()) => {}
            // Nothing for 3 s: the sender is done and the queue drained.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e).context("reading a frame header"),
        }
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        ensure!(len >= 5, "frame length {len}");
        let data = len - 5;
        ensure!(
            data <= buf.len(),
            "a {}-byte 103 does not fit a 2,048-byte buffer",
            data
        );
        peer.stream.read_exact(&mut buf[..data])?;
        if header[4] != 103 {
            continue;
        }
        let pkt = &buf[..data];
        let total = usize::from(u16::from_be_bytes([pkt[2], pkt[3]]));
        ensure!(
            pkt[0] == 0x45 && total == data && data <= 1500,
            "a 103 of {data} bytes holds an IP packet of {total}"
        );
        ensure!(pkt[9] == 17, "not UDP: protocol {}", pkt[9]);
        let udp_len = usize::from(u16::from_be_bytes([pkt[24], pkt[25]]));
        ensure!(udp_len == data - 20, "UDP length {udp_len} in {data} bytes");
        ensure!(
            pkt[28..].iter().all(|&b| b == 0x5a),
            "payload changed on the way"
        );
        whole += 1;
    }
    let sent = blast.join().expect("sender thread")?;
    let (_, reads) = tun_rw(&t.server, "tun4o6")?;
    let reads = reads - before.1;
    ensure!(sent > 10, "the sender sent only {sent} super-packets");
    ensure!(whole >= 1_000, "only {whole} datagrams arrived whole");
    // The server read super-packets, not datagrams one by one: what it split them into
    // (queued for the peer, or dropped at its full queue: the peer reads slower than the
    // sender sends) is more than what it read.
    let stats = t.server_stats()?;
    let split =
        counter(&stats, "inband_packets_from_tun") + counter(&stats, "drop_session_queue_full");
    ensure!(
        reads * 4 < split,
        "{reads} TUN reads for {split} datagrams: no super-packets were split ({stats})"
    );
    Ok(())
}
