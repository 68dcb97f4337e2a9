//! Fast proof-of-work search for many identities at once.
//!
//! The address derivation (`meshtun_addr::derive_node_addr`) is one BLAKE3
//! `derive_key` of 40 bytes: a single compression once the context key is
//! known. The reference search hashes the context string again for every
//! nonce (two compressions per try) and runs one lane at a time. Here the
//! context key is computed once and 8 or 16 nonces are hashed side by side
//! (the compression is written lane-parallel so the compiler turns it into
//! AVX2 / AVX-512 instructions, picked at run time). Every nonce found is
//! confirmed with the reference `derive_node_addr`, so a bug here can only
//! make the search slower, never produce an invalid identity.

use meshtun_addr::{derive_node_addr, NodeAddr};

const IV: [u32; 8] = [
    0x6A09E667, 0xBB67AE85, 0x3C6EF372, 0xA54FF53A, 0x510E527F, 0x9B05688C, 0x1F83D9AB, 0x5BE0CD19,
];
const MSG_PERMUTATION: [usize; 16] = [2, 6, 3, 10, 7, 0, 4, 13, 1, 11, 12, 5, 9, 14, 15, 8];
const CHUNK_START: u32 = 1;
const CHUNK_END: u32 = 2;
const ROOT: u32 = 8;
const DERIVE_KEY_CONTEXT: u32 = 32;
const DERIVE_KEY_MATERIAL: u32 = 64;
/// Must match `meshtun_addr`'s context string (checked by a test against
/// the reference derivation).
const CONTEXT: &[u8] = b"meshtun 2026 node address v1";

/// The message schedule: which original word each round reads.
const fn schedule() -> [[usize; 16]; 7] {
    let mut s = [[0usize; 16]; 7];
    let mut i = 0;
    while i < 16 {
        s[0][i] = i;
        i += 1;
    }
    let mut r = 1;
    while r < 7 {
        let mut i = 0;
        while i < 16 {
            s[r][i] = s[r - 1][MSG_PERMUTATION[i]];
            i += 1;
        }
        r += 1;
    }
    s
}
const SCHEDULE: [[usize; 16]; 7] = schedule();

fn compress_one(cv: &[u32; 8], block: &[u32; 16], block_len: u32, flags: u32) -> [u32; 16] {
    let mut v = [
        cv[0], cv[1], cv[2], cv[3], cv[4], cv[5], cv[6], cv[7], IV[0], IV[1], IV[2], IV[3], 0, 0, block_len, flags,
    ];
    for s in SCHEDULE.iter() {
        let m = |i: usize| block[s[i]];
        let mut g = |a: usize, b: usize, c: usize, d: usize, x: u32, y: u32| {
            v[a] = v[a].wrapping_add(v[b]).wrapping_add(x);
            v[d] = (v[d] ^ v[a]).rotate_right(16);
            v[c] = v[c].wrapping_add(v[d]);
            v[b] = (v[b] ^ v[c]).rotate_right(12);
            v[a] = v[a].wrapping_add(v[b]).wrapping_add(y);
            v[d] = (v[d] ^ v[a]).rotate_right(8);
            v[c] = v[c].wrapping_add(v[d]);
            v[b] = (v[b] ^ v[c]).rotate_right(7);
        };
        g(0, 4, 8, 12, m(0), m(1));
        g(1, 5, 9, 13, m(2), m(3));
        g(2, 6, 10, 14, m(4), m(5));
        g(3, 7, 11, 15, m(6), m(7));
        g(0, 5, 10, 15, m(8), m(9));
        g(1, 6, 11, 12, m(10), m(11));
        g(2, 7, 8, 13, m(12), m(13));
        g(3, 4, 9, 14, m(14), m(15));
    }
    for i in 0..8 {
        v[i] ^= v[i + 8];
    }
    v
}

fn words(bytes: &[u8]) -> [u32; 16] {
    let mut padded = [0u8; 64];
    padded[..bytes.len()].copy_from_slice(bytes);
    std::array::from_fn(|i| u32::from_le_bytes(padded[4 * i..4 * i + 4].try_into().unwrap()))
}

/// The BLAKE3 context key of the address derivation.
fn context_key() -> [u32; 8] {
    let out = compress_one(&IV, &words(CONTEXT), CONTEXT.len() as u32, CHUNK_START | CHUNK_END | ROOT | DERIVE_KEY_CONTEXT);
    out[..8].try_into().unwrap()
}

