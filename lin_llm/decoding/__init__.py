"""Jitted decoding with an explicit state: plain, speculative (a draft model) and Medusa (the
target's own heads), all with one prefill and the token loop inside one ``lax.while_loop``."""

from lin_llm.decoding.medusa import build_tree, medusa_generate, medusa_loss
from lin_llm.decoding.plain import generate
from lin_llm.decoding.sampling import process_logits, sample
from lin_llm.decoding.speculative import speculative_generate

__all__ = ["build_tree", "generate", "medusa_generate", "medusa_loss", "process_logits", "sample",
           "speculative_generate"]
