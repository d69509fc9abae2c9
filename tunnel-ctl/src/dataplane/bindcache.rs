//! The server's binding cache (`BIND_CACHE`): part of `BIND_BY_V6` in a two-way
//! set-associative array, so that the decap programs find a client's lease with a few loads
//! instead of hashing its 16-byte address (SPEC §9; about 20 ns of the XDP program's 180).
//!
//! The controller is its only writer, through a shared mapping of the map (an array map made
//! `BPF_F_MMAPABLE`): a syscall update copies the value with no atomicity, and a program that
//! read half an old and half a new entry could accept a spoofed source. Each entry is a
//! seqlock instead (`tunnel_common::fastpath::BindCacheEntry`): `seq` odd, the fields, `seq`
//! even, with release ordering; the programs use an entry only when they read the same even
//! `seq` before and after it.
//!
//! The cache only ever holds what `BIND_BY_V6` holds: an entry goes in after its hash entry
//! and out before it, and [`BindCache::rebuild`] starts a new controller from the hash alone.
//! A client whose set is full is not cached, and the programs hash for it as before.
use std::{
    os::fd::{AsFd as _, AsRawFd as _},
    ptr::NonNull,
    sync::atomic::{AtomicU32, AtomicU64, Ordering, fence},
};

use anyhow::{Context as _, Result, bail};
use aya::maps::{Array, IterableMap as _, MapData};
use tunnel_common::{
    fastpath::{BIND_CACHE_WAYS, BindCacheEntry, Binding4, Ipv6Key, bind_cache_base, words16},
    names::BIND_CACHE,
};

/// The mapped cache.
pub struct BindCache {
    /// Holds the map's descriptor for as long as the mapping lives.
    _map: Array<MapData, BindCacheEntry>,
    base: NonNull<BindCacheEntry>,
    entries: u32,
    mapped_len: usize,
}

// SAFETY: the mapping belongs to this value alone (its only writer); moving it to another
// thread moves that ownership.
unsafe impl Send for BindCache {}

