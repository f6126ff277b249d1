"""The ``autocompress`` command: a thin typer app over the public API."""

from __future__ import annotations

import json
import math
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import click
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from autocompress._io import check_writable
from autocompress.errors import AutocompressError, ProfileError
from autocompress.progress import LineProgress

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Search jointly over per-layer compression (bits, sparsity, low-rank, width, depth) for a target device.",
)
hw_app = typer.Typer(no_args_is_help=True, help="Hardware profiles: list and inspect.")
app.add_typer(hw_app, name="hw")
llamacpp_app = typer.Typer(no_args_is_help=True, help="llama.cpp's own tools: build them once, show where they are.")
app.add_typer(llamacpp_app, name="llamacpp")
console = Console(width=None if sys.stdout.isatty() else 140)
err_console = Console(stderr=True)


@dataclass
class _UI:
    """The global output options of this invocation (set by ``_options`` for every command)."""

    json: bool = False
    quiet: bool = False
    verbose: bool = False
    started: float = 0.0


ui = _UI()

# --device on every command that loads the model (the text is autocompress.device.DEVICE_HELP's; not imported
# here so that `autocompress --help` does not import torch).
DeviceOption = Annotated[
    str,
    typer.Option(help="Where to compute: auto (a CUDA GPU when present, else the CPU) | cpu | cuda | cuda:N"),
]


def _device(spec: str) -> str:
    """Give ``spec`` checked (a bad or absent device is a one-line error, exit 2), as given."""
    from autocompress.device import resolve_device

    resolve_device(spec)
    return spec


@app.callback(
    epilog=(
        "Examples:\n\n"
        "autocompress search --hw jetson --trials 40\n\n"
        "autocompress --json hw show rpi            # one JSON object on stdout\n\n"
        "autocompress --quiet apply plan.yaml --out model/\n\n"
        "autocompress search --help                 # every option, then examples"
    )
)
def _options(
    json_out: Annotated[
        bool,
        typer.Option("--json", help="Print the result as one JSON object on stdout (notes and progress go to stderr)"),
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only results: no progress bars or notes")] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Time-stamp every step and show library warnings")
    ] = False,
) -> None:
    if quiet and verbose:
        raise AutocompressError("--quiet and --verbose exclude each other")
    ui.json, ui.quiet, ui.verbose, ui.started = json_out, quiet, verbose, time.time()
    console.quiet = json_out  # results become the JSON object printed by main()
    warnings.filterwarnings("default" if verbose else "ignore", message=".*experimental feature")


def _notes() -> Console:
    """Where notes and progress go: stderr when stdout carries JSON."""
    return err_console if ui.json else console


def _log(msg: str) -> None:
    if ui.quiet:
        return
    stamp = f"{time.time() - ui.started:7.1f}s " if ui.verbose else ""
    _notes().print(f"[dim]{stamp}· {escape(msg)}[/dim]", highlight=False)


def _progress() -> Progress | LineProgress:
    """A progress display with elapsed time and ETA (hidden with --quiet); a line every 30 s of a
    long task where the output is not a terminal (rich draws nothing live there)."""
    if not _notes().is_terminal:
        return LineProgress(say=_log)
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=_notes(),
        disable=ui.quiet,
    )


def _examples(*lines: str) -> str:
    """Format the examples shown at the end of a command's --help."""
    return "Examples:\n\n" + "\n\n".join(lines)


