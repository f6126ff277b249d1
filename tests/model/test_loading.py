from __future__ import annotations

import json

import pytest
import torch

from autocompress.errors import ModelLoadError
from autocompress.model import load_model, state_dict_hash, tiny_model


def test_anatomy_roles_and_shapes(any_tiny):
    a = any_tiny.anatomy
    roles = {s.role for s in a.linears}
    if a.architecture == "llama":
        assert roles == {"q", "k", "v", "o", "gate", "up", "down"}
        b = a.blocks[0]
        k = next(s for s in b.linears if s.role == "k")
        assert b.num_kv_heads < b.num_heads and k.out_features == b.num_kv_heads * b.head_dim  # GQA
    elif a.architecture == "gpt2":
        assert roles == {"qkv", "o", "fc1", "fc2"}
        qkv = next(s for s in a.linears if s.role == "qkv")
        assert qkv.transposed and qkv.out_features == 3 * a.hidden_size and qkv.in_features == a.hidden_size
    else:
        assert roles == {"q", "k", "v", "o", "fc1", "fc2"} and a.task == "encoder"
    for s in a.linears:  # anatomy shapes match the real modules
        w = any_tiny.model.get_submodule(s.name).weight
        assert tuple(w.shape) == ((s.in_features, s.out_features) if s.transposed else (s.out_features, s.in_features))
    total = sum(p.numel() for p in any_tiny.model.parameters())
    assert a.block_linear_params + a.other_params == total


def test_anatomy_round_trips_through_dict(tiny_llama):
    from autocompress.model.anatomy import ModelAnatomy

    a = tiny_llama.anatomy
    assert ModelAnatomy.from_dict(json.loads(json.dumps(a.to_dict()))) == a


def test_state_hash_is_stable_and_sensitive():
    m1, m2 = tiny_model("tiny-llama", seed=0), tiny_model("tiny-llama", seed=0)
    assert state_dict_hash(m1) == state_dict_hash(m2)
    with torch.no_grad():
        next(m2.parameters()).view(-1)[0] += 1e-6
    assert state_dict_hash(m1) != state_dict_hash(m2)


def test_missing_path(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(tmp_path / "nope")


def test_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path)


def test_pickle_checkpoint_is_refused_without_unpickling(tmp_path):
    m = tiny_model("tiny-llama")
    m.config.save_pretrained(tmp_path)
    sentinel = tmp_path / "pwned"
    # a pickle that would create a file if it were ever unpickled
    import pickle

    class Evil:
        def __reduce__(self):
            return (open, (str(sentinel), "w"))

    (tmp_path / "pytorch_model.bin").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(ModelLoadError, match="pickle"):
        load_model(tmp_path)
    assert not sentinel.exists()


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5", "architectures": ["T5Model"]}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="unsupported architecture 't5'"):
        load_model(tmp_path)


def test_corrupted_safetensors(tmp_path):
    m = tiny_model("tiny-llama")
    m.save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:200])
    with pytest.raises(ModelLoadError, match="cannot load weights"):
        load_model(tmp_path)


def test_saved_folder_loads_with_same_hash(tmp_path):
    m = tiny_model("tiny-gpt2")
    m.save_pretrained(tmp_path)
    lm = load_model(tmp_path)
    assert lm.anatomy.model_hash == state_dict_hash(m)
    assert lm.tokenizer is None  # no tokenizer files were written


@pytest.mark.slow
def test_default_model_anatomy():
    lm = load_model()
    a = lm.anatomy
    assert (a.num_blocks, a.hidden_size, a.vocab_size) == (30, 576, 49152)
    b = a.blocks[0]
    assert (b.num_heads, b.num_kv_heads, b.head_dim, b.mlp_dim) == (9, 3, 64, 1536)
    assert len(a.linears) == 210 and a.tied_embeddings
    assert 130e6 < a.block_linear_params + a.other_params < 140e6
