"""Records PyTorch's values for tests/svd.rs (run: python3 tests/svd_reference.py).

The case A = [[1, 2, 0.5], [-1, 3, 2]] in float64: torch.linalg.svdvals, matrix_norm with
ord 'nuc', 2 and -2, the gradient of each norm with respect to A, and gradients through the
factors U and Vh of torch.linalg.svd for A and its transpose.
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

# Gradients through U and Vh of losses that do not depend on the factors' signs, for A (wide)
# and its transpose (tall): L = sum((U @ Vh) * C) + sum(U**2 * W) + sum(Vh**2 * W2).
factors = {}
for name, m in [("wide", a), ("tall", a.T.contiguous())]:
    x = m.clone().requires_grad_(True)
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    c = torch.arange(m.numel(), dtype=torch.float64).reshape(m.shape) / 7 - 0.3
    w = torch.arange(u.numel(), dtype=torch.float64).reshape(u.shape) / 5 + 0.1
    w2 = torch.arange(vh.numel(), dtype=torch.float64).reshape(vh.shape) / 3 - 0.2
    loss = ((u @ vh) * c).sum() + (u**2 * w).sum() + (vh**2 * w2).sum()
    loss.backward()
    factors[name] = {"loss": loss.item(), "grad": x.grad.flatten().tolist()}
out["factors"] = factors
print(json.dumps(out, indent=1))
