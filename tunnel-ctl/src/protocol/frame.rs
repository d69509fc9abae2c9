//! Framing: `length` (u32 little-endian, the whole frame including this 5-byte header),
//! `type` (u8), then `length - 5` bytes of data, at most 4096.
//!
//! This is the seed's `struct Msg { int length; char type; char data[4096]; }` as existing
//! implementations put it on the wire: exactly `length` bytes, never `sizeof(struct Msg)`.
use bytes::{Buf as _, BufMut as _, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder, Framed};

/// Size of `length` + `type`.
pub const HEADER_LEN: usize = 5;
/// Largest data part (`char data[4096]`).
pub const MAX_DATA: usize = 4096;
/// Largest valid `length`.
pub const MAX_FRAME: usize = HEADER_LEN + MAX_DATA;

/// Message types (SPEC §3 table).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MsgType {
    /// C→S: request an IPv4 address.
    AddrRequest,
    /// S→C: lease granted, text `"<ipv4> <route> <dns1> <dns2> <dns3>"`.
    AddrReply,
    /// C→S: one (or several back-to-back) raw IP packets.
    DataRequest,
    /// S→C: one raw IP packet.
    DataReply,
    /// Both ways: keepalive.
    Keepalive,
    /// C→S: ask for native (IPv4-in-IPv6) mode.
    NativeRequest,
    /// S→C: native mode granted.
    NativeReply,
    /// C→S: request IPv6 over the tunnel.
    Ipv6Request,
    /// S→C: IPv6 lease granted.
    Ipv6Reply,
    /// S→C: error text; the server closes after it.
    Error,
}

impl MsgType {
    pub const fn code(self) -> u8 {
        match self {
            MsgType::AddrRequest => 100,
            MsgType::AddrReply => 101,
            MsgType::DataRequest => 102,
            MsgType::DataReply => 103,
            MsgType::Keepalive => 104,
            MsgType::NativeRequest => 105,
            MsgType::NativeReply => 106,
            MsgType::Ipv6Request => 107,
            MsgType::Ipv6Reply => 108,
            MsgType::Error => 110,
        }
    }

    pub const fn from_code(code: u8) -> Option<MsgType> {
        Some(match code {
            100 => MsgType::AddrRequest,
            101 => MsgType::AddrReply,
            102 => MsgType::DataRequest,
            103 => MsgType::DataReply,
            104 => MsgType::Keepalive,
            105 => MsgType::NativeRequest,
            106 => MsgType::NativeReply,
            107 => MsgType::Ipv6Request,
            108 => MsgType::Ipv6Reply,
            110 => MsgType::Error,
            _ => return None,
        })
    }
}

/// One message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub kind: MsgType,
    pub data: Bytes,
}

impl Frame {
    pub fn new(kind: MsgType, data: impl Into<Bytes>) -> Self {
        Frame {
            kind,
            data: data.into(),
        }
    }

    /// A header-only frame (100, 104, ...).
    pub fn empty(kind: MsgType) -> Self {
        Frame {
            kind,
            data: Bytes::new(),
        }
    }

    /// A text frame (101, 106, 108, 110).
    pub fn text(kind: MsgType, text: &str) -> Self {
        Frame::new(kind, Bytes::copy_from_slice(text.as_bytes()))
    }
}

/// What makes a byte stream not a valid sequence of frames. Any of these ends the session.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame length {0} is below the 5-byte header")]
    TooShort(u32),
    #[error("frame length {0} exceeds the maximum of {MAX_FRAME}")]
    TooLong(u32),
    #[error("unknown message type {0}")]
    UnknownType(u8),
    #[error("data of {0} bytes exceeds the maximum of {MAX_DATA}")]
    DataTooLong(usize),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// tokio-util codec for [`Frame`]s. Validates the header as soon as its 5 bytes are in, so a
/// bad length is rejected without waiting for (or buffering) the body it announces.
#[derive(Clone, Copy, Debug, Default)]
pub struct FrameCodec;

/// Bytes each of a connection's buffers starts with: a keepalive or a lease request fits, and
/// a buffer grows to what the traffic needs. tokio-util's default (8 KiB for reading and 8 KiB
/// for writing, allocated up front) was most of the memory of a server holding thousands of
/// idle sessions.
const INITIAL_BUF: usize = 256;
/// Queued output that makes `feed` flush by itself: a batch of 102/103 frames (a TCP
/// super-packet's segments) goes out in two or three writes.
const WRITE_FLUSH_AT: usize = 64 * 1024;
/// Room made in the read buffer while a frame's data is incomplete: the frames behind it come
/// in the same read. A session that only exchanges keepalives never grows its buffer to it.
const READ_AHEAD: usize = 64 * 1024;

