//! Cache prefetch hints for a wake-up: see [`crate::Node::prefetch_packet_path`].
//!
//! A hint asks the CPU to start loading a cache line and returns at once:
//! it never faults (on any address), never changes memory, and several
//! lines load in parallel. On targets without one it does nothing.

const LINE: usize = 64;

/// The lines holding `len` bytes from `start`.
#[inline(always)]
pub fn bytes(start: *const u8, len: usize) {
    let mut offset = 0;
    while offset < len {
        line(start.wrapping_add(offset));
        offset += LINE;
    }
}

/// The lines holding `*value` (not what it points to).
#[inline(always)]
pub fn object<T>(value: &T) {
    bytes((value as *const T).cast(), std::mem::size_of::<T>());
}

/// The first `len` bytes of a slice's elements (fewer if it is shorter).
#[inline(always)]
pub fn slice_head<T>(values: &[T], len: usize) {
    bytes(values.as_ptr().cast(), len.min(std::mem::size_of_val(values)));
}

/// The line just past `values`: where the next element pushed onto the
/// `Vec` it belongs to goes.
#[inline(always)]
pub fn vec_end<T>(values: &[T]) {
    bytes(values.as_ptr().wrapping_add(values.len()).cast(), 1);
}

#[inline(always)]
fn line(at: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: SSE is part of x86_64's baseline, and a prefetch reads
    // nothing the program sees: any address is allowed, none faults.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(at.cast())
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = at;
}
