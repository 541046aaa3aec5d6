//! The `tpc` command line (docs/cli.md). Exit codes: 0 success, 1 a diagnosed error in the
//! user's program or data, 2 a usage error. Never a panic.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};

use clap::{Parser, Subcommand, ValueEnum};
use codespan_reporting::term::termcolor::{ColorChoice, StandardStream};

use tpc::diag::{Diagnostic, Renderer, Severity, CODES};
use tpc::ir::Program;

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

/// The distinct widths of `--widths`, sorted; a slope needs two (a usage error, exit 2).
fn slope_widths(widths: &[u64]) -> Result<Vec<usize>, Reported> {
    let mut distinct = widths.to_vec();
    distinct.sort_unstable();
    distinct.dedup();
    if distinct.len() < 2 {
        use clap::CommandFactory;
        print_json_error(
            None,
            "--widths needs at least two distinct widths to fit a slope",
            &[],
            None,
        );
        Cli::command()
            .error(
                clap::error::ErrorKind::ValueValidation,
                "--widths needs at least two distinct widths to fit a slope",
            )
            .exit();
    }
    distinct
        .iter()
        .map(|&w| usize::try_from(w))
        .collect::<Result<_, _>>()
        .map_err(|_| fail("a width is too large for this machine"))
}

/// The file's name without its directories, for captions.
fn file_name(file: &Path) -> String {
    file.file_name().map_or_else(
        || file.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

/// Prints a `compare` / `coord-check` report as JSON or as text with the plot's path.
fn print_report(
    format: Format,
    shown: Option<&str>,
    json: impl FnOnce() -> serde_json::Value,
    text: impl FnOnce() -> String,
) -> Result<(), Reported> {
    let out = if format == Format::Json {
        serde_json::to_string_pretty(&json())
            .map_err(|e| fail(&format!("cannot write JSON: {e}")))?
            + "\n"
    } else {
        with_plot_line(text(), shown)
    };
    print_out(&out)
}

/// Writes the SVG of `compare` / `coord-check` (unless `--no-svg`) to `--svg` or to
/// `<stem>_<suffix>.svg`; returns the path written.
fn write_svg(
    file: &Path,
    svg: Option<PathBuf>,
    no_svg: bool,
    suffix: &str,
    doc: impl FnOnce() -> Result<String, String>,
) -> Result<Option<String>, Reported> {
    if no_svg {
        return Ok(None);
    }
    let path = svg.unwrap_or_else(|| {
        let stem = file
            .file_stem()
            .map_or_else(|| "tpc".to_string(), |s| s.to_string_lossy().into_owned());
        PathBuf::from(format!("{stem}_{suffix}.svg"))
    });
    let doc = doc().map_err(|e| fail(&e))?;
    std::fs::write(&path, doc)
        .map_err(|e| fail(&format!("cannot write `{}`: {e}", path.display())))?;
    Ok(Some(path.display().to_string()))
}

/// A text report with the plot's path appended.
fn with_plot_line(mut text: String, shown: Option<&str>) -> String {
    if let Some(p) = shown {
        text.push_str(&format!("\n# plot: {p}\n"));
    }
    text
}

/// Reads `--inputs`, or the default points (training data, or none needed).
fn load_points(prog: &Program, inputs: Option<&Path>) -> Result<Vec<Vec<f64>>, Reported> {
    match inputs {
        Some(path) => {
            let name = path.display().to_string();
            let bytes = read_limited(path, tpc::data::MAX_BYTES)?;
            // A leading byte-order mark is dropped before parsing, so that the rendered
            // file and the spans agree (an editor does not count it as a column).
            let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes);
            let text = match std::str::from_utf8(bytes) {
                Ok(t) => t,
                Err(e) => {
                    let at = e.valid_up_to();
                    let shown = String::from_utf8_lossy(bytes).into_owned();
                    let pos = shown.find('\u{FFFD}').unwrap_or(at.min(shown.len()));
                    let d = Diagnostic::error(
                        "E0028",
                        format!("`{name}` is not valid UTF-8 text (byte {at})"),
                        tpc::ir::Span::new(pos, pos + '\u{FFFD}'.len_utf8()),
                        "invalid byte",
                    )
                    .with_help("--inputs is a CSV text file: numbers separated by commas, one point per row");
                    emit(&name, &shown, &[d]);
                    return Err(Reported);
                }
            };
            tpc::data::parse_points(prog, &name, text).map_err(|e| {
                emit(&name, text, &[e.diagnostic()]);
                Reported
            })
        }
        None => tpc::data::default_points(prog).ok_or_else(|| {
            fail("this program has inputs: pass points with `--inputs FILE` (CSV, one point per row)")
        }),
    }
}

/// A limit that cannot be computed, reported against the node responsible (or the
/// input declaration of a bad point), with its code.
fn limit_fail(file: &Path, e: &tpc::limit::LimitError) -> Reported {
    let name = file.display().to_string();
    match (e.diagnostic(), read_source(file)) {
        (Some(d), Some(src)) => emit(&name, &src, &[d]),
        _ => {
            eprintln!("error[{}]: no limit: {}", e.code, e.message);
            print_json_error(Some(e.code), &e.message, &[], e.note.as_deref());
        }
    }
    Reported
}

/// Runs `f` with a progress bar on stderr that appears only when stderr is a terminal
/// and the run has taken more than a second (quick runs and pipes stay silent).
fn with_progress<T>(draws: usize, f: impl FnOnce(&(dyn Fn() + Sync)) -> T) -> T {
    with_progress_of(draws, "draws", f)
}

/// [`with_progress`] counting `unit` (e.g. "band pairs").
fn with_progress_of<T>(draws: usize, unit: &str, f: impl FnOnce(&(dyn Fn() + Sync)) -> T) -> T {
    use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
    let tty = std::io::stderr().is_terminal();
    let bar = ProgressBar::with_draw_target(Some(draws as u64), ProgressDrawTarget::hidden());
    if let Ok(style) = ProgressStyle::with_template(&format!(
        "{{elapsed_precise}} [{{bar:40}}] {{pos}}/{{len}} {unit}, eta {{eta}}"
    )) {
        bar.set_style(style.progress_chars("=> "));
    }
    let start = std::time::Instant::now();
    let shown = AtomicBool::new(false);
    let tick = || {
        bar.inc(1);
        if tty && !shown.load(Ordering::Relaxed) && start.elapsed().as_secs_f64() > 1.0 {
            shown.store(true, Ordering::Relaxed);
            bar.set_draw_target(ProgressDrawTarget::stderr());
        }
    };
    let out = f(&tick);
    bar.finish_and_clear();
    out
}

/// A run that failed (memory, overflow), reported against the node responsible (or
/// the source span the error carries, for nodes of the unrolled training program);
/// a divergence in training also points at the learning rate.
fn run_fail(file: &Path, prog: &Program, e: &tpc::finite::exec::RunError) -> Reported {
    let name = file.display().to_string();
    match (e.diagnostic(prog), read_source(file), e.code) {
        (Some(d), Some(src), _) => emit(&name, &src, &[d]),
        (_, _, Some(code)) => {
            eprintln!("error[{code}]: {}", e.message);
            if let Some(h) = &e.help {
                eprintln!("  = help: {h}");
            }
            print_json_error(Some(code), &e.message, &[], e.help.as_deref());
        }
        _ => {
            eprintln!("error: {}", e.message);
            print_json_error(None, &e.message, &[], e.help.as_deref());
        }
    }
    Reported
}

/// The contents of `path`, reading at most `limit` + 1 bytes (`Read::take`): a file
/// over the limit is refused after that many bytes, so `/dev/zero` fails at once and
/// `/dev/urandom` cannot hang the reader.
fn read_limited(path: &Path, limit: usize) -> Result<Vec<u8>, Reported> {
    use std::io::Read;
    let name = path.display();
    let f = std::fs::File::open(path).map_err(|e| fail(&format!("cannot read `{name}`: {e}")))?;
    let mut bytes = Vec::new();
    f.take(limit as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| fail(&format!("cannot read `{name}`: {e}")))?;
    if bytes.len() > limit {
        return Err(fail(&format!(
            "`{name}` is larger than {} MiB; tpc reads at most {limit} bytes",
            limit >> 20
        )));
    }
    Ok(bytes)
}

fn print_out(s: &str) -> Result<(), Reported> {
    let mut out = std::io::stdout().lock();
    // A closed pipe (`tpc graph f | head`) is not an error worth a message.
    let _ = out.write_all(s.as_bytes());
    let _ = out.flush();
    Ok(())
}

fn fail(msg: &str) -> Reported {
    eprintln!("error: {msg}");
    print_json_error(None, msg, &[], None);
    Reported
}

/// Streams a JSON report to stdout ([`tpc::report::stream::Node::write_pretty`]): no
/// more memory than a row beyond the matrices themselves.
fn print_stream(tree: &tpc::report::stream::Node<'_>) -> Result<(), Reported> {
    let mut out = std::io::BufWriter::with_capacity(1 << 16, std::io::stdout().lock());
    // A closed pipe is not an error worth a message (as in `print_out`).
    let _ = tree.write_pretty(&mut out);
    let _ = out.flush();
    Ok(())
}

/// After `--out DIR`: the metadata as JSON, or a short list of the files as text.
fn print_saved(format: Format, dir: &Path, meta: &serde_json::Value) -> Result<(), Reported> {
    if format == Format::Json {
        let text = serde_json::to_string_pretty(meta)
            .map_err(|e| fail(&format!("cannot write JSON: {e}")))?;
        return print_out(&(text + "\n"));
    }
    let mut s = format!(
        "# wrote into {}: meta.json and NumPy .npy files (float64, row-major; {})\n",
        dir.display(),
        tpc::report::limit::KERNEL_ORDER
    );
    if let Some(files) = meta.get("files").and_then(|f| f.as_object()) {
        for (name, f) in files {
            let shape = f["shape"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|x| x.to_string())
                        .collect::<Vec<_>>()
                        .join("×")
                })
                .unwrap_or_default();
            s.push_str(&format!(
                "  {name}: {} ({shape})\n",
                f["file"].as_str().unwrap_or("")
            ));
        }
    }
    print_out(&s)
}

