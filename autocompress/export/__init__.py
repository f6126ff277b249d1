"""Exports of compressed models."""

from autocompress.export.hf import export_hf, plain_transformers_blockers

__all__ = ["export_hf", "plain_transformers_blockers"]
