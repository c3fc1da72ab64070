//! Loss modules: `CrossEntropyLoss`, `NLLLoss` and `MSELoss`. Each takes two inputs,
//! `(input, target)`, through `forward_many`/`call_many`; `compute(&input, &target)` is the
//! same call spelled for two tensors, so module hooks fire.

use super::{Module, ModuleCore, ModuleExt};
use crate::tensor::Tensor;
use crate::LossReduction;

#[track_caller]
fn input_and_target<'a>(name: &str, xs: &'a [Tensor]) -> (&'a Tensor, &'a Tensor) {
    match xs {
        [input, target] => (input, target),
        _ => panic!("TypeError: {name}.forward() takes 2 tensors (input, target) but {} were given", xs.len()),
    }
}

/// Declares a loss module: its struct with `reduction`, the builder and `compute`.
macro_rules! loss_module {
    ($(#[$doc:meta])* $name:ident { $($(#[$fdoc:meta])* $field:ident: $fty:ty = $default:expr),* }) => {
        $(#[$doc])*
        #[derive(Module)]
        pub struct $name {
            /// How losses over the batch are combined (default: the mean).
            pub reduction: LossReduction,
            $($(#[$fdoc])* pub $field: $fty,)*
            core: ModuleCore,
        }

        impl $name {
            /// The loss with PyTorch's defaults.
            pub fn new() -> $name {
                $name { reduction: LossReduction::Mean, $($field: $default,)* core: ModuleCore::new() }
            }

            /// Sets the reduction (builder style).
            pub fn reduction(mut self, reduction: LossReduction) -> $name {
                self.reduction = reduction;
                self
            }

            /// `loss(input, target)`: calls the module (hooks included) on the pair.
            #[track_caller]
            pub fn compute(&self, input: &Tensor, target: &Tensor) -> Tensor {
                self.call_many(&[input.clone(), target.clone()])
            }
        }

        impl Default for $name {
            fn default() -> $name {
                $name::new()
            }
        }
    };
}

loss_module!(
    /// Cross-entropy of logits `[N, C, …]` against class indices (`torch.nn.CrossEntropyLoss`,
    /// ignore_index -100).
    ///
    /// ```
    /// use tracegrad::nn::{CrossEntropyLoss, ModuleExt};
    /// use tracegrad::Tensor;
    ///
    /// let loss = CrossEntropyLoss::new().label_smoothing(0.1);
    /// assert_eq!(loss.repr(), "CrossEntropyLoss()");
    /// let l = loss.compute(&Tensor::randn(&[4, 3]), &Tensor::from_vec(vec![0i64, 2, 1, 0], &[4]));
    /// assert_eq!(l.shape(), Vec::<usize>::new());
    /// ```
    CrossEntropyLoss {
        /// Label smoothing in `[0, 1]` (default 0).
        label_smoothing: f64 = 0.0
    }
);

impl CrossEntropyLoss {
    /// Sets the label smoothing (builder style).
    pub fn label_smoothing(mut self, label_smoothing: f64) -> CrossEntropyLoss {
        self.label_smoothing = label_smoothing;
        self
    }
}

impl Module for CrossEntropyLoss {
    #[track_caller]
    fn forward_many(&self, xs: &[Tensor]) -> Tensor {
        let (input, target) = input_and_target("CrossEntropyLoss", xs);
        input.cross_entropy_with(target, self.reduction, self.label_smoothing)
    }
}

loss_module!(
    /// Negative log-likelihood of log-probabilities `[N, C, …]` against class indices
    /// (`torch.nn.NLLLoss`, ignore_index -100).
    NLLLoss {}
);

impl Module for NLLLoss {
    #[track_caller]
    fn forward_many(&self, xs: &[Tensor]) -> Tensor {
        let (input, target) = input_and_target("NLLLoss", xs);
        input.nll_loss(target, self.reduction)
    }
}

loss_module!(
    /// Mean squared error (`torch.nn.MSELoss`).
    MSELoss {}
);

impl Module for MSELoss {
    #[track_caller]
    fn forward_many(&self, xs: &[Tensor]) -> Tensor {
        let (input, target) = input_and_target("MSELoss", xs);
        input.mse_loss(target, self.reduction)
    }
}
