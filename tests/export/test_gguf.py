"""GGUF export: the file holds the plan's exact weights, and llama.cpp runs it as we evaluate it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from autocompress.export import gguf as G
from autocompress.plan import BlockChoice, LayerChoice, ModelRef, Plan
from autocompress.runtime import llamacpp
from autocompress.workbench import Workbench
from tests.conftest import TINY_DATA

needs_llamacpp = pytest.mark.skipif(
    llamacpp.find() is None, reason=f"llama.cpp's tools are not built here ({llamacpp.SETUP_HINT})"
)


@pytest.fixture(scope="module")
def wb():
    return Workbench.open("tiny-llama", TINY_DATA)


def _plan(wb, formats_by_role: dict[str, str], method: str = "rtn", **kw) -> Plan:
    a = wb.lm.anatomy
    layers = {
        s.name: LayerChoice(format=formats_by_role[s.role], quant_method=method)
        for s in a.linears
        if s.role in formats_by_role
    }
    return Plan(model=ModelRef.of(a), layers=layers, provenance=wb.provenance(), **kw)


MIX = {"q": "Q4_0", "k": "Q5_0", "v": "Q8_0", "o": "IQ4_NL", "gate": "Q4_1", "up": "Q5_1"}  # down stays dense


def test_every_tensor_reads_back_as_the_plans_weights(wb, tmp_path):
    plan = _plan(wb, MIX)
    rec = G.export_gguf(wb, plan, tmp_path / "m.gguf")
    assert rec["architecture"] == "llama" and rec["read_back_equal"]
    types = rec["tensor_types"]
    n = wb.lm.anatomy.num_blocks
    assert types["Q4_0"] == types["Q5_0"] == types["IQ4_NL"] == n
    assert types["BF16"] == n + 1  # ffn_down of every block and the embedding, in the base's dtype
    # independently of the exporter's own check: llama.cpp's layout of one block, dequantized by gguf-py
    model = wb.apply(plan)
    read = G.read_tensors(tmp_path / "m.gguf")
    v = model.get_parameter("model.layers.1.self_attn.v_proj.weight").detach()
    assert torch.equal(torch.from_numpy(read["blk.1.attn_v.weight"].copy()), v)
    q = model.get_parameter("model.layers.1.self_attn.q_proj.weight").detach()
    got_q = torch.from_numpy(read["blk.1.attn_q.weight"].copy())
    assert not torch.equal(got_q, q)  # llama.cpp's rope order differs from HF's ...
    assert torch.equal(got_q[torch.argsort(G._rope_rows(q.shape[0], 4))], q)  # ... by the converter's row order


def test_gptq_codes_are_written_as_they_are(wb, tmp_path):
    """GPTQ codes are not what a re-quantizer would pick: the file must hold the plan's codes."""
    plan = _plan(wb, dict.fromkeys(("q", "k", "v", "o", "gate", "up", "down"), "Q4_0"), method="gptq")
    G.export_gguf(wb, plan, tmp_path / "g.gguf")
    model = wb.apply(plan)
    w = model.get_parameter("model.layers.0.mlp.down_proj.weight").detach()
    read = torch.from_numpy(G.read_tensors(tmp_path / "g.gguf")["blk.0.ffn_down.weight"].copy())
    assert torch.equal(read, w)
    from autocompress import formats

    requantized = formats.get("Q4_0").dequantize(formats.get("Q4_0").quantize(w))
    assert not torch.equal(requantized, w)  # the check above could fail for a re-quantizing writer


def test_a_changed_byte_is_caught_by_the_read_back(wb, tmp_path):
    plan = _plan(wb, {"v": "Q8_0"})
    path = tmp_path / "m.gguf"
    G.export_gguf(wb, plan, path)
    model = wb.apply(plan)
    import gguf

    t = next(t for t in gguf.GGUFReader(path).tensors if t.name == "blk.2.attn_v.weight")
    raw = bytearray(path.read_bytes())
    raw[int(t.data_offset) + 40] ^= 0x01  # one code bit of the first row's second block
    path.write_bytes(bytes(raw))
    bad = G.read_back_mismatches(path, model, wb.lm.anatomy, plan, "BF16")
    assert len(bad) == 1 and bad[0].startswith("blk.2.attn_v.weight")