def _plain(value: Any) -> Any:
    """Make a value JSON-safe: paths as strings, NaN/inf as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _print_json(data: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(_plain(data), indent=2, default=str) + "\n")
    sys.stdout.flush()


def _data_config(data: Path | None, calib_tokens: int, eval_tokens: int, proxy_tokens: int, seq_len: int):
    from autocompress.calib import DataConfig

    return DataConfig(
        source=str(data) if data else None,
        seq_len=seq_len,
        calib_tokens=calib_tokens,
        proxy_tokens=proxy_tokens,
        eval_tokens=eval_tokens,
    )


@app.command(
    epilog=_examples(
        "autocompress search --hw jetson              # default model and space",
        "autocompress search --hw rpi --budget latency_ms=25 --study pi",
        "autocompress search --model path/to/hf-folder --data my.jsonl --hw cpu",
        "autocompress search --model tiny-llama --trials 12 --seq-len 64  # a minute",
        "autocompress --json search --hw jetson --trials 20 > front.json",
    )
)
def search(
    model: Annotated[
        str | None, typer.Option(help="HF model folder, 'default' (SmolLM2-135M) or tiny-llama/tiny-gpt2/tiny-bert")
    ] = None,
    hw: Annotated[str, typer.Option(help="Hardware profile id or alias (see `autocompress hw list`)")] = "jetson",
    space: Annotated[str, typer.Option(help="Search space name (search_spaces/) or YAML path")] = "default",
    budget: Annotated[list[str] | None, typer.Option(help="KEY=VALUE, e.g. latency_ms=40 (repeatable)")] = None,
    trials: Annotated[int | None, typer.Option(help="Evaluated trials the study should hold [default: 60]")] = None,
    timeout: Annotated[
        float | None,
        typer.Option(
            help="Start no new trial this many seconds after the first (set-up not counted) "
            "[default: none with --trials, else 540]"
        ),
    ] = None,
    study: Annotated[str | None, typer.Option(help="Study name [default: <space>-<profile>]")] = None,
    storage: Annotated[
        str | None, typer.Option(help="Optuna storage URL or journal .log path [default: SQLite in the study folder]")
    ] = None,
    out: Annotated[Path, typer.Option(help="Folder that holds study folders")] = Path("studies"),
    seed: Annotated[int, typer.Option(help="Seed of the sampler (stored in every plan)")] = 0,
    sampler: Annotated[
        str, typer.Option(help="nsga2 | tpe (multivariate) | gp (Optuna GPSampler; slow on big spaces) | random | evo")
    ] = "nsga2",
    data: Annotated[
        Path | None,
        typer.Option(help="Text: .txt, folder of .txt, or .jsonl with 'text' [default: bundled Wikipedia leads]"),
    ] = None,
    calib_tokens: Annotated[int, typer.Option(help="Calibration tokens")] = 4096,
    proxy_tokens: Annotated[int, typer.Option(help="Held-out tokens for the KL proxy")] = 1024,
    eval_tokens: Annotated[int, typer.Option(help="Held-out tokens for perplexity")] = 4096,
    seq_len: Annotated[int, typer.Option(help="Sequence length")] = 256,
    full_eval: Annotated[int, typer.Option(help="Front points that get the full metric (perplexity)")] = 8,
    jobs: Annotated[int, typer.Option(help="Worker processes on this machine sharing the study")] = 1,
    recover: Annotated[
        int, typer.Option(help="At the end, distil K front points (spread along latency) and add them to the study")
    ] = 0,
    recover_tokens: Annotated[int | None, typer.Option(help="Recovery token budget per model [default: 65536]")] = None,
    recover_minutes: Annotated[float | None, typer.Option(help="Recovery time budget per model, in minutes")] = None,
    verify: Annotated[
        int,
        typer.Option(
            help="At the end, export K front points to the runtime's file (GGUF for llama.cpp, else ONNX), "
            "measure them here, flag any slower than uncompressed"
        ),
    ] = 0,
    device: DeviceOption = "auto",
    seeds: Annotated[
        int | None,
        typer.Option(
            "--seeds",
            help="Evaluate at most N seed plans first (uncompressed, recipes, knapsack, uniform, mixed, spread "
            "along each), so a short run leaves trials to the sampler [default: all]",
        ),
    ] = None,
) -> dict[str, Any]:
    """Search for Pareto-optimal compressed variants and print the front."""
    from autocompress.search import Budget
    from autocompress.search import search as run_search
    from autocompress.search.engine import DEFAULT_TIMEOUT_S, DEFAULT_TRIALS

    _device(device)
    budgets = Budget.parse(budget or [])
    if recover < 0 or verify < 0:
        raise AutocompressError("--recover and --verify take a number of front points (0 or more)")
    if recover:
        from autocompress.recover import RecoverySettings

        settings = RecoverySettings(tokens=recover_tokens, minutes=recover_minutes)  # checked before searching
    cfg = _data_config(data, calib_tokens, eval_tokens, proxy_tokens, seq_len)
    if timeout is None and trials is None:  # a trial count asked for is a trial count evaluated
        timeout = DEFAULT_TIMEOUT_S
    trials = DEFAULT_TRIALS if trials is None else trials
    with _progress() as progress:
        result = run_search(
            model=model,
            hw=hw,
            budgets=budgets,
            space=space,
            trials=trials,
            timeout=timeout,
            study=study,
            storage=storage,
            out=out,
            seed=seed,
            data=cfg,
            sampler=sampler,
            full_eval=full_eval,
            jobs=jobs,
            log=_log,
            progress=progress,
            device=device,
            max_seeds=seeds,
        )
    _print_front(result)
    summary = result.to_dict()
    if recover:
        from autocompress.search.engine import spread

        chosen = [
            c.trial
            for c in spread(
                [c for c in result.pareto if not c.plan.is_uncompressed and c.plan.recovery is None], recover
            )
        ]
        summary["recovered"] = (
            _run_recovery(result.study_name, chosen, settings, out, storage, device) if chosen else []
        )
    if verify:
        from autocompress.export.study import verify_front
        from autocompress.export.verify import gguf_table, latency_table

        records = verify_front(result, verify, _log)
        table = gguf_table if records and all(r.get("gguf") for r in records) else latency_table
        console.print(table(records), markup=False, highlight=False)
        slow = [r["trial"] for r in records if (r.get("latency") or {}).get("slower_than_uncompressed")]
        if slow:
            console.print(f"[yellow]warning:[/yellow] measured slower than the uncompressed model here: trials {slow}")
        summary["verify"] = records
    return summary


def _print_front(result) -> None:
    from autocompress.search.report import front_rows, headers_for

    base = result.base_metrics
    table = Table(title=f"Pareto front — study {result.study_name} on {result.profile}", show_lines=False)
    for h in headers_for(base):
        table.add_column(h, overflow="fold", min_width=24) if h == "plan" else table.add_column(h, no_wrap=True)
    for row in front_rows(result.pareto):
        table.add_row(*row)
    console.print(table)
    ppl = base.get("ppl")
    console.print(
        f"uncompressed: latency {base['latency_ms']:.3g} ms/token, memory {base['memory_mb']:.4g} MB"
        + (f", ppl {ppl:.4g}" if ppl else "")
        + (f", accuracy {base['accuracy']:.4g}" if "accuracy" in base else "")
    )
    from autocompress.search.report import agreement_lines

    for line in agreement_lines(result.agreement):
        console.print(line.replace("**", ""), markup=False, highlight=False)
    from autocompress.search.report import counts_line

    console.print(
        f"{counts_line(result.counts)} · {result.elapsed_s:.0f} s (set-up {result.setup_s:.0f} s) · outputs in {result.study_dir}/ "
        "(summary.md, pareto.json, plans/)"
    )


@app.command(
    epilog=_examples(
        "autocompress worker --study demo --storage postgresql://host/db",
        "autocompress worker --study demo --storage studies/demo/study.log --index 2",
    )
)
def worker(
    study: Annotated[str, typer.Option(help="Name of the study to join")],
    storage: Annotated[str, typer.Option(help="The study's Optuna storage URL or journal .log path")],
    out: Annotated[Path, typer.Option(help="Folder that holds study folders (plans are written there)")] = Path(
        "studies"
    ),
    trials: Annotated[int | None, typer.Option(help="Stop when the study holds this many evaluated trials")] = None,
    deadline: Annotated[float | None, typer.Option(help="Unix time after which no new trial starts")] = None,
    index: Annotated[int, typer.Option(help="Worker number (varies the sampler seed)")] = 0,
    device: DeviceOption = "auto",
) -> dict[str, Any]:
    """Join a running study and evaluate trials (from this or another machine)."""
    from autocompress.search.worker import run_worker

    _device(device)
    n = run_worker(study, storage, out=out, trials=trials, deadline=deadline, index=index, log=_log, device=device)
    console.print(f"worker {index}: {n} trials evaluated")
    return {"worker": index, "study": study, "evaluated": n}


@app.command(
    epilog=_examples(
        "autocompress retarget --study demo --hw rpi",
        "autocompress retarget --study demo --hw nvidia-t4 --budget latency_ms=2",
    )
)
def retarget(
    study: Annotated[str, typer.Option(help="Name of a finished study")],
    hw: Annotated[str, typer.Option(help="Hardware profile to price its plans on")],
    out: Annotated[Path, typer.Option(help="Folder that holds study folders")] = Path("studies"),
    storage: Annotated[str | None, typer.Option(help="Optuna storage URL or journal .log path")] = None,
    budget: Annotated[list[str] | None, typer.Option(help="KEY=VALUE budgets on the new target (repeatable)")] = None,
) -> dict[str, Any]:
    """Price every evaluated plan of a study on another device and print that front (no re-evaluation)."""
    from autocompress.search import Budget
    from autocompress.search.retarget import retarget as run_retarget

    result = run_retarget(study, hw, out=out, storage=storage, budgets=Budget.parse(budget or []))
    _print_front(result)
    return result.to_dict()


@app.command(
    epilog=_examples(
        "autocompress recover --study demo --pareto --recover-tokens 65536",
        "autocompress recover --study demo --trial 3 --recover-minutes 2",
    )
)
def recover(
    study: Annotated[str, typer.Option(help="Name of a finished study")],
    trial: Annotated[list[int] | None, typer.Option(help="Trial number to recover (repeatable)")] = None,
    pareto: Annotated[bool, typer.Option("--pareto", help="Recover every point of the Pareto front")] = False,
    recover_tokens: Annotated[
        int | None, typer.Option(help="Token budget per model [default: 65536 when no --recover-minutes]")
    ] = None,
    recover_minutes: Annotated[float | None, typer.Option(help="Training-time budget per model, in minutes")] = None,
    temperature: Annotated[float, typer.Option(help="Distillation temperature")] = 1.0,
    hidden_weight: Annotated[float, typer.Option(help="Weight of hidden-state matching on kept blocks")] = 0.0,
    lr: Annotated[float, typer.Option(help="Learning rate (constant after warm-up)")] = 1e-4,
    seed: Annotated[int, typer.Option(help="Seed of the batch order (recorded in the plan)")] = 0,
    out: Annotated[Path, typer.Option(help="Folder that holds study folders")] = Path("studies"),
    storage: Annotated[str | None, typer.Option(help="Optuna storage URL or journal .log path")] = None,
    device: DeviceOption = "auto",
) -> dict[str, Any]:
    """Distil the base model into compressed trials; add each result to the study and rewrite its front."""
    from autocompress.recover import RecoverySettings

    _device(device)
    if pareto == bool(trial):
        raise AutocompressError("give either --trial N (repeatable) or --pareto")
    settings = RecoverySettings(
        tokens=recover_tokens,
        minutes=recover_minutes,
        temperature=temperature,
        hidden_weight=hidden_weight,
        lr=lr,
        seed=seed,
    )
    return {
        "study": study,
        "recovered": _run_recovery(study, "pareto" if pareto else list(trial or []), settings, out, storage, device),
    }


def _run_recovery(
    study: str, trials: list[int] | str, settings: Any, out: Path, storage: str | None, device: str = "auto"
) -> list[dict]:
    """Recover trials of a study with a progress bar, print before/after, give the records."""
    from autocompress.recover.study import recover_trials

    with _progress() as progress:
        task = progress.add_task("recovery", total=None)

        def on_step(info, _model) -> None:
            progress.update(task, completed=info.step, total=info.total, description=f"recovery (KL {info.loss:.4f})")

        done = recover_trials(study, trials, out, settings, _log, storage, on_step, device=device)
    table = Table(title=f"recovered trials — study {study}")
    metric = next((k for r in done for k in ("ppl", "accuracy") if k in (r.full_after or {})), None)
    for col in ("trial", "from", "steps", "KL before", "KL after", f"{metric} before", f"{metric} after"):
        table.add_column(col, justify="right")
    for r in done:
        full = [f"{d[metric]:.4g}" if d and metric in d else "-" for d in (r.full_before, r.full_after)]
        table.add_row(
            str(r.trial), str(r.recovered_from), str(r.steps), f"{r.kl_before:.4g}", f"{r.kl_after:.4g}", *full
        )
    console.print(table)
    console.print(f"front rewritten: {out / study}/summary.md, pareto.json; plans in {out / study}/plans/")
    return [{**{k: v for k, v in vars(r).items() if k != "plan"}, "plan_hash": r.plan.hash()} for r in done]


@app.command(
    epilog=_examples(
        "autocompress apply studies/demo/plans/2.yaml --out my-int4-model",
        "autocompress --json apply plan.yaml --out model/ | jq -r .weight_hash",
        "autocompress apply plan.yaml --out model-ct/ --format compressed-tensors   # packed, for vLLM",
    )
)
def apply(
    plan: Annotated[Path, typer.Argument(help="plan.yaml from a study")],
    out: Annotated[Path, typer.Option(help="Folder to write the compressed HF model into")],
    model: Annotated[str | None, typer.Option(help="Base model [default: the one named in the plan]")] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Accept a plan file edited by hand (its header checksum no longer matches)")
    ] = False,
    fmt: Annotated[
        str,
        typer.Option(
            "--format",
            help="hf: weights in the base dtype; compressed-tensors: quantized linears packed (the folder vLLM loads)",
        ),
    ] = "hf",
    device: DeviceOption = "auto",
) -> dict[str, Any]:
    """Rebuild a compressed model from its plan, write it as an HF folder and print its weight hash."""
    from autocompress.export import export_hf, plain_transformers_blockers
    from autocompress.plan import Plan
    from autocompress.recover import rebuild
    from autocompress.workbench import Workbench

    _device(device)
    if fmt not in ("hf", "compressed-tensors"):
        raise AutocompressError(f"unknown --format {fmt!r}; known: hf, compressed-tensors")
    p = Plan.load(plan, force=force)
    if out.is_dir() and any(out.iterdir()) and not (out / "plan.yaml").is_file():
        raise AutocompressError(f"output folder {out} is not empty and was not written by autocompress")
    check_writable(out, AutocompressError)  # before the model is loaded
    wb = Workbench.for_plan(p, model, log=_log, device=device, model_on_cpu=True)  # written as loaded
    if fmt == "compressed-tensors":
        from autocompress.export.compressed_tensors import export_compressed_tensors

        rec = export_compressed_tensors(wb, p, out)  # refused in one line before anything is written
        console.print(f"wrote {out}/ (plan {p.hash()[:16]}; {rec['file_bytes'] / 1e6:.1f} MB, compressed-tensors)")
        console.print(f"load with: {rec['load_with']}", markup=False, highlight=False)
        console.print(f"weight hash: {rec['weight_hash']}")
        return {"out": out, "plan_hash": p.hash(), "weight_hash": rec["weight_hash"], "compressed_tensors": rec}
    compressed = rebuild(wb, p)
    weight_hash = export_hf(compressed, p, out, wb.lm.tokenizer)
    console.print(f"wrote {out}/ (plan {p.hash()[:16]})")
    console.print(f"weight hash: {weight_hash}")
    blockers = plain_transformers_blockers(p, compressed)
    if blockers:
        console.print(
            f"[yellow]note:[/yellow] plain transformers cannot load this folder ({'; '.join(blockers)}); "
            "rebuild it with autocompress.apply_plan(plan)"
        )
    return {"out": out, "plan_hash": p.hash(), "weight_hash": weight_hash, "plain_transformers_blockers": blockers}


@app.command(
    epilog=_examples(
        "autocompress evaluate                                      # the base model",
        "autocompress evaluate studies/demo/plans/2.yaml --hw jetson",
    )
)
def evaluate(
    plan: Annotated[Path | None, typer.Argument(help="plan.yaml (omit to score the base model)")] = None,
    model: Annotated[str | None, typer.Option(help="Base model [default: the plan's, else the default model]")] = None,
    hw: Annotated[str | None, typer.Option(help="Also print the predicted cost on this profile")] = None,
    data: Annotated[
        Path | None, typer.Option(help="Text file/folder/.jsonl [default: bundled Wikipedia leads]")
    ] = None,
    eval_tokens: Annotated[int, typer.Option(help="Held-out tokens for perplexity")] = 4096,
    force: Annotated[
        bool, typer.Option("--force", help="Accept a plan file edited by hand (its header checksum no longer matches)")
    ] = False,
    device: DeviceOption = "auto",
) -> dict[str, Any]:
    """Score a plan (or the base model): KL to base, top-1 agreement, perplexity, bits per character."""
    from autocompress.evaluate import Evaluator
    from autocompress.plan import Plan
    from autocompress.recover import rebuild
    from autocompress.workbench import Workbench

    _device(device)
    if plan is not None:
        p = Plan.load(plan, force=force)
        wb = Workbench.for_plan(p, model, log=_log, device=device)
    else:
        p = None
        wb = Workbench.open(model, _data_config(data, 4096, eval_tokens, 1024, 256), log=_log, device=device)
    ev = Evaluator(wb.lm.model, wb.data, wb.lm.anatomy.task)
    m = rebuild(wb, p) if p is not None else wb.lm.model
    fid = ev.proxy(m)
    table = Table(title=f"quality of {plan or 'the base model'}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("KL to base (nats/token)", f"{fid.kl:.4g}")
    table.add_row("top-1 agreement", f"{fid.top1_agreement:.4f}")
    data: dict[str, Any] = {"plan": plan, "kl": fid.kl, "top1_agreement": fid.top1_agreement}
    full = ev.full(m)
    if full is not None:
        data["full"] = {k: v for k, v in vars(full).items() if isinstance(v, (int, float, str))}
    if full is not None and hasattr(full, "ppl"):
        table.add_row(f"perplexity ({full.tokens} tokens)", f"{full.ppl:.4g}")
        table.add_row("bits per character", f"{full.bpc:.4g}")
    elif full is not None:  # a classifier: its labelled evaluation articles
        table.add_row(f"accuracy ({full.n} articles)", f"{full.accuracy:.4f}")
        table.add_row("macro-F1", f"{full.macro_f1:.4f}")
        table.add_row("expected calibration error", f"{full.ece:.4f}")
        table.add_row("top-1 agreement with the base model", f"{full.top1_agreement:.4f}")
    if hw:
        from autocompress.hardware import CostModel, load_profile
        from autocompress.plan import ModelRef

        a = wb.lm.anatomy
        cp = p or Plan(model=ModelRef.of(a))
        cost = CostModel(load_profile(hw), a).predict(cp)
        for k, v in cost.to_dict().items():
            table.add_row(f"{k} on {hw}", f"{v:.4g}" if isinstance(v, float) else str(v))
        data["cost"] = {"profile": hw, **cost.to_dict()}
    console.print(table)
    return data


@hw_app.command("list", epilog=_examples("autocompress hw list", "autocompress --json hw list"))
def hw_list() -> dict[str, Any]:
    """List the hardware profiles."""
    from autocompress.hardware import list_profiles

    table = Table(title="hardware profiles")
    table.add_column("id", no_wrap=True)
    for col in ("aliases", "device", "runtime", "bandwidth GB/s", "calibrated"):
        table.add_column(col, overflow="fold")
    profiles = list_profiles()
    for p in profiles:
        table.add_row(
            p.id,
            ", ".join(p.aliases),
            p.display_name,
            str(p.runtime),
            f"{p.peak_bw_GBps:g}",
            "yes" if p.calibrated else "no",
        )
    console.print(table)
    return {"profiles": [p.model_dump(mode="json") for p in profiles]}


@hw_app.command("show", epilog=_examples("autocompress hw show jetson", "autocompress hw show hw_profiles/local.yaml"))
def hw_show(name: Annotated[str, typer.Argument(help="Profile id, alias or YAML path")]) -> dict[str, Any]:
    """Show one hardware profile in full."""
    import yaml

    from autocompress import formats
    from autocompress.hardware import load_profile
    from autocompress.hardware.profile import efficiency_keys

    p = load_profile(name)
    console.print(
        yaml.safe_dump(p.model_dump(mode="json"), sort_keys=False, allow_unicode=True), markup=False, highlight=False
    )
    table = Table(title=f"formats {p.runtime} runs on {p.id}", show_edge=False)
    for col in ("format", "bits/weight", "block", "row width", "bw eff.", "compute eff."):
        table.add_column(col)
    for name in p.format_names:
        f = formats.get(name)
        keys = efficiency_keys(f)
        table.add_row(
            name,
            f"{f.bits_per_weight((1, f.block_size or 256)):.4g}",
            str(f.block_size or "row"),
            f"multiple of {f.block_size}" if f.block_size else "any",
            f"{p.bw_efficiency_for(*keys):.2f}",
            f"{p.compute_efficiency_for(*keys):.2f}",
        )
    console.print(table)
    return {**p.model_dump(mode="json"), "format_names": list(p.format_names)}


@hw_app.command(
    "calibrate",
    epilog=_examples(
        "autocompress hw calibrate --out hw_profiles/local.yaml   # ~30 s",
        "autocompress hw calibrate --out /tmp/me.yaml --threads 4 --repeats 5",
        "autocompress hw calibrate --runtime llama.cpp --out hw_profiles/local-llamacpp.yaml   # a few minutes",
    ),
)
def hw_calibrate(
    out: Annotated[Path, typer.Option(help="Profile to write, e.g. hw_profiles/local.yaml (machine-specific)")],
    threads: Annotated[
        int | None, typer.Option(help="Threads for every measurement (fixed; default 1, llama.cpp: every core)")
    ] = None,
    repeats: Annotated[
        int | None, typer.Option(help="Timed repeats per measurement (median kept; default 9, llama.cpp: 3)")
    ] = None,
    runtime: Annotated[
        str,
        typer.Option(
            help="Runtime to calibrate: onnxruntime (micro-benchmarks) or llama.cpp (llama-bench on GGUF files of --model)"
        ),
    ] = "onnxruntime",
    model: Annotated[
        str | None, typer.Option(help="llama.cpp: the model whose GGUF files are measured (default: the bundled one)")
    ] = None,
    work: Annotated[Path | None, typer.Option(help="llama.cpp: keep the GGUF files here (a rerun reuses them)")] = None,
) -> dict[str, Any]:
    """Measure this machine with onnxruntime CPU micro-benchmarks and write a calibrated profile.

    With --runtime llama.cpp: llama-bench on GGUF files of a model instead, fitted so that the cost model
    predicts each file (profile local-llamacpp)."""
    import os

    from autocompress.calibration.onnx import calibrate_local
    from autocompress.hardware.calibrate import write_profile

    if runtime not in ("onnxruntime", "llama.cpp"):
        raise AutocompressError(f"--runtime must be onnxruntime or llama.cpp, got {runtime!r}")
    llama = runtime == "llama.cpp"
    if not llama and (model is not None or work is not None):
        raise AutocompressError("--model and --work apply to --runtime llama.cpp only")
    threads = threads if threads is not None else ((os.cpu_count() or 1) if llama else 1)
    repeats = repeats if repeats is not None else (3 if llama else 9)
    if threads < 1 or repeats < 1:
        raise AutocompressError("--threads and --repeats must be positive")
    if out.suffix not in (".yaml", ".yml"):
        raise AutocompressError(f"--out must be a .yaml path (e.g. hw_profiles/local.yaml), got {out}")
    check_writable(out.parent, AutocompressError)  # before minutes of measuring
    if llama:
        from autocompress.calibration.llamacpp import calibrate_llamacpp

        profile, raw = calibrate_llamacpp(model, threads=threads, repeats=repeats, work=work, log=_log)
    else:
        profile, raw = calibrate_local(threads=threads, repeats=repeats, log=_log)
    p = write_profile(profile, raw, out)
    c = p.calibration
    aliases = f", aliases {', '.join(p.aliases)}" if p.aliases else ""
    console.print(f"wrote {out} (id {p.id}{aliases}) and {c.measurements} in {c.seconds:.0f} s")
    if llama:
        e = raw["errors"]
        table = Table(
            "file", "role", "MB", "blocks", "decode ms", "predicted", "error", "prefill ms", "predicted", "error"
        )
        for r in raw["files"]:
            table.add_row(
                r["name"],
                r["role"],
                f"{r['file_bytes'] / 1e6:.1f}",
                str(r["blocks"]),
                f"{r['decode_ms']:.3f}",
                f"{r['decode_ms_predicted']:.3f}",
                f"{r['decode_ms_predicted'] / r['decode_ms'] - 1:+.1%}",
                f"{r['prefill_ms']:.2f}",
                f"{r['prefill_ms_predicted']:.2f}",
                f"{r['prefill_ms_predicted'] / r['prefill_ms'] - 1:+.1%}",
            )
        console.print(table)
        console.print(
            f"{len(raw['files'])} GGUF files, {threads} thread(s), median of {repeats}: decode MAPE "
            f"{e['decode_fit_mape']:.1%} fitted, {e['decode_holdout_mape']:.1%} held out; prefill "
            f"{e['prefill_fit_mape']:.1%} / {e['prefill_holdout_mape']:.1%}; per-token overhead "
            f"{p.per_token_overhead_ms:.3f} ms, bandwidth {p.peak_bw_GBps:.1f} GB/s x eff {dict(p.bw_efficiency_by_format)}"
        )
        return {"out": out, "profile": p.model_dump(mode="json"), "errors": e, "files": raw["files"]}
    console.print(
        f"bandwidth {p.peak_bw_GBps:.1f} GB/s x eff {dict(p.bw_efficiency_by_format)}; "
        f"per-linear overhead us {dict(p.linear_overhead_us_by_format)}; "
        f"kernels/block {p.kernels_per_block}, {p.per_kernel_overhead_us:.2f} us each; "
        f"fit error {c.fit_mape:.1%} on {c.samples} timings"
    )
    return {"out": out, "profile": p.model_dump(mode="json")}


@llamacpp_app.command(
    "build", epilog=_examples("autocompress llamacpp build          # once, ~4 min on 2 cores", "make setup")
)
def llamacpp_build(
    force: Annotated[bool, typer.Option("--force", help="Rebuild even if this version is already built")] = False,
) -> dict[str, Any]:
    """Build llama.cpp's tools from the llama-cpp-python sdist into a versioned cache (once)."""
    from autocompress.runtime import llamacpp

    tools = llamacpp.build(force=force, log=_log)
    return {"bin": tools.bin, "source": tools.source, "version": llamacpp.LLAMA_CPP_PYTHON}


