"""A LLaMA-family decoder in Flax NNX. Thin modules: the attention math is in lin_llm.attention.

Parameter layout (NNX state paths), the contract of convert.py and sharding.py:
  embed.embedding [V, dim]; layers[i].attn_norm.scale; layers[i].attn.{wq,wk,wv,wo}.kernel [in, out];
  layers[i].mlp_norm.scale; layers[i].mlp.{w_gate,w_up,w_down}.kernel; norm.scale;
  lm_head.kernel [dim, V] (absent with tied embeddings).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from lin_llm.attention import softmax
from lin_llm.attention.state import DecodeState
from lin_llm.config import ModelConfig
from lin_llm.rope import apply_rope, inverse_frequencies


def _dtypes(cfg: ModelConfig) -> dict:
    return {"dtype": jnp.dtype(cfg.compute_dtype), "param_dtype": jnp.dtype(cfg.param_dtype)}


def _linear(cfg: ModelConfig, rngs: nnx.Rngs, d_in: int, d_out: int, **kwargs) -> nnx.Linear:
    init = nnx.initializers.normal(cfg.init_std)
    return nnx.Linear(d_in, d_out, use_bias=False, kernel_init=init, rngs=rngs, **_dtypes(cfg), **kwargs)


def _rms_norm(cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.RMSNorm:
    return nnx.RMSNorm(cfg.dim, epsilon=cfg.norm_eps, rngs=rngs, **_dtypes(cfg))


class Attention(nnx.Module):
    """Projections and RoPE; the mixing itself is a pure function chosen by ``cfg.attention``."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        d = cfg.resolved_head_dim
        self.wq = _linear(cfg, rngs, cfg.dim, cfg.n_heads * d)
        self.wk = _linear(cfg, rngs, cfg.dim, cfg.n_kv_heads * d)
        self.wv = _linear(cfg, rngs, cfg.dim, cfg.n_kv_heads * d)
        self.wo = _linear(cfg, rngs, cfg.n_heads * d, cfg.dim)

    def __call__(self, x, positions, layer_state=None, pos=None):
        cfg = self.cfg
        b, t, _ = x.shape
        d = cfg.resolved_head_dim
        inv_freq = inverse_frequencies(d, cfg.rope)
        q = apply_rope(self.wq(x).reshape(b, t, cfg.n_heads, d), positions, inv_freq)
        k = apply_rope(self.wk(x).reshape(b, t, cfg.n_kv_heads, d), positions, inv_freq)
        v = self.wv(x).reshape(b, t, cfg.n_kv_heads, d)
        if layer_state is None:
            out = softmax.causal_attention(q, k, v)
        else:
            out, layer_state = softmax.cached_attention(q, k, v, layer_state, pos)
        return self.wo(out.reshape(b, t, cfg.n_heads * d)), layer_state


class MLP(nnx.Module):
    """SwiGLU: w_down(silu(w_gate x) * w_up x)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.w_gate = _linear(cfg, rngs, cfg.dim, cfg.ffn_dim)
        self.w_up = _linear(cfg, rngs, cfg.dim, cfg.ffn_dim)
        self.w_down = _linear(cfg, rngs, cfg.ffn_dim, cfg.dim)

    def __call__(self, x):
        return self.w_down(jax.nn.silu(self.w_gate(x)) * self.w_up(x))


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.attn_norm = _rms_norm(cfg, rngs)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = _rms_norm(cfg, rngs)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x, positions, layer_state=None, pos=None):
        h, layer_state = self.attn(self.attn_norm(x), positions, layer_state, pos)
        x = x + h
        return x + self.mlp(self.mlp_norm(x)), layer_state


class LlamaModel(nnx.Module):
    """``model(ids)`` -> fp32 logits [B, T, V]; ``init_state``/``prefill``/``step`` for decoding."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = nnx.Embed(
            cfg.vocab_size, cfg.dim, embedding_init=nnx.initializers.normal(cfg.init_std), rngs=rngs, **_dtypes(cfg)
        )
        self.layers = nnx.List([Block(cfg, rngs) for _ in range(cfg.n_layers)])
        self.norm = _rms_norm(cfg, rngs)
        self.lm_head = (
            None if cfg.tie_embeddings else _linear(cfg, rngs, cfg.dim, cfg.vocab_size, preferred_element_type=jnp.float32)
        )

    def _logits(self, x):
        x = self.norm(x)
        if self.lm_head is not None:
            return self.lm_head(x).astype(jnp.float32)
        emb = self.embed.embedding[...].astype(x.dtype)
        return jnp.einsum("btd,vd->btv", x, emb, preferred_element_type=jnp.float32)

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        b, t = input_ids.shape
        positions = jnp.broadcast_to(jnp.arange(t), (b, t))
        x = self.embed(input_ids)
        for layer in self.layers:
            x, _ = layer(x, positions)
        return self._logits(x)

    def init_state(self, batch_size: int, max_len: int) -> DecodeState:
        cfg = self.cfg
        if max_len > cfg.max_seq_len:
            raise ValueError(f"max_len={max_len} exceeds model.max_seq_len={cfg.max_seq_len}")
        make = functools.partial(
            softmax.init_cache, batch_size, max_len, cfg.n_kv_heads, cfg.resolved_head_dim, jnp.dtype(cfg.compute_dtype)
        )
        return DecodeState(layers=tuple(make() for _ in range(cfg.n_layers)), pos=jnp.zeros((batch_size,), jnp.int32))

    def prefill(self, input_ids: jax.Array, state: DecodeState) -> tuple[jax.Array, DecodeState]:
        """Consume input_ids [B, T] after what ``state`` holds; logits [B, T, V] and the new state."""
        t = input_ids.shape[1]
        positions = state.pos[:, None] + jnp.arange(t)[None, :]
        x = self.embed(input_ids)
        new_layers = []
        for layer, layer_state in zip(self.layers, state.layers):
            x, layer_state = layer(x, positions, layer_state, state.pos)
            new_layers.append(layer_state)
        return self._logits(x), DecodeState(layers=tuple(new_layers), pos=state.pos + t)

    def step(self, token_ids: jax.Array, state: DecodeState) -> tuple[jax.Array, DecodeState]:
        """Consume one token per row, token_ids [B]; logits [B, V] and the new state."""
        logits, state = self.prefill(token_ids[:, None], state)
        return logits[:, 0], state


def build_model(cfg: ModelConfig, seed: int = 0) -> LlamaModel:
    """A freshly initialised model (params drawn from N(0, init_std), norms at one)."""
    return LlamaModel(cfg, rngs=nnx.Rngs(seed))


def abstract_model(cfg: ModelConfig) -> LlamaModel:
    """The model's structure with ShapeDtypeStruct leaves: no memory, for restoring into."""
    return nnx.eval_shape(lambda: LlamaModel(cfg, rngs=nnx.Rngs(0)))
