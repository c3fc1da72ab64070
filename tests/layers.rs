//! Layers, loss modules and `nn::init`: PyTorch's reprs, defaults, running statistics,
//! train/eval behaviour and init bounds, checked against values computed independently here.

use std::sync::{Arc, Mutex};

use tracegrad::nn::init::{self, FanMode, Nonlinearity};
use tracegrad::nn::{
    AvgPool2d, BatchNorm1d, BatchNorm2d, Conv2d, CrossEntropyLoss, Dropout, Embedding, Flatten, GeluApproximate,
    Identity, LayerNorm, Linear, LogSoftmax, MSELoss, MaxPool2d, Module, ModuleExt, NLLLoss, ReLU, Sequential, SiLU,
    Sigmoid, Softmax, Tanh, GELU,
};
use tracegrad::{no_grad, DType, Generator, LossReduction, Tensor};

#[track_caller]
fn assert_all_close(what: &str, got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol, "{what}[{i}]: got {g}, want {w}");
    }
}

/// Per-channel (mean, biased var, unbiased var) of an `[N, C, ...]` tensor, in f64.
fn channel_stats(x: &Tensor) -> Vec<(f64, f64, f64)> {
    let s = x.shape();
    let (n, c) = (s[0], s[1]);
    let inner: usize = s[2..].iter().product();
    let v = x.to_vec_f64();
    (0..c)
        .map(|ch| {
            let vals: Vec<f64> =
                (0..n).flat_map(|b| (0..inner).map(move |i| (b * c + ch) * inner + i)).map(|i| v[i]).collect();
            let m = vals.len() as f64;
            let mean = vals.iter().sum::<f64>() / m;
            let ss: f64 = vals.iter().map(|x| (x - mean) * (x - mean)).sum();
            (mean, ss / m, ss / (m - 1.0))
        })
        .collect()
}

/// `(x - mean_c) / sqrt(var_c + eps) * w_c + b_c` over an `[N, C, ...]` tensor, in f64.
fn normalize(x: &Tensor, mean: &[f64], var: &[f64], w: &[f64], b: &[f64], eps: f64) -> Vec<f64> {
    let s = x.shape();
    let c = s[1];
    let inner: usize = s[2..].iter().product();
    x.to_vec_f64()
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let ch = (i / inner) % c;
            (v - mean[ch]) / (var[ch] + eps).sqrt() * w[ch] + b[ch]
        })
        .collect()
}

fn buffer(m: &dyn Module, name: &str) -> Tensor {
    m.get_buffer(name).unwrap()
}

