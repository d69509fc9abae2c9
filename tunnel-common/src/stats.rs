//! Packet counters kept by the eBPF programs in the per-CPU [`crate::names::STATS_MAP`].
//!
//! Each counter is one slot of the array; the controller sums the slot over all CPUs and reports
//! it under [`Counter::name`].

macro_rules! counters {
    ($( $(#[$doc:meta])* $variant:ident = $name:literal, )*) => {
        /// One counter slot. The discriminant is the index in the stats map.
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Counter {
            $( $(#[$doc])* $variant, )*
        }

        impl Counter {
            /// Every counter, in index order.
            pub const ALL: &'static [Counter] = &[$(Counter::$variant),*];

            /// The name under which `tunnel-ctl stats` reports this counter.
            pub const fn name(self) -> &'static str {
                match self {
                    $(Counter::$variant => $name,)*
                }
            }
        }
    };
}

counters! {
    /// IPv4 packets seen by a monitor program on ingress.
    MonitorIngressIpv4 = "monitor_ingress_ipv4",
    /// IPv6 packets seen by a monitor program on ingress.
    MonitorIngressIpv6 = "monitor_ingress_ipv6",
    /// Other frames (ARP, LLDP, ...) seen by a monitor program on ingress.
    MonitorIngressOther = "monitor_ingress_other",
    /// IPv4 packets seen by a monitor program on egress.
    MonitorEgressIpv4 = "monitor_egress_ipv4",
    /// IPv6 packets seen by a monitor program on egress.
    MonitorEgressIpv6 = "monitor_egress_ipv6",
    /// Other frames seen by a monitor program on egress.
    MonitorEgressOther = "monitor_egress_other",
}

/// Number of slots in the stats map.
pub const COUNTER_COUNT: u32 = Counter::ALL.len() as u32;

impl Counter {
    /// Index of this counter in the stats map.
    pub const fn index(self) -> u32 {
        self as u32
    }

    /// The counter with the given name, if any.
    pub fn from_name(name: &str) -> Option<Counter> {
        Counter::ALL.iter().copied().find(|c| c.name() == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indices_are_dense_and_names_unique() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(c.index() as usize, i);
            assert_eq!(Counter::from_name(c.name()), Some(*c));
        }
        for (i, a) in Counter::ALL.iter().enumerate() {
            for b in &Counter::ALL[i + 1..] {
                assert_ne!(a.name(), b.name());
            }
        }
    }
}
