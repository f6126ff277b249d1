"""Hardware profiles: every shipped file validates; names resolve; bad files give one clear line."""

from __future__ import annotations

import itertools
import math
import re
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from autocompress.errors import ProfileError
from autocompress.hardware import HardwareProfile, list_profiles, load_profile, profiles_dir, resolve_name
from autocompress.hardware.profile import ENV_PROFILES_DIR, Kernels

# the shipped profiles are the files in hw_profiles/ (a machine's own calibrated local.yaml and
# local-llamacpp.yaml, both git-ignored, may sit beside them)
LOCAL = ("local", "local-llamacpp")
SHIPPED = sorted(p.stem for p in profiles_dir().glob("*.yaml") if p.stem not in LOCAL)


def _raw(profile_id: str) -> dict:
    return yaml.safe_load((profiles_dir() / f"{profile_id}.yaml").read_text())


def _write(tmp_path: Path, data: dict, name: str = "bad.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_every_profile_file_loads_under_its_own_name_and_no_alias_is_shared() -> None:
    profiles = [p for p in list_profiles() if p.id not in LOCAL]
    assert SHIPPED and [p.id for p in profiles] == SHIPPED  # no file silently skipped; each file's id is its name
    names = [n for p in profiles for n in (p.id, *p.aliases)]
    assert len(names) == len(set(names)), "an alias names two profiles (or shadows an id)"
    for p in profiles:
        assert p.calibrated is False  # a shipped file is a prior, never a measurement of this machine


def _watts(profile_id: str) -> tuple[str, float] | None:
    """Give (device, power mode in W) for ids like ``jetson-orin-nano-15w``; ``-maxn`` is the top mode."""
    m = re.match(r"^(.*)-(\d+)w$", profile_id) or re.match(r"^(.*)-(maxn)$", profile_id)
    return (m.group(1), math.inf if m.group(2) == "maxn" else float(m.group(2))) if m else None


def test_a_higher_power_mode_of_one_device_is_never_slower_or_cooler() -> None:
    """The power modes of one device must be ordered: more watts never means less bandwidth or compute."""
    modes: dict[str, list[tuple[float, HardwareProfile]]] = {}
    for p in list_profiles():
        w = _watts(p.id)
        if w is not None and not p.calibrated:
            modes.setdefault(w[0], []).append((w[1], p))
    assert len(modes.get("jetson-orin-nano", [])) >= 3  # 7 / 15 / 25 W: the ids were parsed
    for device, ps in modes.items():
        ps.sort(key=lambda wp: wp[0])
        for (_, lo), (_, hi) in itertools.pairwise(ps):
            for field in ("peak_bw_GBps", "fp16_tflops", "int8_tops", "active_W"):
                assert getattr(lo, field) <= getattr(hi, field), f"{device}: {field} {lo.id} > {hi.id}"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("jetson", "jetson-orin-nano-25w"),
        ("jetson-orin-nano", "jetson-orin-nano-25w"),
        ("rpi", "raspberry-pi-5"),
        ("laptop", "x86-avx2-laptop"),
        ("agx-orin", "jetson-agx-orin-maxn"),
        ("h100", "nvidia-h100-sxm"),
        ("a100", "nvidia-a100-80gb"),
        ("nvidia-t4", "nvidia-t4"),
    ],
)
def test_ids_and_aliases_resolve(name: str, expected: str) -> None:
    assert load_profile(name).id == expected


def test_jetson_alias_is_the_super_25w_profile() -> None:
    p = load_profile("jetson")
    assert p.peak_bw_GBps == 102.0 and p.power_mode == "25W"


def test_load_by_path(tmp_path: Path) -> None:
    path = _write(tmp_path, {**_raw("raspberry-pi-5"), "id": "my-pi"}, "my-pi.yaml")
    assert load_profile(str(path)).id == "my-pi"


def test_unknown_name_lists_ids_and_aliases() -> None:
    with pytest.raises(ProfileError) as err:
        load_profile("tpu-v9")
    msg = str(err.value)
    assert msg.startswith("unknown hardware profile 'tpu-v9'; available: ")
    for pid in SHIPPED:
        assert pid in msg
    for alias in ("jetson", "rpi", "cpu"):
        assert alias in msg.split("aliases:")[1]
    assert "\n" not in msg


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("peak_bw_GBps", -1.0, "greater than 0"),
        ("bw_efficiency", 1.5, "less than or equal to 1"),
        ("idle_W", 0, "greater than 0"),
        ("device_class", "toaster", "device_class"),
        ("turbo_mode", True, "unknown field"),
    ],
)
def test_bad_field_names_file_and_field(tmp_path: Path, field: str, value: object, needle: str) -> None:
    path = _write(tmp_path, {**_raw("nvidia-t4"), field: value})
    with pytest.raises(ProfileError) as err:
        load_profile(str(path))
    msg = str(err.value)
    assert str(path) in msg and f"'{field}'" in msg and needle in msg
    assert "\n" not in msg


@pytest.mark.parametrize("field", ["active_W", "peak_bw_GBps", "calibrated", "sources"])
def test_missing_field_is_named(tmp_path: Path, field: str) -> None:
    data = _raw("jetson-orin-nano-25w")
    del data[field]
    with pytest.raises(ProfileError, match=rf"bad\.yaml: field '{field}': required field is missing"):
        load_profile(str(_write(tmp_path, data)))


