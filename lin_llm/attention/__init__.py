"""Attention math as pure functions (no Flax): q, k, v (+ state) in, output (+ state) out."""
