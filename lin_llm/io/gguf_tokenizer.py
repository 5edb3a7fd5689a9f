"""The tokenizer a GGUF file describes, rebuilt as a ``tokenizers`` tokenizer.json.

It is built the way transformers builds its GGUF tokenizer (transformers.integrations.gguf: a
GPT-2 or LLaMA tokenizer class over the file's vocabulary and merges, its control tokens made
special, then the file's special tokens and BOS flag), so that both give the same ids, without
importing transformers. Two tokenizer models are converted: ``gpt2`` (byte-level BPE) and
``llama`` (SentencePiece BPE with byte fallback).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from lin_llm.errors import CheckpointError

CONTROL, USER_DEFINED = 3, 4  # gguf.TokenType values
PREFIX = "tokenizer.ggml."

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> (a split applied first or None, whether GPT-2's own regex then splits each
# piece), as llama.cpp (llama-vocab.cpp) pre-tokenizes. transformers agrees except for `smollm`,
# which it treats as plain GPT-2: llama.cpp, and SmolLM2's own tokenizer.json (Digits with
# individual_digits before ByteLevel), first isolate every digit, so "a  1" (spaces before a
# digit) is "a", "ĠĠ", "1" there and here, and "a", "Ġ", "Ġ", "1" in transformers' GGUF tokenizer.
BYTE_LEVEL_SPLITS: dict[str, tuple[str | None, bool]] = {
    "default": (None, True),
    "gpt-2": (None, True),
    "gpt2": (None, True),
    "smollm": (r"\p{N}", True),
    "llama-bpe": (_LLAMA3_SPLIT, False),
    "llama3": (_LLAMA3_SPLIT, False),
    "llama-v3": (_LLAMA3_SPLIT, False),
    "smaug-bpe": (_LLAMA3_SPLIT, False),
}
# Special tokens the transformers class adds by default. transformers adds them even where the
# vocabulary lacks them, as new ids past the model's embedding; we add only those it has.
CLASS_DEFAULT_SPECIALS = {"gpt2": ("<|endoftext|>",), "llama": ("<unk>", "<s>", "</s>")}
NAMED_SPECIALS = {"bos_token": "bos", "eos_token": "eos", "unk_token": "unknown", "pad_token": "padding"}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (the byte-level BPE alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def _required(meta: Mapping[str, Any], key: str, source: str):
    if key not in meta:
        raise CheckpointError(f"{source}: metadata {key} is missing, so its tokenizer cannot be built")
    return meta[key]


def _file_merges(meta: Mapping[str, Any]) -> list[tuple[str, ...]] | None:
    merges = meta.get(PREFIX + "merges")
    return None if merges is None else [tuple(merge.split(" ")) for merge in merges]


def _merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """SentencePiece merges implied by the vocabulary: every split of a piece into two pieces, best score first
    (transformers' generate_merges with scores: ties broken by the pieces' lengths, then their ids)."""
    merges = []
    for piece, score in scores.items():
        pairs = [(piece[:i], piece[i:]) for i in range(1, len(piece)) if piece[:i] in vocab and piece[i:] in vocab]
        merges += [(left, right, score) for left, right in sorted(pairs, key=lambda p: (vocab[p[0]], vocab[p[1]]))]
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _bpe(vocab: dict[str, int], merges: list, source: str, **options) -> models.BPE:
    try:
        return models.BPE(vocab, merges, dropout=None, **options)
    except Exception as err:  # noqa: BLE001 - tokenizers raises plain Exceptions for inconsistent merges
        raise CheckpointError(f"{source}: its tokenizer merges do not fit its vocabulary: {err}") from None


def _byte_level(meta: Mapping[str, Any], tokens: list[str], source: str) -> tuple[Tokenizer, set[str]]:
    pre = meta.get(PREFIX + "pre", "default")
    if pre not in BYTE_LEVEL_SPLITS:
        raise CheckpointError(
            f"{source}: {PREFIX}pre={pre!r} is a pre-tokenizer lin_llm cannot convert (supported: "
            f"{', '.join(BYTE_LEVEL_SPLITS)})"
        )
    merges = _file_merges(meta)
    if merges is None:
        raise CheckpointError(f"{source}: metadata {PREFIX}merges is missing: a gpt2 tokenizer needs its merges")
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    # Tokens are stored in the byte alphabet; any that is not (a mislabelled added token) is respelled.
    vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode()): i for i, t in enumerate(tokens)}
    tokenizer = Tokenizer(
        _bpe(vocab, merges, source, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False)
    )
    split, gpt2_regex = BYTE_LEVEL_SPLITS[pre]
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=gpt2_regex)
    if split is None:
        tokenizer.pre_tokenizer = byte_level
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"), byte_level])
    tokenizer.decoder = decoders.ByteLevel()
    # A control token outside the byte alphabet is not a real token of this vocabulary: not made special.
    return tokenizer, {t for t in tokens if set(t) <= alphabet}


def _sentencepiece(meta: Mapping[str, Any], tokens: list[str], source: str) -> tuple[Tokenizer, set[str]]:
    vocab = {token: i for i, token in enumerate(tokens)}
    merges = _file_merges(meta)
    if merges is None:
        scores = _required(meta, PREFIX + "scores", source)
        merges = _merges_from_scores(vocab, dict(zip(tokens, scores)))
    tokenizer = Tokenizer(_bpe(vocab, merges, source, fuse_unk=True, byte_fallback=True))
    # "▁" before the first word whatever tokenizer.ggml.add_space_prefix says, as transformers does.
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return tokenizer, set(tokens)


# tokenizer.ggml.model -> builder of (tokenizer, the tokens that may be made special)
BUILDERS = {"gpt2": _byte_level, "llama": _sentencepiece}


def _special_tokens(meta: Mapping[str, Any], tokens: list[str], source: str) -> dict[str, str | None]:
    named = {}
    for name, key in NAMED_SPECIALS.items():
        token_id = meta.get(f"{PREFIX}{key}_token_id")
        if token_id is not None and not 0 <= token_id < len(tokens):
            raise CheckpointError(f"{source}: {PREFIX}{key}_token_id={token_id} is outside the vocabulary")
        named[name] = None if token_id is None else tokens[token_id]
    return named


def gguf_tokenizer(meta: Mapping[str, Any], source: str) -> tuple[str, dict]:
    """(tokenizer.json text, tokenizer_config.json dict) of the tokenizer in a GGUF file's metadata."""
    model = _required(meta, PREFIX + "model", source)
    if model not in BUILDERS:
        raise CheckpointError(
            f"{source}: {PREFIX}model={model!r} is a tokenizer lin_llm cannot convert (supported: {', '.join(BUILDERS)})"
        )
    tokens = _required(meta, PREFIX + "tokens", source)
    types = meta.get(PREFIX + "token_type") or [1] * len(tokens)
    tokenizer, may_be_special = BUILDERS[model](meta, tokens, source)
    vocab = tokenizer.get_vocab()
    tokenizer.add_special_tokens([AddedToken(t, special=True) for t in CLASS_DEFAULT_SPECIALS[model] if t in vocab])
    tokenizer.add_special_tokens(
        [
            AddedToken(t, normalized=False, special=True)
            for t, k in zip(tokens, types)
            if k == CONTROL and t in may_be_special
        ]
    )
    tokenizer.add_tokens(
        [AddedToken(t, normalized=False) for t, k in zip(tokens, types) if k == USER_DEFINED and t in vocab]
    )
    named = _special_tokens(meta, tokens, source)
    tokenizer.add_special_tokens([AddedToken(t, special=True) for t in named.values() if t is not None])
    add_bos = bool(meta.get(PREFIX + "add_bos_token", model == "llama")) and named["bos_token"] is not None
    add_eos = bool(meta.get(PREFIX + "add_eos_token", False)) and named["eos_token"] is not None
    tokenizer.post_processor = _template(tokenizer, named, add_bos, add_eos)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **named, "add_bos_token": add_bos, "add_eos_token": add_eos}
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = meta["tokenizer.chat_template"]
    return tokenizer.to_str(), config


def _template(tokenizer: Tokenizer, named: dict, add_bos: bool, add_eos: bool) -> processors.TemplateProcessing:
    """BOS/EOS around each sequence as the file asks (transformers' update_post_processor)."""
    bos, eos = named["bos_token"], named["eos_token"]
    single = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
    pair = f"{single}{' ' + bos + ':1' if add_bos else ''} $B:1{' ' + eos + ':1' if add_eos else ''}"
    specials = [(t, tokenizer.token_to_id(t)) for t, on in ((bos, add_bos), (eos, add_eos)) if on]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
