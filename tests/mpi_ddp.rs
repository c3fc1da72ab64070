//! Data-parallel training under `mpirun -np 2` (issue 15). `harness = false`: run by cargo,
//! this binary launches itself through `mpirun` once per case, with the case's name in
//! `TRACEGRAD_MPI_CASE`; each rank then runs the case and the launcher checks the job's exit
//! status and output. Built without the `mpi` feature it only says that it was skipped.
//!
//! Run: `cargo test --release --features mpi --test mpi_ddp` (Open MPI installed; as root
//! the launcher adds `--allow-run-as-root`). `-- --include-ignored` also runs any case marked
//! ignored in `CASES` (none is today).

#[cfg(not(feature = "mpi"))]
fn main() {
    println!(
        "mpi_ddp: skipped: built without the `mpi` feature; run `cargo test --release --features mpi --test mpi_ddp` with Open MPI installed"
    );
}

#[cfg(feature = "mpi")]
fn main() {
    match std::env::var("TRACEGRAD_MPI_CASE") {
        Ok(case) => ranks::run(&case),
        Err(_) => launcher::run(),
    }
}

/// The cases: (name, needs a feature not built yet).
#[cfg(feature = "mpi")]
const CASES: [(&str, Option<&str>); 9] = [
    ("collectives", None),
    ("eager_equivalence", None),
    ("no_sync", None),
    ("mismatch", None),
    ("sampler", None),
    ("panic", None),
    ("exit", None),
    ("stray", None),
    ("compiled_equivalence", None),
];

#[cfg(feature = "mpi")]
mod launcher {
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    fn is_root() -> bool {
        Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0").unwrap_or(false)
    }

