//! The model zoo: models that tests, examples, the dump CLI and benchmarks share.
//!
//! `seed_model()` is the seed "custom model" exercise (see `shared/reference/seed_model.json`):
//! `Model(ab: Layer_AB(a: Function_A, b: Function_B), cd: Layer_CD(c: Function_C,
//! d: Function_D(c: Function_C)))`. Its type names are PyTorch's class names, so they keep
//! their underscores.
#![allow(non_camel_case_types, non_snake_case)]

use crate::nn::{Module, ModuleCore, ModuleExt};
use crate::Tensor;

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
