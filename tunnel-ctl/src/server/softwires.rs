//! The lwAFTR's static binding table (SPEC §4a, RFC 7596): softwires {IPv4, PSID/k, offset,
//! B4, AFTR address} read from a TOML file (`--bindings`) or added and removed at run time
//! (`tunnel-ctl softwire add|del`). Pure: parsing, the rules a table must keep, and the
//! difference between two tables (what a reload writes). `dataplane::softwires` mirrors a
//! table into the maps.
use std::{
    collections::BTreeMap,
    fmt,
    net::{Ipv4Addr, Ipv6Addr},
    path::Path,
};

use serde::{Deserialize, Serialize};

/// The default PSID offset a (SPEC §4a): ports 0-1023 belong to no set.
pub const DEFAULT_PSID_OFFSET: u8 = 6;

/// One softwire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Softwire {
    pub ipv4: Ipv4Addr,
    pub psid: u16,
    /// k; 0: the whole address.
    pub psid_len: u8,
    /// a (0 for a whole address).
    pub psid_offset: u8,
    pub b4: Ipv6Addr,
    /// None: the server's --tunnel-addr.
    pub aftr: Option<Ipv6Addr>,
}

/// (IPv4, PSID): what names a softwire.
pub type Key = (Ipv4Addr, u16);

impl Softwire {
    /// Checks the PSID fields and normalises a whole address (length 0) to PSID 0, offset 0.
    pub fn new(
        ipv4: Ipv4Addr,
        psid: u16,
        psid_len: u8,
        psid_offset: u8,
        b4: Ipv6Addr,
        aftr: Option<Ipv6Addr>,
    ) -> Result<Softwire, String> {
        if psid_len > 16 {
            return Err(format!("{ipv4}: psid-len {psid_len} is more than 16"));
        }
        if psid_len == 0 {
            if psid != 0 {
                return Err(format!(
                    "{ipv4}: psid {psid} with psid-len 0 (a whole address has only PSID 0)"
                ));
            }
            return Ok(Softwire {
                ipv4,
                psid: 0,
                psid_len: 0,
                psid_offset: 0,
                b4,
                aftr,
            });
        }
        if u32::from(psid_len) + u32::from(psid_offset) > 16 {
            return Err(format!(
                "{ipv4}: psid-len {psid_len} + psid-offset {psid_offset} is more than 16 bits"
            ));
        }
        if u32::from(psid) >= 1 << psid_len {
            return Err(format!(
                "{ipv4}: psid {psid} does not fit in psid-len {psid_len} (0-{})",
                (1u32 << psid_len) - 1
            ));
        }
        for (what, addr) in [("b4", Some(b4)), ("aftr", aftr)] {
            if let Some(a) = addr
                && (a.is_unspecified() || a.is_multicast() || a.is_loopback())
            {
                return Err(format!(
                    "{ipv4} psid {psid}: {what} {a} is not a unicast address"
                ));
            }
        }
        Ok(Softwire {
            ipv4,
            psid,
            psid_len,
            psid_offset,
            b4,
            aftr,
        })
    }

    pub fn key(&self) -> Key {
        (self.ipv4, self.psid)
    }

    /// The number of ports in this softwire's set.
    pub fn port_count(&self) -> u32 {
        if self.psid_len == 0 {
            return 65_536;
        }
        let m = 16 - u32::from(self.psid_len) - u32::from(self.psid_offset);
        let blocks = if self.psid_offset == 0 {
            1
        } else {
            (1u32 << self.psid_offset) - 1
        };
        blocks << m
    }
}

impl fmt::Display for Softwire {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.psid_len == 0 {
            write!(f, "{} (whole address)", self.ipv4)?;
        } else {
            write!(
                f,
                "{} psid {}/{} offset {}",
                self.ipv4, self.psid, self.psid_len, self.psid_offset
            )?;
        }
        write!(f, " → B4 {}", self.b4)?;
        if let Some(a) = self.aftr {
            write!(f, " via AFTR {a}")?;
        }
        Ok(())
    }
}

