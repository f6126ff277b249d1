"""Task models: named models that bring their own model class and data (the topic classifier).

Model loading consults this registry instead of importing the code that builds such a model, so
the pipeline's imports run one way: ``autocompress.evaluate.tasks`` (a later stage: it trains the
classifier's head on evaluation data) registers its task here when it is imported, and
``autocompress.model`` never imports it. The providers shipped with autocompress are named in
``BUILTIN_PROVIDERS`` and imported on the first lookup, the way transformers' auto classes resolve
their model classes by name; another package adds a task by calling ``register``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autocompress.errors import ModelLoadError

BUILTIN_PROVIDERS = ("autocompress.evaluate.tasks",)  # modules that register the shipped tasks


@dataclass(frozen=True)
class TaskModel:
    """One task model: the spec users pass, the task its config names, and how to build and feed it."""

    name: str  # the model spec users pass, e.g. "minilm-wiki-topics"
    task: str  # the ``autocompress_task`` its config (and every export of it) names
    folder: Callable[[Callable[[str], None] | None], Path]  # log -> its HF folder, built once
    model_class: type  # the transformers model class that loads such a folder
    data: Callable[..., Any]  # (tokenizer, DataConfig) -> TokenData: the task's own data


_BY_TASK: dict[str, TaskModel] = {}
_loaded_builtins = False


def register(entry: TaskModel) -> None:
    """Add (or replace) a task model."""
    _BY_TASK[entry.task] = entry


def _entries() -> list[TaskModel]:
    global _loaded_builtins
    if not _loaded_builtins:
        _loaded_builtins = True
        for module in BUILTIN_PROVIDERS:
            importlib.import_module(module)
    return list(_BY_TASK.values())


def by_name(name: str) -> TaskModel | None:
    """Give the task model a user's model spec names, or None when it names none."""
    return next((e for e in _entries() if e.name == name), None)


def by_task(task: str) -> TaskModel:
    """Give the task model of an ``autocompress_task`` named in a model config."""
    entries = _entries()
    for e in entries:
        if e.task == task:
            return e
    known = ", ".join(sorted(e.task for e in entries)) or "none"
    raise ModelLoadError(f"unknown autocompress_task {task!r} in the model config; known: {known}")
