"""Pallas kernels for the chunked causal linear-attention scan (see pallas_kernels/README.md)."""

from pallas_kernels.block_sizes import BlockSizes
from pallas_kernels.linear_scan import (
    BACKENDS,
    chunked_linear_attention,
    chunked_linear_attention_normalized,
)
from pallas_kernels.select import IMPL_FLAGS, Impl, select_impl

__all__ = [
    "BACKENDS",
    "BlockSizes",
    "IMPL_FLAGS",
    "Impl",
    "chunked_linear_attention",
    "chunked_linear_attention_normalized",
    "select_impl",
]