/// A consistent set of softwires: no two hold the same (IPv4, PSID), and all softwires of
/// one address split it the same way (one PSID length and offset, as Snabb's PSID map has
/// per address), which makes their port sets disjoint.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Table {
    by_key: BTreeMap<Key, Softwire>,
}

/// Why a packet from a B4 belongs to no softwire (the fast path's drop reasons).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// No softwire holds any part of the inner source address.
    Unbound,
    /// The B4 holds the address, but not the port.
    PortOutsideSet,
    /// Another B4 holds the address and port.
    B4Mismatch,
    /// The address is shared, and no softwire holds the port.
    NoBindingForPort,
}

impl Refused {
    /// The counter the fast path counts the same refusal under.
    pub fn counter(self) -> &'static str {
        match self {
            Refused::Unbound => "drop_unbound_source",
            Refused::PortOutsideSet => "drop_port_outside_set",
            Refused::B4Mismatch => "drop_b4_mismatch",
            Refused::NoBindingForPort => "drop_no_binding_for_port",
        }
    }
}

/// What turns one table into another: softwires to write (new, or with other endpoints) and
/// keys to remove. Unchanged softwires are in neither.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Diff {
    pub write: Vec<Softwire>,
    pub remove: Vec<Softwire>,
}

impl Table {
    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Softwire> {
        self.by_key.values()
    }

    pub fn get(&self, key: Key) -> Option<&Softwire> {
        self.by_key.get(&key)
    }

    /// How `ipv4` is split by the softwires already on it, if any.
    fn split_of(&self, ipv4: Ipv4Addr) -> Option<&Softwire> {
        self.by_key
            .range((ipv4, 0)..=(ipv4, u16::MAX))
            .next()
            .map(|(_, s)| s)
    }

    /// Adds `sw`; refused when its (IPv4, PSID) is taken or it splits its address otherwise
    /// than the softwires already there.
    pub fn insert(&mut self, sw: Softwire) -> Result<(), String> {
        self.check(&sw)?;
        self.by_key.insert(sw.key(), sw);
        Ok(())
    }

    /// Whether [`Table::insert`] would take `sw`.
    pub fn check(&self, sw: &Softwire) -> Result<(), String> {
        if let Some(other) = self.split_of(sw.ipv4)
            && (other.psid_len, other.psid_offset) != (sw.psid_len, sw.psid_offset)
        {
            return Err(format!(
                "{sw}: {} is already split as psid-len {} psid-offset {} (by {other}); all \
                 softwires of one address must use the same psid-len and psid-offset",
                sw.ipv4, other.psid_len, other.psid_offset
            ));
        }
        match self.by_key.get(&sw.key()) {
            Some(held) => Err(format!(
                "{sw}: {} psid {} is already held ({held})",
                sw.ipv4, sw.psid
            )),
            None => Ok(()),
        }
    }

    /// Whether any softwire holds (part of) `ipv4`.
    pub fn holds_address(&self, ipv4: Ipv4Addr) -> bool {
        self.split_of(ipv4).is_some()
    }

    /// The softwire that holds `port` of `ipv4` (a whole-address softwire holds every port,
    /// and packets without one); None when no softwire does.
    pub fn holder(&self, ipv4: Ipv4Addr, port: Option<u16>) -> Option<&Softwire> {
        let split = self.split_of(ipv4)?;
        if split.psid_len == 0 {
            return self.get((ipv4, 0));
        }
        let psid = tunnel_common::mape::psid_of(split.psid_offset, split.psid_len, port?)?;
        self.get((ipv4, psid))
    }

    /// The softwire a packet from B4 `b4` with inner source `src` and `port` belongs to, or
    /// why it belongs to none: the checks of the fast path (RFC 7596 §5.1), for the packets
    /// the slow path sees whole (reassembled outer fragments).
    pub fn check_from_b4(
        &self,
        b4: Ipv6Addr,
        src: Ipv4Addr,
        port: Option<u16>,
    ) -> Result<&Softwire, Refused> {
        if !self.holds_address(src) {
            return Err(Refused::Unbound);
        }
        let b4_holds_src = || {
            self.by_key
                .range((src, 0)..=(src, u16::MAX))
                .any(|(_, sw)| sw.b4 == b4)
        };
        match self.holder(src, port) {
            Some(sw) if sw.b4 == b4 => Ok(sw),
            _ if b4_holds_src() => Err(Refused::PortOutsideSet),
            Some(_) => Err(Refused::B4Mismatch),
            None => Err(Refused::NoBindingForPort),
        }
    }

