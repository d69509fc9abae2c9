//! Direct packet access: header fields read straight from the packet as words.
//!
//! The BPF target has no unaligned loads, so LLVM turns every read of a `[u8; N]` header field
//! (network-types' headers, alignment 1) into byte loads, shifts and ors, and every copy of a
//! header into a byte-by-byte copy: a 40-byte IPv6 header took 80 instructions to copy and 30
//! more per address compared. The kernel allows misaligned packet and map-value access where
//! the CPU does it efficiently (the verifier's strict alignment is off on x86-64 and arm64;
//! only the stack must stay aligned), so the loads here are single instructions written in
//! assembly: the compiler cannot split them, and Rust never sees a misaligned pointer.
//!
//! A [`View`] holds the packet's linear part. Reads are only valid within what
//! [`View::holds`] (or [`View::holds_at`]) checked just before: the verifier proves every
//! access against that check, and refuses a program that reads further.
use aya_ebpf::programs::TcContext;

/// The packet's linear part as the program sees it (`skb->data` to `skb->data_end`).
#[derive(Clone, Copy)]
pub struct View {
    data: usize,
    end: usize,
}

impl View {
    #[inline(always)]
    pub fn of(ctx: &TcContext) -> View {
        View {
            data: ctx.data(),
            end: ctx.data_end(),
        }
    }

    #[inline(always)]
    pub fn from_bounds(data: usize, end: usize) -> View {
        View { data, end }
    }

    /// The first `len` bytes are in the linear part.
    #[inline(always)]
    pub fn holds(&self, len: usize) -> bool {
        self.data + len <= self.end
    }

    /// The address of the `len` bytes at `off` (a variable offset, bounded by the caller),
    /// when they are in the linear part. Read them through this address ([`Ptr`]): the
    /// verifier knows the range of this pointer, not of one computed again.
    #[inline(always)]
    pub fn at(&self, off: usize, len: usize) -> Option<Ptr> {
        let p = self.data + off;
        if p + len > self.end {
            return None;
        }
        Some(Ptr(p))
    }

    /// The address of byte `off`, for direct writes within the checked range (XDP).
    #[inline(always)]
    pub fn addr(&self, off: usize) -> usize {
        self.data + off
    }

    /// The byte at `off`.
    #[inline(always)]
    pub fn u8(&self, off: usize) -> u8 {
        // SAFETY: a one-byte read of the packet within the range the caller checked.
        unsafe { load8(self.data + off) }
    }

    /// The two bytes at `off` in wire order (`u16::from_be` gives the value).
    #[inline(always)]
    pub fn w16(&self, off: usize) -> u16 {
        // SAFETY: as in `u8`.
        unsafe { load16(self.data + off) }
    }

    /// The four bytes at `off` in wire order.
    #[inline(always)]
    pub fn w32(&self, off: usize) -> u32 {
        // SAFETY: as in `u8`.
        unsafe { load32(self.data + off) }
    }

    /// The eight bytes at `off` in wire order.
    #[inline(always)]
    pub fn w64(&self, off: usize) -> u64 {
        // SAFETY: as in `u8`.
        unsafe { load64(self.data + off) }
    }

    /// The sixteen bytes at `off` (an IPv6 address) as two words.
    #[inline(always)]
    pub fn addr6(&self, off: usize) -> [u64; 2] {
        [self.w64(off), self.w64(off + 8)]
    }
}

/// A checked address in the packet ([`View::at`]).
#[derive(Clone, Copy)]
pub struct Ptr(usize);

impl Ptr {
    /// The address, for direct writes within the checked length.
    #[inline(always)]
    pub fn addr(self) -> usize {
        self.0
    }

    /// The byte `k` bytes on (within the checked length).
    #[inline(always)]
    pub fn u8(self, k: usize) -> u8 {
        // SAFETY: within the range `View::at` checked.
        unsafe { load8(self.0 + k) }
    }