#[test]
fn batchnorm2d_train_mode_updates_running_stats_as_pytorch() {
    tracegrad::manual_seed(1);
    let bn = BatchNorm2d::new(3);
    init::uniform_(bn.weight.as_ref().unwrap(), 0.5, 1.5);
    init::uniform_(bn.bias.as_ref().unwrap(), -0.5, 0.5);
    let w = bn.weight.as_ref().unwrap().to_vec_f64();
    let b = bn.bias.as_ref().unwrap().to_vec_f64();
    let (mut rm, mut rv) = (vec![0.0; 3], vec![1.0; 3]);
    let nbt = buffer(&bn, "num_batches_tracked");
    assert_eq!((nbt.dtype(), nbt.shape(), nbt.item()), (DType::I64, vec![], 0.0));
    for step in 1..=3 {
        let x = Tensor::randn(&[4, 3, 5, 5]).mul_scalar(2.0).add_scalar(step as f64);
        let y = bn.call(&x);
        let stats = channel_stats(&x);
        let mean: Vec<f64> = stats.iter().map(|s| s.0).collect();
        let biased: Vec<f64> = stats.iter().map(|s| s.1).collect();
        assert_all_close("train output", &y.to_vec_f64(), &normalize(&x, &mean, &biased, &w, &b, 1e-5), 1e-5);
        for (c, (m, _, unbiased)) in stats.iter().enumerate() {
            rm[c] = 0.9 * rm[c] + 0.1 * m;
            rv[c] = 0.9 * rv[c] + 0.1 * unbiased;
        }
        assert_all_close("running_mean", &buffer(&bn, "running_mean").to_vec_f64(), &rm, 1e-6);
        assert_all_close("running_var", &buffer(&bn, "running_var").to_vec_f64(), &rv, 1e-6);
        let nbt = buffer(&bn, "num_batches_tracked");
        assert_eq!((nbt.dtype(), nbt.shape(), nbt.item()), (DType::I64, vec![], step as f64));
    }
    // Eval: normalise with the running statistics, and leave them alone.
    bn.eval();
    let x = Tensor::randn(&[2, 3, 4, 4]);
    let y = bn.call(&x);
    assert_all_close("eval output", &y.to_vec_f64(), &normalize(&x, &rm, &rv, &w, &b, 1e-5), 1e-5);
    assert_all_close("running_mean after eval", &buffer(&bn, "running_mean").to_vec_f64(), &rm, 1e-6);
    assert_eq!(buffer(&bn, "num_batches_tracked").item(), 3.0);
    // Buffers are persistent, in PyTorch's order.
    let keys: Vec<String> = bn.state_dict().into_iter().map(|(k, _)| k).collect();
    assert_eq!(keys, ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]);
}

#[test]
fn batchnorm_gradients_flow_to_input_and_affine_parameters() {
    tracegrad::manual_seed(2);
    let bn = BatchNorm2d::new(2);
    let x = Tensor::randn(&[3, 2, 2, 2]).requires_grad_(true);
    bn.call(&x).mul(&Tensor::randn(&[3, 2, 2, 2])).sum_all().backward();
    assert_eq!(x.grad().unwrap().shape(), vec![3, 2, 2, 2]);
    for p in bn.parameters() {
        assert_eq!(p.grad().unwrap().shape(), vec![2]);
    }
    // The running statistics are plain buffers, outside autograd.
    assert!(!buffer(&bn, "running_mean").requires_grad());
}

#[test]
fn batchnorm1d_momentum_none_and_untracked_variants() {
    tracegrad::manual_seed(3);
    // momentum=None: a cumulative moving average of the batch statistics.
    let bn = BatchNorm1d::new(4).momentum(None);
    let xs: Vec<Tensor> = (0..3).map(|_| Tensor::randn(&[8, 4])).collect();
    for x in &xs {
        bn.call(x);
    }
    let mut want = vec![0.0; 4];
    for x in &xs {
        for (c, (m, _, _)) in channel_stats(x).iter().enumerate() {
            want[c] += m / 3.0;
        }
    }
    assert_all_close("cumulative running_mean", &buffer(&bn, "running_mean").to_vec_f64(), &want, 1e-6);
    // 3-D input [N, C, L] is accepted too.
    assert_eq!(bn.call(&Tensor::randn(&[2, 4, 5])).shape(), vec![2, 4, 5]);

    // Without running statistics: no buffers, batch statistics in eval mode too.
    let plain = BatchNorm1d::with_options(4, false, false);
    assert!(plain.named_buffers().is_empty() && plain.named_parameters().is_empty());
    plain.eval();
    let x = Tensor::randn(&[6, 4]);
    let stats = channel_stats(&x);
    let mean: Vec<f64> = stats.iter().map(|s| s.0).collect();
    let var: Vec<f64> = stats.iter().map(|s| s.1).collect();
    let want = normalize(&x, &mean, &var, &[1.0; 4], &[0.0; 4], 1e-5);
    assert_all_close("untracked eval output", &plain.call(&x).to_vec_f64(), &want, 1e-5);
}

#[test]
#[should_panic(expected = "ValueError: expected 4D input (got 3D input)")]
fn batchnorm2d_rejects_3d_input() {
    BatchNorm2d::new(3).call(&Tensor::zeros(&[2, 3, 4]));
}

