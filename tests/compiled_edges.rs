//! Small reliability cases of compiled mode: messages about the root module's hooks, a wrong
//! input count, BatchNorm on an empty training batch (eager and compiled, as PyTorch), and
//! line breaks in SVG graph labels drawn without Graphviz.

use tracegrad::compile::{compile, dump, Backend};
use tracegrad::nn::{BatchNorm1d, Linear, ModuleExt, ReLU, Sequential};
use tracegrad::Tensor;

#[test]
fn a_root_module_hook_error_names_the_root_module() {
    let lin = Linear::new(4, 3);
    lin.register_forward_hook(|_, _, out| Some(out.sum_all()));
    for backend in [Backend::Jit, Backend::Interpreter] {
        let e = compile(&lin).with_backend(backend).call(&Tensor::randn(&[2, 4])).unwrap_err().to_string();
        assert!(e.contains("forward hook of the root module (Linear)"), "{backend:?}: {e}");
        assert!(!e.contains("of  ("), "{backend:?}: {e}");
    }
}

#[test]
fn a_wrong_input_count_is_one_clear_line() {
    let lin = Linear::new(4, 3);
    let x = Tensor::randn(&[2, 4]);
    for inputs in [vec![x.clone(), x.clone()], vec![]] {
        let e = compile(&lin).call_many(&inputs).unwrap_err().to_string();
        let want = format!("Linear.forward() takes 1 tensor but {} were given", inputs.len());
        assert_eq!(e, want);
    }
}

#[test]
fn batch_norm_on_an_empty_training_batch_returns_it_as_pytorch_does() {
    let x = Tensor::zeros(&[0, 3]);
    for backend in [None, Some(Backend::Jit), Some(Backend::Interpreter)] {
        let bn = BatchNorm1d::new(3);
        let mean_before = bn.running_mean.as_ref().unwrap().to_vec_f32();
        let y = match backend {
            None => bn.call(&x),
            Some(b) => compile(&bn).with_backend(b).call(&x).unwrap(),
        };
        assert_eq!(y.shape(), vec![0, 3], "{backend:?}");
        assert_eq!(bn.running_mean.as_ref().unwrap().to_vec_f32(), mean_before, "{backend:?}");
        // As PyTorch's module, the batch is counted even though it changes no statistic.
        assert_eq!(bn.num_batches_tracked.as_ref().unwrap().item(), 1.0, "{backend:?}");
    }
}

#[test]
fn svg_labels_drawn_without_graphviz_break_lines() {
    let m = Sequential::new().add(Linear::new(4, 3)).add(ReLU::new());
    let mut c = compile(&m);
    c.call(&Tensor::randn(&[2, 4])).unwrap();
    let dot = c.last_plan().unwrap().graph.to_dot();
    assert!(dot.contains("\\n0 (Linear)"), "{dot}");
    let svg = dump::dot_to_svg_builtin(&dot).unwrap();
    assert!(!svg.contains("\\n"), "a literal \\n in the SVG");
    // Each label line is a line of its own.
    assert!(svg.contains(">0 (Linear)</tspan>"), "{svg}");
}