/// `--format json` was asked for: failures are also printed as one JSON object on
/// stdout (docs/cli.md, "Errors as JSON").
static JSON_ERRORS: AtomicBool = AtomicBool::new(false);
/// At most one JSON error object per run.
static JSON_ERROR_PRINTED: AtomicBool = AtomicBool::new(false);

/// 1-based line and column (in characters) of byte `at` of `src`.
fn line_column(src: &str, at: usize) -> Option<(usize, usize)> {
    let before = src.get(..at)?;
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    Some((line, col))
}

/// One diagnostic as JSON: code, severity, message, file, line, column, span, label,
/// help, notes.
fn diagnostic_json(file: Option<&str>, src: Option<&str>, d: &Diagnostic) -> serde_json::Value {
    let (line, column) = src
        .and_then(|s| line_column(s, d.span.start))
        .map_or((None, None), |(l, c)| (Some(l), Some(c)));
    let severity = match d.severity {
        Severity::Error => "error",
        Severity::Warning => "warning",
        Severity::Note => "note",
    };
    serde_json::json!({
        "code": d.code,
        "severity": severity,
        "message": d.message,
        "file": file,
        "line": line,
        "column": column,
        "span": [d.span.start, d.span.end],
        "label": d.label,
        "help": d.help,
        "notes": d.notes,
    })
}

