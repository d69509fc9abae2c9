//! Byte-exact TCP transfers between namespaces: a generated stream is sent and the receiver
//! checks every byte against the same generator.
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

use crate::Ns;

/// Deterministic byte stream (xorshift64*), so both ends agree without storing it.
pub struct Pattern(u64);

impl Pattern {
    pub fn new(seed: u64) -> Self {
        Pattern(seed | 1)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let v = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// Sends `len` bytes over TCP from `from` to a receiver listening on `to_addr` inside `to`,
/// and fails unless exactly those bytes arrive in order. I/O stalls longer than `stall` fail.
pub fn tcp_transfer(from: &Ns, to: &Ns, to_addr: SocketAddr, len: usize, seed: u64) -> Result<()> {
    let stall = Duration::from_secs(20);
    let listener = to.enter(|| TcpListener::bind(to_addr))??;
    let receiver = std::thread::spawn(move || -> Result<usize> {
        let (mut conn, _) = listener.accept()?;
        conn.set_read_timeout(Some(stall))?;
        let mut pattern = Pattern::new(seed);
        let mut got = vec![0u8; 64 * 1024];
        let mut want = vec![0u8; 64 * 1024];
        let mut total = 0usize;
        loop {
            let n = conn.read(&mut got).context("receiving")?;
            if n == 0 {
                return Ok(total);
            }
            pattern.fill(&mut want[..n]);
            if got[..n] != want[..n] {
                bail!("byte mismatch in the {n} bytes after offset {total}");
            }
            total += n;
        }
    });
    let mut conn = from
        .enter(|| TcpStream::connect_timeout(&to_addr, stall))?
        .with_context(|| format!("connecting to {to_addr} from {}", from.name))?;
    conn.set_write_timeout(Some(stall))?;
    let mut pattern = Pattern::new(seed);
    let mut buf = vec![0u8; 64 * 1024];
    let mut sent = 0usize;
    while sent < len {
        let n = buf.len().min(len - sent);
        pattern.fill(&mut buf[..n]);
        conn.write_all(&buf[..n]).context("sending")?;
        sent += n;
    }
    drop(conn);
    let received = receiver
        .join()
        .map_err(|_| anyhow::anyhow!("receiver panicked"))??;
    if received != len {
        bail!("sent {len} bytes, received {received}");
    }
    Ok(())
}
