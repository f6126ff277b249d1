"""llama.cpp's recipes read back into plans: the plan stores exactly what llama-quantize's file stores."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from autocompress import formats
from autocompress.export import gguf as G
from autocompress.hardware.cost import CostModel
from autocompress.hardware.profile import load_profile
from autocompress.runtime import llamacpp, recipes
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