#[test]
#[should_panic(expected = "ValueError: expected 2D or 3D input (got 4D input)")]
fn batchnorm1d_rejects_4d_input() {
    BatchNorm1d::new(3).call(&Tensor::zeros(&[2, 3, 4, 4]));
}

#[test]
fn dropout_train_zeroes_and_scales_eval_is_identity() {
    tracegrad::manual_seed(4);
    let p = 0.3;
    let d = Dropout::new(p);
    assert!(d.training());
    let x = Tensor::ones(&[200_000]);
    let y = d.call(&x).to_vec_f32();
    let zeros = y.iter().filter(|v| **v == 0.0).count() as f64 / y.len() as f64;
    assert!((zeros - p).abs() < 0.01, "dropped fraction {zeros}");
    let scale = (1.0 / (1.0 - p)) as f32;
    assert!(y.iter().all(|v| *v == 0.0 || (*v - scale).abs() <= 1e-6 * scale), "kept values are scaled by 1/(1-p)");
    // Two calls draw different masks.
    assert_ne!(d.call(&x).to_vec_f32(), y);
    d.eval();
    let z = Tensor::randn(&[64]);
    assert!(d.call(&z).equal(&z));
    // Through a container: eval reaches the dropout.
    let seq = Sequential::new().add(Dropout::new(0.9));
    seq.eval();
    assert!(seq.call(&z).equal(&z));
    assert_eq!(Dropout::default().p(), 0.5);
}

#[test]
#[should_panic(expected = "dropout probability has to be between 0 and 1, but got 1.5")]
fn dropout_rejects_bad_probability() {
    Dropout::new(1.5);
}

#[test]
fn conv_and_pool_shapes_and_values() {
    tracegrad::manual_seed(5);
    let x = Tensor::randn(&[2, 1, 28, 28]);
    let conv = Conv2d::new(1, 8, 3).padding(1);
    let y = conv.call(&x);
    assert_eq!(y.shape(), vec![2, 8, 28, 28]);
    let want = x.conv2d(&conv.weight, conv.bias.as_ref(), [1, 1], [1, 1]);
    assert!(y.allclose(&want, 0.0, 0.0));
    assert_eq!(Conv2d::new(1, 8, 3).stride(2).padding(1).call(&x).shape(), vec![2, 8, 14, 14]);
    assert_eq!(Conv2d::new(1, 4, (3, 5)).padding((1, 2)).call(&x).shape(), vec![2, 4, 28, 28]);
    assert_eq!(Conv2d::new(1, 4, 5).call(&x).shape(), vec![2, 4, 24, 24]);
    let nobias = Conv2d::with_bias(1, 2, 3, false);
    assert!(nobias.bias.is_none());
    let names: Vec<String> = conv.named_parameters().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["weight", "bias"]);
    assert_eq!(conv.weight.shape(), vec![8, 1, 3, 3]);

    assert_eq!(MaxPool2d::new(2).call(&y).shape(), vec![2, 8, 14, 14]);
    assert_eq!(MaxPool2d::new(3).stride(2).padding(1).call(&y).shape(), vec![2, 8, 14, 14]);
    assert_eq!(AvgPool2d::new(2).call(&y).shape(), vec![2, 8, 14, 14]);
    assert_eq!(AvgPool2d::new((2, 4)).call(&y).shape(), vec![2, 8, 14, 7]);
    let grid = Tensor::arange(0.0, 16.0, 1.0).reshape(&[1, 1, 4, 4]);
    assert_eq!(MaxPool2d::new(2).call(&grid).to_vec_f32(), [5.0, 7.0, 13.0, 15.0]);
    assert_eq!(AvgPool2d::new(2).call(&grid).to_vec_f32(), [2.5, 4.5, 10.5, 12.5]);
}

