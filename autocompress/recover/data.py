"""Training text for recovery: sequences cut from the calibration documents only.

The evaluation and proxy sets come from the held-out documents (``calib.split_documents``), so
the training sequences can never overlap them. The first rows are exactly ``TokenData.calib``
(same documents, same order, same length); a larger pool continues further into the calibration
documents.
"""

from __future__ import annotations

import hashlib

import torch

from autocompress.calib import (
    DataConfig,
    _encode,
    _sequences,
    _wiki_documents,
    read_documents,
    split_documents,
)
from autocompress.errors import DataError


def training_sequences(tokenizer, config: DataConfig, tokens: int, seq_len: int | None = None) -> torch.Tensor:
    """Give ``tokens // seq_len`` training sequences [n, seq_len] from the calibration documents
    (fewer when the documents hold fewer tokens: as many whole sequences as they give)."""
    seq_len = seq_len or config.seq_len
    docs = _wiki_documents() if config.source is None else read_documents(config.source)
    calib_docs, _ = split_documents(docs)
    try:
        seqs, _ = _sequences(tokenizer, calib_docs, tokens, seq_len, "calibration (recovery)")
    except DataError:
        available = sum(len(_encode(tokenizer, d + "\n\n")) for d in calib_docs)
        body = seq_len - (1 if getattr(tokenizer, "bos_token_id", None) is not None else 0)
        seqs, _ = _sequences(tokenizer, calib_docs, available // body * seq_len, seq_len, "calibration (recovery)")
    return seqs


def sequences_hash(seqs: torch.Tensor) -> str:
    """Give the sha256 of the training sequences (shape and token ids)."""
    h = hashlib.sha256(str(tuple(seqs.shape)).encode())
    h.update(seqs.contiguous().numpy().tobytes())
    return h.hexdigest()
