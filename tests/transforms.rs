//! `tracegrad::vision::transforms` against torchvision: every `transforms` entry of the
//! reference transcript `seed_extra.json`, plus the semantics the transcript does not pin
//! (padding modes, antialiasing, integer images, the random transforms' seeding).

mod common;

use serde_json::Value;
use tracegrad::vision::transforms::functional as F;
use tracegrad::vision::transforms::{
    CenterCrop, Compose, InterpolationMode, Lambda, Normalize, PaddingMode, RandomCrop, RandomHorizontalFlip,
    RandomRotation, RandomVerticalFlip, Resize, ToTensor, Transform,
};
use tracegrad::{DType, Tensor};

fn reference() -> Value {
    common::reference("seed_extra.json")["transforms"].clone()
}

/// The 3×6×8 f32 test image (`arange(144) / 143`).
fn img(r: &Value) -> Tensor {
    common::tensor(&r["img"])
}

/// Resize and rotation: 1e-5 absolute. Everything else: 1e-6 relative.
const ABS: f64 = 1e-5;
const REL: f64 = 1e-6;

#[test]
fn transforms_center_crop() {
    let r = reference();
    common::assert_close("center_crop_4", &CenterCrop::new(4).apply(img(&r)), &r["center_crop_4"], REL, 0.0);
    common::assert_close(
        "center_crop_4x10_pads",
        &CenterCrop::rect(4, 10).apply(img(&r)),
        &r["center_crop_4x10_pads"],
        REL,
        0.0,
    );
}

#[test]
fn transforms_resize() {
    let r = reference();
    let bil = Resize::new(3, 4).antialias(false).apply(img(&r));
    common::assert_close("resize_3x4_bilinear_noaa", &bil, &r["resize_3x4_bilinear_noaa"], 0.0, ABS);
    // Upscaling: antialiasing changes nothing, so torchvision's default gives the same.
    for aa in [false, true] {
        let up = Resize::new(12, 16).antialias(aa).apply(img(&r));
        common::assert_close("resize_12x16_bilinear", &up, &r["resize_12x16_bilinear"], 0.0, ABS);
    }
    let near = Resize::new(3, 4).interpolation(InterpolationMode::Nearest).apply(img(&r));
    common::assert_close("resize_3x4_nearest", &near, &r["resize_3x4_nearest"], 0.0, ABS);
}

#[test]
fn transforms_hflip() {
    let r = reference();
    common::assert_close("hflip", &F::hflip(&img(&r)), &r["hflip"], REL, 0.0);
    common::assert_close("hflip p=1", &RandomHorizontalFlip::new(1.0).apply(img(&r)), &r["hflip"], REL, 0.0);
    assert!(RandomHorizontalFlip::new(0.0).apply(img(&r)).equal(&img(&r)));
}

#[test]
fn transforms_rotate() {
    let r = reference();
    let r90 = F::rotate(&img(&r), 90.0, InterpolationMode::Nearest, Some(&[0.0]));
    common::assert_close("rotate_90_nearest", &r90, &r["rotate_90_nearest"], 0.0, ABS);
    let r30 = F::rotate(&img(&r), 30.0, InterpolationMode::Bilinear, Some(&[0.0]));
    common::assert_close("rotate_30_bilinear_fill0", &r30, &r["rotate_30_bilinear_fill0"], 0.0, ABS);
    // RandomRotation with a one-point range is the deterministic rotation (fill 0 by default).
    let fixed = RandomRotation::range(90.0, 90.0).seed(3).apply(img(&r));
    common::assert_close("RandomRotation(90, 90)", &fixed, &r["rotate_90_nearest"], 0.0, ABS);
    let fixed = RandomRotation::range(30.0, 30.0).interpolation(InterpolationMode::Bilinear).apply(img(&r));
    common::assert_close("RandomRotation(30, 30)", &fixed, &r["rotate_30_bilinear_fill0"], 0.0, ABS);
}

#[test]
fn transforms_normalize() {
    let r = reference();
    let n = Normalize::new(&[0.5, 0.4, 0.3], &[0.2, 0.25, 0.3]).apply(img(&r));
    common::assert_close("normalize", &n, &r["normalize"], REL, 0.0);
}

