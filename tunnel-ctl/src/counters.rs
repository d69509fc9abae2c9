//! Userspace counters of the daemons (sessions, frames, drops per reason). They are reported by
//! `tunnel-ctl stats` next to the eBPF counters, under the same "name → integer" shape.
use std::sync::atomic::{AtomicU64, Ordering};

/// Declares a struct of named `AtomicU64` counters with `snapshot()`.
#[macro_export]
macro_rules! counters {
    ($vis:vis struct $name:ident { $( $(#[$doc:meta])* $field:ident, )* }) => {
        #[derive(Default, Debug)]
        $vis struct $name {
            $( $(#[$doc])* pub $field: $crate::counters::Counter, )*
        }

        impl $name {
            /// Counter name → value, every counter included.
            pub fn snapshot(&self) -> std::collections::BTreeMap<&'static str, u64> {
                let mut out = std::collections::BTreeMap::new();
                $( out.insert(stringify!($field), self.$field.get()); )*
                out
            }
        }
    };
}

/// One monotonically increasing counter.
#[derive(Default, Debug)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }

    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    /// Counts one and says whether this occurrence is worth a log line: the 1st, 2nd, 4th,
    /// 8th... (a flood cannot flood the log).
    pub fn inc_and_log(&self) -> bool {
        (self.0.fetch_add(1, Ordering::Relaxed) + 1).is_power_of_two()
    }
}
