"""The front's plan column names the storage formats the plan stores (what the runtime will run)."""

from __future__ import annotations

from autocompress.model.loading import load_model
from autocompress.plan import LayerChoice, ModelRef, Plan
from autocompress.search.report import describe_plan


def test_description_names_formats_quantizers_and_the_embedding():
    a = load_model("tiny-llama").anatomy
    mlp = [s.name for s in a.linears if s.group == "mlp"]
    attn = [s.name for s in a.linears if s.group == "attn"]
    layers = {n: LayerChoice(format="Q4_0", quant_method="gptq") for n in mlp}
    layers |= {n: LayerChoice(format="Q8_0") for n in attn}
    layers[a.embeddings[0].name] = LayerChoice(format="Q6_K")
    text = describe_plan(Plan(model=ModelRef.of(a), layers=layers), a)
    share = round(100 * sum(s.params for s in a.linears if s.group == "mlp") / sum(s.params for s in a.linears))
    assert f"Q4_0-gptq {share}%" in text and f"Q8_0 {100 - share}%" in text
    assert text.endswith("embedding Q6_K")
    legacy = describe_plan(Plan(model=ModelRef.of(a), layers={n: LayerChoice(bits=4, group_size=128) for n in mlp}), a)
    assert "int4-g128-sym" in legacy and "embedding" not in legacy
