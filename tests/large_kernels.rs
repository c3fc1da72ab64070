//! The kernels switch to multi-threaded paths above a size threshold (pointwise loops, sums,
//! softmax, pooling planes, batched matmul, conv samples). The gradchecks use small tensors, so
//! this file checks those large-tensor paths, forward and backward, against naive f64 loops.

use tracegrad::{Generator, Tensor};

fn values(seed: u64, n: usize) -> Vec<f64> {
    Generator::new(seed).uniform(n, -1.0, 1.0)
}

fn input(seed: u64, shape: &[usize]) -> (Tensor, Vec<f64>) {
    let v = values(seed, shape.iter().product());
    (Tensor::from_vec(v.clone(), shape).requires_grad_(true), v)
}

#[track_caller]
fn assert_close(what: &str, got: &[f64], want: &[f64], rtol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        assert!((a - b).abs() <= rtol * a.abs().max(b.abs()).max(1.0), "{what}: element {i}: got {a}, want {b}");
    }
}

#[test]
fn long_sums_and_means() {
    // One long row (the split-and-add path) and many long rows.
    let n = 100_003;
    let (x, v) = input(1, &[n]);
    let s = x.sum_all();
    let want: f64 = v.iter().sum();
    assert_close("sum of a long row", &[s.item()], &[want], 1e-12);
    s.backward();
    assert!(x.grad().unwrap().to_vec_f64().iter().all(|g| *g == 1.0));

    let (y, w) = input(2, &[7, 6_001]);
    let rows = y.sum(&[1], false).to_vec_f64();
    let want: Vec<f64> = w.chunks(6_001).map(|r| r.iter().sum()).collect();
    assert_close("row sums", &rows, &want, 1e-12);
    // Column sums over a large tensor (the strided fold path).
    let cols = y.mean(&[0], true).to_vec_f64();
    let want: Vec<f64> = (0..6_001).map(|j| (0..7).map(|i| w[i * 6_001 + j]).sum::<f64>() / 7.0).collect();
    assert_close("column means", &cols, &want, 1e-12);
    // Non-adjacent dims of a large 3-D tensor.
    let (z, u) = input(3, &[40, 30, 50]);
    let got = z.sum(&[0, 2], false).to_vec_f64();
    let want: Vec<f64> = (0..30)
        .map(|j| (0..40).flat_map(|i| (0..50).map(move |k| (i, k))).map(|(i, k)| u[(i * 30 + j) * 50 + k]).sum())
        .collect();
    assert_close("sum over dims 0 and 2", &got, &want, 1e-12);
}

#[test]
fn large_extrema_and_softmax() {
    let (x, v) = input(4, &[300, 257]);
    let (r, c) = (300, 257);
    let amax = x.amax(&[1], false).to_vec_f64();
    let want: Vec<f64> = v.chunks(c).map(|row| row.iter().copied().fold(f64::MIN, f64::max)).collect();
    assert_close("amax rows", &amax, &want, 0.0);
    let amin0 = x.amin(&[0], false).to_vec_f64();
    let want: Vec<f64> = (0..c).map(|j| (0..r).map(|i| v[i * c + j]).fold(f64::MAX, f64::min)).collect();
    assert_close("amin columns", &amin0, &want, 0.0);
    let am = x.argmax(Some(0), false).to_vec::<i64>();
    for (j, &i) in am.iter().enumerate() {
        assert_eq!(v[i as usize * c + j], want_max_col(&v, r, c, j));
    }

    // softmax over dim 0 (strided) and dim 1, with a gradient.
    for dim in [0isize, 1] {
        let p = x.softmax(dim).to_vec_f64();
        let mut want = vec![0.0; r * c];
        if dim == 1 {
            for i in 0..r {
                let row = &v[i * c..(i + 1) * c];
                let m = row.iter().copied().fold(f64::MIN, f64::max);
                let z: f64 = row.iter().map(|a| (a - m).exp()).sum();
                for j in 0..c {
                    want[i * c + j] = (row[j] - m).exp() / z;
                }
            }
        } else {
            for j in 0..c {
                let m = (0..r).map(|i| v[i * c + j]).fold(f64::MIN, f64::max);
                let z: f64 = (0..r).map(|i| (v[i * c + j] - m).exp()).sum();
                for i in 0..r {
                    want[i * c + j] = (v[i * c + j] - m).exp() / z;
                }
            }
        }
        assert_close(&format!("softmax dim {dim}"), &p, &want, 1e-12);
        // d/dx Σ w·softmax(x) = p·(w - Σ_dim p·w).
        x.zero_grad();
        let w = values(5, r * c);
        x.softmax(dim).mul(&Tensor::from_vec(w.clone(), &[r, c])).sum_all().backward();
        let g = x.grad().unwrap().to_vec_f64();
        let mut want_g = vec![0.0; r * c];
        let (outer, len, stride) = if dim == 1 { (r, c, 1) } else { (c, r, c) };
        for o in 0..outer {
            let at = |k: usize| if dim == 1 { o * c + k * stride } else { o + k * stride };
            let dot: f64 = (0..len).map(|k| want[at(k)] * w[at(k)]).sum();
            for k in 0..len {
                want_g[at(k)] = want[at(k)] * (w[at(k)] - dot);
            }
        }
        assert_close(&format!("softmax grad dim {dim}"), &g, &want_g, 1e-10);
    }
}

