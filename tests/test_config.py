"""Configs load from YAML with overrides; bad fields, values and combinations fail at load time."""

from pathlib import Path

import pytest

from lin_llm import ConfigError, load_config

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_load(path):
    assert load_config(path).model.n_layers >= 1


def test_overrides_are_typed_and_nested():
    overrides = ["model.n_layers=3", "model.rope.theta=500000", "train.learning_rate=3e-4"]
    cfg = load_config(CONFIGS[0].parent / "tiny.yaml", overrides)
    assert cfg.model.n_layers == 3 and cfg.model.rope.theta == 500000.0 and cfg.train.learning_rate == 3e-4
    assert isinstance(cfg.model.rope.theta, float)


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.n_layer=3", r"unknown field 'model.n_layer'.*Did you mean 'model.n_layers'"),
        ("modle.dim=3", r"unknown field 'modle'"),
        ("model.n_layers=two", r"model.n_layers: expected int, got 'two'"),
        ("model.tie_embeddings=1", r"model.tie_embeddings: expected bool"),
        ("model.n_heads=3", r"model.n_heads=3 must divide model.dim=128"),
        ("model.n_kv_heads=3", r"model.n_kv_heads=3 must divide model.n_heads=4"),
        ("model.compute_dtype=float16", r"model.compute_dtype='float16' is not valid; choose one of: float32, bfloat16"),
        ("model.attention=linformer", r"model.attention='linformer' is not a known preset; choose one of: softmax"),
        ("model.rope.type=yarn", r"model.rope.type='yarn' is not valid; choose one of: default, linear, llama3"),
        ("train.seq_len=4096", r"train.seq_len=4096 exceeds model.max_seq_len=1024"),
        ("mesh.fsdp=0", r"mesh.fsdp=0 must be >= 1, or -1"),
        ("model.la.conv_kernel_size=4", r"model.la.conv_kernel_size=4 must be a positive odd number"),
        ("model.dim", r"not of the form section.field=value"),
    ],
)
def test_bad_config_names_the_field(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIGS[0].parent / "tiny.yaml", [override])


def test_two_minus_one_mesh_axes_are_refused():
    with pytest.raises(ConfigError, match="at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1"):
        load_config(None, ["mesh.data=-1", "mesh.fsdp=-1"])


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_a_config_can_start_from_a_base_file(tmp_path):
    (tmp_path / "base.yaml").write_text("model: {n_layers: 3, dim: 64}\ntrain: {steps: 7, seq_len: 32}\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\nmodel: {attention: aug}\ntrain: {steps: 9}\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert (cfg.model.n_layers, cfg.model.dim, cfg.model.attention) == (3, 64, "aug")  # sections merge
    assert (cfg.train.steps, cfg.train.seq_len) == (9, 32)  # the child's value wins
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="include each other"):
        load_config(tmp_path / "loop.yaml")
    (tmp_path / "orphan.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match="missing.yaml does not exist"):
        load_config(tmp_path / "orphan.yaml")


def test_bad_yaml_and_non_yaml_override_values(tmp_path):
    (tmp_path / "broken.yaml").write_text("model: {n_layers: 3\n")
    with pytest.raises(ConfigError, match=r"broken.yaml is not valid YAML"):
        load_config(tmp_path / "broken.yaml")
    # a regex that is not a YAML value is taken as its text
    assert load_config(None, ["train.trainable=[lm]_head"]).train.trainable == "[lm]_head"


def test_attention_transfer_alone_needs_no_training_steps():
    cfg = load_config(None, ["train.steps=0", "train.distill_steps=5", "model.attention=aug", "train.init_from=x"])
    assert cfg.train.steps == 0
    with pytest.raises(ConfigError, match="train.steps=0 trains nothing"):
        load_config(None, ["train.steps=0"])


def test_the_llama2_linearize_config_is_the_published_aug_run():
    """tasks_run-llama2.sh: LoRA r=8/alpha=16 on q/k/v/o, embeddings + norms + conv + alpha trainable,
    no LOCAL_FACTOR (lambda constant), lm_head frozen; lr 2e-5 constant after 20 warm-up steps,
    1000 steps of 64 x 4096 tokens, bf16."""
    from lin_llm.training.state import plan_params

    small = ["model.n_layers=1", "model.dim=64", "model.n_heads=4", "model.n_kv_heads=4", "model.ffn_dim=64",
             "model.vocab_size=100", "train.seq_len=64"]
    full = load_config(CONFIGS[0].parent / "llama2-7b-linearize.yaml")
    t = full.train
    assert (t.lora_rank, t.lora_alpha, t.learning_rate, t.lr_schedule, t.warmup_steps) == (8, 16.0, 2e-5, "constant", 20)
    assert (t.steps, t.batch_size, t.seq_len, full.model.compute_dtype) == (1000, 64, 4096, "bfloat16")
    assert full.model.attention == "aug" and not full.model.la.learn_lambda and not full.model.tie_embeddings
    plan = plan_params(load_config(CONFIGS[0].parent / "llama2-7b-linearize.yaml", small))
    assert plan.trainable == ["embed.embedding", "layers.0.attn.conv", "layers.0.attn.mix_global",
                              "layers.0.attn_norm.scale", "layers.0.mlp_norm.scale", "norm.scale"]
    assert plan.lora == [f"layers.0.attn.{w}.kernel" for w in ("wk", "wo", "wq", "wv")]
    assert "lm_head.kernel" in plan.frozen


def test_softmax_layers_load_from_yaml_and_overrides_as_a_hashable_tuple(tmp_path):
    path = tmp_path / "hybrid.yaml"
    path.write_text("model:\n  n_layers: 6\n  attention: aug\n  softmax_layers: [0, 3, 5]\n")
    cfg = load_config(path)
    assert cfg.model.softmax_layers == (0, 3, 5) and cfg.model.linear_layers == (1, 2, 4)
    assert [cfg.model.layer_attention(i) for i in range(6)] == ["softmax", "aug", "aug", "softmax", "aug", "softmax"]
    hash(cfg.model)  # a jit static argument in places
    overridden = load_config(path, ["model.softmax_layers=[5,0]"]).model
    assert overridden.softmax_layers == (5, 0) and overridden.linear_layers == (1, 2, 3, 4)
    assert load_config(path, ["model.softmax_layers=[]"]).model.linear_layers == tuple(range(6))
    assert load_config(None).model.softmax_layers == ()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.softmax_layers=[0,4]"], r"model.softmax_layers=\[0, 4\]: layer 4 is out of range; the layers are "
                                         r"numbered 0..3 \(model.n_layers\)"),
        (["model.softmax_layers=[-1]"], r"layer -1 is out of range"),
        (["model.softmax_layers=[1,2,1]"], r"model.softmax_layers=\[1, 2, 1\]: layer 1 is listed twice"),
        (["model.softmax_layers=[0,1,2,3]"],
         r"lists every layer: that is a softmax model; set model.attention=softmax"),
        (["model.attention=softmax", "model.softmax_layers=[0]"],
         r"has no effect with model.attention='softmax': set model.attention to the linear preset"),
        (["model.softmax_layers=0"], r"model.softmax_layers: expected a list of int \(e.g. \[0, 15\]\), got 0"),
        (["model.softmax_layers=[0.5]"], r"model.softmax_layers\[0\]: expected int, got 0.5"),
        (["model.softmax_layers=[true]"], r"model.softmax_layers\[0\]: expected int, got True"),
    ],
)
def test_bad_softmax_layers_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIGS[0].parent / "tiny.yaml", ["model.attention=aug", *overrides])
