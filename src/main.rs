//! The `tpc` command line (docs/cli.md). Exit codes: 0 success, 1 a diagnosed error in the
//! user's program or data, 2 a usage error. Never a panic. This file holds the clap
//! definitions and each subcommand's dispatch; the plumbing they share is in `cli/`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;

use clap::{Parser, Subcommand, ValueEnum};

use tpc::diag::{Severity, CODES};

mod cli;
use cli::io::*;
use cli::predict::*;
use cli::tiles::*;

#[derive(Parser)]
#[command(
    name = "tpc",
    version,
    about = "Compile neural networks to Tensor Programs: finite-width runs and infinite-width limits",
    after_help = "The language, the command line and the theory are documented in the repository: \
                  docs/language.md, docs/cli.md, docs/theory.md; `tpc explain CODE` explains a diagnostic."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Copy, Clone, PartialEq, Eq, ValueEnum)]
enum Format {
    Text,
    Json,
}

#[derive(Copy, Clone, PartialEq, Eq, ValueEnum)]
enum EngineArg {
    Dense,
    Conditional,
}

impl From<EngineArg> for tpc::finite::exec::Engine {
    fn from(e: EngineArg) -> Self {
        match e {
            EngineArg::Dense => tpc::finite::exec::Engine::Dense,
            EngineArg::Conditional => tpc::finite::exec::Engine::Conditional,
        }
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Check a program: diagnostics only; exit 0 when there is no error
    Check { file: PathBuf },
    /// Print the tensor program: a numbered listing and the abc table
    Graph {
        file: PathBuf,
        /// Graphviz dot instead of the listing
        #[arg(long)]
        dot: bool,
        /// The `train` block unrolled into one program in the initial weights
        /// (docs/theory.md §6.1), with its limit coefficients
        #[arg(long)]
        unrolled: bool,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// The infinite-width limit: Z derivation, NNGP and NTK over the points, observes
    Limit {
        file: PathBuf,
        /// CSV of input points, one per row (docs/cli.md)
        #[arg(long)]
        inputs: Option<PathBuf>,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
        /// Particles of the feature-learning trajectory's particle engine (split over
        /// 16 replicas for the standard error f_t_se)
        #[arg(long, default_value_t = tpc::limit::particle::ParticleConfig::default().particles as u64,
              value_parser = clap::value_parser!(u64).range(32..=1_000_000_000))]
        particles: u64,
        /// β-side particles of each nonlinear outer product (Adam's hidden-matrix
        /// updates in the limit): every particle averages over this many others
        #[arg(long, default_value_t = tpc::limit::particle::ParticleConfig::default().outer_samples as u64,
              value_parser = clap::value_parser!(u64).range(2..=1_000_000))]
        outer_samples: u64,
        /// Also print the Z derivation of the unrolled training program, with its Ż
        /// terms (docs/theory.md §2.1, §6.1)
        #[arg(long)]
        unrolled: bool,
        /// Write the kernels (and f_t) as NumPy `.npy` files and `meta.json` into DIR;
        /// stdout then shows the metadata instead of the numbers (docs/cli.md)
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        /// With --out: compute the kernels band by band into the .npy files, holding
        /// about SIZE bytes of kernel blocks (e.g. 4G, 512M) [default: half the free
        /// memory, and only when the kernels would not fit in it]
        #[arg(long, value_name = "SIZE", requires = "out", value_parser = parse_size)]
        memory: Option<u128>,
        /// With --out: compute only this process's share of the bands, I/K (0-based),
        /// writing into the same files as the others; `auto` reads the rank and size of
        /// mpirun (Open MPI, MPICH) or of a Slurm job array
        #[arg(long, value_name = "I/K", requires = "out")]
        tile: Option<String>,
    },
    /// Time the limit computation (benchmarks; not part of CI)
    Bench {
        #[command(subcommand)]
        what: BenchCmd,
    },
    /// Run at finite width: sample the parameters K times, estimate NNGP, NTK and observes
    Run {
        file: PathBuf,
        /// The width n = N
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1_000_000_000))]
        width: u64,
        /// The number of independent draws K
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
        seeds: u64,
        /// The run's seed S: draw k of seed S is the same whatever K and the thread count
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// CSV of input points, one per row (docs/cli.md)
        #[arg(long)]
        inputs: Option<PathBuf>,
        /// How hidden-matrix products are drawn: dense (sample N×N, exact NTK) or
        /// conditional (each product from its law given the earlier ones; O(N·k) memory)
        #[arg(long, value_enum, default_value_t = EngineArg::Dense)]
        engine: EngineArg,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
        /// Write every estimate and its standard error (`*_se`) as NumPy `.npy` files
        /// and `meta.json` into DIR; stdout then shows the metadata (docs/cli.md)
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        /// Also write the parameters of draw 0 of seed S (the N(0, var) draws, without
        /// multipliers) as float64 arrays named by the .tp names, for `tpc emit` modules
        #[arg(long, value_name = "FILE.npz")]
        save_params: Option<PathBuf>,
    },
    /// Emit the network as a Python module (PyTorch) with its laws, optimizer and training
    Emit(tpc::emit::EmitArgs),
    /// Finite width against the limit: error per width, fitted convergence slope, SVG plot
    ///
    /// Computes the limit once, then at each width runs K draws (draw k of seed S is
    /// `tpc run`'s draw k) and reports, for the NNGP, the NTK and the observes, the
    /// error of the finite mean (max and RMS over entries, with its standard error) and
    /// the RMS over draws of one draw's deviation from the limit, whose log–log slope
    /// against the width is fitted by least squares (expected −1/2) with a standard
    /// error. Writes the plot to `<stem>_convergence.svg` in the current directory.
    Compare {
        file: PathBuf,
        /// Widths, comma-separated (at least two distinct)
        #[arg(long, value_delimiter = ',', num_args = 1.., default_values_t = tpc::report::compare::DEFAULT_WIDTHS,
              value_parser = clap::value_parser!(u64).range(1..=1_000_000_000))]
        widths: Vec<u64>,
        /// Draws K per width
        #[arg(long, default_value_t = tpc::report::compare::DEFAULT_SEEDS,
              value_parser = clap::value_parser!(u64).range(2..=100_000_000))]
        seeds: u64,
        /// The seed S, the same at every width
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// CSV of input points, one per row (docs/cli.md)
        #[arg(long)]
        inputs: Option<PathBuf>,
        /// How hidden-matrix products are drawn (as for `run`): conditional reaches
        /// widths of 10^6 and more
        #[arg(long, value_enum, default_value_t = EngineArg::Dense)]
        engine: EngineArg,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
        /// Where to write the plot [default: <stem>_convergence.svg in the current directory]
        #[arg(long, value_name = "OUT.svg")]
        svg: Option<PathBuf>,
        /// Write no plot
        #[arg(long, conflicts_with = "svg")]
        no_svg: bool,
    },
    /// Coordinate check (mup): every vector's size and change per training step against
    /// width, predicted vs measured exponents, SVG plot
    ///
    /// Trains the program (its `train` block) K times at each width (draw k of seed S is
    /// `tpc run`'s draw k, paired across widths) and records, at initialization and after
    /// each step, the RMS coordinate size of every vector and of its change since
    /// initialization, and |f| and |f − f_0|. The log–log slope of each against the width
    /// is fitted by least squares with a standard error over the paired draws, and set
    /// against the exponent predicted by tpc's exponent analysis (exact at
    /// initialization and for the first step; approximate for later steps); a difference
    /// beyond ±0.15 is flagged. Writes the plot to `<stem>_coord.svg` in the current
    /// directory: one panel per step, one line per vector.
    CoordCheck {
        file: PathBuf,
        /// Widths, comma-separated (at least two distinct)
        #[arg(long, value_delimiter = ',', num_args = 1.., default_values_t = tpc::report::coord::DEFAULT_WIDTHS,
              value_parser = clap::value_parser!(u64).range(1..=1_000_000_000))]
        widths: Vec<u64>,
        /// Draws K per width
        #[arg(long, default_value_t = tpc::report::coord::DEFAULT_SEEDS,
              value_parser = clap::value_parser!(u64).range(2..=100_000_000))]
        seeds: u64,
        /// Training steps [default: the program's `steps`; at most 1000, as in `train`]
        #[arg(long, value_parser = clap::value_parser!(u64).range(0..=tpc::lower::MAX_STEPS as u64))]
        steps: Option<u64>,
        /// The seed S, the same at every width
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
        /// Where to write the plot [default: <stem>_coord.svg in the current directory]
        #[arg(long, value_name = "OUT.svg")]
        svg: Option<PathBuf>,
        /// Write no plot
        #[arg(long, conflicts_with = "svg")]
        no_svg: bool,
    },
    /// Infinite-width prediction on test points: the NNGP posterior and the NTK
    /// gradient-descent ensemble (mean and covariance) at the given times
    ///
    /// Computes the limit NNGP and NTK over the training and test points together, then
    /// predicts as Neural Tangents' `predict.gradient_descent_mse_ensemble` does: `--t` is
    /// continuous time of gradient flow on (1/2|Y|)·‖f − Y‖² (|Y| target entries), `--steps`
    /// counts steps of the program's `train` block (its lr and loss, language.md), `inf` the
    /// converged ensemble (for the NNGP, the GP posterior). One output with C target
    /// columns predicts each column with the same kernel; O outputs need O columns.
    Predict(PredictArgs),
    /// Explain a diagnostic code
    Explain { code: String },
}

