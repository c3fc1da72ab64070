#!/usr/bin/env python3
"""PyTorch (CPU) versions of tracegrad's standard workloads, eager and under torch.compile, for
comparison with `tracegrad bench` (DESIGN.md, "Standard workloads").

Prints one JSON object per line, the same keys as `tracegrad bench --json`, with mode "torch"
(eager) or "torch_compile":
  {"workload","mode","median_ms","min_ms","max_ms","peak_bytes","compile_ms"}
plus a `memcpy` row (Tensor.copy_ of 2^25 f32 into a preallocated tensor, mode "torch") with
"gbps", "isa" and "threads". A run that fails gives a row with null timings and "error". With
--table it prints an aligned table instead, under a line naming torch's version, its thread
count and the ISA.

* The models are torch.nn modules written as a PyTorch user would: nn.Sequential MLPs and CNN
  (as zoo.rs's mlp() and cnn()), and the transformer block of zoo.rs written out by hand:
  pre-LN, fused qkv Linear, 4 heads, causal mask by masked_fill(-inf), softmax, output
  projection, residual, LayerNorm, Linear D->4D, GELU(tanh), Linear 4D->D, residual.
* Weights and inputs are the very numbers workloads.py (JAX) uses (common.arrays): weights in
  PyTorch's default Linear/Conv2d distribution from numpy's default_rng(0), inputs standard
  normal from default_rng(1).
* Train steps: zero_grad(set_to_none=True), forward, loss (cross-entropy or MSE, mean),
  backward, torch.optim.SGD(lr=0.1).step(). Forward workloads run under torch.no_grad();
  mlp_inference_b1's model is in eval().
* --compile adds a torch_compile row after each eager row: the forward function, or the whole
  train step function, under torch.compile with its default options (Dynamo splits the step
  at its graph breaks: the forward and loss with an AOTAutograd-compiled backward, and the
  optimizer step, each compiled). compile_ms is the wall time of the first call (tracing,
  compiling and one run), after torch._dynamo.reset(); a recompilation, if any, would fall in
  the warm-up. Unless --warm-cache is given, Inductor gets a fresh, empty cache directory, so
  compile_ms is a cold compile.
* peak_bytes is null: this script does not measure memory.
* Each timing is the median of --iters calls after a first call and a short warm-up (at least
  one call, then up to 0.2 s or --iters calls), the defaults per workload being tracegrad
  bench's.
"""

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
import traceback

import common
from common import LR, MEMCPY_LEN, WORKLOADS, isa, stats


def transformer_block(torch, d, heads):
    """zoo.rs's TransformerBlock (see the module docs), with PyTorch's default init."""
    nn = torch.nn

    class TransformerBlock(nn.Module):
        def __init__(self):
            super().__init__()
            assert d % heads == 0, f"width {d} is not divisible by {heads} heads"
            self.ln1 = nn.LayerNorm(d)
            self.qkv = nn.Linear(d, 3 * d)
            self.proj = nn.Linear(d, d)
            self.ln2 = nn.LayerNorm(d)
            self.fc1 = nn.Linear(d, 4 * d)
            self.act = nn.GELU(approximate="tanh")
            self.fc2 = nn.Linear(4 * d, d)
            self.heads = heads

        def forward(self, x):
            b, t, d = x.shape
            h, dh = self.heads, d // self.heads
            qkv = self.qkv(self.ln1(x))
            q, k, v = (p.reshape(b, t, h, dh).permute(0, 2, 1, 3) for p in qkv.chunk(3, -1))
            scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(dh))
            mask = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)  # True above the diagonal
            att = scores.masked_fill(mask, float("-inf")).softmax(-1)
            y = (att @ v).permute(0, 2, 1, 3).reshape(b, t, d)
            x = x + self.proj(y)
            return x + self.fc2(self.act(self.fc1(self.ln2(x))))

    return TransformerBlock()


