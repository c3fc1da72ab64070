//! `tracegrad::interop`: conversions between tensors and `ndarray` arrays — round trips for
//! every element type, the zero-copy case (checked by pointer), and non-standard layouts.

use ndarray::{arr0, array, s, Array, Array1, Array2, Array3, ArrayD, Axis, IxDyn, ShapeBuilder};
use tracegrad::interop::InteropError;
use tracegrad::{DType, Tensor};

#[test]
fn interop_round_trips_every_dtype() {
    let f: ArrayD<f32> = ArrayD::from_shape_fn(IxDyn(&[2, 3, 4]), |d| (d[0] * 12 + d[1] * 4 + d[2]) as f32 * 0.5);
    let t = Tensor::from(f.clone());
    assert_eq!((t.shape(), t.dtype()), (vec![2, 3, 4], DType::F32));
    assert_eq!(t.to_vec_f32(), f.iter().copied().collect::<Vec<_>>());
    assert_eq!(ArrayD::<f32>::try_from(&t).unwrap(), f);

    let d: ArrayD<f64> = ArrayD::from_shape_fn(IxDyn(&[3, 2]), |i| i[0] as f64 - i[1] as f64 / 3.0);
    let t = Tensor::from(d.clone());
    assert_eq!(t.dtype(), DType::F64);
    assert_eq!(ArrayD::<f64>::try_from(t).unwrap(), d);

    let i: ArrayD<i64> = ArrayD::from_shape_vec(IxDyn(&[5]), vec![-2, -1, 0, 1, i64::MAX]).unwrap();
    let t = Tensor::from(i.clone());
    assert_eq!(t.dtype(), DType::I64);
    assert_eq!(ArrayD::<i64>::try_from(&t).unwrap(), i);

    let b: Array2<bool> = array![[true, false], [false, true]];
    let t = Tensor::from(b.clone());
    assert_eq!(t.dtype(), DType::Bool);
    assert_eq!(Array2::<bool>::try_from(&t).unwrap(), b);

    let u: Array1<u8> = array![0, 7, 255];
    assert_eq!(Array1::<u8>::try_from(&Tensor::from(u.clone())).unwrap(), u);
}

#[test]
fn interop_standard_layout_moves_without_copy() {
    let a: ArrayD<f32> = ArrayD::from_shape_fn(IxDyn(&[64, 32]), |d| (d[0] * 32 + d[1]) as f32);
    let ptr = a.as_ptr();
    let t = Tensor::from(a);
    assert_eq!(t.buffer().as_slice::<f32>().as_ptr(), ptr, "the Vec moved into the tensor");
    let a2: Array2<i64> = Array2::from_shape_fn((3, 5), |(i, j)| (i * 5 + j) as i64);
    let ptr = a2.as_ptr();
    let t2 = Tensor::from(a2);
    assert_eq!(t2.buffer().as_slice::<i64>().as_ptr(), ptr);
    assert_eq!(t2.shape(), vec![3, 5]);
    // A slice that keeps standard layout and starts at offset 0, with a shorter length: the
    // elements are the prefix of the allocation.
    let mut b: Array2<f64> = Array2::from_shape_fn((4, 3), |(i, j)| (i * 3 + j) as f64);
    b.slice_collapse(s![..2, ..]);
    assert!(b.is_standard_layout());
    assert_eq!(Tensor::from(b).to_vec_f64(), [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
}

#[test]
fn interop_tensor_to_array_copies() {
    let t = Tensor::arange(0.0, 6.0, 1.0).reshape(&[2, 3]);
    let mut a = Array2::<f32>::try_from(&t).unwrap();
    assert_ne!(a.as_ptr(), t.buffer().as_slice::<f32>().as_ptr());
    a[[0, 0]] = 100.0;
    assert_eq!(t.to_vec_f32()[0], 0.0, "the array is a copy: writing it leaves the tensor alone");
    // Tensor → array → tensor → array.
    let back = Tensor::from(a.clone());
    assert_eq!(Array2::<f32>::try_from(back).unwrap(), a);
}

#[test]
fn interop_non_standard_layouts() {
    // Transposed: logical order is kept.
    let a: Array2<f32> = array![[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]];
    let at = a.clone().reversed_axes();
    assert!(!at.is_standard_layout());
    let t = Tensor::from(at.clone());
    assert_eq!(t.shape(), vec![3, 2]);
    assert_eq!(t.to_vec_f32(), [1.0, 4.0, 2.0, 5.0, 3.0, 6.0]);
    assert!(t.equal(&Tensor::from(a.clone()).t()));
    // Fortran order.
    let f = Array::from_shape_vec((2, 3).f(), vec![1.0f32, 4.0, 2.0, 5.0, 3.0, 6.0]).unwrap();
    assert_eq!(Tensor::from(f).to_vec_f32(), [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    // A strided slice, an inverted axis and a slice with an offset.
    let big: Array3<i64> = Array3::from_shape_fn((3, 4, 5), |(i, j, k)| (i * 20 + j * 5 + k) as i64);
    let strided = big.slice(s![.., ..;2, 1..4]).to_owned();
    let want: Vec<i64> = big.slice(s![.., ..;2, 1..4]).iter().copied().collect();
    assert_eq!(Tensor::from(big.slice(s![.., ..;2, 1..4])).to_vec::<i64>(), want, "from a view");
    assert_eq!(Tensor::from(strided).to_vec::<i64>(), want);
    let mut inv = big.clone();
    inv.invert_axis(Axis(2));
    let want: Vec<i64> = inv.iter().copied().collect();
    assert_eq!(Tensor::from(inv).to_vec::<i64>(), want);
    let mut tail = big.clone();
    tail.slice_collapse(s![1.., .., ..]);
    assert!(tail.is_standard_layout());
    assert_eq!(Tensor::from(tail).to_vec::<i64>(), (20..60).collect::<Vec<i64>>());
    // A borrowed array is copied.
    let t = Tensor::from(&a);
    assert_ne!(t.buffer().as_slice::<f32>().as_ptr(), a.as_ptr());
    assert_eq!(t.to_vec_f32(), [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
}

#[test]
fn interop_scalars_and_empty() {
    let t = Tensor::from(arr0(2.5f64));
    assert_eq!((t.shape(), t.item()), (vec![], 2.5));
    assert_eq!(ArrayD::<f64>::try_from(&t).unwrap().shape(), &[] as &[usize]);
    let e = ArrayD::<f32>::zeros(IxDyn(&[0, 3]));
    let t = Tensor::from(e);
    assert_eq!((t.shape(), t.numel()), (vec![0, 3], 0));
    assert_eq!(ArrayD::<f32>::try_from(&t).unwrap().shape(), &[0, 3]);
}

#[test]
fn interop_errors() {
    let t = Tensor::zeros(&[2, 3]);
    let e = ArrayD::<f64>::try_from(&t).unwrap_err();
    assert_eq!(e, InteropError::DType { expected: DType::F64, got: DType::F32 });
    assert_eq!(e.to_string(), "cannot convert a f32 tensor to an array of f64");
    let e = Array3::<f32>::try_from(&t).unwrap_err();
    assert_eq!(e, InteropError::Rank { expected: 3, shape: vec![2, 3] });
    // to_ndarray converts the dtype instead.
    let a = Tensor::from_vec(vec![1.5f32, -2.5], &[2]).to_ndarray::<i64>();
    assert_eq!(a, ArrayD::from_shape_vec(IxDyn(&[2]), vec![1i64, -2]).unwrap());
}
