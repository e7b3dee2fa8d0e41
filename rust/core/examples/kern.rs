//! Compute-only timing: reconstruct into a cache-resident buffer many times.
use std::time::Instant;
fn main() {
    let total: u64 = 100_000_000;
    let d = 524_288u64;
    let v: Vec<f32> = (0..d).map(|i| (i as f32 * 1e-3).sin()).collect();
    let p = unilora_core::Projection::new(42, total, d).unwrap();
    let mut buf = vec![0f32; 1 << 16];
    let t = Instant::now();
    let reps = 400;
    for r in 0..reps { unilora_core::projection::bench_gather(&p, &v, (r * (1u64 << 16)) % (total - 70000), &mut buf); }
    let dt = t.elapsed().as_secs_f64();
    println!("single-thread kernel {:.2} ns/row", dt * 1e9 / (reps as f64 * 65536.0));
    let t = Instant::now();
    let mut s = 0u64;
    for i in 0..(reps * 65536) as u64 { s = s.wrapping_add(p.index(i)); }
    let dt = t.elapsed().as_secs_f64();
    println!("scalar index {:.2} ns/row {s}", dt * 1e9 / (reps as f64 * 65536.0));
}
