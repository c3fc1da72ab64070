//! Modules: the [`Module`] trait and `#[derive(Module)]`, traversal and introspection
//! ([`ModuleExt`]), hooks, state dicts, and the layers built on them.

mod layers;
mod module;

pub use layers::{Linear, ReLU, Sequential};
pub use module::{
    hooks_version, own_entries, register_module_forward_hook, register_module_forward_pre_hook,
    register_module_full_backward_hook, register_module_full_backward_pre_hook, repr, AsDyn, AsModule, AsTensorField,
    BackwardHook, BackwardPreHook, FieldVisitor, ForwardHook, ForwardPreHook, LoadReport, Module, ModuleCore,
    ModuleError, ModuleExt, ModuleFields, ModuleRef, OwnEntries,
};
pub(crate) use module::{global_hooks_version, hook_state, module_id};
pub use tracegrad_macros::Module;