fn want_max_col(v: &[f64], r: usize, c: usize, j: usize) -> f64 {
    (0..r).map(|i| v[i * c + j]).fold(f64::MIN, f64::max)
}

#[test]
fn large_broadcasting_pointwise() {
    // [200, 1, 300] op [7, 1] -> [200, 7, 300]: the strided multi-threaded zip, and the
    // reduction of both gradients.
    let (a, av) = input(6, &[200, 1, 300]);
    let (b, bv) = input(7, &[7, 1]);
    let y = a.mul(&b).add(&a);
    let got = y.to_vec_f64();
    for i in (0..200).step_by(13) {
        for j in 0..7 {
            for k in (0..300).step_by(7) {
                let want = av[i * 300 + k] * bv[j] + av[i * 300 + k];
                assert_eq!(got[(i * 7 + j) * 300 + k], want);
            }
        }
    }
    y.sum_all().backward();
    let ga = a.grad().unwrap().to_vec_f64();
    let sb: f64 = bv.iter().sum();
    let want: Vec<f64> = vec![sb + 7.0; 200 * 300];
    assert_close("grad a", &ga, &want, 1e-12);
    let gb = b.grad().unwrap().to_vec_f64();
    let sa: f64 = av.iter().sum();
    assert_close("grad b", &gb, &[sa; 7], 1e-12);
    // where over a large broadcast.
    let cond = Tensor::from_vec((0..300).map(|k| k % 3 == 0).collect::<Vec<bool>>(), &[300]);
    let w = Tensor::where_cond(&cond, &a, &b.unsqueeze(0)).to_vec_f64();
    assert_eq!(w.len(), 200 * 7 * 300);
    assert_eq!(w[(5 * 7 + 2) * 300 + 3], av[5 * 300 + 3]);
    assert_eq!(w[(5 * 7 + 2) * 300 + 4], bv[2]);
}

/// Naive batched product `a[.., m, k] · b[k, n]` or with a batch on both.
fn naive_bmm(a: &[f64], b: &[f64], nb: usize, m: usize, k: usize, n: usize, b_batched: bool) -> Vec<f64> {
    let mut out = vec![0.0; nb * m * n];
    for t in 0..nb {
        let bo = if b_batched { t * k * n } else { 0 };
        for i in 0..m {
            for j in 0..n {
                out[(t * m + i) * n + j] = (0..k).map(|p| a[(t * m + i) * k + p] * b[bo + p * n + j]).sum();
            }
        }
    }
    out
}

