//! Byte-exact TCP transfers between namespaces: a generated stream is sent and the receiver
//! checks every byte against the same generator.
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

use crate::Ns;

/// Deterministic byte stream (xorshift64*), so both ends agree without storing it. The
/// stream is the same however it is cut: reads of any size line up with the writes.
pub struct Pattern {
    state: u64,
    word: [u8; 8],
    used: usize,
}

impl Pattern {
    pub fn new(seed: u64) -> Self {
        Pattern {
            state: seed | 1,
            word: [0; 8],
            used: 8,
        }
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            if self.used == 8 {
                self.state ^= self.state >> 12;
                self.state ^= self.state << 25;
                self.state ^= self.state >> 27;
                self.word = self.state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
                self.used = 0;
            }
            *b = self.word[self.used];
            self.used += 1;
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

#[cfg(test)]
mod tests {
    use super::Pattern;

    #[test]
    fn the_stream_does_not_depend_on_how_it_is_cut() {
        let mut whole = vec![0u8; 4096];
        Pattern::new(7).fill(&mut whole);
        let mut pieces = Vec::new();
        let mut p = Pattern::new(7);
        for size in [1428, 1, 3, 1000, 1664] {
            let mut buf = vec![0u8; size];
            p.fill(&mut buf);
            pieces.extend_from_slice(&buf);
        }
        assert_eq!(pieces, whole);
    }
}
