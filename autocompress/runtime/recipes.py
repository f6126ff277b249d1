"""llama.cpp's own quantization recipes (``llama-quantize Q4_K_M`` ...) as plans: what users download.

A recipe is a fixed per-tensor rule (more bits for attn_v / ffn_down in some layers, the tied
embedding at Q6_K or Q8_0, llama.cpp's shape fallbacks). Rather than re-implementing the rules,
``recipe_plan`` runs ``llama-quantize`` on the base model written as an F32 GGUF, reads back the
type llama.cpp gave each tensor (``gguf.GGUFReader``) and returns the plan that stores every tensor
in that type, so recipes stand on the same front and are judged by the same evaluator as searched
plans. With ``imatrix=True`` the file is quantized with an importance matrix made by
``llama-imatrix`` from our calibration split, and the plan uses our ``imatrix`` quantizer (Σx² of
each linear's input on the same split); llama.cpp's shape fallbacks are in the file, so the plan has
them too.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf

from autocompress._io import atomic_write_text
from autocompress.errors import AutocompressError
from autocompress.plan import LayerChoice, ModelRef, Plan
from autocompress.runtime import llamacpp

RECIPES = ("Q8_0", "Q6_K", "Q5_K_M", "Q5_0", "Q4_K_M", "Q4_K_S", "Q4_1", "Q4_0", "IQ4_NL", "Q3_K_M", "Q2_K")
HOLDS_BASE_GRID = ("Q4_1",)  # the bundled base's own grid: lossless on it, so no conclusion rests on it
_ROLE_OF = {"attn_q": "q", "attn_k": "k", "attn_v": "v", "attn_output": "o", "ffn_gate": "gate", "ffn_up": "up"}
_ROLE_OF["ffn_down"] = "down"
CACHE = Path.home() / ".cache" / "autocompress" / "recipes"  # recipe_types' per-model tensor types
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


class RecipeError(AutocompressError):
    """A recipe is unknown or its file cannot be read back into a plan."""


def tensor_types(path: Path) -> dict[str, str]:
    """Give the GGML type name of every tensor in a GGUF file."""
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


def plan_from_types(types: dict[str, str], wb: Any, *, method: str = "rtn", name: str = "") -> Plan:
    """Give the plan storing each block linear and the embedding / head in the type a GGUF file gives it.

    Only full-depth, full-width files of the workbench's model are read (the recipes' files).
    """
    a = wb.lm.anatomy
    sites = {(s.block, s.role): s for s in a.linears}
    embed = next(e for e in a.embeddings if e.role == "embed")
    head = next((e for e in a.embeddings if e.role == "head" and not e.tied), None)
    layers: dict[str, LayerChoice] = {}
    for tensor, type_name in types.items():
        m = _BLOCK.fullmatch(tensor)
        if m and m.group(2) in _ROLE_OF:
            site = sites.get((int(m.group(1)), _ROLE_OF[m.group(2)]))
            if site is None:
                raise RecipeError(f"{name or 'file'}: tensor {tensor} has no linear in {a.name}")
            key, quant = site.name, method
        elif tensor == "token_embd.weight":
            key, quant = embed.name, "rtn"  # tables take rtn only (plan rule)
        elif tensor == "output.weight" and head is not None:
            key, quant = head.name, "rtn"
        else:
            continue  # norms: F32 in every recipe
        if type_name in ("F32", "F16", "BF16"):
            continue  # dense: the plan's default
        layers[key] = LayerChoice(format=type_name, quant_method=quant)
    missing = [s.name for s in a.linears if s.name not in layers]
    if len(missing) == len(a.linears):
        raise RecipeError(f"{name or 'file'}: no quantized block linear found")
    return Plan(model=ModelRef.of(a), layers=layers, provenance=wb.provenance())


def covers(architecture: str) -> bool:
    """Whether recipes can be read for a model family: they are read by quantizing our GGUF export
    of the base, which covers the families llama.cpp's llama / deci graphs run unchanged."""
    from autocompress.export.gguf import MODEL_TYPES

    return architecture in MODEL_TYPES


def write_base(wb: Any, path: Path) -> Path:
    """Write the uncompressed model as an F32 GGUF (the input llama-quantize re-quantizes from)."""
    from autocompress.export.gguf import export_gguf

    plan = Plan(model=ModelRef.of(wb.lm.anatomy), layers={}, provenance=wb.provenance())
    export_gguf(wb, plan, path, dense="F32")
    return path


