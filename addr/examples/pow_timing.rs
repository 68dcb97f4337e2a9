//! Times 20 address derivations from different keys and prints min/median/max seconds.
//!
//! Run with `cargo run --release -p meshtun-addr --example pow_timing`.

use std::time::Instant;

use meshtun_addr::{derive_node_addr, find_nonce, POW_DIFFICULTY_BITS};

const RUNS: u8 = 20;

fn main() {
    let mut secs = Vec::with_capacity(usize::from(RUNS));
    let mut hashes = 0u64;
    for i in 0..RUNS {
        // Distinct, reproducible keys; real keys come from the caller's key generation.
        let key = *blake3::hash(&[i]).as_bytes();
        let started = Instant::now();
        let (nonce, addr) = find_nonce(&key, 0);
        let elapsed = started.elapsed().as_secs_f64();
        assert_eq!(derive_node_addr(&key, nonce), Some(addr));
        hashes += nonce + 1;
        println!("key {i:2}: nonce {nonce:>9}  addr {addr}  {elapsed:.3} s");
        secs.push(elapsed);
    }
    secs.sort_by(f64::total_cmp);
    let median = (secs[secs.len() / 2 - 1] + secs[secs.len() / 2]) / 2.0;
    let total: f64 = secs.iter().sum();
    println!(
        "difficulty {POW_DIFFICULTY_BITS} bits, {RUNS} derivations: min {:.3} s, median {median:.3} s, max {:.3} s",
        secs[0],
        secs[secs.len() - 1],
    );
    println!(
        "mean nonces tried {:.0} (expected ~{}), {:.2} Mhash/s",
        hashes as f64 / f64::from(RUNS),
        1u64 << POW_DIFFICULTY_BITS,
        hashes as f64 / total / 1e6
    );
}