impl BindCache {
    /// Maps `map` (created with `BPF_F_MMAPABLE`) for writing.
    pub fn new(map: Array<MapData, BindCacheEntry>) -> Result<BindCache> {
        let entries = map.len();
        if !entries.is_power_of_two() {
            bail!("{BIND_CACHE} has {entries} entries, not a power of two");
        }
        let len = entries as usize * size_of::<BindCacheEntry>();
        // SAFETY: page size query.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let mapped_len = len.div_ceil(page) * page;
        let fd = map.map().fd().as_fd().as_raw_fd();
        // SAFETY: a new shared mapping of the map's values; nothing else in this process
        // refers to that memory.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                mapped_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("mapping {BIND_CACHE} ({entries} entries)"));
        }
        let base = NonNull::new(p.cast()).context("mmap returned null")?;
        Ok(BindCache {
            _map: map,
            base,
            entries,
            mapped_len,
        })
    }

    /// log2 of the entries, for `TunnelConfig::bind_cache_bits`; 0 (no cache) when the map
    /// has a single set (a server without native clients).
    pub fn bits(&self) -> u8 {
        if self.entries <= BIND_CACHE_WAYS {
            0
        } else {
            self.entries.trailing_zeros() as u8
        }
    }

    /// The words of entry `i` (aligned: the map's values start on a page, and each is 32
    /// bytes).
    fn words(&self, i: u32) -> Words<'_> {
        assert!(i < self.entries);
        // SAFETY: within the mapping; the memory lives as long as `self`, and is only accessed
        // atomically (the programs read it concurrently).
        unsafe {
            let e = self.base.as_ptr().add(i as usize).cast::<u8>();
            Words {
                seq: &*e.cast::<AtomicU32>(),
                slot: &*e.add(4).cast::<AtomicU32>(),
                client: [
                    &*e.add(8).cast::<AtomicU64>(),
                    &*e.add(16).cast::<AtomicU64>(),
                ],
                tail: &*e.add(24).cast::<AtomicU64>(),
            }
        }
    }

    /// The entries of `client`'s set.
    pub fn set_of(&self, client: &Ipv6Key) -> std::ops::Range<u32> {
        let base = bind_cache_base(words16(client), self.bits());
        base..base + BIND_CACHE_WAYS
    }

    /// Caches `client` → `b` (replacing its entry if it has one). False: its set is full,
    /// and the programs keep hashing for it.
    pub fn put(&mut self, client: &Ipv6Key, b: &Binding4) -> bool {
        if self.bits() == 0 {
            return false;
        }
        let set = self.set_of(client);
        let place = set
            .clone()
            .find(|&i| self.read(i).is_some_and(|e| e.client == *client))
            .or_else(|| set.clone().find(|&i| self.read(i).is_none()));
        let Some(i) = place else {
            return false;
        };
        self.write(
            i,
            &BindCacheEntry {
                seq: 0,
                slot: b.slot,
                client: *client,
                ipv4: b.ipv4,
                psid: b.psid,
                psid_len: b.psid_len,
                live: 1,
            },
        );
        true
    }

    /// Removes `client`'s entry, if it has one.
    pub fn remove(&mut self, client: &Ipv6Key) {
        if self.bits() == 0 {
            return;
        }
        for i in self.set_of(client) {
            if self.read(i).is_some_and(|e| e.client == *client) {
                self.write(i, &BindCacheEntry::default());
            }
        }
    }

    /// What the cache says of `client` (None: not cached).
    pub fn get(&self, client: &Ipv6Key) -> Option<Binding4> {
        if self.bits() == 0 {
            return None;
        }
        self.set_of(client)
            .filter_map(|i| self.read(i))
            .find(|e| e.client == *client)
            .map(|e| Binding4 {
                ipv4: e.ipv4,
                psid: e.psid,
                psid_len: e.psid_len,
                psid_offset: 0,
                slot: e.slot,
            })
    }

    /// Empties the cache and fills it from `bindings` (a new controller, from the pinned
    /// `BIND_BY_V6`). Entries are emptied one by one, so the programs never see one that the
    /// hash does not hold. Returns how many bindings found a place.
    pub fn rebuild(&mut self, bindings: impl IntoIterator<Item = (Ipv6Key, Binding4)>) -> usize {
        for i in 0..self.entries {
            if self.read(i).is_some() || self.words(i).seq.load(Ordering::Relaxed) & 1 != 0 {
                self.write(i, &BindCacheEntry::default());
            }
        }
        bindings
            .into_iter()
            .filter(|(client, b)| self.put(client, b))
            .count()
    }

    /// Entry `i` when it holds a binding (the writer's own view: no concurrent write).
    fn read(&self, i: u32) -> Option<BindCacheEntry> {
        let w = self.words(i);
        let head = u64::from(w.seq.load(Ordering::Relaxed))
            | u64::from(w.slot.load(Ordering::Relaxed)) << 32;
        let e = BindCacheEntry::from_words([
            head,
            w.client[0].load(Ordering::Relaxed),
            w.client[1].load(Ordering::Relaxed),
            w.tail.load(Ordering::Relaxed),
        ]);
        (e.live != 0).then_some(e)
    }

    /// Writes entry `i` under its seqlock (`e.seq` is ignored). [`BindCache::put`] and
    /// [`BindCache::remove`] decide what goes where; tests use this to rewrite one entry in
    /// place from one client to another, which they never do.
    pub fn write(&mut self, i: u32, e: &BindCacheEntry) {
        let w = self.words(i);
        // Odd while writing; a writer that died mid-write left it odd already.
        let odd = w.seq.load(Ordering::Relaxed) | 1;
        w.seq.store(odd, Ordering::Relaxed);
        // The odd `seq` is visible before any field changes.
        fence(Ordering::Release);
        let [head, c0, c1, tail] = e.to_words();
        w.slot.store((head >> 32) as u32, Ordering::Relaxed);
        w.client[0].store(c0, Ordering::Relaxed);
        w.client[1].store(c1, Ordering::Relaxed);
        w.tail.store(tail, Ordering::Relaxed);
        // Every field is visible before the even `seq`.
        w.seq.store(odd.wrapping_add(1), Ordering::Release);
    }
}

impl Drop for BindCache {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.mapped_len) };
    }
}

struct Words<'a> {
    seq: &'a AtomicU32,
    slot: &'a AtomicU32,
    client: [&'a AtomicU64; 2],
    tail: &'a AtomicU64,
}
