//! What the fuzz targets (`fuzz/`, `cargo xtask fuzz`) exercise, one function per target, so
//! that the checked-in corpus (`fuzz/corpus/<target>/`) is replayed by an ordinary test with
//! exactly the same code. Each function must never panic, whatever the bytes; where an input
//! parses, it also checks what must hold (round trips, sizes).
use std::net::{Ipv4Addr, SocketAddrV4};

use bytes::BytesMut;
use tokio_util::codec::Decoder as _;

use crate::{
    mape::{
        profiles::Profile,
        rule::{InterfaceId, Mapping, RuleSpec, ce_address},
        translate,
    },
    packet,
    protocol::{
        FrameCodec,
        frame::MAX_FRAME,
        text::{Lease4, Lease6, NativeGrant},
    },
    server::inbound::{AllowIn, Flows},
};

/// A fuzz target's body.
pub type Target = fn(&[u8]);

/// Target name → function.
pub const TARGETS: &[(&str, Target)] = &[
    ("frame_decoder", frame_decoder),
    ("texts", texts),
    ("mape_rule", mape_rule),
    ("slow_path", slow_path),
];

/// The TCP stream decoder: the bytes arrive in chunks whose size the first byte picks; every
/// frame that comes out is within the protocol's limits, and an error ends the stream (as it
/// ends the session).
pub fn frame_decoder(data: &[u8]) {
    let Some((&chunk, stream)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk).max(1);
    let mut codec = FrameCodec;
    let mut buf = BytesMut::new();
    for piece in stream.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(frame)) => assert!(frame.data.len() + 5 <= MAX_FRAME),
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
}

/// The 101, 106 and 108 parsers: whatever parses prints back to text that parses the same.
pub fn texts(data: &[u8]) {
    if let Ok(l) = Lease4::parse(data) {
        let again = Lease4::parse(l.to_string().as_bytes()).expect("101 round trip");
        assert_eq!(again, l);
    }
    if let Ok(g) = NativeGrant::parse(data) {
        assert_eq!(NativeGrant::parse(g.to_string().as_bytes()), Ok(g));
    }
    if let Ok(l) = Lease6::parse(data) {
        let again = Lease6::parse(l.to_string().as_bytes()).expect("108 round trip");
        assert_eq!(again, l);
        let _ = (l.routed(), l.lan_prefix());
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = text.parse::<AllowIn>();
    }
}

/// MAP-E: `--rule` text, then (after a newline) an end-user prefix or a profile name; the
/// mapping's port set has the announced size and the CE address lies in the prefix.
pub fn mape_rule(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (rule_text, rest) = text.split_once('\n').unwrap_or((text, ""));
    let prefix = rest.trim().parse::<ipnet::Ipv6Net>().ok();
    if let Some(profile) = Profile::by_name(rest.trim()) {
        let _ = profile.rules();
    }
    let Ok(spec) = rule_text.parse::<RuleSpec>() else {
        return;
    };
    let rule = spec.rule(InterfaceId::Rfc7597);
    let _ = rule.to_map_rule();
    if let Some(prefix) = prefix
        && let Ok(m) = rule.map(&prefix)
    {
        check_port_set(&m);
        let ce = ce_address(&prefix, m.ipv4, m.psid, InterfaceId::Rfc7597);
        assert!(prefix.trunc().contains(&ce) || prefix.prefix_len() > 64);
    }
}

/// What must hold of a mapping's port set, worked out from RFC 7597 §5.1 rather than with the
/// code that built it: (2^a − 1)·2^m ports (2^m when a = 0, all 65,536 when k = 0), ranges
/// ascending and disjoint, and every port mapping back to the PSID under the BR's `psid_of`.
fn check_port_set(m: &Mapping) {
    let (a, k) = (u32::from(m.psid_offset), u32::from(m.psid_len));
    if k == 0 {
        assert_eq!(
            (m.port_count, &m.port_ranges[..]),
            (1 << 16, &[[0, u16::MAX]][..])
        );
        return;
    }
    let mbits = 16 - a - k;
    let expected = if a == 0 {
        1 << mbits
    } else {
        ((1 << a) - 1) << mbits
    };
    assert_eq!(m.port_count, expected, "port count of a={a} k={k}");
    let counted: u32 = m
        .port_ranges
        .iter()
        .map(|[lo, hi]| u32::from(*hi) - u32::from(*lo) + 1)
        .sum();
    assert_eq!(counted, expected, "ranges of a={a} k={k}");
    for pair in m.port_ranges.windows(2) {
        assert!(
            pair[0][1] < pair[1][0],
            "ranges overlap or descend: {pair:?}"
        );
    }
    for [lo, hi] in &m.port_ranges {
        assert!(lo <= hi);
        for port in *lo..=*hi {
            let psid = tunnel_common::mape::psid_of(m.psid_offset, m.psid_len, port);
            assert_eq!(psid, Some(m.psid), "port {port} of PSID {}", m.psid);
        }
    }
}

/// The slow path's packet handling: splitting a 102, addresses, fitting into a tunnel MTU
/// (fragments never exceed it), the MAP-E CE's classification and ICMP translation, the IPv6
/// inbound filter.
pub fn slow_path(data: &[u8]) {
    let Some((&m, rest)) = data.split_first() else {
        return;
    };
    let mtu = 68 + u16::from(m) * 8;
    let (packets, _) = packet::split_packets(rest);
    let mut flows = Flows::default();
    let now = std::time::Instant::now();
    for pkt in packets {
        let _ = packet::addrs(pkt);
        match packet::fit(pkt, mtu, Ipv4Addr::new(198, 51, 100, 1)) {
            packet::Fit::Fragments(frags) => {
                assert!(frags.iter().all(|f| f.len() <= usize::from(mtu)));
            }
            packet::Fit::Whole => assert!(pkt.len() <= usize::from(mtu)),
            packet::Fit::TooBig(_) | packet::Fit::Unfragmentable => {}
        }
        if let translate::Outbound::Flow(_) = translate::outbound(pkt) {
            let mut copy = pkt.to_vec();
            translate::translate_out(&mut copy, Ipv4Addr::new(203, 0, 113, 1), 4096, 1400);
        }
        let _ = translate::admin_prohibited(pkt, Ipv4Addr::new(192, 0, 2, 1));
        let mut copy = pkt.to_vec();
        let _ = translate::translate_icmp_error_in(&mut copy, |_, port, _| {
            Some(SocketAddrV4::new(Ipv4Addr::new(192, 168, 1, 2), port))
        });
        flows.outbound(pkt, now);
        let _ = flows.inbound(pkt, &[], now);
    }
}
