"""A LLaMA-family decoder in Flax NNX. Thin modules: the attention math is in lin_llm.attention.

Parameter layout (NNX state paths), the contract of convert.py and sharding.py:
  embed.embedding [V, dim]; layers[i].attn_norm.scale; layers[i].attn.{wq,wk,wv,wo}.kernel [in, out];
  layers[i].mlp_norm.scale; layers[i].mlp.{w_gate,w_up,w_down}.kernel; norm.scale;
  lm_head.kernel [dim, V] (absent with tied embeddings); medusa[i].{kernel [dim, dim], bias [dim]}
  and, with model.medusa_own_lm_head, medusa[i].lm_head.kernel [dim, V].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lin_llm.attention import layer, presets, softmax
from lin_llm.attention.layer import layer_math
from lin_llm.attention.state import DecodeState
from lin_llm.config import ModelConfig
from lin_llm.rope import apply_rope, inverse_frequencies
from pallas_kernels import select_impl


def _dtypes(cfg: ModelConfig) -> dict:
    return {"dtype": jnp.dtype(cfg.compute_dtype), "param_dtype": jnp.dtype(cfg.param_dtype)}


def matmul(x: jax.Array, w: jax.Array, w_contract: int = 0, preferred_element_type=None) -> jax.Array:
    """x [..., K] times the matrix w contracted over its axis w_contract (0: w is [K, N], the
    kernels' layout; 1: w is [N, K], an embedding table) -> [..., N].

    XLA CPU multiplies a single row by a matrix with a kernel that takes only fp32: it converts
    a bf16 (or any other) matrix to fp32 in full on every call, which made bf16 weights decode
    several times slower per token than fp32. From two rows on it uses its batched kernels, which
    read bf16 as it is, so on CPU a lone row is paired with a zero row there.
    """
    rows = x.reshape(-1, x.shape[-1])
    lone = rows.shape[0] == 1 and w.dtype != jnp.float32 and jax.default_backend() == "cpu"
    if lone:
        rows = jnp.concatenate([rows, jnp.zeros_like(rows)])
    y = jax.lax.dot_general(rows, w, (((1,), (w_contract,)), ((), ())), preferred_element_type=preferred_element_type)
    return (y[:1] if lone else y).reshape(x.shape[:-1] + y.shape[-1:])


class Linear(nnx.Linear):
    """A bias-free nnx.Linear (same parameters and init) whose products go through `matmul`."""

    def __call__(self, inputs: jax.Array) -> jax.Array:
        inputs, kernel, _ = self.promote_dtype((inputs, self.kernel[...], None), dtype=self.dtype)
        return matmul(inputs, kernel, 0, self.preferred_element_type)


def _linear(cfg: ModelConfig, rngs: nnx.Rngs, d_in: int, d_out: int, **kwargs) -> Linear:
    init = nnx.initializers.normal(cfg.init_std)
    return Linear(d_in, d_out, use_bias=False, kernel_init=init, rngs=rngs, **_dtypes(cfg), **kwargs)


def _rms_norm(cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.RMSNorm:
    return nnx.RMSNorm(cfg.dim, epsilon=cfg.norm_eps, rngs=rngs, **_dtypes(cfg))


def _cache_dtype(cfg: ModelConfig):
    """The KV cache's dtype: the compute dtype, except on CPU. XLA CPU computes bf16 elementwise
    ops in fp32, so each step's write into a bf16 cache converted the whole cache to fp32 and back
    and copied it (O(context) per token); an fp32 cache is updated in place."""
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.dtype(cfg.compute_dtype)


class Attention(nnx.Module):
    """Projections and RoPE; the mixing itself is pure functions chosen by the layer's preset
    (``cfg.layer_attention``: ``cfg.attention``, or softmax in ``cfg.softmax_layers``)."""

    def __init__(self, cfg: ModelConfig, layer_index: int, rngs: nnx.Rngs):
        self.cfg = cfg
        d = cfg.resolved_head_dim
        self.wq = _linear(cfg, rngs, cfg.dim, cfg.n_heads * d)
        self.wk = _linear(cfg, rngs, cfg.dim, cfg.n_kv_heads * d)
        self.wv = _linear(cfg, rngs, cfg.dim, cfg.n_kv_heads * d)
        self.wo = _linear(cfg, rngs, cfg.n_heads * d, cfg.dim)
        preset = presets.get(cfg.layer_attention(layer_index))
        self.math = None
        self.extra = ()
        if preset is not None:
            la = cfg.la
            self.math = layer_math(
                preset, group_size=la.group_size, local_kernel=la.local_kernel, head_dim=d, eps=la.eps,
                max_len=cfg.max_seq_len, performer_features=la.feature_dim, seed=la.seed, layer=layer_index,
                impl=select_impl(cfg.attention_impl),
            )
            extra = _extra_params(cfg, preset, layer_index)
            for name, value in extra.items():
                setattr(self, name, nnx.Param(jnp.asarray(value)))
            self.extra = tuple(extra)

    def _qkv(self, x, positions):
        cfg = self.cfg
        b, t, _ = x.shape
        d = cfg.resolved_head_dim
        inv_freq = inverse_frequencies(d, cfg.rope)
        q = self.wq(x).reshape(b, t, cfg.n_heads, d)
        k = self.wk(x).reshape(b, t, cfg.n_kv_heads, d)
        v = self.wv(x).reshape(b, t, cfg.n_kv_heads, d)
        if self.math is not None:  # linear attention keeps one state per query head (RoPE is per head)
            rep = cfg.n_heads // cfg.n_kv_heads
            k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
            q, k = layer.before_rope(self.math, self._params(), q, k)
        return apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq), v

    def _params(self) -> dict:
        return {name: getattr(self, name)[...] for name in self.extra}

    def _out(self, out):
        b, t = out.shape[:2]
        return self.wo(out.reshape(b, t, -1))

    def __call__(self, x, positions):
        q, k, v = self._qkv(x, positions)
        if self.math is None:
            return self._out(softmax.causal_attention(q, k, v))
        return self._out(layer.forward(self.math, self._params(), q, k, v, positions))

    def extend(self, x, positions, layer_state, pos, lengths=None):
        q, k, v = self._qkv(x, positions)
        if self.math is None:  # padding lands past the row's position: masked, then overwritten
            out, layer_state = softmax.cached_attention(q, k, v, layer_state, pos)
        else:
            out, layer_state = layer.extend(self.math, self._params(), q, k, v, positions, layer_state, pos, lengths)
        return self._out(out), layer_state

    def verify(self, x, positions, layer_state, pos, ancestors, depths):
        q, k, v = self._qkv(x, positions)
        if self.math is None:
            out, pending = softmax.verify(q, k, v, layer_state, pos, ancestors)
        else:
            out, pending = layer.verify(self.math, self._params(), q, k, v, positions, layer_state, pos, ancestors, depths)
        return self._out(out), pending

    def commit(self, layer_state, pending, pos, path, n_accepted):
        if self.math is None:
            return softmax.commit(layer_state, pending, pos, path)
        return layer.commit(self.math, layer_state, pending, pos, path, n_accepted)

    def init_state(self, batch_size: int, max_len: int):
        cfg = self.cfg
        if self.math is None:
            return softmax.init_cache(batch_size, max_len, cfg.n_kv_heads, cfg.resolved_head_dim, _cache_dtype(cfg))
        return layer.init_state(self.math, batch_size, cfg.n_heads, cfg.resolved_head_dim, cfg.la.conv_kernel_size)


class MLP(nnx.Module):
    """SwiGLU: w_down(silu(w_gate x) * w_up x)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.w_gate = _linear(cfg, rngs, cfg.dim, cfg.ffn_dim)
        self.w_up = _linear(cfg, rngs, cfg.dim, cfg.ffn_dim)
        self.w_down = _linear(cfg, rngs, cfg.ffn_dim, cfg.dim)

    def __call__(self, x):
        return self.w_down(jax.nn.silu(self.w_gate(x)) * self.w_up(x))


class Block(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(.)). ``attend`` and ``finish``
    are its two halves, so distillation can feed one block's attention output into another's MLP."""

    def __init__(self, cfg: ModelConfig, layer_index: int, rngs: nnx.Rngs):
        self.attn_norm = _rms_norm(cfg, rngs)
        self.attn = Attention(cfg, layer_index, rngs)
        self.mlp_norm = _rms_norm(cfg, rngs)
        self.mlp = MLP(cfg, rngs)

    def attend(self, x, positions):
        """The attention branch's output (before the residual add)."""
        return self.attn(self.attn_norm(x), positions)

    def finish(self, x, h):
        """The block's output given the attention branch's output h."""
        x = x + h
        return x + self.mlp(self.mlp_norm(x))

    def __call__(self, x, positions):
        return self.finish(x, self.attend(x, positions))

    def extend(self, x, positions, layer_state, pos, lengths=None):
        h, layer_state = self.attn.extend(self.attn_norm(x), positions, layer_state, pos, lengths)
        return self.finish(x, h), layer_state

    def verify(self, x, positions, layer_state, pos, ancestors, depths):
        h, pending = self.attn.verify(self.attn_norm(x), positions, layer_state, pos, ancestors, depths)
        return self.finish(x, h), pending


class MedusaHead(nnx.Linear):
    """Medusa head i: the final hidden h -> h + silu(W_i h + b_i) (the original's ResBlock), then an
    output projection to predict the token i + 2 places ahead: the model's shared one, or with
    model.medusa_own_lm_head its own ``lm_head`` (the original Medusa's). W_i, b_i start at zero, so
    a new head with the shared projection starts as a copy of the model's own next-token head."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        super().__init__(cfg.dim, cfg.dim, kernel_init=nnx.initializers.zeros, rngs=rngs, **_dtypes(cfg))
        own = cfg.medusa_own_lm_head
        self.lm_head = _linear(cfg, rngs, cfg.dim, cfg.vocab_size, preferred_element_type=jnp.float32) if own else None

    def features(self, hidden: jax.Array) -> jax.Array:
        return hidden + jax.nn.silu(self(hidden))


class LlamaModel(nnx.Module):
    """``model(ids)`` -> fp32 logits [B, T, V]; explicit-state decoding with ``init_state``,
    ``prefill``, ``step``, and ``verify`` + ``commit`` for speculative decoding."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = nnx.Embed(
            cfg.vocab_size, cfg.dim, embedding_init=nnx.initializers.normal(cfg.init_std), rngs=rngs, **_dtypes(cfg)
        )
        self.layers = nnx.List([Block(cfg, i, rngs) for i in range(cfg.n_layers)])
        self.norm = _rms_norm(cfg, rngs)
        self.lm_head = (
            None if cfg.tie_embeddings else _linear(cfg, rngs, cfg.dim, cfg.vocab_size, preferred_element_type=jnp.float32)
        )
        self.medusa = nnx.List([MedusaHead(cfg, rngs) for _ in range(cfg.medusa_heads)])

    def logits(self, h):
        """fp32 logits [..., V] of final (normalised) hidden states: lm_head, or the tied embedding."""
        if self.lm_head is not None:
            return self.lm_head(h).astype(jnp.float32)
        return matmul(h, self.embed.embedding[...].astype(h.dtype), 1, jnp.float32)

    def medusa_logits(self, hidden: jax.Array) -> jax.Array:
        """Logits [B, T, medusa_heads, V] of the Medusa heads from final hidden states [B, T, dim]
        (as returned with ``return_hidden=True``): head i predicts position t + i + 2."""
        logits = []
        for head in self.medusa:
            h = head.features(hidden)
            logits.append(self.logits(h) if head.lm_head is None else head.lm_head(h).astype(jnp.float32))
        return jnp.stack(logits, axis=2)

    def hidden(self, input_ids: jax.Array, *, remat: bool = False, constrain=None) -> jax.Array:
        """Final (normalised) hidden states [B, T, dim] of a whole sequence.

        remat recomputes each block in the backward pass; constrain(x), if given, is applied to the
        activations after each block (training passes its sharding constraint).
        """
        b, t = input_ids.shape
        positions = jnp.broadcast_to(jnp.arange(t), (b, t))
        x = self.embed(input_ids)
        for block in self.layers:
            if remat:
                graphdef, state = nnx.split(block)
                x = jax.checkpoint(lambda st, h, p: nnx.merge(graphdef, st)(h, p))(state, x, positions)
            else:
                x = block(x, positions)
            if constrain is not None:
                x = constrain(x)
        return self.norm(x)

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        return self.logits(self.hidden(input_ids))

    def init_state(self, batch_size: int, max_len: int) -> DecodeState:
        """An empty decoding state. Softmax preallocates a KV cache of max_len; linear attention's
        state has a fixed size whatever max_len (which is only checked against the model's)."""
        if max_len > self.cfg.max_seq_len:
            raise ValueError(f"max_len={max_len} exceeds model.max_seq_len={self.cfg.max_seq_len}")
        return DecodeState(
            layers=tuple(block.attn.init_state(batch_size, max_len) for block in self.layers),
            pos=jnp.zeros((batch_size,), jnp.int32),
        )

    def prefill(self, input_ids: jax.Array, state: DecodeState, lengths=None, return_hidden: bool = False):
        """Consume input_ids [B, T] after what ``state`` holds; logits [B, T, V] and the new state
        (and the final hidden states [B, T, dim] first, with return_hidden).

        lengths [B] (default T): rows are right-padded past lengths[r]; padding is never attended
        and never enters the state, and the row's position advances by lengths[r] only.
        """
        t = input_ids.shape[1]
        positions = state.pos[:, None] + jnp.arange(t)[None, :]
        x = self.embed(input_ids)
        new_layers = []
        for block, layer_state in zip(self.layers, state.layers):
            x, layer_state = block.extend(x, positions, layer_state, state.pos, lengths)
            new_layers.append(layer_state)
        advance = t if lengths is None else lengths
        hidden = self.norm(x)
        new_state = DecodeState(layers=tuple(new_layers), pos=state.pos + advance)
        if return_hidden:
            return hidden, self.logits(hidden), new_state
        return self.logits(hidden), new_state

    def step(self, token_ids: jax.Array, state: DecodeState) -> tuple[jax.Array, DecodeState]:
        """Consume one token per row, token_ids [B]; logits [B, V] and the new state."""
        logits, state = self.prefill(token_ids[:, None], state)
        return logits[:, 0], state

    def verify(self, token_ids: jax.Array, state: DecodeState, ancestors=None, depths=None, return_hidden=False):
        """Score m candidates [B, m] in one pass without changing ``state``.

        ancestors [m, m] bool (self included) and depths [m] describe a token tree; the default
        is a chain. Returns logits [B, m, V] and what ``commit`` needs (and the final hidden
        states [B, m, dim] first, with return_hidden).
        """
        m = token_ids.shape[1]
        if ancestors is None:
            ancestors, depths = jnp.tril(jnp.ones((m, m), bool)), jnp.arange(m)
        positions = state.pos[:, None] + depths[None, :]
        x = self.embed(token_ids)
        pending = []
        for block, layer_state in zip(self.layers, state.layers):
            x, layer_pending = block.verify(x, positions, layer_state, state.pos, ancestors, depths)
            pending.append(layer_pending)
        hidden = self.norm(x)
        if return_hidden:
            return hidden, self.logits(hidden), tuple(pending)
        return self.logits(hidden), tuple(pending)

    def commit(self, state: DecodeState, pending, path: jax.Array, n_accepted: jax.Array) -> DecodeState:
        """The state after accepting candidates path[:, :n_accepted] (indices into the verified
        candidates, root first): the same as stepping through those tokens."""
        layers = tuple(
            block.attn.commit(layer_state, layer_pending, state.pos, path, n_accepted)
            for block, layer_state, layer_pending in zip(self.layers, state.layers, pending)
        )
        return DecodeState(layers=layers, pos=state.pos + n_accepted)


