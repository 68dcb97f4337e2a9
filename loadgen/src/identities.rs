//! Identities for simulated nodes, derived from a seed and cached on disk.
//!
//! Identity `i` of seed `s` has the secret `BLAKE3("meshtun-loadgen identity" || s || i)`;
//! its proof-of-work nonce is searched with [`crate::pow::find_nonce_fast`] on every core.
//! The cache (`target/loadgen-identities-<seed>.bin` by default) stores
//! `secret (32) || nonce (8, LE)` per identity after a small header, so a
//! later run with the same seed loads the first N at once and only computes
//! the ones it lacks. Loading re-checks every nonce (one hash each), so a
//! corrupt cache cannot hand out invalid identities.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use ed25519_dalek::SigningKey;
use meshtun_proto::Identity;

const MAGIC: &[u8; 16] = b"meshtun-lg-ids\x01\n";
const ENTRY: usize = 40;

pub fn secret(seed: u64, i: u64) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(b"meshtun-loadgen identity");
    h.update(&seed.to_le_bytes());
    h.update(&i.to_le_bytes());
    *h.finalize().as_bytes()
}

/// Computes identity parts (secret, nonce) for indices `from..to` on `threads` threads.
pub fn compute(seed: u64, from: u64, to: u64, threads: usize, progress: bool) -> Vec<([u8; 32], u64)> {
    let n = (to - from) as usize;
    let next = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    let started = Instant::now();
    let mut out = vec![([0u8; 32], 0u64); n];
    let chunks: Vec<Vec<(usize, [u8; 32], u64)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads.max(1))
            .map(|_| {
                scope.spawn(|| {
                    let mut mine = Vec::new();
                    loop {
                        let k = next.fetch_add(1, Ordering::Relaxed);
                        if k >= n {
                            return mine;
                        }
                        let s = secret(seed, from + k as u64);
                        let public = SigningKey::from_bytes(&s).verifying_key().to_bytes();
                        let (nonce, _) = crate::pow::find_nonce_fast(&public, 0);
                        mine.push((k, s, nonce));
                        let d = done.fetch_add(1, Ordering::Relaxed) + 1;
                        if progress && d % 5000 == 0 {
                            let rate = d as f64 / started.elapsed().as_secs_f64();
                            eprintln!("  identities: {d}/{n} ({rate:.0}/s, ~{:.0} s left)", (n - d) as f64 / rate);
                        }
                    }
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("identity thread")).collect()
    });
    for chunk in chunks {
        for (k, s, nonce) in chunk {
            out[k] = (s, nonce);
        }
    }
    out
}

pub fn default_cache(seed: u64) -> PathBuf {
    // The workspace's target directory, wherever this binary was built.
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target")));
    target.join(format!("loadgen-identities-{seed}.bin"))
}

/// Reads as many cached parts as the file holds (for this seed).
fn read_cache(path: &Path, seed: u64) -> Vec<([u8; 32], u64)> {
    let Ok(mut f) = std::fs::File::open(path) else { return Vec::new() };
    let mut bytes = Vec::new();
    if f.read_to_end(&mut bytes).is_err() || bytes.len() < 24 || &bytes[..16] != MAGIC {
        return Vec::new();
    }
    if u64::from_le_bytes(bytes[16..24].try_into().unwrap()) != seed {
        return Vec::new();
    }
    bytes[24..]
        .chunks_exact(ENTRY)
        .map(|c| (c[..32].try_into().unwrap(), u64::from_le_bytes(c[32..40].try_into().unwrap())))
        .collect()
}

fn write_cache(path: &Path, seed: u64, parts: &[([u8; 32], u64)]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
    f.write_all(MAGIC)?;
    f.write_all(&seed.to_le_bytes())?;
    for (s, nonce) in parts {
        f.write_all(s)?;
        f.write_all(&nonce.to_le_bytes())?;
    }
    f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// `n` identities of `seed`, from the cache where possible; extends the cache.
pub fn load_or_generate(n: usize, seed: u64, cache: Option<&Path>, threads: usize) -> anyhow::Result<Vec<Identity>> {
    let started = Instant::now();
    let mut parts = cache.map(|p| read_cache(p, seed)).unwrap_or_default();
    let cached = parts.len().min(n);
    if parts.len() < n {
        eprintln!(
            "generating {} identities (proof of work) on {threads} threads; {cached} cached",
            n - parts.len()
        );
        // In chunks, saving after each, so an interrupted run keeps its work.
        while parts.len() < n {
            let to = (parts.len() + 10_000).min(n);
            let more = compute(seed, parts.len() as u64, to as u64, threads, true);
            parts.extend(more);
            if let Some(path) = cache {
                write_cache(path, seed, &parts)?;
            }
        }
    }
    let generated = started.elapsed();
    // Rebuild (checks every nonce), in parallel: key derivation dominates.
    let parts = &parts[..n];
    let per = n.div_ceil(threads.max(1)).max(1);
    let ids: Vec<Identity> = std::thread::scope(|scope| {
        let handles: Vec<_> = parts
            .chunks(per)
            .map(|chunk| {
                scope.spawn(move || {
                    chunk
                        .iter()
                        .map(|(s, nonce)| Identity::from_parts(*s, *nonce))
                        .collect::<Result<Vec<_>, _>>()
                })
            })
            .collect();
        let mut all = Vec::with_capacity(n);
        for h in handles {
            all.extend(h.join().expect("identity thread")?);
        }
        Ok::<_, anyhow::Error>(all)
    })?;
    eprintln!(
        "identities: {n} ready in {:.1} s ({cached} from cache, {:.1} s of proof of work)",
        started.elapsed().as_secs_f64(),
        generated.as_secs_f64()
    );
    Ok(ids)
}