/// Under `--format json`, prints `{"error": {...}, "diagnostics": [...]}` on stdout
/// (once per run): the first error diagnostic, else `code` and `message`.
fn print_json_error(
    code: Option<&str>,
    message: &str,
    diags: &[serde_json::Value],
    help: Option<&str>,
) {
    if !JSON_ERRORS.load(Ordering::Relaxed) || JSON_ERROR_PRINTED.swap(true, Ordering::Relaxed) {
        return;
    }
    let error = diags
        .iter()
        .find(|d| d["severity"] == "error")
        .cloned()
        .unwrap_or_else(|| {
            serde_json::json!({"code": code, "severity": "error", "message": message, "help": help})
        });
    let v = serde_json::json!({"error": error, "diagnostics": diags});
    let text = serde_json::to_string_pretty(&v).unwrap_or_default();
    let _ = print_out(&(text + "\n"));
}

/// A program's text as `load` checked it (a leading byte-order mark dropped), so that
/// spans from the program render at the right place.
fn read_source(file: &Path) -> Option<String> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(file)
        .ok()?
        .take(tpc::syntax::MAX_SOURCE as u64 + 1)
        .read_to_end(&mut bytes)
        .ok()?;
    let s = String::from_utf8(bytes).ok()?;
    Some(s.strip_prefix('\u{FEFF}').map(str::to_string).unwrap_or(s))
}