    /// The two bytes `k` bytes on, wire order.
    #[inline(always)]
    pub fn w16(self, k: usize) -> u16 {
        // SAFETY: as above.
        unsafe { load16(self.0 + k) }
    }

    /// The four bytes `k` bytes on, wire order.
    #[inline(always)]
    pub fn w32(self, k: usize) -> u32 {
        // SAFETY: as above.
        unsafe { load32(self.0 + k) }
    }
}

/// An IPv6 address (or any 16 bytes) in a map value as two words, one load each.
///
/// Only for map values (and packet memory): the verifier refuses misaligned stack access, and
/// a `[u8; 16]` on the stack may be anywhere. [`to_words`] takes any.
#[inline(always)]
pub fn map_words(a: &[u8; 16]) -> [u64; 2] {
    let p = a.as_ptr() as usize;
    // SAFETY: `a` is 16 readable bytes of a map value (the caller's contract above); the loads
    // may be misaligned, which the kernel allows there.
    unsafe { [load64(p), load64(p + 8)] }
}

/// Sixteen bytes anywhere (the stack included) as two words, byte by byte.
pub use tunnel_common::fastpath::words16 as to_words;

/// Sixteen bytes as a map key, 8-aligned on the stack.
#[repr(C, align(8))]
#[derive(Clone, Copy)]
pub struct Key16(pub [u64; 2]);

impl Key16 {
    /// The key as the maps' `[u8; 16]` type.
    #[inline(always)]
    pub fn bytes(&self) -> &[u8; 16] {
        // SAFETY: same size, and `[u8; 16]` needs no alignment.
        unsafe { &*(self.0.as_ptr() as *const [u8; 16]) }
    }
}

macro_rules! loader {
    ($name:ident, $ty:ty, $width:literal) => {
        /// One load instruction of that width from `p`, which may be misaligned.
        ///
        /// # Safety
        /// `p` must point to that many readable bytes of packet or map-value memory (not the
        /// stack, whose accesses the verifier requires aligned).
        #[inline(always)]
        pub unsafe fn $name(p: usize) -> $ty {
            #[cfg(target_arch = "bpf")]
            {
                let v: u64;
                // SAFETY: the caller's contract; the instruction only reads.
                unsafe {
                    core::arch::asm!(
                        concat!("{v} = *(", $width, " *)({p} + 0)"),
                        p = in(reg) p,
                        v = lateout(reg) v,
                        options(readonly, nostack, preserves_flags),
                    );
                }
                v as $ty
            }
            // The host build (cargo checks the crate for the host too) never runs this.
            #[cfg(not(target_arch = "bpf"))]
            // SAFETY: the caller's contract.
            unsafe {
                core::ptr::read_unaligned(p as *const $ty)
            }
        }
    };
}

loader!(load8, u8, "u8");
loader!(load16, u16, "u16");
loader!(load32, u32, "u32");
loader!(load64, u64, "u64");

macro_rules! storer {
    ($name:ident, $ty:ty, $width:literal) => {
        /// One store instruction of that width to `p`, which may be misaligned.
        ///
        /// # Safety
        /// `p` must point to that many writable bytes of packet memory the program may write
        /// directly (XDP frames; not the stack, and not a TC program's packet: see the module
        /// documentation of `crate::packet`).
        #[inline(always)]
        pub unsafe fn $name(p: usize, v: $ty) {
            #[cfg(target_arch = "bpf")]
            // SAFETY: the caller's contract.
            unsafe {
                core::arch::asm!(
                    concat!("*(", $width, " *)({p} + 0) = {v}"),
                    p = in(reg) p,
                    v = in(reg) v as u64,
                    options(nostack, preserves_flags),
                );
            }
            #[cfg(not(target_arch = "bpf"))]
            // SAFETY: the caller's contract.
            unsafe {
                core::ptr::write_unaligned(p as *mut $ty, v)
            }
        }
    };
}

storer!(store16, u16, "u16");
storer!(store32, u32, "u32");
storer!(store64, u64, "u64");
