"""Training text for recovery: sequences cut from the calibration documents only.

The evaluation and proxy sets come from the held-out documents (``calib.split_documents``), so
the training sequences can never overlap them. The first rows are exactly ``TokenData.calib``
(same documents, same order, same length); a larger pool continues further into the calibration
documents.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace

import torch

from autocompress.calib import DataConfig, _sequences, _wiki_documents, read_documents, split_documents


def training_sequences(tokenizer, config: DataConfig, tokens: int, seq_len: int | None = None) -> torch.Tensor:
    """Give ``tokens // seq_len`` training sequences [n, seq_len] from the calibration documents."""
    cfg = replace(config, seq_len=seq_len or config.seq_len)
    docs = _wiki_documents() if cfg.source is None else read_documents(cfg.source)
    calib_docs, _ = split_documents(docs)
    seqs, _ = _sequences(tokenizer, calib_docs, tokens, cfg.seq_len, "calibration (recovery)")
    return seqs


def sequences_hash(seqs: torch.Tensor) -> str:
    """Give the sha256 of the training sequences (shape and token ids)."""
    h = hashlib.sha256(str(tuple(seqs.shape)).encode())
    h.update(seqs.contiguous().numpy().tobytes())
    return h.hexdigest()