#[test]
fn default_init_bounds() {
    tracegrad::manual_seed(6);
    let check = |what: &str, t: &Tensor, fan_in: usize| {
        let bound = (1.0 / (fan_in as f64).sqrt()) as f32;
        let v = t.to_vec_f32();
        let max = v.iter().fold(0f32, |m, x| m.max(x.abs()));
        assert!(max <= bound, "{what}: max |w| {max} > 1/sqrt({fan_in}) = {bound}");
        if v.len() >= 64 {
            assert!(max > 0.9 * bound, "{what}: samples should spread over the range, max {max}");
        }
    };
    let conv = Conv2d::new(3, 16, 3);
    check("conv.weight", &conv.weight, 27);
    check("conv.bias", conv.bias.as_ref().unwrap(), 27);
    let lin = Linear::new(100, 50);
    check("linear.weight", &lin.weight, 100);
    check("linear.bias", lin.bias.as_ref().unwrap(), 100);
    assert!(lin.weight.requires_grad() && lin.bias.as_ref().unwrap().requires_grad());
    // Embedding: N(0, 1).
    let emb = Embedding::new(1000, 16);
    let v = emb.weight.to_vec_f64();
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / v.len() as f64;
    assert!(mean.abs() < 0.05 && (var - 1.0).abs() < 0.05, "embedding init mean {mean} var {var}");
    let idx = Tensor::from_vec(vec![3i64, 999, 3], &[3]);
    let rows = emb.call(&idx).to_vec_f64();
    assert_eq!(&rows[..16], &v[3 * 16..4 * 16]);
    assert_eq!(&rows[16..32], &v[999 * 16..1000 * 16]);
    // LayerNorm and BatchNorm affine parameters start at ones and zeros.
    let ln = LayerNorm::new(&[4, 5]);
    assert!(ln.weight.as_ref().unwrap().equal(&Tensor::ones(&[4, 5])));
    assert!(ln.bias.as_ref().unwrap().equal(&Tensor::zeros(&[4, 5])));
    let bn = BatchNorm2d::new(3);
    assert!(buffer(&bn, "running_var").equal(&Tensor::ones(&[3])));
    assert!(buffer(&bn, "running_mean").equal(&Tensor::zeros(&[3])));
}