/// Reads and checks a file: its display name, text, program (if no error) and diagnostics.
fn load(path: &Path) -> Result<(String, String, Option<Program>, Vec<Diagnostic>), Reported> {
    let name = path.display().to_string();
    let bytes = read_limited(path, tpc::syntax::MAX_SOURCE)?;
    let (src, prog, diags) = tpc::check_bytes(&bytes);
    Ok((name, src, prog, diags))
}

/// Reads, checks and reports; the program when there was no error.
fn compile_file(path: &Path) -> Result<Program, Reported> {
    let (name, src, prog, diags) = load(path)?;
    emit(&name, &src, &diags);
    prog.ok_or(Reported)
}

/// [`compile_file`] for commands that compute the limit: an expectation that does not
/// exist is then the limit's error (E0031 at the same span), not also a warning.
fn compile_file_for_limit(path: &Path) -> Result<Program, Reported> {
    let (name, src, prog, mut diags) = load(path)?;
    diags.retain(|d| d.is_error() || d.code != tpc::ir::integrability::CODE);
    emit(&name, &src, &diags);
    prog.ok_or(Reported)
}

fn emit(name: &str, src: &str, diags: &[Diagnostic]) {
    if diags.is_empty() {
        return;
    }
    if diags.iter().any(Diagnostic::is_error) {
        let all: Vec<_> = diags
            .iter()
            .map(|d| diagnostic_json(Some(name), Some(src), d))
            .collect();
        print_json_error(None, "", &all, None);
    }
    let choice = if std::io::stderr().is_terminal() {
        ColorChoice::Auto
    } else {
        ColorChoice::Never
    };
    let mut err = StandardStream::stderr(choice);
    Renderer::new(name, src).emit(&mut err, diags);
}

/// `tpc predict`'s options.
#[derive(clap::Args)]
struct PredictArgs {
    file: PathBuf,
    /// CSV of training points, one per row [default: the `train` block's data]
    #[arg(long, requires = "targets")]
    train: Option<PathBuf>,
    /// CSV of training targets, one row per training point
    #[arg(long, requires = "train")]
    targets: Option<PathBuf>,
    /// CSV of test points, one per row
    #[arg(long)]
    test: PathBuf,
    /// CSV of test targets: adds test MSE (and accuracy, with several columns)
    #[arg(long)]
    test_targets: Option<PathBuf>,
    /// Times of gradient flow, comma-separated; `inf` for the converged ensemble
    #[arg(long, value_delimiter = ',', num_args = 1..)]
    t: Vec<String>,
    /// Discrete steps of the `train` block's gradient descent, comma-separated
    #[arg(long, value_delimiter = ',', num_args = 1..,
              value_parser = clap::value_parser!(u64).range(0..=1_000_000_000))]
    steps: Vec<u64>,
    /// Diagonal regularization ε of the training kernels: ε·trace/size (relative,
    /// NT's default) or ε (with --diag-reg-absolute)
    #[arg(long, default_value_t = 0.0)]
    diag_reg: f64,
    #[arg(long)]
    diag_reg_absolute: bool,
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
    /// Write means and covariances as NumPy `.npy` files and `meta.json` into DIR
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
}

