//! Misuse fails loudly with PyTorch-style messages that name the op and the shapes involved;
//! autograd misuse gives PyTorch's texts; an op without a derivative rule is an error, never a
//! silent zero; an out-of-range index names the index, the dimension and its size.

use std::panic::{catch_unwind, AssertUnwindSafe};

use tracegrad::{DType, Eager, LossReduction, Op, Tensor, TensorType};
use tracegrad_compiler::Emitter;

/// The panic message of `f`, which must panic.
#[track_caller]
fn panic_message<R>(f: impl FnOnce() -> R) -> String {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(_) => panic!("expected a panic"),
        Err(p) => {
            if let Some(s) = p.downcast_ref::<String>() {
                s.clone()
            } else if let Some(s) = p.downcast_ref::<&str>() {
                s.to_string()
            } else {
                panic!("panic payload is not a string")
            }
        }
    }
}

/// Asserts that `msg` contains every one of `parts`.
#[track_caller]
fn assert_mentions(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "message {msg:?} does not mention {p:?}");
    }
}

fn t(shape: &[usize]) -> Tensor {
    Tensor::zeros(shape)
}

// ---------------------------------------------------------------------------------------------
// Shape errors.

#[test]
fn add_shape_mismatch_names_op_and_shapes() {
    let msg = panic_message(|| t(&[2, 3]).add(&t(&[2, 4])));
    assert_mentions(
        &msg,
        &[
            "add",
            "[2, 3]",
            "[2, 4]",
            "the size of tensor a (3) must match the size of tensor b (4) at non-singleton dimension 1",
        ],
    );
    assert!(msg.starts_with("add: "), "{msg}");
    // Through the operator too, and for the other arithmetic ops.
    let msg = panic_message(|| &t(&[2, 3]) + &t(&[2, 4]));
    assert_mentions(&msg, &["add", "[2, 3]", "[2, 4]"]);
    for (name, f) in [
        ("sub", Tensor::sub as fn(&Tensor, &Tensor) -> Tensor),
        ("mul", Tensor::mul),
        ("div", Tensor::div),
        ("maximum", Tensor::maximum),
    ] {
        let msg = panic_message(|| f(&t(&[5, 1, 3]), &t(&[4, 2])));
        assert_mentions(&msg, &[name, "[5, 1, 3]", "[4, 2]", "non-singleton dimension 2"]);
    }
    let msg = panic_message(|| t(&[2, 3]).lt(&t(&[3, 2])));
    assert_mentions(&msg, &["lt", "[2, 3]", "[3, 2]"]);
}

#[test]
fn matmul_shape_mismatch_names_op_and_shapes() {
    let msg = panic_message(|| t(&[2, 3]).matmul(&t(&[4, 5])));
    assert_mentions(&msg, &["matmul", "[2, 3]", "[4, 5]", "cannot be multiplied (2x3 and 4x5)"]);
    // Batched, with the mismatch in the contracted dims.
    let msg = panic_message(|| t(&[7, 2, 3]).matmul(&t(&[7, 4, 5])));
    assert_mentions(&msg, &["matmul", "[7, 2, 3]", "[7, 4, 5]"]);
    // Batch dims that do not broadcast.
    let msg = panic_message(|| t(&[2, 3, 4]).matmul(&t(&[3, 4, 5])));
    assert_mentions(&msg, &["matmul", "[2, 3, 4]", "[3, 4, 5]"]);
    // 1-D operands: the message names the caller's shapes, not the promoted 2-D ones.
    let msg = panic_message(|| t(&[3]).matmul(&t(&[4])));
    assert_mentions(&msg, &["matmul", "[3]", "[4]"]);
    let msg = panic_message(|| t(&[3]).matmul(&t(&[4, 5])));
    assert_mentions(&msg, &["matmul", "[3]", "[4, 5]"]);
    let msg = panic_message(|| t(&[2, 4, 5]).matmul(&t(&[4])));
    assert_mentions(&msg, &["matmul", "[2, 4, 5]", "[4]"]);
    // 0-D operands.
    let msg = panic_message(|| t(&[]).matmul(&t(&[4])));
    assert_mentions(&msg, &["matmul", "1D"]);
    // The relatives.
    let msg = panic_message(|| t(&[2, 3, 4]).bmm(&t(&[2, 5, 6])));
    assert_mentions(&msg, &["[2, 3, 4]", "[2, 5, 6]"]);
    let msg = panic_message(|| t(&[2, 3]).bmm(&t(&[3, 4])));
    assert_mentions(&msg, &["bmm", "[2, 3]", "[3, 4]"]);
    let msg = panic_message(|| tracegrad::linear(&t(&[2, 3]), &t(&[5, 4]), None));
    assert_mentions(&msg, &["linear", "[2, 3]", "[5, 4]"]);
    let msg = panic_message(|| t(&[2, 2]).addmm(&t(&[2, 3]), &t(&[4, 2]), 1.0, 1.0));
    assert_mentions(&msg, &["matmul", "[2, 3]", "[4, 2]"]);
}

