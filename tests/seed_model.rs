//! The seed "custom model" exercise, against PyTorch's transcript `seed_model.json`.

mod common;

use std::sync::Arc;

use common::{assert_close, reference, strings, tensor};
use tracegrad::nn::{Module, ModuleExt};
use tracegrad::zoo::{function_c, seed_model as model};
use tracegrad::Tensor;

fn names<T>(v: &[(String, T)]) -> Vec<String> {
    v.iter().map(|(n, _)| n.clone()).collect()
}

#[test]
fn output_and_gradients() {
    let r = reference("seed_model.json");
    let m = model();
    let x = tensor(&r["input"]).requires_grad_(true);
    let y = m.call(&x);
    assert_close("output", &y, &r["output"], 1e-6, 0.0);
    y.sum_all().backward();
    assert_close("input grad", &x.grad().unwrap(), &r["input_grad_of_sum"], 1e-6, 0.0);
    let grads = r["param_grads_of_sum"].as_object().unwrap();
    for (name, p) in m.named_parameters() {
        assert_close(&name, &p.grad().expect("parameter has a gradient"), &grads[&name], 1e-6, 0.0);
    }
    assert_eq!(grads.len(), m.named_parameters().len());
}

#[test]
fn introspection_matches_pytorch() {
    let r = reference("seed_model.json");
    let m = model();
    let modules: Vec<(String, String)> = m.named_modules().into_iter().map(|(n, m)| (n, m.type_name())).collect();
    let want: Vec<(String, String)> = r["named_modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p[0].as_str().unwrap().to_string(), p[1].as_str().unwrap().to_string()))
        .collect();
    assert_eq!(modules, want);
    let children: Vec<(String, String)> = m.named_children().into_iter().map(|(n, m)| (n, m.type_name())).collect();
    let want: Vec<(String, String)> = r["named_children"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p[0].as_str().unwrap().to_string(), p[1].as_str().unwrap().to_string()))
        .collect();
    assert_eq!(children, want);
    assert_eq!(names(&m.named_parameters()), strings(&r["named_parameters"]));
    assert_eq!(names(&m.named_buffers()), strings(&r["named_buffers"]));
    assert_eq!(names(&m.state_dict()), strings(&r["state_dict_keys"]));
    assert_eq!(m.repr(), r["repr"].as_str().unwrap());
    assert_close("get_parameter", &m.get_parameter("ab.b.W1").unwrap(), &r["get_parameter_ab.b.W1"], 0.0, 0.0);
    assert_close("get_buffer", &m.get_buffer("cd.c.duck").unwrap(), &r["get_buffer_cd.c.duck"], 0.0, 0.0);
    for (call, want) in r["lookup_errors"].as_object().unwrap() {
        let (method, arg) = call.trim_end_matches(')').split_once('(').unwrap();
        let err = match method {
            "get_submodule" => m.get_submodule(arg).err().unwrap(),
            "get_parameter" => m.get_parameter(arg).err().unwrap(),
            "get_buffer" => m.get_buffer(arg).err().unwrap(),
            other => panic!("unknown lookup {other}"),
        };
        assert_eq!(err.to_string(), want.as_str().unwrap(), "{call}");
    }
    let mut order = Vec::new();
    m.apply(&mut |m| order.push(m.type_name()));
    assert_eq!(order, strings(&r["apply_visit_order"]));
}

#[test]
fn non_persistent_buffers_stay_out_of_the_state_dict() {
    let r = reference("seed_model.json");
    let m = model();
    let c = m.get_submodule("cd.c").unwrap();
    c.register_buffer("tmp", Some(Tensor::zeros(&[1])), false).unwrap();
    assert_eq!(names(&m.named_buffers()), strings(&r["nonpersistent_named_buffers"]));
    assert_eq!(names(&m.state_dict()), strings(&r["nonpersistent_state_dict_keys"]));
}