/// `tpc predict`: the limit kernels over training and test points together, then the
/// NNGP and NTK predictors ([`tpc::predict`]) at every time asked for.
fn predict(a: PredictArgs) -> Result<(), Reported> {
    let file = a.file.as_path();
    let mut prog = compile_file_for_limit(file)?;
    let what = file.display();
    if prog.inputs.is_empty() {
        return Err(fail(&format!(
            "{what}: prediction needs a program with an `input`"
        )));
    }
    let (xs, ys) = match (&a.train, &a.targets) {
        (Some(x), Some(y)) => {
            let xs = load_points(&prog, Some(x))?;
            let ys = load_targets(y, xs.len())?;
            (xs, ys)
        }
        _ => match &prog.train {
            Some(tr) => tr.data.iter().map(|s| (s.x.clone(), s.y.clone())).unzip(),
            None => {
                return Err(fail(&format!(
                    "{what}: give --train and --targets (the program has no `train` block \
                     whose data could be used)"
                )))
            }
        },
    };
    let xt = load_points(&prog, Some(&a.test))?;
    let yt = match &a.test_targets {
        Some(p) => Some(load_targets(p, xt.len())?),
        None => None,
    };
    let cols = ys.first().map_or(0, Vec::len);
    if let Some(yt) = &yt {
        if yt.first().map_or(0, Vec::len) != cols {
            return Err(fail(&format!(
                "the test targets have {} columns, the training targets {cols}",
                yt.first().map_or(0, Vec::len)
            )));
        }
    }
    let mut times = Vec::new();
    for s in &a.t {
        match s.trim() {
            "inf" | "infinity" => times.push(tpc::predict::Time::Infinity),
            v => match v.parse::<f64>() {
                Ok(t) if t.is_finite() && t >= 0.0 => times.push(tpc::predict::Time::Flow(t)),
                _ => {
                    return Err(fail(&format!(
                        "--t {v}: a time is a finite number ≥ 0, or `inf`"
                    )))
                }
            },
        }
    }
    if !a.steps.is_empty() {
        let Some(lr) = prog.train.as_ref().map(|t| t.lr) else {
            return Err(fail(&format!(
                "{what}: --steps counts steps of the `train` block's gradient descent, and the \
                 program has none: use --t (continuous time)"
            )));
        };
        for &k in &a.steps {
            times.push(tpc::predict::Time::Steps {
                steps: k as usize,
                lr,
            });
        }
    }
    if times.is_empty() {
        times.push(tpc::predict::Time::Infinity);
    }
    let outputs = prog.output_names();
    let prior: Vec<f64> = prog
        .outputs
        .iter()
        .map(|&o| match &prog.node(o).op {
            tpc::ir::Op::Output { constant, .. } => *constant,
            _ => 0.0,
        })
        .collect();
    // The kernels only: the `train` block's own trajectory is not needed here.
    prog.train = None;
    let all: Vec<Vec<f64>> = xs.iter().chain(&xt).cloned().collect();
    let r = tpc::limit::limit(&prog, &all).map_err(|e| limit_fail(file, &e))?;
    let (Some(k), Some(th)) = (&r.nngp, &r.ntk) else {
        let note = r.nngp_note.or(r.ntk_note).unwrap_or_default();
        return Err(fail(&format!(
            "{what}: the limit kernels are not finite: {note}"
        )));
    };
    let matrix = |rows: &[Vec<f64>]| {
        let c = rows.first().map_or(0, Vec::len);
        nalgebra::DMatrix::from_fn(rows.len(), c, |i, j| rows[i][j])
    };
    let (y, ytm) = (matrix(&ys), yt.as_deref().map(matrix));
    let prob = tpc::predict::Problem {
        nngp: k,
        ntk: th,
        outputs: outputs.len(),
        train: xs.len(),
        targets: &y,
        prior_mean: &prior,
        diag_reg: a.diag_reg,
        diag_reg_absolute: a.diag_reg_absolute,
    };
    let preds = prob
        .predict(&times)
        .map_err(|e| fail(&format!("{what}: {e}")))?;
    if let Some(dir) = &a.out {
        let meta = tpc::report::predict::save(dir, &outputs, xs.len(), &preds, ytm.as_ref())
            .map_err(|e| fail(&format!("cannot write into `{}`: {e}", dir.display())))?;
        let text = serde_json::to_string_pretty(&meta)
            .map_err(|e| fail(&format!("cannot write JSON: {e}")))?;
        return print_out(&(text + "\n"));
    }
    if a.format == Format::Json {
        let v = tpc::report::predict::json(&outputs, xs.len(), &preds, ytm.as_ref());
        let text = serde_json::to_string_pretty(&v)
            .map_err(|e| fail(&format!("cannot write JSON: {e}")))?;
        return print_out(&(text + "\n"));
    }
    print_out(&tpc::report::predict::text(
        &outputs,
        xs.len(),
        &preds,
        ytm.as_ref(),
    ))
}

