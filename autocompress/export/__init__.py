"""Exports of compressed models: HF folders, compressed-tensors checkpoints, our loader for what no config
describes, ONNX, verification."""

from autocompress.export.compressed_tensors import asymmetric_loading, export_compressed_tensors
from autocompress.export.hf import export_hf, plain_transformers_blockers
from autocompress.export.loader import load_compressed
from autocompress.export.techniques import TECHNIQUES, techniques_markdown

__all__ = [
    "TECHNIQUES",
    "asymmetric_loading",
    "export_compressed_tensors",
    "export_hf",
    "load_compressed",
    "plain_transformers_blockers",
    "techniques_markdown",
]
