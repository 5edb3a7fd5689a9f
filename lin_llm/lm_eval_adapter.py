"""lm-evaluation-harness adapter: a lin_llm checkpoint as the lm_eval model ``lin_llm``.

lm_eval 0.4.13 looks models up in its own registry only (no plugin entry points), so this
module registers the class when imported, and running it is lm_eval's CLI with the class
registered (``pip install 'lin-llm[eval]'`` brings lm_eval):

    python -m lin_llm.lm_eval_adapter --model lin_llm \\
        --model_args checkpoint=DIR[,override=attention=aug;compute_dtype=bfloat16][,max_length=2048] \\
        --tasks piqa,arc_easy,arc_challenge,hellaswag,mmlu --batch_size 16

From Python: ``import lin_llm.lm_eval_adapter`` and then ``lm_eval.simple_evaluate(model="lin_llm",
model_args="checkpoint=DIR", ...)``, or pass ``LinLLM(checkpoint=DIR)`` itself as ``model``.

Scoring is the model's own forward (``lin_llm.evaluation.score_tokens``) over right-padded
batches whose length is rounded up to a power of two (one compiled shape per bucket);
generation is ``lin_llm.decoding.generate``, greedy unless a task asks for sampling.
"""

from __future__ import annotations

import sys
from collections import defaultdict

import numpy as np
from lm_eval import utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences
from tqdm import tqdm

from lin_llm.decoding import generate
from lin_llm.evaluation import score_tokens
from lin_llm.io import load_checkpoint
from lin_llm.tokenizer import model_tokenizer

MIN_BUCKET = 16


def bucket_length(n: int, max_length: int) -> int:
    """The padded length of an n-token input: the next power of two >= MIN_BUCKET, at most max_length."""
    return min(max(MIN_BUCKET, 1 << (n - 1).bit_length()), max_length)


def _batch_size(value) -> int:
    if isinstance(value, str) and value.startswith("auto"):
        raise ValueError("batch_size=auto is not supported by lin_llm: give a number (--batch_size 16)")
    size = int(value)
    if size < 1:
        raise ValueError(f"batch_size={value} must be >= 1")
    return size


