//! Export round trip: each zoo model, exported to ONNX and loaded back, gives the same
//! outputs (within 1e-6) under the same parameter names; where Python's `onnx` package is
//! installed, the exported files also pass `onnx.checker`.

use std::path::{Path, PathBuf};
use std::process::Command;

use tracegrad::nn::ModuleExt;
use tracegrad::onnx::{export, load};
use tracegrad::Tensor;

fn scratch(file: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tracegrad-onnx-export-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(file)
}

fn exported(name: &str) -> (PathBuf, tracegrad::zoo::ZooModel, Tensor) {
    static SEEDED: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _g = SEEDED.lock().unwrap_or_else(|e| e.into_inner());
    tracegrad::manual_seed(3);
    let z = tracegrad::zoo::build(name, 2).unwrap();
    z.module.eval();
    let x = Tensor::randn(&z.input_shape);
    let path = scratch(&format!("{name}.onnx"));
    export(&*z.module, std::slice::from_ref(&x), &path).unwrap_or_else(|e| panic!("{name}: {e}"));
    (path, z, x)
}

#[test]
fn zoo_models_round_trip() {
    for name in ["mlp", "cnn", "transformer", "seed"] {
        let (path, z, x) = exported(name);
        let back = load(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        let want = tracegrad::no_grad(|| z.module.call(&x));
        let got = back.run(std::slice::from_ref(&x)).unwrap_or_else(|e| panic!("{name}: {e}")).remove(0);
        assert_eq!(got.shape(), want.shape(), "{name}");
        for (i, (g, w)) in got.to_vec_f64().iter().zip(want.to_vec_f64()).enumerate() {
            assert!((g - w).abs() <= 1e-6, "{name}[{i}]: round trip {g} vs {w}");
        }
        let mut names: Vec<String> = z.module.named_parameters().into_iter().map(|(n, _)| n).collect();
        let mut back_names: Vec<String> = back.named_parameters().into_iter().map(|(n, _)| n).collect();
        names.sort();
        back_names.sort();
        assert_eq!(back_names, names, "{name}");
        let keys = |m: &dyn tracegrad::nn::Module| {
            let mut k: Vec<String> = m.state_dict().into_iter().map(|(n, _)| n).collect();
            k.sort();
            k
        };
        assert_eq!(keys(&back), keys(&*z.module), "{name}: state_dict keys");
        // The values travel too.
        for (n, p) in z.module.named_parameters() {
            assert!(back.get_parameter(&n).unwrap().equal(&p), "{name}: {n}");
        }
    }
}

fn python_onnx() -> bool {
    Command::new("python3").args(["-c", "import onnx"]).output().is_ok_and(|o| o.status.success())
}

/// Runs only where `python3 -c "import onnx"` works; elsewhere it says so and passes.
#[test]
fn exported_files_pass_onnx_checker() {
    if !python_onnx() {
        eprintln!("skipped: Python's onnx package is not installed");
        return;
    }
    for name in ["mlp", "cnn", "transformer", "seed"] {
        let (path, _, _) = exported(name);
        let check = format!(
            "import onnx; m = onnx.load({:?}); onnx.checker.check_model(m, full_check=True); \
             assert m.opset_import[0].version == 17",
            Path::new(&path).display().to_string()
        );
        let out = Command::new("python3").args(["-c", &check]).output().unwrap();
        assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

#[test]
fn unexportable_graphs_are_errors() {
    let m = tracegrad::nn::BatchNorm2d::new(3);
    let x = Tensor::randn(&[2, 3, 4, 4]);
    let e = export(&m, std::slice::from_ref(&x), scratch("bn_train.onnx")).unwrap_err().to_string();
    assert!(e.contains("eval()"), "{e}");
    m.eval();
    export(&m, std::slice::from_ref(&x), scratch("bn_eval.onnx")).unwrap();
    let e = export(&m, &[x], "/nonexistent/dir/m.onnx").unwrap_err().to_string();
    assert!(e.contains("/nonexistent/dir/m.onnx"), "{e}");
}
