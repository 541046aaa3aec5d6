//! Finite-width kernels benchmark: Gaussian sampling and the products of a
//! depth-3 relu MLP's forward and backward pass on P points at once.
//!
//! ```text
//! cargo bench --bench finite_kernels                      # markdown tables
//! cargo bench --bench finite_kernels -- --json            # one JSON object per line
//! cargo bench --bench finite_kernels -- --sizes 1024,2048 --reps 5
//! cargo bench --bench finite_kernels -- --calibrate       # Seq vs rayon crossover
//! cargo bench --bench finite_kernels -- --no-sampler / --no-mlp
//! ```
//!
//! `benches/numpy_products.py` runs this binary with `--json` and times numpy on the
//! same product shapes in the same run, then prints one comparison table.
//!
//! The network (d = 32 inputs, width N, P points as columns):
//!
//! ```text
//! forward:  h1 = W1 x   g1 = relu(h1)      W1: N×d, x: d×P
//!           h2 = W2 g1  g2 = relu(h2)      W2: N×N
//!           h3 = W3 g2  g3 = relu(h3)      W3: N×N
//!           f  = vᵀ g3                     v: N×1 (readout), f: 1×P
//! backward: dg3 = v·1ᵀ  dh3 = dg3 ⊙ [h3>0]
//!           dg2 = W3ᵀ dh3  dh2 = dg2 ⊙ [h2>0]
//!           dg1 = W2ᵀ dh2  dh1 = dg1 ⊙ [h1>0]
//!           dx  = W1ᵀ dh1
//! ```
//!
//! Each repetition samples all parameters afresh (a new draw, as a Monte-Carlo run
//! over initialisations would) and then runs the pass; the medians are reported.

use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use nalgebra::DMatrix;
use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};
use rand_distr::StandardNormal;
use std::time::Instant;
use tpc::finite::linalg::{matmul_into, matmul_tn_into};
use tpc::finite::sample::{fill_normal, fill_normal_seq, normal_matrix, StreamKey};

const D: usize = 32;
const P: usize = 64;

