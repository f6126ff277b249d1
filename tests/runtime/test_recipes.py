"""llama.cpp's recipes read back into plans: the plan stores exactly what llama-quantize's file stores."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest

from autocompress import formats
from autocompress.export import gguf as G
from autocompress.hardware.cost import CostModel
from autocompress.hardware.profile import load_profile
from autocompress.plan import LayerChoice, Plan
from autocompress.runtime import llamacpp, recipes
from autocompress.search.recipe_seeds import params_for_layers, recipe_seeds
from autocompress.search.seeding import Seed
from autocompress.space import SearchSpace, SpaceContext
from autocompress.workbench import Workbench
from tests.conftest import TINY_DATA

pytestmark = pytest.mark.skipif(
    llamacpp.find() is None, reason=f"llama.cpp's tools are not built here ({llamacpp.SETUP_HINT})"
)


@pytest.fixture(scope="module")
def wb():
    return Workbench.open("tiny-llama", TINY_DATA)


@pytest.fixture(scope="module")
def made(wb, tmp_path_factory):
    work = tmp_path_factory.mktemp("recipes")
    return recipes.recipe_plans(wb, work, ("Q4_K_M", "Q8_0", "Q4_0"), with_imatrix=False)


def _tensor_bytes(path) -> dict[str, int]:
    return {t.name: int(t.n_bytes) for t in gguf.GGUFReader(path).tensors}


def test_plan_read_back_prices_to_the_files_bytes(wb, made):
    a = wb.lm.anatomy
    cost = CostModel(load_profile("rpi"), a)
    for label, (plan, path) in made.items():
        file_bytes = _tensor_bytes(path)
        types = recipes.tensor_types(path)
        # every tensor of the file is in the plan in the file's type (norms: F32 in both)
        ours = {t.name: t.format for t in G.tensors(wb.apply(plan), a, plan, "F32")}
        assert ours == types, label
        stored = sum(formats.get(c.format).bytes(_shape(a, n)) for n, c in plan.layers.items() if c.quantized)
        in_file = sum(b for n, b in file_bytes.items() if types[n] not in ("F32", "F16", "BF16"))
        assert stored == in_file, label
        # the cost model prices the same bytes (plus the dense rest at the profile's width)
        dense_rest = (a.other_params - sum(e.params for e in a.embeddings)) * load_profile("rpi").dense_bits / 8
        assert cost.predict(plan).weights_mb * 1e6 == pytest.approx(stored + dense_rest, rel=1e-9)


def _shape(a, name: str) -> tuple[int, int]:
    s = a.find_linear(name)
    if s is not None:
        return (s.out_features, s.in_features)
    e = a.find_embedding(name)
    return (e.rows, e.cols)


def test_recipes_follow_llamacpp_rules_on_narrow_rows(made):
    """tiny-llama's rows are 64 / 128 wide: no K-quant fits, so Q4_K_M is llama.cpp's fallbacks."""
    types = recipes.tensor_types(made["Q4_K_M"][1])
    assert types["token_embd.weight"] == "Q8_0"  # Q6_K for a tied table, Q8_0 where rows don't fit
    assert {types[f"blk.{i}.ffn_up.weight"] for i in range(4)} == {"Q5_0"}  # Q4_K -> Q5_0
    plan = made["Q4_K_M"][0]
    assert all(c.format in ("Q5_0", "Q8_0") for c in plan.layers.values())


def test_our_quantizer_writes_llama_quantizes_bytes(wb, made, tmp_path):
    """The plan read back from a recipe, exported by us, holds the same bytes llama-quantize wrote
    (our reference quantizers are llama.cpp's; FMA-dependent ties may flip a few codes: < 0.1 %)."""
    for label in ("Q8_0", "Q4_0"):
        plan, path = made[label]
        ours = tmp_path / f"{label}.gguf"
        G.export_gguf(wb, plan, ours, dense="F32")
        theirs = {t.name: np.asarray(t.data).view(np.uint8) for t in gguf.GGUFReader(path).tensors}
        mine = {t.name: np.asarray(t.data).view(np.uint8) for t in gguf.GGUFReader(ours).tensors}
        assert set(theirs) == set(mine)
        total = sum(a.size for a in theirs.values())
        differ = sum(int((theirs[n].reshape(-1) != mine[n].reshape(-1)).sum()) for n in theirs)
        assert differ / total < 1e-3, (label, differ, total)


@pytest.fixture
def seeding(wb, tmp_path, monkeypatch):
    monkeypatch.setattr(recipes, "CACHE", tmp_path / "recipe-types")
    space = SearchSpace.load("gguf-bench").for_profile(load_profile("rpi"))
    return space, SpaceContext(wb.lm.anatomy, wb.stats.drop_order(), wb.provenance())


def test_recipes_seed_a_per_linear_llamacpp_space(wb, made, seeding, monkeypatch):
    """Each recipe seed stores every linear and the embedding in the type llama-quantize's file gives
    it, with the space's quantizer (not llama-quantize's rounding); the types are read once, then come
    from the cache."""
    space, ctx = seeding
    (method,) = space.linear["quant_method"]
    assert method != "rtn"  # gguf-bench's GPTQ codes: the seed must not take the recipe file's rounding
    said: list[str] = []
    seeds = recipe_seeds(space, ctx, wb, ("Q4_K_M", "Q8_0"), log=said.append)
    assert [s.name for s in seeds] == ["recipe Q4_K_M", "recipe Q8_0"], said
    a = wb.lm.anatomy
    for seed in seeds:
        types = recipes.tensor_types(made[seed.name.split()[1]][1])
        plan = space.plan_from_params(seed.params, ctx)
        for site in a.linears:
            gguf_name = next(n for n in types if n.startswith(f"blk.{site.block}.") and _role(n) == site.role)
            assert plan.layers[site.name].format == types[gguf_name], (seed.name, site.name)
            assert plan.layers[site.name].quant_method == method
        assert plan.layers[a.embeddings[0].name].format == types["token_embd.weight"]

    def no_quantize(*_a, **_k):
        raise AssertionError("llama-quantize ran again: the types were not cached")

    monkeypatch.setattr(recipes, "quantize", no_quantize)
    again = recipe_seeds(space, ctx, wb, ("Q4_K_M", "Q8_0"))
    assert [s.params for s in again] == [s.params for s in seeds]


def test_a_layout_the_space_lacks_is_no_seed(wb, seeding):
    space, ctx = seeding
    a = wb.lm.anatomy
    q = a.linears[0].name
    offered = {n: LayerChoice(format="Q8_0") for n in [*(s.name for s in a.linears), a.embeddings[0].name]}
    params, why = params_for_layers(space, ctx, offered)
    assert params is not None and why == "", why
    # Q4_1 holds the bundled base's grid exactly, so the bench space leaves it out
    params, why = params_for_layers(space, ctx, {**offered, q: LayerChoice(format="Q4_1")})
    site = a.linears[0]
    assert params is None and "Q4_1" in why and f"b{site.block}.{site.role}" in why, why
    # the recipe holding Q4_1 is no baseline of that space (it holds a format the space removed)


def test_a_per_block_space_takes_a_recipe_as_a_fixed_plan(wb, made, seeding):
    """A per-block space cannot set Q4_K_M's per-tensor types through its parameters: the recipe is
    still a baseline, evaluated as the fixed plan of exactly the file's types, and the sampler is told
    a setting the space holds. A recipe with a format the space offers nowhere is left out, saying so."""
    _space, ctx = seeding
    block = SearchSpace.load("default").for_profile(load_profile("rpi"))
    said: list[str] = []
    (seed,) = recipe_seeds(block, ctx, wb, ("Q4_K_M",), log=said.append)
    assert seed.kind == "baseline" and seed.plan is not None, said
    again = Seed.from_list(json.loads(json.dumps(seed.to_list())))  # as the study stores it
    plan = Plan.from_dict(again.plan)
    types = recipes.tensor_types(made["Q4_K_M"][1])
    a = wb.lm.anatomy
    for site in a.linears:
        gguf_name = next(n for n in types if n.startswith(f"blk.{site.block}.") and _role(n) == site.role)
        assert plan.layers[site.name].format == types[gguf_name], site.name
    assert len({plan.layers[s.name].format for s in a.linears}) > 1  # a real mix, not one format
    nearest = block.plan_from_params(again.params, ctx)  # parameters the space really holds
    assert nearest.layers and plan.hash() != nearest.hash()

    bench = SearchSpace.load("gguf-bench").for_profile(load_profile("rpi"))
    held = recipes.recipe_types(wb, ("Q4_K_M",))["Q4_K_M"]
    with pytest.MonkeyPatch.context() as mp:  # a recipe whose tensors need Q4_1, which that space removed
        mp.setattr(recipes, "recipe_types", lambda *_a, **_k: {"Q4_K_M": {n: "Q4_1" for n in held}})
        said.clear()
        assert recipe_seeds(bench, ctx, wb, ("Q4_K_M",), log=said.append) == []
    assert any("Q4_1" in line and "left out" in line for line in said), said


def _role(gguf_name: str) -> str:
    return {"attn_q": "q", "attn_k": "k", "attn_v": "v", "attn_output": "o", "ffn_gate": "gate", "ffn_up": "up"}.get(
        gguf_name.split(".")[2], "down" if gguf_name.split(".")[2] == "ffn_down" else "?"
    )


def test_a_llamacpp_study_evaluates_the_recipes_as_baselines(wb, tmp_path, monkeypatch):
    """In a per-block study on a llama.cpp profile the recipe's trial evaluates the recipe's own
    per-tensor types (the plan file the front and the exports read), also when the study is resumed
    by another process that rebuilds its seeds from the storage."""
    import optuna

    from autocompress.search import search

    monkeypatch.setattr(recipes, "CACHE", tmp_path / "recipe-types")
    run = {"model": "tiny-llama", "hw": "rpi", "study": "r", "out": tmp_path, "data": TINY_DATA, "full_eval": 0}
    search(trials=1, **run)
    opt = optuna.load_study(study_name="r", storage=f"sqlite:///{tmp_path / 'r' / 'study.db'}")
    names = [Seed.from_list(s).name for s in opt.user_attrs["seeds"]]
    # each recipe's predicted saving is a cost target of the evolution: fewer bits, more saved
    saved = dict(
        zip([n for n in names if n.startswith("recipe ")], opt.user_attrs["settings"]["run"]["anchors"], strict=True)
    )
    assert 0 < saved["recipe Q6_K"] < saved["recipe Q4_K_M"] < saved["recipe Q3_K_M"], saved
    at = names.index("recipe Q3_K_M")
    search(trials=at + 1, **run)  # resumed: the seeds come back from the study
    trial = opt.trials[at]
    assert trial.user_attrs["baseline"] == "recipe Q3_K_M"
    plan = Plan.load(tmp_path / "r" / "plans" / f"{at}.yaml")
    want = recipes.plan_from_types(recipes.recipe_types(wb, ("Q3_K_M",))["Q3_K_M"], wb)
    assert {k: c.format for k, c in plan.layers.items()} == {k: c.format for k, c in want.layers.items()}
    assert len({c.format for c in plan.layers.values()}) > 1  # Q3_K_M mixes types; no block setting holds it
