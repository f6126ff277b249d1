from __future__ import annotations

import functools

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from autocompress.errors import PlanError
from autocompress.plan import BlockChoice, LayerChoice, Plan, Provenance
from tests.conftest import plan_for


def _mixed_plan(a):
    names = [s.name for s in a.linears]
    return plan_for(
        a,
        default=LayerChoice(bits=8),
        layers={
            names[0]: LayerChoice(bits=4, group_size=32, symmetric=False),
            names[3]: LayerChoice(sparsity=0.5, sparsity_pattern="2:4"),
        },
        blocks={1: BlockChoice(keep_heads=2, keep_mlp_channels=64)},
        drop_blocks=(2,),
        provenance=Provenance(data_hash="abc", seed=7, profile="jetson-orin-nano-25w", versions={"torch": "2.13.0"}),
    )


def test_yaml_round_trip_is_byte_identical(tiny_llama, tmp_path):
    plan = _mixed_plan(tiny_llama.anatomy)
    p1 = plan.save(tmp_path / "a.yaml")
    loaded = Plan.load(p1)
    assert loaded == plan
    p2 = loaded.save(tmp_path / "b.yaml")
    assert p1.read_bytes() == p2.read_bytes()


def test_hash_ignores_target_but_not_choices(tiny_llama):
    plan = _mixed_plan(tiny_llama.anatomy)
    assert plan.hash() == plan.with_provenance(profile="raspberry-pi-5", versions={}).hash()
    assert plan.hash() != plan.with_provenance(seed=8).hash()
    assert plan.hash() != plan.with_provenance(data_hash="abd").hash()
    assert plan.hash() != plan_for(tiny_llama.anatomy, default=LayerChoice(bits=4)).hash()
    assert len(plan.hash()) == 64


def test_hash_same_for_default_or_explicit_layer_entries(tiny_llama):
    a = tiny_llama.anatomy
    uniform = plan_for(a, default=LayerChoice(bits=8))
    explicit = plan_for(a, default=LayerChoice(bits=8), layers={a.linears[0].name: LayerChoice(bits=8)})
    assert uniform.hash() == explicit.hash()


def test_validate_accepts_a_good_plan(tiny_llama):
    _mixed_plan(tiny_llama.anatomy).validate(tiny_llama.anatomy)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"layers": {"model.layers.0.mlp.nope": LayerChoice(bits=4)}}, "unknown layer"),
        ({"drop_blocks": (0, 1, 2, 3)}, "drops all 4 blocks"),
        ({"drop_blocks": (9,)}, "block 9 does not exist"),
        ({"blocks": {0: BlockChoice(keep_heads=3)}}, "keep_heads"),
        ({"blocks": {0: BlockChoice(keep_mlp_channels=4096)}}, "keep_mlp_channels"),
        ({"blocks": {7: BlockChoice(keep_heads=2)}}, "block 7 does not exist"),
    ],
)
def test_validate_names_the_problem(tiny_llama, kwargs, fragment):
    with pytest.raises(PlanError, match=fragment):
        plan_for(tiny_llama.anatomy, **kwargs).validate(tiny_llama.anatomy)


def test_plan_for_another_model_is_refused(tiny_llama):
    from autocompress.model import load_model

    other = load_model("tiny-gpt2")
    with pytest.raises(PlanError, match="made for model"):
        plan_for(tiny_llama.anatomy).validate(other.anatomy)


def test_two_four_needs_divisible_input(tiny_llama):
    import dataclasses

    a = tiny_llama.anatomy
    site = a.linears[0]
    odd = dataclasses.replace(site, in_features=66)
    blocks = (dataclasses.replace(a.blocks[0], linears=(odd, *a.blocks[0].linears[1:])), *a.blocks[1:])
    a2 = dataclasses.replace(a, blocks=blocks)
    with pytest.raises(PlanError, match="divisible by 4"):
        plan_for(a2, default=LayerChoice(sparsity=0.5, sparsity_pattern="2:4")).validate(a2)


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("bits", 1, "bits"),
        ("bits", 17, "bits"),
        ("bits", 4.5, "bits"),
        ("sparsity", 1.0, "sparsity"),
        ("sparsity", -0.1, "sparsity"),
        ("rank_ratio", 0.0, "rank_ratio"),
        ("rank_ratio", 1.5, "rank_ratio"),
        ("group_size", 0, "group_size"),
        ("sparsity_pattern", "3:8", "sparsity_pattern"),
        ("prune_method", "random", "prune_method"),
    ],
)
def test_out_of_range_choices_name_the_field(field, value, fragment):
    with pytest.raises(PlanError, match=fragment):
        LayerChoice(**{field: value})


