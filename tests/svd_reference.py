"""Records PyTorch's values for tests/svd.rs (run: python3 tests/svd_reference.py).

The case A = [[1, 2, 0.5], [-1, 3, 2]] in float64: torch.linalg.svdvals, matrix_norm with
ord 'nuc', 2 and -2, and the gradient of each norm with respect to A.
"""
import json

import torch

A = [[1.0, 2.0, 0.5], [-1.0, 3.0, 2.0]]
out = {"torch": torch.__version__, "A": A}
a = torch.tensor(A, dtype=torch.float64)
out["svdvals"] = torch.linalg.svdvals(a).tolist()
for ord in ["nuc", 2, -2]:
    x = a.clone().requires_grad_(True)
    n = torch.linalg.matrix_norm(x, ord=ord)
    n.backward()
    out[f"norm {ord}"] = n.item()
    out[f"grad {ord}"] = x.grad.flatten().tolist()
print(json.dumps(out, indent=1))