def imatrix(wb: Any, base: Path, out: Path, *, ctx: int = 256, chunks: int = 64, threads: int = 2) -> Path:
    """Make llama.cpp's importance matrix for ``base`` from our calibration split (never the evaluation text)."""
    from autocompress.calib import calibration_text

    with tempfile.TemporaryDirectory(prefix="autocompress-imatrix-") as tmp:
        text = Path(tmp) / "calib.txt"
        text.write_text(calibration_text(wb.data_config))
        args = ["-m", base, "-f", text, "-o", out, "-c", ctx, "--chunks", chunks, "-t", threads, "--no-ppl"]
        llamacpp.require().run("llama-imatrix", args, what="making the importance matrix")
    if not out.is_file():
        raise RecipeError(f"llama-imatrix wrote no {out}")
    return out


def quantize(base: Path, recipe: str, out: Path, *, imatrix_file: Path | None = None, threads: int = 2) -> Path:
    """Run ``llama-quantize`` with one of llama.cpp's recipes; give the file."""
    if recipe not in RECIPES:
        raise RecipeError(f"unknown recipe {recipe!r}; known: {', '.join(RECIPES)}")
    args: list[Any] = ["--imatrix", imatrix_file] if imatrix_file is not None else []
    llamacpp.require().run("llama-quantize", [*args, base, out, recipe, threads], what=f"for {recipe}")
    return out


def recipe_plans(
    wb: Any,
    work: Path,
    recipes: tuple[str, ...] = RECIPES,
    *,
    with_imatrix: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, tuple[Plan, Path]]:
    """Give, per recipe (and ``<recipe>+imatrix``), the plan read back from llama-quantize's file and the file.

    Files are written into ``work`` and reused when present (the base F32 GGUF too).
    """
    say = log or (lambda _m: None)
    work.mkdir(parents=True, exist_ok=True)
    base = work / "base-f32.gguf"
    if not base.is_file():
        say(f"writing the base model as {base}")
        write_base(wb, base)
    imat = None
    if with_imatrix:
        imat = work / "imatrix.gguf"
        if not imat.is_file():
            say("making llama.cpp's importance matrix from the calibration split")
            imatrix(wb, base, imat)
    out: dict[str, tuple[Plan, Path]] = {}
    for recipe in recipes:
        for im in (None, imat) if with_imatrix else (None,):
            label = recipe + ("+imatrix" if im is not None else "")
            path = work / f"{label}.gguf"
            if not path.is_file():
                say(f"llama-quantize {label}")
                quantize(base, recipe, path, imatrix_file=im)
            plan = plan_from_types(tensor_types(path), wb, method="imatrix" if im else "rtn", name=label)
            out[label] = (plan, path)
    return out


def recipe_types(
    wb: Any,
    recipes: tuple[str, ...] = RECIPES,
    *,
    cache: Path | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, dict[str, str]]:
    """Give, per recipe, the GGML type llama-quantize gives each tensor of the workbench's model.

    The types depend only on the model's tensor shapes and the recipe (not on an imatrix or on the
    weights), so they are kept per model hash and llama.cpp commit in ``cache`` (one small JSON
    file); the first call writes the base as an F32 GGUF into a temporary folder and quantizes it
    once per recipe (about two minutes for the bundled model), then removes the files.
    """
    say = log or (lambda _m: None)
    cache = cache or CACHE
    path = cache / f"{wb.lm.anatomy.model_hash[:16]}-{llamacpp.LLAMA_CPP_COMMIT}.json"
    known: dict[str, dict[str, str]] = json.loads(path.read_text()) if path.is_file() else {}
    missing = [r for r in recipes if r not in known]
    if missing:
        llamacpp.require()
        with tempfile.TemporaryDirectory(prefix="autocompress-recipes-") as tmp:
            base = Path(tmp) / "base-f32.gguf"
            say(f"reading llama.cpp's recipes {', '.join(missing)} (once per model): writing the base as F32 GGUF")
            write_base(wb, base)
            for recipe in missing:
                out = quantize(base, recipe, Path(tmp) / f"{recipe}.gguf")
                known[recipe] = tensor_types(out)
                out.unlink()
        cache.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(known, indent=1, sort_keys=True) + "\n")
    return {r: known[r] for r in recipes}
