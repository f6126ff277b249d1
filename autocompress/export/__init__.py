"""Exports of compressed models: HF folders, our loader for what no config describes, ONNX, verification."""

from autocompress.export.hf import export_hf, plain_transformers_blockers
from autocompress.export.loader import load_compressed
from autocompress.export.techniques import TECHNIQUES, techniques_markdown

__all__ = ["TECHNIQUES", "export_hf", "load_compressed", "plain_transformers_blockers", "techniques_markdown"]
