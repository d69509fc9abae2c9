//! The next-hop cache's I/O (`tunnel_common::nexthop` says what it is, `crate::nexthop`
//! decides): its maps, the resolver program that asks the FIB helper, and the task that
//! answers the programs' misses and retires every entry when the kernel's routing state
//! changes. Each role's data-plane handle takes one from its object; this is the only code
//! that writes these maps.
use std::{
    net::{IpAddr, Ipv6Addr},
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{
    Ebpf,
    maps::{Array, Map, MapData, RingBuf},
    programs::{SchedClassifier, TestRun as _, TestRunOptions},
};
use tokio::{io::unix::AsyncFd, task::JoinHandle};
use tracing::{debug, info, warn};
use tunnel_common::{
    fastpath::TunnelConfig,
    names::{
        CLOCK, NEXTHOP_MISSES, NEXTHOP_STATE, NEXTHOPS_V4, NEXTHOPS_V6, PROG_NEXTHOP_RESOLVE,
        TUNNEL_CONFIG,
    },
    nexthop::{
        Clock, MAX_NEXTHOPS, NEXTHOP_QUERY_OFF, NEXTHOP_WAYS, NH_CACHE_V4, NH_CACHE_V6, NH_FORWARD,
        NH_KERNEL, NextHop, NextHopMiss, NextHopQuery, NextHopSlot, NextHopState, set_base,
    },
};

use super::fastpath::take;
use crate::{
    netlink::{self, Netlink, OutputHop, RoutingEvent},
    nexthop::{Family, Misses, Neighbours, Placement, SlotHolds, cacheable},
};

/// `bpf_fib_lookup` flags and return codes (uapi/linux/bpf.h).
const BPF_FIB_LOOKUP_OUTPUT: u32 = 1 << 1;
const BPF_FIB_LKUP_RET_SUCCESS: u32 = 0;
const BPF_FIB_LKUP_RET_FWD_DISABLED: u32 = 5;
const BPF_FIB_LKUP_RET_NO_NEIGH: u32 = 7;
const BPF_FIB_LKUP_RET_FRAG_NEEDED: u32 = 8;

/// How long the entries stay usable without the controller confirming it is alive (it does
/// every second): a controller that died leaves the fast path on the FIB after this.
pub const VALIDITY: Duration = Duration::from_secs(3);

crate::counters! {
    pub struct NextHopStats {
        /// Misses reported by the programs and read by the controller.
        nexthop_misses_reported,
        /// Destinations resolved into an entry the programs use.
        nexthop_resolved,
        /// Resolutions that gave nothing to cache (no neighbour yet, an error).
        nexthop_unresolved,
        /// Times every entry was retired at once (a routing change, a lost event).
        nexthop_invalidations,
    }
}

/// What resolving a destination gave.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resolved {
    /// An entry the programs forward with.
    Forward(NextHop),
    /// An entry that sends the packets to the kernel (the FIB's return code).
    Kernel(u32),
    /// Nothing cached: no neighbour yet, or a packet too big (the FIB's return code).
    Nothing(u32),
}

pub struct NextHops {
    v4: Cache,
    v6: Cache,
    state: Array<MapData, NextHopState>,
    misses: Option<RingBuf<MapData>>,
    resolver: SchedClassifier,
    /// `jiffies` as CLOCK_MONOTONIC ns for the programs.
    clock_map: Array<MapData, Clock>,
    /// The object's configuration (read only: its interfaces and tunnel address are the
    /// questions' parameters).
    config: Array<MapData, TunnelConfig>,
    current: NextHopState,
    /// Whether the task has said what it does yet.
    started: bool,
    clock: JiffyClock,
    pub stats: Arc<NextHopStats>,
}

