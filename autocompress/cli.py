"""The ``autocompress`` command: a thin typer app over the public API."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import click
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from autocompress._io import check_writable
from autocompress.errors import AutocompressError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Search jointly over per-layer compression (bits, sparsity, low-rank, width, depth) for a target device.",
)
hw_app = typer.Typer(no_args_is_help=True, help="Hardware profiles: list and inspect.")
app.add_typer(hw_app, name="hw")
console = Console(width=None if sys.stdout.isatty() else 140)
err_console = Console(stderr=True)


def _log(msg: str) -> None:
    console.print(f"[dim]· {msg}[/dim]")


def _data_config(data: Path | None, calib_tokens: int, eval_tokens: int, proxy_tokens: int, seq_len: int):
    from autocompress.calib import DataConfig

    return DataConfig(
        source=str(data) if data else None,
        seq_len=seq_len,
        calib_tokens=calib_tokens,
        proxy_tokens=proxy_tokens,
        eval_tokens=eval_tokens,
    )


@app.command()
def search(
    model: Annotated[
        str | None, typer.Option(help="HF model folder, 'default' (SmolLM2-135M) or tiny-llama/tiny-gpt2/tiny-bert")
    ] = None,
    hw: Annotated[str, typer.Option(help="Hardware profile id or alias (see `autocompress hw list`)")] = "jetson",
    space: Annotated[str, typer.Option(help="Search space name (search_spaces/) or YAML path")] = "default",
    budget: Annotated[list[str] | None, typer.Option(help="KEY=VALUE, e.g. latency_ms=40 (repeatable)")] = None,
    trials: Annotated[int | None, typer.Option(help="Evaluated trials the study should hold [default: 60]")] = None,
    timeout: Annotated[
        float | None, typer.Option(help="Start no new trial after this many seconds from the start [default: 540]")
    ] = None,
    study: Annotated[str | None, typer.Option(help="Study name [default: <space>-<profile>]")] = None,
    storage: Annotated[
        str | None, typer.Option(help="Optuna storage URL or journal .log path [default: SQLite in the study folder]")
    ] = None,
    out: Annotated[Path, typer.Option(help="Folder that holds study folders")] = Path("studies"),
    seed: Annotated[int, typer.Option(help="Seed of the sampler (stored in every plan)")] = 0,
    sampler: Annotated[
        str, typer.Option(help="nsga2 | tpe (multivariate) | gp (Optuna GPSampler; slow on big spaces) | random")
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
) -> None:
    """Search for Pareto-optimal compressed variants and print the front."""
    from autocompress.search import Budget
    from autocompress.search import search as run_search
    from autocompress.search.engine import DEFAULT_TIMEOUT_S, DEFAULT_TRIALS

    budgets = Budget.parse(budget or [])
    cfg = _data_config(data, calib_tokens, eval_tokens, proxy_tokens, seq_len)
    trials = DEFAULT_TRIALS if trials is None else trials
    timeout = DEFAULT_TIMEOUT_S if timeout is None else timeout
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    ) as progress:
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
        )
    _print_front(result)


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
        f"{counts_line(result.counts)} · {result.elapsed_s:.0f} s · outputs in {result.study_dir}/ "
        "(summary.md, pareto.json, plans/)"
    )


@app.command()
def worker(
    study: Annotated[str, typer.Option(help="Name of the study to join")],
    storage: Annotated[str, typer.Option(help="The study's Optuna storage URL or journal .log path")],
    out: Annotated[Path, typer.Option(help="Folder that holds study folders (plans are written there)")] = Path(
        "studies"
    ),
    trials: Annotated[int | None, typer.Option(help="Stop when the study holds this many evaluated trials")] = None,
    deadline: Annotated[float | None, typer.Option(help="Unix time after which no new trial starts")] = None,
    index: Annotated[int, typer.Option(help="Worker number (varies the sampler seed)")] = 0,
) -> None:
    """Join a running study and evaluate trials (from this or another machine)."""
    from autocompress.search.worker import run_worker

    n = run_worker(study, storage, out=out, trials=trials, deadline=deadline, index=index, log=_log)
    console.print(f"worker {index}: {n} trials evaluated")


@app.command()
def retarget(
    study: Annotated[str, typer.Option(help="Name of a finished study")],
    hw: Annotated[str, typer.Option(help="Hardware profile to price its plans on")],
    out: Annotated[Path, typer.Option(help="Folder that holds study folders")] = Path("studies"),
    storage: Annotated[str | None, typer.Option(help="Optuna storage URL or journal .log path")] = None,
    budget: Annotated[list[str] | None, typer.Option(help="KEY=VALUE budgets on the new target (repeatable)")] = None,
) -> None:
    """Price every evaluated plan of a study on another device and print that front (no re-evaluation)."""
    from autocompress.search import Budget
    from autocompress.search.retarget import retarget as run_retarget

    result = run_retarget(study, hw, out=out, storage=storage, budgets=Budget.parse(budget or []))
    _print_front(result)


@app.command()
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
    lr: Annotated[float, typer.Option(help="Learning rate (constant after warm-up)")] = 5e-5,
    seed: Annotated[int, typer.Option(help="Seed of the batch order (recorded in the plan)")] = 0,
    out: Annotated[Path, typer.Option(help="Folder that holds study folders")] = Path("studies"),
    storage: Annotated[str | None, typer.Option(help="Optuna storage URL or journal .log path")] = None,
) -> None:
    """Distil the base model into compressed trials; add each result to the study and rewrite its front."""
    from autocompress.recover import RecoverySettings, recover_trials

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
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    ) as progress:
        task = progress.add_task("recovery", total=None)

        def on_step(info, _model) -> None:
            progress.update(task, completed=info.step, total=info.total, description=f"recovery (KL {info.loss:.4f})")

        done = recover_trials(study, "pareto" if pareto else list(trial or []), out, settings, _log, storage, on_step)
    table = Table(title=f"recovered trials — study {study}")
    metric = next((k for r in done for k in ("ppl", "accuracy") if k in (r.full_after or {})), None)
    for col in ("trial", "from", "steps", "KL before", "KL after", f"{metric} before", f"{metric} after"):
        table.add_column(col, justify="right")
    for r in done:
        full = [f"{d[metric]:.4g}" if d and metric in d else "-" for d in (r.full_before, r.full_after)]
        table.add_row(str(r.trial), str(r.recovered_from), str(r.steps), f"{r.kl_before:.4g}", f"{r.kl_after:.4g}", *full)
    console.print(table)
    console.print(f"front rewritten: {out / study}/summary.md, pareto.json; plans in {out / study}/plans/")


@app.command()
def apply(
    plan: Annotated[Path, typer.Argument(help="plan.yaml from a study")],
    out: Annotated[Path, typer.Option(help="Folder to write the compressed HF model into")],
    model: Annotated[str | None, typer.Option(help="Base model [default: the one named in the plan]")] = None,
) -> None:
    """Rebuild a compressed model from its plan, write it as an HF folder and print its weight hash."""
    from autocompress.export import export_hf, plain_transformers_blockers
    from autocompress.plan import Plan
    from autocompress.workbench import Workbench

    p = Plan.load(plan)
    if out.is_dir() and any(out.iterdir()) and not (out / "plan.yaml").is_file():
        raise AutocompressError(f"output folder {out} is not empty and was not written by autocompress")
    check_writable(out, AutocompressError)  # before the model is loaded
    wb = Workbench.for_plan(p, model, log=_log)
    compressed = wb.apply(p)
    weight_hash = export_hf(compressed, p, out, wb.lm.tokenizer)
    console.print(f"wrote {out}/ (plan {p.hash()[:16]})")
    console.print(f"weight hash: {weight_hash}")
    blockers = plain_transformers_blockers(p)
    if blockers:
        console.print(
            f"[yellow]note:[/yellow] plain transformers cannot load this folder ({'; '.join(blockers)}); "
            "rebuild it with autocompress.apply_plan(plan)"
        )


@app.command()
def evaluate(
    plan: Annotated[Path | None, typer.Argument(help="plan.yaml (omit to score the base model)")] = None,
    model: Annotated[str | None, typer.Option(help="Base model [default: the plan's, else the default model]")] = None,
    hw: Annotated[str | None, typer.Option(help="Also print the predicted cost on this profile")] = None,
    data: Annotated[
        Path | None, typer.Option(help="Text file/folder/.jsonl [default: bundled Wikipedia leads]")
    ] = None,
    eval_tokens: Annotated[int, typer.Option(help="Held-out tokens for perplexity")] = 4096,
) -> None:
    """Score a plan (or the base model): KL to base, top-1 agreement, perplexity, bits per character."""
    from autocompress.evaluate import Evaluator
    from autocompress.plan import Plan
    from autocompress.workbench import Workbench

    if plan is not None:
        p = Plan.load(plan)
        wb = Workbench.for_plan(p, model, log=_log)
    else:
        p = None
        wb = Workbench.open(model, _data_config(data, 4096, eval_tokens, 1024, 256), log=_log)
    ev = Evaluator(wb.lm.model, wb.data, wb.lm.anatomy.task)
    m = wb.apply(p) if p is not None else wb.lm.model
    fid = ev.proxy(m)
    table = Table(title=f"quality of {plan or 'the base model'}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("KL to base (nats/token)", f"{fid.kl:.4g}")
    table.add_row("top-1 agreement", f"{fid.top1_agreement:.4f}")
    full = ev.full(m)
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
    console.print(table)


@hw_app.command("list")
def hw_list() -> None:
    """List the hardware profiles."""
    from autocompress.hardware import list_profiles

    table = Table(title="hardware profiles")
    table.add_column("id", no_wrap=True)
    for col in ("aliases", "device", "runtime", "bandwidth GB/s", "calibrated"):
        table.add_column(col, overflow="fold")
    for p in list_profiles():
        table.add_row(
            p.id,
            ", ".join(p.aliases),
            p.display_name,
            str(p.runtime),
            f"{p.peak_bw_GBps:g}",
            "yes" if p.calibrated else "no",
        )
    console.print(table)


@hw_app.command("show")
def hw_show(name: Annotated[str, typer.Argument(help="Profile id, alias or YAML path")]) -> None:
    """Show one hardware profile in full."""
    import yaml

    from autocompress.hardware import load_profile

    p = load_profile(name)
    console.print(
        yaml.safe_dump(p.model_dump(mode="json"), sort_keys=False, allow_unicode=True), markup=False, highlight=False
    )


@hw_app.command("calibrate")
def hw_calibrate(
    out: Annotated[Path, typer.Option(help="Profile to write, e.g. hw_profiles/local.yaml (machine-specific)")],
    threads: Annotated[int, typer.Option(help="Threads for every measurement (fixed)")] = 1,
    repeats: Annotated[int, typer.Option(help="Timed repeats per micro-benchmark (median kept)")] = 9,
) -> None:
    """Measure this machine with onnxruntime CPU micro-benchmarks and write a calibrated profile."""
    from autocompress.hardware.calibrate import calibrate_local, write_profile

    if threads < 1 or repeats < 1:
        raise AutocompressError("--threads and --repeats must be positive")
    if out.suffix not in (".yaml", ".yml"):
        raise AutocompressError(f"--out must be a .yaml path (e.g. hw_profiles/local.yaml), got {out}")
    check_writable(out.parent, AutocompressError)  # before minutes of measuring
    profile, raw = calibrate_local(threads=threads, repeats=repeats, log=_log)
    p = write_profile(profile, raw, out)
    c = p.calibration
    console.print(f"wrote {out} (id {p.id}, aliases {', '.join(p.aliases)}) and {c.measurements} in {c.seconds:.0f} s")
    console.print(
        f"bandwidth {p.peak_bw_GBps:.1f} GB/s x eff {dict(p.bw_efficiency_by_format)}; "
        f"per-linear overhead us {dict(p.linear_overhead_us_by_format)}; "
        f"kernels/block {p.kernels_per_block}, {p.per_kernel_overhead_us:.2f} us each; "
        f"fit error {c.fit_mape:.1%} on {c.samples} timings"
    )


@app.command()
def export(
    study: Annotated[str, typer.Option(help="Name of a finished study")],
    out: Annotated[Path, typer.Option(help="Folder to write the exports into (one trial-<N>/ per point)")],
    trial: Annotated[list[int] | None, typer.Option(help="Trial number to export (repeatable)")] = None,
    pareto: Annotated[bool, typer.Option("--pareto", help="Export every point of the Pareto front")] = False,
    onnx: Annotated[bool, typer.Option(help="Also write model.onnx, check it and measure it here")] = True,
    hw: Annotated[str, typer.Option(help="Profile whose prediction the measurement is compared with")] = "local",
    studies: Annotated[Path, typer.Option(help="Folder that holds study folders")] = Path("studies"),
    storage: Annotated[str | None, typer.Option(help="Optuna storage URL or journal .log path")] = None,
) -> None:
    """Export trials of a study as HF folders + quantized ONNX, checked against PyTorch and measured here."""
    from autocompress.export.study import export_trials, open_study
    from autocompress.export.verify import latency_table

    if pareto == bool(trial):
        raise AutocompressError("give either --trial N (repeatable) or --pareto")
    view = open_study(study, studies, storage)
    numbers = [c.trial for c in view.front] if pareto else list(trial or [])
    records = export_trials(view, numbers, out, onnx=onnx, hw=hw, log=_log)
    console.print(latency_table(records), markup=False, highlight=False)
    for r in records:
        hf = r["hf"]
        how = "plain transformers" if hf["loadable_with_plain_transformers"] else "autocompress.export.load_compressed"
        console.print(f"{out}/trial-{r['trial']}/: loads with {how}", markup=False, highlight=False)
    console.print(f"wrote {out}/exports.json and {out}/README.md")


@app.command()
def report(
    study: Annotated[str, typer.Option(help="Name of a finished study")],
    out: Annotated[Path, typer.Option(help="Folder to write report.md, report.html and figures into")],
    studies: Annotated[Path, typer.Option(help="Folder that holds study folders")] = Path("studies"),
    storage: Annotated[str | None, typer.Option(help="Optuna storage URL or journal .log path")] = None,
) -> None:
    """Write a study report: front table, Pareto plots, per-layer heatmaps, agreement, reproduce commands."""
    from autocompress.export.study import open_study
    from autocompress.report import write_report

    paths = write_report(open_study(study, studies, storage), out)
    console.print(f"wrote {', '.join(str(p) for p in paths)}")


@app.command()
def dashboard(
    study: Annotated[str | None, typer.Option(help="Study name (opens studies/<name>/study.db)")] = None,
    storage: Annotated[str | None, typer.Option(help="Optuna storage URL or journal .log path")] = None,
    out: Annotated[Path, typer.Option(help="Folder that holds study folders")] = Path("studies"),
    host: Annotated[str, typer.Option(help="Interface to bind (local only by default)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port")] = 8080,
) -> None:
    """Open a study in optuna-dashboard (binds 127.0.0.1 unless told otherwise)."""
    import subprocess

    if storage is None:
        if study is None:
            raise AutocompressError("give --study NAME or --storage URL")
        db = out / study / "study.db"
        if not db.is_file():
            raise AutocompressError(f"no study database at {db}")
        storage = f"sqlite:///{db}"
    exe = Path(sys.executable).with_name("optuna-dashboard")
    cmd = [str(exe) if exe.exists() else "optuna-dashboard", storage, "--host", host, "--port", str(port)]
    console.print(f"serving {storage} on http://{host}:{port} (Ctrl-C to stop)")
    raise SystemExit(subprocess.call(cmd))


def main(argv: list[str] | None = None) -> None:
    """Run the CLI: user mistakes print one line on stderr and exit with code 2."""
    try:
        app(args=argv, standalone_mode=False)
    except AutocompressError as exc:
        err_console.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(2)
    except (KeyboardInterrupt, click.exceptions.Abort):
        err_console.print("interrupted: finished trials are kept in the study; run the same command to resume")
        sys.exit(130)


if __name__ == "__main__":
    main()
