//! The model zoo: models that tests, examples, the dump CLI and benchmarks share.
//!
//! `seed_model()` is the seed "custom model" exercise (see `shared/reference/seed_model.json`):
//! `Model(ab: Layer_AB(a: Function_A, b: Function_B), cd: Layer_CD(c: Function_C,
//! d: Function_D(c: Function_C)))`. Its type names are PyTorch's class names, so they keep
//! their underscores.
#![allow(non_camel_case_types, non_snake_case)]

use crate::nn::{Module, ModuleCore, ModuleExt};
use crate::Tensor;

/// The largest example batch [`build`] accepts: far above any dump or bench, and small enough
/// that no model's sizes approach overflow.
pub const MAX_BATCH: usize = 1 << 20;

/// A one-element parameter.
fn scalar_param(v: f32) -> Tensor {
    Tensor::from_vec(vec![v], &[1]).requires_grad_(true)
}

/// `x * 2`.
#[derive(Module)]
#[allow(non_camel_case_types)]
pub struct Function_A {
    core: ModuleCore,
}

impl Module for Function_A {
    fn forward(&self, x: &Tensor) -> Tensor {
        x * 2.0
    }
}

/// `x / W1 / W2` with parameters W1 = 10, W2 = 2.
#[derive(Module)]
#[allow(non_camel_case_types)]
pub struct Function_B {
    /// The first divisor / offset parameter.
    #[param]
    #[allow(non_snake_case)]
    pub W1: Tensor,
    /// The second divisor parameter.
    #[param]
    #[allow(non_snake_case)]
    pub W2: Tensor,
    core: ModuleCore,
}

impl Module for Function_B {
    fn forward(&self, x: &Tensor) -> Tensor {
        x / &self.W1 / &self.W2
    }
}

/// `x * duck`, with the persistent buffer duck = 7.
#[derive(Module)]
#[allow(non_camel_case_types)]
pub struct Function_C {
    /// The multiplier buffer.
    #[buffer]
    pub duck: Tensor,
    core: ModuleCore,
}

impl Module for Function_C {
    fn forward(&self, x: &Tensor) -> Tensor {
        x * &self.duck
    }
}

/// `c(x + W1) / W2` with W1 = 3, W2 = 5 and a child `Function_C`.
#[derive(Module)]
#[allow(non_camel_case_types, non_snake_case)]
pub struct Function_D {
    /// The first divisor / offset parameter.
    #[param]
    pub W1: Tensor,
    /// The second divisor parameter.
    #[param]
    pub W2: Tensor,
    /// The inner multiplier.
    #[module]
    pub c: Function_C,
    core: ModuleCore,
}

impl Module for Function_D {
    fn forward(&self, x: &Tensor) -> Tensor {
        self.c.call(&(x + &self.W1)) / &self.W2
    }
}

/// `b(a(x) / 5)`.
#[derive(Module)]
#[allow(non_camel_case_types)]
pub struct Layer_AB {
    /// The first child.
    #[module]
    pub a: Function_A,
    /// The second child.
    #[module]
    pub b: Function_B,
    core: ModuleCore,
}

impl Module for Layer_AB {
    fn forward(&self, x: &Tensor) -> Tensor {
        self.b.call(&(self.a.call(x) / 5.0))
    }
}

/// `d(c(x)) + 1`.
#[derive(Module)]
#[allow(non_camel_case_types)]
pub struct Layer_CD {
    /// The inner multiplier.
    #[module]
    pub c: Function_C,
    /// The offset-and-scale child.
    #[module]
    pub d: Function_D,
    core: ModuleCore,
}

impl Module for Layer_CD {
    fn forward(&self, x: &Tensor) -> Tensor {
        self.d.call(&self.c.call(x)) + 1.0
    }
}

/// The seed model: `cd(ab(x))`.
#[derive(Module)]
pub struct Model {
    /// The first stage.
    #[module]
    pub ab: Layer_AB,
    /// The second stage.
    #[module]
    pub cd: Layer_CD,
    core: ModuleCore,
}

impl Module for Model {
    fn forward(&self, x: &Tensor) -> Tensor {
        self.cd.call(&self.ab.call(x))
    }
}

/// A `Function_C` with duck = 7.
pub fn function_c() -> Function_C {
    Function_C { duck: Tensor::from_vec(vec![7.0f32], &[1]), core: ModuleCore::new() }
}

/// A fresh seed model with its initial parameter values.
pub fn seed_model() -> Model {
    Model {
        ab: Layer_AB {
            a: Function_A { core: ModuleCore::new() },
            b: Function_B { W1: scalar_param(10.0), W2: scalar_param(2.0), core: ModuleCore::new() },
            core: ModuleCore::new(),
        },
        cd: Layer_CD {
            c: function_c(),
            d: Function_D { W1: scalar_param(3.0), W2: scalar_param(5.0), c: function_c(), core: ModuleCore::new() },
            core: ModuleCore::new(),
        },
        core: ModuleCore::new(),
    }
}

use crate::nn::{Conv2d, Flatten, GeluApproximate, LayerNorm, Linear, MaxPool2d, ReLU, Sequential, GELU};

/// The `mlp_train_step` model: Linear 784→256, ReLU, Linear 256→10.
pub fn mlp() -> Sequential {
    Sequential::new().add(Linear::new(784, 256)).add(ReLU::new()).add(Linear::new(256, 10))
}

