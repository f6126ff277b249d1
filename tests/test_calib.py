from __future__ import annotations

import json

import pytest
import torch

from autocompress.calib import (
    DataConfig,
    activation_stats,
    collect_stats,
    load_token_data,
    read_documents,
    split_documents,
)
from autocompress.errors import DataError
from autocompress.model.tokenizer import ByteTokenizer
from tests.conftest import TINY_DATA


def test_default_splits_are_disjoint_and_fixed():
    from autocompress.calib import _wiki_documents

    docs = _wiki_documents()
    c1, e1 = split_documents(docs)
    c2, e2 = split_documents(docs)
    assert c1 == c2 and e1 == e2
    assert not set(c1) & set(e1)
    assert len(e1) == int(len(docs) * 0.2)


def test_token_budgets_and_hash():
    tok = ByteTokenizer()
    d1 = load_token_data(tok, TINY_DATA)
    d2 = load_token_data(tok, TINY_DATA)
    assert d1.calib.shape == (8, 64) and d1.proxy.shape == (2, 64) and d1.eval.shape == (4, 64)
    assert (d1.calib[:, 0] == tok.bos_token_id).all()
    assert d1.data_hash == d2.data_hash
    d3 = load_token_data(tok, DataConfig(seq_len=64, calib_tokens=640, proxy_tokens=128, eval_tokens=256))
    assert d3.data_hash != d1.data_hash
    assert 0 < d1.eval_chars <= 4 * 64 * 2


def test_user_text_formats(tmp_path):
    (tmp_path / "a.txt").write_text("alpha beta.\n\ngamma delta.\n\n" * 50)
    jl = tmp_path / "d.jsonl"
    jl.write_text("\n".join(json.dumps({"text": f"doc {i} " * 40}) for i in range(10)))
    assert len(read_documents(tmp_path / "a.txt")) == 100
    assert len(read_documents(jl)) == 10
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "x.txt").write_text("one\n\ntwo")
    assert read_documents(folder) == ["one", "two"]


@pytest.mark.parametrize(
    ("content", "name", "fragment"),
    [
        ("", "empty.txt", "no text"),
        ('{"txt": "x"}', "bad.jsonl", "field 'text'"),
        ("{not json", "bad2.jsonl", "not valid JSON"),
        ("x", "data.csv", "unsupported data file"),
    ],
)
def test_bad_data_files(tmp_path, content, name, fragment):
    f = tmp_path / name
    f.write_text(content)
    with pytest.raises(DataError, match=fragment):
        read_documents(f)


def test_data_shorter_than_budget(tmp_path):
    f = tmp_path / "short.txt"
    f.write_text("just a few words\n\nand a few more")
    with pytest.raises(DataError, match="tokens"):
        load_token_data(ByteTokenizer(), DataConfig(source=str(f), seq_len=64, calib_tokens=512))


def test_non_utf8_and_missing(tmp_path):
    f = tmp_path / "bin.txt"
    f.write_bytes(b"\xff\xfe\x00\x81" * 10)
    with pytest.raises(DataError, match="UTF-8"):
        read_documents(f)
    with pytest.raises(DataError, match="not found"):
        read_documents(tmp_path / "nope.txt")


def test_activation_stats_match_a_manual_computation(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOCOMPRESS_CACHE", str(tmp_path))
    data = load_token_data(tiny_llama.tokenizer, TINY_DATA)
    stats = activation_stats(tiny_llama.model, tiny_llama.anatomy, data)
    name = tiny_llama.anatomy.linears[0].name  # q_proj: its input is the normed hidden state
    seen = []
    h = tiny_llama.model.get_submodule(name).register_forward_hook(
        lambda m, a, o: seen.append(a[0].reshape(-1, a[0].shape[-1]))
    )
    with torch.no_grad():
        tiny_llama.model(input_ids=data.calib)
    h.remove()
    x = torch.cat(seen)
    torch.testing.assert_close(stats.input_sq_norms[name], (x * x).sum(0), rtol=1e-4, atol=1e-4)
    assert len(stats.block_distance) == tiny_llama.anatomy.num_blocks
    assert all(0 <= d <= 1 for d in stats.block_distance)
    assert sorted(stats.drop_order()) == list(range(tiny_llama.anatomy.num_blocks))
    cached = activation_stats(tiny_llama.model, tiny_llama.anatomy, data)  # second call reads the disk cache
    assert list((tmp_path / "stats").glob("*.safetensors"))
    torch.testing.assert_close(cached.input_sq_norms[name], stats.input_sq_norms[name])
    assert cached.block_distance == pytest.approx(stats.block_distance)


def test_block_distance_ranks_an_identity_block_first(tiny_llama):
    data = load_token_data(tiny_llama.tokenizer, TINY_DATA)
    blk = tiny_llama.model.model.layers[2]
    with torch.no_grad():  # zero the block's output projections: the block becomes the identity
        blk.self_attn.o_proj.weight.zero_()
        blk.mlp.down_proj.weight.zero_()
    stats = collect_stats(tiny_llama.model, tiny_llama.anatomy, data.calib)
    assert stats.drop_order()[0] == 2 and stats.block_distance[2] < 1e-3
