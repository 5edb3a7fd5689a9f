"""The XLA form of the kernels' math: the CPU implementation, the test oracle and the debug backward.

Same contract as `pallas_kernels.chunked_linear_attention` (q, k [B, T, H, D], v [B, T, H, Dv];
chunks of `chunk_size` tokens starting at t = 0; fp32 state [B, H, D, Dv]):

    S_0 = initial_state,  S_{n+1} = S_n + K_n^T V_n
    out_t = local_scale * sum_{j <= t, same chunk} kappa(q_t . k_j) v_j + global_scale * q_t S_{n(t)}

It follows lin_llm.attention.linear.chunked operation for operation (products of inputs in their
own dtype with fp32 accumulation, local weights rounded to v's dtype before they meet v, anything
touching the state in fp32), so bf16 results can be compared like for like. Kept separate from
lin_llm on purpose: the kernels never import the attention library (data flows library -> kernels).
"""

from __future__ import annotations

import jax.numpy as jnp

F32 = jnp.float32
LOCAL_KERNELS = ("dot", "relu2")


def kappa(kind: str, score):
    """The local (in-chunk) kernel on fp32 scores: plain dot product, or the paper's relu(.)^2."""
    if kind == "dot":
        return score
    if kind == "relu2":
        return jnp.square(jnp.maximum(score, 0.0))
    raise ValueError(f"local_kernel={kind!r} is not one of {LOCAL_KERNELS}")


def chunked(q, k, v, *, chunk_size, local_kernel, initial_state=None, local_scale=1.0, global_scale=1.0):
    """(out [B, T, H, Dv] fp32, final state [B, H, D, Dv] fp32) in O(T) XLA ops; any T.

    The final state is initial_state + sum over all T tokens of k_t^T v_t (the last, partial
    chunk included).
    """
    b, t, h, d = q.shape
    dv = v.shape[-1]
    g = chunk_size
    pad = (-t) % g
    n = (t + pad) // g

    def chunks(x):
        return jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(b, n, g, h, x.shape[-1])

    qc, kc, vc = chunks(q), chunks(k), chunks(v)
    s0 = jnp.zeros((b, h, d, dv), F32) if initial_state is None else initial_state.astype(F32)
    kv = jnp.einsum("bngkf,bngkd->bnkfd", kc, vc, preferred_element_type=F32)
    # states before each chunk: shifted cumsum (not cumsum - kv, which cancels in the backward)
    shifted = jnp.concatenate([jnp.zeros_like(kv[:, :1]), kv[:, :-1]], axis=1)
    s_excl = s0[:, None] + jnp.cumsum(shifted, axis=1)
    final = s_excl[:, -1] + kv[:, -1]

    score = jnp.einsum("bnihf,bnjhf->bnhij", qc, kc, preferred_element_type=F32)
    w = jnp.where(jnp.tril(jnp.ones((g, g), bool)), kappa(local_kernel, score), 0.0)
    local = jnp.einsum("bnhij,bnjhd->bnihd", w.astype(v.dtype), vc, preferred_element_type=F32)
    glob = jnp.einsum("bnihf,bnhfd->bnihd", qc.astype(F32), s_excl)
    out = local_scale * local + global_scale * glob
    return out.reshape(b, n * g, h, dv)[:, :t], final


def chunked_linear_attention(q, k, v, *, chunk_size, local_kernel, initial_state=None, return_final_state=False,
                             local_scale=1.0, global_scale=1.0):
    """`chunked` with the kernel's output contract: out in v's dtype (plus the fp32 final state)."""
    out, final = chunked(q, k, v, chunk_size=chunk_size, local_kernel=local_kernel, initial_state=initial_state,
                         local_scale=local_scale, global_scale=global_scale)
    out = out.astype(v.dtype)
    return (out, final) if return_final_state else out