#[test]
fn every_repr_reads_as_pytorch_prints_it() {
    let cases: Vec<(Box<dyn Module>, &str)> = vec![
        (Box::new(Linear::new(784, 256)), "Linear(in_features=784, out_features=256, bias=True)"),
        (Box::new(Linear::with_bias(4, 2, false)), "Linear(in_features=4, out_features=2, bias=False)"),
        (Box::new(Conv2d::new(1, 8, 3).padding(1)), "Conv2d(1, 8, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1))"),
        (Box::new(Conv2d::new(1, 8, 3)), "Conv2d(1, 8, kernel_size=(3, 3), stride=(1, 1))"),
        (
            Box::new(Conv2d::with_bias(8, 16, (3, 5), false).stride(2)),
            "Conv2d(8, 16, kernel_size=(3, 5), stride=(2, 2), bias=False)",
        ),
        (Box::new(MaxPool2d::new(2)), "MaxPool2d(kernel_size=2, stride=2, padding=0, dilation=1, ceil_mode=False)"),
        (
            Box::new(MaxPool2d::new(3).stride(2).padding(1)),
            "MaxPool2d(kernel_size=3, stride=2, padding=1, dilation=1, ceil_mode=False)",
        ),
        (
            Box::new(MaxPool2d::new((2, 3))),
            "MaxPool2d(kernel_size=(2, 3), stride=(2, 3), padding=0, dilation=1, ceil_mode=False)",
        ),
        (Box::new(AvgPool2d::new(2)), "AvgPool2d(kernel_size=2, stride=2, padding=0)"),
        (Box::new(AvgPool2d::new(3).stride(1).padding(1)), "AvgPool2d(kernel_size=3, stride=1, padding=1)"),
        (
            Box::new(BatchNorm1d::new(32)),
            "BatchNorm1d(32, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True)",
        ),
        (
            Box::new(BatchNorm2d::new(16)),
            "BatchNorm2d(16, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True)",
        ),
        (
            Box::new(BatchNorm2d::with_options(8, false, false).eps(1e-3).momentum(None)),
            "BatchNorm2d(8, eps=0.001, momentum=None, affine=False, track_running_stats=False)",
        ),
        (Box::new(LayerNorm::new(&[10])), "LayerNorm((10,), eps=1e-05, elementwise_affine=True)"),
        (
            Box::new(LayerNorm::with_affine(&[4, 5], false).eps(1e-6)),
            "LayerNorm((4, 5), eps=1e-06, elementwise_affine=False)",
        ),
        (Box::new(Dropout::new(0.5)), "Dropout(p=0.5, inplace=False)"),
        (Box::new(Dropout::new(0.1)), "Dropout(p=0.1, inplace=False)"),
        (Box::new(Embedding::new(10, 3)), "Embedding(10, 3)"),
        (Box::new(Flatten::new()), "Flatten(start_dim=1, end_dim=-1)"),
        (Box::new(Flatten::with_dims(0, 2)), "Flatten(start_dim=0, end_dim=2)"),
        (Box::new(Identity::new()), "Identity()"),
        (Box::new(ReLU::new()), "ReLU()"),
        (Box::new(GELU::new()), "GELU(approximate='none')"),
        (Box::new(GELU::with_approximate(GeluApproximate::Tanh)), "GELU(approximate='tanh')"),
        (Box::new(Tanh::new()), "Tanh()"),
        (Box::new(Sigmoid::new()), "Sigmoid()"),
        (Box::new(SiLU::new()), "SiLU()"),
        (Box::new(Softmax::new(1)), "Softmax(dim=1)"),
        (Box::new(Softmax::new(-1)), "Softmax(dim=-1)"),
        (Box::new(LogSoftmax::new(1)), "LogSoftmax(dim=1)"),
        (Box::new(CrossEntropyLoss::new()), "CrossEntropyLoss()"),
        (Box::new(CrossEntropyLoss::new().reduction(LossReduction::Sum).label_smoothing(0.1)), "CrossEntropyLoss()"),
        (Box::new(NLLLoss::new()), "NLLLoss()"),
        (Box::new(MSELoss::new()), "MSELoss()"),
    ];
    for (m, want) in cases {
        assert_eq!(m.repr(), want);
    }
    let cnn = Sequential::new()
        .add(Conv2d::new(1, 8, 3).padding(1))
        .add(ReLU::new())
        .add(MaxPool2d::new(2))
        .add(Flatten::new())
        .add(Linear::new(8 * 14 * 14, 10));
    assert_eq!(
        cnn.repr(),
        "Sequential(\n  (0): Conv2d(1, 8, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1))\n  (1): ReLU()\n  \
         (2): MaxPool2d(kernel_size=2, stride=2, padding=0, dilation=1, ceil_mode=False)\n  \
         (3): Flatten(start_dim=1, end_dim=-1)\n  (4): Linear(in_features=1568, out_features=10, bias=True)\n)"
    );
}

#[test]
fn layer_norm_normalises_each_row() {
    tracegrad::manual_seed(7);
    let ln = LayerNorm::new(&[64]);
    let x = Tensor::randn(&[8, 64]).mul_scalar(3.0).add_scalar(5.0);
    let y = ln.call(&x);
    let mean = y.mean(&[-1], false).to_vec_f64();
    let var = y.var(&[-1], 0, false).to_vec_f64();
    assert_all_close("row means", &mean, &[0.0; 8], 1e-5);
    assert_all_close("row variances", &var, &[1.0; 8], 1e-3);
    assert!(y.allclose(&x.layer_norm(&[64], ln.weight.as_ref(), ln.bias.as_ref(), 1e-5), 0.0, 0.0));
    // Two trailing dims.
    let ln2 = LayerNorm::with_affine(&[4, 5], false);
    let y2 = ln2.call(&Tensor::randn(&[3, 4, 5])).reshape(&[3, 20]);
    assert_all_close("2-D row means", &y2.mean(&[-1], false).to_vec_f64(), &[0.0; 3], 1e-5);
}