#[test]
fn cat_shape_mismatch_names_op_and_shapes() {
    let msg = panic_message(|| Tensor::cat(&[&t(&[2, 3]), &t(&[2, 4])], 0));
    assert_mentions(&msg, &["cat", "[2, 3]", "[2, 4]", "Sizes of tensors must match except in dimension 0"]);
    let msg = panic_message(|| Tensor::cat(&[&t(&[2, 3]), &t(&[3])], 0));
    assert_mentions(&msg, &["cat", "[2, 3]", "[3]", "same number of dimensions"]);
    let msg = panic_message(|| Tensor::cat(&[&t(&[2, 3]), &Tensor::zeros_dtype(&[2, 3], DType::I64)], 0));
    assert_mentions(&msg, &["cat", "dtype"]);
    let msg = panic_message(|| Tensor::stack(&[&t(&[2, 3]), &t(&[3, 2])], 0));
    assert_mentions(&msg, &["stack", "[2, 3]", "[3, 2]"]);
    let msg = panic_message(|| Tensor::cat(&[], 0));
    assert_mentions(&msg, &["cat", "non-empty"]);
}

#[test]
fn reshape_mismatch_names_op_and_shapes() {
    let msg = panic_message(|| t(&[2, 3]).reshape(&[4, 2]));
    assert_mentions(&msg, &["reshape", "[4, 2]", "[2, 3]", "is invalid for input of size 6"]);
    let msg = panic_message(|| t(&[2, 3]).view(&[-1, 4]));
    assert_mentions(&msg, &["reshape", "[-1, 4]", "[2, 3]"]);
    let msg = panic_message(|| t(&[2, 3]).reshape(&[-1, -1]));
    assert_mentions(&msg, &["reshape", "[2, 3]"]);
    let msg = panic_message(|| t(&[2, 3]).broadcast_to(&[3, 3]));
    assert_mentions(&msg, &["expand", "[3, 3]", "[2, 3]"]);
    let msg = panic_message(|| t(&[2, 3]).permute(&[0, 0]));
    assert_mentions(&msg, &["permute", "[2, 3]"]);
    let msg = panic_message(|| t(&[2, 3]).narrow(1, 2, 2));
    assert_mentions(&msg, &["narrow", "[2, 3]"]);
    let msg = panic_message(|| t(&[2, 3]).sum(&[2], false));
    assert_mentions(&msg, &["sum", "Dimension out of range"]);
}