#[derive(Subcommand)]
enum BenchCmd {
    /// NNGP+NTK of FILE on the points: seconds per repeat (warm, in process) and peak RSS
    Limit {
        file: PathBuf,
        #[arg(long)]
        inputs: Option<PathBuf>,
        #[arg(long, default_value_t = 3)]
        repeat: usize,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
        /// Use the general block engine even for a layer chain (to time it)
        #[arg(long)]
        general: bool,
        /// With --general: the block engine without per-entry fusion (the baseline)
        #[arg(long, requires = "general")]
        unfused: bool,
    },
}

/// Peak resident set size of this process (Linux `VmHWM`), in bytes.
fn peak_rss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// A failure already reported to the user.
struct Reported;

/// Keeps freed memory in the process. Wide runs (N = 10^6: every vector 8 MB, every
/// N×k block more) allocate and free the same sizes over and over; by default glibc
/// serves blocks above its mmap threshold by fresh mappings and trims the heap, so each
/// reuse pays a page fault per 4 KiB. Raising both thresholds cut `rnn.tp` at
/// N = 10^6 (conditional engine, 2 draws) from 15.2 s to 10.2 s and its page faults
/// from 1.45 M to 0.55 M, for 6% more peak memory.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_memory() {
    // SAFETY: mallopt only sets allocator parameters; it is called before any thread
    // starts. A rejected value leaves glibc's default, which is also correct.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TRIM_THRESHOLD, -1); // -1: never trim (mallopt(3))
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_memory() {}