struct Args {
    json: bool,
    sizes: Vec<usize>,
    reps: Option<usize>,
    calibrate: bool,
    sampler: bool,
    mlp: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        json: false,
        sizes: vec![1024, 2048, 4096, 8192],
        reps: None,
        calibrate: false,
        sampler: true,
        mlp: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--json" => a.json = true,
            "--calibrate" => a.calibrate = true,
            "--no-sampler" => a.sampler = false,
            "--no-mlp" => a.mlp = false,
            "--bench" => {} // passed by `cargo bench`
            "--sizes" => {
                let v = it.next().ok_or("--sizes needs a value")?;
                a.sizes = v
                    .split(',')
                    .map(|s| {
                        s.trim()
                            .parse::<usize>()
                            .map_err(|e| format!("bad size {s:?}: {e}"))
                    })
                    .collect::<Result<_, _>>()?;
            }
            "--reps" => {
                let v = it.next().ok_or("--reps needs a value")?;
                a.reps = Some(v.parse().map_err(|e| format!("bad --reps {v:?}: {e}"))?);
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(a)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

/// Runs `f` once to warm up, then `reps` times; returns the median seconds.
fn time_median(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut t = Vec::with_capacity(reps);
    for _ in 0..reps {
        let s = Instant::now();
        f();
        t.push(s.elapsed().as_secs_f64());
    }
    median(t)
}

// ---------------------------------------------------------------------------
// Sampler throughput
// ---------------------------------------------------------------------------

/// Median and minimum ns per value of each sampler.
struct SamplerResult {
    seq: (f64, f64),
    par: (f64, f64),
    rand_distr: (f64, f64),
    raw_u64: (f64, f64),
}

/// The samplers are timed in interleaved rounds on a 4096×512 buffer (16 MiB,
/// ~5 ms a fill), so that all four see the same conditions: on a shared VM the
/// speed of a core changes from second to second (see the notes in the report).
fn bench_sampler(rounds: usize) -> SamplerResult {
    let rows = 4096;
    let cols = 512;
    let n = (rows * cols) as f64;
    let mut buf = vec![0.0; rows * cols];
    let mut rng_rd = Xoshiro256PlusPlus::seed_from_u64(1);
    let mut rng_raw = Xoshiro256PlusPlus::seed_from_u64(2);
    let mut t = [Vec::new(), Vec::new(), Vec::new(), Vec::new()];
    for round in 0..=rounds {
        let key = StreamKey::new(1, round as u64, 0);
        let mut one = |k: usize, f: &mut dyn FnMut(&mut [f64])| {
            let s = Instant::now();
            f(&mut buf);
            let dt = s.elapsed().as_secs_f64() / n * 1e9;
            if round > 0 {
                t[k].push(dt);
            }
            std::hint::black_box(&buf);
        };
        one(0, &mut |b| {
            fill_normal_seq(b, rows, 1.0, key).expect("valid shape")
        });
        one(1, &mut |b| {
            fill_normal(b, rows, 1.0, key).expect("valid shape")
        });
        // Reference points: rand_distr's ziggurat on the same generator, and the
        // raw generator alone (the floor for any one-u64-per-value sampler).
        one(2, &mut |b| {
            for v in b.iter_mut() {
                *v = rng_rd.sample(StandardNormal);
            }
        });
        one(3, &mut |b| {
            for v in b.iter_mut() {
                *v = f64::from_bits(rand::Rng::next_u64(&mut rng_raw) >> 12);
            }
        });
    }
    let stat = |v: &Vec<f64>| {
        (
            median(v.clone()),
            v.iter().copied().fold(f64::INFINITY, f64::min),
        )
    };
    SamplerResult {
        seq: stat(&t[0]),
        par: stat(&t[1]),
        rand_distr: stat(&t[2]),
        raw_u64: stat(&t[3]),
    }
}

// ---------------------------------------------------------------------------
// MLP forward + backward
// ---------------------------------------------------------------------------

/// One product of the pass: `m×k` (transposed or not) times `k×n`.
struct Product {
    name: &'static str,
    trans_a: bool,
    m: usize,
    k: usize,
    n: usize,
    seconds: f64,
}

struct MlpResult {
    n: usize,
    reps: usize,
    sample_s: f64,
    normals: usize,
    products_s: f64,
    flops: f64,
    other_s: f64,
    products: Vec<Product>,
}

fn relu_into(dst: &mut DMatrix<f64>, src: &DMatrix<f64>) {
    for (d, &s) in dst.as_mut_slice().iter_mut().zip(src.as_slice()) {
        *d = s.max(0.0);
    }
}

fn mask_in_place(g: &mut DMatrix<f64>, h: &DMatrix<f64>) {
    for (d, &s) in g.as_mut_slice().iter_mut().zip(h.as_slice()) {
        if s <= 0.0 {
            *d = 0.0;
        }
    }
}

fn bench_mlp(n: usize, reps: usize) -> Result<MlpResult, String> {
    let e = |e: &dyn std::fmt::Display| e.to_string();
    let x = normal_matrix(D, P, 1.0, StreamKey::new(7, 0, 100)).map_err(|x| e(&x))?;
    let mut w1 = DMatrix::<f64>::zeros(n, D);
    let mut w2 = DMatrix::<f64>::zeros(n, n);
    let mut w3 = DMatrix::<f64>::zeros(n, n);
    let mut v = DMatrix::<f64>::zeros(n, 1);
    let dout = DMatrix::<f64>::from_element(1, P, 1.0);
    let z = || DMatrix::<f64>::zeros(n, P);
    let (mut h1, mut h2, mut h3) = (z(), z(), z());
    let (mut g1, mut g2, mut g3) = (z(), z(), z());
    let (mut dg1, mut dg2, mut dg3) = (z(), z(), z());
    let mut f = DMatrix::<f64>::zeros(1, P);
    let mut dx = DMatrix::<f64>::zeros(D, P);

    let names: [(&str, bool, usize, usize, usize); 8] = [
        ("W1·x", false, n, D, P),
        ("W2·g1", false, n, n, P),
        ("W3·g2", false, n, n, P),
        ("vᵀ·g3", true, 1, n, P),
        ("v·1ᵀ", false, n, 1, P),
        ("W3ᵀ·dh3", true, n, n, P),
        ("W2ᵀ·dh2", true, n, n, P),
        ("W1ᵀ·dh1", true, D, n, P),
    ];
    let mut t_prod = vec![Vec::new(); names.len()];
    let (mut t_sample, mut t_other) = (Vec::new(), Vec::new());

    // Repetition 0 is a warm-up (page faults of fresh buffers, rayon start-up).
    for rep in 0..=reps {
        let draw = rep as u64;
        let s = Instant::now();
        let sd_in = 1.0 / (D as f64).sqrt();
        let sd = 1.0 / (n as f64).sqrt();
        fill_normal(w1.as_mut_slice(), n, sd_in, StreamKey::new(7, draw, 0)).map_err(|x| e(&x))?;
        fill_normal(w2.as_mut_slice(), n, sd, StreamKey::new(7, draw, 1)).map_err(|x| e(&x))?;
        fill_normal(w3.as_mut_slice(), n, sd, StreamKey::new(7, draw, 2)).map_err(|x| e(&x))?;
        fill_normal(v.as_mut_slice(), n, sd, StreamKey::new(7, draw, 3)).map_err(|x| e(&x))?;
        let sample = s.elapsed().as_secs_f64();

        let mut tp = [0.0; 8];
        let mut other = 0.0;
        macro_rules! timed {
            ($acc:expr, $body:expr) => {{
                let s = Instant::now();
                $body;
                $acc += s.elapsed().as_secs_f64();
            }};
        }
        timed!(
            tp[0],
            matmul_into(&mut h1, 1.0, &w1, &x, 0.0).map_err(|x| e(&x))?
        );
        timed!(other, relu_into(&mut g1, &h1));
        timed!(
            tp[1],
            matmul_into(&mut h2, 1.0, &w2, &g1, 0.0).map_err(|x| e(&x))?
        );
        timed!(other, relu_into(&mut g2, &h2));
        timed!(
            tp[2],
            matmul_into(&mut h3, 1.0, &w3, &g2, 0.0).map_err(|x| e(&x))?
        );
        timed!(other, relu_into(&mut g3, &h3));
        timed!(
            tp[3],
            matmul_tn_into(&mut f, 1.0, &v, &g3, 0.0).map_err(|x| e(&x))?
        );
        timed!(
            tp[4],
            matmul_into(&mut dg3, 1.0, &v, &dout, 0.0).map_err(|x| e(&x))?
        );
        timed!(other, mask_in_place(&mut dg3, &h3));
        timed!(
            tp[5],
            matmul_tn_into(&mut dg2, 1.0, &w3, &dg3, 0.0).map_err(|x| e(&x))?
        );
        timed!(other, mask_in_place(&mut dg2, &h2));
        timed!(
            tp[6],
            matmul_tn_into(&mut dg1, 1.0, &w2, &dg2, 0.0).map_err(|x| e(&x))?
        );
        timed!(other, mask_in_place(&mut dg1, &h1));
        timed!(
            tp[7],
            matmul_tn_into(&mut dx, 1.0, &w1, &dg1, 0.0).map_err(|x| e(&x))?
        );
        std::hint::black_box((&f, &dx));
        if rep > 0 {
            t_sample.push(sample);
            t_other.push(other);
            for (acc, t) in t_prod.iter_mut().zip(tp) {
                acc.push(t);
            }
        }
    }
    let products: Vec<Product> = names
        .iter()
        .zip(t_prod)
        .map(|(&(name, trans_a, m, k, nn), t)| Product {
            name,
            trans_a,
            m,
            k,
            n: nn,
            seconds: median(t),
        })
        .collect();
    let flops = products
        .iter()
        .map(|p| 2.0 * (p.m * p.k * p.n) as f64)
        .sum();
    Ok(MlpResult {
        n,
        reps,
        sample_s: median(t_sample),
        normals: n * D + 2 * n * n + n,
        products_s: products.iter().map(|p| p.seconds).sum(),
        flops,
        other_s: median(t_other),
        products,
    })
}

// ---------------------------------------------------------------------------
// Par threshold calibration
// ---------------------------------------------------------------------------

fn calibrate() {
    println!("\n### Par threshold: faer Seq vs rayon (GFLOP/s, median of 7)\n");
    println!("| m×k · k×n | MACs | Seq | rayon | rayon/Seq |\n|---|---|---|---|---|");
    let square = [16usize, 24, 32, 48, 64, 96, 128, 192, 256].map(|s| (s, s, s));
    let thin = [32usize, 64, 128, 192, 256, 384, 512].map(|s| (s, s, P));
    for (m, k, n) in square.into_iter().chain(thin) {
        let a = vec![1.0; m * k];
        let b = vec![1.0; k * n];
        let mut c = vec![0.0; m * n];
        let flops = 2.0 * (m * k * n) as f64;
        let inner = ((2e8 / flops) as usize).max(1);
        let mut run = |par: Par| {
            time_median(7, || {
                for _ in 0..inner {
                    matmul(
                        MatMut::from_column_major_slice_mut(&mut c, m, n),
                        Accum::Replace,
                        MatRef::from_column_major_slice(&a, m, k),
                        MatRef::from_column_major_slice(&b, k, n),
                        1.0,
                        par,
                    );
                }
            }) / inner as f64
        };
        let seq = run(Par::Seq);
        let par = run(Par::rayon(0));
        println!(
            "| {m}×{k} · {k}×{n} | {} | {:.1} | {:.1} | {:.2} |",
            m * k * n,
            flops / seq / 1e9,
            flops / par / 1e9,
            seq / par
        );
    }
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(msg) => {
            eprintln!("finite_kernels: {msg}");
            std::process::exit(2);
        }
    };
    let threads = rayon::current_num_threads();
    if args.calibrate {
        calibrate();
        return;
    }
    if args.sampler {
        let s = bench_sampler(15);
        if args.json {
            println!(
                "{}",
                serde_json::json!({
                    "kind": "sampler", "threads": threads,
                    "ns_1t": s.seq, "ns_par": s.par, "ns_rand_distr_1t": s.rand_distr, "ns_raw_u64_1t": s.raw_u64,
                })
            );
        } else {
            println!("### Sampling N(0,1), f64, 4096×512 buffer, 15 interleaved rounds ({threads} rayon threads)\n");
            println!("| sampler | ns/normal median | ns/normal best | normals/s median |\n|---|---|---|---|");
            for (name, (med, best)) in [
                ("tpc ziggurat, 1 thread".to_string(), s.seq),
                (
                    format!("tpc ziggurat, {threads} threads (per-column streams)"),
                    s.par,
                ),
                (
                    "rand_distr StandardNormal + Xoshiro256++, 1 thread".to_string(),
                    s.rand_distr,
                ),
                (
                    "raw Xoshiro256++ u64 (floor), 1 thread".to_string(),
                    s.raw_u64,
                ),
            ] {
                println!("| {name} | {med:.2} | {best:.2} | {:.2e} |", 1e9 / med);
            }
        }
    }
    if !args.mlp {
        return;
    }
    if !args.json {
        println!("\n### Depth-3 relu MLP forward + backward, d = {D}, P = {P}, {threads} threads (medians)\n");
        println!(
            "| N | sample s | normals/s | products s | products GFLOP/s | relu/mask s | total s |\n|---|---|---|---|---|---|---|"
        );
    }
    let mut per_product = Vec::new();
    for &n in &args.sizes {
        let reps = args.reps.unwrap_or(if n >= 8192 { 3 } else { 5 });
        let r = match bench_mlp(n, reps) {
            Ok(r) => r,
            Err(msg) => {
                eprintln!("finite_kernels: N = {n}: {msg}");
                std::process::exit(1);
            }
        };
        if args.json {
            let products: Vec<_> = r
                .products
                .iter()
                .map(|p| {
                    serde_json::json!({"name": p.name, "trans_a": p.trans_a, "m": p.m, "k": p.k, "n": p.n, "seconds": p.seconds})
                })
                .collect();
            println!(
                "{}",
                serde_json::json!({
                    "kind": "mlp", "n": r.n, "p": P, "d": D, "reps": r.reps, "threads": threads,
                    "sample_s": r.sample_s, "normals": r.normals, "products_s": r.products_s,
                    "flops": r.flops, "other_s": r.other_s, "products": products,
                })
            );
        } else {
            println!(
                "| {} | {:.4} | {:.2e} | {:.4} | {:.1} | {:.4} | {:.4} |",
                r.n,
                r.sample_s,
                r.normals as f64 / r.sample_s,
                r.products_s,
                r.flops / r.products_s / 1e9,
                r.other_s,
                r.sample_s + r.products_s + r.other_s
            );
            per_product.push(r);
        }
    }
    if !args.json {
        println!("\n### Per product (GFLOP/s)\n");
        println!(
            "| N | {} |",
            per_product.first().map_or(String::new(), |r| r
                .products
                .iter()
                .map(|p| p.name)
                .collect::<Vec<_>>()
                .join(" | "))
        );
        println!("|---|{}", "---|".repeat(8));
        for r in &per_product {
            let cells: Vec<String> = r
                .products
                .iter()
                .map(|p| format!("{:.1}", 2.0 * (p.m * p.k * p.n) as f64 / p.seconds / 1e9))
                .collect();
            println!("| {} | {} |", r.n, cells.join(" | "));
        }
    }
}
