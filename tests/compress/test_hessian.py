"""Calibration Hessians collected block by block: the same matrices as hooks on a full forward,
written per block to disk (whole or not at all), read back one at a time."""

from __future__ import annotations

import pytest
import torch

from autocompress.calib import collect_stats, load_token_data, run_with_hooks
from autocompress.compress import hessian as hmod
from autocompress.compress.hessian import calibration_hessians, collect_hessians, input_key
from autocompress.model import load_model
from tests.conftest import TINY_DATA


def _full_forward_hessians(model, anatomy, tokens) -> dict[str, torch.Tensor]:
    """The reference: hooks on every linear, one forward of the whole model per batch of 4."""
    sums: dict[str, torch.Tensor] = {}

    def hook(key):
        def fn(_m, args, _out):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            sums[key] = sums[key].add_(x.t() @ x) if key in sums else x.t() @ x

        return fn

    handles, seen = [], set()
    for site in anatomy.linears:
        if input_key(site) not in seen:
            seen.add(input_key(site))
            handles.append(model.get_submodule(site.name).register_forward_hook(hook(input_key(site))))
    run_with_hooks(model, tokens, handles)
    return sums


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-gpt2", "tiny-bert"])
def test_blockwise_hessians_equal_a_full_forward(arch):
    lm = load_model(arch)
    tokens = torch.randint(3, 250, (6, 32), generator=torch.Generator().manual_seed(0))  # 6: a short last batch
    ref = _full_forward_hessians(lm.model, lm.anatomy, tokens)
    got = collect_hessians(lm.model, lm.anatomy, tokens)
    assert sorted(got) == sorted(ref)
    for key in ref:  # same inputs, same kernels, same summation order: bit for bit
        assert torch.equal(got[key], ref[key]), key


def test_blockwise_stats_equal_a_full_forward(tiny_llama):
    tokens = torch.randint(3, 250, (6, 32), generator=torch.Generator().manual_seed(1))
    stats = collect_stats(tiny_llama.model, tiny_llama.anatomy, tokens)
    sq: dict[str, torch.Tensor] = {}
    outs: dict[int, list] = {}
    handles = []
    for site in tiny_llama.anatomy.linears:

        def fn(_m, args, _o, name=site.name):
            x = args[0].float().reshape(-1, args[0].shape[-1])
            sq[name] = sq[name] + (x * x).sum(0) if name in sq else (x * x).sum(0)

        handles.append(tiny_llama.model.get_submodule(site.name).register_forward_hook(fn))
    for blk in tiny_llama.anatomy.blocks:

        def bfn(_m, args, kwargs, out, i=blk.index):
            x_in = args[0] if args else kwargs["hidden_states"]
            x_out = out[0] if isinstance(out, tuple) else out
            cos = torch.nn.functional.cosine_similarity(x_in, x_out, dim=-1).clamp(-1, 1)
            outs.setdefault(i, []).append(torch.arccos(cos) / torch.pi)

        handles.append(tiny_llama.model.get_submodule(blk.prefix).register_forward_hook(bfn, with_kwargs=True))
    run_with_hooks(tiny_llama.model, tokens, handles)
    for name, v in sq.items():
        assert torch.equal(stats.input_sq_norms[name], v), name
    for i, parts in outs.items():
        assert stats.block_distance[i] == pytest.approx(float(torch.cat([p.flatten() for p in parts]).mean()))


def test_hessians_on_disk_per_block_and_read_back_one_at_a_time(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOCOMPRESS_CACHE", str(tmp_path))
    data = load_token_data(tiny_llama.tokenizer, TINY_DATA)
    a = tiny_llama.anatomy
    ref = collect_hessians(tiny_llama.model, a, data.calib)
    hess = calibration_hessians(tiny_llama.model, a, data)
    folder = next((tmp_path / "hessians").iterdir())
    files = sorted(p.name for p in folder.iterdir())
    assert files == sorted([hmod.COMPLETE] + [f"block-{b.index}.safetensors" for b in a.blocks])
    assert not hess._tensors  # nothing kept in memory after collecting
    found = hmod.find_hessians(a, data.data_hash)
    assert found is not None and found is not hess
    for site in a.linears:
        assert torch.equal(found.get(site.name), ref[input_key(site)]), site.name
        assert len(found._loaded) <= hmod.KEEP_LOADED


def test_interrupted_collection_leaves_nothing_found(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOCOMPRESS_CACHE", str(tmp_path))
    data = load_token_data(tiny_llama.tokenizer, TINY_DATA)
    last = tiny_llama.anatomy.blocks[-1].prefix

    def boom(*_a):
        raise OSError("disk full")

    h = tiny_llama.model.get_submodule(last).register_forward_pre_hook(boom)
    try:
        with pytest.raises(OSError):
            calibration_hessians(tiny_llama.model, tiny_llama.anatomy, data)
    finally:
        h.remove()
    assert hmod.find_hessians(tiny_llama.anatomy, data.data_hash) is None
    assert not list((tmp_path / "hessians").iterdir())  # the partial folder is removed


def test_single_file_cache_of_earlier_versions_is_read(tiny_llama, tmp_path, monkeypatch):
    from safetensors.torch import save_file

    monkeypatch.setenv("AUTOCOMPRESS_CACHE", str(tmp_path))
    data = load_token_data(tiny_llama.tokenizer, TINY_DATA)
    ref = collect_hessians(tiny_llama.model, tiny_llama.anatomy, data.calib)
    folder = hmod._path(tiny_llama.anatomy.model_hash, data.data_hash)
    folder.parent.mkdir(parents=True)
    save_file(ref, str(folder.with_name(folder.name + ".safetensors")))
    found = hmod.find_hessians(tiny_llama.anatomy, data.data_hash)
    site = tiny_llama.anatomy.linears[-1]
    assert torch.equal(found.get(site.name), ref[input_key(site)])