def test_rank_is_a_multiple_of_8_below_break_even():
    c = LayerChoice(rank_ratio=0.5)
    r = c.rank_for(1536, 576)
    r_star = 1536 * 576 / (1536 + 576)
    assert r % 8 == 0 and r <= r_star and abs(r - 0.5 * r_star) <= 4


def test_malformed_yaml_is_a_plan_error(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("model: {name: x\n  hash: [")
    with pytest.raises(PlanError, match="not valid YAML"):
        Plan.load(bad)
    bad.write_text("")
    with pytest.raises(PlanError, match="empty"):
        Plan.load(bad)
    with pytest.raises(PlanError, match="not found"):
        Plan.load(tmp_path / "missing.yaml")


def test_truncated_plan_file_is_a_plan_error(tiny_llama, tmp_path):
    text = _mixed_plan(tiny_llama.anatomy).to_yaml()
    lines = text.splitlines(keepends=True)
    # every cut at a line end past the header, and inside lines: each one must fail loudly, never load
    cuts = sorted({len("".join(lines[:i])) for i in range(2, len(lines))} | {len(text) // 3, len(text) - 40})
    for cut in cuts:
        f = tmp_path / f"t{cut}.yaml"
        f.write_text(text[:cut])
        with pytest.raises(PlanError) as exc:
            Plan.load(f)
        assert str(f) in str(exc.value) and "\n" not in str(exc.value)


def _saved(tiny_llama, tmp_path):
    plan = _mixed_plan(tiny_llama.anatomy)
    return plan, plan.save(tmp_path / "p.yaml")


def test_a_changed_number_is_refused_unless_forced(tiny_llama, tmp_path):
    plan, f = _saved(tiny_llama, tmp_path)
    text = f.read_text()
    assert "seed: 7\n" in text and "format: int4-g32-" in text
    for old, new in (("seed: 7\n", "seed: 8\n"), ("format: int4-g32-", "format: int4-g64-")):
        edited = tmp_path / "edited.yaml"
        edited.write_text(text.replace(old, new))
        with pytest.raises(PlanError, match=r"does not match the checksum.*--force") as exc:
            Plan.load(edited)
        assert str(edited) in str(exc.value)
        forced = Plan.load(edited, force=True)  # accepted as it now reads, and hashed from that content
        assert forced != plan and forced.hash() != plan.hash()
        assert forced.hash() == Plan.from_yaml(text.replace(old, new)).hash()
        again = forced.save(tmp_path / "again.yaml")  # saving writes a fresh checksum: loads unforced
        assert Plan.load(again) == forced


def test_a_reordered_but_equal_file_is_accepted(tiny_llama, tmp_path):
    plan, f = _saved(tiny_llama, tmp_path)
    header = [line for line in f.read_text().splitlines(keepends=True) if line.startswith("#")]
    body = yaml.safe_load(f.read_text())
    reordered = dict(reversed(list(body.items())))
    reordered["provenance"] = dict(reversed(list(body["provenance"].items())))
    text = "".join(header) + "# a comment of mine\n" + yaml.safe_dump(reordered, sort_keys=False, indent=4)
    assert text != f.read_text()
    g = tmp_path / "reordered.yaml"
    g.write_text(text)
    assert Plan.load(g) == plan


def test_a_plan_without_a_checksum_line_still_loads(tiny_llama, tmp_path):
    plan, f = _saved(tiny_llama, tmp_path)
    old = tmp_path / "old.yaml"  # as written before plans carried a checksum
    old.write_text("".join(line for line in f.read_text().splitlines(keepends=True) if "sha256" not in line))
    assert Plan.load(old) == plan
    bare = tmp_path / "bare.yaml"  # written by hand, no header at all
    bare.write_text(yaml.safe_dump(plan.to_dict()))
    assert Plan.load(bare) == plan


@functools.cache
def _tiny_plan_dict_frozen() -> str:
    from autocompress.model import load_model

    return yaml.safe_dump(_mixed_plan(load_model("tiny-llama").anatomy).to_dict())


def _tiny_plan_dict() -> dict:
    return yaml.safe_load(_tiny_plan_dict_frozen())


@settings(max_examples=150, deadline=None)
@given(
    key=st.sampled_from(["bits", "group_size", "symmetric", "sparsity", "rank_ratio", "sparsity_pattern", "bogus"]),
    value=st.one_of(st.none(), st.booleans(), st.integers(-5, 40), st.floats(allow_nan=True), st.text(max_size=5)),
)
def test_fuzzed_layer_fields_raise_plan_error_or_load(key, value):
    d = _tiny_plan_dict()
    d["default"] = {key: value}
    try:
        plan = Plan.from_dict(yaml.safe_load(yaml.safe_dump(d)))
    except PlanError:
        return
    # accepted: then it must be a valid, round-trippable plan
    assert Plan.from_yaml(plan.to_yaml()) == plan