@llamacpp_app.command("where", epilog=_examples("autocompress llamacpp where"))
def llamacpp_where() -> dict[str, Any]:
    """Print the folder of the llama.cpp tools autocompress uses (error if none are built)."""
    from autocompress.runtime import llamacpp

    tools = llamacpp.require()
    console.print(str(tools.bin))
    return {"bin": tools.bin, "source": tools.source}


@app.command(
    epilog=_examples(
        "autocompress export --study demo --pareto --out exports/",
        "autocompress export --study demo --trial 2 --no-onnx --out exports/",
        "autocompress export --study g --pareto --out exports/   # llama.cpp study: model.gguf per point",
        "autocompress export --study a100 --trial 5 --format compressed-tensors --out exports/   # vLLM",
    )
)
def export(
    study: Annotated[str, typer.Option(help="Name of a finished study")],
    out: Annotated[Path, typer.Option(help="Folder to write the exports into (one trial-<N>/ per point)")],
    trial: Annotated[list[int] | None, typer.Option(help="Trial number to export (repeatable)")] = None,
    pareto: Annotated[bool, typer.Option("--pareto", help="Export every point of the Pareto front")] = False,
    onnx: Annotated[
        bool | None,
        typer.Option(
            help="Also write model.onnx, check it and measure it here [default: unless the study's runtime is llama.cpp]"
        ),
    ] = None,
    gguf: Annotated[
        bool | None,
        typer.Option(
            help="Also write model.gguf and check it with llama.cpp [default: if the study's runtime is llama.cpp]"
        ),
    ] = None,
    fmt: Annotated[
        list[str] | None,
        typer.Option(
            "--format",
            help="Write these files beside each HF folder (repeatable): onnx, gguf, compressed-tensors (the packed "
            "folder llm-compressor writes and vLLM loads, in trial-<N>/compressed-tensors/) [default: the study runtime's]",
        ),
    ] = None,
    hw: Annotated[str, typer.Option(help="Profile whose prediction the measurement is compared with")] = "local",
    studies: Annotated[Path, typer.Option(help="Folder that holds study folders")] = Path("studies"),
    storage: Annotated[str | None, typer.Option(help="Optuna storage URL or journal .log path")] = None,
    device: DeviceOption = "auto",
) -> dict[str, Any]:
    """Export study trials as HF folders + the runtime's file (GGUF / ONNX / compressed-tensors), checked here."""
    from autocompress.export.study import export_trials, open_study
    from autocompress.export.verify import latency_table
    from autocompress.hardware.profile import load_profile

    _device(device)
    if pareto == bool(trial):
        raise AutocompressError("give either --trial N (repeatable) or --pareto")
    unknown = sorted(set(fmt or ()) - set(EXPORT_FORMATS))
    if unknown:
        raise AutocompressError(f"unknown --format {unknown[0]!r}; known: {', '.join(EXPORT_FORMATS)}")
    if fmt:
        onnx = ("onnx" in fmt) if onnx is None else onnx
        gguf = ("gguf" in fmt) if gguf is None else gguf
    packed = "compressed-tensors" in (fmt or ())
    view = open_study(study, studies, storage)
    try:
        llama = load_profile(view.profile).runtime == "llama.cpp"
    except ProfileError:  # a study made with a profile file that is not here: say which exports to write
        llama = bool(gguf)
        if gguf is None and onnx is None:
            _log(f"the study's profile {view.profile!r} is not here: writing ONNX (--gguf for llama.cpp files)")
    onnx = (not llama) if onnx is None else onnx
    gguf = llama if gguf is None else gguf
    if gguf:
        from autocompress.runtime import llamacpp

        llamacpp.require()  # before minutes of exporting
    numbers = [c.trial for c in view.front] if pareto else list(trial or [])
    if packed:
        _check_compressed_tensors(view, numbers, every=not pareto)  # before the model is loaded
    records = export_trials(
        view, numbers, out, onnx=onnx, gguf=gguf, compressed_tensors=packed, hw=hw, log=_log, device=device
    )
    if onnx:
        console.print(latency_table(records), markup=False, highlight=False)
    for r in records:
        hf = r["hf"]
        how = "plain transformers" if hf["loadable_with_plain_transformers"] else "autocompress.export.load_compressed"
        console.print(f"{out}/trial-{r['trial']}/: loads with {how}", markup=False, highlight=False)
        ct = r.get("compressed_tensors")
        if ct and ct["written"]:
            schemes = ", ".join(f"{k} x{v}" for k, v in ct["schemes"].items()) or "all dense"
            console.print(
                f"{out}/trial-{r['trial']}/{ct['folder']}/: {ct['file_bytes'] / 1e6:.1f} MB packed ({schemes}); "
                + (
                    "loads with transformers + compressed-tensors"
                    if ct["loadable_with_plain_transformers"]
                    else "asymmetric: loads in transformers inside autocompress.export.compressed_tensors."
                    "asymmetric_loading()"
                ),
                markup=False,
                highlight=False,
            )
        elif ct:
            console.print(
                f"trial {r['trial']}: no compressed-tensors folder ({'; '.join(ct['not_written_because'][:3])})",
                markup=False,
                highlight=False,
            )
        if "gguf" in r:
            g = r["gguf"]
            console.print(
                f"{out}/trial-{r['trial']}/model.gguf: {g['file_bytes'] / 1e6:.1f} MB ({g['architecture']}), "
                f"llama-perplexity {g['llamacpp']['ppl_llamacpp']:.3f} vs ours {g['llamacpp']['ppl_ours']:.3f}",
                markup=False,
                highlight=False,
            )
    console.print(f"wrote {out}/exports.json and {out}/README.md")
    return {"out": out, "exports": records}


