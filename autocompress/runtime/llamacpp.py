"""llama.cpp's own tools on this machine: built once from the source PyPI ships, found, and run.

The ``llama-cpp-python`` source distribution vendors llama.cpp (``vendor/llama.cpp``). ``build``
downloads that sdist with pip (a package registry: no other network is needed), compiles only the
command-line tools autocompress uses (CPU, Release, static) and keeps them in a versioned cache::

    ~/.cache/autocompress/llama.cpp/<llama-cpp-python version>-<llama.cpp commit>-<flavor>-<cpu>/bin

``<cpu>`` is a short hash of this CPU's model and flags: the tools are built with ``GGML_NATIVE``
(less AMX, see ``NO_AMX``) and run only on CPUs like the one that built them. The vendored source tree stays beside ``bin``
(its ``convert_hf_to_gguf.py`` and ``gguf-py`` are what GGUF export falls back on for a
tokenizer). ``AUTOCOMPRESS_LLAMA_CPP=/path/to/bin`` uses an existing build instead.
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from autocompress.errors import AutocompressError

LLAMA_CPP_PYTHON = "0.3.36"
LLAMA_CPP_COMMIT = "0c1e57098bba"  # the llama.cpp commit that sdist vendors (its release notes)
TOOLS = (
    "llama-quantize",
    "llama-perplexity",
    "llama-bench",
    "llama-imatrix",
    "llama-simple",
    "llama-completion",
    "llama-tokenize",
)
ENV = "AUTOCOMPRESS_LLAMA_CPP"
# -march=native turns on AMX wherever the CPU lists it, but virtual machines may list AMX and still fault
# on its instructions (seen here: SIGILL in ggml's AMX matmul on a VM whose /proc/cpuinfo lists amx_tile);
# explicit -mno-* flags win over -march=native. AMX only speeds batched prefill on Sapphire Rapids and later.
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
FLAVOR = "cpu-noamx"  # build options that change the binaries: part of the cache folder's name
SETUP_HINT = f"run `make setup` (or `autocompress llamacpp build`), or set {ENV}=/path/to/llama.cpp/bin"


class LlamaCppError(AutocompressError):
    """llama.cpp's tools are missing, or one of them failed."""


def _cpu_tag() -> str:
    """Give a short hash of this CPU's model name and flags (GGML_NATIVE builds are CPU-specific)."""
    text = platform.machine()
    try:
        info = Path("/proc/cpuinfo").read_text()
        keep = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags", "Features"))]
        text += "\n".join(sorted(set(keep)))
    except OSError:
        text += platform.processor()
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def cache_dir() -> Path:
    """Give the folder this version's build lives in on this machine (it may not exist yet)."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "autocompress" / "llama.cpp"
    return root / f"{LLAMA_CPP_PYTHON}-{LLAMA_CPP_COMMIT}-{FLAVOR}-{_cpu_tag()}"


@dataclass(frozen=True)
class LlamaCpp:
    """A usable set of llama.cpp tools: ``bin`` holds them, ``source`` the vendored tree (or None)."""

    bin: Path
    source: Path | None = None

    def tool(self, name: str) -> Path:
        """Give the path of one tool, or raise LlamaCppError naming the set-up command."""
        path = self.bin / name
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise LlamaCppError(f"llama.cpp tool {name} not found in {self.bin}; {SETUP_HINT}")
        return path

    def run(
        self, name: str, args: Sequence[str | os.PathLike], *, timeout: float = 3600, what: str = ""
    ) -> subprocess.CompletedProcess:
        """Run one tool; give its completed process, or raise LlamaCppError with the last lines it printed."""
        cmd = [str(self.tool(name)), *map(str, args)]
        # Output goes to files, not pipes: llama.cpp's asynchronous logger loses its last lines (the
        # perplexity's final estimate among them) in about half the runs when it writes into a pipe.
        with tempfile.TemporaryFile("w+b") as out, tempfile.TemporaryFile("w+b") as err:
            try:
                code = subprocess.run(cmd, stdout=out, stderr=err, timeout=timeout).returncode
            except subprocess.TimeoutExpired:
                raise LlamaCppError(f"{name} ran past {timeout:.0f} s{' ' + what if what else ''}") from None
            out.seek(0)
            err.seek(0)
            proc = subprocess.CompletedProcess(
                cmd, code, out.read().decode(errors="replace"), err.read().decode(errors="replace")
            )
        if proc.returncode != 0:
            tail = " | ".join(ln.strip() for ln in (proc.stderr or proc.stdout).strip().splitlines()[-3:])
            raise LlamaCppError(f"{name} failed (exit {proc.returncode}){' ' + what if what else ''}: {tail}")
        return proc


def _complete(bin_dir: Path) -> bool:
    return all((bin_dir / t).is_file() for t in TOOLS)


def find() -> LlamaCpp | None:
    """Give the tools ``AUTOCOMPRESS_LLAMA_CPP`` names, else this version's cached build, else None."""
    env = os.environ.get(ENV)
    if env:
        return LlamaCpp(Path(env).expanduser()) if _complete(Path(env).expanduser()) else None
    d = cache_dir()
    if _complete(d / "bin"):
        return LlamaCpp(d / "bin", d / "src" if (d / "src").is_dir() else None)
    return None