    pub fn remove(&mut self, key: Key) -> Option<Softwire> {
        self.by_key.remove(&key)
    }

    /// What makes `self` into `new`.
    pub fn diff(&self, new: &Table) -> Diff {
        let write = new
            .iter()
            .filter(|s| self.get(s.key()) != Some(s))
            .copied()
            .collect();
        let remove = self
            .iter()
            .filter(|s| new.get(s.key()).is_none())
            .copied()
            .collect();
        Diff { write, remove }
    }

    /// Parses a bindings file (SPEC §4a); every error names the softwire it is about.
    pub fn parse(text: &str) -> Result<Table, String> {
        let rows = parse_rows(text)?;
        let mut table = Table::default();
        for (i, row) in rows.into_iter().enumerate() {
            let sw = Softwire::new(
                row.ipv4,
                row.psid,
                row.psid_len,
                row.psid_offset.unwrap_or(DEFAULT_PSID_OFFSET),
                row.b4,
                row.aftr,
            )
            .and_then(|sw| table.insert(sw));
            sw.map_err(|e| {
                format!(
                    "softwire #{} ([[softwire]] {} of the file): {e}",
                    i + 1,
                    i + 1
                )
            })?;
        }
        Ok(table)
    }

    /// Reads and parses `path`.
    pub fn load(path: &Path) -> anyhow::Result<Table> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("--bindings {}: {e}", path.display()))?;
        Table::parse(&text).map_err(|e| anyhow::anyhow!("--bindings {}: {e}", path.display()))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    softwire: Vec<Row>,
}

/// One `[[softwire]]` as written.
#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct Row {
    ipv4: Ipv4Addr,
    #[serde(default)]
    psid: u16,
    #[serde(default)]
    psid_len: u8,
    psid_offset: Option<u8>,
    b4: Ipv6Addr,
    aftr: Option<Ipv6Addr>,
}

/// Files above this size are parsed in parts of about [`PART`] bytes.
const PARTS_ABOVE: usize = 256 << 10;
const PART: usize = 64 << 10;
const HEADER: &str = "\n[[softwire]]";

/// The rows of a bindings file, in file order. A million softwires is about 100 MB of TOML,
/// which the `toml` crate takes some 8 s to read in one piece (it lexes the whole document
/// into one token vector first: most of the time goes to faulting in fresh memory). Cut at
/// `[[softwire]]` header lines into parts of 64 KiB, each a document of whole
/// `[[softwire]]` tables with the same rows, it reads in a third of that, and the parts
/// are spread over the CPUs. When any part does not parse (a cut inside a multi-line
/// string, a file of another shape), the whole file is parsed again in one piece, for the
/// error as the file has it.
fn parse_rows(text: &str) -> Result<Vec<Row>, String> {
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    parse_rows_in(text, cpus.min(8), PART, PARTS_ABOVE)
}

