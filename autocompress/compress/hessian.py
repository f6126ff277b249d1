"""Calibration Hessians H = Σ_tokens x xᵀ at every linear's input, from the uncompressed model.

GPTQ needs the full matrix; SVD-LLM whitening its Cholesky factor. Linears that read the same
tensor (q/k/v, gate/up, BERT's query/key/value) share one matrix, so a Llama-family block needs
four. They are collected block by block (``calib.run_blockwise``: the calibration batches go
through block i, its Hessians are finished and written out, then block i+1), so collecting holds
one block's matrices and one block's activations, never the whole set. They are kept per
(model hash, calibration data hash) on disk as one safetensors file per block under
``~/.cache/autocompress/hessians/<model>-<data>/`` (written into a temporary folder, renamed when
complete) and read back one matrix at a time, with only the last few kept in memory: peak memory
while compressing is one block's matrices, not the model's.

``calibration_hessians`` collects them (or finds them on disk); its caller keeps the result (the
workbench holds its own: ``Workbench.hessians()``) and passes it to ``apply_plan_to``, which
otherwise looks for them on disk by the plan's ``provenance.data_hash``. Nothing is kept per process.
Collection runs on the device of the model's weights (the matrices accumulate there, in float32)
and each finished block goes to disk (or CPU memory), so the device holds one block's.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from autocompress._io import follow_umask
from autocompress.calib import run_blockwise
from autocompress.device import cache_tag

if TYPE_CHECKING:
    from autocompress.calib import TokenData
    from autocompress.model.anatomy import LinearSite, ModelAnatomy

SHARED_INPUT_ROLES = (("q", "k", "v", "qkv"), ("gate", "up", "gate_up", "fc1"))
KEEP_LOADED = 4  # Hessians read from disk and kept in memory (a Llama-family block has four)
COMPLETE = "complete"  # marker file: every block was written


def input_key(site: LinearSite) -> str:
    """Give the name of the Hessian a linear reads: the block's shared input, or the linear itself."""
    for roles in SHARED_INPUT_ROLES:
        if site.role in roles:
            return f"{site.block}.{roles[0]}-in"
    return site.name


class Hessians:
    """Per-linear input Hessians of one base model on one calibration set (float32 [in, in]).

    Held in memory (``tensors``), or on disk (``path``: a folder of ``block-<i>.safetensors``, or
    one safetensors file as written before block-wise collection) and loaded one at a time, the
    last ``keep`` loaded ones kept.
    """

    def __init__(
        self,
        model_hash: str,
        data_hash: str,
        keys: dict[str, str],
        tensors: dict[str, torch.Tensor] | None = None,
        path: Path | None = None,
        keep: int = KEEP_LOADED,
        files: dict[str, str] | None = None,
    ) -> None:
        self.model_hash, self.data_hash = model_hash, data_hash
        self._keys = keys  # linear name -> tensor key
        self._tensors = dict(tensors or {})
        self._path = path
        self._loaded: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._keep = keep
        self._files = files or {}  # tensor key -> its file in the per-block folder

    def __contains__(self, name: str) -> bool:
        return name in self._keys

    def get(self, name: str) -> torch.Tensor:
        """Give H for the input of linear ``name`` (loaded from disk on first use)."""
        key = self._keys[name]
        h = self._tensors.get(key)
        if h is not None:
            return h
        h = self._loaded.get(key)
        if h is None:
            from safetensors import safe_open

            path = self._path if self._path.is_file() else self._path / self._files[key]
            with safe_open(str(path), framework="pt") as f:
                h = f.get_tensor(key)
            self._loaded[key] = h
            while len(self._loaded) > self._keep:
                self._loaded.popitem(last=False)
        self._loaded.move_to_end(key)
        return h