#[test]
fn activations_match_their_functions() {
    tracegrad::manual_seed(8);
    let x = Tensor::randn(&[4, 5]);
    let pairs: Vec<(Box<dyn Module>, Tensor)> = vec![
        (Box::new(ReLU::new()), x.relu()),
        (Box::new(GELU::new()), x.gelu()),
        (Box::new(GELU::with_approximate(GeluApproximate::Tanh)), x.gelu_tanh()),
        (Box::new(Tanh::new()), x.tanh()),
        (Box::new(Sigmoid::new()), x.sigmoid()),
        (Box::new(SiLU::new()), x.silu()),
        (Box::new(Softmax::new(1)), x.softmax(1)),
        (Box::new(LogSoftmax::new(1)), x.log_softmax(1)),
        (Box::new(Identity::new()), x.clone()),
        (Box::new(Flatten::with_dims(0, -1)), x.reshape(&[20])),
    ];
    for (m, want) in pairs {
        assert!(m.call(&x).allclose(&want, 0.0, 0.0), "{}", m.repr());
    }
    let rows = Softmax::new(-1).call(&x).sum(&[-1], false).to_vec_f64();
    assert_all_close("softmax rows", &rows, &[1.0; 4], 1e-6);
}

#[test]
fn loss_modules_equal_the_functional_forms() {
    tracegrad::manual_seed(9);
    let logits = Tensor::randn(&[6, 4]);
    let target = Tensor::from_vec(vec![0i64, 3, 1, 2, 2, 0], &[6]);
    for reduction in [LossReduction::Mean, LossReduction::Sum, LossReduction::None] {
        let ce = CrossEntropyLoss::new().reduction(reduction).label_smoothing(0.2);
        let want = logits.cross_entropy_with(&target, reduction, 0.2);
        assert!(ce.compute(&logits, &target).allclose(&want, 0.0, 0.0));
        let nll = NLLLoss::new().reduction(reduction);
        let logp = logits.log_softmax(1);
        assert!(nll.compute(&logp, &target).allclose(&logp.nll_loss(&target, reduction), 0.0, 0.0));
        let y = Tensor::randn(&[6, 4]);
        let mse = MSELoss::new().reduction(reduction);
        assert!(mse.compute(&logits, &y).allclose(&logits.mse_loss(&y, reduction), 0.0, 0.0));
    }
    // Defaults: mean reduction, no smoothing; CE = NLL of log_softmax.
    let ce = CrossEntropyLoss::new().compute(&logits, &target).item();
    let nll = NLLLoss::new().compute(&logits.log_softmax(1), &target).item();
    assert!((ce - nll).abs() < 1e-6 && (ce - logits.cross_entropy(&target).item()).abs() == 0.0);
    // compute goes through call_many, so hooks see both inputs.
    let loss = MSELoss::new();
    let seen: Arc<Mutex<Vec<usize>>> = Arc::default();
    let s = seen.clone();
    let _h = loss.register_forward_hook(move |_, args, _| {
        s.lock().unwrap().push(args.len());
        None
    });
    let a = Tensor::randn(&[3]).requires_grad_(true);
    let l = loss.compute(&a, &Tensor::zeros(&[3]));
    assert_eq!(*seen.lock().unwrap(), [2]);
    l.backward();
    assert!(a.grad().unwrap().allclose(&a.mul_scalar(2.0 / 3.0), 1e-6, 1e-7));
}

