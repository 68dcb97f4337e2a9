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

/// The lines holding `*outer` but not those of `*inner`, a part of it
/// that is hinted on its own (so its lines are not hinted twice).
#[inline(always)]
pub fn object_around<T, U>(outer: &T, inner: &U) {
    let start = (outer as *const T).cast::<u8>();
    let end = start as usize + std::mem::size_of::<T>();
    let inner_start = (inner as *const U as usize).clamp(start as usize, end);
    let inner_end = (inner as *const U as usize + std::mem::size_of::<U>()).clamp(inner_start, end);
    bytes(start, inner_start - start as usize);
    bytes(start.wrapping_add(inner_end - start as usize), end - inner_end);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hints_on_any_address_never_fault() {
        bytes(std::ptr::null(), 4096);
        bytes(0xffff_8000_0000_0000_usize as *const u8, 256);
        let freed = {
            let buffer = vec![7u8; 8192];
            buffer.as_ptr()
        };
        bytes(freed, 8192);
        let empty: Vec<u64> = Vec::new();
        vec_end(&empty);
        slice_head(&empty, 64);
        let values = [1u32, 2, 3];
        object(&values);
        object_around(&values, &values[1]);
        object_around(&values, &freed);
        slice_head(&values, 1 << 20);
        assert_eq!(values, [1, 2, 3]);
    }
}
