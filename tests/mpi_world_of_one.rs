//! `tracegrad::distributed` in one process (no `mpirun`): the world of one that lets the
//! same data-parallel program run alone. Runs in the default build, with or without `mpi`.

use tracegrad::compile::{compile_train_step, StepOptimizer};
use tracegrad::distributed::{self, DdpOptions, DistributedDataParallel, ReduceOp};
use tracegrad::nn::{self, ModuleExt};
use tracegrad::optim::{Optimizer, Sgd, SgdOptions};
use tracegrad::Tensor;

fn mlp(seed: u64) -> nn::Sequential {
    tracegrad::manual_seed(seed);
    nn::Sequential::new().add(nn::Linear::new(6, 8)).add(nn::ReLU::new()).add(nn::Linear::new(8, 3))
}

#[test]
fn collectives_of_one_rank_are_the_identity() {
    let g = distributed::init().unwrap();
    assert_eq!((g.rank(), g.world_size()), (0, 1));
    let t = Tensor::vec1(&[1.5, -2.0]);
    for op in [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max] {
        g.all_reduce(&t, op).unwrap();
        assert_eq!(t.to_vec_f32(), vec![1.5, -2.0]);
    }
    g.all_reduce_async(&t, ReduceOp::Sum).unwrap().wait().unwrap();
    g.broadcast(&t, 0).unwrap();
    g.barrier().unwrap();
    assert_eq!(t.to_vec_f32(), vec![1.5, -2.0]);
    assert_eq!(g.broadcast(&t, 1).unwrap_err().to_string(), "broadcast: root 1 is not a rank of a world of 1");
    let ints = Tensor::from_vec(vec![3i64], &[1]);
    assert!(g.all_reduce(&ints, ReduceOp::Avg).unwrap_err().to_string().contains("Avg needs a float tensor"));
    let flags = Tensor::from_vec(vec![true], &[1]);
    assert!(g.all_reduce(&flags, ReduceOp::Max).unwrap_err().to_string().contains("bool tensors cannot be reduced"));
    // A second init shares the live group.
    assert_eq!(distributed::init().unwrap().world_size(), 1);
}

#[test]
fn sampler_must_match_the_group() {
    let g = distributed::single_process();
    let s = g.sampler(10).unwrap();
    g.check_sampler(&s).unwrap();
    let other = tracegrad::data::DistributedSampler::new(10, 2, 1).unwrap();
    assert_eq!(
        g.check_sampler(&other).unwrap_err().to_string(),
        "DistributedSampler is for rank 1 of 2 replicas, but this process is rank 0 of a world of 1"
    );
}

/// DDP over one rank trains exactly like the bare module, eager and compiled.
#[test]
fn ddp_of_one_rank_is_the_module() {
    let g = distributed::single_process();
    let x = Tensor::randn(&[16, 6]);
    let y = Tensor::from_vec((0..16).map(|i| i % 3).collect::<Vec<i64>>(), &[16]);
    let bare = mlp(1);
    // The same weights by copy: tests run in parallel and draw from the default generator, so
    // a second `mlp(1)` could start from another state.
    let twin = mlp(1);
    twin.load_state_dict(&bare.state_dict(), true).unwrap();
    let ddp = DistributedDataParallel::new(twin, &g).unwrap();
    assert!(ddp.buckets().is_empty(), "one rank has nothing to average");
    let names: Vec<String> = ddp.named_parameters().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names[0], "module.0.weight");
    let opts = SgdOptions { lr: 0.1, momentum: 0.9, ..Default::default() };
    let mut o1 = Sgd::with_options(bare.parameters(), opts.clone()).unwrap();
    let mut o2 = Sgd::with_options(ddp.parameters(), opts.clone()).unwrap();
    for _ in 0..5 {
        for (m, o) in [(&bare as &dyn nn::Module, &mut o1), (&ddp as &dyn nn::Module, &mut o2)] {
            o.zero_grad();
            m.call(&x).cross_entropy(&y).backward();
            o.step();
        }
    }
    for (a, b) in bare.parameters().iter().zip(ddp.parameters()) {
        assert_eq!(a.to_vec_f32(), b.to_vec_f32());
    }
    let mut step = compile_train_step(&ddp, |out, y| out.cross_entropy(y), StepOptimizer::Sgd(opts));
    let loss = step.step(&x, &y).unwrap();
    assert!(loss.item().is_finite());
}

#[test]
fn bad_options_are_errors() {
    let g = distributed::single_process();
    let bad = DdpOptions { bucket_cap_mb: 0.0, ..Default::default() };
    let err = DistributedDataParallel::with_options(mlp(0), &g, bad).err().expect("an error");
    assert_eq!(err.to_string(), "bucket_cap_mb must be a positive number, got 0");
}

/// Over one rank, SyncBatchNorm2d is BatchNorm2d: outputs, gradients, running statistics.
#[test]
fn sync_batch_norm_of_one_rank_is_batch_norm() {
    let g = distributed::single_process();
    let sync = distributed::SyncBatchNorm2d::new(3, &g);
    let plain = nn::BatchNorm2d::new(3);
    let x = Tensor::randn(&[4, 3, 5, 5]).mul_scalar(2.0).add_scalar(1.0);
    let close = |a: &Tensor, b: &Tensor, what: &str| {
        for (u, v) in a.to_vec_f32().iter().zip(b.to_vec_f32()) {
            assert!((u - v).abs() <= 1e-5 * (1.0 + v.abs()), "{what}: {u} vs {v}");
        }
    };
    let xs = x.detach().requires_grad_(true);
    let xp = x.detach().requires_grad_(true);
    let (ys, yp) = (sync.call(&xs), plain.call(&xp));
    close(&ys, &yp, "output");
    let w = Tensor::randn(&[4, 3, 5, 5]);
    (&ys * &w).sum_all().backward();
    (&yp * &w).sum_all().backward();
    close(&xs.grad().unwrap(), &xp.grad().unwrap(), "input gradient");
    for ((n, a), (_, b)) in sync.named_parameters().iter().zip(plain.named_parameters()) {
        close(&a.grad().unwrap(), &b.grad().unwrap(), n);
    }
    for ((n, a), (_, b)) in sync.named_buffers().iter().zip(plain.named_buffers()) {
        if a.dtype().is_float() {
            close(a, &b, n);
        } else {
            assert_eq!(a.to_vec::<i64>(), b.to_vec::<i64>(), "{n}");
        }
    }
    sync.eval();
    plain.eval();
    close(&sync.call(&x), &plain.call(&x), "eval output");
    // Eval mode normalises with the running statistics: no collective, so it compiles.
    assert!(tracegrad::compile(&sync).call(&x).is_ok());
    sync.train(true);
    let err = tracegrad::compile(&sync).call(&x).expect_err("training mode cannot compile").to_string();
    assert!(err.contains("compiled graphs cannot contain collectives"), "{err}");
}
