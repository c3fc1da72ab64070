#!/usr/bin/env python3
"""JAX (jit, CPU) versions of tracegrad's standard workloads, for comparison with
`tracegrad bench` (DESIGN.md, "Standard workloads").

Prints one JSON object per line, the same keys as `tracegrad bench --json`, with mode "jax":
  {"workload","mode","median_ms","min_ms","max_ms","peak_bytes","compile_ms"}
plus a `memcpy` row (a copy of 2^25 f32) with "gbps", "isa" and "threads". With --table it
prints an aligned table instead.

* Inputs are standard normal from numpy's default_rng(1); weights use PyTorch's default
  Linear/Conv2d initialisation (uniform in +-1/sqrt(fan_in)), from default_rng(0)
  (common.arrays; workloads_torch.py uses the same numbers).
* Train steps are one jitted function: forward, loss, jax.value_and_grad, SGD (lr 0.1); the
  parameters are donated so the update can happen in place, as tracegrad's does.
* compile_ms is the time of jit(f).lower(*args).compile(); the timed calls use the compiled
  executable, and every result is waited for with block_until_ready().
* peak_bytes is null: this script does not measure memory.
* Each timing is the median of --iters calls after a short warm-up (defaults per workload,
  the same as tracegrad bench's).
"""

import argparse
import math
import sys
import time

import common
from common import LR, MEMCPY_LEN, WORKLOADS, isa, stats, threads


def build(name, np, jax, jnp):
    """Returns (kind, fn, args): kind "fn" (args are the inputs) or "train" (args are
    (params, x, y); fn(params, x, y) -> (new_params, loss))."""
    params, inputs = common.arrays(name, np)
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

    def train(loss_fn):
        """The train step of loss_fn(params, x, y): loss and gradients, then SGD."""
        def step(params, x, y):
            loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
            return jax.tree_util.tree_map(lambda p, g: p - LR * g, params, grads), loss

        return "train", step, (params, *inputs)

    if name == "pointwise_chain":
        return "fn", lambda x, a, b: jnp.tanh(a * x + b) * jax.nn.sigmoid(x) + 0.5 * x, inputs
    if name == "softmax_rows":
        return "fn", lambda x: jax.nn.softmax(x, axis=-1), inputs
    if name == "layernorm":
        return "fn", layer_norm, inputs
    if name in ("mlp_train_step", "mlp_train_step_large"):
        return train(lambda p, x, y: cross_entropy(mlp(p, x), y))
    if name == "mlp_inference_b1":
        return "fn", mlp, (params, *inputs)
    if name == "cnn_train_step":
        def conv(p, x):
            y = lax.conv_general_dilated(x, p["w"], (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NCHW", "OIHW", "NCHW"))
            return y + p["b"][None, :, None, None]

        def pool(x):
            return lax.reduce_window(x, -jnp.inf, lax.max, (1, 1, 2, 2), (1, 1, 2, 2), "VALID")

        def cnn(p, x):
            x = pool(jax.nn.relu(conv(p["c1"], x)))
            x = pool(jax.nn.relu(conv(p["c2"], x)))
            return dense(p["fc"], x.reshape(x.shape[0], -1))

        return train(lambda p, x, y: cross_entropy(cnn(p, x), y))
    if name == "transformer_block_train_step":
        B, T, D, H = (common.TRANSFORMER[k] for k in "BTDH")
        dh = D // H
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

        return train(lambda p, x, y: jnp.mean(jnp.square(block(p, x) - y)))
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

    return {"workload": name, "mode": "jax", **common.measure(call, iters), "peak_bytes": None,
            "compile_ms": compile_ms}


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


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_arguments(p)
    args = p.parse_args()
    names = common.selected(p, args)

    import numpy as np
    import jax
    import jax.numpy as jnp

    print(f"jax {jax.__version__} on {', '.join(str(d) for d in jax.devices())}, numpy {np.__version__}, "
          f"{threads()} cpus, {isa()}", file=sys.stderr)
    out = common.Output(args.table)
    if not args.no_memcpy:
        iters = args.iters or common.MEMCPY_ITERS
        out.emit(bench_memcpy(iters, np, jax, jnp), iters)
    for name in names:
        iters = args.iters or WORKLOADS[name]
        out.emit(bench_workload(name, iters, np, jax, jnp), iters)
    out.finish()


if __name__ == "__main__":
    main()