impl NextHops {
    /// Takes the cache's maps and program out of a loaded object whose maps are pinned in
    /// `pin_dir`. The cache starts off (the programs ask the FIB) and empty.
    pub fn take(ebpf: &mut Ebpf, pin_dir: &Path) -> Result<NextHops> {
        let program: &mut SchedClassifier = ebpf
            .program_mut(PROG_NEXTHOP_RESOLVE)
            .with_context(|| format!("eBPF object has no program {PROG_NEXTHOP_RESOLVE}"))?
            .try_into()?;
        if program.fd().is_err() {
            program
                .load()
                .with_context(|| format!("loading {PROG_NEXTHOP_RESOLVE}"))?;
        }
        let resolver =
            SchedClassifier::from_program_info(program.info()?, PROG_NEXTHOP_RESOLVE.into())
                .with_context(|| format!("opening {PROG_NEXTHOP_RESOLVE}"))?;
        let config_pin = pin_dir.join(TUNNEL_CONFIG);
        let config = MapData::from_pin(&config_pin)
            .with_context(|| format!("opening {}", config_pin.display()))?;
        let config = Array::try_from(Map::Array(config))?;
        let mut state: Array<MapData, NextHopState> = take(ebpf, NEXTHOP_STATE)?;
        let previous = state.get(&0, 0).unwrap_or_default();
        let current = NextHopState {
            generation: previous.generation.wrapping_add(1),
            enabled: 0,
            valid_until_jiffies: 0,
        };
        state.set(0, current, 0).context("writing NEXTHOP_STATE")?;
        Ok(NextHops {
            v4: Cache::new(take(ebpf, NEXTHOPS_V4)?),
            v6: Cache::new(take(ebpf, NEXTHOPS_V6)?),
            state,
            misses: Some(take(ebpf, NEXTHOP_MISSES)?),
            clock_map: take(ebpf, CLOCK)?,
            resolver,
            config,
            current,
            started: false,
            clock: JiffyClock::default(),
            stats: Arc::default(),
        })
    }

    /// The generation entries must carry now.
    pub fn generation(&self) -> u32 {
        self.current.generation
    }

    /// Whether the programs use the cache for IPv4 and for IPv6.
    pub fn enabled(&self) -> (bool, bool) {
        (
            self.current.enabled & NH_CACHE_V4 != 0,
            self.current.enabled & NH_CACHE_V6 != 0,
        )
    }

    fn write_state(&mut self) -> Result<()> {
        self.state
            .set(0, self.current, 0)
            .context("writing NEXTHOP_STATE")
    }

    /// Turns the cache on or off per family.
    pub fn set_enabled(&mut self, v4: bool, v6: bool) -> Result<()> {
        let enabled = if v4 { NH_CACHE_V4 } else { 0 } | if v6 { NH_CACHE_V6 } else { 0 };
        if enabled != self.current.enabled {
            self.current.enabled = enabled;
            self.write_state()?;
        }
        Ok(())
    }

    /// Lets the programs use the entries for `validity` from now, and keeps their
    /// `jiffies` clock ([`Clock`]) in step with CLOCK_MONOTONIC.
    pub fn keep_valid(&mut self, validity: Duration) -> Result<()> {
        let before = mono_ns();
        let now = self.ask_kernel(NextHopQuery::default())?.jiffies;
        let mono = before / 2 + mono_ns() / 2;
        let hz = self.clock.hz(Instant::now(), now);
        self.current.valid_until_jiffies = now + (validity.as_secs_f64() * hz).ceil() as u64;
        self.write_state()?;
        if let Some(hz) = self.clock.known_hz() {
            let ns_per_jiffy = 1_000_000_000 / hz;
            let clock = Clock {
                ns_per_jiffy,
                offset_ns: mono.wrapping_sub(now.wrapping_mul(ns_per_jiffy)),
            };
            self.clock_map.set(0, clock, 0).context("writing CLOCK")?;
        }
        Ok(())
    }

    /// Retires every entry at once.
    pub fn invalidate(&mut self) -> Result<()> {
        self.current.generation = self.current.generation.wrapping_add(1);
        self.stats.nexthop_invalidations.inc();
        self.write_state()
    }

    /// Asks the FIB helper (through the resolver program, in this network namespace) what the
    /// data path gets for `dst`, with the questions the programs ask: IPv4 as forwarded from
    /// the IPv6 side's interface, IPv6 as sent out of it from the tunnel address.
    pub fn ask(&self, dst: IpAddr) -> Result<NextHopQuery> {
        let cfg = self.config.get(&0, 0).context("reading TUNNEL_CONFIG")?;
        let mut q = NextHopQuery {
            ifindex: cfg.v6_ifindex,
            ..Default::default()
        };
        match dst {
            IpAddr::V4(a) => {
                q.family = 4;
                q.dst[..4].copy_from_slice(&a.octets());
            }
            IpAddr::V6(a) => {
                q.family = 6;
                q.flags = BPF_FIB_LOOKUP_OUTPUT;
                q.src = cfg.local;
                q.dst = a.octets();
            }
        }
        self.ask_kernel(q)
    }