def collect_hessians(
    model: nn.Module,
    anatomy: ModelAnatomy,
    tokens: torch.Tensor,
    batch_size: int = 4,
    block_done: Callable[[dict[str, torch.Tensor]], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Run the calibration tokens through the model block by block and give {input key: Σ x xᵀ}
    (one per distinct linear input). With ``block_done``, each block's matrices are handed to it
    when the block is finished and not kept (the result is then empty)."""
    sums: dict[str, torch.Tensor] = {}

    def hook(key: str):
        def fn(_m: nn.Module, args: tuple, _out: Any) -> None:
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            xtx = x.t() @ x
            sums[key] = sums[key].add_(xtx) if key in sums else xtx

        return fn

    def hooks_for(blk: Any) -> list:
        handles, seen = [], set()
        for site in blk.linears:
            key = input_key(site)
            if key not in seen:  # one hook per distinct input: the others read the same tensor
                seen.add(key)
                handles.append(model.get_submodule(site.name).register_forward_hook(hook(key)))
        return handles

    def done(blk: Any) -> None:
        if block_done is not None:
            keys = {input_key(s) for s in blk.linears}
            block_done({k: sums.pop(k) for k in sorted(keys) if k in sums})

    run_blockwise(model, anatomy, tokens, hooks_for, done, batch_size)
    return sums


def _path(model_hash: str, data_hash: str, tag: str = "") -> Path:
    """Give the folder of per-block files (the single file of earlier versions has this name + .safetensors);
    ``tag``: ``device.cache_tag`` of the model that computes them (bf16 Hessians are kept apart)."""
    from autocompress.model.loading import cache_dir

    return cache_dir() / "hessians" / f"{model_hash[:16]}-{data_hash[:16]}{tag}"


def _keys(anatomy: ModelAnatomy) -> dict[str, str]:
    return {site.name: input_key(site) for site in anatomy.linears}


def _files(anatomy: ModelAnatomy) -> dict[str, str]:
    """Give {tensor key: its file in the per-block folder}."""
    return {input_key(site): f"block-{site.block}.safetensors" for site in anatomy.linears}


def find_hessians(anatomy: ModelAnatomy, data_hash: str | None, tag: str = "") -> Hessians | None:
    """Give the Hessians of this model on this data if collected before into the disk cache, else None
    (``tag``: ``device.cache_tag`` of the model they were computed with)."""
    if data_hash is None:
        return None
    folder = _path(anatomy.model_hash, data_hash, tag)
    single = folder.with_name(folder.name + ".safetensors")
    path = folder if (folder / COMPLETE).is_file() else single if single.is_file() else None
    if path is None:
        return None
    return Hessians(anatomy.model_hash, data_hash, _keys(anatomy), path=path, files=_files(anatomy))


def calibration_hessians(model: nn.Module, anatomy: ModelAnatomy, data: TokenData, use_cache: bool = True) -> Hessians:
    """Give the Hessians of ``model`` on ``data.calib``: from disk, or collected now (then cached on disk).

    With the cache, each block's matrices go to disk as the block finishes (memory holds one
    block's); without it, all are kept in (CPU) memory. The caller keeps the result.
    """
    found = find_hessians(anatomy, data.data_hash, cache_tag(model)) if use_cache else None
    if found is not None:
        return found
    keys = _keys(anatomy)
    if not use_cache:
        tensors = {k: v.cpu() for k, v in collect_hessians(model, anatomy, data.calib).items()}
        return Hessians(anatomy.model_hash, data.data_hash, keys, tensors)
    return _collect_to_disk(model, anatomy, data, keys)


def _collect_to_disk(model: nn.Module, anatomy: ModelAnatomy, data: TokenData, keys: dict[str, str]) -> Hessians:
    """Collect block by block into a temporary folder, renamed to the cache's name when complete."""
    from safetensors.torch import save_file

    folder = _path(anatomy.model_hash, data.data_hash, cache_tag(model))
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-", suffix=".tmp"))
    files = _files(anatomy)
    kept: dict[str, torch.Tensor] = {}

    def write(block: dict[str, torch.Tensor]) -> None:
        names = {files[k] for k in block}
        if len(names) == 1:
            save_file({k: v.cpu().contiguous() for k, v in block.items()}, str(tmp / names.pop()))
        else:  # not a single block's (cannot happen with block keys): kept in memory, not guessed
            kept.update({k: v.cpu() for k, v in block.items()})

    try:
        kept.update({k: v.cpu() for k, v in collect_hessians(model, anatomy, data.calib, block_done=write).items()})
        (tmp / COMPLETE).write_text("")
        if folder.exists():
            shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
        follow_umask(folder)  # mkdtemp made it private
    except BaseException:  # nothing half-written stays behind (an error, Ctrl-C)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Hessians(anatomy.model_hash, data.data_hash, keys, kept or None, path=folder, files=files)
