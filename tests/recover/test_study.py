"""`autocompress recover`: a recovered trial joins the study with the same costs and a new quality."""

from __future__ import annotations

import json
from dataclasses import asdict

import optuna
import pytest
from optuna.trial import TrialState

from autocompress.cli import main
from autocompress.evaluate import Evaluator
from autocompress.hardware import CostModel, load_profile
from autocompress.plan import LayerChoice, ModelRef, Plan
from autocompress.search.engine import FULL_KEY
from tests.conftest import TINY_DATA


def _study(tmp_path, wb) -> str:
    """A finished two-trial study written the way the search writes one (without running a search)."""
    a = wb.lm.anatomy
    name = "rec"
    study_dir = tmp_path / name
    study_dir.mkdir()
    opt = optuna.create_study(
        study_name=name, storage=f"sqlite:///{study_dir / 'study.db'}", directions=["minimize"] * 3
    )
    opt.set_user_attr(
        "settings",
        {
            "model_hash": a.model_hash,
            "model": a.name,
            "data_hash": wb.data.data_hash,
            "profile": "jetson-orin-nano-25w",
            "budgets": {},
            "scenario": {},
            "anatomy": a.to_dict(),
            "run": {"model": "tiny-llama", "data": asdict(TINY_DATA)},
        },
    )
    cm = CostModel(load_profile("jetson-orin-nano-25w"), a)
    ev = Evaluator(wb.lm.model, wb.data, a.task)
    plans = [
        Plan(model=ModelRef.of(a), default=LayerChoice(bits=8), provenance=wb.provenance(study=name, trial=0)),
        Plan(model=ModelRef.of(a), drop_blocks=(1, 2), provenance=wb.provenance(study=name, trial=1)),
    ]
    for n, plan in enumerate(plans):
        cost = cm.predict(plan).to_dict()
        kl = ev.proxy(wb.apply(plan)).kl
        attrs = {"cost": cost, "plan_hash": plan.hash(), "top1_agreement": 0.5}
        opt.add_trial(
            optuna.trial.create_trial(
                values=[kl, cost["latency_ms"], cost["memory_mb"]], user_attrs=attrs, state=TrialState.COMPLETE
            )
        )
        plan.save(study_dir / "plans" / f"{n}.yaml")
    return name


def test_recover_adds_a_candidate_with_the_same_costs(tmp_path, capsys, wb_llama):
    name = _study(tmp_path, wb_llama)
    argv = ["recover", "--study", name, "--out", str(tmp_path), "--trial", "1", "--recover-tokens", "1536"]
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--lr", "0.003"])
        raise SystemExit(0)
    assert (exc.value.code or 0) == 0, capsys.readouterr().err
    opt = optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / name / 'study.db'}")
    src, new = opt.trials[1], opt.trials[2]
    assert new.state == TrialState.COMPLETE and new.user_attrs["recovered_from"] == 1
    assert new.values[1:] == src.values[1:] and new.user_attrs["cost"] == src.user_attrs["cost"]
    assert new.values[0] < src.values[0]  # distillation lowered the held-out KL of the two-blocks-dropped model
    plan = Plan.load(tmp_path / name / "plans" / "2.yaml")
    assert plan.recovery is not None and plan.recovery.steps == 6 and plan.hash() == new.user_attrs["plan_hash"]
    assert plan.drop_blocks == (1, 2) and plan.provenance.trial == 2
    assert "ppl" in opt.user_attrs[f"{FULL_KEY}{plan.hash()}"]
    front = [c["trial"] for c in json.loads((tmp_path / name / "pareto.json").read_text())["pareto"]]
    assert 2 in front and 1 not in front  # same costs, lower KL: the recovered model replaces its source


def test_recover_needs_a_trial_or_the_front(tmp_path, capsys):
    for argv in (["--study", "x"], ["--study", "x", "--trial", "1", "--pareto"]):
        with pytest.raises(SystemExit) as exc:
            main(["recover", *argv, "--out", str(tmp_path)])
        assert exc.value.code == 2
        assert "give either --trial N (repeatable) or --pareto" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["recover", "--study", "nope", "--trial", "1", "--out", str(tmp_path)])
    assert exc.value.code == 2 and "no study database" in capsys.readouterr().err