    /// Runs the resolver program on `q` (family 0: only the clock is read).
    fn ask_kernel(&self, q: NextHopQuery) -> Result<NextHopQuery> {
        let mut packet = vec![0u8; NEXTHOP_QUERY_OFF + size_of::<NextHopQuery>()];
        let proto: u16 = if q.family == 6 { 0x86dd } else { 0x0800 };
        packet[12..14].copy_from_slice(&proto.to_be_bytes());
        // SAFETY: NextHopQuery is plain old data without padding.
        let bytes: &[u8] =
            unsafe { std::slice::from_raw_parts((&raw const q).cast(), size_of::<NextHopQuery>()) };
        packet[NEXTHOP_QUERY_OFF..].copy_from_slice(bytes);
        let mut out = vec![0u8; packet.len() + 64];
        let opts = TestRunOptions {
            data_in: Some(&packet),
            data_out: Some(&mut out),
            ..Default::default()
        };
        let run = self
            .resolver
            .test_run(opts)
            .context("running the next-hop resolver")?;
        if run.return_value != 0 {
            bail!(
                "the next-hop resolver refused the question (verdict {})",
                run.return_value
            );
        }
        let answer = out
            .get(NEXTHOP_QUERY_OFF..NEXTHOP_QUERY_OFF + size_of::<NextHopQuery>())
            .ok_or_else(|| anyhow!("the next-hop resolver's answer is short"))?;
        // SAFETY: the slice holds a whole NextHopQuery; read unaligned into a copy.
        Ok(unsafe { std::ptr::read_unaligned(answer.as_ptr().cast()) })
    }

    /// Resolves `dst` and writes what the programs should use, in the current generation.
    pub fn resolve(&mut self, dst: IpAddr) -> Result<Resolved> {
        let generation = self.current.generation;
        let q = self.ask(dst)?;
        let entry = match q.rc {
            BPF_FIB_LKUP_RET_SUCCESS => NextHop {
                generation,
                kind: NH_FORWARD,
                ..q.answer
            },
            BPF_FIB_LKUP_RET_NO_NEIGH | BPF_FIB_LKUP_RET_FRAG_NEEDED | u32::MAX => {
                self.stats.nexthop_unresolved.inc();
                return Ok(Resolved::Nothing(q.rc));
            }
            // Blackhole, unreachable, prohibit, local, forwarding off, tunnel routes: the
            // kernel's.
            _ => NextHop {
                generation,
                kind: NH_KERNEL,
                ..Default::default()
            },
        };
        self.cache(dst)
            .insert(dst, entry)
            .with_context(|| format!("writing the next hop of {dst}"))?;
        self.stats.nexthop_resolved.inc();
        Ok(if entry.kind == NH_FORWARD {
            Resolved::Forward(entry)
        } else {
            Resolved::Kernel(q.rc)
        })
    }

    /// As [`NextHops::resolve`]; where the FIB helper refuses an IPv6 question because the
    /// interface does not forward IPv6 (a client host, a server that forwards IPv4 only),
    /// the output path's answer from rtnetlink instead: the programs only send from our own
    /// tunnel address there, as the host's own output would.
    pub async fn resolve_with(&mut self, dst: IpAddr, nl: &Netlink) -> Result<Resolved> {
        let generation = self.current.generation;
        let first = self.resolve(dst)?;
        let (IpAddr::V6(v6), Resolved::Kernel(BPF_FIB_LKUP_RET_FWD_DISABLED)) = (dst, first) else {
            return Ok(first);
        };
        let cfg = self.config.get(&0, 0).context("reading TUNNEL_CONFIG")?;
        let hop = nl
            .output_hop_v6(v6, Ipv6Addr::from(cfg.local), cfg.v6_ifindex)
            .await?;
        let entry = match hop {
            OutputHop::Forward {
                ifindex,
                dmac,
                smac,
                mtu,
            } => {
                let mut eth = [0u8; 16];
                eth[2..8].copy_from_slice(&dmac);
                eth[8..14].copy_from_slice(&smac);
                eth[14..].copy_from_slice(&0x86ddu16.to_be_bytes());
                NextHop {
                    eth,
                    ifindex,
                    mtu,
                    generation,
                    kind: NH_FORWARD,
                }
            }
            OutputHop::Kernel => return Ok(first),
            OutputHop::Unresolved => {
                // The refusal written above would keep the programs off the cache: gone.
                let _ = self.v6.remove(dst);
                self.stats.nexthop_unresolved.inc();
                return Ok(Resolved::Nothing(BPF_FIB_LKUP_RET_NO_NEIGH));
            }
        };
        self.v6
            .insert(dst, entry)
            .with_context(|| format!("writing the next hop of {dst}"))?;
        Ok(Resolved::Forward(entry))
    }