fn main() -> ExitCode {
    keep_freed_memory();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // A usage error under `--format json` is also one JSON object on stdout
            // (cli.md, "Errors as JSON"); help and version are not errors.
            let args: Vec<String> = std::env::args().collect();
            let json = args
                .windows(2)
                .any(|w| w[0] == "--format" && w[1] == "json")
                || args.iter().any(|a| a == "--format=json");
            if json && e.use_stderr() {
                JSON_ERRORS.store(true, Ordering::Relaxed);
                let text = e.to_string();
                let lines: Vec<&str> = text
                    .lines()
                    .take_while(|l| !l.trim().is_empty())
                    .map(str::trim)
                    .collect();
                let msg = lines.join(" ");
                print_json_error(None, msg.trim_start_matches("error: "), &[], None);
            }
            e.exit();
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Reported) => ExitCode::from(1),
    }
}

fn run(cli: Cli) -> Result<(), Reported> {
    let json = match &cli.cmd {
        Cmd::Graph { format, .. }
        | Cmd::Limit { format, .. }
        | Cmd::Run { format, .. }
        | Cmd::Compare { format, .. }
        | Cmd::CoordCheck { format, .. }
        | Cmd::Predict(PredictArgs { format, .. })
        | Cmd::Bench {
            what: BenchCmd::Limit { format, .. },
        } => *format == Format::Json,
        Cmd::Check { .. } | Cmd::Explain { .. } | Cmd::Emit(_) => false,
    };
    JSON_ERRORS.store(json, Ordering::Relaxed);
    match cli.cmd {
        Cmd::Check { file } => {
            let (name, src, prog, diags) = load(&file)?;
            emit(&name, &src, &diags);
            if prog.is_none() {
                return Err(Reported);
            }
            let count = |s| diags.iter().filter(|d| d.severity == s).count();
            let (warnings, notes) = (count(Severity::Warning), count(Severity::Note));
            if notes == 0 {
                eprintln!("{name}: ok ({warnings} warning(s))");
            } else {
                eprintln!("{name}: ok ({warnings} warning(s), {notes} note(s))");
            }
            Ok(())
        }
        Cmd::Graph {
            file,
            dot,
            unrolled,
            format,
        } => {
            let prog = compile_file(&file)?;
            let prog = if unrolled {
                if prog.train.is_none() {
                    return Err(fail(&format!(
                        "{}: --unrolled needs a `train` block",
                        file.display()
                    )));
                }
                tpc::autodiff::unroll(&prog, &[], tpc::autodiff::Width::Limit)
                    .map_err(|e| fail(&format!("{}: cannot unroll training: {e}", file.display())))?
                    .prog
            } else {
                prog
            };
            let text = if dot {
                tpc::report::graph::dot(&prog)
            } else if format == Format::Json {
                let v = tpc::report::graph::json(&prog);
                serde_json::to_string_pretty(&v)
                    .map_err(|e| fail(&format!("cannot write JSON: {e}")))?
                    + "\n"
            } else {
                tpc::report::graph::listing(&prog)
            };
            print_out(&text)
        }
        Cmd::Limit {
            file,
            inputs,
            format,
            particles,
            outer_samples,
            unrolled,
            out,
            memory,
            tile,
        } => {
            let prog = compile_file_for_limit(&file)?;
            let points = load_points(&prog, inputs.as_deref())?;
            if let Some(dir) = &out {
                if let Some(meta) = tiled_limit(&file, &prog, &points, dir, memory, tile)? {
                    return print_saved(format, dir, &meta);
                }
            }
            let der = tpc::limit::derivation(&prog).map_err(|e| limit_fail(&file, &e))?;
            let mut derivation = tpc::limit::derivation_text(&prog, &der);
            if unrolled {
                if prog.train.is_none() {
                    return Err(fail(&format!(
                        "{}: --unrolled needs a `train` block",
                        file.display()
                    )));
                }
                let eval: &[Vec<f64>] = if prog.inputs.is_empty() { &[] } else { &points };
                let u = tpc::autodiff::unroll(&prog, eval, tpc::autodiff::Width::Limit).map_err(
                    |e| fail(&format!("{}: cannot unroll training: {e}", file.display())),
                )?;
                derivation.push_str(
                    "\n# Z derivation of the unrolled training program (theory.md §2.1, §6.1)\n",
                );
                derivation.push_str(&tpc::limit::particle::derivation_text(&u.prog));
            }
            let cfg = tpc::limit::particle::ParticleConfig {
                particles: particles as usize,
                outer_samples: outer_samples as usize,
                ..Default::default()
            };
            let r =
                tpc::limit::limit_with(&prog, &points, &cfg).map_err(|e| limit_fail(&file, &e))?;
            if let Some(dir) = out {
                let meta = tpc::report::limit::save(&dir, &r)
                    .map_err(|e| fail(&format!("cannot write into `{}`: {e}", dir.display())))?;
                return print_saved(format, &dir, &meta);
            }
            if format == Format::Json {
                return print_stream(&tpc::report::limit::tree(&r));
            }
            print_out(&tpc::report::limit::text(&derivation, &r))
        }
        Cmd::Bench {
            what:
                BenchCmd::Limit {
                    file,
                    inputs,
                    repeat,
                    format,
                    general,
                    unfused,
                },
        } => {
            let prog = compile_file_for_limit(&file)?;
            let points = load_points(&prog, inputs.as_deref())?;
            let mut secs = Vec::new();
            for _ in 0..repeat.max(1) {
                let t = std::time::Instant::now();
                let r = if unfused {
                    tpc::limit::derivation(&prog)
                        .and_then(|der| tpc::limit::limit_unfused(&prog, &der, points.clone()))
                } else if general {
                    tpc::limit::derivation(&prog)
                        .and_then(|der| tpc::limit::limit_general(&prog, &der, points.clone()))
                } else {
                    tpc::limit::limit(&prog, &points)
                }
                .map_err(|e| limit_fail(&file, &e))?;
                secs.push(t.elapsed().as_secs_f64());
                drop(r);
            }
            let rss = peak_rss();
            let text = if format == Format::Json {
                serde_json::json!({"seconds": secs, "peak_rss_bytes": rss, "points": points.len()})
                    .to_string()
                    + "\n"
            } else {
                let best = secs.iter().copied().fold(f64::INFINITY, f64::min);
                format!(
                    "{} points: best {best:.3} s of {} (all: {secs:?}); peak RSS {:.1} MiB\n",
                    points.len(),
                    secs.len(),
                    rss.unwrap_or(0) as f64 / 1048576.0
                )
            };
            print_out(&text)
        }
        Cmd::Run {
            file,
            width,
            seeds,
            seed,
            inputs,
            engine,
            format,
            out,
            save_params,
        } => {
            let prog = compile_file(&file)?;
            let points = load_points(&prog, inputs.as_deref())?;
            if let Some(path) = &save_params {
                let n = usize::try_from(width).map_err(|_| fail("the width is too large"))?;
                let bytes = tpc::emit::npz::params_npz(&prog, n, seed, 0)
                    .map_err(|e| run_fail(&file, &prog, &e))?;
                std::fs::write(path, bytes)
                    .map_err(|e| fail(&format!("cannot write `{}`: {e}", path.display())))?;
            }
            let cfg = tpc::finite::exec::RunConfig {
                width: usize::try_from(width)
                    .map_err(|_| fail("the width is too large for this machine"))?,
                seeds: usize::try_from(seeds)
                    .map_err(|_| fail("too many seeds for this machine"))?,
                seed,
            };
            let r = with_progress(cfg.seeds, |tick| {
                let engine = engine.into();
                tpc::finite::exec::run_engine(&prog, &points, &cfg, engine, tick)
            })
            .map_err(|e| run_fail(&file, &prog, &e))?;
            if let Some(w) = r
                .train
                .as_ref()
                .and_then(|t| tpc::finite::train::divergence(&prog, t, cfg.width))
            {
                if let Some(src) = read_source(&file) {
                    emit(&file.display().to_string(), &src, &[w]);
                }
            }
            if let Some(dir) = out {
                let meta = tpc::report::run::save(&dir, &r)
                    .map_err(|e| fail(&format!("cannot write into `{}`: {e}", dir.display())))?;
                return print_saved(format, &dir, &meta);
            }
            if format == Format::Json {
                return print_stream(&tpc::report::run::tree(&r));
            }
            print_out(&tpc::report::run::text(&r))
        }
        Cmd::Compare {
            file,
            widths,
            seeds,
            seed,
            inputs,
            engine,
            format,
            svg,
            no_svg,
        } => {
            let distinct = slope_widths(&widths)?;
            let prog = compile_file_for_limit(&file)?;
            let points = load_points(&prog, inputs.as_deref())?;
            let lim = match tpc::limit::limit(&prog, &points) {
                Ok(l) => l,
                // Kernels not covered (E0030, e.g. moments inside vectors): the observes'
                // limits by particles, when there are observes and the particles run.
                Err(e) if e.code == "E0030" && !prog.observes.is_empty() => {
                    tpc::limit::observe_particles::observe_limit(
                        &prog,
                        &points,
                        &tpc::limit::particle::ParticleConfig::default(),
                        &e.message,
                    )
                    .map_err(|_| limit_fail(&file, &e))?
                }
                Err(e) => return Err(limit_fail(&file, &e)),
            };
            let cfg = tpc::report::compare::CompareConfig {
                widths: distinct,
                seeds: usize::try_from(seeds)
                    .map_err(|_| fail("too many seeds for this machine"))?,
                seed,
                engine: engine.into(),
            };
            let name = file_name(&file);
            let r = with_progress(cfg.seeds * cfg.widths.len(), |tick| {
                tpc::report::compare::compare(&prog, &points, &lim, &cfg, &name, tick)
            })
            .map_err(|e| run_fail(&file, &prog, &e))?;
            let shown = write_svg(&file, svg, no_svg, "convergence", || {
                tpc::report::compare::svg(&r)
            })?;
            print_report(
                format,
                shown.as_deref(),
                || tpc::report::compare::json(&r, shown.as_deref()),
                || tpc::report::compare::text(&r),
            )
        }
        Cmd::CoordCheck {
            file,
            widths,
            seeds,
            steps,
            seed,
            format,
            svg,
            no_svg,
        } => {
            let distinct = slope_widths(&widths)?;
            let prog = compile_file(&file)?;
            if prog.train.is_none() {
                return Err(fail(&format!(
                    "`{}` has no `train` block: a coordinate check trains the program (docs/language.md, Training)",
                    file.display()
                )));
            }
            let cfg = tpc::report::coord::CoordConfig {
                widths: distinct,
                seeds: usize::try_from(seeds)
                    .map_err(|_| fail("too many seeds for this machine"))?,
                seed,
                steps: steps
                    .map(usize::try_from)
                    .transpose()
                    .map_err(|_| fail("too many steps for this machine"))?,
            };
            let name = file_name(&file);
            let r = with_progress(cfg.seeds * cfg.widths.len(), |tick| {
                tpc::report::coord::coord_check(&prog, &cfg, &name, tick)
            })
            .map_err(|e| run_fail(&file, &prog, &e))?;
            let shown = write_svg(&file, svg, no_svg, "coord", || tpc::report::coord::svg(&r))?;
            print_report(
                format,
                shown.as_deref(),
                || tpc::report::coord::json(&r, shown.as_deref()),
                || tpc::report::coord::text(&r),
            )
        }
        Cmd::Predict(args) => predict(args),
        Cmd::Emit(a) => {
            let prog = compile_file(&a.file)?;
            let width = a.width.map(|w| w as usize);
            let text = tpc::emit::emit(&prog, a.target, &a.file.display().to_string(), width);
            match &a.output {
                Some(path) => std::fs::write(path, text)
                    .map_err(|e| fail(&format!("cannot write `{}`: {e}", path.display()))),
                None => print_out(&text),
            }
        }
        Cmd::Explain { code } => match CODES.iter().find(|c| c.0.eq_ignore_ascii_case(&code)) {
            Some((c, m)) => print_out(&format!("{c}: {m}\n")),
            None => Err(fail(&format!("unknown diagnostic code `{code}`"))),
        },
    }
}