EXPORT_FORMATS = ("onnx", "gguf", "compressed-tensors")


def _check_compressed_tensors(view: Any, numbers: list[int], every: bool) -> None:
    """Refuse, before anything is written, trials the compressed-tensors format cannot hold: any of
    them when named with --trial, all of them with --pareto (the others are written)."""
    from autocompress.export.compressed_tensors import CompressedTensorsExportError, compressed_tensors_blockers

    blocked = {n: compressed_tensors_blockers(view.candidate(n).plan, view.anatomy) for n in numbers}
    bad = {n: b for n, b in blocked.items() if b}
    if bad and (every or len(bad) == len(blocked)):
        n, why = next(iter(bad.items()))
        more = f" (and {len(bad) - 1} more trial(s))" if len(bad) > 1 else ""
        raise CompressedTensorsExportError(
            f"trial {n} cannot be written as compressed-tensors: {'; '.join(why[:3])}{more}"
        )


@app.command(epilog=_examples("autocompress report --study demo --out report/"))
def report(
    study: Annotated[str, typer.Option(help="Name of a finished study")],
    out: Annotated[Path, typer.Option(help="Folder to write report.md, report.html and figures into")],
    studies: Annotated[Path, typer.Option(help="Folder that holds study folders")] = Path("studies"),
    storage: Annotated[str | None, typer.Option(help="Optuna storage URL or journal .log path")] = None,
) -> dict[str, Any]:
    """Write a study report: front table, Pareto plots, per-layer heatmaps, agreement, reproduce commands."""
    from autocompress.export.study import open_study
    from autocompress.report import write_report

    paths = write_report(open_study(study, studies, storage), out)
    console.print(f"wrote {', '.join(str(p) for p in paths)}")
    return {"written": list(paths)}


