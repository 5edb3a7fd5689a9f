"""Training data through Hugging Face ``datasets``: files or a hub name -> tokens -> packed batches.

- Sources: local text (documents separated by blank lines), JSONL/JSON or parquet files
  (compressed .gz/.xz/.bz2/.zst too), comma-separated or globbed; or a hub dataset name
  (``train.dataset``) when the machine has network. The default is the embedded corpus
  ``data/kjv.txt.xz`` (see data/README.md).
- Tokenizers: bytes (no files), or the HF ``tokenizer.json`` of a converted checkpoint.
- Each document becomes its tokens with the tokenizer's own special tokens (BOS where the
  tokenizer adds one), then EOS; documents are concatenated and cut into
  sequences of seq_len + 1 tokens (inputs and shifted targets) at a stride of seq_len.
- Validation: a fixed set of held-out documents (the same whatever train.seed, so
  perplexities of different runs compare), or the stream's tail when there are few documents.
- Order: each epoch is a permutation of the training sequences drawn from (seed, epoch), so
  the batch of any step is a pure function of the step: resuming needs only the step.
- Multi-host: every host tokenises the corpus, then materialises only the rows of each batch
  that its own devices hold (``jax.make_array_from_process_local_data``).
"""

from __future__ import annotations

import codecs
import dataclasses
import glob
import hashlib
import os
from functools import lru_cache
from pathlib import Path

import numpy as np

from lin_llm.config import ModelConfig, TrainConfig
from lin_llm.errors import DataError, TokenizerError
from lin_llm.tokenizer import ByteTokenizer, load_tokenizer

REPO_ROOT = Path(__file__).resolve().parent.parent
COMPRESSION = (".gz", ".xz", ".bz2", ".zst", ".lz4")
FORMATS = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
MIN_DOCS_FOR_DOC_SPLIT = 20  # fewer documents: hold out the tail of the token stream instead
SPLIT_SEED = 20240607  # the validation split does not depend on train.seed
PROBE_BYTES = 1 << 16  # what check_data_file reads of each file




# --------------------------------------------------------------------------- sources


def resolve_files(spec: str) -> list[Path]:
    """Paths from a comma-separated list of files or globs; relative to the working directory,
    else to the repository (so the embedded corpus is found from anywhere)."""
    files: list[Path] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        found = []
        for base in (Path.cwd(), REPO_ROOT):
            pattern = item if os.path.isabs(item) else str(base / item)
            found = sorted(Path(p) for p in glob.glob(pattern) if Path(p).is_file())
            if found:
                break
        if not found:
            raise DataError(
                f"train.data: no file matches {item!r} (looked in {Path.cwd()} and {REPO_ROOT}); point train.data "
                "at a text/JSONL/parquet file, e.g. the embedded corpus train.data=data/kjv.txt.xz"
            )
        files.extend(found)
    if not files:
        raise DataError("train.data is empty: give a text/JSONL/parquet file (e.g. data/kjv.txt.xz)")
    return files


