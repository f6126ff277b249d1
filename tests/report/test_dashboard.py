"""`autocompress dashboard` serves the study with optuna-dashboard on 127.0.0.1."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from autocompress.cli import main
from tests.export.study_fixture import STUDY


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dashboard_serves_the_study_with_readable_trial_attributes(tiny_study) -> None:
    port = _free_port()
    cmd = [sys.executable, "-m", "autocompress.cli", "dashboard", "--study", STUDY, "--out", str(tiny_study.parent)]
    proc = subprocess.Popen([*cmd, "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        body = None
        for _ in range(60):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/1?after=0", timeout=2) as r:
                    body = json.loads(r.read())
                break
            except OSError:
                time.sleep(0.5)
        assert body is not None, "dashboard did not answer"
        attrs = {a["key"] for t in body["trials"] for a in t["user_attrs"]}
        assert {"cost", "plan_hash", "rung", "screened_out"} <= attrs
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_dashboard_errors_are_one_line(tmp_path, capsys) -> None:
    for args, fragment in (([], "--study NAME"), (["--study", "nope"], "no study database")):
        with pytest.raises(SystemExit) as exc:
            main(["dashboard", "--out", str(tmp_path), *args])
        assert exc.value.code == 2 and fragment in capsys.readouterr().err