@app.command(
    epilog=_examples(
        "autocompress dashboard --study demo           # on 127.0.0.1:8080",
        "autocompress dashboard --storage postgresql://host/db --port 8081",
    )
)
def dashboard(
    study: Annotated[str | None, typer.Option(help="Study name (opens studies/<name>/study.db)")] = None,
    storage: Annotated[str | None, typer.Option(help="Optuna storage URL or journal .log path")] = None,
    out: Annotated[Path, typer.Option(help="Folder that holds study folders")] = Path("studies"),
    host: Annotated[str, typer.Option(help="Interface to bind (local only by default)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port")] = 8080,
) -> None:
    """Open a study in optuna-dashboard (binds 127.0.0.1 unless told otherwise).

    Each trial shows its plan hash, predicted cost on the study's profile (``cost``), the rung it
    reached, its top-1 agreement and, for screened-out trials, the budget it broke.
    """
    import os
    import shutil
    import subprocess

    if storage is None:
        if study is None:
            raise AutocompressError("give --study NAME or --storage URL")
        stored = out / study / "storage.txt"  # a study on another backend (journal file, PostgreSQL)
        db = out / study / "study.db"
        if db.is_file():
            storage = f"sqlite:///{db}"
        elif stored.is_file():
            storage = stored.read_text().strip()
        else:
            raise AutocompressError(f"no study database at {db}")
    if not 0 < port < 65536:
        raise AutocompressError(f"--port must be between 1 and 65535, got {port}")
    exe = Path(sys.executable).with_name("optuna-dashboard")
    found = str(exe) if exe.exists() else shutil.which("optuna-dashboard")
    if found is None:
        raise AutocompressError("optuna-dashboard is not installed (pip install optuna-dashboard)")
    console.print(f"serving {storage} on http://{host}:{port}/dashboard (Ctrl-C to stop)")
    if ui.json:  # the server runs until stopped: say where, before it starts
        _print_json({"storage": storage, "url": f"http://{host}:{port}/dashboard"})
    console.file.flush()
    if os.name == "posix":  # become the server, so stopping this process stops it
        os.execv(found, [found, storage, "--host", host, "--port", str(port)])
    raise SystemExit(subprocess.call([found, storage, "--host", host, "--port", str(port)]))


