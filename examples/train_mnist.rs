//! Trains an MLP on MNIST with a `DataLoader` (shuffled, two worker threads) and Adam, and
//! reports accuracy on 1000 held-out samples after each epoch.
//!
//! ```sh
//! cargo run --release --example train_mnist -- ../shared/data/mnist_5k.csv.gz   # CSV (plain or .gz)
//! cargo run --release --example train_mnist -- /path/to/mnist-idx-dir           # train-*-idx?-ubyte
//! cargo run --release --example train_mnist -- PATH --epochs 5
//! ```

use std::path::Path;
use std::process::ExitCode;

use tracegrad::data::{self, DataLoader, Labeled};
use tracegrad::nn::{Linear, Module, ModuleExt, ReLU, Sequential};
use tracegrad::optim::{Adam, Optimizer};
use tracegrad::{no_grad, DType, Tensor};

fn load(path: &Path) -> Result<Labeled, String> {
    if path.is_dir() {
        data::read_mnist_idx_dir(path, "train")
    } else {
        data::read_csv(path, 784, 255.0)
    }
}

fn accuracy(model: &dyn Module, d: &Labeled) -> f64 {
    no_grad(|| model.call(&d.x).argmax(Some(1), false).eq(&d.y).to_dtype(DType::F64).mean_all().item())
}

fn run() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let path = args.first().ok_or("usage: train_mnist PATH [--epochs N]  (PATH: an IDX directory or a CSV file)")?;
    let epochs = match args.iter().position(|a| a == "--epochs") {
        Some(i) => args.get(i + 1).and_then(|v| v.parse().ok()).ok_or("--epochs needs a number")?,
        None => 3,
    };
    let all = load(Path::new(path))?;
    if all.len() <= 1000 {
        return Err(format!("{path}: {} samples; need more than the 1000 held out", all.len()));
    }
    let (train, test) = all.split((all.len() - 1000) as f64 / all.len() as f64, 0);
    println!("{} training samples, {} held out", train.len(), test.len());

    tracegrad::manual_seed(0);
    let model = Sequential::new().add(Linear::new(784, 256)).add(ReLU::new()).add(Linear::new(256, 10));
    let mut opt = Adam::new(model.parameters(), 1e-3).map_err(|e| e.to_string())?;
    let loader = DataLoader::builder(train.clone())
        .batch_size(32)
        .shuffle(true)
        .seed(0)
        .num_workers(2)
        .build()
        .map_err(|e| e.to_string())?;
    for epoch in 1..=epochs {
        let (mut total, mut steps) = (0.0, 0);
        for batch in &loader {
            let batch = batch.map_err(|e| e.to_string())?;
            let (x, y): (&Tensor, &Tensor) = (&batch[0], &batch[1]);
            let loss = model.call(x).cross_entropy(y);
            opt.zero_grad();
            loss.backward();
            opt.step();
            total += loss.item();
            steps += 1;
        }
        println!("epoch {epoch}: loss {:.4}, held-out accuracy {:.4}", total / steps as f64, accuracy(&model, &test));
    }
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
