"""The README's examples really run: every block marked ``<!-- test -->`` is executed in order in a
scratch folder (shell blocks with bash, Python blocks with this interpreter), and the CLI reference
table lists exactly the commands the app has."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import typer

from autocompress.cli import app

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"<!-- test -->\n```(bash|python)\n(.*?)```", README, flags=re.DOTALL)


def _commands(group, prefix: str = "") -> dict[str, str]:
    found = {}
    for name, cmd in group.commands.items():
        if hasattr(cmd, "commands"):
            found.update(_commands(cmd, f"{prefix}{name} "))
        else:
            found[f"{prefix}{name}"] = (cmd.help or "").strip().splitlines()[0]
    return found


def test_cli_reference_lists_every_command_with_its_help() -> None:
    listed = dict(re.findall(r"^\| `([a-z ]+)` \| (.+?) \|$", README, flags=re.MULTILINE))
    assert listed == _commands(typer.main.get_command(app))


def test_marked_blocks_run(tmp_path: Path) -> None:
    assert len(BLOCKS) >= 5
    (tmp_path / "hw_profiles").symlink_to(ROOT / "hw_profiles")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env["PYTHONPATH"] = str(ROOT)
    for i, (kind, code) in enumerate(BLOCKS):
        if kind == "bash":
            cmd = ["bash", "-e", "-o", "pipefail", "-c", code]
        else:
            script = tmp_path / f"block{i}.py"
            script.write_text(code)
            cmd = [sys.executable, str(script)]
        done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"README block {i} failed:\n{code}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
        if "nosuchdevice" in code:
            assert "error: unknown hardware profile 'nosuchdevice'" in done.stderr and "exit code 2" in done.stdout
    assert (tmp_path / "quick-int8" / "model.safetensors").is_file()
    assert (tmp_path / "plan.yaml").is_file() and (tmp_path / "studies" / "shared" / "worker-1.log").is_file()
