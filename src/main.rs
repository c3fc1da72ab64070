//! `tracegrad`: the command-line front end (DESIGN.md's CLI contract). With no arguments it
//! runs `train` on the embedded digits set.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use tracegrad::data::{self, Labeled};
use tracegrad::train::{train_classifier, ModelKind, TrainConfig};

/// Counts heap bytes so `tracegrad bench` can report each workload's peak memory.
#[global_allocator]
static ALLOC: tracegrad::bench::CountingAlloc = tracegrad::bench::CountingAlloc::new();

#[derive(Parser)]
#[command(
    name = "tracegrad",
    version,
    about = "PyTorch-style deep learning in Rust: train eagerly, trace and compile, dump graphs"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Train a classifier (the default command).
    Train(TrainArgs),
    /// Print a zoo model's (or an ONNX file's) graph at a pipeline stage.
    Dump(DumpArgs),
    /// Run an ONNX model on NumPy `.npy` inputs and write its output as `.npy`.
    Run(RunArgs),
    /// Time the standard workloads, eager vs compiled.
    Bench(tracegrad::bench::BenchArgs),
    /// List the model zoo.
    Models,
}

#[derive(clap::Args)]
struct DumpArgs {
    /// Model from the zoo (see `tracegrad models`).
    #[arg(long, required_unless_present = "onnx", conflicts_with = "onnx")]
    model: Option<String>,
    /// An ONNX file instead of a zoo model (symbolic input dims take `--batch`).
    #[arg(long, value_name = "FILE.onnx")]
    onnx: Option<std::path::PathBuf>,
    /// traced, joint, forward, backward, optimized, fused, plan or clif.
    #[arg(long, default_value = "optimized")]
    stage: String,
    /// text, dot, svg or json.
    #[arg(long, default_value = "text")]
    format: String,
    /// Batch size of the example input.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Trace in training mode (default: eval).
    #[arg(long)]
    train: bool,
    /// Write here instead of stdout.
    #[arg(short = 'o', long)]
    output: Option<std::path::PathBuf>,
}

fn dump(args: DumpArgs) -> Result<(), String> {
    use tracegrad::compile::dump::{render, stage_graph, Format, Stage};
    use tracegrad::nn::ModuleExt;
    let stage = Stage::parse(&args.stage)?;
    let format = match args.format.as_str() {
        "text" => Format::Text,
        "dot" => Format::Dot,
        "svg" => Format::Svg,
        "json" => Format::Json,
        other => return Err(format!("unknown format {other:?}; formats: text, dot, svg, json")),
    };
    tracegrad::manual_seed(0);
    let (module, inputs): (Box<dyn tracegrad::nn::Module>, Vec<tracegrad::TensorType>) = match (&args.model, &args.onnx)
    {
        (_, Some(path)) => {
            if !(1..=tracegrad::zoo::MAX_BATCH).contains(&args.batch) {
                return Err(format!("batch size {} is outside 1..={}", args.batch, tracegrad::zoo::MAX_BATCH));
            }
            let m = tracegrad::onnx::load(path).map_err(|e| e.to_string())?;
            let types = m
                .inputs()
                .iter()
                .map(|i| {
                    let dims: Vec<usize> = i.dims.iter().map(|d| d.unwrap_or(args.batch)).collect();
                    tracegrad::TensorType::new(i.dtype, &dims)
                })
                .collect();
            (Box::new(m), types)
        }
        (Some(name), None) => {
            let z = tracegrad::zoo::build(name, args.batch)?;
            (z.module, vec![tracegrad::TensorType::new(tracegrad::DType::F32, &z.input_shape)])
        }
        (None, None) => return Err("dump needs --model or --onnx".into()),
    };
    module.train(args.train);
    let inputs: Vec<_> = inputs.into_iter().map(|t| (t, false)).collect();
    let (graph, report) = stage_graph(&*module, &inputs, stage).map_err(|e| e.to_string())?;
    if stage.text_only() {
        if format != Format::Text {
            return Err(format!("--stage {} has only a text form", args.stage));
        }
        let text = tracegrad::compile::dump::stage_text(&graph, stage)?;
        return match args.output {
            Some(path) => std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display())),
            None => {
                println!("{text}");
                Ok(())
            }
        };
    }
    let mut text = render(&graph, format)?;
    if format == Format::Text && !report.is_empty() {
        text.push_str("\n\npasses:\n");
        text.push_str(&report);
    }
    match args.output {
        Some(path) => std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?,
        None => println!("{text}"),
    }
    Ok(())
}