    /// Runs one case on 2 ranks; returns (success, combined output, wall time).
    fn mpirun(case: &str) -> (bool, String, Duration) {
        let exe = std::env::current_exe().expect("the test binary's path");
        let mut cmd = Command::new("mpirun");
        cmd.args(["-np", "2", "--oversubscribe"]);
        if is_root() {
            cmd.arg("--allow-run-as-root");
        }
        cmd.args(["-x", "TRACEGRAD_MPI_CASE", "-x", "RAYON_NUM_THREADS"]).arg(exe);
        cmd.env("TRACEGRAD_MPI_CASE", case).env("RAYON_NUM_THREADS", "1");
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let t0 = Instant::now();
        let mut child = cmd.spawn().expect("mpirun must be installed (apt-get install openmpi-bin)");
        // No case may hang: a job still running after two minutes is killed and fails.
        let deadline = t0 + Duration::from_secs(120);
        let status = loop {
            if let Some(s) = child.try_wait().expect("waiting for mpirun") {
                break Some(s);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                break None;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let out = child.wait_with_output().expect("mpirun's output");
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (status.is_some_and(|s| s.success()), text, t0.elapsed())
    }

    fn check(case: &str) -> Result<(), String> {
        let (ok, out, took) = mpirun(case);
        let both = |marker: &str| (0..2).all(|r| out.contains(&format!("rank {r}: {marker}")));
        match case {
            "panic" => {
                if ok {
                    return Err(format!("a panicking rank must fail the job\n{out}"));
                }
                if took > Duration::from_secs(30) {
                    return Err(format!("the job took {took:?} to end after a rank panicked\n{out}"));
                }
                if !out.contains("rank 1 (of 2) panicked") || !out.contains("deliberate failure at step 10") {
                    return Err(format!("the output must name the panicking rank\n{out}"));
                }
                Ok(())
            }
            "stray" => {
                match (ok, took > Duration::from_secs(30), out.contains("rank 0 (of 2) waited 3s for all_reduce")) {
                    (false, false, true) => Ok(()),
                    _ => Err(format!(
                        "a collective that never completes must end the job within 30 s, naming the rank\n{out}"
                    )),
                }
            }
            "exit" => {
                // mpirun names the process as [[job, app], rank].
                let named = out.contains(",1],1]") && out.contains("Exit code:    3");
                match (ok, took > Duration::from_secs(30), named) {
                    (false, false, true) => Ok(()),
                    _ => Err(format!("a rank exiting must end the job non-zero within 30 s, naming it\n{out}")),
                }
            }
            "mismatch" if !(ok && both("construction failed: DistributedDataParallel")) => {
                Err(format!("a shape mismatch must be an error on both ranks\n{out}"))
            }
            "mismatch" => Ok(()),
            _ if !ok || !both("ok") => Err(format!("case {case} failed\n{out}")),
            _ => Ok(()),
        }
    }

    pub fn run() {
        let args: Vec<String> = std::env::args().collect();
        let include_ignored = args.iter().any(|a| a == "--include-ignored" || a == "--ignored");
        let filter: Option<&String> = args.iter().skip(1).find(|a| !a.starts_with('-'));
        let mut failed = Vec::new();
        for (case, ignore) in super::CASES {
            if filter.is_some_and(|f| !case.contains(f.as_str())) {
                continue;
            }
            if let (Some(why), false) = (ignore, include_ignored) {
                println!("mpi_ddp {case} ... ignored, {why}");
                continue;
            }
            match check(case) {
                Ok(()) => println!("mpi_ddp {case} ... ok"),
                Err(e) => {
                    println!("mpi_ddp {case} ... FAILED\n{e}");
                    failed.push(case);
                }
            }
        }
        if !failed.is_empty() {
            eprintln!("mpi_ddp: failed: {failed:?}");
            std::process::exit(1);
        }
    }
}

#[cfg(feature = "mpi")]
mod ranks {
    use std::hash::{Hash, Hasher};

    use tracegrad::compile::{compile_train_step, StepOptimizer};
    use tracegrad::data::{DataLoader, Sampler};
    use tracegrad::distributed::{self, DdpOptions, DistributedDataParallel, ProcessGroup, ReduceOp};
    use tracegrad::nn::{self, ModuleExt};
    use tracegrad::optim::{Adam, AdamOptions, Optimizer, Sgd, SgdOptions};
    use tracegrad::{Generator, Tensor};

    const STEPS: usize = 50;
    const BATCH: usize = 16;

    pub fn run(case: &str) {
        if case == "stray" {
            return stray();
        }
        let group = distributed::init().expect("init");
        assert_eq!(group.world_size(), 2, "the cases run on 2 ranks");
        match case {
            "collectives" => collectives(&group),
            "eager_equivalence" => equivalence(&group, false),
            "compiled_equivalence" => equivalence(&group, true),
            "no_sync" => no_sync(&group),
            "mismatch" => mismatch(&group),
            "sampler" => sampler(&group),
            "panic" => fail_at_step_10(&group, false),
            "exit" => fail_at_step_10(&group, true),
            other => panic!("unknown case {other}"),
        }
        if case != "mismatch" {
            println!("rank {}: ok", group.rank());
        }
    }

    fn collectives(g: &ProcessGroup) {
        let r = g.rank() as f32;
        let t = Tensor::from_vec(vec![r + 1.0, 10.0 * r], &[2]);
        g.all_reduce(&t, ReduceOp::Sum).unwrap();
        assert_eq!(t.to_vec_f32(), vec![3.0, 10.0]);
        let t = Tensor::from_vec(vec![r + 1.0, -r], &[2]);
        g.all_reduce(&t, ReduceOp::Max).unwrap();
        assert_eq!(t.to_vec_f32(), vec![2.0, 0.0]);
        let t = Tensor::from_vec(vec![r as f64, 4.0], &[2]);
        let work = g.all_reduce_async(&t, ReduceOp::Avg).unwrap();
        work.wait().unwrap();
        assert_eq!(t.to_vec_f64(), vec![0.5, 4.0]);
        let t = Tensor::from_vec(vec![g.rank() as i64 + 7; 3], &[3]);
        g.broadcast(&t, 1).unwrap();
        assert_eq!(t.to_vec::<i64>(), vec![8, 8, 8]);
        g.barrier().unwrap();
        let err = g.all_reduce(&Tensor::from_vec(vec![1i64], &[1]), ReduceOp::Avg).unwrap_err();
        assert!(err.to_string().contains("Avg needs a float tensor"), "{err}");
        assert!(g.broadcast(&t, 2).is_err());
        let wrong = tracegrad::data::DistributedSampler::new(10, 3, 0).unwrap();
        let err = g.check_sampler(&wrong).unwrap_err();
        assert!(err.to_string().contains("rank 0 of 3 replicas"), "{err}");
    }

    /// The models of the equivalence cases.
    #[derive(Clone, Copy, PartialEq, Debug)]
    enum Net {
        Mlp,
        /// BatchNorm2d: each rank normalises its own half (DDP without SyncBatchNorm).
        CnnBn,
        /// SyncBatchNorm2d on the ranks, BatchNorm2d over the whole batch in one process.
        CnnSyncBn,
    }

    /// The data set: the same on every rank.
    fn data(net: Net) -> (Tensor, Tensor) {
        let mut gen = Generator::new(7);
        let n = STEPS * BATCH;
        let shape: Vec<usize> = if net == Net::Mlp { vec![n, 20] } else { vec![n, 1, 8, 8] };
        let x = Tensor::randn_with(&mut gen, &shape);
        let y = Tensor::randint_with(&mut gen, 0, 5, &[n]);
        (x, y)
    }

    fn mlp() -> nn::Sequential {
        nn::Sequential::new().add(nn::Linear::new(20, 32)).add(nn::ReLU::new()).add(nn::Linear::new(32, 5))
    }

    /// The convolution has no bias: before a BatchNorm its true gradient is zero, and Adam
    /// would turn the rounding noise standing in for it into full-size steps.
    fn cnn(norm: impl nn::Module) -> nn::Sequential {
        nn::Sequential::new()
            .add(nn::Conv2d::with_bias(1, 4, 3, false).padding(1))
            .add(norm)
            .add(nn::ReLU::new())
            .add(nn::MaxPool2d::new(2))
            .add(nn::Flatten::new())
            .add(nn::Linear::new(64, 5))
    }

    /// The model with initial values from `seed` (DDP must broadcast rank 0's); `group` makes
    /// the SyncBatchNorm variant synchronised.
    fn model(net: Net, seed: u64, group: Option<&ProcessGroup>) -> nn::Sequential {
        tracegrad::manual_seed(seed);
        match (net, group) {
            (Net::Mlp, _) => mlp(),
            (Net::CnnSyncBn, Some(g)) => cnn(distributed::SyncBatchNorm2d::new(4, g)),
            (Net::CnnBn | Net::CnnSyncBn, _) => cnn(nn::BatchNorm2d::new(4)),
        }
    }

    fn optimizer(adam: bool, params: Vec<Tensor>) -> Box<dyn Optimizer> {
        if adam {
            Box::new(Adam::new(params, 0.01).unwrap())
        } else {
            let o = SgdOptions { lr: 0.05, momentum: 0.9, ..Default::default() };
            Box::new(Sgd::with_options(params, o).unwrap())
        }
    }

    fn step_spec(adam: bool) -> StepOptimizer {
        if adam {
            StepOptimizer::Adam(AdamOptions { lr: 0.01, ..Default::default() })
        } else {
            StepOptimizer::Sgd(SgdOptions { lr: 0.05, momentum: 0.9, ..Default::default() })
        }
    }

    fn rows(t: &Tensor, from: usize, n: usize) -> Tensor {
        t.narrow(0, from, n)
    }

    /// One process at batch B. With plain BatchNorm, the batch goes through the model as the
    /// two halves the ranks see, because each rank normalizes over its own half (DDP without
    /// SyncBatchNorm, as in PyTorch); the loss is their mean. Returns the losses, the final
    /// parameters and the final buffers.
    fn reference(net: Net, adam: bool) -> (Vec<f64>, Vec<Vec<f32>>, Vec<Vec<f32>>) {
        let (x, y) = data(net);
        let m = model(net, 100, None);
        let mut opt = optimizer(adam, m.parameters());
        let mut losses = Vec::new();
        for s in 0..STEPS {
            let loss = if net == Net::CnnBn {
                let h = BATCH / 2;
                let l0 = m.call(&rows(&x, s * BATCH, h)).cross_entropy(&rows(&y, s * BATCH, h));
                let l1 = m.call(&rows(&x, s * BATCH + h, h)).cross_entropy(&rows(&y, s * BATCH + h, h));
                (&l0 + &l1) * 0.5
            } else {
                m.call(&rows(&x, s * BATCH, BATCH)).cross_entropy(&rows(&y, s * BATCH, BATCH))
            };
            opt.zero_grad();
            loss.backward();
            opt.step();
            losses.push(loss.item());
        }
        let values = |ts: Vec<Tensor>| ts.iter().map(|t| t.to_vec_f64().iter().map(|&v| v as f32).collect()).collect();
        (losses, values(m.parameters()), values(m.buffers()))
    }

    /// This rank's half of each global batch through DDP; the losses are the ranks' mean.
    fn distributed_run(
        g: &ProcessGroup,
        net: Net,
        adam: bool,
        compiled: bool,
        cap_mb: f64,
    ) -> (Vec<f64>, Vec<Tensor>, Vec<Tensor>) {
        let (x, y) = data(net);
        let options = DdpOptions { bucket_cap_mb: cap_mb, ..Default::default() };
        let ddp =
            DistributedDataParallel::with_options(model(net, 100 + g.rank() as u64, Some(g)), g, options).unwrap();
        let h = BATCH / 2;
        let mut losses = Vec::new();
        let mut eager_opt = optimizer(adam, ddp.parameters());
        let mut step = compile_train_step(&ddp, |out, y| out.cross_entropy(y), step_spec(adam));
        for s in 0..STEPS {
            let (xs, ys) = (rows(&x, s * BATCH + g.rank() * h, h), rows(&y, s * BATCH + g.rank() * h, h));
            let loss = if compiled {
                step.step(&xs, &ys).unwrap_or_else(|e| panic!("{e}"))
            } else {
                let loss = ddp.call(&xs).cross_entropy(&ys);
                eager_opt.zero_grad();
                loss.backward();
                eager_opt.step();
                loss.detach()
            };
            g.all_reduce(&loss, ReduceOp::Avg).unwrap();
            losses.push(loss.item());
        }
        drop(step);
        // The buckets were refilled in the order of the first backward: still every parameter
        // once, and the same on both ranks.
        let mut flat: Vec<String> = ddp.buckets().concat();
        let text: Vec<f32> = flat.join(",").bytes().map(f32::from).collect();
        let n = text.len();
        assert!(identical_across_ranks(g, &[Tensor::from_vec(text, &[n])]), "the ranks' buckets differ");
        flat.sort();
        let mut names: Vec<String> = ddp.named_parameters().into_iter().map(|(n, _)| n).collect();
        names.sort();
        assert_eq!(flat, names, "every parameter is in one bucket");
        (losses, ddp.parameters(), ddp.buffers())
    }

    /// Within 1e-5 relative to the tensor's scale: an element near zero has no relative error.
    fn assert_close(got: &[f32], want: &[f32], what: &str) {
        let scale = want.iter().fold(0f64, |m, v| m.max(v.abs() as f64));
        let diff = got.iter().zip(want).fold(0f64, |m, (a, b)| m.max((a - b).abs() as f64));
        assert!(diff <= 1e-5 * scale, "{what}: 2 ranks differ by {diff} (scale {scale}) from one process");
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-5 * a.abs().max(b.abs()).max(1e-3)
    }

    /// Whether the tensors' bits agree on every rank: a hash, compared through the group.
    fn identical_across_ranks(g: &ProcessGroup, params: &[Tensor]) -> bool {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        for p in params {
            for v in p.to_vec_f32() {
                v.to_bits().hash(&mut h);
            }
        }
        let mine = h.finish() as i64;
        let root = Tensor::from_vec(vec![mine], &[1]);
        g.broadcast(&root, 0).unwrap();
        let differs = Tensor::from_vec(vec![(root.to_vec::<i64>()[0] != mine) as i64], &[1]);
        g.all_reduce(&differs, ReduceOp::Sum).unwrap();
        differs.to_vec::<i64>()[0] == 0
    }

    fn equivalence(g: &ProcessGroup, compiled: bool) {
        let configs = [
            (Net::Mlp, false, 0.002),
            (Net::Mlp, true, 25.0),
            (Net::CnnBn, false, 0.001),
            (Net::CnnBn, true, 25.0),
            (Net::CnnSyncBn, false, 0.001),
            (Net::CnnSyncBn, true, 25.0),
        ];
        for (net, adam, cap_mb) in configs {
            if compiled && net == Net::CnnSyncBn {
                continue; // SyncBatchNorm2d is eager only: a compiled graph holds no collective.
            }
            let what = format!(
                "{net:?} {} {}",
                if adam { "adam" } else { "sgd-momentum" },
                if compiled { "compiled" } else { "eager" }
            );
            let (ref_losses, ref_params, ref_buffers) = reference(net, adam);
            let (losses, params, buffers) = distributed_run(g, net, adam, compiled, cap_mb);
            for (s, (a, b)) in ref_losses.iter().zip(&losses).enumerate() {
                assert!(close(*a, *b), "{what}: step {s}: loss {b} on 2 ranks vs {a} in one process");
            }
            for (p, r) in params.iter().zip(&ref_params) {
                assert_close(&p.to_vec_f32(), r, &format!("{what}: final parameters"));
            }
            if net == Net::CnnSyncBn {
                // The global batch's running statistics, as one process at batch B has them.
                for (b, r) in buffers.iter().zip(&ref_buffers) {
                    let got: Vec<f32> = b.to_vec_f64().iter().map(|&v| v as f32).collect();
                    assert_close(&got, r, &format!("{what}: final buffers"));
                }
            }
            // Plain BatchNorm's running statistics are each rank's own after its forward (rank
            // 0's again at the next one); SyncBatchNorm's are the global batch's everywhere.
            let mut both = params.clone();
            if net == Net::CnnSyncBn {
                both.extend(buffers.iter().filter(|b| b.dtype().is_float()).cloned());
            }
            assert!(
                identical_across_ranks(g, &both),
                "{what}: parameters or buffers differ between the ranks after {STEPS} steps"
            );
            println!("rank {}: {what}: {STEPS} steps agree (last loss {:.6})", g.rank(), losses[STEPS - 1]);
        }
    }

    /// Two micro-batches under no_sync, then one synced: the gradient is the ranks' mean of
    /// the local sums, and under no_sync nothing is averaged.
    fn no_sync(g: &ProcessGroup) {
        let (x, y) = data(Net::Mlp);
        let ddp = DistributedDataParallel::new(model(Net::Mlp, 3 + g.rank() as u64, None), g).unwrap();
        let batch = |rank: usize, k: usize| (rows(&x, (2 * k + rank) * 4, 4), rows(&y, (2 * k + rank) * 4, 4));
        {
            let _guard = ddp.no_sync();
            let (xa, ya) = batch(g.rank(), 0);
            ddp.call(&xa).cross_entropy(&ya).backward();
        }
        let local: Vec<Tensor> = ddp.parameters().iter().map(|p| p.grad().unwrap()).collect();
        assert!(!identical_across_ranks(g, &local), "under no_sync the ranks' gradients must stay local");
        let (xb, yb) = batch(g.rank(), 1);
        ddp.call(&xb).cross_entropy(&yb).backward();
        let reference = model(Net::Mlp, 3, None);
        let mut total: Option<Tensor> = None;
        for rank in 0..2 {
            for k in 0..2 {
                let (xs, ys) = batch(rank, k);
                let l = reference.call(&xs).cross_entropy(&ys) * 0.5;
                total = Some(match total {
                    None => l,
                    Some(t) => &t + &l,
                });
            }
        }
        total.unwrap().backward();
        for (p, r) in ddp.parameters().iter().zip(reference.parameters()) {
            assert_close(&p.grad().unwrap().to_vec_f32(), &r.grad().unwrap().to_vec_f32(), "no_sync: gradients");
        }
    }

    fn mismatch(g: &ProcessGroup) {
        let hidden = if g.rank() == 1 { 33 } else { 32 };
        let m =
            nn::Sequential::new().add(nn::Linear::new(20, hidden)).add(nn::ReLU::new()).add(nn::Linear::new(hidden, 5));
        match DistributedDataParallel::new(m, g) {
            Ok(_) => panic!("rank {}: a shape mismatch must be an error", g.rank()),
            Err(e) => {
                assert!(e.to_string().contains("rank(s) [1]"), "{e}");
                println!("rank {}: construction failed: {e}", g.rank());
            }
        }
    }

    /// Every sample once per epoch over both ranks (n = 12), PyTorch's padding when uneven
    /// (n = 11: the first index of the epoch's order again), and a new order per epoch.
    fn sampler(g: &ProcessGroup) {
        for n in [12usize, 11] {
            let sampler = std::sync::Arc::new(g.sampler(n).unwrap());
            g.check_sampler(&sampler).unwrap();
            let loader = DataLoader::builder((0..n as i64).collect::<Vec<i64>>())
                .batch_size(4)
                .sampler(sampler.clone())
                .build()
                .unwrap();
            let mut orders = Vec::new();
            for epoch in 0..2 {
                sampler.set_epoch(epoch);
                let mine: Vec<i64> = loader.iter().flat_map(|b| b.unwrap().to_vec::<i64>()).collect();
                assert_eq!(mine.len(), n.div_ceil(2));
                let mut c = vec![0i64; n];
                for &i in &mine {
                    c[i as usize] += 1;
                }
                let counts = Tensor::from_vec(c, &[n]);
                g.all_reduce(&counts, ReduceOp::Sum).unwrap();
                let counts = counts.to_vec::<i64>();
                let first = tracegrad::data::DistributedSampler::new(n, 1, 0).unwrap().seed(0);
                first.set_epoch(epoch);
                let order: Vec<usize> = first.iter().collect();
                for (i, &k) in counts.iter().enumerate() {
                    let padded = n % 2 == 1 && i == order[0];
                    assert_eq!(k, if padded { 2 } else { 1 }, "n {n} epoch {epoch}: sample {i} seen {k} times");
                }
                orders.push(mine);
            }
            assert_ne!(orders[0], orders[1], "set_epoch must change the order");
        }
    }

    /// Rank 1 never joins rank 0's all_reduce: rank 0 gives up after the group's timeout and
    /// ends the job instead of hanging.
    fn stray() {
        let g = distributed::init_with_timeout(std::time::Duration::from_secs(3)).expect("init");
        if g.rank() == 1 {
            std::thread::sleep(std::time::Duration::from_secs(60));
        }
        let _ = g.all_reduce(&Tensor::vec1(&[1.0]), ReduceOp::Sum);
        unreachable!("rank {} cannot finish an all_reduce alone", g.rank());
    }

    /// Rank 1 panics, or exits with status 3 without finalizing, at step 10.
    fn fail_at_step_10(g: &ProcessGroup, exit: bool) {
        let (x, y) = data(Net::Mlp);
        let ddp = DistributedDataParallel::new(model(Net::Mlp, 0, None), g).unwrap();
        let mut opt = optimizer(false, ddp.parameters());
        for s in 0..STEPS {
            if s == 10 && g.rank() == 1 {
                if exit {
                    eprintln!("rank 1 exits at step 10");
                    std::process::exit(3);
                }
                panic!("deliberate failure at step 10");
            }
            let loss = ddp.call(&rows(&x, s * 8, 8)).cross_entropy(&rows(&y, s * 8, 8));
            opt.zero_grad();
            loss.backward();
            opt.step();
        }
        // Rank 0 is stuck in step 10's allreduce until the job is aborted.
        unreachable!("rank 0 cannot finish step 10 without rank 1");
    }
}
