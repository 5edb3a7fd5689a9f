"""The authors' released linearized LLaMA-2 layout (HF org LinearizedLLM) and its Medusa heads.

A tiny checkpoint is built here with torch in exactly the released layout: fp16 PyTorch shards
pytorch_model-0000{1,2}-of-00002.bin with pytorch_model.bin.index.json, a 4.3x-style config.json
whose vocabulary has one added [PAD] (added_tokens.json), per layer dwconv.weight [H, 1, 63, 1]
(non-zero future taps, as the original's in-place masking leaves them), global_factor [1] and the
conv_mask buffer; medusa_lm_head.pt is the state dict of torch modules built as the original's
MedusaModel builds its heads. The reference is tests/original_reference.py (the original's
formulas in torch, importing nothing of lin_llm) patched into a transformers LLaMA, as the
original's replace_llama_attn patches it, with the heads as the original's ResBlock + Linear.
"""

import copy
import json
import re
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn

import original_reference as original
from lin_llm import load_checkpoint
from lin_llm.cli import convert
from lin_llm.decoding import generate, medusa_generate
from lin_llm.errors import CheckpointError
from lin_llm.io import hf
from lin_llm.io.checkpoint import save_model
from lin_llm.io.released import read_model_dir
from lin_llm.model import flat_params
from models import tiny_model

V, DIM, HEADS, KV_HEADS, LAYERS, KERNEL = 48, 32, 4, 2, 2, 63  # vocabulary V + 1: the added [PAD]
GROUP = 64  # the original's GROUP_SIZE
N_MEDUSA = 4
CONFIG = {  # what save_pretrained of transformers 4.3x writes for LLaMA-2, at tiny sizes
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "bos_token_id": 1, "eos_token_id": 2,
    "pad_token_id": V, "hidden_act": "silu", "hidden_size": DIM, "intermediate_size": 64, "initializer_range": 0.2,
    "max_position_embeddings": 160, "num_attention_heads": HEADS, "num_hidden_layers": LAYERS,
    "num_key_value_heads": KV_HEADS, "pretraining_tp": 1, "rms_norm_eps": 1e-3, "rope_scaling": None,
    "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "float16", "transformers_version": "4.34.0",
    "use_cache": True, "vocab_size": V + 1,
}
IDS = np.random.RandomState(0).randint(0, V + 1, size=(2, GROUP + 16))  # a whole group and a remainder


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


class ResBlock(nn.Module):
    """medusa_model.py's ResBlock: x + SiLU(linear(x))."""

    def __init__(self, hidden_size):
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        self.act = nn.SiLU()

    def forward(self, x):
        return x + self.act(self.linear(x))


def _llama_state(seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG))
    state = {name: value.detach().clone() for name, value in model.state_dict().items()}
    for name, value in state.items():  # RMSNorm weights start at one: move them, so a swapped norm shows
        if "norm" in name:
            value.add_(0.3 * torch.randn_like(value))
    for name in ("model.embed_tokens.weight", "lm_head.weight"):  # fine-tune.py's resize: [PAD] = the mean row
        state[name][V] = state[name][:V].mean(dim=0)
    return state


