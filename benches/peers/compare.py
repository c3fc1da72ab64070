#!/usr/bin/env python3
"""Side-by-side table of JSON-line results from `tracegrad bench --json`, workloads.py and
workloads_torch.py (files given, or stdin): one row per workload, one column per mode
(eager, compiled, jax, torch, torch_compile, in the order first seen), each cell the median
ms; the reference rows show GB/s (memcpy) or GFLOP/s (sgemm). A second table gives compile_ms
for the modes that report it. Lines that are not JSON objects are skipped.
"""

import argparse
import json
import sys

from common import WORKLOADS, fmt_ms


def aligned(cells):
    widths = [max(len(row[c]) for row in cells) for c in range(len(cells[0]))]
    lines = []
    for i, row in enumerate(cells):
        line = row[0].ljust(widths[0]) + "".join("  " + cell.rjust(w) for cell, w in zip(row[1:], widths[1:]))
        lines.append(line.rstrip())
        if i == 0:
            lines.append("-" * (sum(widths) + 2 * (len(widths) - 1)))
    return "\n".join(lines)


def cell(r, key):
    if r is None:
        return ""
    if r.get("error"):
        return "error"
    if key == "median_ms" and r.get("gbps") is not None:
        return f"{r['gbps']:.1f} GB/s"
    if key == "median_ms" and r.get("gflops") is not None:
        return f"{r['gflops']:.0f} GFLOP/s"
    return "-" if r.get(key) is None else fmt_ms(r[key])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="*", help="JSON-lines files (default: stdin)")
    args = p.parse_args()
    rows = []
    for f in [open(path) for path in args.files] or [sys.stdin]:
        with f:
            for line in f:
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if isinstance(row, dict) and "workload" in row and "mode" in row:
                    rows.append(row)
    if not rows:
        sys.exit("no result rows found")
    # Reference rows first, as seen; then the standard workloads in DESIGN.md's order.
    order = list(WORKLOADS)
    workloads = sorted(dict.fromkeys(r["workload"] for r in rows),
                       key=lambda w: order.index(w) + 1 if w in order else 0)
    # tracegrad bench's reference rows (mode "reference") go in its first column, eager or
    # compiled; the peer scripts give theirs the peer's own mode.
    ours = [m for m in ("eager", "compiled") if any(r["mode"] == m for r in rows)] or ["reference"]
    col = lambda r: ours[0] if r["mode"] == "reference" else r["mode"]
    modes = list(dict.fromkeys(col(r) for r in rows))
    by = {(r["workload"], col(r)): r for r in rows}
    print(aligned([["median ms"] + modes] + [[w] + [cell(by.get((w, m)), "median_ms") for m in modes] for w in workloads]))
    compiling = [m for m in modes if any(by.get((w, m), {}).get("compile_ms") is not None for w in workloads)]
    if compiling:
        print()
        print(aligned([["compile ms"] + compiling] + [
            [w] + [cell(by.get((w, m)), "compile_ms") for m in compiling]
            for w in workloads if any(by.get((w, m), {}).get("compile_ms") is not None for m in compiling)]))


if __name__ == "__main__":
    main()
