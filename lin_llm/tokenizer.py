"""Tokenizers: a byte-level one that needs no files, or a checkpoint's own tokenizer.json.

``encode(text, add_special_tokens=True)`` applies the tokenizer's own rule for special tokens
(the BOS a model expects at the start of a text): tokenizer.json's post-processor for a Hugging
Face tokenizer, the model's BOS for the byte-level one when its config has a ``bos_id``.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from lin_llm.errors import TokenizerError


class ByteTokenizer:
    """UTF-8 bytes 0..255 plus BOS=256, EOS=257, PAD=258 (vocab 260 leaves one spare id)."""

    vocab_size = 260
    bos_id, eos_id, pad_id = 256, 257, 258

    def __init__(self, prepend_bos: bool = False):
        self.prepend_bos = prepend_bos

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.bos_id] + ids if add_special_tokens and self.prepend_bos else ids

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face fast tokenizer read from tokenizer.json (the ``tokenizers`` library)."""

    def __init__(self, path: Path, bos_id: int | None, eos_id: int | None):
        self._tok = Tokenizer.from_file(str(path))
        self.vocab_size = self._tok.get_vocab_size()
        self.bos_id, self.eos_id = bos_id, eos_id

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


def load_tokenizer(directory: str | Path | None, bos_id: int | None = None, eos_id: int | None = None,
                   *, required: bool = False):
    """``directory``'s tokenizer.json if it has one, else the byte-level tokenizer (an error when
    ``required``), which prepends its BOS in ``encode(..., add_special_tokens=True)`` when
    ``bos_id`` is set. A SentencePiece-only directory is refused: bytes would silently mis-tokenise."""
    path = Path(directory) / "tokenizer.json" if directory else None
    if path is not None and path.is_file():
        return HFTokenizer(path, bos_id, eos_id)
    if path is not None and (path.parent / "tokenizer.model").is_file():
        raise TokenizerError(
            f"{directory} has a SentencePiece tokenizer.model but no tokenizer.json, which is what lin_llm "
            f"reads; write one next to it with transformers (AutoTokenizer.from_pretrained({str(directory)!r})"
            f".save_pretrained({str(directory)!r}), needs the sentencepiece package)"
        )
    if required:
        raise TokenizerError(f"{directory or 'no directory'}: no tokenizer.json there; give a directory with one")
    return ByteTokenizer(prepend_bos=bos_id is not None)


def model_tokenizer(checkpoint_dir: str | Path, cfg):
    """load_tokenizer for the model of ``cfg`` (a ModelConfig) stored in ``checkpoint_dir``;
    refuses a checkpoint without a tokenizer.json unless its model is byte-level, and a
    tokenizer with more tokens than the model."""
    directory = Path(checkpoint_dir)
    byte_level = cfg.vocab_size == ByteTokenizer.vocab_size
    if not (directory / "tokenizer.json").is_file() and not byte_level and not (directory / "tokenizer.model").is_file():
        raise TokenizerError(
            f"{directory} has no tokenizer.json, and its model's vocabulary ({cfg.vocab_size} tokens) is not the "
            f"byte-level one ({ByteTokenizer.vocab_size}), so there is no tokenizer for it. Copy the tokenizer.json "
            "of the model it was converted from into that directory."
        )
    tokenizer = load_tokenizer(directory, cfg.bos_id, cfg.eos_id)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise TokenizerError(
            f"{directory / 'tokenizer.json'} has {tokenizer.vocab_size} tokens but the model only {cfg.vocab_size}: "
            "this tokenizer belongs to another model"
        )
    return tokenizer