fn parse_rows_in(
    text: &str,
    threads: usize,
    part: usize,
    parts_above: usize,
) -> Result<Vec<Row>, String> {
    let whole = || {
        toml::from_str::<File>(text)
            .map(|f| f.softwire)
            .map_err(|e| e.to_string())
    };
    if text.len() <= parts_above {
        return whole();
    }
    let mut cuts = vec![0];
    let mut at = 0;
    while let Some(found) = text.get(at + part..).and_then(|rest| rest.find(HEADER)) {
        at += part + found + 1;
        cuts.push(at);
    }
    cuts.push(text.len());
    let parts: Vec<&str> = cuts.windows(2).map(|w| &text[w[0]..w[1]]).collect();
    let per_thread = parts.len().div_ceil(threads.max(1));
    let parsed: Vec<Option<Vec<Row>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = parts
            .chunks(per_thread)
            .map(|mine| {
                scope.spawn(move || {
                    let mut rows = Vec::new();
                    for part in mine {
                        rows.extend(toml::from_str::<File>(part).ok()?.softwire);
                    }
                    Some(rows)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().ok().flatten())
            .collect()
    });
    if parsed.iter().any(Option::is_none) {
        return whole();
    }
    Ok(parsed.into_iter().flatten().flatten().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const B4: &str = "2001:db8:1::2";

    fn sw(ipv4: &str, psid: u16, len: u8, offset: u8) -> Softwire {
        Softwire::new(
            ipv4.parse().unwrap(),
            psid,
            len,
            offset,
            B4.parse().unwrap(),
            None,
        )
        .unwrap()
    }

    #[test]
    fn a_file_with_defaults_parses_and_a_whole_address_is_psid_0() {
        let t = Table::parse(
            r#"
[[softwire]]
ipv4 = "203.0.113.1"
psid = 4
psid-len = 6
b4 = "2001:db8:1::2"

[[softwire]]
ipv4 = "203.0.113.2"
b4 = "2001:db8:1::3"
aftr = "2001:db8:ffff::2"
"#,
        )
        .unwrap();
        assert_eq!(t.len(), 2);
        let a = t.get(("203.0.113.1".parse().unwrap(), 4)).unwrap();
        assert_eq!((a.psid_len, a.psid_offset, a.aftr), (6, 6, None));
        assert_eq!(a.port_count(), 63 * 16);
        let b = t.get(("203.0.113.2".parse().unwrap(), 0)).unwrap();
        assert_eq!((b.psid_len, b.psid_offset, b.port_count()), (0, 0, 65_536));
        assert_eq!(b.aftr, Some("2001:db8:ffff::2".parse().unwrap()));
    }

    #[test]
    fn bad_rows_are_refused_with_the_row_and_the_reason() {
        for (row, want) in [
            (
                "psid = 64\npsid-len = 6",
                "does not fit in psid-len 6 (0-63)",
            ),
            ("psid = 1\npsid-len = 0", "a whole address has only PSID 0"),
            ("psid-len = 12\npsid-offset = 6", "more than 16 bits"),
            ("psid-len = 17", "more than 16"),
            ("psid-len = 4\nport = 3", "unknown field `port`"),
        ] {
            let text = format!("[[softwire]]\nipv4 = \"203.0.113.1\"\nb4 = \"{B4}\"\n{row}\n");
            let e = Table::parse(&text).unwrap_err();
            assert!(e.contains(want), "{row:?}: {e}");
        }
        let text = format!(
            "[[softwire]]\nipv4 = \"203.0.113.1\"\nb4 = \"{B4}\"\npsid = 1\npsid-len = 4\n\
             [[softwire]]\nipv4 = \"203.0.113.1\"\nb4 = \"{B4}\"\npsid = 1\npsid-len = 4\n"
        );
        let e = Table::parse(&text).unwrap_err();
        assert!(
            e.starts_with("softwire #2") && e.contains("already held"),
            "{e}"
        );
    }

    fn rows_text(n: u16) -> String {
        (0..n)
            .map(|i| {
                format!(
                    "[[softwire]]\nipv4 = \"203.0.113.{}\"\npsid = {}\npsid-len = 4\nb4 = \"2001:db8:1::{i:x}\"\n",
                    i / 16,
                    i % 16
                )
            })
            .collect()
    }

    #[test]
    fn a_big_file_parsed_in_parts_gives_the_same_rows_and_errors_as_in_one_piece() {
        let text = rows_text(1000);
        let whole = Table::parse(&text).unwrap();
        for (threads, part) in [(1, 100), (2, 1000), (3, 64), (7, 5000)] {
            let rows = parse_rows_in(&text, threads, part, 100).unwrap();
            assert_eq!(rows.len(), 1000);
            let b4s: Vec<Ipv6Addr> = rows.iter().map(|r| r.b4).collect();
            let want: Vec<Ipv6Addr> = whole.iter().map(|s| s.b4).collect();
            assert_eq!(b4s, want, "{threads} threads, parts of {part}");
        }
        // A cut that falls inside a multi-line string: the parts do not parse, and the error
        // is the one-piece parse's.
        let mut odd = rows_text(10);
        odd.push_str("[[softwire]]\nipv4 = \"203.0.113.9\"\nnote = '''\n[[softwire]]\n'''\n");
        odd.push_str(&rows_text(10));
        let e = parse_rows_in(&odd, 2, 10, 10).err().unwrap();
        assert_eq!(
            Some(e),
            toml::from_str::<File>(&odd).err().map(|e| e.to_string())
        );
    }

    #[test]
    fn a_b4s_packet_is_checked_as_the_fast_path_checks_it() {
        let mut t = Table::default();
        // 203.0.113.1 psid 1/4 (offset 6: ports 1024 + 64 ...) for B4, psid 2 for ::9.
        t.insert(sw("203.0.113.1", 1, 4, 6)).unwrap();
        let other: Ipv6Addr = "2001:db8:1::9".parse().unwrap();
        t.insert(Softwire {
            b4: other,
            ..sw("203.0.113.1", 2, 4, 6)
        })
        .unwrap();
        let b4: Ipv6Addr = B4.parse().unwrap();
        let a: Ipv4Addr = "203.0.113.1".parse().unwrap();
        assert_eq!(t.check_from_b4(b4, a, Some(1024 + 64 + 5)).unwrap().psid, 1);
        let refused = |b4, addr: &str, port| t.check_from_b4(b4, addr.parse().unwrap(), port);
        assert_eq!(
            refused(b4, "203.0.113.1", Some(1024 + 128)),
            Err(Refused::PortOutsideSet)
        );
        assert_eq!(
            refused(b4, "203.0.113.1", Some(80)),
            Err(Refused::PortOutsideSet)
        );
        assert_eq!(
            refused(b4, "203.0.113.1", None),
            Err(Refused::PortOutsideSet)
        );
        let stranger: Ipv6Addr = "2001:db8:1::77".parse().unwrap();
        assert_eq!(
            refused(stranger, "203.0.113.1", Some(1024 + 128)),
            Err(Refused::B4Mismatch)
        );
        assert_eq!(
            refused(stranger, "203.0.113.1", Some(1024 + 3 * 64)),
            Err(Refused::NoBindingForPort)
        );
        assert_eq!(
            refused(b4, "203.0.113.7", Some(5000)),
            Err(Refused::Unbound)
        );
        // Toward the B4s: by the destination port.
        assert_eq!(t.holder(a, Some(1024 + 128 + 1)).map(|s| s.b4), Some(other));
        assert_eq!(t.holder(a, Some(1000)), None);
    }

    #[test]
    fn softwires_of_one_address_must_split_it_alike() {
        let mut t = Table::default();
        t.insert(sw("203.0.113.1", 1, 4, 6)).unwrap();
        t.insert(sw("203.0.113.1", 2, 4, 6)).unwrap();
        let e = t.insert(sw("203.0.113.1", 3, 5, 6)).unwrap_err();
        assert!(e.contains("same psid-len and psid-offset"), "{e}");
        let e = t.insert(sw("203.0.113.1", 0, 0, 0)).unwrap_err();
        assert!(e.contains("same psid-len"), "{e}");
        // Another address may be split otherwise.
        t.insert(sw("203.0.113.2", 3, 5, 0)).unwrap();
        assert_eq!(t.len(), 3);
    }

    #[test]
    fn the_diff_writes_new_and_changed_softwires_and_removes_gone_ones() {
        let mut old = Table::default();
        for s in [sw("203.0.113.1", 1, 4, 6), sw("203.0.113.1", 2, 4, 6)] {
            old.insert(s).unwrap();
        }
        let mut new = Table::default();
        let moved = Softwire {
            b4: "2001:db8:1::9".parse().unwrap(),
            ..sw("203.0.113.1", 2, 4, 6)
        };
        for s in [moved, sw("203.0.113.1", 3, 4, 6)] {
            new.insert(s).unwrap();
        }
        let d = old.diff(&new);
        assert_eq!(d.write, vec![moved, sw("203.0.113.1", 3, 4, 6)]);
        assert_eq!(d.remove, vec![sw("203.0.113.1", 1, 4, 6)]);
        assert_eq!(old.diff(&old), Diff::default());
    }
}