# typer vendors its own copy of click (typer._click): its usage errors, exits and aborts are not
# click's classes, so both are caught
_USAGE_ERRORS = (click.ClickException, *(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException"))
_EXITS = (click.exceptions.Exit, typer.Exit)
_ABORTS = (KeyboardInterrupt, click.exceptions.Abort, typer.Abort)


def main(argv: list[str] | None = None) -> None:
    """Run the CLI: user mistakes print one line on stderr and exit with code 2."""
    try:
        code = app(args=argv, standalone_mode=False)
    except AutocompressError as exc:
        err_console.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        if ui.json:
            _print_json({"error": str(exc), "exit_code": 2})
        sys.exit(2)
    except _EXITS as exc:
        sys.exit(exc.exit_code)
    except _USAGE_ERRORS as exc:  # a bad option value, a missing parameter: one line too, never a traceback
        err_console.print(f"error: {exc.format_message()}", markup=False, highlight=False, soft_wrap=True)
        if ui.json:
            _print_json({"error": exc.format_message(), "exit_code": 2})
        sys.exit(2)
    except _ABORTS:
        code = 130
    # Outside standalone mode typer turns Ctrl-C into exit code 130 and *returns* exit codes; our commands
    # return their result as a dict (printed as JSON with --json), so a returned int is the exit code.
    if isinstance(code, dict):
        if ui.json:
            _print_json(code)
        return
    if code == 130:
        err_console.print("interrupted: finished trials are kept in the study; run the same command to resume")
    if isinstance(code, int) and code:
        sys.exit(code)


if __name__ == "__main__":
    main()
