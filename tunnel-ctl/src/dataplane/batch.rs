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

/// One batch command: `fill` sets the batch member of a zeroed `bpf_attr`; returns the call's
/// result and the count the kernel wrote back (entries processed or returned).
///
/// The caller's pointers in `fill` must name arrays of `count` keys and values of the map's
/// sizes (and a token buffer, for lookups) that outlive the call.
fn batch_call(
    cmd: bpf_cmd,
    fill: impl FnOnce(&mut aya_obj::generated::bpf_attr__bindgen_ty_3),
) -> (io::Result<()>, usize) {
    // SAFETY: bpf_attr is plain old data; all-zero is its "unset" value.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    // SAFETY: writing the batch member of the union (the one the batch commands read).
    fill(unsafe { &mut attr.batch });
    // SAFETY: the attr is valid for the command; the arrays it points to are the caller's
    // (see above).
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            &mut attr as *mut bpf_attr,
            std::mem::size_of::<bpf_attr>(),
        )
    };
    let result = if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    };
    // SAFETY: as above; the kernel wrote back the count.
    (result, unsafe { attr.batch.count } as usize)
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
        let (r, written) = batch_call(bpf_cmd::BPF_MAP_UPDATE_BATCH, |batch| {
            batch.keys = keys[done..].as_ptr() as u64;
            batch.values = values[done..].as_ptr() as u64;
            batch.count = n as u32;
            batch.map_fd = fd.as_raw_fd() as u32;
        });
        if let Err(error) = r {
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
        let (r, got) = batch_call(bpf_cmd::BPF_MAP_LOOKUP_BATCH, |batch| {
            batch.in_batch = if first { 0 } else { token.as_ptr() as u64 };
            batch.out_batch = token.as_mut_ptr() as u64;
            batch.keys = keys.as_mut_ptr() as u64;
            batch.values = values.as_mut_ptr() as u64;
            batch.count = PER_CALL as u32;
            batch.map_fd = fd.as_raw_fd() as u32;
        });
        let got = got.min(PER_CALL);
        if let Err(error) = r {
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
