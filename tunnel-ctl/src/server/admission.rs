//! Admission of new connections per source address: at most `--max-per-source` at once, and
//! at most `--max-connect-rate` new ones per second (token bucket, bursts of twice the rate).
//! One noisy source is refused with 110; everyone else is unaffected.
use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        Mutex,
        atomic::{AtomicU32, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

/// Above this many tracked sources, idle ones are swept (at most once a second).
const SWEEP_ABOVE: usize = 4096;

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    TooMany(usize),
    TooFast(u32),
}

struct Source {
    conns: usize,
    tokens: f64,
    last: Instant,
}

pub struct Admission {
    max_per_source: AtomicUsize,
    rate: AtomicU32,
    state: Mutex<(HashMap<IpAddr, Source>, Instant)>,
}

impl Admission {
    /// 0 means no limit, for either.
    pub fn new(max_per_source: usize, rate: u32) -> Admission {
        Admission {
            max_per_source: AtomicUsize::new(max_per_source),
            rate: AtomicU32::new(rate),
            state: Mutex::new((HashMap::new(), Instant::now())),
        }
    }

    /// New limits (a reload); connections already admitted stay.
    pub fn set_limits(&self, max_per_source: usize, rate: u32) {
        self.max_per_source.store(max_per_source, Ordering::Relaxed);
        self.rate.store(rate, Ordering::Relaxed);
    }

    fn max_per_source(&self) -> usize {
        self.max_per_source.load(Ordering::Relaxed)
    }

    fn rate(&self) -> u32 {
        self.rate.load(Ordering::Relaxed)
    }

    fn burst(&self) -> f64 {
        f64::from(self.rate().max(1)) * 2.0
    }

    /// Counts a new connection from `ip`, or says why not. An admitted connection must be
    /// [`Admission::release`]d when it ends.
    pub fn admit(&self, ip: IpAddr, now: Instant) -> Result<(), Refusal> {
        if self.max_per_source() == 0 && self.rate() == 0 {
            return Ok(());
        }
        let burst = self.burst();
        let mut guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (sources, last_sweep) = &mut *guard;
        if sources.len() > SWEEP_ABOVE && now.duration_since(*last_sweep) > Duration::from_secs(1) {
            let rate = f64::from(self.rate());
            sources.retain(|_, s| {
                s.conns > 0 || s.tokens + rate * now.duration_since(s.last).as_secs_f64() < burst
            });
            *last_sweep = now;
        }
        let s = sources.entry(ip).or_insert(Source {
            conns: 0,
            tokens: burst,
            last: now,
        });
        let (max, rate) = (self.max_per_source(), self.rate());
        if max != 0 && s.conns >= max {
            return Err(Refusal::TooMany(max));
        }
        if rate != 0 {
            let refill = f64::from(rate) * now.duration_since(s.last).as_secs_f64();
            s.tokens = (s.tokens + refill).min(burst);
            s.last = now;
            if s.tokens < 1.0 {
                return Err(Refusal::TooFast(rate));
            }
            s.tokens -= 1.0;
        }
        s.conns += 1;
        Ok(())
    }

    /// An admitted connection from `ip` ended.
    pub fn release(&self, ip: IpAddr) {
        if self.max_per_source() == 0 && self.rate() == 0 {
            return;
        }
        let mut guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = guard.0.get_mut(&ip) {
            s.conns = s.conns.saturating_sub(1);
        }
    }

    /// Sources tracked now (for tests and status).
    pub fn tracked(&self) -> usize {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).0.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([
            0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, last,
        ])
    }

    #[test]
    fn caps_concurrent_connections_per_source() {
        let a = Admission::new(2, 0);
        let now = Instant::now();
        assert_eq!(a.admit(ip(1), now), Ok(()));
        assert_eq!(a.admit(ip(1), now), Ok(()));
        assert_eq!(a.admit(ip(1), now), Err(Refusal::TooMany(2)));
        assert_eq!(a.admit(ip(2), now), Ok(()), "another source is unaffected");
        a.release(ip(1));
        assert_eq!(a.admit(ip(1), now), Ok(()));
    }

    #[test]
    fn limits_the_connect_rate_with_bursts_of_twice_the_rate() {
        let a = Admission::new(0, 5);
        let now = Instant::now();
        for _ in 0..10 {
            assert_eq!(a.admit(ip(1), now), Ok(()));
            a.release(ip(1));
        }
        assert_eq!(a.admit(ip(1), now), Err(Refusal::TooFast(5)));
        assert_eq!(a.admit(ip(2), now), Ok(()));
        // 200 ms later one token (5/s) is back.
        let later = now + Duration::from_millis(200);
        assert_eq!(a.admit(ip(1), later), Ok(()));
        assert_eq!(a.admit(ip(1), later), Err(Refusal::TooFast(5)));
    }

    #[test]
    fn idle_sources_are_forgotten() {
        let a = Admission::new(4, 100);
        let now = Instant::now();
        for i in 0..=SWEEP_ABOVE as u32 {
            let addr = IpAddr::from(
                (0x2001_0db8_0000_0000_0000_0000_0000_0000u128 | u128::from(i)).to_be_bytes(),
            );
            a.admit(addr, now).unwrap();
            a.release(addr);
        }
        assert!(a.tracked() > SWEEP_ABOVE);
        a.admit(ip(1), now + Duration::from_secs(5)).unwrap();
        assert_eq!(a.tracked(), 1, "only the connected source is left");
    }
}