def test_uneven_widths_and_dropped_blocks_use_deci(wb, tmp_path):
    blocks = {0: BlockChoice(keep_heads=2, keep_mlp_channels=64), 2: BlockChoice(keep_mlp_channels=96)}
    plan = _plan(wb, {"gate": "Q8_0", "up": "Q8_0"}, blocks=blocks, drop_blocks=(3,))
    rec = G.export_gguf(wb, plan, tmp_path / "d.gguf")
    assert rec["architecture"] == "deci"
    import gguf

    r = gguf.GGUFReader(tmp_path / "d.gguf")
    assert r.fields["deci.block_count"].contents() == 3
    assert r.fields["deci.feed_forward_length"].contents() == [64, 128, 96]
    assert r.fields["deci.attention.head_count"].contents() == [2, 4, 4]
    assert r.fields["deci.attention.head_count_kv"].contents() == [1, 2, 2]


def test_plans_llamacpp_cannot_run_are_refused_in_one_line(wb, tmp_path):
    a = wb.lm.anatomy
    name = a.linears[0].name
    cases = {
        "low-rank": LayerChoice(rank_ratio=0.5),
        "sparsity": LayerChoice(sparsity=0.5),
        "not a GGUF type": LayerChoice(format="int4-g128-asym"),
    }
    for what, choice in cases.items():
        plan = Plan(model=ModelRef.of(a), layers={name: choice}, provenance=wb.provenance())
        with pytest.raises(G.GGUFExportError, match=what) as exc:
            G.export_gguf(wb, plan, tmp_path / "x.gguf")
        assert "\n" not in str(exc.value) and name in str(exc.value)
    assert not list(tmp_path.iterdir())  # nothing half-written


@needs_llamacpp
@pytest.mark.parametrize("deci", [False, True])
def test_llamacpp_runs_the_file_as_we_evaluate_it(wb, tmp_path, deci):
    """llama.cpp loads the file, tokenizes held-out text as we do, and its perplexity on that text agrees
    with ours on the same tokens within 2 % (the gap is its 8-bit activation rounding; unquantized
    attention keeps it small here)."""
    from autocompress.calib import held_out_text

    kw = {"blocks": {1: BlockChoice(keep_heads=2, keep_mlp_channels=64)}, "drop_blocks": (3,)} if deci else {}
    plan = _plan(wb, {"gate": "Q8_0", "up": "Q4_0", "down": "Q5_0", "o": "Q8_0"}, **kw)
    path = tmp_path / "m.gguf"
    rec = G.export_gguf(wb, plan, path)
    assert rec["architecture"] == ("deci" if deci else "llama")
    text = held_out_text(TINY_DATA)[:6000]
    ids = llamacpp.tokenize(path, _write(tmp_path, text))
    assert ids == wb.lm.tokenizer.encode(text)
    check = G.check_with_llamacpp(path, wb.apply(plan), text, ctx=64, chunks=8)
    assert check["generates"]
    assert abs(check["ppl_rel_diff"]) < 0.02, check
    # and the comparison can fail: another model's perplexity is far off
    other = G.check_with_llamacpp(path, wb.lm.model, text, ctx=64, chunks=8)
    assert abs(other["ppl_llamacpp"] / other["ppl_ours"] - 1) > abs(check["ppl_rel_diff"])


def _write(tmp_path, text: str):
    p = tmp_path / "text.txt"
    p.write_text(text)
    return p