def test_nested_field_is_named(tmp_path: Path) -> None:
    data = _raw("nvidia-a100-80gb")
    data["kernels"]["sparse_2_4_speedup"] = 0.5
    with pytest.raises(ProfileError, match=r"field 'kernels\.sparse_2_4_speedup'"):
        load_profile(str(_write(tmp_path, data)))


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"usable_memory_GB": 100.0}, "usable_memory_GB"),
        ({"idle_W": 500.0}, "active_W"),
        ({"int8_tops": None}, "int8_tops"),
    ],
)
def test_inconsistent_profile_is_rejected(tmp_path: Path, change: dict, needle: str) -> None:
    with pytest.raises(ProfileError, match=needle):
        load_profile(str(_write(tmp_path, {**_raw("nvidia-t4"), **change})))


def test_malformed_and_empty_yaml(tmp_path: Path) -> None:
    bad = tmp_path / "broken.yaml"
    bad.write_text("id: x\n  peak_bw_GBps: [1, 2\n")
    with pytest.raises(ProfileError, match=r"broken\.yaml: not valid YAML \(line \d+\)"):
        load_profile(str(bad))
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ProfileError, match="empty"):
        load_profile(str(empty))
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ProfileError, match="mapping"):
        load_profile(str(listy))
    with pytest.raises(ProfileError, match="not found"):
        load_profile(str(tmp_path / "nope.yaml"))


def test_env_override_and_duplicate_alias(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pi, t4 = _raw("raspberry-pi-5"), _raw("nvidia-t4")
    monkeypatch.setenv(ENV_PROFILES_DIR, str(tmp_path))
    _write(tmp_path, pi, "raspberry-pi-5.yaml")
    assert profiles_dir() == tmp_path
    assert [p.id for p in list_profiles()] == ["raspberry-pi-5"]
    assert load_profile("rpi").id == "raspberry-pi-5"
    _write(tmp_path, {**t4, "aliases": ["rpi"]}, "nvidia-t4.yaml")
    with pytest.raises(ProfileError, match="'rpi' is used by both"):
        list_profiles()


def test_profile_is_immutable() -> None:
    p = load_profile("jetson")
    with pytest.raises(Exception):  # noqa: B017 - pydantic raises its own ValidationError type
        p.peak_bw_GBps = 1.0  # type: ignore[misc]
    assert isinstance(p, HardwareProfile)


@given(
    supported=st.sets(st.integers(2, 8), max_size=7).map(lambda s: tuple(sorted(s))),
    bits=st.integers(2, 16),
)
def test_stored_bits_never_claims_a_missing_kernel(supported: tuple[int, ...], bits: int) -> None:
    k = Kernels(weight_only_bits=supported)
    stored = k.stored_bits(bits)
    assert stored >= bits
    assert stored == 16 or stored in supported
    assert all(not (bits <= b < stored) for b in supported)  # the smallest width that fits
    if bits > 2:
        assert k.stored_bits(bits - 1) <= stored


def _only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *ids: str) -> None:
    raws = {pid: _raw(pid) for pid in ids}
    monkeypatch.setenv(ENV_PROFILES_DIR, str(tmp_path))
    for pid, data in raws.items():
        _write(tmp_path, data, f"{pid}.yaml")


def _local(**change: object) -> dict:
    data = {**_raw("x86-avx2-laptop"), "id": "local", "aliases": ["cpu"], "calibrated": True}
    data["calibration"] = {
        "date": "2026-01-01",
        "host": "test",
        "threads": 1,
        "seconds": 1.0,
        "samples": 10,
        "measurements": "local.measurements.json",
        "fit_mape": 0.05,
        "tool": "test",
    }
    return {**data, **change}


def test_cpu_alias_falls_back_to_the_x86_prior(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _only(tmp_path, monkeypatch, "x86-avx2-laptop", "raspberry-pi-5")
    assert load_profile("cpu").id == "x86-avx2-laptop"
    assert "no calibrated local profile" in resolve_name("cpu")


def test_cpu_alias_prefers_the_calibrated_local_profile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    local = _local()
    _only(tmp_path, monkeypatch, "x86-avx2-laptop")
    _write(tmp_path, local, "local.yaml")
    p = load_profile("cpu")
    assert p.id == "local" and p.calibrated and p.calibration is not None
    assert resolve_name("cpu") == "local (alias 'cpu')"
    assert load_profile("x86-avx2-laptop").id == "x86-avx2-laptop"  # the prior stays reachable by id


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"calibration": None}, "no calibration block"),
        ({"energy_pJ_per_byte": 50.0}, "go together"),
        ({"kernels": {"unstructured_sparse_storage": True}}, "sparse_runtime"),
        ({"dense_bits": 8}, "dense_bits"),
    ],
)
def test_inconsistent_calibrated_profile_is_rejected(tmp_path: Path, change: dict, needle: str) -> None:
    with pytest.raises(ProfileError, match=needle):
        load_profile(str(_write(tmp_path, _local(**change))))


def test_bad_anchor_is_named(tmp_path: Path) -> None:
    data = _raw("raspberry-pi-5")
    data["anchors"][0]["role"] = "trained"
    with pytest.raises(ProfileError, match=r"field 'anchors\.0\.role'"):
        load_profile(str(_write(tmp_path, data)))
