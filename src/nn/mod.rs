//! Modules: the [`Module`] trait, its traversal, and the layers built on it.
//!
//! Traversal is one visitor ([`Visitor`]): a module reports its parameters, buffers and child
//! modules; `named_parameters`, `zero_grad`, `Display` and (next) `state_dict`, `apply` and the
//! hooks are all small functions over that one walk, as in burn.

mod layers;

pub use layers::{Linear, ReLU, Sequential};

use std::collections::HashSet;
use std::fmt;

use crate::tensor::Tensor;

/// What a module reports about itself during a traversal.
pub trait Visitor {
    /// A learnable tensor.
    fn parameter(&mut self, _name: &str, _t: &Tensor) {}
    /// A state tensor (e.g. running statistics); `persistent` ones go into state dicts.
    fn buffer(&mut self, _name: &str, _t: &Tensor, _persistent: bool) {}
    /// A submodule. The default descends into it.
    fn child(&mut self, _name: &str, m: &dyn Module)
    where
        Self: Sized,
    {
        m.visit(self);
    }
}

/// A neural-network building block: a struct, a constructor and `forward`.
pub trait Module: Send + Sync {
    /// The computation.
    fn forward(&self, x: &Tensor) -> Tensor;

    /// Reports parameters, buffers and children, in registration order.
    fn visit(&self, v: &mut dyn VisitorDyn);

    /// The runtime type name (`module.__class__.__name__`).
    fn type_name(&self) -> String;

    /// The argument summary printed inside the repr's parentheses.
    fn extra_repr(&self) -> String {
        String::new()
    }
}

/// Object-safe face of [`Visitor`] used by [`Module::visit`].
pub trait VisitorDyn {
    /// See [`Visitor::parameter`].
    fn parameter(&mut self, name: &str, t: &Tensor);
    /// See [`Visitor::buffer`].
    fn buffer(&mut self, name: &str, t: &Tensor, persistent: bool);
    /// See [`Visitor::child`].
    fn child(&mut self, name: &str, m: &dyn Module);
}

impl<V: Visitor> VisitorDyn for V {
    fn parameter(&mut self, name: &str, t: &Tensor) {
        Visitor::parameter(self, name, t)
    }
    fn buffer(&mut self, name: &str, t: &Tensor, persistent: bool) {
        Visitor::buffer(self, name, t, persistent)
    }
    fn child(&mut self, name: &str, m: &dyn Module) {
        Visitor::child(self, name, m)
    }
}

/// Collects `(dotted.name, tensor)` pairs, skipping tensors already seen (PyTorch dedups
/// shared parameters by identity).
struct Named {
    prefix: Vec<String>,
    out: Vec<(String, Tensor)>,
    seen: HashSet<usize>,
    want_buffers: bool,
}

impl Named {
    fn push(&mut self, name: &str, t: &Tensor) {
        if self.seen.insert(t.id()) {
            let mut full = self.prefix.join(".");
            if !full.is_empty() {
                full.push('.');
            }
            full.push_str(name);
            self.out.push((full, t.clone()));
        }
    }
}

impl Visitor for Named {
    fn parameter(&mut self, name: &str, t: &Tensor) {
        if !self.want_buffers {
            self.push(name, t);
        }
    }
    fn buffer(&mut self, name: &str, t: &Tensor, _persistent: bool) {
        if self.want_buffers {
            self.push(name, t);
        }
    }
    fn child(&mut self, name: &str, m: &dyn Module) {
        self.prefix.push(name.to_string());
        m.visit(self);
        self.prefix.pop();
    }
}

/// Traversal-derived helpers, available on every module.
pub trait ModuleExt: Module {
    /// Parameters with dotted names, deduplicated, in registration order.
    fn named_parameters(&self) -> Vec<(String, Tensor)> {
        let mut n = Named { prefix: vec![], out: vec![], seen: HashSet::new(), want_buffers: false };
        self.visit(&mut n);
        n.out
    }

    /// Parameters, deduplicated.
    fn parameters(&self) -> Vec<Tensor> {
        self.named_parameters().into_iter().map(|(_, t)| t).collect()
    }

    /// Buffers with dotted names.
    fn named_buffers(&self) -> Vec<(String, Tensor)> {
        let mut n = Named { prefix: vec![], out: vec![], seen: HashSet::new(), want_buffers: true };
        self.visit(&mut n);
        n.out
    }

    /// Clears every parameter's gradient.
    fn zero_grad(&self) {
        for p in self.parameters() {
            p.zero_grad();
        }
    }

    /// The PyTorch repr tree.
    fn repr(&self) -> String {
        repr(self.as_dyn())
    }

    /// Upcast helper.
    fn as_dyn(&self) -> &dyn Module;
}

impl<M: Module + Sized> ModuleExt for M {
    fn as_dyn(&self) -> &dyn Module {
        self
    }
}

impl ModuleExt for dyn Module {
    fn as_dyn(&self) -> &dyn Module {
        self
    }
}

struct Children(Vec<(String, String)>);

impl Visitor for Children {
    fn child(&mut self, name: &str, m: &dyn Module) {
        self.0.push((name.to_string(), repr(m)));
    }
}

/// PyTorch's repr: `Name(extra)` for leaves, an indented `(child): repr` list otherwise.
pub fn repr(m: &dyn Module) -> String {
    let mut c = Children(vec![]);
    m.visit(&mut c);
    let extra = m.extra_repr();
    if c.0.is_empty() {
        return format!("{}({extra})", m.type_name());
    }
    let mut s = format!("{}(", m.type_name());
    if !extra.is_empty() {
        s.push_str("\n  ");
        s.push_str(&extra);
    }
    for (name, r) in c.0 {
        s.push_str(&format!("\n  ({name}): {}", r.replace('\n', "\n  ")));
    }
    s.push_str("\n)");
    s
}

impl fmt::Display for dyn Module {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&repr(self))
    }
}
