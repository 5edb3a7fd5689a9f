"""Tokenizers: a byte-level one that needs no files, or a checkpoint's own tokenizer.json."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from lin_llm.errors import DataError


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
        self._tok = Tokenizer.from_file(str(path))
        self.vocab_size = self._tok.get_vocab_size()
        self.bos_id, self.eos_id = bos_id, eos_id

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


def load_tokenizer(directory: str | Path | None, bos_id: int | None = None, eos_id: int | None = None,
                   *, required: bool = False):
    """``directory``'s tokenizer.json if it has one, else the byte-level tokenizer (an error when
    ``required``). A SentencePiece-only directory is refused: bytes would silently mis-tokenise."""
    path = Path(directory) / "tokenizer.json" if directory else None
    if path is not None and path.is_file():
        return HFTokenizer(path, bos_id, eos_id)
    if path is not None and (path.parent / "tokenizer.model").is_file():
        raise DataError(
            f"{directory} has a SentencePiece tokenizer.model but no tokenizer.json, which is what lin_llm "
            f"reads; write one next to it with transformers (AutoTokenizer.from_pretrained({str(directory)!r})"
            f".save_pretrained({str(directory)!r}), needs the sentencepiece package)"
        )
    if required:
        raise DataError(f"{directory or 'no directory'}: no tokenizer.json there; give a directory with one")
    return ByteTokenizer()