#[test]
fn other_ops_name_their_shapes() {
    let msg = panic_message(|| t(&[2, 3]).mse_loss(&t(&[3, 2]), LossReduction::Mean));
    assert_mentions(&msg, &["mse_loss", "[2, 3]", "[3, 2]"]);
    let msg = panic_message(|| t(&[2, 3]).layer_norm(&[2], None, None, 1e-5));
    assert_mentions(&msg, &["layer_norm", "[2]", "[2, 3]"]);
    let msg = panic_message(|| t(&[1, 3, 5, 5]).conv2d(&t(&[4, 2, 3, 3]), None, [1, 1], [0, 0]));
    assert_mentions(&msg, &["conv2d", "[4, 2, 3, 3]", "[1, 3, 5, 5]"]);
    let target = Tensor::from_vec(vec![0i64, 1, 2], &[3]);
    let msg = panic_message(|| t(&[2, 4]).cross_entropy(&target));
    assert_mentions(&msg, &["nll_loss", "[2, 4]", "[3]"]);
    let idx = Tensor::from_vec(vec![0i64, 1], &[2]);
    let msg = panic_message(|| t(&[2, 3]).gather(1, &idx));
    assert_mentions(&msg, &["gather", "[2, 3]", "[2]"]);
    let msg = panic_message(|| Tensor::einsum("ij,jk->ik", &[&t(&[2, 3]), &t(&[4, 5])]));
    assert_mentions(&msg, &["einsum", "3", "4"]);
}

#[test]
fn the_compile_api_returns_errors() {
    // The shape rule itself returns a Result naming the op.
    let e = Op::Binary(tracegrad_compiler::ops::BinaryOp::Add)
        .infer(&[TensorType::new(DType::F32, &[2, 3]), TensorType::new(DType::F32, &[2, 4])])
        .unwrap_err();
    assert_eq!(e.op, "add");
    assert_mentions(&e.message, &["add", "[2, 3]", "[2, 4]"]);
    // And so does every emitter call.
    let r = Eager.emit(Op::MatMul { trans_a: false, trans_b: false }, &[&t(&[2, 3]), &t(&[4, 5])]);
    let e = r.expect_err("an error");
    assert_eq!(e.op, "matmul");
    assert_mentions(&e.to_string(), &["matmul", "[2, 3]", "[4, 5]"]);
}

// ---------------------------------------------------------------------------------------------
// Autograd misuse.

#[test]
fn backward_without_grad() {
    let x = Tensor::ones(&[2]);
    let y = x.mul_scalar(2.0).sum_all();
    let msg = panic_message(|| y.backward());
    assert_eq!(msg, "element 0 of tensors does not require grad and does not have a grad_fn");
    // A leaf that does not require grad, and a detached result.
    let msg = panic_message(|| Tensor::scalar(1.0).backward());
    assert_eq!(msg, "element 0 of tensors does not require grad and does not have a grad_fn");
    let w = Tensor::ones(&[2]).requires_grad_(true);
    let d = w.mul_scalar(3.0).sum_all().detach();
    let msg = panic_message(|| d.backward());
    assert_eq!(msg, "element 0 of tensors does not require grad and does not have a grad_fn");
}

#[test]
fn backward_on_non_scalar() {
    let x = Tensor::ones(&[2, 3]).requires_grad_(true);
    let y = x.mul_scalar(2.0);
    let msg = panic_message(|| y.backward());
    assert_eq!(msg, "grad can be implicitly created only for scalar outputs");
    assert!(x.grad().is_none(), "a failed backward must not leave a gradient");
    // backward_with checks the gradient's shape.
    let msg = panic_message(|| y.backward_with(&Tensor::ones(&[3, 2])));
    assert_mentions(&msg, &["Mismatch in shape", "[3, 2]", "[2, 3]"]);
}

#[test]
fn requires_grad_misuse() {
    let msg = panic_message(|| Tensor::from_vec(vec![1i64, 2], &[2]).requires_grad_(true));
    assert_eq!(msg, "only Tensors of floating point dtype can require gradients");
    let x = Tensor::ones(&[2]).requires_grad_(true);
    let y = x.mul_scalar(2.0);
    let msg = panic_message(|| y.requires_grad_(false));
    assert_mentions(&msg, &["you can only change requires_grad flags of leaf variables"]);
}

