//! BPF_PROG_TEST_RUN unit tests of the monitor programs on crafted packets.
use anyhow::Result;
use aya::programs::{SchedClassifier, TestRun as _, TestRunOptions};
use etherparse::PacketBuilder;
use tunnel_common::{
    names::{PROG_MONITOR_EGRESS, PROG_MONITOR_INGRESS},
    stats::Counter,
};
use tunnel_ctl::dataplane;
use tunnel_tests::Lab;

const TC_ACT_OK: u32 = 0;

fn ipv4_udp() -> Vec<u8> {
    let builder = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4([192, 0, 2, 1], [192, 0, 2, 2], 64)
        .udp(4000, 53);
    let mut out = Vec::new();
    builder.write(&mut out, b"hello").unwrap();
    out
}

fn ipv6_udp() -> Vec<u8> {
    let src = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    let dst = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
    let builder = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv6(src, dst, 64)
        .udp(4000, 53);
    let mut out = Vec::new();
    builder.write(&mut out, b"hello").unwrap();
    out
}

fn arp() -> Vec<u8> {
    let mut frame = vec![0xff; 6];
    frame.extend_from_slice(&[2, 0, 0, 0, 0, 1]);
    frame.extend_from_slice(&[0x08, 0x06]);
    frame.extend_from_slice(&[0u8; 28]);
    frame
}

#[test]
fn monitor_counts_by_protocol_and_passes_packets_unchanged() -> Result<()> {
    let mut lab = Lab::new()?;
    let instance = lab.instance("unit");
    let pin_dir = std::path::Path::new("/sys/fs/bpf/tunnel").join(&instance);
    let mut ebpf = dataplane::load(&pin_dir)?;

    let cases: [(&str, Vec<u8>, u32, Counter); 4] = [
        (
            PROG_MONITOR_INGRESS,
            ipv4_udp(),
            7,
            Counter::MonitorIngressIpv4,
        ),
        (
            PROG_MONITOR_INGRESS,
            ipv6_udp(),
            5,
            Counter::MonitorIngressIpv6,
        ),
        (PROG_MONITOR_INGRESS, arp(), 3, Counter::MonitorIngressOther),
        (
            PROG_MONITOR_EGRESS,
            ipv4_udp(),
            11,
            Counter::MonitorEgressIpv4,
        ),
    ];
    for (program, packet, repeat, expected) in cases {
        let before = dataplane::stats::read(&ebpf)?;
        let prog: &mut SchedClassifier = ebpf.program_mut(program).unwrap().try_into()?;
        if prog.fd().is_err() {
            prog.load()?;
        }
        let mut out = vec![0u8; packet.len() + 64];
        let result = prog.test_run(TestRunOptions {
            data_in: Some(&packet),
            data_out: Some(&mut out),
            repeat,
            ..Default::default()
        })?;
        assert_eq!(
            result.return_value, TC_ACT_OK,
            "{program} must pass packets"
        );
        assert_eq!(
            &out[..result.data_size_out as usize],
            &packet[..],
            "{program} must not modify packets"
        );
        let after = dataplane::stats::read(&ebpf)?;
        for counter in Counter::ALL {
            let delta = after[counter.name()] - before[counter.name()];
            let want = if *counter == expected {
                u64::from(repeat)
            } else {
                0
            };
            assert_eq!(delta, want, "{program}: counter {}", counter.name());
        }
    }
    drop(ebpf);
    Ok(())
}