#[test]
fn large_matmuls() {
    // Batched on both sides (rayon across the batch).
    let (nb, m, k, n) = (16, 48, 64, 40);
    let (a, av) = input(8, &[nb, m, k]);
    let (b, bv) = input(9, &[nb, k, n]);
    let y = a.matmul(&b);
    assert_close("bmm", &y.to_vec_f64(), &naive_bmm(&av, &bv, nb, m, k, n, true), 1e-12);
    // Gradients: dA = G·Bᵀ with G = ones, i.e. row sums of B; dB = Aᵀ·G, column sums of A.
    y.sum_all().backward();
    let ga = a.grad().unwrap().to_vec_f64();
    for t in [0, nb - 1] {
        for p in 0..k {
            let want: f64 = (0..n).map(|j| bv[t * k * n + p * n + j]).sum();
            assert!((ga[(t * m + 3) * k + p] - want).abs() < 1e-12);
        }
    }
    let gb = b.grad().unwrap().to_vec_f64();
    for t in [0, nb / 2] {
        for p in 0..k {
            let want: f64 = (0..m).map(|i| av[(t * m + i) * k + p]).sum();
            assert!((gb[t * k * n + p * n + 5] - want).abs() < 1e-12);
        }
    }
    // A batched input times a shared weight (the folded path), large enough for gemm threads.
    let (x, xv) = input(10, &[6, 50, 128]);
    let (w, wv) = input(11, &[128, 96]);
    let y = x.matmul(&w);
    assert_close("folded matmul", &y.to_vec_f64(), &naive_bmm(&xv, &wv, 6, 50, 128, 96, false), 1e-12);
    // Batch broadcasting with a size-1 batch dim on the left.
    let (p, pv) = input(12, &[1, 64, 64]);
    let (q, qv) = input(13, &[12, 64, 64]);
    let got = p.matmul(&q).to_vec_f64();
    let rep: Vec<f64> = (0..12).flat_map(|_| pv.iter().copied()).collect();
    assert_close("broadcast batch", &got, &naive_bmm(&rep, &qv, 12, 64, 64, 64, true), 1e-12);
}

/// Naive conv2d, its input gradient and its weight gradient for upstream gradient `g`.
#[allow(clippy::too_many_arguments)]
fn naive_conv(
    x: &[f64],
    xs: [usize; 4],
    w: &[f64],
    ws: [usize; 4],
    g: &[f64],
    stride: usize,
    pad: usize,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let [n, c, h, wd] = xs;
    let [o, _, kh, kw] = ws;
    let oh = (h + 2 * pad - kh) / stride + 1;
    let ow = (wd + 2 * pad - kw) / stride + 1;
    let mut y = vec![0.0; n * o * oh * ow];
    let mut dx = vec![0.0; x.len()];
    let mut dw = vec![0.0; w.len()];
    for s in 0..n {
        for f in 0..o {
            for i in 0..oh {
                for j in 0..ow {
                    let yi = ((s * o + f) * oh + i) * ow + j;
                    let mut acc = 0.0;
                    for ch in 0..c {
                        for a in 0..kh {
                            for b in 0..kw {
                                let (ih, iw) = (
                                    (i * stride + a) as isize - pad as isize,
                                    (j * stride + b) as isize - pad as isize,
                                );
                                if ih < 0 || iw < 0 || ih >= h as isize || iw >= wd as isize {
                                    continue;
                                }
                                let xi = ((s * c + ch) * h + ih as usize) * wd + iw as usize;
                                let wi = ((f * c + ch) * kh + a) * kw + b;
                                acc += x[xi] * w[wi];
                                dx[xi] += g[yi] * w[wi];
                                dw[wi] += g[yi] * x[xi];
                            }
                        }
                    }
                    y[yi] = acc;
                }
            }
        }
    }
    (y, dx, dw)
}

#[test]
fn large_convolutions() {
    // Many samples (rayon across the batch) and one big sample (gemm's threads inside).
    for (seed, xs, ws, stride, pad) in [
        (20, [8, 8, 18, 18], [16, 8, 3, 3], 1, 1),
        (30, [1, 32, 24, 24], [32, 32, 3, 3], 2, 1),
        (40, [6, 16, 16, 16], [24, 16, 1, 1], 1, 0),
    ] {
        let (x, xv) = input(seed, &xs);
        let (w, wv) = input(seed + 1, &ws);
        let y = x.conv2d(&w, None, [stride, stride], [pad, pad]);
        let g = values(seed + 2, y.numel());
        let (yw, dxw, dww) = naive_conv(&xv, xs, &wv, ws, &g, stride, pad);
        let what = format!("conv {xs:?} * {ws:?} stride {stride} pad {pad}");
        assert_close(&what, &y.to_vec_f64(), &yw, 1e-12);
        y.backward_with(&Tensor::from_vec(g, &y.shape()));
        assert_close(&format!("{what}: grad input"), &x.grad().unwrap().to_vec_f64(), &dxw, 1e-12);
        assert_close(&format!("{what}: grad weight"), &w.grad().unwrap().to_vec_f64(), &dww, 1e-11);
    }
}