    /// The misses the programs reported since the last call (for a cache that is not
    /// [spawned](NextHops::spawn): tests and the bench).
    pub fn reported(&mut self) -> Vec<(Family, IpAddr)> {
        self.misses.as_mut().map(drain).unwrap_or_default()
    }

    /// The entry the programs would use for `dst` now, if any.
    pub fn current_entry(&self, dst: IpAddr) -> Option<NextHop> {
        let cache = match dst {
            IpAddr::V4(_) => &self.v4,
            IpAddr::V6(_) => &self.v6,
        };
        let generation = self.current.generation;
        cache
            .slots(dst)
            .into_iter()
            .flatten()
            .find(|(_, s)| s.addr == key_of(dst) && s.hop.generation == generation)
            .map(|(_, s)| s.hop)
    }

    fn cache(&mut self, dst: IpAddr) -> &mut Cache {
        match dst {
            IpAddr::V4(_) => &mut self.v4,
            IpAddr::V6(_) => &mut self.v6,
        }
    }

    /// Runs the cache for the rest of the daemon's life: turns it on where it can give the
    /// FIB's answer, resolves what the programs report, retires it on every routing change
    /// (within one netlink event of it) and keeps it valid every second. On any failure it
    /// turns the cache off (the programs then ask the FIB, as without it) and says so.
    pub fn spawn(mut self, nl: Netlink) -> NextHopTask {
        let stats = self.stats.clone();
        let task = tokio::spawn(async move {
            if let Err(e) = self.run(&nl).await {
                warn!("next-hop cache stopped, the fast path asks the FIB for every packet: {e:#}");
                let _ = self.set_enabled(false, false);
            }
        });
        NextHopTask { task, stats }
    }

    async fn run(&mut self, nl: &Netlink) -> Result<()> {
        let mut events = netlink::watch_routing()?;
        let mut neighbours = Neighbours::default();
        for (ifindex, addr, n) in nl.neighbours().await? {
            neighbours.changed(ifindex, addr, n);
        }
        self.recheck(nl).await?;
        self.keep_valid(VALIDITY)?;
        let mut forwarding = self.forwarding_sysctls();
        let ring = self
            .misses
            .take()
            .ok_or_else(|| anyhow!("the miss ring is already read"))?;
        // SAFETY: the ring owns its descriptor, which stays open and the same for as long as
        // the AsyncFd (its owner) lives.
        let mut ring =
            unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
                .map_err(|e| anyhow!("watching {NEXTHOP_MISSES}: {e}"))?;
        let mut misses = Misses::default();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut routes_changed = false;
        loop {
            tokio::select! {
                event = events.recv() => {
                    let Some(event) = event else { bail!("the rtnetlink event stream ended") };
                    // One retirement for a burst of changes.
                    let mut retire = false;
                    let mut rules_changed = false;
                    let mut next = Some(event);
                    while let Some(event) = next {
                        match event {
                            RoutingEvent::Neighbour(i, a, n) => retire |= neighbours.changed(i, a, n),
                            RoutingEvent::NeighbourGone(i, a) => retire |= neighbours.removed(i, a),
                            RoutingEvent::Changed(what) => {
                                debug!("next-hop cache: {what} changed");
                                retire = true;
                                rules_changed |= what == "rule";
                                routes_changed |= what == "route";
                            }
                            RoutingEvent::Overrun => {
                                warn!("next-hop cache: rtnetlink events were lost; retiring every entry");
                                retire = true;
                                rules_changed = true;
                            }
                        }
                        next = events.try_recv().ok();
                    }
                    if retire {
                        self.invalidate()?;
                    }
                    if rules_changed {
                        self.recheck(nl).await?;
                    }
                }
                guard = ring.readable_mut() => {
                    let mut guard = guard?;
                    let reported = drain(guard.get_inner_mut());
                    guard.clear_ready();
                    let now = Instant::now();
                    for (family, addr) in reported {
                        self.stats.nexthop_misses_reported.inc();
                        let key = key_of(addr);
                        let generation = self.current.generation;
                        if !misses.take(family, key, generation, now) {
                            continue;
                        }
                        let cached = match self.resolve_with(addr, nl).await {
                            Ok(Resolved::Forward(_) | Resolved::Kernel(_)) => true,
                            Ok(Resolved::Nothing(_)) => false,
                            Err(e) => {
                                debug!("next-hop cache: resolving {addr}: {e:#}");
                                false
                            }
                        };
                        misses.resolved(family, key, generation, now, cached);
                    }
                }
                _ = tick.tick() => {
                    self.keep_valid(VALIDITY)?;
                    let now = self.forwarding_sysctls();
                    if now != forwarding {
                        debug!("next-hop cache: forwarding settings changed");
                        forwarding = now;
                        self.invalidate()?;
                    }
                    if routes_changed {
                        routes_changed = false;
                        self.recheck(nl).await?;
                    }
                    misses.forget_older_than(Instant::now(), Duration::from_secs(10));
                }
            }
        }
    }

