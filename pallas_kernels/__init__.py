"""Pallas kernels for the chunked causal linear-attention scan (see the attention issue)."""
