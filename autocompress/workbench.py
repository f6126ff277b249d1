"""The Workbench: a loaded base model with its data and activation statistics, ready to
apply plans. Search, apply and evaluate all start from one.

It owns what applying plans keeps between calls: its variant cache (compressed linears, bounded in
bytes) and its calibration Hessians, so two workbenches never see each other's results (a model
edited in place gets a workbench of its own), and the device everything computes on.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autocompress._version import __version__
from autocompress.calib import ActivationStats, DataConfig, TokenData, activation_stats, load_token_data
from autocompress.compress.hessian import Hessians, calibration_hessians
from autocompress.compress.variants import VariantCache
from autocompress.device import cache_tag, place, resolve_device
from autocompress.errors import PlanError
from autocompress.model.loading import LoadedModel, load_model
from autocompress.plan import Plan, Provenance


def library_versions() -> dict[str, str]:
    """Give the versions of the libraries that shape the weights and the study."""
    import optuna
    import transformers

    return {
        "autocompress": str(__version__),
        "torch": str(torch.__version__),
        "transformers": str(transformers.__version__),
        "optuna": str(optuna.__version__),
    }


def _set_threads() -> None:
    n = int(os.environ.get("AUTOCOMPRESS_THREADS", "0")) or (os.cpu_count() or 1)
    torch.set_num_threads(n)


@dataclass
class Workbench:
    """Base model + tokenised data + activation statistics (computed once, cached on disk), the
    device they live on, and the workbench's own variant cache and calibration Hessians."""

    lm: LoadedModel
    data: TokenData
    data_config: DataConfig
    stats: ActivationStats
    numerics: str = "exact"  # the target runtime's activation rounding, emulated when evaluating
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # where each linear is compressed: the CPU on every device (the format registry's code makes its
    # tensors there), in float32, so compressing the same weights gives the same variants everywhere
    compress_device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    variants: VariantCache = field(default_factory=VariantCache.from_env)
    _hessians: Hessians | None = field(default=None, repr=False)

    def hessians(self) -> Hessians:
        """Give the calibration Hessians of the base model on this data (collected once, then kept)."""
        if self._hessians is None:
            self._hessians = calibration_hessians(self.lm.model, self.lm.anatomy, self.data)
        return self._hessians

    def eval_cache(self) -> Any:
        """Give the cache of evaluation results for this data and these numerics."""
        from autocompress.evaluate.cache import EvalCache

        return EvalCache(self.data.data_hash, numerics=self.numerics, device_tag=cache_tag(self.lm.model))

    def evaluating(self, plan: Plan, model: nn.Module) -> contextlib.AbstractContextManager[nn.Module]:
        """Give a context in which ``model`` (``plan`` applied) computes as the target runtime does."""
        from autocompress.compress.numerics import emulated

        return emulated(model, self.lm.anatomy, plan, self.numerics)

    @classmethod
    def open(
        cls,
        model: str | Path | None = None,
        data: DataConfig | None = None,
        *,
        trust_remote_code: bool = False,
        log: Any = None,
        device: str | torch.device | None = "auto",
        cache_bytes: int | None = None,
        model_on_cpu: bool = False,
    ) -> Workbench:
        """Load the model and data and gather activation statistics (from cache when possible).

        ``device``: auto | cpu | cuda | cuda:N (auto: a CUDA GPU when present); on a GPU the model is
        held and run in bf16, on the CPU in float32. ``model_on_cpu``: the model stays on the CPU in
        float32 whatever ``device`` says (checked all the same): what the exporters need, as they
        write the model as loaded, and the same files on every machine.
        ``cache_bytes`` bounds the variant cache (default ``$AUTOCOMPRESS_VARIANT_CACHE_BYTES``,
        else 1.5 GB).
        """
        dev = resolve_device(device)  # a bad device fails before anything heavy is loaded
        dev = torch.device("cpu") if model_on_cpu else dev
        _set_threads()
        say = log or (lambda _msg: None)
        data = data or DataConfig()
        say(f"loading model {model or 'default'}")
        lm = load_model(model, trust_remote_code=trust_remote_code)
        if dev.type != "cpu" and not model_on_cpu:
            say(f"moving the model to {dev} (bf16)")
            place(lm.model, dev)
        say(f"tokenising data ({data.source or 'bundled Wikipedia leads'})")
        tokens = (lm.task_data or load_token_data)(lm.tokenizer, data)  # task models bring their own data
        say(f"activation statistics on {tokens.num_calib_tokens} calibration tokens")
        stats = activation_stats(lm.model, lm.anatomy, tokens)
        variants = VariantCache.from_env()
        if cache_bytes is not None:
            variants.set_limit(cache_bytes)
        return cls(lm=lm, data=tokens, data_config=data, stats=stats, device=dev, variants=variants)

    @classmethod
    def for_plan(
        cls,
        plan: Plan,
        model: str | Path | None = None,
        log: Any = None,
        device: str | torch.device | None = "auto",
        model_on_cpu: bool = False,
    ) -> Workbench:
        """Open the workbench a plan was made with (its model and data settings), on ``device`` (see ``open``)."""
        cfg = _data_config_from(plan)
        wb = cls.open(model or plan.model.name, cfg, log=log, device=device, model_on_cpu=model_on_cpu)
        if plan.provenance.data_hash and plan.provenance.data_hash != wb.data.data_hash:
            raise PlanError(
                f"plan was calibrated on data {plan.provenance.data_hash[:12]}, but the data here hashes to "
                f"{wb.data.data_hash[:12]} (source {wb.data.source}); use the same data and token budgets"
            )
        return wb

    def provenance(self, seed: int = 0, **extra: Any) -> Provenance:
        return Provenance(
            data_hash=self.data.data_hash,
            data={k: v for k, v in asdict(self.data_config).items() if v is not None},
            seed=seed,
            versions=library_versions(),
            **extra,
        )

    def apply(
        self,
        plan: Plan,
        into: nn.Module | None = None,
        *,
        skip_recovery: bool = False,
        stored: dict | None = None,
        share_base: bool = False,
        gptq: Any = None,
    ) -> nn.Module:
        """Give a compressed copy of the base model (the base is left untouched), or compress
        ``into`` in place — a copy of the base model whose touched parts are its own.

        ``share_base``: the copy shares every tensor the plan leaves unchanged with the base model
        (only the changed weights are the copy's own), so a trial costs the changed linears, not a
        copy of the model; for evaluating only — training or editing that copy in place would edit
        the base. Weights are identical either way.

        The distillation a plan may record (``plan.recovery``) is not replayed here: the caller
        replays it (``autocompress.recover.rebuild(wb, plan)`` does both), so the workbench needs
        nothing of the later stages. A plan with recovery is refused unless ``skip_recovery`` says
        the caller wants the compressed model before its recovery. ``stored`` (a dict) receives every
        quantized tensor as its format stores it (codes and scales), for the packed exporters.
        ``gptq`` (a ``GPTQSettings``) replaces the settings every plan is applied with, for experiments.
        """
        if plan.recovery is not None and not skip_recovery:
            raise PlanError(
                "this plan records a recovery (distillation after compression): rebuild it with "
                "autocompress.recover.rebuild(wb, plan), or pass skip_recovery=True for the model before it"
            )
        from autocompress.compress.apply import apply_plan_to, needs_hessians

        torch.manual_seed(plan.provenance.seed)
        # GPTQ / SVD-LLM need X^T X of the calibration data: collected once, then cached on disk.
        hessians = self.hessians() if needs_hessians(plan) else None
        common = {"hessians": hessians, "stored": stored, "cache": self.variants, "device": self.compress_device}
        if gptq is not None:
            common["gptq"] = gptq
        if into is not None:
            return apply_plan_to(into, self.lm.anatomy, plan, self.stats, inplace=True, **common)
        return apply_plan_to(self.lm.model, self.lm.anatomy, plan, self.stats, share_base=share_base, **common)

    def apply_with_codes(self, plan: Plan) -> tuple[nn.Module, dict]:
        """Give the compressed model and every quantized tensor as its format stores it (codes and
        scales): what the packed exporters (GGUF, compressed-tensors) write."""
        stored: dict = {}
        return self.apply(plan, stored=stored), stored


def _data_config_from(plan: Plan) -> DataConfig:
    d = dict(plan.provenance.data)
    allowed = set(DataConfig.__dataclass_fields__)
    unknown = set(d) - allowed
    if unknown:
        raise PlanError(f"plan.provenance.data: unknown field(s) {sorted(unknown)}")
    try:
        return DataConfig(**d)
    except TypeError as exc:
        raise PlanError(f"plan.provenance.data: {exc}") from None