#[derive(clap::Args)]
struct RunArgs {
    /// The ONNX model.
    model: std::path::PathBuf,
    /// One `.npy` file per graph input, in order.
    #[arg(long = "input", value_name = "X.npy", required = true)]
    inputs: Vec<std::path::PathBuf>,
    /// Where to write the (first) output.
    #[arg(short = 'o', long, value_name = "Y.npy")]
    output: std::path::PathBuf,
    /// `eager`, or `compiled` (traced, optimized and JIT-compiled).
    #[arg(long, value_enum, default_value = "eager")]
    mode: Mode,
}

fn run(args: RunArgs) -> Result<(), String> {
    use tracegrad::nn::ModuleExt;
    use tracegrad::onnx::npy;
    let m = tracegrad::onnx::load(&args.model).map_err(|e| e.to_string())?;
    m.eval();
    let xs = args.inputs.iter().map(npy::read_npy).collect::<Result<Vec<_>, _>>().map_err(|e| e.to_string())?;
    let y = tracegrad::no_grad(|| match args.mode {
        Mode::Eager => m.run(&xs).map(|mut o| o.swap_remove(0)).map_err(|e| e.to_string()),
        Mode::Compiled => {
            // Checked first, so a wrong input is the same clear error in both modes.
            m.check_inputs(&xs).map_err(|e| e.to_string())?;
            tracegrad::compile(&m).call_many(&xs).map_err(|e| e.to_string())
        }
    })?;
    npy::write_npy(&args.output, &y).map_err(|e| e.to_string())
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum Model {
    Mlp,
    Cnn,
    Transformer,
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum Mode {
    Eager,
    Compiled,
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum OptimizerKind {
    Sgd,
    Adam,
    Adamw,
}

#[derive(clap::Args)]
struct TrainArgs {
    /// The network: an MLP; a CNN reading each sample as a square one-channel image; or a
    /// transformer reading each image's rows as tokens (causal block, dropout 0.1).
    #[arg(long, value_enum, default_value = "mlp")]
    model: Model,
    /// `digits` (embedded), `mnist-csv:PATH` or `mnist-idx:DIR`.
    #[arg(long, default_value = "digits")]
    dataset: String,
    /// Execution mode: `compiled` (the whole train step as one JIT-compiled plan) or `eager`.
    #[arg(long, value_enum, default_value = "compiled")]
    mode: Mode,
    /// Passes over the training set.
    #[arg(long, default_value_t = 20)]
    epochs: usize,
    /// Samples per step.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Learning rate.
    #[arg(long, default_value_t = 0.1)]
    lr: f64,
    /// Optimizer.
    #[arg(long, value_enum, default_value = "sgd")]
    optimizer: OptimizerKind,
    /// Seed for initialisation, the split and shuffling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// End stdout with a JSON summary.
    #[arg(long)]
    json: bool,
    /// Write a checkpoint (model, optimizer, epochs done) here after every epoch.
    #[arg(long)]
    save: Option<PathBuf>,
    /// Continue the run checkpointed here; `--epochs` stays the total, so after 2 of 4
    /// epochs this trains epochs 3 and 4. Use the saved run's other settings.
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Data-parallel over the ranks of `mpirun -np N` (the global batch `--batch-size` is split
    /// across them); only rank 0 prints. Needs a build with `--features mpi`.
    #[arg(long)]
    distributed: bool,
}

impl Default for TrainArgs {
    fn default() -> Self {
        TrainArgs {
            model: Model::Mlp,
            dataset: "digits".into(),
            mode: Mode::Compiled,
            epochs: 20,
            batch_size: 32,
            lr: 0.1,
            optimizer: OptimizerKind::Sgd,
            seed: 0,
            json: false,
            save: None,
            resume: None,
            distributed: false,
        }
    }
}

fn load(spec: &str, seed: u64) -> Result<(Labeled, Labeled), String> {
    let (train, test) = load_split(spec, seed)?;
    if train.is_empty() || test.is_empty() {
        return Err(format!(
            "{spec}: the split has {} training and {} test samples; both must be non-empty",
            train.len(),
            test.len()
        ));
    }
    let (dt, de) = (train.x.shape()[1], test.x.shape()[1]);
    if dt != de {
        return Err(format!("{spec}: training samples have {dt} features but test samples have {de}"));
    }
    Ok((train, test))
}

fn load_split(spec: &str, seed: u64) -> Result<(Labeled, Labeled), String> {
    if spec == "digits" {
        return Ok(data::digits().split(0.8, seed));
    }
    if let Some(path) = spec.strip_prefix("mnist-csv:") {
        return Ok(data::read_csv(Path::new(path), 784, 255.0)?.split(0.8, seed));
    }
    if let Some(dir) = spec.strip_prefix("mnist-idx:") {
        let dir = Path::new(dir);
        let train = data::read_mnist_idx_dir(dir, "train")?;
        // The test files are optional; when present they must read, never a silent fallback.
        let has_test = ["t10k-images-idx3-ubyte", "t10k-images-idx3-ubyte.gz"].iter().any(|f| dir.join(f).exists());
        return if has_test { Ok((train, data::read_mnist_idx_dir(dir, "t10k")?)) } else { Ok(train.split(0.8, seed)) };
    }
    Err(format!("unknown dataset {spec:?}: expected digits, mnist-csv:PATH or mnist-idx:DIR"))
}

/// Checks `--save` and `--resume` before any work: the checkpoint to resume must read as one,
/// and the directory to save into must exist.
fn check_paths(args: &TrainArgs) -> Result<(), String> {
    if let Some(p) = &args.resume {
        if !p.is_file() {
            return Err(format!("--resume {}: no such checkpoint file", p.display()));
        }
        let ck = tracegrad::checkpoint::read(p).map_err(|e| format!("--resume {e}"))?;
        // Corrupt weight bytes still parse; resuming from them would train to NaN with exit 0.
        for (name, t) in &ck.model {
            if t.dtype().is_float() && t.to_vec_f64().iter().any(|v| !v.is_finite()) {
                return Err(format!(
                    "--resume {}: tensor {name:?} holds NaN or infinite values (a corrupt or diverged checkpoint)",
                    p.display()
                ));
            }
        }
    }
    if let Some(p) = &args.save {
        if p.is_dir() {
            return Err(format!("--save {}: is a directory; give a file path", p.display()));
        }
        let dir = p.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        if !dir.is_dir() {
            return Err(format!("--save {}: directory {} does not exist", p.display(), dir.display()));
        }
    }
    Ok(())
}

fn train(args: TrainArgs) -> Result<(), String> {
    if args.epochs == 0 {
        return Err("--epochs must be at least 1".into());
    }
    if args.batch_size == 0 {
        return Err("--batch-size must be positive".into());
    }
    if !args.lr.is_finite() {
        return Err(format!("--lr must be a finite number, got {}", args.lr));
    }
    if args.distributed && args.model != Model::Mlp {
        return Err("--distributed trains --model mlp only (cnn and transformer are single-process for now)".into());
    }
    if args.distributed && (args.save.is_some() || args.resume.is_some()) {
        return Err("--distributed does not checkpoint yet: drop --save/--resume".into());
    }
    check_paths(&args)?;
    let (train_set, test_set) = load(&args.dataset, args.seed)?;
    let optimizer = match args.optimizer {
        OptimizerKind::Sgd => tracegrad::train::OptimizerKind::Sgd,
        OptimizerKind::Adam => tracegrad::train::OptimizerKind::Adam,
        OptimizerKind::Adamw => tracegrad::train::OptimizerKind::AdamW,
    };
    let cfg = TrainConfig {
        epochs: args.epochs,
        batch_size: args.batch_size,
        lr: args.lr,
        seed: args.seed,
        optimizer,
        compiled: args.mode == Mode::Compiled,
        model: match args.model {
            Model::Mlp => ModelKind::Mlp,
            Model::Cnn => ModelKind::Cnn,
            Model::Transformer => ModelKind::Transformer,
        },
        save: args.save.clone(),
        resume: args.resume.clone(),
        ..Default::default()
    };
    let what = match args.model {
        Model::Mlp => format!("MLP {}→{}→{}", train_set.x.shape()[1], cfg.hidden, train_set.classes),
        Model::Cnn => format!("CNN ({} classes)", train_set.classes),
        Model::Transformer => format!("transformer ({} classes)", train_set.classes),
    };
    if args.distributed {
        return train_distributed(&args, &cfg, &train_set, &test_set);
    }
    eprintln!(
        "training {what} on {} ({} train / {} test), {}, {:?} lr {}",
        args.dataset,
        train_set.len(),
        test_set.len(),
        if cfg.compiled { "compiled train step (JIT)" } else { "eager" },
        cfg.optimizer,
        cfg.lr
    );
    // indicatif draws only when stderr is a terminal, so piped runs stay quiet.
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("epoch {prefix} [{bar:30}] {pos}/{len} steps").unwrap().progress_chars("=> "),
    );
    let epochs = cfg.epochs;
    let (_model, summary) = train_classifier(
        &train_set,
        &test_set,
        &cfg,
        |epoch, step, steps| {
            if step == 1 {
                bar.set_length(steps as u64);
                bar.set_prefix(format!("{epoch}/{epochs}"));
            }
            bar.set_position(step as u64);
        },
        |r| {
            bar.suspend(|| {
                println!(
                    "epoch {:>3}/{epochs}  loss {:.4}  test accuracy {:.4}  ({:.2} s)",
                    r.epoch, r.loss, r.test_accuracy, r.seconds
                )
            });
        },
    )?;
    bar.finish_and_clear();
    println!(
        "final test accuracy {:.4} after {} epochs ({:.2} s training, {:.0} steps/s)",
        summary.test_accuracy, summary.epochs, summary.train_seconds, summary.steps_per_second
    );
    if cfg.compiled {
        // The same run eagerly, for the speed-up (same data, seed and step count).
        // (It resumes from the same checkpoint, whose layout is the same eager or compiled,
        // and saves nothing.)
        let eager_cfg = TrainConfig { compiled: false, save: None, ..cfg.clone() };
        let (_, eager) = train_classifier(&train_set, &test_set, &eager_cfg, |_, _, _| {}, |_| {})?;
        println!(
            "speed-up over eager: {:.2}x ({:.0} vs {:.0} steps/s; eager test accuracy {:.4})",
            summary.steps_per_second / eager.steps_per_second,
            summary.steps_per_second,
            eager.steps_per_second,
            eager.test_accuracy
        );
    }
    if args.json {
        println!("{}", serde_json::to_string(&summary).map_err(|e| e.to_string())?);
    }
    Ok(())
}

/// `train --distributed`: DDP over the MPI job; only rank 0 prints.
fn train_distributed(args: &TrainArgs, cfg: &TrainConfig, train: &Labeled, test: &Labeled) -> Result<(), String> {
    let group = tracegrad::distributed::init().map_err(|e| e.to_string())?;
    let rank0 = group.rank() == 0;
    if rank0 {
        eprintln!("training MLP data-parallel on {} ranks, global batch {}", group.world_size(), cfg.batch_size);
    }
    let epochs = cfg.epochs;
    let result = tracegrad::distributed::train::train_mlp_distributed(&group, train, test, cfg, |r| {
        if rank0 {
            println!(
                "epoch {:>3}/{epochs}  loss {:.4}  test accuracy {:.4}  ({:.2} s)",
                r.epoch, r.loss, r.test_accuracy, r.seconds
            );
        }
    });
    let summary = match result {
        // The other ranks may be waiting in a collective: end the whole job.
        Err(e) if group.world_size() > 1 => group.abort(&format!("failed: {e}")),
        other => other?.1,
    };
    if rank0 {
        println!(
            "final test accuracy {:.4} after {} epochs ({:.2} s training, {:.0} steps/s)",
            summary.test_accuracy, summary.epochs, summary.train_seconds, summary.steps_per_second
        );
        if args.json {
            println!("{}", serde_json::to_string(&summary).map_err(|e| e.to_string())?);
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = tracegrad_jit::lanes::Width::env_cap() {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    let result = match cli.command {
        Some(Command::Train(args)) => train(args),
        Some(Command::Dump(args)) => dump(args),
        Some(Command::Run(args)) => run(args),
        // The distributed bench measures the standard workloads only; an ONNX model given to it
        // would otherwise be ignored silently.
        Some(Command::Bench(args)) if args.distributed && (args.onnx.is_some() || args.input_shape.is_some()) => {
            Err("bench --distributed measures the standard workloads only: drop --onnx/--input-shape".into())
        }
        Some(Command::Bench(args)) => tracegrad::bench::cli(args),
        Some(Command::Models) => {
            for (name, what) in tracegrad::zoo::MODELS {
                println!("{name:<12} {what}");
            }
            Ok(())
        }
        None => train(TrainArgs::default()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
