fn cpu() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}
fn main() {
    let n: u64 = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(20);
    let c = cpu();
    let mut tries = 0;
    for i in 0..n {
        let pk = *blake3::hash(&i.to_le_bytes()).as_bytes();
        let (nonce, _) = meshtun_loadgen::pow::find_nonce_fast(&pk, 0);
        tries += nonce;
    }
    let fast = cpu() - c;
    let c = cpu();
    let mut tries2 = 0;
    for i in 0..n {
        let pk = *blake3::hash(&i.to_le_bytes()).as_bytes();
        let (nonce, _) = meshtun_addr::find_nonce(&pk, 0);
        tries2 += nonce;
    }
    let slow = cpu() - c;
    println!("fast: {:.1} ms cpu/identity, {:.1} ns/hash; reference: {:.1} ms, {:.1} ns/hash", fast * 1e3 / n as f64, fast * 1e9 / tries as f64, slow * 1e3 / n as f64, slow * 1e9 / tries2 as f64);
}
