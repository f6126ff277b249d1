"""Open a finished study from its folder (no model loaded) and export its trials.

``open_study`` reads the Optuna storage, the stored anatomy and the plans, like ``retarget``.
``export_trials`` rebuilds each chosen plan once on one Workbench and writes, per trial, one folder
that is at the same time an HF model folder and an ONNX deployment (``model.onnx``), with
``export.json`` recording the formats, what could not be represented, the ONNX-vs-PyTorch check
and the measured-vs-predicted latency.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autocompress._io import atomic_dir, atomic_write_text
from autocompress.errors import StudyError
from autocompress.export import verify
from autocompress.model.anatomy import ModelAnatomy
from autocompress.plan import Plan
from autocompress.recover import rebuild
from autocompress.search.front import spread
from autocompress.search.result import Candidate, SearchResult


@dataclass
class StudyView:
    """A finished study as stored: settings, anatomy, evaluated candidates, front and every trial."""

    name: str
    dir: Path
    storage: str
    settings: dict[str, Any]
    user_attrs: dict[str, Any]
    anatomy: ModelAnatomy
    candidates: list[Candidate]
    front: list[Candidate]
    baselines: dict[str, Candidate]
    trials: list[Any] = field(default_factory=list)  # optuna FrozenTrials, all states

    def candidate(self, trial: int) -> Candidate:
        for c in self.candidates:
            if c.trial == trial:
                return c
        known = ", ".join(str(c.trial) for c in self.candidates[:20])
        raise StudyError(f"study {self.name!r} has no evaluated trial {trial} (evaluated: {known})")

    @property
    def profile(self) -> str:
        return str(self.settings.get("profile", "?"))


def open_study(study: str, out: str | Path = "studies", storage: str | None = None) -> StudyView:
    """Give the stored state of study ``study`` in ``out/<study>/`` (or ``storage``)."""

    from autocompress.search.budget import Budget
    from autocompress.search.engine import candidates_of, front_and_baselines, load_finished_study

    opt, study_dir, url, settings = load_finished_study(study, out, storage)
    anatomy = ModelAnatomy.from_dict(settings["anatomy"])
    cands = candidates_of(opt, study_dir, anatomy)
    if not cands:
        raise StudyError(f"study {study!r} has no evaluated trial with a plan in {study_dir / 'plans'}")
    front, baselines = front_and_baselines(cands, Budget(**settings.get("budgets", {})))
    return StudyView(
        name=study,
        dir=study_dir,
        storage=url,
        settings=settings,
        user_attrs=dict(opt.user_attrs),
        anatomy=anatomy,
        candidates=cands,
        front=front,
        baselines=baselines,
        trials=opt.get_trials(deepcopy=False),
    )


def workbench_for(view: StudyView, plan: Plan, log: Callable[[str], None] | None = None, device: str | None = "cpu"):
    """Give the Workbench the study's plans were made with (its model and data): the model on the CPU
    as loaded, whatever ``device`` says (the exporters write it as loaded; the files are the same on
    every machine)."""
    from autocompress.workbench import Workbench

    model = (view.settings.get("run") or {}).get("model")
    name = None if model in (None, "default") else model
    return Workbench.for_plan(plan, name, log=log, device=device, model_on_cpu=True)


def export_trials(
    view: StudyView,
    trials: list[int],
    out: str | Path,
    *,
    onnx: bool = True,
    gguf: bool = False,
    compressed_tensors: bool = False,
    hw: str = "local",
    threads: int | None = None,
    log: Callable[[str], None] | None = None,
    device: str | None = "auto",
) -> list[dict[str, Any]]:
    """Export each trial to ``out/trial-<N>/`` (HF folder + ``model.onnx`` + ``export.json``); give the records.

    ``device``: auto | cpu | cuda | cuda:N, checked; the model, the exports and their checks stay on
    the CPU in float32 (the same files on every machine).

    With ONNX, the uncompressed model is exported and measured too (``out/baseline.json``), so
    every record says whether the point is measured faster than the base model. ``out/exports.json``
    and ``out/README.md`` index the whole set. ``compressed_tensors``: also ``trial-<N>/compressed-tensors/``,
    the packed checkpoint vLLM loads (for the plans that format can hold; the record says why not).
    """
    from autocompress.export.compressed_tensors import compressed_tensors_blockers, trial_record

    say = log or (lambda _m: None)
    out = Path(out)
    cands = [view.candidate(t) for t in trials]
    wb = workbench_for(view, cands[0].plan, log=say, device=device)
    pred = verify.Predictor.for_hw(hw, view.anatomy)
    threads = threads or pred.threads
    base = None
    if onnx:
        say("exporting and measuring the uncompressed model (the baseline every point is compared with)")
        base = verify.baseline_record(wb, view.anatomy, pred, out, threads)
        atomic_write_text(out / "baseline.json", json.dumps(base, indent=2) + "\n")
    records = []
    for c in cands:
        t0 = time.time()
        say(f"trial {c.trial}: rebuilding the plan ({c.description})")
        stored: dict[str, Any] | None = None
        packed = compressed_tensors and not compressed_tensors_blockers(c.plan, view.anatomy)
        if (gguf or packed) and c.plan.recovery is None:  # one application feeds every file
            model, stored = wb.apply_with_codes(c.plan)
        else:
            model = rebuild(wb, c.plan)
        with atomic_dir(out / f"trial-{c.trial}") as tmp:
            rec = verify.export_point(
                model, wb, view, c, tmp, pred, onnx=onnx, gguf=gguf, threads=threads, base=base, stored=stored
            )
            if compressed_tensors:
                rec["compressed_tensors"] = trial_record(model, wb, c.plan, stored, tmp)
            rec["seconds"] = round(time.time() - t0, 1)
            atomic_write_text(tmp / "export.json", json.dumps(rec, indent=2, default=str) + "\n")
            atomic_write_text(tmp / "README.md", verify.point_readme(rec))
        records.append(rec)
        g = rec.get("gguf")
        if g:
            say(
                f"trial {c.trial}: model.gguf {g['file_bytes'] / 1e6:.1f} MB read back exactly; llama-perplexity "
                f"{g['llamacpp']['ppl_llamacpp']:.3f} vs ours {g['llamacpp']['ppl_ours']:.3f}; llama-bench decode "
                f"{g['latency']['measured_decode_ms']:.2f} ms/token"
                + (
                    f" (predicted {g['latency']['predicted_decode_ms']:.2f})"
                    if "predicted_decode_ms" in g["latency"]
                    else ""
                )
            )
        m = rec.get("latency", {})
        if m:
            say(
                f"trial {c.trial}: ONNX check {'passed' if rec['onnx']['check']['passed'] else 'FAILED'}, "
                f"decode {m['measured_decode_ms']:.3g} ms measured vs {m['predicted_decode_ms']:.3g} predicted"
                + (f" — {verify.ROUNDING_WARNING}" if rec["onnx"]["runtime_rounding"].get("runtime_dominates") else "")
            )
        del model
    index = {"study": view.name, "profile_for_prediction": pred.describe(), "baseline": base, "exports": records}
    atomic_write_text(out / "exports.json", json.dumps(index, indent=2, default=str) + "\n")
    atomic_write_text(out / "README.md", verify.index_markdown(index))
    return records


def verify_front(
    study_dir_or_result: str | Path | SearchResult, k: int, log: Callable[[str], None] | None = None
) -> list[dict[str, Any]]:
    """Export K front points (spread along the latency axis) to the runtime's file, check and measure
    them here: GGUF by llama.cpp (llama-perplexity, llama-bench) for a llama.cpp study where its
    tools are built, else ONNX by onnxruntime.

    Writes ``verify.json`` and ``verify.md`` in the study folder and gives one record per point
    (``slower_than_uncompressed`` flags "compressed but not faster"). The files are temporary;
    ``autocompress export`` keeps them.
    """
    say = log or (lambda _m: None)
    if isinstance(study_dir_or_result, (str, Path)):
        study_dir = Path(study_dir_or_result)
        stored = study_dir / "storage.txt"
        storage = stored.read_text().strip() if stored.is_file() else None
        view = open_study(study_dir.name, study_dir.parent, storage)
    else:
        r = study_dir_or_result
        view = open_study(r.study_name, Path(r.study_dir).parent, r.storage)
    if k < 1 or not view.front:
        return []
    if _runs_gguf(view):
        from autocompress.export.gguf import gguf_blockers

        writable = [
            c for c in view.front if c.plan.recovery is None and not gguf_blockers(c.plan, view.anatomy.architecture)
        ]
        if writable:
            return _verify_gguf(view, spread(writable, k), say)
        say("verify: no front point can be written as GGUF (low-rank, sparsity or recovery); checking ONNX instead")
    points = spread(view.front, k)
    pred = verify.Predictor.for_hw("local", view.anatomy)
    if pred.note:
        say(pred.note)
    wb = workbench_for(view, points[0].plan, log=say)
    records = []
    with tempfile.TemporaryDirectory(dir=view.dir, prefix=".verify.") as tmp:
        say(f"verify: exporting and measuring the uncompressed model ({pred.threads} thread(s))")
        base = verify.baseline_record(wb, view.anatomy, pred, Path(tmp), pred.threads)
        for c in points:
            folder = Path(tmp) / f"trial-{c.trial}"
            folder.mkdir()
            rec = verify.export_point(
                rebuild(wb, c.plan), wb, view, c, folder, pred, hf=False, threads=pred.threads, base=base
            )
            lat = rec["latency"]
            say(
                f"verify trial {c.trial}: decode {lat['measured_decode_ms']:.3g} ms measured, "
                f"{lat['predicted_decode_ms']:.3g} predicted ({lat['speedup_vs_uncompressed']:.2f}x vs uncompressed)"
                + (" — SLOWER than uncompressed" if lat["slower_than_uncompressed"] else "")
                + (f" — {verify.ROUNDING_WARNING}" if rec["onnx"]["runtime_rounding"].get("runtime_dominates") else "")
            )
            records.append(rec)
    index = {"study": view.name, "profile_for_prediction": pred.describe(), "baseline": base, "exports": records}
    atomic_write_text(view.dir / "verify.json", json.dumps(index, indent=2, default=str) + "\n")
    atomic_write_text(view.dir / "verify.md", verify.index_markdown(index))
    return records


def _runs_gguf(view: StudyView) -> bool:
    """True for a study whose profile's runtime is llama.cpp, with llama.cpp's tools built here."""
    from autocompress.errors import ProfileError
    from autocompress.hardware.profile import load_profile
    from autocompress.runtime import llamacpp

    try:
        runtime = load_profile(view.profile).runtime
    except ProfileError:
        return False
    return runtime == "llama.cpp" and llamacpp.find() is not None


def _verify_gguf(view: StudyView, points: list[Candidate], say: Callable[[str], None]) -> list[dict[str, Any]]:
    """verify_front for a llama.cpp study: each point (GGUF-writable) as GGUF, run and measured by
    llama.cpp, beside the uncompressed model's GGUF measured the same way."""
    from autocompress.export.gguf import export_gguf
    from autocompress.plan import ModelRef

    wb = workbench_for(view, points[0].plan, log=say)
    pred = verify.Predictor.for_hw("local", view.anatomy)  # its note sends GGUF predictions to local-llamacpp
    records = []
    with tempfile.TemporaryDirectory(dir=view.dir, prefix=".verify.") as tmp:
        say("verify: writing and measuring the uncompressed model as GGUF (llama-bench)")
        plain = Plan(model=ModelRef.of(view.anatomy), layers={}, provenance=wb.provenance())
        export_gguf(wb, plain, Path(tmp) / "base.gguf")
        base = verify.gguf_latency(Path(tmp) / "base.gguf", plain, view.anatomy)
        for c in points:
            folder = Path(tmp) / f"trial-{c.trial}"
            folder.mkdir()
            model, stored = wb.apply_with_codes(c.plan)
            rec = verify.export_point(
                model,
                wb,
                view,
                c,
                folder,
                pred,
                onnx=False,
                hf=False,
                gguf=True,
                stored=stored,
            )
            lat = rec["latency"] = rec["gguf"]["latency"]  # where ONNX records keep theirs
            lat["speedup_vs_uncompressed"] = base["measured_decode_ms"] / lat["measured_decode_ms"]
            lat["slower_than_uncompressed"] = verify.slower_than(lat["measured_decode_ms"], base["measured_decode_ms"])
            say(
                f"verify trial {c.trial}: llama-bench decode {lat['measured_decode_ms']:.3g} ms"
                + (f", {lat['predicted_decode_ms']:.3g} predicted" if "predicted_decode_ms" in lat else "")
                + f" ({lat['speedup_vs_uncompressed']:.2f}x vs uncompressed)"
                + (" — SLOWER than uncompressed" if lat["slower_than_uncompressed"] else "")
            )
            records.append(rec)
    index = {"study": view.name, "gguf_baseline": base, "exports": records}
    atomic_write_text(view.dir / "verify.json", json.dumps(index, indent=2, default=str) + "\n")
    atomic_write_text(view.dir / "verify.md", verify.index_markdown(index))
    return records