/// Reads a CSV of targets, `rows` rows (E0028 against the file when malformed).
fn load_targets(path: &Path, rows: usize) -> Result<Vec<Vec<f64>>, Reported> {
    let name = path.display().to_string();
    let bytes = read_limited(path, tpc::data::MAX_BYTES)?;
    let text = String::from_utf8_lossy(&bytes).into_owned();
    tpc::data::parse_targets(&name, &text, rows).map_err(|e| {
        emit(&name, &text, &[e.diagnostic()]);
        Reported
    })
}

/// A size such as `4G`, `512M`, `100000` (bytes; K, M, G, T are powers of 1024).
fn parse_size(s: &str) -> Result<u128, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u128 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("`{s}`: a size is a number with K, M, G or T")),
            };
            (&t[..i], m)
        }
        _ => (t, 1),
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("`{s}`: a size is a number with K, M, G or T"))?;
    if !(v.is_finite() && v > 0.0) {
        return Err(format!("`{s}`: a size is positive"));
    }
    Ok((v * mult as f64) as u128)
}

/// `tpc limit --out DIR` band by band ([`tpc::tiles`]) when asked for (`--memory`,
/// `--tile`) or when the kernels would not fit in the free memory; `None` to compute
/// them in memory as usual.
fn tiled_limit(
    file: &Path,
    prog: &Program,
    points: &[Vec<f64>],
    dir: &Path,
    memory: Option<u128>,
    tile: Option<String>,
) -> Result<Option<serde_json::Value>, Reported> {
    let free = tpc::machine::mem_available();
    let n = (prog.outputs.len().max(1) * points.len()) as u128;
    // The in-memory path holds ≈ 3 n×n matrices at its peak (README, "Outputs").
    let too_big = free.is_some_and(|f| 3 * 8 * n * n > f / 2);
    if memory.is_none() && tile.is_none() && !too_big {
        return Ok(None);
    }
    if prog.train.is_some() || !prog.observes.is_empty() {
        eprintln!("note: the banded computation writes the kernels only (no f_t, no observes)");
    }
    let tile = match tile.as_deref() {
        None => tpc::tiles::Tile::ALL,
        Some("auto") => tpc::tiles::tile_from_env(&|k| std::env::var(k).ok()).ok_or_else(|| {
            fail("--tile auto: no OMPI_COMM_WORLD_RANK/SIZE, PMI_RANK/SIZE or SLURM_ARRAY_TASK_ID/COUNT in the environment")
        })?,
        Some(t) => tpc::tiles::Tile::parse(t).map_err(|e| fail(&format!("--tile {e}")))?,
    };
    let memory = memory.unwrap_or_else(|| free.map_or(4 << 30, |f| f / 2));
    let bands = points
        .len()
        .div_ceil(tpc::tiles::band_size(memory, prog.outputs.len()));
    let pairs = tpc::tiles::band_pairs(bands, tile).len();
    let r = with_progress_of(pairs, "band pairs", |tick| {
        tpc::tiles::kernels_to_npy(prog, points, dir, memory, tile, &|_, _| tick())
    });
    let t = r.map_err(|e| match e {
        tpc::tiles::TileError::Limit(e) => limit_fail(file, &e),
        tpc::tiles::TileError::Io(e) => {
            fail(&format!("cannot write into `{}`: {e}", dir.display()))
        }
        tpc::tiles::TileError::NotFinite(note) => fail(&format!(
            "{}: the limit kernels are not finite: {note}",
            file.display()
        )),
    })?;
    let meta = tpc::tiles::meta(prog, points.len(), &t);
    if tile.index == 0 {
        tpc::tiles::write_meta(dir, &meta)
            .map_err(|e| fail(&format!("cannot write into `{}`: {e}", dir.display())))?;
    }
    Ok(Some(meta))
}