/// 32-bit lanes: the operations the compression needs.
trait Lanes: Copy {
    const L: usize;
    fn splat(x: u32) -> Self;
    fn from_slice(x: &[u32]) -> Self;
    fn add(self, o: Self) -> Self;
    fn xor(self, o: Self) -> Self;
    fn ror16(self) -> Self;
    fn ror12(self) -> Self;
    fn ror8(self) -> Self;
    fn ror7(self) -> Self;
    fn store(self, out: &mut [u32]);
}

#[derive(Clone, Copy)]
struct Portable([u32; 4]);

impl Lanes for Portable {
    const L: usize = 4;
    #[inline(always)]
    fn splat(x: u32) -> Self {
        Portable([x; 4])
    }
    #[inline(always)]
    fn from_slice(x: &[u32]) -> Self {
        Portable([x[0], x[1], x[2], x[3]])
    }
    #[inline(always)]
    fn add(self, o: Self) -> Self {
        Portable(std::array::from_fn(|i| self.0[i].wrapping_add(o.0[i])))
    }
    #[inline(always)]
    fn xor(self, o: Self) -> Self {
        Portable(std::array::from_fn(|i| self.0[i] ^ o.0[i]))
    }
    #[inline(always)]
    fn ror16(self) -> Self {
        Portable(self.0.map(|x| x.rotate_right(16)))
    }
    #[inline(always)]
    fn ror12(self) -> Self {
        Portable(self.0.map(|x| x.rotate_right(12)))
    }
    #[inline(always)]
    fn ror8(self) -> Self {
        Portable(self.0.map(|x| x.rotate_right(8)))
    }
    #[inline(always)]
    fn ror7(self) -> Self {
        Portable(self.0.map(|x| x.rotate_right(7)))
    }
    #[inline(always)]
    fn store(self, out: &mut [u32]) {
        out[..4].copy_from_slice(&self.0);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::Lanes;

    #[derive(Clone, Copy)]
    pub struct Avx2(__m256i);

    // SAFETY (all methods): only reached from functions compiled with
    // `target_feature(enable = "avx2")` after run-time detection.
    impl Lanes for Avx2 {
        const L: usize = 8;
        #[inline(always)]
        fn splat(x: u32) -> Self {
            unsafe { Avx2(_mm256_set1_epi32(x as i32)) }
        }
        #[inline(always)]
        fn from_slice(x: &[u32]) -> Self {
            assert!(x.len() >= 8);
            unsafe { Avx2(_mm256_loadu_si256(x.as_ptr() as *const __m256i)) }
        }
        #[inline(always)]
        fn add(self, o: Self) -> Self {
            unsafe { Avx2(_mm256_add_epi32(self.0, o.0)) }
        }
        #[inline(always)]
        fn xor(self, o: Self) -> Self {
            unsafe { Avx2(_mm256_xor_si256(self.0, o.0)) }
        }
        #[inline(always)]
        fn ror16(self) -> Self {
            unsafe {
                let m = _mm256_set_epi8(
                    13, 12, 15, 14, 9, 8, 11, 10, 5, 4, 7, 6, 1, 0, 3, 2, 13, 12, 15, 14, 9, 8, 11, 10, 5, 4, 7, 6, 1, 0, 3, 2,
                );
                Avx2(_mm256_shuffle_epi8(self.0, m))
            }
        }
        #[inline(always)]
        fn ror12(self) -> Self {
            unsafe { Avx2(_mm256_or_si256(_mm256_srli_epi32(self.0, 12), _mm256_slli_epi32(self.0, 20))) }
        }
        #[inline(always)]
        fn ror8(self) -> Self {
            unsafe {
                let m = _mm256_set_epi8(
                    12, 15, 14, 13, 8, 11, 10, 9, 4, 7, 6, 5, 0, 3, 2, 1, 12, 15, 14, 13, 8, 11, 10, 9, 4, 7, 6, 5, 0, 3, 2, 1,
                );
                Avx2(_mm256_shuffle_epi8(self.0, m))
            }
        }
        #[inline(always)]
        fn ror7(self) -> Self {
            unsafe { Avx2(_mm256_or_si256(_mm256_srli_epi32(self.0, 7), _mm256_slli_epi32(self.0, 25))) }
        }
        #[inline(always)]
        fn store(self, out: &mut [u32]) {
            assert!(out.len() >= 8);
            unsafe { _mm256_storeu_si256(out.as_mut_ptr() as *mut __m256i, self.0) }
        }
    }

    #[derive(Clone, Copy)]
    pub struct Avx512(__m512i);

    // SAFETY (all methods): only reached from functions compiled with
    // `target_feature(enable = "avx512f")` after run-time detection.
    impl Lanes for Avx512 {
        const L: usize = 16;
        #[inline(always)]
        fn splat(x: u32) -> Self {
            unsafe { Avx512(_mm512_set1_epi32(x as i32)) }
        }
        #[inline(always)]
        fn from_slice(x: &[u32]) -> Self {
            assert!(x.len() >= 16);
            unsafe { Avx512(_mm512_loadu_si512(x.as_ptr() as *const __m512i)) }
        }
        #[inline(always)]
        fn add(self, o: Self) -> Self {
            unsafe { Avx512(_mm512_add_epi32(self.0, o.0)) }
        }
        #[inline(always)]
        fn xor(self, o: Self) -> Self {
            unsafe { Avx512(_mm512_xor_si512(self.0, o.0)) }
        }
        #[inline(always)]
        fn ror16(self) -> Self {
            unsafe { Avx512(_mm512_ror_epi32::<16>(self.0)) }
        }
        #[inline(always)]
        fn ror12(self) -> Self {
            unsafe { Avx512(_mm512_ror_epi32::<12>(self.0)) }
        }
        #[inline(always)]
        fn ror8(self) -> Self {
            unsafe { Avx512(_mm512_ror_epi32::<8>(self.0)) }
        }
        #[inline(always)]
        fn ror7(self) -> Self {
            unsafe { Avx512(_mm512_ror_epi32::<7>(self.0)) }
        }
        #[inline(always)]
        fn store(self, out: &mut [u32]) {
            assert!(out.len() >= 16);
            unsafe { _mm512_storeu_si512(out.as_mut_ptr() as *mut __m512i, self.0) }
        }
    }
}

#[inline(always)]
fn g<V: Lanes>(v: &mut [V; 16], a: usize, b: usize, c: usize, d: usize, x: V, y: V) {
    v[a] = v[a].add(v[b]).add(x);
    v[d] = v[d].xor(v[a]).ror16();
    v[c] = v[c].add(v[d]);
    v[b] = v[b].xor(v[c]).ror12();
    v[a] = v[a].add(v[b]).add(y);
    v[d] = v[d].xor(v[a]).ror8();
    v[c] = v[c].add(v[d]);
    v[b] = v[b].xor(v[c]).ror7();
}

/// The first digest word for `V::L` consecutive nonces starting at `base`
/// (all below 2^32 apart: the high nonce word is taken from `base`).
#[inline(always)]
fn first_words<V: Lanes>(key: &[u32; 8], key_words: &[u32; 8], base: u64, out: &mut [u32]) {
    let flags = CHUNK_START | CHUNK_END | ROOT | DERIVE_KEY_MATERIAL;
    let mut lo = [0u32; 16];
    for (l, x) in lo.iter_mut().enumerate() {
        *x = (base as u32).wrapping_add(l as u32);
    }
    let lo = V::from_slice(&lo);
    let hi = V::splat((base >> 32) as u32);
    let zero = V::splat(0);
    let m: [V; 16] = std::array::from_fn(|w| match w {
        0..=7 => V::splat(key_words[w]),
        8 => lo,
        9 => hi,
        _ => zero,
    });
    let mut v: [V; 16] = std::array::from_fn(|i| match i {
        0..=7 => V::splat(key[i]),
        8..=11 => V::splat(IV[i - 8]),
        14 => V::splat(40),
        15 => V::splat(flags),
        _ => zero,
    });
    for s in SCHEDULE.iter() {
        g(&mut v, 0, 4, 8, 12, m[s[0]], m[s[1]]);
        g(&mut v, 1, 5, 9, 13, m[s[2]], m[s[3]]);
        g(&mut v, 2, 6, 10, 14, m[s[4]], m[s[5]]);
        g(&mut v, 3, 7, 11, 15, m[s[6]], m[s[7]]);
        g(&mut v, 0, 5, 10, 15, m[s[8]], m[s[9]]);
        g(&mut v, 1, 6, 11, 12, m[s[10]], m[s[11]]);
        g(&mut v, 2, 7, 8, 13, m[s[12]], m[s[13]]);
        g(&mut v, 3, 4, 9, 14, m[s[14]], m[s[15]]);
    }
    v[0].xor(v[8]).store(out);
}

/// First 20 bits of the digest zero: bytes 0 and 1 and the high nibble of
/// byte 2 (the digest's first word is little-endian).
const WORK_MASK: u32 = 0x00F0_FFFF;

#[inline(always)]
fn search<V: Lanes>(public_key: &[u8; 32], start: u64) -> (u64, NodeAddr) {
    let key = context_key();
    let kw = words(public_key);
    let key_words: [u32; 8] = kw[..8].try_into().unwrap();
    // Blocks never straddle a 2^32 boundary of the nonce (aligned start).
    let mut base = start & !(V::L as u64 - 1);
    let mut out = [0u32; 16];
    loop {
        first_words::<V>(&key, &key_words, base, &mut out);
        if out[..V::L].iter().any(|w| w & WORK_MASK == 0) {
            for (l, w) in out[..V::L].iter().enumerate() {
                let nonce = base.wrapping_add(l as u64);
                if w & WORK_MASK == 0 && nonce >= start {
                    // The reference check also refuses reserved addresses.
                    if let Some(addr) = derive_node_addr(public_key, nonce) {
                        return (nonce, addr);
                    }
                }
            }
        }
        base = base.wrapping_add(V::L as u64);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn search_avx512(public_key: &[u8; 32], start: u64) -> (u64, NodeAddr) {
    search::<x86::Avx512>(public_key, start)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn search_avx2(public_key: &[u8; 32], start: u64) -> (u64, NodeAddr) {
    search::<x86::Avx2>(public_key, start)
}

/// Which implementation [`find_nonce_fast`] uses here.
pub fn implementation() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return "avx512 (16 lanes)";
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            return "avx2 (8 lanes)";
        }
    }
    "portable (4 lanes)"
}

/// Like `meshtun_addr::find_nonce`, several times faster on x86-64 with
/// AVX2 or AVX-512. The nonce found may differ from the reference search's
/// (lanes are tried in blocks), but it is always a valid proof of work.
pub fn find_nonce_fast(public_key: &[u8; 32], start: u64) -> (u64, NodeAddr) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the features were detected at run time.
            return unsafe { search_avx512(public_key, start) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: as above.
            return unsafe { search_avx2(public_key, start) };
        }
    }
    search::<Portable>(public_key, start)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lane_parallel_digest_matches_blake3_derive_key() {
        let key = context_key();
        for seed in 0u8..4 {
            let pk = *blake3::hash(&[seed]).as_bytes();
            let kw = words(&pk);
            let key_words: [u32; 8] = kw[..8].try_into().unwrap();
            let base = 0xFFFF_FF00u64 + seed as u64 * 16;
            let mut out = [0u32; 16];
            let mut lanes = 4;
            first_words::<Portable>(&key, &key_words, base, &mut out[..4]);
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx512f") {
                #[target_feature(enable = "avx512f")]
                unsafe fn run(k: &[u32; 8], kw: &[u32; 8], base: u64, out: &mut [u32]) {
                    first_words::<x86::Avx512>(k, kw, base, out)
                }
                // SAFETY: detected above.
                unsafe { run(&key, &key_words, base, &mut out) };
                lanes = 16;
            } else if std::arch::is_x86_feature_detected!("avx2") {
                #[target_feature(enable = "avx2")]
                unsafe fn run(k: &[u32; 8], kw: &[u32; 8], base: u64, out: &mut [u32]) {
                    first_words::<x86::Avx2>(k, kw, base, out)
                }
                // SAFETY: detected above.
                unsafe { run(&key, &key_words, base, &mut out) };
                lanes = 8;
            }
            for (l, w) in out[..lanes].iter().enumerate() {
                let mut material = pk.to_vec();
                material.extend_from_slice(&(base + l as u64).to_le_bytes());
                let reference = blake3::derive_key(std::str::from_utf8(CONTEXT).unwrap(), &material);
                assert_eq!(w.to_le_bytes(), reference[..4], "lane {l}");
            }
        }
    }

    #[test]
    fn found_nonces_are_valid_proofs_of_work() {
        for seed in 0u8..3 {
            let pk = *blake3::hash(&[seed, 1]).as_bytes();
            let (nonce, addr) = find_nonce_fast(&pk, 0);
            assert_eq!(derive_node_addr(&pk, nonce), Some(addr));
        }
    }
}
