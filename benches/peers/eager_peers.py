#!/usr/bin/env python3
"""Peer timings for benches/eager.rs: the same two workloads in numpy and in JAX (jit, CPU).

* matmul_1024: f32 [1024,1024] @ [1024,1024]; reported as ms and GFLOP/s (2*1024^3 FLOP).
* pointwise_chain_2^24: y = tanh(a*x+b)*sigmoid(x)+0.5*x on three f32 vectors of 2^24
  standard-normal elements; reported as ms.

Each number is the median of --repeat timed runs after --warmup untimed ones. JAX results are
waited for with block_until_ready(). numpy has no sigmoid, so it is written 1/(1+exp(-x)),
which is what a numpy user would write.

OpenBLAS note: on this machine OPENBLAS_CORETYPE/OPENBLAS_L2_SIZE may be set in the
environment (to protect old OpenBLAS builds). They can pin a current numpy's OpenBLAS to an
older kernel. The script prints which kernel OpenBLAS actually runs (via threadpoolctl); run it
once as is and once with both variables unset (see README.md) to compare.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

MATMUL_N = 1024
CHAIN_LEN = 1 << 24


def median_ms(fn, repeat, warmup):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), min(times), max(times)


def blas_info():
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return [{"note": "threadpoolctl not installed (pip install threadpoolctl)"}]
    keep = ("user_api", "internal_api", "version", "architecture", "num_threads", "threading_layer", "filepath")
    return [{k: d.get(k) for k in keep if k in d} for d in threadpool_info()]


def make_inputs(np):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((MATMUL_N, MATMUL_N), dtype=np.float32)
    b = rng.standard_normal((MATMUL_N, MATMUL_N), dtype=np.float32)
    rng = np.random.default_rng(1)
    x = rng.standard_normal(CHAIN_LEN, dtype=np.float32)
    ca = rng.standard_normal(CHAIN_LEN, dtype=np.float32)
    cb = rng.standard_normal(CHAIN_LEN, dtype=np.float32)
    return a, b, x, ca, cb


def bench_numpy(args, inputs, results):
    import numpy as np

    a, b, x, ca, cb = inputs
    flop = 2 * MATMUL_N**3
    med, lo, hi = median_ms(lambda: a @ b, args.repeat_matmul, args.warmup)
    results["numpy_matmul_1024"] = {"ms": med, "min_ms": lo, "max_ms": hi, "gflops": flop / (med * 1e6)}

    def chain():
        return np.tanh(ca * x + cb) * (np.float32(1) / (np.float32(1) + np.exp(-x))) + np.float32(0.5) * x

    y = chain()
    assert y.dtype == np.float32
    med, lo, hi = median_ms(chain, args.repeat_chain, args.warmup)
    results["numpy_pointwise_chain_2^24"] = {"ms": med, "min_ms": lo, "max_ms": hi}
    return y


def bench_jax(args, inputs, results, y_ref):
    import jax
    import jax.numpy as jnp

    a, b, x, ca, cb = (jax.device_put(v) for v in inputs)
    flop = 2 * MATMUL_N**3
    mm = jax.jit(lambda p, q: p @ q)
    mm(a, b).block_until_ready()
    med, lo, hi = median_ms(lambda: mm(a, b).block_until_ready(), args.repeat_matmul, args.warmup)
    results["jax_matmul_1024"] = {"ms": med, "min_ms": lo, "max_ms": hi, "gflops": flop / (med * 1e6)}

    chain = jax.jit(lambda x, a, b: jnp.tanh(a * x + b) * jax.nn.sigmoid(x) + 0.5 * x)
    y = chain(x, ca, cb).block_until_ready()
    assert y.dtype == jnp.float32
    if y_ref is not None:
        import numpy as np

        err = float(np.max(np.abs(np.asarray(y) - y_ref)))
        assert err < 1e-4, f"jax and numpy chains disagree by {err}"
    med, lo, hi = median_ms(lambda: chain(x, ca, cb).block_until_ready(), args.repeat_chain, args.warmup)
    results["jax_pointwise_chain_2^24"] = {"ms": med, "min_ms": lo, "max_ms": hi}
    results["jax_version"] = jax.__version__
    results["jax_devices"] = [str(d) for d in jax.devices()]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=["numpy", "jax", "all"], default="all")
    p.add_argument("--repeat-matmul", type=int, default=30)
    p.add_argument("--repeat-chain", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    args = p.parse_args()

    import numpy as np

    results = {
        "python": sys.version.split()[0],
        "machine": platform.processor() or platform.machine(),
        "nproc": os.cpu_count(),
        "numpy_version": np.__version__,
        "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
        "OPENBLAS_L2_SIZE": os.environ.get("OPENBLAS_L2_SIZE"),
    }
    inputs = make_inputs(np)
    y_ref = None
    if args.only in ("numpy", "all"):
        y_ref = bench_numpy(args, inputs, results)
        # Queried after a matmul so that OpenBLAS is loaded and has picked its kernel.
        results["blas"] = blas_info()
    if args.only in ("jax", "all"):
        bench_jax(args, inputs, results, y_ref)

    print(f"python {results['python']}, numpy {results['numpy_version']}, nproc {results['nproc']}")
    print(f"OPENBLAS_CORETYPE={results['OPENBLAS_CORETYPE']} OPENBLAS_L2_SIZE={results['OPENBLAS_L2_SIZE']}")
    for lib in results.get("blas", []):
        print("threadpoolctl:", ", ".join(f"{k}={v}" for k, v in lib.items() if k != "filepath"))
    if "jax_version" in results:
        print(f"jax {results['jax_version']} on {', '.join(results['jax_devices'])}")
    print(f"{'workload':34} {'median ms':>10} {'min ms':>9} {'max ms':>9} {'GFLOP/s':>9}")
    for key, v in results.items():
        if isinstance(v, dict) and "ms" in v:
            gf = f"{v['gflops']:9.1f}" if "gflops" in v else f"{'':9}"
            print(f"{key:34} {v['ms']:10.2f} {v['min_ms']:9.2f} {v['max_ms']:9.2f} {gf}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
