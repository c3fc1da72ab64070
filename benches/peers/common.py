"""Shared by the peer scripts of tracegrad's standard workloads (workloads.py for JAX,
workloads_torch.py for PyTorch): the workload list and default iterations, the seeded weights
and inputs (so every peer computes on the same numbers), the timing protocol, the command line
and the output (JSON lines in `tracegrad bench --json`'s format, or an aligned table).
"""

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
MEMCPY_ITERS = 20
TRANSFORMER = {"B": 8, "T": 64, "D": 128, "H": 4}


# TRACEGRAD_ISA=avx2 (as for `tracegrad bench`) caps the peers at AVX2 too, so that an AVX-512
# machine measures what an AVX2 machine would run: XLA's CPU backend, PyTorch's ATen kernels,
# MKL and oneDNN. Set here, before the scripts import jax or torch; values already in the
# environment are kept (XLA_FLAGS gains the flag unless it names one).
ISA_CAP = os.environ.get("TRACEGRAD_ISA", "").lower() or None
if ISA_CAP not in (None, "avx2", "avx512"):
    sys.exit(f"TRACEGRAD_ISA={os.environ['TRACEGRAD_ISA']!r}: expected avx2 or avx512, or leave it unset")
if ISA_CAP == "avx2":
    if "xla_cpu_max_isa" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_max_isa=AVX2").strip()
    os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")
    os.environ.setdefault("MKL_ENABLE_INSTRUCTIONS", "AVX2")
    os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")