def build(name, np, torch):
    """Returns ("fn", fn, inputs, None) for a forward workload, or ("train", model, (x, y),
    loss_fn) for a training step."""
    nn, F = torch.nn, torch.nn.functional
    params, inputs = common.arrays(name, np)
    inputs = tuple(torch.from_numpy(a) for a in inputs)

    def load(layer, p):
        # common.arrays gives a Linear's weight as [in, out]; torch stores [out, in].
        w = p["w"].T if isinstance(layer, nn.Linear) else p["w"]
        with torch.no_grad():
            layer.weight.copy_(torch.from_numpy(np.ascontiguousarray(w)))
            layer.bias.copy_(torch.from_numpy(p["b"]))

    def mlp(sizes):
        layers = []
        for i, o in zip(sizes, sizes[1:]):
            layers += [nn.Linear(i, o), nn.ReLU()]
        model = nn.Sequential(*layers[:-1])
        for layer, p in zip(model[::2], params):
            load(layer, p)
        return model

    if name == "pointwise_chain":
        return "fn", lambda x, a, b: torch.tanh(a * x + b) * torch.sigmoid(x) + 0.5 * x, inputs, None
    if name == "softmax_rows":
        return "fn", lambda x: torch.softmax(x, dim=-1), inputs, None
    if name == "layernorm":
        x, w, b = inputs
        return "fn", lambda x: F.layer_norm(x, (w.shape[0],), w, b, 1e-5), (x,), None
    if name == "mlp_train_step":
        return "train", mlp([784, 256, 10]), inputs, F.cross_entropy
    if name == "mlp_train_step_large":
        return "train", mlp([784, 512, 512, 10]), inputs, F.cross_entropy
    if name == "mlp_inference_b1":
        return "fn", mlp([784, 256, 10]).eval(), inputs, None
    if name == "cnn_train_step":
        model = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(784, 10),
        )
        for i, key in ((0, "c1"), (3, "c2"), (7, "fc")):
            load(model[i], params[key])
        return "train", model, inputs, F.cross_entropy
    if name == "transformer_block_train_step":
        model = transformer_block(torch, common.TRANSFORMER["D"], common.TRANSFORMER["H"])
        for key in ("ln1", "qkv", "proj", "ln2", "fc1", "fc2"):
            load(getattr(model, key), params[key])
        return "train", model, inputs, F.mse_loss
    raise ValueError(f"unknown workload {name!r}; the workloads are: {', '.join(WORKLOADS)}")


def runner(name, compiled, np, torch):
    """A fresh setup of the workload and a function doing one unit of it (a forward call, or
    one train step returning the loss from before the update)."""
    if compiled:
        torch._dynamo.reset()  # each workload compiles from scratch, as in a fresh process
    kind, fn, args, loss_fn = build(name, np, torch)
    if kind == "fn":
        f = torch.compile(fn) if compiled else fn

        def call():
            with torch.no_grad():
                return f(*args)

        return call
    model = fn.train()
    opt = torch.optim.SGD(model.parameters(), lr=LR)

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        return loss.detach()

    f = torch.compile(step) if compiled else step
    return lambda: f(*args)


def differs(eager, compiled):
    """tracegrad bench's check: None when |eager - compiled| <= 1e-4 (1 + |eager|) everywhere."""
    if eager.shape != compiled.shape:
        return f"shapes differ: eager {tuple(eager.shape)}, compiled {tuple(compiled.shape)}"
    excess = (eager.double() - compiled.double()).abs() - 1e-4 * (1 + eager.double().abs())
    excess = excess.reshape(-1)
    i = int(excess.argmax())
    return None if excess[i] <= 0 else f"element {i}: eager {eager.reshape(-1)[i]} vs compiled {compiled.reshape(-1)[i]}"