#[test]
fn load_state_dict_reports_like_pytorch() {
    let r = reference("seed_model.json");
    let m = model();
    let mut state: Vec<(String, Tensor)> = m.state_dict().into_iter().filter(|(k, _)| k != "ab.b.W1").collect();
    state.push(("extra.key".into(), Tensor::zeros(&[1])));
    let err = m.load_state_dict(&state, true).unwrap_err();
    assert_eq!(err.to_string(), r["load_state_dict_strict_error"].as_str().unwrap());
    let report = m.load_state_dict(&state, false).unwrap();
    assert_eq!(report.missing, strings(&r["load_state_dict_nonstrict"]["missing"]));
    assert_eq!(report.unexpected, strings(&r["load_state_dict_nonstrict"]["unexpected"]));

    let mut bad = m.state_dict();
    bad[0].1 = Tensor::zeros(&[2]);
    let before = m.get_parameter("ab.b.W2").unwrap().to_vec_f32();
    bad[1].1 = Tensor::from_vec(vec![99.0f32], &[1]);
    let err = m.load_state_dict(&bad, true).unwrap_err();
    assert_eq!(err.to_string(), r["load_state_dict_size_mismatch_error"].as_str().unwrap());
    // A failed load copies nothing.
    assert_eq!(m.get_parameter("ab.b.W2").unwrap().to_vec_f32(), before);
}

#[test]
fn apply_adds_parameters_and_hooks_on_a_live_model() {
    let r = &reference("seed_model.json")["apply_linear"];
    let m = model();
    let is_function = |m: &dyn Module| m.type_name().starts_with("Function_");
    m.apply(&mut |sub| {
        if is_function(sub) {
            sub.register_parameter("b", Some(Tensor::rand(&[2]).requires_grad_(true))).unwrap();
        }
    });
    m.apply(&mut |sub| {
        if is_function(sub) {
            for (_, p) in sub.named_parameters_recurse(false) {
                p.set_buffer(p.ones_like().buffer());
            }
        }
    });
    let mut handles = Vec::new();
    m.apply(&mut |sub| {
        if is_function(sub) {
            handles.push(sub.register_forward_hook(|module, inputs, _out| {
                let b = module.get_parameter("b").unwrap();
                Some(match module.get_parameter("W1") {
                    Ok(w1) => &inputs[0] * &w1 + &b,
                    Err(_) => &inputs[0] + &b,
                })
            }));
        }
    });
    let named: Vec<String> = names(&m.named_parameters());
    assert_eq!(named, strings(&r["named_parameters_after"]));
    let x = tensor(&r["input"]).requires_grad_(true);
    let y = m.call(&x);
    assert_close("output", &y, &r["output"], 1e-6, 0.0);
    y.sum_all().backward();
    assert_close("input grad", &x.grad().unwrap(), &r["input_grad_of_sum"], 1e-6, 0.0);
    let grads = r["param_grads_of_sum"].as_object().unwrap();
    for (name, p) in m.named_parameters() {
        match grads.get(&name) {
            Some(want) => assert_close(&name, &p.grad().expect("has a gradient"), want, 1e-6, 0.0),
            None => assert!(p.grad().is_none(), "{name} should get no gradient"),
        }
    }
    for h in handles {
        h.remove();
        h.remove();
    }
    // Without the hooks the original forwards run again, now with every W filled with 1:
    // d(c(b(a(x)/5))) + 1 = 7·(7·(2x/5) + 1) + 1.
    let y = m.call(&tensor(&r["input"]));
    let want: Vec<f32> = [1.0f32, 2.0].iter().map(|x| 7.0 * (7.0 * (2.0 * x / 5.0) + 1.0) + 1.0).collect();
    for (g, w) in y.to_vec_f32().iter().zip(want) {
        assert!((g - w).abs() < 1e-4, "{g} vs {w}");
    }
}

#[test]
fn registration_validates_names() {
    let m = model();
    assert_eq!(
        m.register_parameter("", None).unwrap_err().to_string(),
        "KeyError: parameter name can't be empty string \"\""
    );
    assert!(m.register_parameter("a.b", None).unwrap_err().to_string().contains("can't contain \".\""));
    assert_eq!(m.register_parameter("ab", None).unwrap_err().to_string(), "KeyError: attribute 'ab' already exists");
    let shared: Arc<dyn Module> = Arc::new(function_c());
    m.register_module("extra", shared.clone()).unwrap();
    m.register_module("extra2", shared).unwrap();
    // A shared module appears once in named_modules but under both names in the state dict.
    assert_eq!(m.named_modules().iter().filter(|(n, _)| n.starts_with("extra")).count(), 1);
    assert_eq!(m.state_dict().iter().filter(|(n, _)| n.starts_with("extra")).count(), 2);
}
