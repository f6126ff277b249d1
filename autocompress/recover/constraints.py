"""What recovery may change in a compressed model, and how it keeps the plan's choices intact.

Trainable: every parameter inside the transformer blocks (dense weights, low-rank factors,
biases, norms). Embeddings, the final norm and the output head stay frozen, so the student keeps
the teacher's input and output spaces. Each weight the plan compressed gets a parametrization:

- pruned (``sparsity`` > 0): a fixed keep-mask taken from the compressed weight (its zeros), so
  pruned weights stay exactly 0 and get no gradient;
- quantized (``bits`` < 16): straight-through estimation on a fixed grid. The forward pass always
  sees the weight rounded onto the grid the compressed weight already lies on (one scale, and
  zero point when asymmetric, per group), the gradient passes through the rounding unchanged.
  Chosen over re-quantizing after training because the loss is then measured on exactly the
  weights that will be deployed (re-quantizing would round small updates away and reintroduce
  error the training never saw), and the grid — hence storage and cost — is the plan's.

The grid is read off the compressed weight itself (step = smallest gap between the distinct
values of a group, 0 included), which recovers GPTQ's grids too without its Hessians; when the
weight is not on a grid of that many levels the RTN grid of the weight is used instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from autocompress.compress.quantize import fake_quantize, grid_of
from autocompress.compress.structure import block_path
from autocompress.model.anatomy import ModelAnatomy
from autocompress.plan import LayerChoice, Plan


@dataclass(frozen=True)
class Grid:
    """A fixed quantization grid for one [out, in] weight: per-group scale (and zero point)."""

    bits: int
    group_size: int
    scale: torch.Tensor  # [out, groups, 1]
    zero: torch.Tensor | None  # [out, groups, 1], None when symmetric

    def snap(self, w: torch.Tensor) -> torch.Tensor:
        """Give ``w`` [out, in] rounded onto the grid (dequantized)."""
        out_f, in_f = w.shape
        pad = (-in_f) % self.group_size
        groups = F.pad(w, (0, pad)).reshape(out_f, -1, self.group_size)
        q = fake_quantize(groups, self.scale, self.zero, self.bits).reshape(out_f, -1)
        return q[:, :in_f]


def grid_from_values(w: torch.Tensor, bits: int, group_size: int | None, symmetric: bool) -> Grid:
    """Give the grid the (already quantized) weight ``w`` [out, in] lies on; see the module doc."""
    w = w.detach().float()
    out_f, in_f = w.shape
    gs = in_f if group_size is None else max(1, min(int(group_size), in_f))
    pad = (-in_f) % gs
    groups = F.pad(w, (0, pad)).reshape(out_f, -1, gs)
    vals = torch.cat([groups, torch.zeros_like(groups[..., :1])], dim=-1).sort(dim=-1).values
    gaps = vals.diff(dim=-1)
    tol = 1e-4 * vals.abs().amax(dim=-1, keepdim=True)
    step = torch.where(gaps > tol, gaps, torch.full_like(gaps, torch.inf)).amin(dim=-1, keepdim=True)
    step = torch.where(torch.isfinite(step), step, torch.ones_like(step))  # all-zero group
    zero = None if symmetric else torch.round(-vals[..., :1].clamp(max=0.0) / step)
    grid = Grid(bits, gs, step, zero)
    if not torch.allclose(grid.snap(w), w, rtol=1e-4, atol=1e-6):
        scale, zero = grid_of(groups, bits, symmetric)
        grid = Grid(bits, gs, scale, zero)
    return grid


class Constrained(nn.Module):
    """Parametrization: weight → (weight · mask) rounded onto ``grid`` with a straight-through gradient."""

    def __init__(self, mask: torch.Tensor | None, grid: Grid | None, transposed: bool) -> None:
        super().__init__()
        self.register_buffer("mask", mask)
        self.grid = grid
        self.transposed = transposed

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        w = weight.t() if self.transposed else weight
        if self.mask is not None:
            w = w * self.mask
        if self.grid is not None:
            with torch.no_grad():
                q = self.grid.snap(w.detach())
            w = w + (q - w).detach()
        return w.t() if self.transposed else w


def _weights_of(module: nn.Module, transposed: bool) -> list[tuple[nn.Module, bool]]:
    """Give the modules holding a linear's weight(s): itself, or both factors of a low-rank pair."""
    if isinstance(module, nn.Sequential):
        return [(m, False) for m in module]
    return [(module, transposed)]


def kept_linears(model: nn.Module, anatomy: ModelAnatomy, plan: Plan) -> list[tuple[str, LayerChoice, bool]]:
    """Give (module path in the compressed model, the plan's choice, transposed) for every kept linear."""
    bpath = block_path(model)
    kept = [b for b in anatomy.blocks if b.index not in set(plan.drop_blocks)]
    out = []
    for j, blk in enumerate(kept):
        for site in blk.linears:
            path = f"{bpath}.{j}{site.name[len(blk.prefix) :]}"
            out.append((path, plan.choice_for(site.name), site.transposed))
    return out


def constrain(model: nn.Module, anatomy: ModelAnatomy, plan: Plan) -> list[nn.Module]:
    """Freeze all but the blocks and parametrize every compressed weight; give the parametrized modules."""
    bpath = block_path(model)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(bpath + "."))
    touched = []
    for path, choice, transposed in kept_linears(model, anatomy, plan):
        if not (choice.pruned or choice.quantized):
            continue
        for mod, tr in _weights_of(model.get_submodule(path), transposed):
            w = mod.weight.detach()
            w = w.t() if tr else w
            mask = (w != 0).to(w.dtype) if choice.pruned else None
            grid = grid_from_values(w, choice.bits, choice.group_size, choice.symmetric) if choice.quantized else None
            parametrize.register_parametrization(mod, "weight", Constrained(mask, grid, tr))
            touched.append(mod)
    return touched


def release(touched: list[nn.Module]) -> None:
    """Bake the constrained weights in (masked, on their grid) and drop the parametrizations."""
    for mod in touched:
        parametrize.remove_parametrizations(mod, "weight", leave_parametrized=True)