@pytest.mark.slow
@needs_llamacpp
def test_default_model_gguf_agrees_with_llamacpp(tmp_path):
    """On SmolLM2: a K-quant mix (Q4_K / Q6_K on the 1536-wide ffn_down, Q5_0 / Q8_0 elsewhere, embedding
    Q8_0) reads back exactly, and llama-perplexity agrees with our evaluation of the plan."""
    from autocompress.calib import held_out_text

    wb = Workbench.open()
    a = wb.lm.anatomy
    layers = {}
    for s in a.linears:
        fmt = {"down": "Q6_K" if s.block % 3 == 0 else "Q4_K", "v": "Q8_0"}.get(s.role, "Q5_0")
        layers[s.name] = LayerChoice(format=fmt)
    layers[a.embeddings[0].name] = LayerChoice(format="Q8_0")
    plan = Plan(model=ModelRef.of(a), layers=layers, provenance=wb.provenance())
    path = tmp_path / "smol.gguf"
    rec = G.export_gguf(wb, plan, path)
    assert rec["tensor_types"]["Q4_K"] == 20 and rec["tensor_types"]["Q6_K"] == 10
    text = held_out_text()[:40000]
    check = G.check_with_llamacpp(path, wb.apply(plan), text, ctx=256, chunks=16)
    assert check["generates"]
    assert abs(check["ppl_rel_diff"]) < 0.02, check
    assert np.isfinite(check["ppl_llamacpp"])


def test_perplexity_is_read_from_the_running_estimate():
    """llama.cpp's leaked logger may drop the last lines; the estimate after the wanted chunk is read."""
    out = "perplexity: 0.4 s per pass\n[1]249.3391,[2]259.6165,[3]259.4253,"
    assert llamacpp.parse_perplexity(out, 2) == pytest.approx(259.6165)
    with pytest.raises(llamacpp.LlamaCppError, match="after chunk 4"):
        llamacpp.parse_perplexity(out, 4)
    final = "[1]10.5,[2]11.25,\nFinal estimate: PPL = 11.2500 +/- 0.1"
    assert llamacpp.parse_perplexity(final, 2) == 11.25


@needs_llamacpp
def test_study_export_writes_checked_gguf_files_applying_each_plan_once(tmp_path, monkeypatch):
    """`autocompress export --pareto` on a llama.cpp study: a GGUF per front point, read back exactly
    and run by llama.cpp, from one application of each plan (the HF folder and the file share it)."""
    from collections import Counter

    from autocompress.export.study import export_trials, open_study
    from autocompress.search import search

    search(model="tiny-llama", hw="rpi", trials=4, study="g", out=tmp_path, data=TINY_DATA, full_eval=0)
    view = open_study("g", tmp_path)
    applied: Counter[str] = Counter()
    real = Workbench.apply

    def counting(self, plan, *args, **kwargs):
        applied[plan.hash()] += 1
        return real(self, plan, *args, **kwargs)

    monkeypatch.setattr(Workbench, "apply", counting)
    trials = [c.trial for c in view.front]
    records = export_trials(view, trials, tmp_path / "exports", onnx=False, gguf=True, hw="rpi", device="cpu")
    assert len(records) == len(trials) >= 2
    for rec in records:
        assert applied[rec["plan_hash"]] == 1, rec["trial"]
        g = rec["gguf"]
        assert g["read_back_equal"] and (tmp_path / "exports" / f"trial-{rec['trial']}" / "model.gguf").is_file()
        assert g["llamacpp"]["ppl_llamacpp"] == pytest.approx(g["llamacpp"]["ppl_ours"], rel=0.05)
        lat = g["latency"]  # llama-bench's measurement beside the named llama.cpp profile's prediction
        assert lat["measured_decode_ms"] > 0 and lat["measured_prefill_ms"] > 0
        assert lat["profile"] == "raspberry-pi-5" and lat["predicted_decode_ms"] > 0
    # search --verify K on a llama.cpp study: the same GGUF checks, beside the uncompressed model's GGUF
    from autocompress.export.study import verify_front

    checked = verify_front(tmp_path / "g", 2)
    assert len(checked) == 2 and all(r["gguf"]["latency"]["speedup_vs_uncompressed"] > 0 for r in checked)
    assert "Uncompressed GGUF: decode" in (tmp_path / "g" / "verify.md").read_text()
    index = (tmp_path / "exports" / "README.md").read_text()
    assert "GGUF files, run by llama.cpp on this machine; predicted by raspberry-pi-5." in index
    rows = [ln for ln in index.splitlines() if ln.startswith("| ") and ln.split(" | ")[0][2:].isdigit()]
    assert len(rows) == len(records) and all(ln.rstrip(" |").endswith("yes") for ln in rows)
