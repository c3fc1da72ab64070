#!/usr/bin/env python3
"""JAX (jit, CPU) versions of tracegrad's standard workloads, for comparison with
`tracegrad bench` (DESIGN.md, "Standard workloads").

Prints one JSON object per line, the same keys as `tracegrad bench --json`, with mode "jax":
  {"workload","mode","median_ms","min_ms","max_ms","peak_bytes","compile_ms"}
plus a `memcpy` row (a copy of 2^25 f32) with "gbps", "isa" and "threads". With --table it
prints an aligned table instead.

* Inputs are standard normal from numpy's default_rng(1); weights use PyTorch's default
  Linear/Conv2d initialisation (uniform in +-1/sqrt(fan_in)), from default_rng(0).
* Train steps are one jitted function: forward, loss, jax.value_and_grad, SGD (lr 0.1); the
  parameters are donated so the update can happen in place, as tracegrad's does.
* compile_ms is the time of jit(f).lower(*args).compile(); the timed calls use the compiled
  executable, and every result is waited for with block_until_ready().
* peak_bytes is null: this script does not measure memory.
* Each timing is the median of --iters calls after a short warm-up (defaults per workload,
  the same as tracegrad bench's).
"""

import argparse
import json
import math
import os
import statistics
import sys
import time

WORKLOADS = {
    # name: default iterations (as in tracegrad bench)
    "pointwise_chain": 10,
    "softmax_rows": 150,
    "layernorm": 150,
    "mlp_train_step": 3000,
    "mlp_train_step_large": 300,
    "mlp_inference_b1": 50000,
    "cnn_train_step": 500,
    "transformer_block_train_step": 200,
}
LR = 0.1
MEMCPY_LEN = 1 << 25


def isa():
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        flags = []
    if "avx512f" in flags:
        return "avx512"
    if "avx2" in flags:
        return "avx2"
    return "sse"


def threads():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count()


def stats(times):
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times)}


def linear_params(rng, np, fan_in, fan_out):
    bound = 1.0 / math.sqrt(fan_in)
    w = rng.uniform(-bound, bound, (fan_in, fan_out)).astype(np.float32)
    b = rng.uniform(-bound, bound, (fan_out,)).astype(np.float32)
    return {"w": w, "b": b}


def conv_params(rng, np, cin, cout, k):
    bound = 1.0 / math.sqrt(cin * k * k)
    w = rng.uniform(-bound, bound, (cout, cin, k, k)).astype(np.float32)
    b = rng.uniform(-bound, bound, (cout,)).astype(np.float32)
    return {"w": w, "b": b}


