use std::time::Instant;
fn main() {
    let id = meshtun_proto::Identity::from_parts(meshtun_loadgen::identities::secret(1, 0), 0).ok();
    let ids = meshtun_loadgen::identities::load_or_generate(10, 1, Some(&meshtun_loadgen::identities::default_cache(1)), 2).unwrap();
    let _ = id;
    let mesh = meshtun_loadgen::run::Mesh::new(ids, vec!["127.0.0.1:1".parse().unwrap()], 1, 1);
    let signed = meshtun_proto::SignedRecord::sign(&mesh.ids[0], &mesh.record(0, "127.0.0.1:5".parse().unwrap(), 5)).unwrap();
    println!("body {} bytes", signed.body.len());
    let n = 2000;
    let c = meshtun_loadgen::procstat::self_cpu_secs();
    let t = Instant::now();
    for _ in 0..n { signed.verify().unwrap(); }
    let cpu = meshtun_loadgen::procstat::self_cpu_secs() - c;
    println!("SignedRecord::verify: {:.1} us cpu each ({:.1} us wall)", cpu * 1e6 / n as f64, t.elapsed().as_secs_f64() * 1e6 / n as f64);
    let c = meshtun_loadgen::procstat::self_cpu_secs();
    for i in 0..n { meshtun_proto::SignedRecord::sign(&mesh.ids[0], &mesh.record(0, "127.0.0.1:5".parse().unwrap(), i)).unwrap(); }
    let cpu = meshtun_loadgen::procstat::self_cpu_secs() - c;
    println!("sign: {:.1} us cpu each", cpu * 1e6 / n as f64);
}
