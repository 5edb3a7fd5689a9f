"""Chunked linear-attention scan: Pallas kernels vs the XLA chunked form vs softmax attention.

On CPU (the kernels only run interpreted there): the interpreted kernels' max errors against the
XLA form, forward and gradients, for both kernel families (TPU and Triton), then the XLA
chunked form's forward and forward+backward times. On a TPU or GPU: Pallas vs XLA chunked vs
softmax attention (TPU: the Pallas flash-attention op; GPU: jax.nn.dot_product_attention with
cuDNN's flash kernel, and with XLA), forward and forward+backward, at one LLaMA-2-7B
layer (B=1, 32 heads, head dim 128, bf16) for T = 2k..32k. A case that fails (e.g. out of
memory) is reported with its error instead of a time. Prints one JSON object.

    python bench/pallas_scan.py [--lengths 2048 4096 ...] [--repeats 5] [--out results.json]
"""

from __future__ import annotations

import argparse
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels
from lin_llm.benchmarking import timed
from pallas_kernels import reference

F32 = jnp.float32


def _inputs(b, t, h, d, dtype, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    q, k = (jax.random.normal(kk, (b, t, h, d)) * d**-0.25 for kk in ks[:2])
    return q.astype(dtype), k.astype(dtype), jax.random.normal(ks[2], (b, t, h, d)).astype(dtype)


def _fwd_bwd(fn):
    return jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v).astype(F32)), argnums=(0, 1, 2)))


def _scan(impl, chunk, kind):
    return lambda q, k, v: impl(q, k, v, chunk_size=chunk, local_kernel=kind)


def _softmax(platform):
    """Causal softmax attention on [B, T, H, D] on "tpu" or "gpu": the platform's flash kernel, and
    XLA's on GPU too (cuDNN may be missing; XLA's runs out of memory at long T, reported as such)."""
    if platform == "tpu":
        from jax.experimental.pallas.ops.tpu.flash_attention import flash_attention

        def flash(q, k, v):
            t = lambda x: x.transpose(0, 2, 1, 3)
            return t(flash_attention(t(q), t(k), t(v), causal=True, sm_scale=q.shape[-1] ** -0.5))
        return {"softmax_flash_pallas_tpu": flash}
    return {
        "softmax_cudnn": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn"),
        "softmax_xla": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True),
    }


def correctness(t=500, chunk=64, b=1, h=2, d=64):
    """Interpreted kernels vs the XLA form (fp32): max |difference| and that relative to max |XLA|."""
    rows = []
    q, k, v = _inputs(b, t, h, d, F32)
    xla = pallas_kernels.select_impl("xla")
    for backend in pallas_kernels.BACKENDS:
        interp = functools.partial(pallas_kernels.chunked_linear_attention, interpret=True, backend=backend)
        for kind in ("dot", "relu2"):
            want, got = _scan(xla, chunk, kind), _scan(interp, chunk, kind)
            row = {"backend": backend, "local_kernel": kind, "T": t, "chunk": chunk}
            pairs = [("out", jax.jit(got)(q, k, v), jax.jit(want)(q, k, v))]
            pairs += list(zip(("dq", "dk", "dv"), _fwd_bwd(got)(q, k, v), _fwd_bwd(want)(q, k, v)))
            for name, a, ref in pairs:
                err = float(jnp.max(jnp.abs(a - ref)))
                row[f"{name}_max_abs_err"] = err
                row[f"{name}_max_rel_err"] = err / float(jnp.max(jnp.abs(ref)))
            rows.append(row)
    return rows


def timings(platform, lengths, repeats, b, h, d, dtype, chunk, kind):
    impls = {"xla_chunked": _scan(pallas_kernels.select_impl("xla"), chunk, kind)}
    if platform != "cpu":
        impls["pallas"] = _scan(pallas_kernels.select_impl("pallas", platform), chunk, kind)
        impls.update(_softmax(platform))
    rows = []
    for t in lengths:
        args = _inputs(b, t, h, d, dtype)
        for name, fn in impls.items():
            for mode, compiled in (("fwd", jax.jit(fn)), ("fwd+bwd", _fwd_bwd(fn))):
                row = {"impl": name, "mode": mode, "T": t}
                try:
                    row["seconds"] = timed(lambda: compiled(*args), repeats)[0]
                    row["tokens_per_second"] = b * t / row["seconds"]
                except Exception as e:  # an OOM at long T is a result, not a crash
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                rows.append(row)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", help="sequence lengths (default: CPU 512 1024; "
                        "TPU/GPU 2048..32768)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--local-kernel", default="relu2", choices=reference.LOCAL_KERNELS)
    parser.add_argument("--check-length", type=int, default=500, help="T of the CPU interpret-vs-XLA check")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()

    platform = {"cuda": "gpu", "rocm": "gpu"}.get(jax.default_backend(), jax.default_backend())
    if platform == "cpu":  # small: the point on CPU is correctness, and XLA's own cost as a baseline
        shape = dict(b=1, h=8, d=64, dtype=F32)
        lengths = args.lengths or [512, 1024]
    else:  # one LLaMA-2-7B attention layer
        shape = dict(b=1, h=32, d=128, dtype=jnp.bfloat16)
        lengths = args.lengths or [2048, 4096, 8192, 16384, 32768]
    result = {
        "platform": platform,
        "device": str(jax.devices()[0].device_kind),
        "jax": jax.__version__,
        "shape": {**{k: v for k, v in shape.items() if k != "dtype"}, "dtype": np.dtype(shape["dtype"]).name,
                  "chunk": args.chunk, "local_kernel": args.local_kernel},
    }
    if platform == "cpu":
        result["interpret_vs_xla"] = correctness(t=args.check_length, chunk=args.chunk)
    result["timings"] = timings(platform, lengths, args.repeats, chunk=args.chunk, kind=args.local_kernel, **shape)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