#[test]
#[should_panic(expected = "MSELoss.forward() takes 2 tensors (input, target) but 1 were given")]
fn loss_modules_need_two_inputs() {
    MSELoss::new().call(&Tensor::zeros(&[2]));
}

#[test]
fn init_fans_gains_and_bounds() {
    let g = |n| init::calculate_gain(n);
    assert_eq!(g(Nonlinearity::Linear), 1.0);
    assert_eq!(g(Nonlinearity::Conv), 1.0);
    assert_eq!(g(Nonlinearity::Sigmoid), 1.0);
    assert_eq!(g(Nonlinearity::Tanh), 5.0 / 3.0);
    assert_eq!(g(Nonlinearity::Relu), 2f64.sqrt());
    assert_eq!(g(Nonlinearity::LeakyRelu(0.01)), (2.0 / (1.0 + 0.01f64 * 0.01)).sqrt());
    assert_eq!(g(Nonlinearity::LeakyRelu(0.0)), 2f64.sqrt());
    assert_eq!(g(Nonlinearity::Selu), 0.75);
    // PyTorch's value of calculate_gain('leaky_relu', math.sqrt(5)).
    assert_eq!(g(Nonlinearity::LeakyRelu(5f64.sqrt())), 0.5773502691896257);

    let w = Tensor::zeros(&[64, 32, 3, 3]);
    assert_eq!(init::calculate_fan_in_and_fan_out(&w), (288, 576));
    assert_eq!(init::calculate_fan_in_and_fan_out(&Tensor::zeros(&[10, 20])), (20, 10));

    tracegrad::manual_seed(10);
    let gain = 5.0 / 3.0;
    let bound = init::xavier_uniform_bound(&w, gain);
    assert!((bound - gain * (6.0 / (288.0 + 576.0f64)).sqrt()).abs() <= 1e-15);
    init::xavier_uniform_(&w, gain);
    within(&w, bound, "xavier_uniform_");

    let kb = init::kaiming_uniform_bound(&w, FanMode::FanIn, Nonlinearity::Relu);
    assert!((kb - (6.0 / 288.0f64).sqrt()).abs() <= 1e-15);
    init::kaiming_uniform_(&w, FanMode::FanIn, Nonlinearity::Relu);
    within(&w, kb, "kaiming_uniform_");
    let kb_out = init::kaiming_uniform_bound(&w, FanMode::FanOut, Nonlinearity::Relu);
    assert!((kb_out - (6.0 / 576.0f64).sqrt()).abs() <= 1e-15);

    let big = Tensor::zeros(&[256, 512]);
    init::kaiming_normal_(&big, FanMode::FanOut, Nonlinearity::Relu);
    let want_std = init::kaiming_std(&big, FanMode::FanOut, Nonlinearity::Relu);
    assert!((want_std - (2.0 / 256.0f64).sqrt()).abs() <= 1e-15);
    assert_moments(&big, 0.0, want_std, "kaiming_normal_");
    init::xavier_normal_(&big, 1.0);
    let xs = init::xavier_std(&big, 1.0);
    assert!((xs - (2.0 / 768.0f64).sqrt()).abs() <= 1e-15);
    assert_moments(&big, 0.0, xs, "xavier_normal_");
    init::normal_(&big, 2.0, 0.5);
    assert_moments(&big, 2.0, 0.5, "normal_");
    init::uniform_(&big, -3.0, -1.0);
    assert!(big.to_vec_f32().iter().all(|v| (-3.0..=-1.0).contains(v)));
    assert_moments(&big, -2.0, 2.0 / 12f64.sqrt(), "uniform_");

    init::constant_(&big, 0.25);
    assert!(big.equal(&Tensor::full(&[256, 512], 0.25)));
    init::ones_(&big);
    assert!(big.equal(&Tensor::ones(&[256, 512])));
    init::zeros_(&big);
    assert!(big.equal(&Tensor::zeros(&[256, 512])));
}

