"""The original code's attention layers, re-implemented in torch from its formulas: the oracle of
the fidelity tests. Nothing here imports lin_llm.

Sources (GATECH-EIC/Linearized-LLM): experiments/llama_attn_replace.py, linear_forward_noflashattn
(the training forward every LLaMA run used), its USE_LOCAL / USE_GLOBAL / GLOBAL_FACTOR /
LOCAL_FACTOR / ADD_CONV / USE_CASTLING / USE_YOSO branches; the conv and factors as
experiments/fine-tune.py creates them; flash_pytorch.py, FLASH.forward's mixed-chunk branch
(causal, with the Laplace attention function train-hf.py selects), mapped onto one LLaMA head.

Layouts are the original's: q, k, v [B, H, T, D] after repeat_kv; parameters by the original's
names (per layer):
  "global_factor" [1], "local_factor" [1]   alpha and lambda (absent: the constant 1)
  "dwconv.weight" [H, 1, K, 1]               the depthwise conv (the future half is masked here)
  "qk_offset_scale.gamma", "qk_offset_scale.beta" [4, H, D]   FLASH's OffsetScale(heads=4) per
        LLaMA head, parts (quad q, lin q, quad k, lin k)
  "rel_pos_bias.relative_attention_bias.weight" [32, H]       FLASH's T5 bias table, per head

Entry points: `linearized_attention` and `flash_attention` (per layer, from q, k, v),
`llama_attention_layer` (hidden states -> o_proj output, LLaMA projections + RoPE), `rope_cos_sin`,
and `patch_hf_llama`, which swaps the attention of a transformers LlamaForCausalLM for these, as
the original's replace_llama_attn does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _groups(x, g):
    """[B, H, n * g, D] -> [B, H, n, g, D] ("b h (g c) d -> b h g c d")."""
    b, h, t, d = x.shape
    return x.reshape(b, h, t // g, g, d)


def _ungroup(x):
    b, h, n, g, d = x.shape
    return x.reshape(b, h, n * g, d)


def _diagonal_blocks(mask, g):
    """The original's "(g c) (g1 c1) -> c c1 g g1", diagonal, "b c c1 dia -> b dia c c1": [1, n, g, g]."""
    n = mask.shape[0] // g
    blocks = mask.reshape(n, g, n, g).permute(1, 3, 0, 2)  # c c1 g g1
    return torch.diagonal(blocks, dim1=-1, dim2=-2).unsqueeze(0).permute(0, 3, 1, 2)


def _local_kernel(qk, yoso):
    if yoso:  # yoso_pointwise, HASHCODE_LEN = 8
        return torch.pow(1 - torch.acos(0.98 * qk) / math.pi, 8)
    return F.relu(qk) ** 2


def _local_quadratic_attn_p(q, k, v, causal_mask, yoso):
    a = _local_kernel(torch.einsum("bhgns,bhgms->bhgnm", q, k), yoso)
    return torch.einsum("bhgnm,bhgme->bhgne", causal_mask.unsqueeze(1) * a, v)


def _local_quadratic_attn_p_g1(q, k, v, causal_mask, yoso):
    a = _local_kernel(torch.einsum("bhns,bhms->bhnm", q, k), yoso)
    return torch.einsum("bhnm,bhme->bhne", causal_mask.unsqueeze(1) * a, v)


def _global_linear_attn_p(q, k, v):
    kv = torch.einsum("bhgcs,bhgce->bhgse", k, v)
    kv = torch.cumsum(kv, dim=2) - kv
    return torch.einsum("bhgcs,bhgse->bhgce", q, kv)


def _global_linear_attn_causal(q, k, v, q_res):
    kv = torch.einsum("bhgcs,bhgce->bhgse", k, v)
    kv1 = torch.cumsum(kv, dim=2)
    if kv1.size(2) == 0:  # no complete group before the remainder
        return torch.zeros(q_res.shape[:3] + (v.shape[-1],), dtype=q_res.dtype)
    qkv_res = torch.einsum("bhcs,bhse->bhce", q_res, kv1[:, :, -1])
    qkv0 = torch.einsum("bhgcs,bhgse->bhgce", q, kv1 - kv)
    return torch.cat([_ungroup(qkv0), qkv_res], dim=2)


