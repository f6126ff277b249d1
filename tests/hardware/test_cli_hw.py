"""`autocompress hw ...`: list, show with sources, calibrate's input checks."""

from __future__ import annotations

import pytest

from autocompress.cli import main


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(argv)
        raise SystemExit(0)
    out = capsys.readouterr()
    return exc.value.code or 0, out.out, out.err


def test_hw_list_shows_at_least_14_profiles_with_status(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["hw", "list"], capsys)
    assert code == 0
    rows = [line for line in out.splitlines() if line.startswith("│ ") and line.split("│")[1].strip()]
    assert len(rows) >= 14
    assert " no " in out  # calibration status column


def test_hw_show_jetson_prints_the_resolved_profile_with_sources(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["hw", "show", "jetson"], capsys)
    assert code == 0
    assert "id: jetson-orin-nano-25w" in out and "calibrated: false" in out
    assert "sources:" in out and "S30" in out and "anchors:" in out


@pytest.mark.parametrize(
    ("argv", "needle"),
    [(["--out", "x.txt"], ".yaml path"), (["--out", "x.yaml", "--threads", "0"], "positive")],
)
def test_hw_calibrate_rejects_bad_options_before_measuring(argv, needle, capsys, tmp_path) -> None:
    code, _, err = run(["hw", "calibrate", *argv], capsys)
    assert code == 2 and needle in err and "\n" not in err.strip()