#[test]
fn missing_derivative_rule_is_an_error_not_zeros() {
    // max_pool2d's gradient op has no derivative rule (double backward through max pooling).
    let op = Op::MaxPool2dGrad { kernel: [2, 2], stride: [2, 2], padding: [0, 0] };
    let x = Tensor::from_vec((0..16).map(|v| v as f64).collect::<Vec<_>>(), &[1, 1, 4, 4]).requires_grad_(true);
    let g = Tensor::ones(&[1, 1, 2, 2]).to_dtype(DType::F64).requires_grad_(true);
    let y = Eager.emit(op.clone(), &[&x, &g]).expect("the forward of max_pool2d_grad works");
    // The forward routes each window's gradient to its maximum.
    let yv = y.to_vec_f64();
    assert_eq!(yv.iter().sum::<f64>(), 4.0);
    assert_eq!(yv[5] + yv[7] + yv[13] + yv[15], 4.0);

    // The rule, called directly, fails with a message naming the op.
    let r = op.vjp(&mut Eager, &[&x, &g], &y, &Tensor::ones(&[1, 1, 4, 4]).to_dtype(DType::F64));
    let e = r.expect_err("max_pool2d_grad has no derivative rule: an error, never zeros");
    assert_eq!(e.op, "max_pool2d_grad");
    assert_mentions(&e.message, &["derivative", "max_pool2d_grad", "not implemented"]);

    // The backward engine surfaces it loudly, and records no gradient.
    let loss = y.sum_all();
    let msg = panic_message(|| loss.backward());
    assert_mentions(&msg, &["max_pool2d_grad", "not implemented"]);
    assert!(x.grad().is_none() && g.grad().is_none(), "no gradient may be produced past a missing rule");

    // The forward op itself is differentiable.
    let x2 = Tensor::from_vec((0..16).map(|v| v as f64).collect::<Vec<_>>(), &[1, 1, 4, 4]).requires_grad_(true);
    x2.max_pool2d([2, 2], [2, 2], [0, 0]).sum_all().backward();
    assert_eq!(x2.grad().unwrap().to_vec_f64().iter().sum::<f64>(), 4.0);
}

// ---------------------------------------------------------------------------------------------
// Index errors.

#[test]
fn out_of_range_index() {
    let text = "index 5 is out of bounds for dimension 0 with size 3";
    let x = Tensor::vec1(&[1.0, 2.0, 3.0]);
    let i5 = Tensor::from_vec(vec![5i64], &[1]);
    let msg = panic_message(|| x.index_select(0, &i5));
    assert_mentions(&msg, &["index_select", text]);
    let msg = panic_message(|| x.gather(0, &i5));
    assert_mentions(&msg, &["gather", text]);
    let msg = panic_message(|| x.scatter_add(0, &i5, &Tensor::vec1(&[1.0])));
    assert_mentions(&msg, &["scatter_add", text]);
    let msg = panic_message(|| x.index_add(0, &i5, &Tensor::vec1(&[1.0])));
    assert_mentions(&msg, &["index_add", text]);
    // Embedding rows and class targets are range-checked too.
    let msg = panic_message(|| i5.embedding(&Tensor::zeros(&[3, 2])));
    assert_mentions(&msg, &[text]);
    let msg = panic_message(|| Tensor::zeros(&[2, 3]).cross_entropy(&Tensor::from_vec(vec![0i64, 5], &[2])));
    assert_mentions(&msg, &["index 5 is out of bounds for dimension 1 with size 3"]);
    // Other dims.
    let m = Tensor::zeros(&[2, 4]);
    let msg = panic_message(|| m.index_select(1, &Tensor::from_vec(vec![0i64, 4], &[2])));
    assert_mentions(&msg, &["index 4 is out of bounds for dimension 1 with size 4"]);
    // Index dtype.
    let msg = panic_message(|| x.index_select(0, &Tensor::vec1(&[0.0])));
    assert_mentions(&msg, &["index_select", "int64"]);
}