def bench_workload(name, iters, compiled, np, torch):
    """The row of one (workload, mode), and the first call's result."""
    call = runner(name, compiled, np, torch)
    t0 = time.perf_counter()
    first = call()
    first_ms = (time.perf_counter() - t0) * 1e3
    row = {"workload": name, "mode": "torch_compile" if compiled else "torch", **common.measure(call, iters),
           "peak_bytes": None, "compile_ms": first_ms if compiled else None}
    return row, first


def bench_memcpy(iters, np, torch):
    """Copies 2^25 f32 into a preallocated second tensor (Tensor.copy_), so each call moves
    the data once and allocates nothing, like tracegrad's memcpy row."""
    src = torch.from_numpy((np.arange(MEMCPY_LEN) % 4096).astype(np.float32))
    dst = torch.zeros(MEMCPY_LEN, dtype=torch.float32)
    dst.copy_(src)
    assert dst.data_ptr() != src.data_ptr(), "the copy returned its input"
    assert float(dst[MEMCPY_LEN - 1]) == (MEMCPY_LEN - 1) % 4096
    for _ in range(2):
        dst.copy_(src)
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        dst.copy_(src)
        times.append((time.perf_counter() - t) * 1e3)
    s = stats(times)
    gbps = 2 * MEMCPY_LEN * 4 / (s["median_ms"] * 1e-3) / 1e9
    return {"workload": "memcpy", "mode": "torch", **s, "peak_bytes": None, "compile_ms": None, "gbps": gbps,
            "isa": isa(), "threads": torch.get_num_threads()}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_arguments(p)
    p.add_argument("--compile", action="store_true", help="also run each workload under torch.compile")
    p.add_argument("--compile-only", action="store_true", help="run under torch.compile only (no eager rows)")
    p.add_argument("--warm-cache", action="store_true",
                   help="let torch.compile use Inductor's usual on-disk cache (default: a fresh, empty one)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads(N) (default: this process's CPU count)")
    args = p.parse_args()
    names = common.selected(p, args)
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be at least 1")
    modes = [True] if args.compile_only else [False, True] if args.compile else [False]

    cache = None
    if True in modes and not args.warm_cache:
        cache = tempfile.mkdtemp(prefix="torchinductor_cold_")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
    try:
        import numpy as np
        import torch

        torch.set_num_threads(args.threads or common.threads())
        title = (f"torch {torch.__version__} on cpu, {torch.get_num_threads()} threads, {isa()} "
                 f"(torch's kernels: {torch.backends.cpu.get_cpu_capability()}), numpy {np.__version__}")
        if not args.table:
            print(title, file=sys.stderr)
        out = common.Output(args.table)
        if not args.no_memcpy:
            iters = args.iters or common.MEMCPY_ITERS
            out.emit(bench_memcpy(iters, np, torch), iters)
        failed = []
        for name in names:
            iters = args.iters or WORKLOADS[name]
            eager_first = None
            for compiled in modes:
                mode = "torch_compile" if compiled else "torch"
                try:
                    row, first = bench_workload(name, iters, compiled, np, torch)
                except Exception as e:  # a compile failure becomes an error row, as in tracegrad bench
                    traceback.print_exc()
                    msg = f"{type(e).__name__}: {e}"
                    failed.append(f"{name} ({mode}): {msg.strip().splitlines()[0]}")
                    row = {"workload": name, "mode": mode, "median_ms": None, "min_ms": None, "max_ms": None,
                           "peak_bytes": None, "compile_ms": None, "error": msg}
                    first = None
                if not compiled:
                    eager_first = first
                elif eager_first is not None and first is not None:
                    diff = differs(eager_first, first)
                    if diff:
                        print(f"warning: {name}: the compiled result differs from eager: {diff}", file=sys.stderr)
                out.emit(row, iters)
        out.finish(title)
    finally:
        if cache:
            shutil.rmtree(cache, ignore_errors=True)
    if failed:
        sys.exit(f"{len(failed)} of {len(out.rows)} runs failed:\n  " + "\n  ".join(failed))


if __name__ == "__main__":
    main()
