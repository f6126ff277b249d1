"""`autocompress report`: content, self-contained HTML, and a real render in headless Chromium."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from autocompress.cli import main
from autocompress.export.study import open_study
from autocompress.report import write_report
from autocompress.report.build import roofline_pct
from tests.export.study_fixture import LATENCY_BUDGET, STUDY


@pytest.fixture(scope="module")
def report(tiny_study, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    write_report(open_study(STUDY, tiny_study.parent), out)
    return out


def test_report_lists_the_front_baselines_screened_trials_and_commands(tiny_study, report) -> None:
    view = open_study(STUDY, tiny_study.parent)
    md = (report / "report.md").read_text()
    for c in view.front:
        assert re.search(rf"^\| {c.trial} \| ", md, re.M), f"front trial {c.trial} missing"
        assert f"autocompress apply {c.plan_path}" in md
        assert (report / "figures" / f"layers-{c.trial}.png").stat().st_size > 5000
    screened = [t.number for t in view.trials if "screened_out" in t.user_attrs]
    assert screened and f"Screened out by the cost model ({len(screened)} trials" in md
    assert "## Uniform baselines" in md and "Spearman" in md
    assert f"--budget latency_ms={LATENCY_BUDGET:g}" in md  # the search command reproduces the study's settings
    pct = roofline_pct(view.front[0].cost)
    assert pct is not None and 0 < pct <= 100 and f"{pct:.3g}" in md
    for img in re.findall(r"!\[[^]]*\]\(([^)]+)\)", md):
        assert (report / img).is_file()


def test_html_is_self_contained(report) -> None:
    page = (report / "report.html").read_text()
    assert not re.search(r"""<script[^>]+src=|<link[^>]+href=|src=["']https?:""", page)
    assert page.count('<img class="fig" alt=') == len(list((report / "figures").glob("*.png")))
    assert len(re.findall(r'<img class="fig"[^>]* src="data:image/png;base64,', page)) == page.count('<img class="fig"')
    assert "Plotly.newPlot" in page or "plotly" in page.lower()


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_report_renders_in_headless_chromium(report, tmp_path) -> None:
    exe = _chromium()
    if exe is None:
        pytest.skip("no Chromium on this machine (Debian: apt-get install -y chromium); the render check needs one")
    url = (report / "report.html").resolve().as_uri()
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--virtual-time-budget=8000",
        f"--user-data-dir={tmp_path / 'p'}",
    ]
    dom = subprocess.run([exe, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    n = len(list((report / "figures").glob("*.png")))
    assert f'data-images-loaded="{n}/{n}"' in dom  # every embedded PNG decoded
    assert "main-svg" in dom  # plotly drew the interactive plot
    shot = tmp_path / "shot.png"
    subprocess.run(
        [exe, *flags, "--window-size=1280,2000", f"--screenshot={shot}", url], capture_output=True, timeout=120
    )
    import matplotlib.image as mpimg

    pixels = mpimg.imread(str(shot))
    assert pixels.shape[0] >= 1000 and pixels[..., :3].std() > 0.05  # not a blank page


def test_report_cli_and_its_errors(tiny_study, tmp_path, capsys) -> None:
    main(["report", "--study", STUDY, "--studies", str(tiny_study.parent), "--out", str(tmp_path / "r")])
    assert (tmp_path / "r" / "report.html").is_file() and "report.html" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["report", "--study", "missing", "--studies", str(tmp_path), "--out", str(tmp_path / "r2")])
    assert exc.value.code == 2 and "no study database" in capsys.readouterr().err


def test_report_shows_measured_latency_once_the_front_was_verified(tiny_study, tmp_path) -> None:
    from autocompress.export.study import verify_front

    records = verify_front(tiny_study, 1)
    write_report(open_study(STUDY, tiny_study.parent), tmp_path)
    md = (tmp_path / "report.md").read_text()
    measured = records[0]["latency"]["measured_decode_ms"]
    row = next(line for line in md.splitlines() if line.startswith(f"| {records[0]['trial']} | "))
    assert f"{measured:.3g}" in row  # the front table carries the measured latency
    assert (tmp_path / "figures" / "measured.png").is_file() and "No measurements stored" not in md