def file_format(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    while suffixes and suffixes[-1] in COMPRESSION:
        suffixes.pop()
    ext = suffixes[-1] if suffixes else ""
    if ext not in FORMATS:
        raise DataError(
            f"{path}: cannot tell the format from the extension {ext or '(none)'!r}; use one of "
            f"{', '.join(sorted(FORMATS))} (optionally compressed: {', '.join(COMPRESSION)})"
        )
    return FORMATS[ext]


def check_data_file(path: Path, fmt: str) -> None:
    """Refuse, saying why, a data file that the reader would fail on without a cause: empty, not
    decompressible, or (text and JSON) not UTF-8 in its first PROBE_BYTES."""
    import fsspec

    if path.stat().st_size == 0:
        raise DataError(f"train.data: {path} is empty (0 bytes); give a file with text in it")
    if fmt == "parquet":
        return
    try:
        with fsspec.open(str(path), "rb", compression="infer") as f:
            head = f.read(PROBE_BYTES)
    except Exception as err:  # each codec raises its own (LZMAError, BadGzipFile, ZstdError, EOFError, ...)
        raise DataError(f"train.data: {path} cannot be read or decompressed ({type(err).__name__}: {err}); "
                        "is the file complete?") from None
    if not head:
        raise DataError(f"train.data: {path} holds no data once decompressed; give a file with text in it")
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError as err:
        raise DataError(
            f"train.data: {path} is not UTF-8 text (byte 0x{head[err.start]:02x} at offset {err.start}); is it a "
            f"binary file? give a text or JSONL file in UTF-8, or a parquet file"
        ) from None


def load_documents(t: TrainConfig, cache_dir: str | Path | None = None) -> list[str]:
    """The documents (strings) of the configured source, empty ones dropped."""
    import datasets  # here, not at the top: a heavy import (pyarrow, fsspec) only reading a corpus needs

    datasets.disable_progress_bars()
    cache = str(cache_dir) if cache_dir else None
    if t.dataset:
        try:
            ds = datasets.load_dataset(t.dataset, t.dataset_config or None, split=t.dataset_split, cache_dir=cache)
        except Exception as err:  # network, unknown name, missing split: all mean "change the source"
            raise DataError(
                f"train.dataset={t.dataset!r} could not be loaded ({type(err).__name__}: {err}); check the name, "
                "train.dataset_config / train.dataset_split and the network, or use a local file with train.data"
            ) from None
        sources = [(t.dataset, ds)]
    else:
        files = resolve_files(t.data)
        formats = {file_format(f) for f in files}
        if len(formats) > 1:
            raise DataError(f"train.data mixes formats {sorted(formats)}; give files of one format")
        (fmt,) = formats
        for f in files:
            check_data_file(f, fmt)
        kwargs = {"sample_by": "paragraph"} if fmt == "text" else {}
        try:
            ds = datasets.load_dataset(
                fmt, data_files={"train": [str(f) for f in files]}, split="train", cache_dir=cache, **kwargs
            )
        except Exception as err:
            cause = err.__cause__ or err.__context__  # datasets wraps the reader's error in a generic one
            detail = f"{err}: {type(cause).__name__}: {cause}" if cause is not None else str(err)
            raise DataError(f"train.data: could not read {[str(f) for f in files]} as {fmt} ({detail}); "
                            f"check that the files are {fmt} files") from None
        sources = [(", ".join(str(f) for f in files), ds)]
    docs: list[str] = []
    for name, ds in sources:
        if t.text_field not in ds.column_names:
            raise DataError(
                f"{name} has no column {t.text_field!r} (columns: {', '.join(ds.column_names)}); set train.text_field"
            )
        docs.extend(d for d in ds[t.text_field] if isinstance(d, str) and d.strip())
    if not docs:
        raise DataError(f"{sources[0][0]} contains no text (every document is empty); give a corpus with text in it")
    return docs


def training_tokenizer(t: TrainConfig, model: ModelConfig):
    """train.tokenizer: byte | auto (init_from's tokenizer.json, else bytes) | a directory."""
    if t.tokenizer == "byte":
        tok = ByteTokenizer(prepend_bos=model.bos_id is not None)
    else:
        directory = t.init_from if t.tokenizer == "auto" else t.tokenizer
        try:
            tok = load_tokenizer(directory, model.bos_id, model.eos_id, required=t.tokenizer != "auto")
        except TokenizerError as err:
            raise DataError(f"train.tokenizer={t.tokenizer!r}: {err}, or set train.tokenizer=byte") from None
    if tok.vocab_size > model.vocab_size:
        raise DataError(
            f"the tokenizer has {tok.vocab_size} tokens but model.vocab_size={model.vocab_size}; "
            "raise model.vocab_size or choose train.tokenizer to match the model"
        )
    return tok


# --------------------------------------------------------------------------- tokens


def _encode(tokenizer, doc: str) -> np.ndarray:
    """A document's ids with the tokenizer's own special tokens: its BOS where it adds one (as
    evaluation and decoding encode a text)."""
    if isinstance(tokenizer, ByteTokenizer):  # the fast path of ByteTokenizer.encode
        ids = np.frombuffer(doc.encode("utf-8"), np.uint8).astype(np.int32)
        return np.concatenate([np.asarray([tokenizer.bos_id], np.int32), ids]) if tokenizer.prepend_bos else ids
    return np.asarray(tokenizer.encode(doc, add_special_tokens=True), np.int32)


def _stream(docs: list[str], tokenizer, eos: int | None) -> np.ndarray:
    parts = []
    for doc in docs:
        parts.append(_encode(tokenizer, doc))
        if eos is not None:
            parts.append(np.asarray([eos], np.int32))
    return np.concatenate(parts) if parts else np.zeros((0,), np.int32)


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Tokenised, split and packed: sequence i is tokens[i * seq_len : i * seq_len + seq_len + 1]."""

    train: np.ndarray
    val: np.ndarray
    seq_len: int
    source: str

    @property
    def n_train(self) -> int:
        return (len(self.train) - 1) // self.seq_len

    @property
    def n_val(self) -> int:
        return (len(self.val) - 1) // self.seq_len

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256(np.ascontiguousarray(self.train).tobytes())
        h.update(np.ascontiguousarray(self.val).tobytes())
        return h.hexdigest()[:16]


def split_documents(docs: list[str], val_fraction: float) -> tuple[list[str], list[str]] | None:
    """(training, held-out) documents: a fixed, seed-independent choice of val_fraction of them, in
    corpus order. None when there are too few documents to split by document."""
    if len(docs) < MIN_DOCS_FOR_DOC_SPLIT:
        return None
    order = np.random.default_rng(SPLIT_SEED).permutation(len(docs))
    held_out = set(order[: max(1, int(round(val_fraction * len(docs))))].tolist())
    return [d for i, d in enumerate(docs) if i not in held_out], [d for i, d in enumerate(docs) if i in held_out]


def build_corpus(docs: list[str], tokenizer, model: ModelConfig, seq_len: int, val_fraction: float, source="") -> Corpus:
    eos = model.eos_id if model.eos_id is not None else getattr(tokenizer, "eos_id", None)
    split = split_documents(docs, val_fraction)
    if split is not None:
        train, val = (_stream(part, tokenizer, eos) for part in split)
    else:
        stream = _stream(docs, tokenizer, eos)
        cut = len(stream) - int(round(val_fraction * len(stream)))
        train, val = stream[:cut], stream[cut:]
    corpus = Corpus(train=train, val=val, seq_len=seq_len, source=source)
    if corpus.n_train < 1 or corpus.n_val < 1:
        raise DataError(
            f"{source or 'the corpus'} has {len(train) + len(val)} tokens: too few for one training and one "
            f"validation sequence of train.seq_len={seq_len} (+1) with train.val_fraction={val_fraction}; "
            "give more text or lower train.seq_len"
        )
    return corpus


_CORPORA: dict = {}  # in-process memo: runs in one process (tests, the ablation) tokenise once


def load_corpus(t: TrainConfig, model: ModelConfig, cache_dir=None) -> tuple[Corpus, object]:
    """(corpus, tokenizer) of the config's source."""
    tokenizer = training_tokenizer(t, model)
    key = None
    if not t.dataset:
        files = resolve_files(t.data)
        key = (tuple((str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in files), t.text_field,
               type(tokenizer).__name__, getattr(tokenizer, "vocab_size", None), t.tokenizer, t.init_from,
               model.bos_id, model.eos_id, t.seq_len, t.val_fraction)
        if key in _CORPORA:
            return _CORPORA[key], tokenizer
    docs = load_documents(t, cache_dir)
    corpus = build_corpus(docs, tokenizer, model, t.seq_len, t.val_fraction, t.dataset or t.data)
    if key is not None:
        _CORPORA.clear()  # keep one: corpora can be large
        _CORPORA[key] = corpus
    return corpus, tokenizer


# --------------------------------------------------------------------------- batches


@lru_cache(maxsize=8)
def _epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def train_indices(step: int, batch_size: int, n: int, seed: int) -> np.ndarray:
    """Global sequence indices of the batch of ``step`` (deterministic: resumable by step)."""
    positions = step * batch_size + np.arange(batch_size)
    epochs, within = positions // n, positions % n
    return np.asarray([_epoch_order(n, seed, int(e))[i] for e, i in zip(epochs, within)], np.int64)


def sequences(tokens: np.ndarray, indices: np.ndarray, seq_len: int) -> np.ndarray:
    """Packed sequences [len(indices), seq_len + 1]."""
    starts = np.asarray(indices, np.int64)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return tokens[starts].astype(np.int32)


def val_batches(corpus: Corpus, batch: int, max_batches: int) -> list[np.ndarray]:
    """The first ``max_batches`` (0 = all) full validation batches [batch, seq_len + 1], in order."""
    n_full = corpus.n_val // batch
    if n_full == 0:
        raise DataError(
            f"the validation split has {corpus.n_val} sequences of {corpus.seq_len} tokens, fewer than one "
            f"evaluation batch of {batch}; raise train.val_fraction, or lower train.batch_size or train.seq_len"
        )
    count = n_full if max_batches == 0 else min(n_full, max_batches)
    return [sequences(corpus.val, np.arange(i * batch, (i + 1) * batch), corpus.seq_len) for i in range(count)]