#[test]
fn large_pooling() {
    let shape = [4, 16, 33, 32];
    let (x, xv) = input(50, &shape);
    let (h, w) = (33, 32);
    let (k, s, p) = (3, 2, 1);
    let (oh, ow) = ((h + 2 * p - k) / s + 1, (w + 2 * p - k) / s + 1);
    let planes = 4 * 16;
    let g = values(51, planes * oh * ow);
    // Naive max and average pooling with their gradients.
    let mut ymax = vec![0.0; planes * oh * ow];
    let mut yavg = vec![0.0; planes * oh * ow];
    let mut dmax = vec![0.0; xv.len()];
    let mut davg = vec![0.0; xv.len()];
    for pl in 0..planes {
        for i in 0..oh {
            for j in 0..ow {
                let o = (pl * oh + i) * ow + j;
                let (mut best, mut at, mut sum) = (f64::NEG_INFINITY, 0, 0.0);
                let mut taps = Vec::new();
                for a in 0..k {
                    for b in 0..k {
                        let (ih, iw) = ((i * s + a) as isize - p as isize, (j * s + b) as isize - p as isize);
                        if ih < 0 || iw < 0 || ih >= h as isize || iw >= w as isize {
                            continue;
                        }
                        let xi = (pl * h + ih as usize) * w + iw as usize;
                        taps.push(xi);
                        sum += xv[xi];
                        if xv[xi] > best {
                            best = xv[xi];
                            at = xi;
                        }
                    }
                }
                ymax[o] = best;
                yavg[o] = sum / (k * k) as f64;
                dmax[at] += g[o];
                for t in taps {
                    davg[t] += g[o] / (k * k) as f64;
                }
            }
        }
    }
    let gt = Tensor::from_vec(g, &[4, 16, oh, ow]);
    let y = x.max_pool2d([k, k], [s, s], [p, p]);
    assert_close("max_pool2d", &y.to_vec_f64(), &ymax, 0.0);
    y.backward_with(&gt);
    assert_close("max_pool2d grad", &x.grad().unwrap().to_vec_f64(), &dmax, 1e-12);
    x.zero_grad();
    let y = x.avg_pool2d([k, k], [s, s], [p, p]);
    assert_close("avg_pool2d", &y.to_vec_f64(), &yavg, 1e-12);
    y.backward_with(&gt);
    assert_close("avg_pool2d grad", &x.grad().unwrap().to_vec_f64(), &davg, 1e-12);
}

#[test]
fn large_index_ops() {
    // gather / scatter_add / index_select on a large tensor, with many duplicate indices.
    let (r, c) = (500, 200);
    let (x, xv) = input(60, &[r, c]);
    let idx: Vec<i64> = Generator::new(61).randint(r * 50, 0, c as i64);
    let it = Tensor::from_vec(idx.clone(), &[r, 50]);
    let y = x.gather(1, &it);
    let got = y.to_vec_f64();
    for i in 0..r {
        for j in 0..50 {
            assert_eq!(got[i * 50 + j], xv[i * c + idx[i * 50 + j] as usize]);
        }
    }
    y.sum_all().backward();
    let gx = x.grad().unwrap().to_vec_f64();
    let mut want = vec![0.0; r * c];
    for i in 0..r {
        for j in 0..50 {
            want[i * c + idx[i * 50 + j] as usize] += 1.0;
        }
    }
    assert_close("gather grad", &gx, &want, 0.0);

    let rows: Vec<i64> = Generator::new(62).randint(1000, 0, r as i64);
    let y = x.index_select(0, &Tensor::from_vec(rows.clone(), &[1000]));
    x.zero_grad();
    y.sum_all().backward();
    let mut want = vec![0.0; r * c];
    for &row in &rows {
        for j in 0..c {
            want[row as usize * c + j] += 1.0;
        }
    }
    assert_close("index_select grad", &x.grad().unwrap().to_vec_f64(), &want, 0.0);
}
