//! Many raw-protocol sessions at once: the async load generator of the hardening tests and the
//! control-plane bench. Frames are written from the SPEC §3 bytes (little-endian u32 length
//! including the 5-byte header, then the type), not with the project's codec, like
//! [`crate::fourover6::RawPeer`].
//!
//! Each session can come from its own source address: give the generating namespace a local
//! route for a whole /64 (`ip -6 route add local <net>/64 dev lo`, plus
//! `net.ipv6.ip_nonlocal_bind=1`) and pick addresses with [`source`].
use std::{
    net::{Ipv6Addr, SocketAddr},
    time::Duration,
};

use anyhow::{Result, anyhow, bail};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpSocket, TcpStream},
};

/// Every protocol step (connect, each awaited frame) gets this long.
pub const STEP: Duration = Duration::from_secs(10);

pub const ADDR_REQUEST: u8 = 100;
pub const ADDR_REPLY: u8 = 101;
pub const KEEPALIVE: u8 = 104;
pub const NATIVE_REQUEST: u8 = 105;
pub const NATIVE_REPLY: u8 = 106;
pub const IPV6_REQUEST: u8 = 107;
pub const IPV6_REPLY: u8 = 108;
pub const ERROR: u8 = 110;

/// The server answered 110: the text is in the message. Tell it apart with
/// `err.downcast_ref::<Refused>()`.
#[derive(Debug)]
pub struct Refused(pub String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "server refused (110): {}", self.0)
    }
}

impl std::error::Error for Refused {}

/// The `i`-th source address of the /64 `net` (host part `i + 1`), any port.
pub fn source(net: Ipv6Addr, i: u32) -> SocketAddr {
    let a = Ipv6Addr::from(u128::from(net) | (u128::from(i) + 1));
    SocketAddr::new(a.into(), 0)
}

pub struct Session {
    stream: TcpStream,
}

impl Session {
    /// Connects to `server` from `from` (port 0: any).
    pub async fn connect(server: SocketAddr, from: SocketAddr) -> Result<Session> {
        let socket = match server {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        socket.bind(from)?;
        let stream = tokio::time::timeout(STEP, socket.connect(server))
            .await
            .map_err(|_| anyhow!("connect from {from} timed out"))??;
        Ok(Session { stream })
    }

    pub async fn send(&mut self, kind: u8, data: &[u8]) -> Result<()> {
        let mut frame = Vec::with_capacity(5 + data.len());
        frame.extend_from_slice(&((5 + data.len()) as u32).to_le_bytes());
        frame.push(kind);
        frame.extend_from_slice(data);
        self.stream.write_all(&frame).await?;
        Ok(())
    }

    /// The next frame as (type, data); None when the server closed the connection.
    pub async fn recv(&mut self) -> Result<Option<(u8, Vec<u8>)>> {
        let mut header = [0u8; 5];
        match self.stream.read_exact(&mut header).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        if !(5..=4101).contains(&len) {
            bail!("server sent a frame of length {len}");
        }
        let mut data = vec![0u8; len - 5];
        self.stream.read_exact(&mut data).await?;
        Ok(Some((header[4], data)))
    }

    /// Waits (at most [`STEP`] in all, keepalives included) for a frame of `kind`, skipping
    /// keepalives; returns its text. A 110 is a [`Refused`] error; a close or another type is
    /// an error.
    pub async fn expect(&mut self, kind: u8) -> Result<String> {
        let deadline = tokio::time::Instant::now() + STEP;
        loop {
            let frame = tokio::time::timeout_at(deadline, self.recv())
                .await
                .map_err(|_| anyhow!("no {kind} within {STEP:?}"))??;
            match frame {
                None => bail!("server closed before {kind}"),
                Some((k, data)) if k == kind => return Ok(String::from_utf8(data)?),
                Some((KEEPALIVE, _)) => continue,
                Some((ERROR, data)) => {
                    return Err(Refused(String::from_utf8_lossy(&data).into_owned()).into());
                }
                Some((other, _)) => bail!("expected {kind}, got {other}"),
            }
        }
    }

    /// 100 → 101; returns the 101 text.
    pub async fn lease(&mut self) -> Result<String> {
        self.send(ADDR_REQUEST, &[]).await?;
        self.expect(ADDR_REPLY).await
    }

    /// Closes with a FIN, as a client that disconnects cleanly.
    pub async fn close(mut self) {
        let _ = self.stream.shutdown().await;
    }

    /// Resets the connection (SO_LINGER 0, then close), as a client that was killed or whose
    /// host went away.
    pub fn abort(self) {
        let _ = self.stream.set_zero_linger();
    }
}