#[test]
fn transforms_to_tensor_from_u8_hwc() {
    let r = reference();
    let u8_hwc = common::tensor(&r["img_u8_hwc"]).to_dtype(DType::U8);
    assert_eq!(u8_hwc.shape(), vec![6, 8, 3]);
    let t = ToTensor.apply(u8_hwc);
    assert_eq!(t.dtype(), DType::F32);
    common::assert_close("to_tensor_from_u8_hwc", &t, &r["to_tensor_from_u8_hwc"], REL, 0.0);
}

#[test]
fn transforms_compose() {
    let r = reference();
    let t = Compose::new().add(CenterCrop::new(4)).add(Normalize::new(&[0.5; 3], &[0.5; 3]));
    assert_eq!(t.len(), 2);
    common::assert_close(
        "compose_centercrop4_normalize",
        &t.apply(img(&r)),
        &r["compose_centercrop4_normalize"],
        REL,
        0.0,
    );
    assert!(Compose::new().apply(img(&r)).equal(&img(&r)), "an empty Compose is the identity");
}

#[test]
fn transforms_random_crop_pad2() {
    let r = reference();
    let want: Vec<usize> =
        r["random_crop_6_pad2_output_shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
    let padded = F::pad(&img(&r), 2, 0.0, PaddingMode::Constant);
    assert_eq!(padded.shape(), vec![3, 10, 12]);
    let crop = RandomCrop::new(6).padding(2).seed(0);
    let mut seen = std::collections::HashSet::new();
    for _ in 0..40 {
        let out = crop.apply(img(&r));
        assert_eq!(out.shape(), want);
        // The output is one of the 5×7 windows of the padded image.
        let at = (0..5i64)
            .flat_map(|i| (0..7i64).map(move |j| (i, j)))
            .find(|&(i, j)| F::crop(&padded, i, j, 6, 6).equal(&out))
            .expect("a window of the padded image");
        seen.insert(at);
    }
    assert!(seen.len() > 5, "positions vary: {seen:?}");
    // Seeded: the same seed replays the same crops.
    let a = RandomCrop::new(6).padding(2).seed(7);
    let b = RandomCrop::new(6).padding(2).seed(7);
    for _ in 0..5 {
        assert!(a.apply(img(&r)).equal(&b.apply(img(&r))));
    }
}

#[test]
#[should_panic(expected = "Required crop size (7, 9) is larger than input image size (6, 8)")]
fn transforms_random_crop_too_large() {
    RandomCrop::rect(7, 9).apply(Tensor::zeros(&[3, 6, 8]));
}

#[test]
fn transforms_random_crop_pad_if_needed() {
    let out = RandomCrop::rect(8, 10).pad_if_needed(true).fill(1.0).seed(1).apply(Tensor::zeros(&[1, 6, 8]));
    assert_eq!(out.shape(), vec![1, 8, 10]);
    // pad_if_needed pads by the shortfall on both sides: 6×8 zeros inside a 10×12 frame of
    // ones, so every 8×10 window holds some of each.
    let ones = out.sum_all().item();
    assert!(ones > 0.0 && ones < 80.0, "{ones}");
    let padded = F::pad(&Tensor::zeros(&[1, 6, 8]), [2, 2], 1.0, PaddingMode::Constant);
    assert!((0..3i64).any(|i| (0..3i64).any(|j| F::crop(&padded, i, j, 8, 10).equal(&out))));
}

#[test]
fn transforms_pad_modes() {
    let row = Tensor::from_vec(vec![1.0f32, 2.0, 3.0, 4.0], &[1, 4]);
    let pad = |mode| F::pad(&row, [2, 0], 9.0, mode).to_vec_f32();
    assert_eq!(pad(PaddingMode::Constant), [9.0, 9.0, 1.0, 2.0, 3.0, 4.0, 9.0, 9.0]);
    assert_eq!(pad(PaddingMode::Edge), [1.0, 1.0, 1.0, 2.0, 3.0, 4.0, 4.0, 4.0]);
    assert_eq!(pad(PaddingMode::Reflect), [3.0, 2.0, 1.0, 2.0, 3.0, 4.0, 3.0, 2.0]);
    assert_eq!(pad(PaddingMode::Symmetric), [2.0, 1.0, 1.0, 2.0, 3.0, 4.0, 4.0, 3.0]);
    // [left, top, right, bottom].
    let p = F::pad(&row, [1, 2, 0, 1], 0.0, PaddingMode::Constant);
    assert_eq!(p.shape(), vec![4, 5]);
    assert_eq!(p.sum_all().item(), 10.0);
}

#[test]
fn transforms_center_crop_rounding() {
    // (7 - 4) / 2 = 1.5 rounds to 2 (half to even), as Python's round.
    let t = Tensor::arange(0.0, 7.0, 1.0).reshape(&[1, 7]).broadcast_to(&[4, 7]);
    let t = Tensor::from_buffer(t.buffer());
    assert_eq!(F::center_crop(&t, 1, 4).to_vec_f32(), [2.0, 3.0, 4.0, 5.0]);
    // (9 - 4) / 2 = 2.5 rounds to 2.
    let t = Tensor::arange(0.0, 9.0, 1.0).reshape(&[1, 9]);
    assert_eq!(F::center_crop(&t, 1, 4).to_vec_f32(), [2.0, 3.0, 4.0, 5.0]);
}

#[test]
fn transforms_resize_antialias() {
    // PyTorch's antialiased bilinear filter, 4 → 2 along the width: the triangle is twice as
    // wide, weights [3, 3, 1]/7 and [1, 3, 3]/7.
    let row = Tensor::from_vec(vec![0.0f32, 1.0, 2.0, 3.0], &[1, 1, 4]);
    let aa = F::resize(&row, 1, 2, InterpolationMode::Bilinear, true).to_vec_f64();
    let want = [5.0 / 7.0, 16.0 / 7.0];
    for (g, w) in aa.iter().zip(want) {
        assert!((g - w).abs() < 1e-6, "{aa:?} vs {want:?}");
    }
    // Without antialiasing: sources 0.5 and 2.5.
    assert_eq!(F::resize(&row, 1, 2, InterpolationMode::Bilinear, false).to_vec_f32(), [0.5, 2.5]);
    // A constant image stays constant.
    let c = Tensor::full(&[2, 9, 13], 0.25);
    let small = Resize::new(4, 5).apply(c);
    assert!(small.to_vec_f32().iter().all(|&v| (v - 0.25).abs() < 1e-6));
}

#[test]
fn transforms_resize_smaller_edge() {
    let r = reference();
    assert_eq!(Resize::smaller_edge(3).apply(img(&r)).shape(), vec![3, 3, 4]);
    assert_eq!(Resize::smaller_edge(9).apply(img(&r)).shape(), vec![3, 9, 12]);
    assert_eq!(Resize::smaller_edge(3).max_size(3 + 1).apply(img(&r)).shape(), vec![3, 3, 4]);
    assert_eq!(F::resized_output_size((6, 8), &[4], Some(5)), (4, 5));
    assert_eq!(F::resized_output_size((6, 12), &[4], Some(6)), (3, 6));
    assert_eq!(F::resized_output_size((10, 3), &[2], None), (6, 2));
    // Same size: unchanged.
    assert!(Resize::new(6, 8).apply(img(&r)).equal(&img(&r)));
}

#[test]
fn transforms_u8_images_keep_their_dtype() {
    let r = reference();
    let u8_chw = Tensor::from_buffer(common::tensor(&r["img_u8_hwc"]).to_dtype(DType::U8).permute(&[2, 0, 1]).buffer());
    let f32_chw = u8_chw.to_dtype(DType::F32);
    let up = F::resize(&u8_chw, 12, 16, InterpolationMode::Bilinear, false);
    assert_eq!(up.dtype(), DType::U8);
    let want: Vec<f32> = F::resize(&f32_chw, 12, 16, InterpolationMode::Bilinear, false)
        .to_vec_f32()
        .iter()
        .map(|v| v.round_ties_even())
        .collect();
    assert_eq!(up.to_vec_f32(), want);
    let rot = F::rotate(&u8_chw, 30.0, InterpolationMode::Bilinear, Some(&[0.0]));
    assert_eq!(rot.dtype(), DType::U8);
    assert_eq!(RandomCrop::new(4).seed(0).apply(u8_chw.clone()).dtype(), DType::U8);
    assert_eq!(F::hflip(&u8_chw).dtype(), DType::U8);
}

#[test]
fn transforms_rotate_expand_and_fill() {
    let r = reference();
    // 90° counter-clockwise with expand is rot90: out[i][j] = img[j][W-1-i].
    let x = img(&r);
    let out = F::rotate_with(&x, 90.0, InterpolationMode::Nearest, true, None, None);
    assert_eq!(out.shape(), vec![3, 8, 6]);
    let xv = x.to_vec_f32();
    let ov = out.to_vec_f32();
    for c in 0..3 {
        for i in 0..8 {
            for j in 0..6 {
                assert_eq!(ov[c * 48 + i * 6 + j], xv[c * 48 + j * 8 + (7 - i)], "at {c},{i},{j}");
            }
        }
    }
    // Per-channel fill where the rotated image does not reach.
    let f = F::rotate(&x, 90.0, InterpolationMode::Nearest, Some(&[-1.0, -2.0, -3.0]));
    let fv = f.to_vec_f32();
    for c in 0..3 {
        assert_eq!(fv[c * 48], -(c as f32) - 1.0, "corner of channel {c} is outside the rotated image");
    }
    // 360° is the identity (up to the rounding of the sampling grid).
    let full = F::rotate(&x, 360.0, InterpolationMode::Bilinear, None);
    assert!(full.allclose(&x, 0.0, 1e-5));
    // fill=None leaves plain zeros: bilinear borders differ from fill=[0].
    let none = F::rotate(&x, 30.0, InterpolationMode::Bilinear, None);
    let zero = F::rotate(&x, 30.0, InterpolationMode::Bilinear, Some(&[0.0]));
    assert!(!none.allclose(&zero, 0.0, 1e-3));
}

#[test]
fn transforms_random_are_seeded() {
    let x = Tensor::rand(&[3, 6, 8]);
    let run = |seed| {
        let t = Compose::new()
            .add(RandomHorizontalFlip::new(0.5).seed(seed))
            .add(RandomVerticalFlip::new(0.5).seed(seed + 1))
            .add(RandomRotation::new(45.0).seed(seed + 2));
        (0..6).map(|_| t.apply(x.clone()).to_vec_f32()).collect::<Vec<_>>()
    };
    assert_eq!(run(5), run(5));
    assert_ne!(run(5), run(6));
    // The default generator: manual_seed replays.
    let flips = || {
        let t = RandomHorizontalFlip::new(0.5);
        (0..16).map(|_| t.apply(x.clone()).equal(&x)).collect::<Vec<bool>>()
    };
    tracegrad::manual_seed(11);
    let a = flips();
    tracegrad::manual_seed(11);
    assert_eq!(a, flips());
    assert!(a.contains(&true) && a.contains(&false), "p = 0.5 both ways in 16 draws: {a:?}");
}

#[test]
fn transforms_batched_images() {
    let r = reference();
    let batch = Tensor::stack(&[&img(&r), &img(&r)], 0);
    let out = Resize::new(3, 4).antialias(false).apply(batch);
    assert_eq!(out.shape(), vec![2, 3, 3, 4]);
    common::assert_close("batch[1]", &out.narrow(0, 1, 1).squeeze_dim(0), &r["resize_3x4_bilinear_noaa"], 0.0, ABS);
    let n = Normalize::new(&[0.5, 0.4, 0.3], &[0.2, 0.25, 0.3]).apply(Tensor::stack(&[&img(&r)], 0));
    common::assert_close("normalize batch", &n.squeeze_dim(0), &r["normalize"], REL, 0.0);
}

#[test]
fn transforms_lambda_and_boxed() {
    let boxed: Box<dyn Transform> = Box::new(Lambda::new(|t: Tensor| t.add_scalar(1.0)));
    let t = Compose::new().add(boxed).add(Lambda::new(|t: Tensor| t.mul_scalar(3.0)));
    assert_eq!(t.apply(Tensor::zeros(&[2])).to_vec_f32(), [3.0, 3.0]);
}

#[test]
#[should_panic(expected = "input tensor should be a float tensor")]
fn transforms_normalize_rejects_u8() {
    Normalize::new(&[0.5], &[0.5]).apply(Tensor::zeros_dtype(&[3, 2, 2], DType::U8));
}

#[test]
#[should_panic(expected = "std evaluated to zero")]
fn transforms_normalize_rejects_zero_std() {
    Normalize::new(&[0.5], &[0.0]).apply(Tensor::zeros(&[3, 2, 2]));
}