def isa():
    """The widest vector extension in use: the CPU's, or avx2 under TRACEGRAD_ISA=avx2."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        flags = []
    if "avx512f" in flags:
        return "avx2" if ISA_CAP == "avx2" else "avx512"
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
    """PyTorch's default Linear init, uniform in +-1/sqrt(fan_in); w is [fan_in, fan_out]
    (the transpose of torch's Linear.weight)."""
    bound = 1.0 / math.sqrt(fan_in)
    w = rng.uniform(-bound, bound, (fan_in, fan_out)).astype(np.float32)
    b = rng.uniform(-bound, bound, (fan_out,)).astype(np.float32)
    return {"w": w, "b": b}


def conv_params(rng, np, cin, cout, k):
    bound = 1.0 / math.sqrt(cin * k * k)
    w = rng.uniform(-bound, bound, (cout, cin, k, k)).astype(np.float32)
    b = rng.uniform(-bound, bound, (cout,)).astype(np.float32)
    return {"w": w, "b": b}


def arrays(name, np):
    """The workload's (params, inputs) as numpy arrays: weights from default_rng(0), inputs
    (and integer class targets) from default_rng(1). params is None for the pure functions;
    a list of Linear layers for the MLPs; a dict of layers for the CNN and the transformer
    block. inputs is a tuple: the function's arguments, or (x,) / (x, y) for a model."""
    rng_w = np.random.default_rng(0)
    rng = np.random.default_rng(1)
    randn = lambda *shape: rng.standard_normal(shape, dtype=np.float32)

    if name == "pointwise_chain":
        n = 1 << 24
        return None, (randn(n), randn(n), randn(n))
    if name == "softmax_rows":
        return None, (randn(4096, 1024),)
    if name == "layernorm":
        return None, (randn(4096, 1024), randn(1024), randn(1024))
    if name in ("mlp_train_step", "mlp_train_step_large"):
        batch, sizes = (64, [784, 256, 10]) if name == "mlp_train_step" else (256, [784, 512, 512, 10])
        params = [linear_params(rng_w, np, i, o) for i, o in zip(sizes, sizes[1:])]
        return params, (randn(batch, 784), rng.integers(0, 10, batch))
    if name == "mlp_inference_b1":
        return [linear_params(rng_w, np, 784, 256), linear_params(rng_w, np, 256, 10)], (randn(1, 784),)
    if name == "cnn_train_step":
        params = {
            "c1": conv_params(rng_w, np, 1, 8, 3),
            "c2": conv_params(rng_w, np, 8, 16, 3),
            "fc": linear_params(rng_w, np, 784, 10),
        }
        return params, (randn(32, 1, 28, 28), rng.integers(0, 10, 32))
    if name == "transformer_block_train_step":
        B, T, D = TRANSFORMER["B"], TRANSFORMER["T"], TRANSFORMER["D"]
        params = {
            "ln1": {"w": np.ones(D, np.float32), "b": np.zeros(D, np.float32)},
            "qkv": linear_params(rng_w, np, D, 3 * D),
            "proj": linear_params(rng_w, np, D, D),
            "ln2": {"w": np.ones(D, np.float32), "b": np.zeros(D, np.float32)},
            "fc1": linear_params(rng_w, np, D, 4 * D),
            "fc2": linear_params(rng_w, np, 4 * D, D),
        }
        return params, (randn(B, T, D), randn(B, T, D))
    raise ValueError(f"unknown workload {name!r}; the workloads are: {', '.join(WORKLOADS)}")


def measure(call, iters):
    """tracegrad bench's protocol after the first call: warm up (at least one call, then up
    to 0.2 s or `iters` calls), then time `iters` calls one by one. Returns median/min/max ms."""
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
    return stats(times)


def add_arguments(p):
    """The options both peer scripts share."""
    p.add_argument("--workload", action="append", choices=list(WORKLOADS), metavar="W",
                   help=f"workload to run, repeatable (default: all): {', '.join(WORKLOADS)}")
    p.add_argument("--only", metavar="NAME[,NAME]", action="append",
                   help="workloads to run, comma-separated (combines with --workload)")
    p.add_argument("--iters", type=int, help="timed iterations per workload (default: per workload)")
    p.add_argument("--no-memcpy", action="store_true", help="skip the memcpy reference row")
    p.add_argument("--table", action="store_true", help="print an aligned table instead of JSON lines")


def selected(p, args):
    """The workloads that --workload and --only name (all when neither is given): --workload's
    in order, then --only's, without repeats. Exits with a usage error on an unknown name or a
    bad --iters."""
    if args.iters is not None and args.iters < 1:
        p.error("--iters must be at least 1")
    names = list(args.workload or [])
    for group in args.only or []:
        for name in (n.strip() for n in group.split(",")):
            if name not in WORKLOADS:
                p.error(f"--only: unknown workload {name!r}; the workloads are: {', '.join(WORKLOADS)}")
            names.append(name)
    return list(dict.fromkeys(names)) or list(WORKLOADS)


class Output:
    """Collects rows; prints each as a JSON line at once, or all as a table at the end."""

    def __init__(self, table):
        self.table = table
        self.rows = []

    def emit(self, row, iters):
        self.rows.append({**row, "iters": iters})
        if not self.table:
            print(json.dumps(row), flush=True)

    def finish(self, title=None):
        if self.table:
            if title:
                print(title)
            print_table(self.rows)


def fmt_ms(v):
    return f"{v:.1f}" if v >= 100 else f"{v:.2f}" if v >= 10 else f"{v:.3f}" if v >= 1 else f"{v:.4f}"


def print_table(rows, file=sys.stdout):
    """One line per row. A mode column appears when the rows have more than one mode."""
    with_mode = len({r["mode"] for r in rows}) > 1
    head = ["workload"] + (["mode"] if with_mode else []) + ["iters", "median ms", "(min..max)", "compile ms", "extra"]
    cells = [head]
    for r in rows:
        extra = f"{r['gbps']:.1f} GB/s, {r['isa']}, {r['threads']} threads" if "gbps" in r else ""
        if r.get("error"):
            timing = ["-", "-", "-"]
            extra = "error: " + r["error"].strip().splitlines()[-1][:100]
        else:
            timing = [fmt_ms(r["median_ms"]), f"{fmt_ms(r['min_ms'])}..{fmt_ms(r['max_ms'])}",
                      "-" if r["compile_ms"] is None else fmt_ms(r["compile_ms"])]
        cells.append([r["workload"]] + ([r["mode"]] if with_mode else []) + [str(r["iters"])] + timing + [extra])
    widths = [max(len(row[c]) for row in cells) for c in range(len(head))]
    for i, row in enumerate(cells):
        line = row[0].ljust(widths[0]) + "".join("  " + cell.rjust(w) for cell, w in zip(row[1:], widths[1:]))
        print(line.rstrip(), file=file)
        if i == 0:
            print("-" * (sum(widths) + 2 * (len(widths) - 1)), file=file)
