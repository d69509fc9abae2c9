//! The 4over6 control protocol (SPEC §3, seed 004): frames on the TCP session and the texts
//! some of them carry.

pub mod frame;
pub mod text;

pub use frame::{Frame, FrameCodec, FrameError, MsgType};