def build(name, np, jax, jnp):
    """Returns (kind, fn, args): kind "fn" (args are the inputs) or "train" (args are
    (params, x, y); fn(params, x, y) -> (new_params, loss))."""
    rng_w = np.random.default_rng(0)
    rng = np.random.default_rng(1)
    randn = lambda *shape: rng.standard_normal(shape, dtype=np.float32)
    lax = jax.lax

    def dense(p, x):
        return x @ p["w"] + p["b"]

    def cross_entropy(logits, y):
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=-1))

    def mlp(params, x):
        for p in params[:-1]:
            x = jax.nn.relu(dense(p, x))
        return dense(params[-1], x)

    def layer_norm(x, w, b, eps=1e-5):
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        return (x - mean) * lax.rsqrt(var + eps) * w + b

    def sgd(loss_fn):
        def step(params, x, y):
            loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
            return jax.tree_util.tree_map(lambda p, g: p - LR * g, params, grads), loss

        return step

    if name == "pointwise_chain":
        n = 1 << 24
        x, a, b = randn(n), randn(n), randn(n)
        return "fn", lambda x, a, b: jnp.tanh(a * x + b) * jax.nn.sigmoid(x) + 0.5 * x, (x, a, b)
    if name == "softmax_rows":
        return "fn", lambda x: jax.nn.softmax(x, axis=-1), (randn(4096, 1024),)
    if name == "layernorm":
        return "fn", layer_norm, (randn(4096, 1024), randn(1024), randn(1024))
    if name in ("mlp_train_step", "mlp_train_step_large"):
        batch, sizes = (64, [784, 256, 10]) if name == "mlp_train_step" else (256, [784, 512, 512, 10])
        params = [linear_params(rng_w, np, i, o) for i, o in zip(sizes, sizes[1:])]
        x, y = randn(batch, 784), rng.integers(0, 10, batch)
        return "train", sgd(lambda p, x, y: cross_entropy(mlp(p, x), y)), (params, x, y)
    if name == "mlp_inference_b1":
        params = [linear_params(rng_w, np, 784, 256), linear_params(rng_w, np, 256, 10)]
        return "fn", mlp, (params, randn(1, 784))
    if name == "cnn_train_step":
        params = {
            "c1": conv_params(rng_w, np, 1, 8, 3),
            "c2": conv_params(rng_w, np, 8, 16, 3),
            "fc": linear_params(rng_w, np, 784, 10),
        }

        def conv(p, x):
            y = lax.conv_general_dilated(x, p["w"], (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NCHW", "OIHW", "NCHW"))
            return y + p["b"][None, :, None, None]

        def pool(x):
            return lax.reduce_window(x, -jnp.inf, lax.max, (1, 1, 2, 2), (1, 1, 2, 2), "VALID")

        def cnn(p, x):
            x = pool(jax.nn.relu(conv(p["c1"], x)))
            x = pool(jax.nn.relu(conv(p["c2"], x)))
            return dense(p["fc"], x.reshape(x.shape[0], -1))

        x, y = randn(32, 1, 28, 28), rng.integers(0, 10, 32)
        return "train", sgd(lambda p, x, y: cross_entropy(cnn(p, x), y)), (params, x, y)
    if name == "transformer_block_train_step":
        B, T, D, H = 8, 64, 128, 4
        dh = D // H
        params = {
            "ln1": {"w": np.ones(D, np.float32), "b": np.zeros(D, np.float32)},
            "qkv": linear_params(rng_w, np, D, 3 * D),
            "proj": linear_params(rng_w, np, D, D),
            "ln2": {"w": np.ones(D, np.float32), "b": np.zeros(D, np.float32)},
            "fc1": linear_params(rng_w, np, D, 4 * D),
            "fc2": linear_params(rng_w, np, 4 * D, D),
        }
        causal = np.triu(np.ones((T, T), dtype=bool), k=1)  # True above the diagonal: masked

        def block(p, x):
            h = layer_norm(x, p["ln1"]["w"], p["ln1"]["b"])
            q, k, v = jnp.split(dense(p["qkv"], h), 3, axis=-1)
            q, k, v = (t.reshape(B, T, H, dh).transpose(0, 2, 1, 3) for t in (q, k, v))
            scores = (q @ k.transpose(0, 1, 3, 2)) * (1.0 / math.sqrt(dh))
            att = jax.nn.softmax(jnp.where(causal, -jnp.inf, scores), axis=-1)
            y = (att @ v).transpose(0, 2, 1, 3).reshape(B, T, D)
            x = x + dense(p["proj"], y)
            h = layer_norm(x, p["ln2"]["w"], p["ln2"]["b"])
            return x + dense(p["fc2"], jax.nn.gelu(dense(p["fc1"], h), approximate=True))

        x, target = randn(B, T, D), randn(B, T, D)
        return "train", sgd(lambda p, x, y: jnp.mean(jnp.square(block(p, x) - y))), (params, x, target)
    raise ValueError(f"unknown workload {name!r}; the workloads are: {', '.join(WORKLOADS)}")


def bench_workload(name, iters, np, jax, jnp):
    kind, fn, args = build(name, np, jax, jnp)
    args = jax.device_put(args)
    jitted = jax.jit(fn, donate_argnums=(0,) if kind == "train" else ())
    t0 = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    compile_ms = (time.perf_counter() - t0) * 1e3
    if kind == "fn":
        def call():
            jax.block_until_ready(compiled(*args))
    else:
        state = {"params": args[0]}

        def call():
            params, loss = compiled(state["params"], args[1], args[2])
            state["params"] = params
            jax.block_until_ready((params, loss))

    warm = time.perf_counter()
    calls = 0
    while calls < 1 or (calls < iters and time.perf_counter() - warm < 0.2):
        call()
        calls += 1
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        call()
        times.append((time.perf_counter() - t) * 1e3)
    return {"workload": name, "mode": "jax", **stats(times), "peak_bytes": None, "compile_ms": compile_ms}


def bench_memcpy(iters, np, jax, jnp):
    """Copies 2^25 f32 into a second, donated buffer (an in-place dynamic_update_slice), so
    each call moves the data once and allocates nothing, like tracegrad's memcpy row. (A plain
    jit(jnp.copy) would also allocate and page-fault a fresh 128 MiB output on every call.)"""
    src = jax.device_put((np.arange(MEMCPY_LEN) % 4096).astype(np.float32))
    dst = jax.device_put(np.zeros(MEMCPY_LEN, dtype=np.float32))
    copy = jax.jit(lambda s, d: jax.lax.dynamic_update_slice(d, s, (0,)), donate_argnums=(1,))
    copy = copy.lower(src, dst).compile()
    before = dst.unsafe_buffer_pointer()
    dst = copy(src, dst).block_until_ready()
    # A real copy: a buffer other than the source, holding the source's values.
    assert dst.unsafe_buffer_pointer() != src.unsafe_buffer_pointer(), "the copy returned its input"
    assert float(dst[MEMCPY_LEN - 1]) == (MEMCPY_LEN - 1) % 4096
    if dst.unsafe_buffer_pointer() != before:
        print("note: memcpy: XLA did not reuse the donated buffer; each call allocates", file=sys.stderr)
    for _ in range(2):
        dst = copy(src, dst).block_until_ready()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        dst = copy(src, dst).block_until_ready()
        times.append((time.perf_counter() - t) * 1e3)
    s = stats(times)
    gbps = 2 * MEMCPY_LEN * 4 / (s["median_ms"] * 1e-3) / 1e9
    return {"workload": "memcpy", "mode": "jax", **s, "peak_bytes": None, "compile_ms": None, "gbps": gbps,
            "isa": isa(), "threads": threads()}


def fmt_ms(v):
    return f"{v:.1f}" if v >= 100 else f"{v:.2f}" if v >= 10 else f"{v:.3f}" if v >= 1 else f"{v:.4f}"


def print_table(rows, file=sys.stdout):
    head = ["workload", "iters", "median ms", "(min..max)", "compile ms", "extra"]
    cells = [head]
    for r in rows:
        extra = f"{r['gbps']:.1f} GB/s, {r['isa']}, {r['threads']} threads" if "gbps" in r else ""
        cells.append([r["workload"], str(r["iters"]), fmt_ms(r["median_ms"]),
                      f"{fmt_ms(r['min_ms'])}..{fmt_ms(r['max_ms'])}",
                      "-" if r["compile_ms"] is None else fmt_ms(r["compile_ms"]), extra])
    widths = [max(len(row[c]) for row in cells) for c in range(len(head))]
    for i, row in enumerate(cells):
        line = row[0].ljust(widths[0]) + "".join("  " + cell.rjust(w) for cell, w in zip(row[1:], widths[1:]))
        print(line.rstrip(), file=file)
        if i == 0:
            print("-" * (sum(widths) + 2 * (len(widths) - 1)), file=file)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", action="append", choices=list(WORKLOADS), metavar="W",
                   help=f"workload to run, repeatable (default: all): {', '.join(WORKLOADS)}")
    p.add_argument("--iters", type=int, help="timed iterations per workload (default: per workload)")
    p.add_argument("--no-memcpy", action="store_true", help="skip the memcpy reference row")
    p.add_argument("--table", action="store_true", help="print an aligned table instead of JSON lines")
    args = p.parse_args()
    if args.iters is not None and args.iters < 1:
        p.error("--iters must be at least 1")

    import numpy as np
    import jax
    import jax.numpy as jnp

    print(f"jax {jax.__version__} on {', '.join(str(d) for d in jax.devices())}, numpy {np.__version__}, "
          f"{threads()} cpus, {isa()}", file=sys.stderr)
    rows = []

    def emit(row, iters):
        rows.append({**row, "iters": iters})
        if not args.table:
            print(json.dumps(row), flush=True)

    if not args.no_memcpy:
        iters = args.iters or 20
        emit(bench_memcpy(iters, np, jax, jnp), iters)
    for name in args.workload or WORKLOADS:
        iters = args.iters or WORKLOADS[name]
        emit(bench_workload(name, iters, np, jax, jnp), iters)
    if args.table:
        print_table(rows)


if __name__ == "__main__":
    main()