    /// Turns the cache on for the families where the destination alone decides the FIB's
    /// answer, off elsewhere.
    async fn recheck(&mut self, nl: &Netlink) -> Result<()> {
        let (rules, routes) = (nl.rules().await?, nl.route_shapes().await?);
        let (v4, v6) = cacheable(&rules, &routes);
        let (on4, on6) = (v4.is_none(), v6.is_none());
        if (on4, on6) != self.enabled() || !self.started {
            self.started = true;
            let state = |why: Option<String>| match why {
                None => "on".to_owned(),
                Some(why) => format!("off ({why}: the FIB answers every packet)"),
            };
            info!("next-hop cache: IPv4 {}, IPv6 {}", state(v4), state(v6));
        }
        self.set_enabled(on4, on6)
    }

    /// The forwarding settings the FIB helper checks for the questions we ask (the IPv6
    /// side's interface, IPv4 and IPv6), as read now.
    fn forwarding_sysctls(&self) -> Vec<String> {
        let Ok(cfg) = self.config.get(&0, 0) else {
            return Vec::new();
        };
        let Ok(name) = nix::net::if_::if_indextoname(cfg.v6_ifindex) else {
            return Vec::new();
        };
        let name = name.to_string_lossy().into_owned();
        ["ipv4", "ipv6"]
            .iter()
            .flat_map(|family| {
                ["all".to_string(), name.clone()].map(|dev| {
                    std::fs::read_to_string(format!("/proc/sys/net/{family}/conf/{dev}/forwarding"))
                        .unwrap_or_default()
                })
            })
            .collect()
    }
}

/// One family's map: an array the programs read as a two-way set-associative cache
/// (`tunnel_common::nexthop::set_base`); where an entry goes in its set is
/// [`Placement`]'s decision.
struct Cache {
    map: Array<MapData, NextHopSlot>,
    placement: Placement,
}

/// A destination as the maps hold it: the IPv6 address, or the IPv4 one in the first four
/// bytes.
fn key_of(dst: IpAddr) -> [u8; 16] {
    match dst {
        IpAddr::V4(a) => {
            let mut k = [0u8; 16];
            k[..4].copy_from_slice(&a.octets());
            k
        }
        IpAddr::V6(a) => a.octets(),
    }
}

/// The first slot of `dst`'s set, as the programs compute it (the address's bytes as
/// native-endian words).
fn set_of(dst: IpAddr) -> u32 {
    let k = key_of(dst);
    let word = |i: usize| u64::from_ne_bytes(k[i..i + 8].try_into().expect("8 bytes"));
    set_base([word(0), word(8)])
}

impl Cache {
    fn new(map: Array<MapData, NextHopSlot>) -> Cache {
        Cache {
            map,
            placement: Placement::new((MAX_NEXTHOPS / NEXTHOP_WAYS) as usize),
        }
    }

