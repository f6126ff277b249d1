"""Exports of compressed models."""

from autocompress.export.hf import export_hf

__all__ = ["export_hf"]