/// `io` framed with [`FrameCodec`], with small initial buffers (see [`INITIAL_BUF`]).
pub fn framed<T>(io: T) -> Framed<T, FrameCodec> {
    let mut framed = Framed::with_capacity(io, FrameCodec, INITIAL_BUF);
    framed.set_backpressure_boundary(WRITE_FLUSH_AT);
    framed
}

/// Why frames could not be written.
#[derive(Debug)]
pub enum WriteFailed {
    Error(FrameError),
    /// The peer did not take them within the timeout (it stopped reading).
    Stalled,
}

/// Writes `frames` with one flush at the end, within `timeout`: the one writer of server
/// and client sessions (a burst of 102/103 costs one flush; a single 101 or 104 is a burst of
/// one). Returns how many frames went out.
pub async fn write_frames<T: tokio::io::AsyncWrite + Unpin>(
    framed: &mut Framed<T, FrameCodec>,
    timeout: std::time::Duration,
    frames: impl IntoIterator<Item = Frame>,
) -> Result<u64, WriteFailed> {
    use futures::SinkExt as _;
    let write = async {
        let mut n = 0;
        for f in frames {
            framed.feed(f).await?;
            n += 1;
        }
        framed.flush().await.map(|()| n)
    };
    match tokio::time::timeout(timeout, write).await {
        Ok(Ok(n)) => Ok(n),
        Ok(Err(e)) => Err(WriteFailed::Error(e)),
        Err(_) => Err(WriteFailed::Stalled),
    }
}

/// Writes whole frames that are already in wire form (header and data, as
/// [`crate::tundev::Reader::take_frames`] makes them) straight from their buffers with
/// `writev`, after whatever the codec still holds; within `timeout`. A burst of 102/103
/// costs no copy into the codec's buffer. Returns how many frames went out.
pub async fn write_wire<T: tokio::io::AsyncWrite + Unpin>(
    framed: &mut Framed<T, FrameCodec>,
    timeout: std::time::Duration,
    frames: &[Bytes],
) -> Result<u64, WriteFailed> {
    use futures::SinkExt as _;
    use tokio::io::AsyncWriteExt as _;
    let write = async {
        if !framed.write_buffer().is_empty() {
            framed.flush().await?;
        }
        let io = framed.get_mut();
        let mut slices: Vec<std::io::IoSlice<'_>> =
            frames.iter().map(|f| std::io::IoSlice::new(f)).collect();
        let mut rest = &mut slices[..];
        while !rest.is_empty() {
            let n = io.write_vectored(rest).await?;
            if n == 0 {
                return Err(FrameError::Io(std::io::ErrorKind::WriteZero.into()));
            }
            std::io::IoSlice::advance_slices(&mut rest, n);
        }
        io.flush().await?;
        Ok(frames.len() as u64)
    };
    match tokio::time::timeout(timeout, write).await {
        Ok(Ok(n)) => Ok(n),
        Ok(Err(e)) => Err(WriteFailed::Error(e)),
        Err(_) => Err(WriteFailed::Stalled),
    }
}

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        if src.len() < HEADER_LEN {
            src.reserve(HEADER_LEN - src.len());
            return Ok(None);
        }
        let length = u32::from_le_bytes([src[0], src[1], src[2], src[3]]);
        if (length as usize) < HEADER_LEN {
            return Err(FrameError::TooShort(length));
        }
        if length as usize > MAX_FRAME {
            return Err(FrameError::TooLong(length));
        }
        let kind = MsgType::from_code(src[4]).ok_or(FrameError::UnknownType(src[4]))?;
        let length = length as usize;
        if src.len() < length {
            // Room for what follows too: a burst of 102/103 is then a few reads, not two per
            // frame.
            src.reserve((length - src.len()).max(READ_AHEAD));
            return Ok(None);
        }
        src.advance(HEADER_LEN);
        let data = src.split_to(length - HEADER_LEN).freeze();
        Ok(Some(Frame { kind, data }))
    }
}