    /// The slots of `dst`'s set with their indices (None: unreadable).
    fn slots(&self, dst: IpAddr) -> [Option<(u32, NextHopSlot)>; 2] {
        let base = set_of(dst);
        [base, base + 1].map(|i| self.map.get(&i, 0).ok().map(|s| (i, s)))
    }

    /// Writes `hop` for `dst` into its set.
    fn insert(&mut self, dst: IpAddr, hop: NextHop) -> Result<()> {
        let key = key_of(dst);
        let slots = self.slots(dst).map(|s| match s {
            Some((_, s)) if s.addr == key => SlotHolds::ThisDestination,
            Some((_, s)) if s.hop.generation == hop.generation && s.hop.kind != 0 => {
                SlotHolds::Other
            }
            _ => SlotHolds::Free,
        });
        let base = set_of(dst);
        let way = self.placement.choose((base / NEXTHOP_WAYS) as usize, slots);
        self.map
            .set(base + way as u32, NextHopSlot { addr: key, hop }, 0)?;
        Ok(())
    }

    /// Empties the slot holding `dst`, if one does.
    fn remove(&mut self, dst: IpAddr) -> Result<()> {
        let key = key_of(dst);
        for (i, slot) in self.slots(dst).into_iter().flatten() {
            if slot.addr == key {
                self.map.set(i, NextHopSlot::default(), 0)?;
            }
        }
        Ok(())
    }
}

/// Takes the cache out of a role's freshly loaded object and runs it (see
/// [`NextHops::spawn`]); the role's handle keeps the result for as long as it runs.
pub fn start(ebpf: &mut Ebpf, pin_dir: &Path) -> Result<NextHopTask> {
    let nexthops = NextHops::take(ebpf, pin_dir)?;
    Ok(nexthops.spawn(Netlink::connect()?))
}

/// The running cache: its task stops when this is dropped.
pub struct NextHopTask {
    task: JoinHandle<()>,
    pub stats: Arc<NextHopStats>,
}

impl NextHopTask {
    /// The eBPF counters `base` with the cache's own (`nexthop_*`) added.
    pub fn with_counters(&self, mut base: super::stats::Counters) -> super::stats::Counters {
        base.extend(self.stats.snapshot());
        base
    }
}

impl Drop for NextHopTask {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The misses in the ring now.
fn drain(ring: &mut RingBuf<MapData>) -> Vec<(Family, IpAddr)> {
    let mut out = Vec::new();
    while let Some(item) = ring.next() {
        if item.len() < size_of::<NextHopMiss>() {
            continue;
        }
        // SAFETY: the record is a NextHopMiss written by the programs (size checked); read
        // unaligned into a copy.
        let miss: NextHopMiss = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
        match miss.family {
            4 => {
                let a = [miss.addr[0], miss.addr[1], miss.addr[2], miss.addr[3]];
                out.push((Family::V4, IpAddr::from(a)));
            }
            6 => out.push((Family::V6, IpAddr::V6(Ipv6Addr::from(miss.addr)))),
            _ => {}
        }
    }
    out
}

/// CLOCK_MONOTONIC in ns.
fn mono_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// The kernel's tick rate as seen from here: `jiffies` against our clock since the first
/// reading. Until a second has passed it says 1,000 (the highest usual CONFIG_HZ), which
/// makes a validity longer in real time on a slower kernel, never shorter than asked.
#[derive(Debug, Default)]
struct JiffyClock {
    first: Option<(Instant, u64)>,
    measured: Option<f64>,
}

impl JiffyClock {
    fn hz(&mut self, now: Instant, jiffies: u64) -> f64 {
        let (t0, j0) = *self.first.get_or_insert((now, jiffies));
        let secs = now.duration_since(t0).as_secs_f64();
        if secs < 1.0 {
            return 1000.0;
        }
        let hz = (jiffies.saturating_sub(j0) as f64 / secs).max(1.0);
        self.measured = Some(hz);
        hz
    }

    /// The kernel's CONFIG_HZ, once a second of measuring names one of the usual values.
    fn known_hz(&self) -> Option<u64> {
        let hz = self.measured?;
        [100u64, 250, 300, 1000]
            .into_iter()
            .find(|&c| (hz - c as f64).abs() < c as f64 * 0.05)
    }
}
