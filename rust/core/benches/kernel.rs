//! Compute-only timing: reconstruct into a cache-resident buffer many times.
//! Usage: cargo bench -p unilora-core --bench kernel -- [d] [reps] [auto|avx2|portable];
//! time it with `/usr/bin/time` (65,536 rows per rep; D = 1e8).
use unilora_core::projection::kernel::{KernelImpl, gather_rows};

fn main() {
    let total: u64 = 100_000_000;
    let mut args = std::env::args().skip(1).filter(|a| a != "--bench");
    let d: u64 = args.next().map_or(524_288, |a| a.parse().unwrap());
    let reps: u64 = args.next().map_or(1000, |a| a.parse().unwrap());
    let which = match args.next().as_deref() {
        None | Some("auto") => KernelImpl::Auto,
        Some("avx2") => KernelImpl::Avx2,
        Some("portable") => KernelImpl::Portable,
        Some(other) => panic!("unknown kernel {other}: auto, avx2 or portable"),
    };
    let v: Vec<f32> = (0..d).map(|i| (i as f32 * 1e-3).sin()).collect();
    let p = unilora_core::Projection::new(42, total, d).unwrap();
    let mut buf = vec![0f32; 1 << 16];
    let mut acc = 0f32;
    for r in 0..reps {
        gather_rows(
            &p,
            &v,
            (r * (1u64 << 16)) % (total - 70000),
            &mut buf,
            which,
        );
        acc += buf[r as usize % 65536];
    }
    println!("{acc} rows={} {which:?}", reps * 65536);
}
