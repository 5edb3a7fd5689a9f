"""Text in, text out: prompt encoding, streamed detokenisation, and one entry point for plain,
speculative and Medusa decoding (what decode.py runs)."""

from __future__ import annotations

import numpy as np

from lin_llm.decoding.medusa import medusa_generate
from lin_llm.decoding.plain import generate
from lin_llm.decoding.sampling import check_sampling
from lin_llm.decoding.speculative import speculative_generate
from lin_llm.errors import DecodeError


def encode_prompt(tokenizer, text: str) -> list[int]:
    """The prompt's token ids with the tokenizer's own special tokens (its BOS where it adds one,
    as transformers encodes a prompt), so that decoding continues the text a user typed."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:  # what a command line in another encoding gives (surrogate escapes)
        raise DecodeError(
            f"the prompt is not valid UTF-8 text (characters {err.start}-{err.end - 1} are undecodable bytes); "
            "give --prompt in UTF-8 (check the terminal's or the file's encoding)"
        ) from None
    if not tokenizer.encode(text):
        raise DecodeError("the prompt is empty; give some text with --prompt")
    return tokenizer.encode(text, add_special_tokens=True)


class IncrementalText:
    """A ``stream`` callback: turns row 0's new tokens into text as they arrive and hands each new
    piece to ``on_text`` (the bytes of a UTF-8 character split over tokens wait for the rest)."""

    def __init__(self, tokenizer, on_text):
        self.tokenizer, self.on_text, self.tokens, self.text = tokenizer, on_text, [], ""

    def __call__(self, tokens, counts):
        self.tokens.extend(int(t) for t in np.asarray(tokens)[0, : int(np.asarray(counts)[0])])
        text = self.tokenizer.decode(self.tokens)
        if text.endswith("\ufffd"):
            return
        self.on_text(text[len(self.text) :])
        self.text = text


def decode_tokens(target, prompt: list[int], max_new_tokens: int, *, draft=None, medusa_topk=None, gamma: int = 4,
                  temperature: float = 0.0, top_k=None, top_p=None, seed: int = 0, eos_id=None, stream=None):
    """(new tokens [1, max_new_tokens], stats) of one prompt: speculative with ``draft``, Medusa with
    ``medusa_topk`` (greedy), else plain decoding."""
    if medusa_topk is not None:
        check_sampling(temperature, top_k, top_p, target.cfg.vocab_size, greedy_only="Medusa decoding (--medusa)")
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    if draft is not None:
        return speculative_generate(target, draft, [prompt], max_new_tokens, gamma=gamma, eos_id=eos_id, stream=stream,
                                    **sampling)
    if medusa_topk is not None:
        return medusa_generate(target, [prompt], max_new_tokens, topk=tuple(medusa_topk), eos_id=eos_id, stream=stream)
    return generate(target, [prompt], max_new_tokens, eos_id=eos_id, stream=stream, **sampling), {}