@register_model("lin_llm")
class LinLLM(TemplateLM):
    """checkpoint: a lin_llm checkpoint or Hugging Face LLaMA directory (with its tokenizer);
    override: model-config key=value items separated by ';'; max_length: the longest input
    (default the model's max_seq_len); max_gen_toks: the default generation budget. JAX picks
    the device: ``device`` is accepted for lm_eval's sake and ignored."""

    def __init__(self, checkpoint: str, override: str = "", batch_size=8, max_length: int | None = None,
                 max_gen_toks: int = 256, seed: int = 0, device=None, max_batch_size=None):
        super().__init__()
        overrides = [item for item in str(override).split(";") if item]
        self.model = load_checkpoint(checkpoint, overrides=overrides)
        self.tokenizer = model_tokenizer(checkpoint, self.model.cfg)
        self.checkpoint = str(checkpoint)
        self.batch_size = _batch_size(batch_size)
        self._max_length = int(max_length or self.model.cfg.max_seq_len)
        if not 2 <= self._max_length <= self.model.cfg.max_seq_len:
            raise ValueError(f"max_length={max_length} must be between 2 and the model's {self.model.cfg.max_seq_len}")
        self.max_gen_toks, self.seed = int(max_gen_toks), int(seed)

    @property
    def eot_token_id(self) -> int:
        eos = self.model.cfg.eos_id if self.model.cfg.eos_id is not None else getattr(self.tokenizer, "eos_id", None)
        if eos is None:
            raise ValueError(f"{self.checkpoint}: the model config has no eos_id, which lm_eval needs")
        return eos

    @property
    def prefix_token_id(self) -> int:
        return self.model.cfg.bos_id if self.model.cfg.bos_id is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return f"lin_llm:{self.checkpoint}"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """With the tokenizer's own special tokens (its BOS) unless add_special_tokens=False."""
        return self.tokenizer.encode(string, add_special_tokens=add_special_tokens is not False)

    def tok_decode(self, tokens) -> str:
        return self.tokenizer.decode(tokens)

    # ----------------------------------------------------------------------- loglikelihood

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), continuation is the greedy one) per
        (cache key, context tokens, continuation tokens); contexts are left-truncated so that
        the input fits max_length."""
        by_bucket = defaultdict(list)
        for i, (_, context, continuation) in enumerate(requests):
            tokens = (list(context) + list(continuation))[-(self.max_length + 1) :]
            by_bucket[bucket_length(len(tokens) - 1, self.max_length)].append((i, tokens, len(continuation)))
        results: list = [None] * len(requests)
        with tqdm(total=len(requests), disable=disable_tqdm, desc="loglikelihood") as bar:
            for width, items in sorted(by_bucket.items(), reverse=True):
                for start in range(0, len(items), self.batch_size):
                    self._score_batch(items[start : start + self.batch_size], width, results)
                    bar.update(len(items[start : start + self.batch_size]))
        for (key, _, _), answer in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return results

    def _score_batch(self, items, width: int, results: list) -> None:
        inputs = np.zeros((self.batch_size, width), np.int32)  # padded rows and columns are never read
        targets = np.zeros((self.batch_size, width), np.int32)
        for row, (_, tokens, _) in enumerate(items):
            inputs[row, : len(tokens) - 1] = tokens[:-1]
            targets[row, : len(tokens) - 1] = tokens[1:]
        logprobs, greedy = (np.asarray(x) for x in score_tokens(self.model, inputs, targets))
        for row, (i, tokens, n_continuation) in enumerate(items):
            end = len(tokens) - 1
            span = slice(end - min(n_continuation, end), end)
            results[i] = (float(np.sum(logprobs[row, span], dtype=np.float64)), bool(np.all(greedy[row, span])))

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole text after the prefix token, in lm_eval's rolling windows
        of max_length (every token scored once, each window with as much context as fits)."""
        windows, owners = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            rolling = utils.get_rolling_token_windows(
                token_list=self.tok_encode(string, add_special_tokens=False), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1,
            )
            for context, continuation in map(utils.make_disjoint_window, rolling):
                windows.append((None, context, continuation))
                owners.append(i)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[owner] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return totals

    # ----------------------------------------------------------------------- generation

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continuations cut at the first stop string (or EOS), batched by identical settings."""
        groups = defaultdict(list)
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args
            groups[repr(sorted(gen_kwargs.items()))].append((i, context, dict(gen_kwargs)))
        results: list = [None] * len(requests)
        with tqdm(total=len(requests), disable=disable_tqdm, desc="generate_until") as bar:
            for items in groups.values():
                items.sort(key=lambda item: -len(item[1]))
                for start in range(0, len(items), self.batch_size):
                    batch = items[start : start + self.batch_size]
                    for i, text in zip((b[0] for b in batch), self._generate_batch([b[1] for b in batch], batch[0][2])):
                        results[i] = text
                        self.cache_hook.add_partial("generate_until", requests[i].args, text)
                    bar.update(len(batch))
        return results

    def _generate_batch(self, contexts: list[str], gen_kwargs: dict) -> list[str]:
        until = gen_kwargs.pop("until", None)  # a copy: handle_stop_sequences appends to the list it is given
        until = [until] if isinstance(until, str) else list(until or [])
        until = handle_stop_sequences(until, eos=self.tok_decode([self.eot_token_id]) or None)
        max_new = int(gen_kwargs.pop("max_gen_toks", self.max_gen_toks))
        if not 1 <= max_new < self.max_length:
            raise ValueError(f"max_gen_toks={max_new} must be between 1 and max_length - 1 = {self.max_length - 1}")
        sampling = {}
        if gen_kwargs.get("do_sample") and float(gen_kwargs.get("temperature", 1.0)) > 0:
            sampling = {"temperature": float(gen_kwargs.get("temperature", 1.0)), "top_k": gen_kwargs.get("top_k"),
                        "top_p": gen_kwargs.get("top_p"), "seed": self.seed}
        prompts = [self.tok_encode(c)[-(self.max_length - max_new) :] for c in contexts]
        out = np.asarray(generate(self.model, prompts, max_new, eos_id=self.eot_token_id, **sampling))
        texts = []
        for row in out:
            ids = row.tolist()
            text = self.tok_decode(ids[: ids.index(self.eot_token_id)] if self.eot_token_id in ids else ids)
            for stop in until:
                if stop:
                    text = text.split(stop)[0]
            texts.append(text)
        return texts


def main(argv=None) -> None:
    """lm_eval's own command line, with the ``lin_llm`` model registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()


if __name__ == "__main__":
    main()