#[test]
fn init_writes_in_place_keeps_dtype_and_autograd_flags() {
    let p = Tensor::zeros_dtype(&[4, 3], DType::F64).requires_grad_(true);
    init::uniform_(&p, -1.0, 1.0);
    assert_eq!(p.dtype(), DType::F64);
    assert!(p.requires_grad() && p.is_leaf());
    // A layer's parameter changes where the layer sees it.
    let lin = Linear::new(3, 2);
    init::constant_(&lin.weight, 0.5);
    init::zeros_(lin.bias.as_ref().unwrap());
    let y = no_grad(|| lin.call(&Tensor::ones(&[1, 3])));
    assert_eq!(y.to_vec_f32(), [1.5, 1.5]);
    // An explicit generator gives reproducible fills, independent of the default one.
    let (a, b) = (Tensor::zeros(&[5, 5]), Tensor::zeros(&[5, 5]));
    init::xavier_uniform_with(&mut Generator::new(42), &a, 1.0);
    tracegrad::manual_seed(999);
    init::xavier_uniform_with(&mut Generator::new(42), &b, 1.0);
    assert!(a.equal(&b));
    let mut gen = Generator::new(7);
    init::kaiming_normal_with(&mut gen, &a, FanMode::FanIn, Nonlinearity::Tanh);
    init::normal_with(&mut gen, &b, 0.0, 1.0);
    assert!(!a.equal(&b));
}

#[test]
#[should_panic(expected = "Fan in and fan out can not be computed for tensor with fewer than 2 dimensions")]
fn init_fans_need_two_dims() {
    init::xavier_uniform_(&Tensor::zeros(&[5]), 1.0);
}

#[track_caller]
fn within(t: &Tensor, bound: f64, what: &str) {
    let b = bound as f32;
    let v = t.to_vec_f32();
    assert!(v.iter().all(|x| x.abs() <= b), "{what}: a sample exceeds {bound}");
    let max = v.iter().fold(0f32, |m, x| m.max(x.abs()));
    assert!(max > 0.95 * b, "{what}: samples should reach near the bound, max {max}");
}

#[track_caller]
fn assert_moments(t: &Tensor, mean: f64, std: f64, what: &str) {
    let v = t.to_vec_f64();
    let m = v.iter().sum::<f64>() / v.len() as f64;
    let s = (v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / v.len() as f64).sqrt();
    assert!((m - mean).abs() < 0.02 * std.max(1.0), "{what}: mean {m}, want {mean}");
    assert!((s / std - 1.0).abs() < 0.02, "{what}: std {s}, want {std}");
}

#[test]
fn small_cnn_trains() {
    tracegrad::manual_seed(11);
    let model = Sequential::new()
        .add(Conv2d::new(1, 4, 3).padding(1))
        .add(ReLU::new())
        .add(MaxPool2d::new(2))
        .add(Flatten::new())
        .add(Linear::new(4 * 4 * 4, 3));
    let x = Tensor::randn(&[16, 1, 8, 8]);
    let y = Tensor::randint(0, 3, &[16]);
    let loss_fn = CrossEntropyLoss::new();
    let lr = 0.1;
    let mut losses = Vec::new();
    for _ in 0..20 {
        model.zero_grad();
        let loss = loss_fn.compute(&model.call(&x), &y);
        losses.push(loss.item());
        loss.backward();
        no_grad(|| {
            for p in model.parameters() {
                let step = p.detach().sub(&p.grad().expect("every parameter gets a gradient").mul_scalar(lr));
                p.set_buffer(step.buffer());
            }
        });
    }
    let (first, last) = (losses[0], *losses.last().unwrap());
    assert!(last < 0.8 * first, "loss should decrease: {losses:?}");
    assert!(losses.iter().all(|l| l.is_finite()));
}
