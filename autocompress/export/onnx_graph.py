"""The two ONNX graphs a model is written as (``autocompress.export.onnx`` quantizes them to the plan).

- ``write_decoder``: the decoder with a KV cache, by ``torch.onnx.export(dynamo=True)`` around a
  ``DynamicCache`` built from flat tensors: inputs ``input_ids``, ``attention_mask`` (past + new),
  ``position_ids``, ``past_key_values.{i}.key`` / ``.value``; outputs last-position ``logits`` and
  ``present.{i}.key`` / ``.value``. Each block's cache shape is read off one cached forward, so pruned
  heads and dropped blocks need nothing special.
- ``write_forward``: ``forward(input_ids, attention_mask) -> logits`` without a cache (TorchScript
  exporter): encoders, and the graphs the profile calibration times.

Both wrap the model as the attribute ``model``: node names and scopes read ``model.<module path>``.
"""

from __future__ import annotations

import inspect
import logging
import warnings
from pathlib import Path

import torch
from torch import nn


class _LogitsOnly(nn.Module):
    def __init__(self, model: nn.Module, causal: bool) -> None:
        super().__init__()
        self.model = model
        self.causal = causal

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.causal:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=1)
        else:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        return out.logits


class _DecoderWithCache(nn.Module):
    """``forward(input_ids, attention_mask, position_ids, past)`` -> (last-position logits, *present),
    ``past`` / ``present`` flat as [key_0, value_0, key_1, ...] (what the ONNX graph's inputs become)."""

    def __init__(self, model: nn.Module, blocks: int) -> None:
        super().__init__()
        self.model = model
        self.blocks = blocks

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        past: list[torch.Tensor],
    ) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(self.blocks)])
        kwargs = {_cache_kwarg(self.model): cache}
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            logits_to_keep=1,
            **kwargs,
        )
        present = [t for layer in _cache_of(out).layers for t in (layer.keys, layer.values)]
        return (out.logits, *present)


def _cache_kwarg(model: nn.Module) -> str:
    """Give the name of the forward's cache argument (``cache`` from transformers 5.25, ``past_key_values`` before)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_of(out: object) -> object:
    """Give the cache a forward returned (``cache`` or, before transformers 5.25, ``past_key_values``)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def cache_names(blocks: int) -> tuple[list[str], list[str]]:
    """Give the (past input, present output) names of a decoder with ``blocks`` blocks, key before value."""
    past = [f"past_key_values.{i}.{kv}" for i in range(blocks) for kv in ("key", "value")]
    return past, [name.replace("past_key_values", "present") for name in past]


def cache_shapes(model: nn.Module) -> tuple[tuple[int, int], ...]:
    """Give (kv_heads, head_dim) of each block's cache, read off one cached forward (pruned heads included)."""
    with torch.no_grad():
        out = model(input_ids=torch.ones((1, 2), dtype=torch.long), use_cache=True)
    return tuple((int(layer.keys.shape[1]), int(layer.keys.shape[3])) for layer in _cache_of(out).layers)


def write_decoder(model: nn.Module, path: Path, opset: int) -> tuple[tuple[int, int], ...]:
    """Write ``model`` as the KV-cache decoder graph at ``path``; give its cache shapes."""
    shapes = cache_shapes(model)
    wrapper = _DecoderWithCache(model, len(shapes))
    batch, seq, past_len = 2, 3, 5  # example sizes, all distinct so no axis is specialised
    ids = torch.ones((batch, seq), dtype=torch.long)
    mask = torch.ones((batch, past_len + seq), dtype=torch.long)
    pos = torch.arange(past_len, past_len + seq).expand(batch, seq)
    past = [torch.zeros(batch, h, past_len, d) for h, d in shapes for _ in ("key", "value")]
    b, s, p, t = (torch.export.Dim(n) for n in ("batch", "seq", "past", "total"))
    dynamic = {
        "input_ids": {0: b, 1: s},
        "attention_mask": {0: b, 1: t},
        "position_ids": {0: b, 1: s},
        "past": [{0: b, 2: p}] * len(past),
    }
    past_names, present_names = cache_names(len(shapes))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)  # the exporter logs optional packages (torchvision) it skips
        try:
            torch.onnx.export(
                wrapper,
                (ids, mask, pos, past),
                str(path),
                dynamo=True,
                opset_version=opset,
                dynamic_shapes=dynamic,
                input_names=["input_ids", "attention_mask", "position_ids", *past_names],
                output_names=["logits", *present_names],
                verbose=False,
            )
        finally:
            logging.disable(logging.NOTSET)
    return shapes


def write_forward(model: nn.Module, causal: bool, path: Path, opset: int) -> None:
    """Write ``model`` as ``forward(input_ids, attention_mask) -> logits`` (no cache) at ``path``."""
    ids = torch.ones((2, 8), dtype=torch.long)
    axes = {0: "batch", 1: "seq"}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about HF's shape-dependent Python branches
        torch.onnx.export(
            _LogitsOnly(model, causal),
            (ids, torch.ones_like(ids)),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=["input_ids", "attention_mask"],
            output_names=["logits"],
            dynamic_axes={"input_ids": axes, "attention_mask": axes, "logits": {0: "batch"}},
        )


def conv1d_to_linear(model: nn.Module) -> nn.Module:
    """Replace every HF GPT-2 ``Conv1D`` (weight in x out) by an equivalent ``nn.Linear``, in place."""
    from transformers.pytorch_utils import Conv1D

    for name, mod in list(model.named_modules()):
        if isinstance(mod, Conv1D):
            in_f, out_f = mod.weight.shape
            lin = nn.Linear(in_f, out_f, bias=mod.bias is not None)
            with torch.no_grad():
                lin.weight.copy_(mod.weight.t())
                if mod.bias is not None:
                    lin.bias.copy_(mod.bias)
            model.set_submodule(name, lin)
    return model
