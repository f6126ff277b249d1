"""A byte-level tokenizer for tiny test models, with the slice of the HF tokenizer API we use."""

from __future__ import annotations

from pathlib import Path


class ByteTokenizer:
    """Tokens are UTF-8 bytes (ids 3..258); 0 = pad, 1 = BOS, 2 = EOS."""

    pad_token_id = 0
    bos_token_id = 1
    eos_token_id = 2
    vocab_size = 259

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = [b + 3 for b in text.encode("utf-8")]
        return [self.bos_token_id, *ids] if add_special_tokens else ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(i - 3 for i in ids if i >= 3).decode("utf-8", errors="replace")

    MARKER = "autocompress-byte-tokenizer.json"

    def save_pretrained(self, path: str) -> None:
        """Write a marker file so ``load_model`` restores this tokenizer for the folder."""
        Path(path, self.MARKER).write_text('{"tokenizer": "bytes"}\n')
