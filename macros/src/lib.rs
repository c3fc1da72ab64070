//! `#[derive(Module)]`: writes a module's traversal so that defining a module takes a struct,
//! a constructor and `forward`, and nothing else.
//!
//! Field attributes:
//! - `#[param]` on a `Tensor` or `Option<Tensor>`: a parameter;
//! - `#[buffer]` / `#[buffer(persistent = false)]` on a `Tensor` or `Option<Tensor>`: a buffer;
//! - `#[module]` on a module, `Arc<M>`, `Box<dyn Module>` or `Arc<dyn Module>`: a child.
//!
//! Exactly one field must have type `ModuleCore` (it holds hooks, the training flag and what is
//! registered at run time). Fields are visited in declaration order, as PyTorch visits
//! attributes in assignment order. The generated `type_name` is the struct's name.

#![warn(missing_docs)]

use proc_macro::TokenStream;
use quote::quote;
use syn::{parse_macro_input, Data, DeriveInput, Fields, Type};

enum Kind {
    Param,
    Buffer(bool),
    Module,
}

fn is_core(ty: &Type) -> bool {
    matches!(ty, Type::Path(p) if p.path.segments.last().is_some_and(|s| s.ident == "ModuleCore"))
}

/// Derives `tracegrad::nn::ModuleFields`. See the crate docs for the field attributes.
#[proc_macro_derive(Module, attributes(param, buffer, module))]
pub fn derive_module(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    match expand(&input) {
        Ok(ts) => ts.into(),
        Err(e) => e.to_compile_error().into(),
    }
}

fn expand(input: &DeriveInput) -> syn::Result<proc_macro2::TokenStream> {
    let name = &input.ident;
    let Data::Struct(data) = &input.data else {
        return Err(syn::Error::new_spanned(name, "#[derive(Module)] needs a struct"));
    };
    let Fields::Named(fields) = &data.fields else {
        return Err(syn::Error::new_spanned(name, "#[derive(Module)] needs named fields"));
    };
    let mut core = None;
    let mut visits = Vec::new();
    for f in &fields.named {
        let ident = f.ident.as_ref().expect("named field");
        let key = ident.to_string();
        if is_core(&f.ty) {
            if core.is_some() {
                return Err(syn::Error::new_spanned(f, "only one ModuleCore field is allowed"));
            }
            core = Some(ident.clone());
            continue;
        }
        let mut kind = None;
        for attr in &f.attrs {
            if attr.path().is_ident("param") {
                kind = Some(Kind::Param);
            } else if attr.path().is_ident("module") {
                kind = Some(Kind::Module);
            } else if attr.path().is_ident("buffer") {
                let mut persistent = true;
                if matches!(attr.meta, syn::Meta::List(_)) {
                    attr.parse_nested_meta(|m| {
                        if m.path.is_ident("persistent") {
                            let v: syn::LitBool = m.value()?.parse()?;
                            persistent = v.value;
                            Ok(())
                        } else {
                            Err(m.error("expected `persistent = true|false`"))
                        }
                    })?;
                }
                kind = Some(Kind::Buffer(persistent));
            }
        }
        match kind {
            Some(Kind::Param) => visits.push(quote! {
                v.parameter(#key, ::tracegrad::nn::AsTensorField::as_tensor_field(&self.#ident));
            }),
            Some(Kind::Buffer(p)) => visits.push(quote! {
                v.buffer(#key, ::tracegrad::nn::AsTensorField::as_tensor_field(&self.#ident), #p);
            }),
            Some(Kind::Module) => visits.push(quote! {
                v.module(#key, ::tracegrad::nn::AsModule::as_module(&self.#ident));
            }),
            None => {}
        }
    }
    let Some(core) = core else {
        return Err(syn::Error::new_spanned(name, "#[derive(Module)] needs a field of type ModuleCore"));
    };
    let type_name = name.to_string();
    let (impl_generics, ty_generics, where_clause) = input.generics.split_for_impl();
    Ok(quote! {
        impl #impl_generics ::tracegrad::nn::ModuleFields for #name #ty_generics #where_clause {
            fn type_name(&self) -> ::std::string::String {
                #type_name.to_string()
            }
            fn core(&self) -> &::tracegrad::nn::ModuleCore {
                &self.#core
            }
            fn visit_fields<'tg>(&'tg self, v: &mut dyn ::tracegrad::nn::FieldVisitor<'tg>) {
                #(#visits)*
            }
        }
    })
}