def require() -> LlamaCpp:
    """Give the tools, or raise LlamaCppError naming the set-up command."""
    found = find()
    if found is None and os.environ.get(ENV):
        raise LlamaCppError(f"{ENV}={os.environ[ENV]} does not hold llama.cpp's tools ({', '.join(TOOLS)})")
    if found is None:
        raise LlamaCppError(f"llama.cpp's tools are not built on this machine; {SETUP_HINT}")
    return found


def _fetch_source(work: Path, log: Callable[[str], None]) -> Path:
    """Give the vendored llama.cpp tree of the llama-cpp-python sdist, downloaded into ``work``."""
    log(f"downloading the llama-cpp-python {LLAMA_CPP_PYTHON} source distribution (it vendors llama.cpp)...")
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:"]
    cmd += [f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(work)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    archives = sorted(work.glob("llama_cpp_python-*.tar.gz"))
    if proc.returncode != 0 or not archives:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no archive"]
        raise LlamaCppError(f"could not download llama-cpp-python=={LLAMA_CPP_PYTHON}: {tail[0]}")
    with tarfile.open(archives[0]) as tar:
        tar.extractall(work, filter="data")
    src = work / archives[0].name.removesuffix(".tar.gz") / "vendor" / "llama.cpp"
    if not (src / "CMakeLists.txt").is_file():
        raise LlamaCppError(f"{archives[0].name} holds no vendor/llama.cpp tree")
    return src


def _check_toolchain() -> None:
    missing = [t for t in ("cmake", "ninja", "c++") if shutil.which(t) is None]
    if missing:
        raise LlamaCppError(
            f"building llama.cpp needs {', '.join(missing)} on PATH (apt-get install cmake ninja-build g++)"
        )


def build(*, jobs: int | None = None, force: bool = False, log: Callable[[str], None] = print) -> LlamaCpp:
    """Build llama.cpp's tools into this version's cache once (minutes); give them.

    Reuses a complete earlier build unless ``force``. Nothing half-built is left in place: the build
    happens in a temporary folder beside the cache and is renamed into it when every tool exists.
    """
    dest = cache_dir()
    if not force and _complete(dest / "bin"):
        log(f"llama.cpp tools already built: {dest / 'bin'}")
        return LlamaCpp(dest / "bin", dest / "src")
    _check_toolchain()
    dest.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".build-") as tmp:
        work = Path(tmp)
        src = _fetch_source(work, log)
        build_dir = work / "build"
        configure = ["cmake", "-S", str(src), "-B", str(build_dir), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release"]
        configure += ["-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_SERVER=OFF"]
        configure += [f"-DCMAKE_C_FLAGS={NO_AMX}", f"-DCMAKE_CXX_FLAGS={NO_AMX}"]
        configure += ["-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=ON", "-DBUILD_SHARED_LIBS=OFF"]
        n = jobs or os.cpu_count() or 2
        log(f"building llama.cpp {LLAMA_CPP_COMMIT} ({', '.join(TOOLS)}) with {n} jobs (about 4 minutes on 2 cores)...")
        for cmd in (configure, ["ninja", "-C", str(build_dir), f"-j{n}", *TOOLS]):
            proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
            if proc.returncode != 0:
                tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
                raise LlamaCppError(f"llama.cpp build step `{' '.join(cmd[:2])}` failed: {tail}")
        staged = work / "out"
        (staged / "bin").mkdir(parents=True)
        for t in TOOLS:
            shutil.copy2(build_dir / "bin" / t, staged / "bin" / t)
        keep = ("convert_hf_to_gguf.py", "gguf-py", "conversion", "LICENSE")
        (staged / "src").mkdir()
        for name in keep:
            p = src / name
            if p.is_dir():
                shutil.copytree(p, staged / "src" / name)
            elif p.is_file():
                shutil.copy2(p, staged / "src" / name)
        if dest.exists():
            shutil.rmtree(dest)
        staged.rename(dest)
    log(f"llama.cpp tools built in {time.perf_counter() - t0:.0f} s: {dest / 'bin'}")
    return LlamaCpp(dest / "bin", dest / "src")


_PPL = re.compile(r"Final estimate: PPL = ([0-9.]+)")
_RUNNING = re.compile(r"\[(\d+)\]([0-9.]+|nan|inf),")


def parse_perplexity(output: str, chunks: int) -> float:
    """Give the perplexity llama-perplexity printed after ``chunks`` chunks (its running estimate
    ``[chunks]value``, which after the last chunk is its final estimate), or raise LlamaCppError."""
    for k, value in _RUNNING.findall(output):
        if int(k) == chunks:
            return float(value)
    m = _PPL.search(output)
    if m and not any(int(k) > chunks for k, _ in _RUNNING.findall(output)):
        return float(m.group(1))
    raise LlamaCppError(f"llama-perplexity printed no estimate after chunk {chunks}")


LOST_LINE_RETRIES = 4


def perplexity(model: Path, text: Path, *, ctx: int, chunks: int, threads: int = 2, batch: int | None = None) -> float:
    """Give llama-perplexity's estimate on the first ``chunks`` chunks of ``ctx`` tokens of a text file
    (the second half of each chunk scored, as llama.cpp does).

    llama.cpp's logger is leaked at exit by design (its common/log.cpp, upstream issue 22142), so the
    last lines a tool prints are often lost: one chunk more than needed is requested (when the text
    has it), so the wanted estimate is printed while the extra chunk is still computing; with no
    extra chunk available the run is repeated until the line arrives.
    """
    if chunks < 1:
        raise LlamaCppError(f"llama-perplexity needs at least one chunk, got {chunks}")
    args = ["-m", model, "-f", text, "-c", ctx, "-b", batch or ctx, "-t", threads, "--no-warmup"]
    for _ in range(LOST_LINE_RETRIES):
        proc = require().run("llama-perplexity", [*args, "--chunks", chunks + 1], what=f"on {Path(model).name}")
        try:
            return parse_perplexity(proc.stdout + proc.stderr, chunks)
        except LlamaCppError:
            continue
    raise LlamaCppError(f"llama-perplexity printed no estimate after chunk {chunks} in {LOST_LINE_RETRIES} runs")


def tokenize(model: Path, text: Path) -> list[int]:
    """Give the token ids llama.cpp's tokenizer makes of a text file (no BOS added; special-token text
    read as plain text, as llama-perplexity reads its file)."""
    args = ["-m", model, "-f", text, "--ids", "--log-disable", "--no-bos", "--no-parse-special"]
    proc = require().run("llama-tokenize", args)
    line = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else "[]"
    return [int(x) for x in line.strip("[] \n").split(",") if x.strip()]


def generate(model: Path, prompt: str, *, tokens: int = 32) -> str:
    """Give the text llama-simple generates greedily after ``prompt`` (prompt included)."""
    proc = require().run("llama-simple", ["-m", model, "-n", tokens, prompt], what=f"on {Path(model).name}")
    return proc.stdout
