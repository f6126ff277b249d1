"""Atomic file output: write to a temporary name in the same folder, then rename.

Temporary names are created private (``mkstemp`` 0600, ``mkdtemp`` 0700, and safetensors writes
0600 files); before the rename every output is given the mode a plain ``open()`` / ``mkdir`` would
have given it under the user's umask, so the private mode never survives into the result."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def cache_dir() -> Path:
    """Give the folder for converted models and cached statistics (``$AUTOCOMPRESS_CACHE`` overrides)."""
    root = os.environ.get("AUTOCOMPRESS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "autocompress")
    return Path(root)


def follow_umask(path: str | Path) -> None:
    """Give ``path`` (and, for a folder, everything in it) the modes the umask gives new files:
    0o777 & ~umask for folders and executables, 0o666 & ~umask for other files. Links are left alone."""
    mask = _umask()
    root = Path(path)
    todo = [root, *root.rglob("*")] if root.is_dir() and not root.is_symlink() else [root]
    for p in todo:
        if p.is_symlink():
            continue
        executable = p.is_dir() or os.stat(p).st_mode & 0o111
        os.chmod(p, (0o777 if executable else 0o666) & ~mask)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        follow_umask(tmp)  # mkstemp makes 0600; give the mode a plain open() would
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def check_writable(folder: str | Path, error: type[Exception]) -> None:
    """Raise ``error`` if ``folder`` cannot be created and written; leave behind no folder this check made."""
    folder = Path(folder)
    blocker = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise error(f"output folder {folder} cannot be created: {blocker} is a file")
    created = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise error(f"output folder {folder} is not writable ({exc.strerror or exc.__class__.__name__})") from None
    finally:
        for p in created:
            with contextlib.suppress(OSError):
                p.rmdir()


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder that replaces ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        follow_umask(tmp)  # mkdtemp makes 0700 and safetensors writes 0600: give what mkdir / open() would
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_yaml(path: str | Path, error: type[Exception], what: str) -> Any:
    """Give the parsed content of a YAML file (``safe_load``); any problem raises ``error`` in one line."""
    return parse_yaml(read_text(path, error, what), error, str(path))


def read_text(path: str | Path, error: type[Exception], what: str) -> str:
    """Give the text of a UTF-8 file; a missing or unreadable file raises ``error`` in one line."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{what} not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"cannot read {what} {path}: {exc.__class__.__name__}") from None


def parse_yaml(text: str, error: type[Exception], source: str) -> Any:
    """Give the parsed content of YAML text; malformed YAML raises ``error`` naming the line."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise error(f"{source}: not valid YAML{where}") from None
