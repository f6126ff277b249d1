"""Shared fixtures: tiny random-init models with small token budgets keep the suite fast."""

from __future__ import annotations

import copy
import os
import stat
from pathlib import Path

import pytest

from autocompress.calib import DataConfig
from autocompress.model import load_model
from autocompress.plan import ModelRef, Plan

TINY_DATA = DataConfig(seq_len=64, calib_tokens=512, proxy_tokens=128, eval_tokens=256)


@pytest.fixture(autouse=True)
def _private_eval_cache(tmp_path_factory, monkeypatch):
    """Each test gets an empty evaluation cache, so no test sees another's results (subprocesses inherit it)."""
    monkeypatch.setenv("AUTOCOMPRESS_EVAL_CACHE", str(tmp_path_factory.mktemp("evals")))


@pytest.fixture(params=["tiny-llama", "tiny-gpt2", "tiny-bert"])
def any_tiny(request):
    return load_model(request.param)


@pytest.fixture
def tiny_llama():
    return load_model("tiny-llama")


@pytest.fixture
def umask_027():
    """Run the test under umask 027 (group may read, others nothing), as a cautious user would."""
    old = os.umask(0o027)
    yield 0o027
    os.umask(old)


def assert_modes_follow_umask(root: Path, mask: int) -> int:
    """Check ``root`` and everything in it has the mode a plain mkdir / open() gives under ``mask``; give the count."""
    paths = [root, *root.rglob("*")]
    for p in paths:
        if p.is_symlink():
            continue
        mode = stat.S_IMODE(p.stat().st_mode)
        want = (0o777 if p.is_dir() or mode & 0o111 else 0o666) & ~mask
        assert mode == want, f"{p} has mode {oct(mode)}, the umask {oct(mask)} gives {oct(want)}"
    return len(paths)


def as_stored(model):
    """Give the model as the HF export stores it, read back in fp32: every weight rounded to the base
    dtype (bf16 / fp16) and widened again (exact)."""
    from autocompress.export.hf import storage_dtype

    out = copy.deepcopy(model)
    dtype = storage_dtype(model)
    for p in out.parameters():
        p.data = p.data.to(dtype).float()
    return out


def plan_for(anatomy, **kwargs) -> Plan:
    """A plan for ``anatomy`` with the given Plan fields."""
    ref = ModelRef.of(anatomy)
    return Plan(model=ref, **kwargs)


def _pg_bin(name: str) -> str | None:
    import glob
    import shutil

    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


@pytest.fixture(scope="session")
def postgres_url():
    """A real PostgreSQL server on 127.0.0.1 at a random port, for the session; skipped if not installed."""
    import os
    import shutil
    import socket
    import subprocess

    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip("PostgreSQL server binaries not installed (`apt-get install postgresql`; .ci/run does it)")
    pytest.importorskip("psycopg2", reason="psycopg2-binary is not installed (it is in the dev extras)")
    import tempfile
    from pathlib import Path

    root = Path(tempfile.mkdtemp(prefix="autocompress-pg-"))  # pytest's tmp parents are private to root
    as_user: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(root, user="postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = root / "data"
    subprocess.run(
        [*as_user, initdb, "-D", str(data), "-A", "trust", "-U", "postgres"], check=True, capture_output=True
    )
    opts = f"-p {port} -k {root} -h 127.0.0.1"
    subprocess.run(
        [*as_user, pg_ctl, "-D", str(data), "-o", opts, "-w", "-l", str(root / "log"), "start"],
        check=True,
        capture_output=True,
    )
    try:
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres")
        conn.autocommit = True
        conn.cursor().execute("CREATE DATABASE autocompress")
        conn.close()
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/autocompress"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