def _released_state(seed, conv=True, alpha=True):
    """A released checkpoint's state dict in fp16: LLaMA + per layer dwconv (future taps non-zero),
    conv_mask (fine-tune.py's buffer) and global_factor."""
    state = _llama_state(seed)
    g = torch.Generator().manual_seed(seed + 1)
    for i in range(LAYERS):
        prefix = f"model.layers.{i}.self_attn."
        if conv:
            state[prefix + "dwconv.weight"] = 0.3 * torch.randn(HEADS, 1, KERNEL, 1, generator=g)
            mask = torch.ones((1, 1, KERNEL, 1))
            mask[:, :, KERNEL // 2 + 1 :, :] = 0.0
            state[prefix + "conv_mask"] = mask
        if alpha:
            state[prefix + "global_factor"] = 0.5 + 0.3 * torch.randn(1, generator=g)
    return {name: value.half() for name, value in state.items()}


def write_released(out, state, config=CONFIG, legacy=False):
    """`state` as the released model directory: two .bin shards, their index, config, added token
    (legacy: in torch.save's pre-1.6 format, which cannot be memory-mapped)."""
    out.mkdir(parents=True)
    names = list(state)
    first = [n for n in names if n.startswith(("model.embed_tokens", "model.layers.0."))]
    shards = {"pytorch_model-00001-of-00002.bin": first,
              "pytorch_model-00002-of-00002.bin": [n for n in names if n not in first]}
    weight_map = {}
    for file, shard in shards.items():
        torch.save({n: state[n] for n in shard}, out / file, _use_new_zipfile_serialization=not legacy)
        weight_map.update({n: file for n in shard})
    total = sum(v.numel() * v.element_size() for v in state.values())
    (out / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(config))
    (out / "added_tokens.json").write_text(json.dumps({"[PAD]": V}))
    return out


def _medusa_modules(state, seed):
    """The original MedusaModel's heads: Sequential(ResBlock, Linear(D, V, bias=False)), the
    projection started from the lm_head (as its __init__ does) and every weight moved."""
    torch.manual_seed(seed)
    heads = nn.ModuleList([nn.Sequential(ResBlock(DIM), nn.Linear(DIM, V + 1, bias=False)) for _ in range(N_MEDUSA)])
    with torch.no_grad():
        for head in heads:
            head[0].linear.weight.mul_(2.0)
            head[0].linear.bias.normal_(0.0, 0.3)
            head[1].weight.copy_(state["lm_head.weight"].float() + 0.05 * torch.randn(V + 1, DIM))
    return heads.half()


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """The released layout with its heads, and its conversion by the CLI."""
    root = tmp_path_factory.mktemp("released")
    state = _released_state(seed=0)
    model_dir = write_released(root / "llama-2-7b-aug-linear", state)
    heads = _medusa_modules(state, seed=1)
    (root / "heads").mkdir()
    torch.save(heads.state_dict(), root / "heads" / "medusa_lm_head.pt")
    out = root / "converted"
    assert convert.main(["--hf-dir", str(model_dir), "--medusa-heads", str(root / "heads" / "medusa_lm_head.pt"),
                         "--out", str(out)]) == 0
    return {"root": root, "dir": model_dir, "state": state, "heads": heads, "out": out, "model": load_checkpoint(out)}


def _reference(state, **flags):
    """A transformers LLaMA holding the LLaMA tensors in fp32, its attention the original's formulas."""
    from transformers import LlamaConfig, LlamaForCausalLM

    reference = LlamaForCausalLM(LlamaConfig(**CONFIG)).float().eval()
    llama = {name: value.float() for name, value in state.items() if name in reference.state_dict()}
    reference.load_state_dict(llama, strict=True)
    layer_params = [{name: state[f"model.layers.{i}.self_attn.{name}"].float() for name in ("dwconv.weight", "global_factor")
                     if f"model.layers.{i}.self_attn.{name}" in state} for i in range(LAYERS)]
    if flags:
        original.patch_hf_llama(reference, layer_params, group_size=GROUP, **flags)
    return reference


def test_released_model_and_heads_equal_the_original(released):
    model, state = released["model"], released["state"]
    cfg = model.cfg
    assert (cfg.attention, cfg.vocab_size, cfg.medusa_heads, cfg.medusa_own_lm_head) == ("aug", V + 1, N_MEDUSA, True)
    assert (cfg.la.group_size, cfg.la.conv_kernel_size, cfg.la.learn_lambda, cfg.param_dtype) == (64, 63, False, "float32")
    stored = state["model.layers.1.self_attn.dwconv.weight"].float().numpy()[:, 0, :, 0]
    assert np.all(stored[:, KERNEL // 2 + 1 :] != 0)  # the file's future taps act nowhere ...
    ours = np.asarray(model.layers[1].attn.conv[...])
    assert np.all(ours[:, KERNEL // 2 + 1 :] == 0)  # ... and are zeroed on load
    np.testing.assert_array_equal(ours[:, : KERNEL // 2 + 1], stored[:, : KERNEL // 2 + 1])
    assert float(model.layers[0].attn.mix_global[...]) == float(state["model.layers.0.self_attn.global_factor"][0])

    reference = _reference(state, use_global=True, add_conv=True)
    hidden = model.hidden(jnp.asarray(IDS))
    with torch.no_grad():
        theirs = reference.model(torch.as_tensor(IDS))[0]
        logits = reference.lm_head(theirs)
        heads = copy.deepcopy(released["heads"]).float()  # Module.float() works in place
        medusa = torch.stack([head(theirs) for head in heads], dim=2)
    err = rel_err(model.logits(hidden), logits.numpy())
    head_errs = [rel_err(model.medusa_logits(hidden)[:, :, i], medusa[:, :, i].numpy()) for i in range(N_MEDUSA)]
    print(f"released aug vs the original's formulas: logits {err:.2e}, Medusa heads {[f'{e:.2e}' for e in head_errs]}")
    assert err <= 1e-4 and max(head_errs) <= 1e-4


@pytest.mark.parametrize("kind", ["local_global", "softmax"])
def test_other_released_layers_equal_the_original(kind, tmp_path):
    """global_factor alone is the original's USE_GLOBAL + GLOBAL_FACTOR run (local_global); no extra
    tensor at all, a plain LLaMA in PyTorch shards (softmax; here in torch's legacy format)."""
    state = _released_state(seed=2, conv=False, alpha=kind == "local_global")
    model_dir = write_released(tmp_path / kind, state, legacy=kind == "softmax")
    assert convert.main(["--hf-dir", str(model_dir), "--out", str(tmp_path / "out")]) == 0
    model = load_checkpoint(tmp_path / "out")
    assert model.cfg.attention == kind
    flags = dict(use_global=True, add_conv=False) if kind == "local_global" else {}
    with torch.no_grad():
        theirs = _reference(state, **flags)(torch.as_tensor(IDS)).logits.numpy()
    assert rel_err(model(jnp.asarray(IDS)), theirs) <= 1e-4


def test_converted_released_model_keeps_its_tokenizer_files_and_loads_directly(released):
    assert json.loads((released["out"] / "added_tokens.json").read_text()) == {"[PAD]": V}
    direct = load_checkpoint(released["dir"])  # load_checkpoint reads the released directory itself
    assert direct.cfg.attention == "aug" and direct.cfg.medusa_heads == 0
    ours = flat_params(released["model"])
    for name, value in flat_params(direct).items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(ours[name]))


def test_medusa_generate_on_the_released_model_equals_greedy(released):
    model = released["model"]
    prompts = [list(IDS[0, :60]), list(IDS[1, :9])]  # one prompt crosses the first group boundary while decoding
    plain = np.asarray(generate(model, prompts, 16))
    out, stats = medusa_generate(model, prompts, 16, topk=(2, 2, 1, 1))
    np.testing.assert_array_equal(np.asarray(out), plain)
    assert stats["mean_accepted_length"] > 0  # some guesses were accepted and committed
    print("medusa on the released model:", stats)


def _convert_fails(tmp_path, model_dir, *extra):
    out = tmp_path / "out"
    code = convert.main(["--hf-dir", str(model_dir), *extra, "--out", str(out)])
    assert not out.exists()
    return code


def _altered(tmp_path, change):
    state = dict(_released_state(seed=3))
    change(state)
    return write_released(tmp_path / "altered", state)


def _set(name, value):
    return lambda state: state.__setitem__(name, value)


REFUSALS = {
    "unknown extra tensor": (_set("model.layers.1.self_attn.rel_pos_bias", torch.zeros(4).half()),
                             "unexpected tensor model.layers.1.self_attn.rel_pos_bias"),
    "conv of the wrong shape": (_set("model.layers.0.self_attn.dwconv.weight", torch.zeros(HEADS, 1, 31, 1).half()),
                                r"dwconv.weight has shape \[4, 1, 31, 1\]; the released layout's is \[4, 1, 63, 1\]"),
    "conv mask not the original's": (_set("model.layers.1.self_attn.conv_mask", torch.ones(1, 1, KERNEL, 1).half()),
                                     "is not the original's causal conv mask"),
    "layers holding different tensors": (lambda state: state.pop("model.layers.1.self_attn.global_factor"),
                                         "layer 0: conv_mask, dwconv.weight, global_factor; layer 1: conv_mask, dwconv"),
    "conv without alpha": (lambda state: [state.pop(f"model.layers.{i}.self_attn.global_factor") for i in range(LAYERS)],
                           "no global_factor"),
    "missing LLaMA tensor": (lambda state: state.pop("model.layers.1.mlp.up_proj.weight"),
                             "tensor model.layers.1.mlp.up_proj.weight is missing"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_of_the_released_layout(case, tmp_path, capsys):
    change, message = REFUSALS[case]
    model_dir = _altered(tmp_path, change)
    assert _convert_fails(tmp_path, model_dir) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert re.search(message, err), err


def test_refusals_of_files(released, tmp_path, capsys):
    damaged = tmp_path / "damaged"
    shutil.copytree(released["dir"], damaged)
    (damaged / "pytorch_model-00002-of-00002.bin").unlink()
    assert _convert_fails(tmp_path, damaged) == 2
    assert "lists shard pytorch_model-00002-of-00002.bin, which is missing" in capsys.readouterr().err
    shutil.copy(released["dir"] / "pytorch_model-00002-of-00002.bin", damaged)
    with open(damaged / "pytorch_model-00002-of-00002.bin", "r+b") as f:
        f.truncate(1000)  # an interrupted download
    assert _convert_fails(tmp_path, damaged) == 2
    assert "cannot be read as PyTorch weights" in capsys.readouterr().err
    heads = {k: v for k, v in released["heads"].state_dict().items() if not k.startswith("3.")}
    heads["2.1.weight"] = heads["2.1.weight"][:V]  # a projection over the tokenizer's 32000, not the model's 32001
    torch.save(heads, tmp_path / "medusa_lm_head.pt")
    assert _convert_fails(tmp_path, released["dir"], "--medusa-heads", str(tmp_path / "medusa_lm_head.pt")) == 2
    assert r"tensor 2.1.weight is F16 [48, 32]; the model (dim 32, vocabulary 49) needs [49, 32]" in capsys.readouterr().err


def test_export_round_trips_the_released_layout(released, tmp_path, capsys):
    """released -> lin_llm -> --to-hf (the released layout) -> lin_llm: identical params."""
    back = tmp_path / "back"
    assert convert.main(["--to-hf", "--checkpoint", str(released["out"]), "--out", str(back)]) == 0
    assert "the authors' released layout" in capsys.readouterr().out
    config = json.loads((back / "config.json").read_text())
    assert (config["vocab_size"], config["medusa_num_heads"]) == (V + 1, N_MEDUSA)
    exported = hf.weight_files(back)
    assert {f"model.layers.1.self_attn.{n}" for n in ("dwconv.weight", "conv_mask", "global_factor")} <= set(exported)
    heads = torch.load(back / "medusa_lm_head.pt", weights_only=True)
    assert set(heads) == set(released["heads"].state_dict())
    assert json.loads((back / "added_tokens.json").read_text()) == {"[PAD]": V}
    cfg, flat = read_model_dir(back, back / "medusa_lm_head.pt")
    assert cfg == released["model"].cfg
    ours = flat_params(released["model"])
    assert set(flat) == set(ours)
    for name, value in flat.items():
        np.testing.assert_array_equal(value, np.asarray(ours[name]), err_msg=name)


EXPORT_REFUSALS = {
    "a preset the layout does not hold": (("model.attention=hedgehog",), "holds the presets aug, local_global only"),
    "a hybrid": (("model.attention=aug", "model.la.conv_kernel_size=63", "model.softmax_layers=[0]"),
                 "a hybrid: the released layout, like the original code, linearises every layer"),
    "another group size": (("model.attention=aug", "model.la.conv_kernel_size=63", "model.la.group_size=8"),
                           "model.la.group_size=8, where the original fixes 64"),
    "shared-projection Medusa heads": (("model.medusa_heads=2",), "shared-projection Medusa heads"),
}


@pytest.mark.parametrize("case", list(EXPORT_REFUSALS))
def test_export_refusals_and_softmax_only(case, tmp_path, capsys):
    overrides, message = EXPORT_REFUSALS[case]
    model = tiny_model("model.la.learn_lambda=false", *overrides)
    save_model(model, tmp_path / "ours")
    out = tmp_path / "hf"
    assert convert.main(["--to-hf", "--checkpoint", str(tmp_path / "ours"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and "--softmax-only" in err and "Traceback" not in err, err
    assert not out.exists()
    with pytest.raises(CheckpointError, match="would be lost"):
        hf.check_exportable(model.cfg)
    # --softmax-only exports the LLaMA weights alone, and says what it left out
    assert convert.main(["--to-hf", "--softmax-only", "--checkpoint", str(tmp_path / "ours"), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "--softmax-only: exported the LLaMA weights alone; left out: " in err
    assert ("Medusa heads" if "Medusa" in case else "linear attention") in err
    cfg, flat = read_model_dir(out)
    assert (cfg.attention, cfg.medusa_heads) == ("softmax", 0)
    ours = flat_params(model)
    for name, value in flat.items():
        np.testing.assert_array_equal(value, np.asarray(ours[name]), err_msg=name)
