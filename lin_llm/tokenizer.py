"""Tokenizers: a byte-level one that needs no files, or a checkpoint's own tokenizer.json."""

from __future__ import annotations

from pathlib import Path


class ByteTokenizer:
    """UTF-8 bytes 0..255 plus BOS=256, EOS=257, PAD=258 (vocab 260 leaves one spare id)."""

    vocab_size = 260
    bos_id, eos_id, pad_id = 256, 257, 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face fast tokenizer read from tokenizer.json (the ``tokenizers`` library)."""

    def __init__(self, path: Path, bos_id: int | None, eos_id: int | None):
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(path))
        self.vocab_size = self._tok.get_vocab_size()
        self.bos_id, self.eos_id = bos_id, eos_id

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


def load_tokenizer(checkpoint_dir: str | Path | None, bos_id: int | None = None, eos_id: int | None = None):
    """The checkpoint's tokenizer.json if it has one, else the byte-level tokenizer."""
    if checkpoint_dir is not None and (Path(checkpoint_dir) / "tokenizer.json").is_file():
        return HFTokenizer(Path(checkpoint_dir) / "tokenizer.json", bos_id, eos_id)
    return ByteTokenizer()