impl Encoder<Frame> for FrameCodec {
    type Error = FrameError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), FrameError> {
        if frame.data.len() > MAX_DATA {
            return Err(FrameError::DataTooLong(frame.data.len()));
        }
        dst.reserve(HEADER_LEN + frame.data.len());
        dst.put_u32_le((HEADER_LEN + frame.data.len()) as u32);
        dst.put_u8(frame.kind.code());
        dst.put_slice(&frame.data);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn encode(frames: &[Frame]) -> BytesMut {
        let mut buf = BytesMut::new();
        for f in frames {
            FrameCodec.encode(f.clone(), &mut buf).unwrap();
        }
        buf
    }

    fn decode_all(chunks: &[&[u8]]) -> Result<Vec<Frame>, FrameError> {
        let mut codec = FrameCodec;
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for chunk in chunks {
            buf.extend_from_slice(chunk);
            while let Some(f) = codec.decode(&mut buf)? {
                out.push(f);
            }
        }
        Ok(out)
    }

    #[test]
    fn header_only_frames_are_exactly_five_bytes() {
        assert_eq!(
            &encode(&[Frame::empty(MsgType::AddrRequest)])[..],
            &[5, 0, 0, 0, 100]
        );
        assert_eq!(
            &encode(&[Frame::empty(MsgType::Keepalive)])[..],
            &[5, 0, 0, 0, 104]
        );
    }

    #[test]
    fn length_counts_the_header_little_endian() {
        let buf = encode(&[Frame::text(MsgType::AddrReply, "abc")]);
        assert_eq!(&buf[..], &[8, 0, 0, 0, 101, b'a', b'b', b'c']);
    }

    #[test]
    fn rejects_bad_lengths_and_types_from_the_header_alone() {
        assert!(matches!(
            decode_all(&[&[4, 0, 0, 0, 100]]),
            Err(FrameError::TooShort(4))
        ));
        assert!(matches!(
            decode_all(&[&[0x06, 0x10, 0, 0, 102]]),
            Err(FrameError::TooLong(4102))
        ));
        assert!(matches!(
            decode_all(&[&[5, 0, 0, 0, 99]]),
            Err(FrameError::UnknownType(99))
        ));
        // Largest valid frame is accepted.
        let mut big = vec![0x05, 0x10, 0, 0, 102];
        big.extend(std::iter::repeat_n(0u8, MAX_DATA));
        assert_eq!(decode_all(&[&big]).unwrap()[0].data.len(), MAX_DATA);
    }

    /// Frames in wire form go out after what the codec still holds, whole and in order, and
    /// read back as the frames they are.
    #[test]
    fn wire_frames_follow_the_codecs_own_and_read_back_whole() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            use futures::{SinkExt as _, StreamExt as _};
            let (a, b) = tokio::io::duplex(1 << 20);
            let (mut tx, mut rx) = (framed(a), framed(b));
            // Queued in the codec, not flushed.
            tx.feed(Frame::empty(MsgType::Keepalive)).await.unwrap();
            let wire = |kind: MsgType, data: &[u8]| {
                let mut f = ((HEADER_LEN + data.len()) as u32).to_le_bytes().to_vec();
                f.push(kind.code());
                f.extend_from_slice(data);
                Bytes::from(f)
            };
            let frames = [
                wire(MsgType::DataReply, &[0x45; 1500]),
                wire(MsgType::DataReply, &[0x46; 60]),
            ];
            let timeout = std::time::Duration::from_secs(5);
            assert_eq!(write_wire(&mut tx, timeout, &frames).await.unwrap(), 2);
            let read = (&mut rx)
                .take(3)
                .map(Result::unwrap)
                .collect::<Vec<Frame>>();
            let got = tokio::time::timeout(timeout, read)
                .await
                .expect("three frames within 5 s");
            assert_eq!(got[0], Frame::empty(MsgType::Keepalive));
            assert_eq!(got[1], Frame::new(MsgType::DataReply, vec![0x45; 1500]));
            assert_eq!(got[2], Frame::new(MsgType::DataReply, vec![0x46; 60]));
        });
    }

    #[test]
    fn refuses_to_encode_oversized_data() {
        let mut buf = BytesMut::new();
        let frame = Frame::new(MsgType::DataReply, vec![0u8; MAX_DATA + 1]);
        assert!(FrameCodec.encode(frame, &mut buf).is_err());
    }

    fn any_type() -> impl Strategy<Value = MsgType> {
        prop::sample::select(vec![
            MsgType::AddrRequest,
            MsgType::AddrReply,
            MsgType::DataRequest,
            MsgType::DataReply,
            MsgType::Keepalive,
            MsgType::NativeRequest,
            MsgType::NativeReply,
            MsgType::Ipv6Request,
            MsgType::Ipv6Reply,
            MsgType::Error,
        ])
    }

    fn any_frame() -> impl Strategy<Value = Frame> {
        (any_type(), prop::collection::vec(any::<u8>(), 0..=MAX_DATA))
            .prop_map(|(kind, data)| Frame::new(kind, data))
    }

    proptest! {
        #[test]
        fn round_trip_under_any_split(
            frames in prop::collection::vec(any_frame(), 0..8),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..16),
        ) {
            let bytes = encode(&frames);
            let mut points: Vec<usize> = cuts.iter().map(|c| c.index(bytes.len() + 1)).collect();
            points.sort_unstable();
            let mut chunks = Vec::new();
            let mut last = 0;
            for p in points {
                chunks.push(&bytes[last..p]);
                last = p;
            }
            chunks.push(&bytes[last..]);
            prop_assert_eq!(decode_all(&chunks).unwrap(), frames);
        }

        #[test]
        fn garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..10_000)) {
            let _ = decode_all(&[&bytes]);
        }

    }
}
