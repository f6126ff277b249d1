"""Fuzzing the hardware-profile and search-space schemas: random or mutated input either loads or
raises our error type (one line) — never another exception, never a silently dropped field."""

from __future__ import annotations

import copy
import functools

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autocompress._io import parse_yaml
from autocompress.errors import AutocompressError, ProfileError, SpaceError
from autocompress.hardware import HardwareProfile, profiles_dir
from autocompress.hardware.profile import profile_from_dict
from autocompress.model import load_model
from autocompress.plan import Provenance
from autocompress.space import LINEAR_KNOBS, STRUCTURE_KNOBS, SearchSpace, SpaceContext, spaces_dir

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(["2:4", "gptq", "svd", "null", "", "-1", "1e309", "fp16", "int4"])
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


def _one_line(exc: Exception) -> None:
    assert isinstance(exc, AutocompressError)
    assert str(exc) and "\n" not in str(exc)


# ---- hardware profiles --------------------------------------------------------------------------
@functools.cache
def _shipped_profile() -> dict:
    return yaml.safe_load((profiles_dir() / "jetson-orin-nano-25w.yaml").read_text())


def _load_profile(data: object) -> HardwareProfile | None:
    try:
        return profile_from_dict(data, "fuzz.yaml")
    except ProfileError as exc:
        _one_line(exc)
        return None


@FUZZ
@given(key=st.sampled_from(sorted(HardwareProfile.model_fields)), value=values, drop=st.booleans())
def test_mutated_profile_field(key: str, value, drop: bool) -> None:
    data = copy.deepcopy(_shipped_profile())
    if drop:
        data.pop(key, None)
    else:
        data[key] = value
    prof = _load_profile(data)
    field = HardwareProfile.model_fields[key]
    if drop and field.is_required():
        assert prof is None  # a missing required field is never filled in
    if prof is not None and not drop:
        got = getattr(prof, key)
        # what was given is what is used: no silent default in place of a given value
        assert got is not None or value is None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and isinstance(got, (int, float)):
            assert got == value


@FUZZ
@given(key=st.text(min_size=1, max_size=20).filter(lambda k: k not in HardwareProfile.model_fields), value=values)
def test_unknown_profile_field_is_refused(key: str, value) -> None:
    data = {**_shipped_profile(), key: value}
    assert _load_profile(data) is None


@FUZZ
@given(
    key=st.sampled_from(["memory_GB", "peak_bw_GBps", "fp16_tflops", "idle_W", "active_W", "bw_efficiency"]),
    value=st.floats(max_value=0) | st.floats(allow_nan=True).filter(lambda v: v != v),
)
def test_non_positive_numbers_are_refused(key: str, value: float) -> None:
    assert _load_profile({**_shipped_profile(), key: value}) is None


@FUZZ
@given(key=st.sampled_from(["weight_only_bits", "sparse_2_4_speedup", "sparse_runtime", "colour"]), value=values)
def test_mutated_kernels(key: str, value) -> None:
    data = copy.deepcopy(_shipped_profile())
    data["kernels"] = {**data.get("kernels", {}), key: value}
    prof = _load_profile(data)
    if key == "colour":
        assert prof is None


# ---- search spaces ------------------------------------------------------------------------------
@functools.cache
def _default_space() -> dict:
    return yaml.safe_load((spaces_dir() / "default.yaml").read_text())


@functools.cache
def _ctx() -> SpaceContext:
    anatomy = load_model("tiny-llama").anatomy
    return SpaceContext(anatomy=anatomy, drop_order=list(range(anatomy.num_blocks)), provenance=Provenance())


def _load_space(data: object) -> SearchSpace | None:
    try:
        space = SearchSpace.from_dict(data, "fuzz.yaml")
    except SpaceError as exc:
        _one_line(exc)
        return None
    # a space that loads must give plans for a model, or say why not in our error type
    ctx = _ctx()
    try:
        space.baseline_params(ctx.anatomy)
        for plan in space.extreme_plans(ctx)[:4]:
            plan.validate(ctx.anatomy)
    except AutocompressError as exc:
        _one_line(exc)
    return space


SCHEMAS = {"profile": (_load_profile, ProfileError), "space": (_load_space, SpaceError)}


@pytest.mark.parametrize("schema", list(SCHEMAS))
@FUZZ
@given(data=values)
def test_random_documents(schema: str, data) -> None:
    SCHEMAS[schema][0](data)


@pytest.mark.parametrize("schema", list(SCHEMAS))
@FUZZ
@given(text=st.text(max_size=200))
def test_random_text(schema: str, text: str) -> None:
    load, error = SCHEMAS[schema]
    try:
        data = parse_yaml(text, error, "fuzz.yaml")
    except error as exc:
        _one_line(exc)
        return
    load(data)


level = (
    st.sampled_from(
        [0, 1, 2, 3, 4, 8, 16, 17, 0.0, 0.3, 0.5, 0.9, 1.0, 1.5, -1, None, "2:4", "gptq", "rtn", "svd", "wanda", True]
    )
    | scalars
)


@FUZZ
@given(
    section=st.sampled_from(["linear", "structure", "overrides.mlp", "overrides.attn"]),
    knob=st.sampled_from([*LINEAR_KNOBS, *STRUCTURE_KNOBS, "colour"]),
    levels=st.lists(level, min_size=0, max_size=4) | values,
)
def test_mutated_space_levels(section: str, knob: str, levels) -> None:
    data = copy.deepcopy(_default_space())
    where = data
    for part in section.split("."):
        where = where.setdefault(part, {})
    where[knob] = levels
    space = _load_space(data)
    if knob == "colour" or (section == "structure") != (knob in STRUCTURE_KNOBS):
        assert space is None  # a knob in the wrong place is refused, not ignored
    if space is not None:
        got = space.overrides[section.split(".")[1]] if section.startswith("overrides") else getattr(space, section)
        assert list(got[knob]) == levels  # the levels given are the levels used


@FUZZ
@given(key=st.sampled_from(["name", "granularity", "alignment", "baselines", "description", "extra"]), value=values)
def test_mutated_space_top_level(key: str, value) -> None:
    space = _load_space({**_default_space(), key: value})
    if key == "extra":
        assert space is None
