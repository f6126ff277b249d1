"""Calibration Hessians H = Σ_tokens x xᵀ at every linear's input, from the uncompressed model.

GPTQ needs the full matrix; SVD-LLM whitening its Cholesky factor. Linears that read the same
tensor (q/k/v, gate/up, BERT's query/key/value) share one matrix, so the default model needs four
per block (≈ 400 MB in float32). They are collected once per (model hash, calibration data hash),
kept in a process-wide registry and on disk as safetensors under
``~/.cache/autocompress/hessians/`` (written to a temporary name, then renamed), and loaded from
disk lazily, one matrix at a time.

``apply_plan_to`` finds them by the plan's ``provenance.data_hash``; ``calibration_hessians``
(called once, e.g. by the workbench) is what collects and registers them.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from autocompress.calib import run_with_hooks

if TYPE_CHECKING:
    from autocompress.calib import TokenData
    from autocompress.model.anatomy import LinearSite, ModelAnatomy

SHARED_INPUT_ROLES = (("q", "k", "v", "qkv"), ("gate", "up", "fc1"))


def input_key(site: LinearSite) -> str:
    """Give the name of the Hessian a linear reads: the block's shared input, or the linear itself."""
    for roles in SHARED_INPUT_ROLES:
        if site.role in roles:
            return f"{site.block}.{roles[0]}-in"
    return site.name


class Hessians:
    """Per-linear input Hessians of one base model on one calibration set (float32 [in, in])."""

    def __init__(
        self,
        model_hash: str,
        data_hash: str,
        keys: dict[str, str],
        tensors: dict[str, torch.Tensor] | None = None,
        path: Path | None = None,
    ) -> None:
        self.model_hash, self.data_hash = model_hash, data_hash
        self._keys = keys  # linear name -> tensor key
        self._tensors = dict(tensors or {})
        self._path = path

    def __contains__(self, name: str) -> bool:
        return name in self._keys

    def get(self, name: str) -> torch.Tensor:
        """Give H for the input of linear ``name`` (loaded from disk on first use)."""
        key = self._keys[name]
        h = self._tensors.get(key)
        if h is None:
            from safetensors import safe_open

            with safe_open(str(self._path), framework="pt") as f:
                h = f.get_tensor(key)
            self._tensors[key] = h
        return h


def collect_hessians(
    model: nn.Module, anatomy: ModelAnatomy, tokens: torch.Tensor, batch_size: int = 4
) -> dict[str, torch.Tensor]:
    """Run the calibration tokens once and give {input key: Σ x xᵀ} (one per distinct linear input)."""
    sums: dict[str, torch.Tensor] = {}
    handles = []

    def hook(key: str):
        def fn(_m: nn.Module, args: tuple, _out: Any) -> None:
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            xtx = x.t() @ x
            sums[key] = sums[key].add_(xtx) if key in sums else xtx

        return fn

    seen: set[str] = set()
    for site in anatomy.linears:
        key = input_key(site)
        if key not in seen:  # one hook per distinct input: the others read the same tensor
            seen.add(key)
            handles.append(model.get_submodule(site.name).register_forward_hook(hook(key)))
    run_with_hooks(model, tokens, handles, batch_size)
    return sums


_REGISTRY: dict[tuple[str, str], Hessians] = {}


def _path(model_hash: str, data_hash: str) -> Path:
    from autocompress.model.loading import cache_dir

    return cache_dir() / "hessians" / f"{model_hash[:16]}-{data_hash[:16]}.safetensors"


def _keys(anatomy: ModelAnatomy) -> dict[str, str]:
    return {site.name: input_key(site) for site in anatomy.linears}


def find_hessians(anatomy: ModelAnatomy, data_hash: str | None) -> Hessians | None:
    """Give the Hessians of this model on this data if collected before (this process or on disk), else None."""
    if data_hash is None:
        return None
    found = _REGISTRY.get((anatomy.model_hash, data_hash))
    if found is None:
        path = _path(anatomy.model_hash, data_hash)
        if path.is_file():
            found = _REGISTRY[(anatomy.model_hash, data_hash)] = Hessians(
                anatomy.model_hash, data_hash, _keys(anatomy), path=path
            )
    return found


def calibration_hessians(model: nn.Module, anatomy: ModelAnatomy, data: TokenData, use_cache: bool = True) -> Hessians:
    """Give the Hessians of ``model`` on ``data.calib``: from memory, disk, or collected now (then cached)."""
    found = find_hessians(anatomy, data.data_hash) if use_cache else None
    if found is not None:
        return found
    tensors = collect_hessians(model, anatomy, data.calib)
    path = None
    if use_cache:
        path = _path(anatomy.model_hash, data.data_hash)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        try:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
            os.replace(tmp, path)
        except OSError:
            Path(tmp).unlink(missing_ok=True)
            path = None
    found = Hessians(anatomy.model_hash, data.data_hash, _keys(anatomy), tensors, path)
    _REGISTRY[(anatomy.model_hash, data.data_hash)] = found
    return found


def register_hessians(hessians: Hessians) -> None:
    """Make ``hessians`` the ones ``apply_plan_to`` finds for their (model hash, data hash)."""
    _REGISTRY[(hessians.model_hash, hessians.data_hash)] = hessians