/// The `cnn_train_step` model: conv 1→8 3×3 pad 1, ReLU, maxpool 2, conv 8→16 3×3 pad 1,
/// ReLU, maxpool 2, flatten, Linear 784→10.
pub fn cnn() -> Sequential {
    Sequential::new()
        .add(Conv2d::new(1, 8, 3).padding(1))
        .add(ReLU::new())
        .add(MaxPool2d::new(2))
        .add(Conv2d::new(8, 16, 3).padding(1))
        .add(ReLU::new())
        .add(MaxPool2d::new(2))
        .add(Flatten::new())
        .add(Linear::new(784, 10))
}

/// A pre-LayerNorm transformer block with causal multi-head self-attention and a GELU(tanh)
/// MLP of 4× width (the `transformer_block_train_step` workload: D 128, 4 heads).
#[derive(Module)]
pub struct TransformerBlock {
    /// LayerNorm before attention.
    #[module]
    pub ln1: LayerNorm,
    /// The fused query/key/value projection, D → 3D.
    #[module]
    pub qkv: Linear,
    /// The output projection, D → D.
    #[module]
    pub proj: Linear,
    /// LayerNorm before the MLP.
    #[module]
    pub ln2: LayerNorm,
    /// MLP up-projection, D → 4D.
    #[module]
    pub fc1: Linear,
    /// The MLP's activation.
    #[module]
    pub act: GELU,
    /// MLP down-projection, 4D → D.
    #[module]
    pub fc2: Linear,
    heads: usize,
    core: ModuleCore,
}

impl TransformerBlock {
    /// A block of width `d` with `heads` heads.
    pub fn new(d: usize, heads: usize) -> TransformerBlock {
        assert!(d.is_multiple_of(heads), "width {d} is not divisible by {heads} heads");
        TransformerBlock {
            ln1: LayerNorm::new(&[d]),
            qkv: Linear::new(d, 3 * d),
            proj: Linear::new(d, d),
            ln2: LayerNorm::new(&[d]),
            fc1: Linear::new(d, 4 * d),
            act: GELU::with_approximate(GeluApproximate::Tanh),
            fc2: Linear::new(4 * d, d),
            heads,
            core: ModuleCore::new(),
        }
    }
}

impl Module for TransformerBlock {
    fn forward(&self, x: &Tensor) -> Tensor {
        let s = x.shape();
        let (b, t, d) = (s[0] as isize, s[1], s[2]);
        let (h, dh) = (self.heads as isize, (d / self.heads) as isize);
        let qkv = self.qkv.call(&self.ln1.call(x));
        let split: Vec<Tensor> =
            qkv.chunk(3, -1).iter().map(|p| p.reshape(&[b, t as isize, h, dh]).permute(&[0, 2, 1, 3])).collect();
        let (q, k, v) = (&split[0], &split[1], &split[2]);
        let scores = q.matmul(&k.transpose(-2, -1)).mul_scalar(1.0 / (dh as f64).sqrt());
        let causal: Vec<bool> = (0..t * t).map(|i| i % t > i / t).collect();
        let mask = Tensor::from_vec(causal, &[t, t]);
        let att = scores.masked_fill(&mask, f64::NEG_INFINITY).softmax(-1);
        let y = att.matmul(v).permute(&[0, 2, 1, 3]).reshape(&[b, t as isize, d as isize]);
        let x = x + &self.proj.call(&y);
        let m = self.fc2.call(&self.act.call(&self.fc1.call(&self.ln2.call(&x))));
        &x + &m
    }

    fn extra_repr(&self) -> String {
        format!("heads={}", self.heads)
    }
}

/// A model of the zoo with the input it is benchmarked and dumped on.
pub struct ZooModel {
    /// The module.
    pub module: Box<dyn Module>,
    /// Input shape for a batch of `batch`.
    pub input_shape: Vec<usize>,
}

/// The zoo's names and one-line descriptions.
pub const MODELS: [(&str, &str); 4] = [
    ("mlp", "Linear 784→256, ReLU, Linear 256→10; input [batch, 784]"),
    ("cnn", "conv 1→8, ReLU, maxpool, conv 8→16, ReLU, maxpool, flatten, Linear 784→10; input [batch, 1, 28, 28]"),
    ("transformer", "pre-LN transformer block, D 128, 4 heads, causal, GELU(tanh) MLP 4×; input [batch, 64, 128]"),
    ("seed", "the seed-exercise custom model (shared/reference/seed_model.json); input [batch, 3]"),
];

/// Builds a zoo model by name, for inputs with batch size `batch`.
pub fn build(name: &str, batch: usize) -> Result<ZooModel, String> {
    if !(1..=MAX_BATCH).contains(&batch) {
        return Err(format!("batch size {batch} is outside 1..={MAX_BATCH}"));
    }
    let (module, input_shape): (Box<dyn Module>, Vec<usize>) = match name {
        "mlp" => (Box::new(mlp()), vec![batch, 784]),
        "cnn" => (Box::new(cnn()), vec![batch, 1, 28, 28]),
        "transformer" => (Box::new(TransformerBlock::new(128, 4)), vec![batch, 64, 128]),
        "seed" => (Box::new(seed_model()), vec![batch, 3]),
        other => {
            let names: Vec<&str> = MODELS.iter().map(|(n, _)| *n).collect();
            return Err(format!("unknown model {other:?}; the zoo has {}", names.join(", ")));
        }
    };
    Ok(ZooModel { module, input_shape })
}