def masked_dwconv(v, weight):
    """fine-tune.py's dwconv (Conv2d(H, H, (K, 1), padding (K // 2, 0), groups=H, no bias)) after
    `weight *= conv_mask` (taps past K // 2 zeroed), on v [B, H, T, D]."""
    k = weight.shape[2]
    mask = torch.ones((1, 1, k, 1), dtype=weight.dtype)
    mask[:, :, k // 2 + 1 :, :] = 0.0
    return F.conv2d(v, weight * mask, padding=(k // 2, 0), groups=weight.shape[0])


def linearized_attention(q, k, v, params, *, group_size=64, use_global=True, add_conv=True, use_castling=False,
                         use_yoso=False):
    """linear_forward_noflashattn from RoPE'd q, k, v [B, H, T, D] to the output before o_proj.

    The flags are its environment variables; GLOBAL_FACTOR / LOCAL_FACTOR are the presence of
    "global_factor" / "local_factor" in params. aug = use_global + add_conv (+ global_factor).
    """
    t = q.size(2)
    query_t = q / q.norm(dim=-1, keepdim=True)
    key_t = k / k.norm(dim=-1, keepdim=True)
    mask0 = torch.tril(torch.ones(t, t, dtype=q.dtype))  # attention_mask0: 1 where attending
    res = t % group_size
    g = group_size
    if not res:
        query_t, key_t, value_t = _groups(query_t, g), _groups(key_t, g), _groups(v, g)
        attn_output = _ungroup(_local_quadratic_attn_p(query_t, key_t, value_t, _diagonal_blocks(mask0, g), use_yoso))
    else:
        query_pre, query_res = _groups(query_t[:, :, :-res], g), query_t[:, :, -res:]
        key_pre, key_res = _groups(key_t[:, :, :-res], g), key_t[:, :, -res:]
        value_pre, value_res = _groups(v[:, :, :-res], g), v[:, :, -res:]
        mask_res = mask0[-res:, -res:].unsqueeze(0)
        local_res = _local_quadratic_attn_p_g1(query_res, key_res, value_res, mask_res, use_yoso)
        if query_pre.size(2) > 0:
            mask_pre = _diagonal_blocks(mask0[:-res, :-res], g)
            local_pre = _ungroup(_local_quadratic_attn_p(query_pre, key_pre, value_pre, mask_pre, use_yoso))
            attn_output = torch.cat([local_pre, local_res], dim=2)
        else:
            attn_output = local_res
    if use_global:
        if not res:
            global_out = _ungroup(_global_linear_attn_p(query_t, key_t, value_t))
        else:
            global_out = _global_linear_attn_causal(query_pre, key_pre, value_pre, query_res)
        attn_output = attn_output * params.get("local_factor", 1.0) + global_out * params.get("global_factor", 1.0)
    if use_castling:
        conv_out = masked_dwconv(v, params["dwconv.weight"])
        attn_output = 0.5 * v + 1.0 / math.pi * attn_output
        attn_output = attn_output / attn_output.norm(dim=-1, keepdim=True)
        attn_output = attn_output + conv_out
    if add_conv:
        attn_output = attn_output + masked_dwconv(v, params["dwconv.weight"])
    return attn_output


# --------------------------------------------------------------------------- FLASH


def _t5_causal_bucket(relative_position, num_buckets=32, max_distance=128):
    """T5RelativePositionBias._relative_position_bucket with causal=True."""
    n = torch.max(-relative_position, torch.zeros_like(relative_position))
    max_exact = num_buckets // 2
    is_small = n < max_exact
    val_if_large = max_exact + (
        torch.log(n.float() / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).long()
    val_if_large = torch.min(val_if_large, torch.full_like(val_if_large, num_buckets - 1))
    return torch.where(is_small, n, val_if_large)


def _laplace(x):
    """LaplacianAttnFn."""
    mu = math.sqrt(0.5)
    std = math.sqrt((4 * math.pi) ** -1)
    return (1 + torch.special.erf((x - mu) / (std * math.sqrt(2)))) * 0.5


def rotate(x, cos, sin):
    """transformers' LLaMA RoPE: x * cos + rotate_half(x) * sin, cos/sin [B or 1, T, D]."""
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return x * cos.unsqueeze(1) + torch.cat((-x2, x1), dim=-1) * sin.unsqueeze(1)


def flash_attention(q, k, v, params, cos, sin, *, group_size=64, add_conv=False):
    """FLASH.forward's mixed-chunk attention (causal, laplace_attn_fn=True) per LLaMA head, from
    q, k, v [B, H, T, D] *before* RoPE (FLASH rotates after its OffsetScale), to the output before
    o_proj (FLASH's gate and to_out do not exist in a LLaMA block). add_conv: + the masked conv."""
    b, h, n, d = q.shape
    g = group_size
    gamma, beta = params["qk_offset_scale.gamma"], params["qk_offset_scale.beta"]
    part = lambda x, i: x * gamma[i][None, :, None, :] + beta[i][None, :, None, :]  # noqa: E731
    quad_q, lin_q, quad_k, lin_k = part(q, 0), part(q, 1), part(k, 2), part(k, 3)
    quad_q, lin_q, quad_k, lin_k = (rotate(x, cos, sin) for x in (quad_q, lin_q, quad_k, lin_k))
    padding = (-n) % g
    mask = torch.ones((b, n), dtype=torch.bool)
    if padding > 0:
        quad_q, quad_k, lin_q, lin_k, v_pad = (F.pad(x, (0, 0, 0, padding), value=0.0)
                                               for x in (quad_q, quad_k, lin_q, lin_k, v))
        mask = F.pad(mask, (0, padding), value=False)
    else:
        v_pad = v
    quad_q, quad_k, lin_q, lin_k, v_g = (_groups(x, g) for x in (quad_q, quad_k, lin_q, lin_k, v_pad))
    mask = mask.reshape(b, 1, -1, 1, g)  # 'b (g j) -> b g 1 j', with a head axis

    sim = torch.einsum("bhgid,bhgjd->bhgij", quad_q, quad_k) / g
    pos = torch.arange(g)
    bucket = _t5_causal_bucket(pos[None, :] - pos[:, None])  # k_pos - q_pos
    table = params["rel_pos_bias.relative_attention_bias.weight"]  # [32, H]
    sim = sim + (table[bucket] * d**0.5).permute(2, 0, 1)[None, :, None]  # scale = query_key_dim ** 0.5
    attn = _laplace(sim).masked_fill(~mask, 0.0)
    attn = attn.masked_fill(torch.ones((g, g), dtype=torch.bool).triu(1), 0.0)
    quad_out = torch.einsum("bhgij,bhgjd->bhgid", attn, v_g)

    lin_kv = torch.einsum("bhgnd,bhgne->bhgde", lin_k, v_g) / g
    lin_kv = F.pad(lin_kv.cumsum(dim=2), (0, 0, 0, 0, 1, -1), value=0.0)  # exclusive over groups
    lin_out = torch.einsum("bhgde,bhgnd->bhgne", lin_kv, lin_q)
    out = _ungroup(quad_out)[:, :, :n] + _ungroup(lin_out)[:, :, :n]
    if add_conv:
        out = out + masked_dwconv(v, params["dwconv.weight"])
    return out


# --------------------------------------------------------------------------- whole layer


def rope_cos_sin(positions, head_dim, theta=10000.0, dtype=torch.float64):
    """LLaMA's unscaled RoPE tables for positions [B, T]: cos, sin [B, T, D]."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    freqs = positions.to(torch.float64)[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _repeat_kv(x, n_rep):
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, t, d).reshape(b, h * n_rep, t, d)


def llama_attention_layer(hidden, weights, cos, sin, params, *, n_heads, n_kv_heads, flash=False, **flags):
    """A LLaMA attention layer as the original patches it: hidden [B, T, dim] -> o_proj output.

    weights: "q_proj", "k_proj", "v_proj", "o_proj" in torch's [out, in] layout; cos, sin [B or
    1, T, D] (rope_cos_sin, or a transformers model's position_embeddings); flash selects
    flash_attention, else linearized_attention with **flags (group_size, use_global, ...).
    """
    b, t, _ = hidden.shape
    d = weights["q_proj"].shape[0] // n_heads
    q = (hidden @ weights["q_proj"].T).view(b, t, n_heads, d).transpose(1, 2)
    k = (hidden @ weights["k_proj"].T).view(b, t, n_kv_heads, d).transpose(1, 2)
    v = (hidden @ weights["v_proj"].T).view(b, t, n_kv_heads, d).transpose(1, 2)
    k, v = _repeat_kv(k, n_heads // n_kv_heads), _repeat_kv(v, n_heads // n_kv_heads)
    if flash:
        out = flash_attention(q, k, v, params, cos, sin, **flags)
    else:
        out = linearized_attention(rotate(q, cos, sin), rotate(k, cos, sin), v, params, **flags)
    return out.transpose(1, 2).reshape(b, t, n_heads * d) @ weights["o_proj"].T


def patch_hf_llama(model, layer_params, **flags):
    """Swap every LlamaAttention of a transformers LlamaForCausalLM for llama_attention_layer
    (layer_params[i]: layer i's params by the original's names; flags as llama_attention_layer)."""
    config = model.config
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn

        def forward(hidden_states, position_embeddings=None, attention_mask=None, *args, _attn=attn, _i=i, **kwargs):
            weights = {name: getattr(_attn, name).weight for name in ("q_proj", "k_proj", "v_proj", "o_proj")}
            cos, sin = position_embeddings
            out = llama_attention_layer(hidden_states, weights, cos, sin, layer_params[_i],
                                        n_heads=config.num_attention_heads, n_kv_heads=config.num_key_value_heads,
                                        **flags)
            return out, None

        attn.forward = forward
    return model
