//! Modules: the [`Module`] trait and `#[derive(Module)]`, traversal and introspection
//! ([`ModuleExt`]), hooks, state dicts, and the layers built on them.

mod activation;
mod call;
mod container;
mod conv;
mod dropout;
mod embedding;
mod flatten;
pub mod init;
mod lazy;
mod linear;
mod loss;
mod module;
mod norm;
mod pooling;
mod python_repr;
mod state;
pub mod utils;

pub use activation::{GeluApproximate, LogSoftmax, ReLU, SiLU, Sigmoid, Softmax, Tanh, GELU};
pub(crate) use call::{BackwardHooks, CallBackend};
pub use container::{IntoSharedModule, ModuleDict, ModuleList, Sequential};
pub use conv::{Conv2d, Size2};
pub use dropout::Dropout;
pub use embedding::Embedding;
pub use flatten::Flatten;
pub(crate) use lazy::uninitialized_message;
pub use lazy::{check_initialized, is_uninitialized, LazyConv2d, LazyLinear};
pub use linear::{Identity, Linear};
pub use loss::{CrossEntropyLoss, MSELoss, NLLLoss};
pub(crate) use module::{global_hooks_version, hook_state, module_id};
pub use module::{
    hooks_version, own_entries, register_module_forward_hook, register_module_forward_pre_hook,
    register_module_full_backward_hook, register_module_full_backward_pre_hook, repr, AsDyn, AsModule, AsTensorField,
    BackwardHook, BackwardPreHook, FieldVisitor, ForwardHook, ForwardPreHook, LoadReport, Module, ModuleCore,
    ModuleError, ModuleExt, ModuleFields, ModuleRef, OwnEntries,
};
pub use norm::{BatchNorm1d, BatchNorm2d, LayerNorm};
pub use pooling::{AvgPool2d, MaxPool2d};
pub(crate) use state::state_to_safetensors_with;
pub use state::{
    load_safetensors, save_safetensors, state_from_safetensors, state_to_safetensors, StateError, StateErrorKind,
};
pub use tracegrad_macros::Module;
