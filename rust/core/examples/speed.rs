//! Quick timing of reconstruct for D = 100M, d = 2^19 (and a non-power-of-two d).
use std::time::Instant;
fn main() {
    let total: u64 = 100_000_000;
    let mut buf = vec![1f32; total as usize];
    for d in [524_288u64, 23_040] {
        let v: Vec<f32> = (0..d).map(|i| (i as f32 * 1e-3).sin()).collect();
        for threads in [1usize, 2] {
            unilora_core::parallel::set_num_threads(threads);
            let t = Instant::now();
            let out = unilora_core::reconstruct(&v, 42, &[(total / 4, 4)]).unwrap();
            let dt = t.elapsed().as_secs_f64();
            let t = Instant::now();
            unilora_core::reconstruct_into(&v, 42, &[(total / 4, 4)], &mut [&mut buf[..]]).unwrap();
            let dt2 = t.elapsed().as_secs_f64();
            println!("d={d} threads={threads}: fresh {:.3}s ({:.2} ns/row) prefaulted {dt2:.3}s {}", dt, dt * 1e9 / total as f64, out[0][12345]);
        }
    }
    let t = Instant::now();
    let dst = buf.clone();
    let t1 = t.elapsed().as_secs_f64();
    let mut dst2 = vec![0f32; total as usize];
    dst2.copy_from_slice(&buf);
    let t = Instant::now();
    dst2.copy_from_slice(&buf);
    println!("clone {t1:.3}s; copy into prefaulted {:.3}s {}", t.elapsed().as_secs_f64(), dst[5] + dst2[7]);
}
