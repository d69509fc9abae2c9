//! Writing and reading many entries of a hash map in a few system calls
//! (`BPF_MAP_UPDATE_BATCH`, `BPF_MAP_LOOKUP_BATCH`, Linux 5.6): what loads a table of a
//! million softwires, or adopts one a crashed run pinned, in seconds. aya 0.14 has no batch
//! operations, so these two calls are made by hand with aya-obj's kernel bindings; on a
//! kernel without them the caller goes entry by entry.
use std::{
    io,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, OwnedFd},
};

use anyhow::{Context as _, Result, anyhow};
use aya::{
    Ebpf, Pod,
    maps::{HashMap, Map, MapData},
};
use aya_obj::generated::{bpf_attr, bpf_cmd};

/// Entries per system call: bounds the kernel's copy of the arrays.
const PER_CALL: usize = 1 << 16;

/// Takes hash map `name` out of the object, with a second descriptor of it for batches.
pub fn take_hash<K: Pod, V: Pod>(
    ebpf: &mut Ebpf,
    name: &str,
) -> Result<(HashMap<MapData, K, V>, OwnedFd)> {
    let map = ebpf
        .take_map(name)
        .ok_or_else(|| anyhow!("eBPF object has no map {name}"))?;
    let fd = match &map {
        Map::HashMap(data) => data
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .with_context(|| format!("duplicating the descriptor of map {name}"))?,
        _ => anyhow::bail!("map {name} is not a hash map"),
    };
    let map = HashMap::try_from(map).with_context(|| format!("opening map {name}"))?;
    Ok((map, fd))
}

/// Why a batch was not written.
#[derive(Debug)]
pub enum BatchError {
    /// The kernel has no batch updates for this map: nothing was written.
    Unsupported,
    /// Written up to `done` entries, then failed.
    Failed { done: usize, error: io::Error },
}

/// Writes `keys[i]` → `values[i]` (any existing entry replaced).
pub fn update<K: Pod, V: Pod>(
    fd: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
) -> Result<(), BatchError> {
    assert_eq!(keys.len(), values.len(), "one value per key");
    let mut done = 0;
    while done < keys.len() {
        let n = (keys.len() - done).min(PER_CALL);
        // SAFETY: bpf_attr is plain old data; all-zero is its "unset" value.
        let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
        // SAFETY: writing the batch member of the union (the one BPF_MAP_UPDATE_BATCH reads).
        let batch = unsafe { &mut attr.batch };
        batch.keys = keys[done..].as_ptr() as u64;
        batch.values = values[done..].as_ptr() as u64;
        batch.count = n as u32;
        batch.map_fd = fd.as_raw_fd() as u32;
        // SAFETY: the key and value arrays hold `n` entries each, of the map's key and value
        // sizes (the types are the ones the map was opened with), and outlive the call.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                bpf_cmd::BPF_MAP_UPDATE_BATCH as libc::c_long,
                &mut attr as *mut bpf_attr,
                std::mem::size_of::<bpf_attr>(),
            )
        };
        // SAFETY: as above; the kernel wrote back how many it processed.
        let written = unsafe { attr.batch.count } as usize;
        if r < 0 {
            let error = io::Error::last_os_error();
            let unsupported = matches!(
                error.raw_os_error(),
                Some(libc::EINVAL) | Some(libc::ENOTSUP) | Some(524) // ENOTSUPP
            );
            if done == 0 && written == 0 && unsupported {
                return Err(BatchError::Unsupported);
            }
            return Err(BatchError::Failed {
                done: done + written.min(n),
                error,
            });
        }
        done += n;
    }
    Ok(())
}

/// [`update`], falling back to one write per entry where batches are not supported.
pub fn update_all<K: Pod, V: Pod>(
    map: &mut HashMap<MapData, K, V>,
    fd: &OwnedFd,
    keys: &[K],
    values: &[V],
) -> Result<()> {
    match update(fd.as_fd(), keys, values) {
        Ok(()) => Ok(()),
        Err(BatchError::Unsupported) => {
            for (k, v) in keys.iter().zip(values) {
                map.insert(k, v, 0)?;
            }
            Ok(())
        }
        Err(BatchError::Failed { done, error }) => Err(anyhow!(
            "after {done} of {} entries: {error}{}",
            keys.len(),
            if error.raw_os_error() == Some(libc::E2BIG)
                || error.raw_os_error() == Some(libc::ENOSPC)
            {
                " (the map is full)"
            } else {
                ""
            }
        )),
    }
}

/// Every key of the hash map behind `fd` (values read and dropped), in a few calls; None
/// where batch lookups are not supported.
pub fn keys<K: Pod, V: Pod>(fd: BorrowedFd<'_>) -> io::Result<Option<Vec<K>>> {
    let mut out: Vec<K> = Vec::new();
    // SAFETY (zeroed): K and V are Pod (any bit pattern, including zero, is valid).
    let mut keys: Vec<K> = vec![unsafe { std::mem::zeroed() }; PER_CALL];
    let mut values: Vec<V> = vec![unsafe { std::mem::zeroed() }; PER_CALL];
    // The kernel's position between calls (a bucket index for hash maps); 8 bytes is room
    // enough for it.
    let mut token = [0u64; 1];
    let mut first = true;
    loop {
        // SAFETY: bpf_attr is plain old data; all-zero is its "unset" value.
        let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
        // SAFETY: writing the batch member of the union.
        let batch = unsafe { &mut attr.batch };
        batch.in_batch = if first { 0 } else { token.as_ptr() as u64 };
        batch.out_batch = token.as_mut_ptr() as u64;
        batch.keys = keys.as_mut_ptr() as u64;
        batch.values = values.as_mut_ptr() as u64;
        batch.count = PER_CALL as u32;
        batch.map_fd = fd.as_raw_fd() as u32;
        // SAFETY: the buffers hold PER_CALL keys and values of the map's sizes and outlive
        // the call; the token buffer outlives it too.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                bpf_cmd::BPF_MAP_LOOKUP_BATCH as libc::c_long,
                &mut attr as *mut bpf_attr,
                std::mem::size_of::<bpf_attr>(),
            )
        };
        // SAFETY: as above; the kernel wrote back how many it returned.
        let got = (unsafe { attr.batch.count } as usize).min(PER_CALL);
        if r < 0 {
            let error = io::Error::last_os_error();
            match error.raw_os_error() {
                // The end of the map (with the last entries in this call).
                Some(libc::ENOENT) => {
                    out.extend_from_slice(&keys[..got]);
                    return Ok(Some(out));
                }
                Some(libc::EINVAL) | Some(libc::ENOTSUP) | Some(524) if first => {
                    return Ok(None);
                }
                _ => return Err(error),
            }
        }
        out.extend_from_slice(&keys[..got]);
        first = false;
    }
}

/// [`keys`], falling back to one call per key where batch lookups are not supported.
pub fn all_keys<K: Pod, V: Pod>(map: &HashMap<MapData, K, V>, fd: &OwnedFd) -> Result<Vec<K>> {
    match keys::<K, V>(fd.as_fd())? {
        Some(k) => Ok(k),
        None => Ok(map.keys().filter_map(Result::ok).collect()),
    }
}