def build_model(cfg: ModelConfig, seed: int = 0) -> LlamaModel:
    """A freshly initialised model (weights drawn from N(0, init_std), norms at one)."""
    return LlamaModel(cfg, rngs=nnx.Rngs(seed))


def _extra_params(cfg: ModelConfig, preset: presets.Preset, layer_index: int) -> dict:
    la = cfg.la
    return presets.init_params(
        preset, cfg.n_heads, cfg.resolved_head_dim, la.conv_kernel_size, la.conv_per_channel,
        learn_lambda=la.learn_lambda, feature_dim=la.feature_dim, seed=la.seed, layer=layer_index,
    )


def attention_param_defaults(cfg: ModelConfig) -> dict:
    """Initial values {flat name: array} of the linear-attention params (of the linear layers
    only, in a hybrid): what a softmax checkpoint lacks when it is linearised."""
    preset = presets.get(cfg.attention)
    if preset is None:
        return {}
    return {
        f"layers.{i}.attn.{name}": value
        for i in cfg.linear_layers
        for name, value in _extra_params(cfg, preset, i).items()
    }


def new_param_defaults(cfg: ModelConfig) -> dict:
    """Initial values of every param a plain LLaMA checkpoint may lack: linear attention's (when
    it is linearised) and the Medusa heads' (when they are added)."""
    defaults = attention_param_defaults(cfg)
    for i in range(cfg.medusa_heads):
        defaults[f"medusa.{i}.kernel"] = np.zeros((cfg.dim, cfg.dim), np.float32)
        defaults[f"medusa.{i}.bias"] = np.zeros((cfg.dim,), np.float32)
    return defaults


def abstract_model(cfg: ModelConfig) -> LlamaModel:
    """The model's structure with ShapeDtypeStruct leaves: no memory, for restoring into."""
    return nnx.eval_shape(lambda: LlamaModel(cfg, rngs=nnx.Rngs(0)))


# --------------------------------------------------------------------------- flat params
# Checkpoints, training and LoRA see the params as one flat dict {"layers.0.attn.wq.kernel": array}.


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """{"layers": {0: {"attn": ...}}} -> {"layers.0.attn...": leaf}."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def unflatten(flat: dict[str, object]) -> dict:
    """The inverse of flatten (digit parts become the int keys of nnx.List)."""
    tree: dict = {}
    for name, value in flat.items():
        node = tree
        *parents, leaf = [int(p) if p.isdigit() else p for p in name.split(".")]
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def flat_params(model: LlamaModel) -> dict[str, jax.Array]:
    """The model's parameters as {"layers.0.attn.wq.kernel": array, ...}."""
    return flatten(nnx.state(model, nnx.Param).to_pure_dict())


def param_shapes(cfg: ModelConfig) -> dict[str, jax.ShapeDtypeStruct]:
    """{flat name: ShapeDtypeStruct} of the model of ``cfg``, without allocating it."""
    return flat_params(abstract_model(cfg))
