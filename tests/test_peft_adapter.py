"""Adapters in Hugging Face PEFT's format (lora_np.peft, save_adapter(format="peft"), load_adapter
of a folder): round trips in both formats, the written folder's keys, shapes, dtypes and config
fields against PEFT's layout, a folder written by hand the way PEFT writes one, and every refusal
(the model left as it was)."""

from __future__ import annotations

import json
import os
import pickle
import struct

import numpy as np
import pytest
from conftest import Snapshot, randomize
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from lora_np import TransformerBlock, add_lora, load_adapter, lora_layers, merge_lora, save_adapter
from lora_np import peft as P
from lora_np.text.model import LanguageModel

PREFIX = "base_model.model."


# ---------------------------------------------------------------------------------------------
# models: a base, LoRA on it (one or more add_lora calls), a fresh copy of the same base
# ---------------------------------------------------------------------------------------------


def _lm(dtype=np.float64):
    return LanguageModel(11, d_model=8, n_heads=2, n_layers=2, d_hidden=12, context=5, rng=0, dtype=dtype)


def _block(dtype=np.float64):
    return TransformerBlock(8, 2, 12, rng=0, dtype=dtype)


CASES = {   # name -> (base, [add_lora kwargs, ...], input)
    "lora-block": (_block, [dict(targets=["q_proj", "v_proj", "fc2"], r=2, alpha=4.0)], "x"),
    "dora": (_block, [dict(targets=["q_proj", "v_proj"], r=2, alpha=3.0, use_dora=True)], "x"),
    "rslora": (_block, [dict(targets=["q_proj", "v_proj", "fc1"], r=4, alpha=2.0, rslora=True)], "x"),
    "lm-embedding-qv": (_lm, [dict(targets=["tok_emb", "q_proj", "v_proj"], r=2, alpha=4.0)], "idx"),
    "lm-two-ranks": (_lm, [dict(targets=["q_proj", "v_proj"], r=2, alpha=4.0),
                           dict(targets=["blocks.1.mlp.fc1"], r=3, alpha=5.0)], "idx"),
    "gaussian-float32": (lambda: _block(np.float32),
                         [dict(targets=["k_proj", "o_proj"], r=2, alpha=8.0, init="gaussian")], "x"),
    "pissa": (_block, [dict(targets=["q_proj", "fc2"], r=2, alpha=4.0, init="pissa")], "x"),
}


def _build(case, seed):
    base, calls, _ = CASES[case]
    model = base()
    for i, kw in enumerate(calls):
        kw = dict(kw)
        add_lora(model, kw.pop("targets"), rng=seed + i, **kw)
    return model


def _trained(case, seed=1):
    model = _build(case, seed)
    randomize(model, np.random.default_rng(seed + 10), b_scale=0.5)
    for m in lora_layers(model).values():            # move m off its init too (DoRA)
        if hasattr(m, "m"):
            m.m[...] *= 1.0 + 0.2 * np.random.default_rng(seed).standard_normal(m.m.shape)
    return model


def _fresh_like(trained, case, seed=99):
    """The same base (every non-adapter parameter copied), other adapter values."""
    fresh = _build(case, seed)
    names = {f"{p}.{n}" for p, m in lora_layers(fresh).items() for n in m.adapter_names}
    for n, p in fresh.parameters().items():
        if n not in names:
            p[...] = trained.parameters()[n]
    return fresh


def _input(case, dtype=np.float64):
    rng = np.random.default_rng(0)
    if CASES[case][2] == "idx":
        return rng.integers(0, 11, size=(2, 5))
    return rng.standard_normal((2, 3, 8)).astype(dtype)


# ---------------------------------------------------------------------------------------------
# round trips
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["npz", "peft"])
@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_reproduces_outputs_exactly(tmp_path, case, fmt):
    trained = _trained(case)
    path = tmp_path / ("adapter.npz" if fmt == "npz" else "adapter")
    save_adapter(trained, path, format=fmt)
    fresh = _fresh_like(trained, case)
    x = _input(case)
    assert not np.array_equal(fresh(x), trained(x))
    assert load_adapter(fresh, path) is fresh
    np.testing.assert_array_equal(fresh(x), trained(x))
    for p, m in lora_layers(trained).items():
        for n in m.adapter_names:
            got = getattr(lora_layers(fresh)[p], n)
            np.testing.assert_array_equal(got, getattr(m, n))
            assert got.dtype == getattr(m, n).dtype


def test_npz_stays_the_default_format(tmp_path):
    trained = _trained("lora-block")
    save_adapter(trained, tmp_path / "a.npz")
    with np.load(tmp_path / "a.npz", allow_pickle=False) as f:
        assert "__config__" in f.files


@pytest.mark.parametrize("which", ["folder", "adapter_config.json", "adapter_model.safetensors"])
def test_load_accepts_the_folder_or_either_file_in_it(tmp_path, which):
    trained = _trained("lora-block")
    save_adapter(trained, tmp_path / "ad", format="peft")
    fresh = _fresh_like(trained, "lora-block")
    load_adapter(fresh, tmp_path / "ad" if which == "folder" else tmp_path / "ad" / which)
    x = _input("lora-block")
    np.testing.assert_array_equal(fresh(x), trained(x))


# ---------------------------------------------------------------------------------------------
# the written folder against PEFT's layout
# ---------------------------------------------------------------------------------------------


def _read(folder):
    config = json.loads((folder / "adapter_config.json").read_text())
    with safe_open(str(folder / "adapter_model.safetensors"), framework="numpy") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
        metadata = f.metadata()
    return config, load_file(str(folder / "adapter_model.safetensors")), dtypes, metadata


def test_folder_layout_lora_on_embedding_and_attention_float32(tmp_path):
    model = _lm(np.float32)
    add_lora(model, ["tok_emb", "q_proj", "v_proj"], r=2, alpha=4.0, rng=0)
    save_adapter(model, tmp_path / "ad", format="peft", base_model_name_or_path="austen-char-lm",
                 task_type="CAUSAL_LM")
    assert sorted(os.listdir(tmp_path / "ad")) == ["adapter_config.json", "adapter_model.safetensors"]
    config, tensors, dtypes, metadata = _read(tmp_path / "ad")
    want = {f"{PREFIX}tok_emb.lora_embedding_A": (2, 11), f"{PREFIX}tok_emb.lora_embedding_B": (8, 2)}
    for i in range(2):
        for proj in ("q_proj", "v_proj"):
            want[f"{PREFIX}blocks.{i}.attn.{proj}.lora_A.weight"] = (2, 8)      # A (r, d_in)
            want[f"{PREFIX}blocks.{i}.attn.{proj}.lora_B.weight"] = (8, 2)      # B (d_out, r)
    assert {k: v.shape for k, v in tensors.items()} == want
    assert set(dtypes.values()) == {"F32"} and all(v.dtype == np.float32 for v in tensors.values())
    layers = lora_layers(model)
    np.testing.assert_array_equal(tensors[f"{PREFIX}tok_emb.lora_embedding_A"], layers["tok_emb"].A)
    np.testing.assert_array_equal(tensors[f"{PREFIX}blocks.1.attn.v_proj.lora_B.weight"],
                                  layers["blocks.1.attn.v_proj"].B)
    assert metadata == {"format": "pt"}
    assert config == {
        "alpha_pattern": {}, "auto_mapping": None, "base_model_name_or_path": "austen-char-lm",
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "layer_replication": None, "layers_pattern": None, "layers_to_transform": None,
        "loftq_config": {}, "lora_alpha": 4, "lora_dropout": 0.0, "megatron_config": None,
        "megatron_core": "megatron.core", "modules_to_save": None, "peft_type": "LORA", "r": 2,
        "rank_pattern": {}, "revision": None, "target_modules": ["q_proj", "tok_emb", "v_proj"],
        "task_type": "CAUSAL_LM", "use_dora": False, "use_rslora": False}
    text = (tmp_path / "ad" / "adapter_config.json").read_text()
    assert text == json.dumps(config, indent=2, sort_keys=True) + "\n"          # as PEFT writes it


def test_folder_layout_dora_magnitude_is_the_row_norm(tmp_path):
    """PEFT's magnitude is ``torch.linalg.norm(W + s B A, dim=1)`` of the (d_out, d_in) weight:
    one norm per output row, the axis lora_np uses — stored as is, shape (d_out,)."""
    model = add_lora(TransformerBlock(8, 2, 12, rng=0), ["fc1", "fc2"], r=2, alpha=4.0,
                     use_dora=True, dropout=0.1, rng=0)
    layers = lora_layers(model)
    for m in layers.values():                        # at init m is W's row norms (B = 0)
        np.testing.assert_allclose(m.m, np.linalg.norm(m.W, axis=1), rtol=1e-14)
    save_adapter(model, tmp_path / "ad", format="peft")
    config, tensors, dtypes, _ = _read(tmp_path / "ad")
    assert tensors[f"{PREFIX}mlp.fc1.lora_magnitude_vector"].shape == (12,)     # d_out of fc1
    assert tensors[f"{PREFIX}mlp.fc2.lora_magnitude_vector"].shape == (8,)
    np.testing.assert_array_equal(tensors[f"{PREFIX}mlp.fc1.lora_magnitude_vector"], layers["mlp.fc1"].m)
    assert len(tensors) == 6 and set(dtypes.values()) == {"F64"}
    assert config["use_dora"] is True and config["lora_dropout"] == 0.1
    assert config["target_modules"] == ["fc1", "fc2"]


def test_folder_layout_rslora_and_patterns(tmp_path):
    model = add_lora(_lm(), ["q_proj", "v_proj"], r=2, alpha=4.0, rslora=True, rng=0)
    add_lora(model, ["blocks.1.mlp.fc1"], r=3, alpha=6.0, rslora=True, rng=1)
    save_adapter(model, tmp_path / "ad", format="peft")
    config, tensors, _, _ = _read(tmp_path / "ad")
    assert config["use_rslora"] is True
    assert (config["r"], config["lora_alpha"]) == (2, 4)                     # the most common values
    assert config["rank_pattern"] == {"blocks.1.mlp.fc1": 3}
    assert config["alpha_pattern"] == {"blocks.1.mlp.fc1": 6}
    assert tensors[f"{PREFIX}blocks.1.mlp.fc1.lora_A.weight"].shape == (3, 8)
    # fc1 of block 0 is not adapted, so the last name "fc1" would name too much: its full path
    assert config["target_modules"] == ["blocks.1.mlp.fc1", "q_proj", "v_proj"]
    for p in lora_layers(model):
        assert P._targets_match(config["target_modules"], p)
    assert not P._targets_match(config["target_modules"], "blocks.0.mlp.fc1")


def test_target_modules_fall_back_to_a_regex_when_a_path_ends_another(tmp_path):
    """A model whose module "mlp.fc1" is also the end of "inner.mlp.fc1": neither the last name
    nor the path names only the adapted layer under PEFT's list rule; an anchored regex does."""
    from lora_np import MLP, Module

    class Nested(Module):
        def __init__(self):
            super().__init__()
            self.mlp = MLP(4, 6, 4, rng=0)
            self.inner = Module()
            self.inner.mlp = MLP(4, 6, 4, rng=1)

    model = add_lora(Nested(), ["mlp.fc1"], r=2, alpha=2.0, rng=0)
    assert sorted(lora_layers(model)) == ["inner.mlp.fc1", "mlp.fc1"]    # add_lora's rule: both
    model2 = Nested()
    add_lora(model2, ["inner.mlp.fc1"], r=2, alpha=2.0, rng=0)
    save_adapter(model2, tmp_path / "ad", format="peft")
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["inner.mlp.fc1"]
    paths = [p for p, _ in model.named_modules() if p]
    assert P._target_modules({"mlp.fc1": None}, paths) == "^(mlp\\.fc1)$"
    assert [p for p in paths if P._targets_match("^(mlp\\.fc1)$", p)] == ["mlp.fc1"]


def test_pattern_key_is_peft_get_pattern_key():
    """PEFT: ``re.match(rf"(.*\\.)?({key})$", module_path)``, the first matching key wins."""
    assert P.pattern_key({"q_proj": 4}, "blocks.0.attn.q_proj") == "q_proj"
    assert P.pattern_key({"attn.q_proj": 4}, "blocks.0.attn.q_proj") == "attn.q_proj"
    assert P.pattern_key({"proj": 4}, "blocks.0.attn.q_proj") is None         # not at a dot
    assert P.pattern_key({"blocks.1.attn.q_proj": 4}, "blocks.0.attn.q_proj") is None
    assert P.pattern_key({"blocks\\.[01]\\.attn\\.q_proj": 4, "q_proj": 2}, "blocks.1.attn.q_proj") \
        == "blocks\\.[01]\\.attn\\.q_proj"


def test_save_leaves_other_files_and_overwrites_its_own(tmp_path):
    folder = tmp_path / "ad"
    folder.mkdir()
    (folder / "README.md").write_text("model card")
    save_adapter(_trained("lora-block", seed=1), folder, format="peft")
    second = _trained("lora-block", seed=2)
    save_adapter(second, folder, format="peft")
    assert sorted(os.listdir(folder)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    fresh = _fresh_like(second, "lora-block")
    load_adapter(fresh, folder)
    x = _input("lora-block")
    np.testing.assert_array_equal(fresh(x), second(x))


# ---------------------------------------------------------------------------------------------
# a folder written by hand, the way PEFT writes one
# ---------------------------------------------------------------------------------------------


def _peft_default_config(**fields):
    """``LoraConfig(...).to_dict()`` as PEFT's save_pretrained writes it (defaults filled in)."""
    config = {"alpha_pattern": {}, "auto_mapping": None, "base_model_name_or_path": "gpt2-toy",
              "bias": "none", "exclude_modules": None, "fan_in_fan_out": False, "inference_mode": True,
              "init_lora_weights": True, "layer_replication": None, "layers_pattern": None,
              "layers_to_transform": None, "loftq_config": {}, "lora_alpha": 16, "lora_bias": False,
              "lora_dropout": 0.05, "megatron_config": None, "megatron_core": "megatron.core",
              "modules_to_save": None, "peft_type": "LORA", "r": 4, "rank_pattern": {}, "revision": None,
              "target_modules": ["v_proj", "q_proj"], "task_type": "CAUSAL_LM", "use_dora": False,
              "use_rslora": False}
    config.update(fields)
    return config


def _write_by_hand(folder, config, tensors, metadata=None):
    folder.mkdir(exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata=metadata or {"format": "pt"})


def _hand_tensors(rng, dtype=np.float32, r=4):
    """q_proj and v_proj of a TransformerBlock(8, 2, 12), in PEFT's keys and layout."""
    return {f"{PREFIX}attn.{proj}.lora_{n}.weight": rng.standard_normal(shape).astype(dtype)
            for proj in ("q_proj", "v_proj") for n, shape in (("A", (r, 8)), ("B", (8, r)))}


def test_a_folder_written_like_peft_loads_and_computes_the_lora_formula(tmp_path):
    rng = np.random.default_rng(5)
    tensors = _hand_tensors(rng)
    _write_by_hand(tmp_path / "peft", _peft_default_config(), tensors)
    model = add_lora(_block(), ["q_proj", "v_proj"], r=4, alpha=16.0, dropout=0.05, rng=0)
    load_adapter(model, tmp_path / "peft")
    q = lora_layers(model)["attn.q_proj"]
    A, B = tensors[f"{PREFIX}attn.q_proj.lora_A.weight"], tensors[f"{PREFIX}attn.q_proj.lora_B.weight"]
    np.testing.assert_array_equal(q.A, A.astype(np.float64))               # float32 file, float64 model
    x = np.random.default_rng(1).standard_normal((3, 8))
    q.eval()
    want = x @ q.W.T + q.b + (16.0 / 4) * (x @ A.T.astype(np.float64)) @ B.T.astype(np.float64)
    np.testing.assert_allclose(q(x), want, rtol=1e-12, atol=1e-12)         # Y = X Wᵀ + b + s (X Aᵀ) Bᵀ


def test_a_minimal_peft_config_uses_loraconfig_defaults(tmp_path):
    """PEFT fills a field left out with LoraConfig's default (r = 8, lora_alpha = 8)."""
    rng = np.random.default_rng(0)
    _write_by_hand(tmp_path / "peft", {"peft_type": "LORA", "target_modules": ["q_proj", "v_proj"]},
                   _hand_tensors(rng, r=8))
    model = add_lora(_block(), ["q_proj", "v_proj"], r=8, alpha=8.0, rng=0)
    load_adapter(model, tmp_path / "peft")


def test_a_peft_dora_and_embedding_folder_by_hand_loads(tmp_path):
    rng = np.random.default_rng(2)
    m = np.abs(rng.standard_normal(8)) + 0.5
    tensors = {f"{PREFIX}attn.q_proj.lora_A.weight": rng.standard_normal((2, 8)),
               f"{PREFIX}attn.q_proj.lora_B.weight": rng.standard_normal((8, 2)),
               f"{PREFIX}attn.q_proj.lora_magnitude_vector": m}
    _write_by_hand(tmp_path / "dora", _peft_default_config(r=2, lora_alpha=4, use_dora=True,
                                                           target_modules=["q_proj"]), tensors)
    model = add_lora(_block(), ["q_proj"], r=2, alpha=4.0, use_dora=True, rng=0)
    load_adapter(model, tmp_path / "dora")
    np.testing.assert_array_equal(lora_layers(model)["attn.q_proj"].m, m)

    emb = {f"{PREFIX}tok_emb.lora_embedding_A": rng.standard_normal((2, 11)).astype(np.float16),
           f"{PREFIX}tok_emb.lora_embedding_B": rng.standard_normal((8, 2)).astype(np.float16)}
    _write_by_hand(tmp_path / "emb", _peft_default_config(r=2, lora_alpha=2, target_modules=["tok_emb"]), emb)
    lm = add_lora(_lm(), ["tok_emb"], r=2, alpha=2.0, rng=0)
    load_adapter(lm, tmp_path / "emb")
    np.testing.assert_array_equal(lora_layers(lm)["tok_emb"].A, emb[f"{PREFIX}tok_emb.lora_embedding_A"])
    assert lora_layers(lm)["tok_emb"].A.dtype == np.float64


# ---------------------------------------------------------------------------------------------
# refusals on load: one test per case, the model left as it was
# ---------------------------------------------------------------------------------------------


def _target():
    model = add_lora(_block(), ["q_proj", "v_proj"], r=4, alpha=16.0, rng=3)
    randomize(model, np.random.default_rng(4))
    return model, Snapshot(model)


def _refused(folder, pattern, model_and_snap=None):
    model, snap = model_and_snap or _target()
    with pytest.raises(ValueError, match=pattern):
        load_adapter(model, folder)
    snap.assert_unchanged()


def _hand_folder(tmp_path, tensors=None, **fields):
    tensors = _hand_tensors(np.random.default_rng(0)) if tensors is None else tensors
    _write_by_hand(tmp_path / "peft", _peft_default_config(**fields), tensors)
    return tmp_path / "peft"


def test_the_reference_hand_folder_loads(tmp_path):
    """The folder the refusals below each change in one place: unchanged, it loads."""
    model, _ = _target()
    load_adapter(model, _hand_folder(tmp_path))


def test_missing_key_refused(tmp_path):
    tensors = _hand_tensors(np.random.default_rng(0))
    del tensors[f"{PREFIX}attn.v_proj.lora_B.weight"]
    _refused(_hand_folder(tmp_path, tensors),
             r"is missing key 'base_model\.model\.attn\.v_proj\.lora_B\.weight'")


def test_unexpected_key_refused(tmp_path):
    tensors = _hand_tensors(np.random.default_rng(0))
    tensors[f"{PREFIX}attn.q_proj.base_layer.weight"] = np.zeros((8, 8), np.float32)
    _refused(_hand_folder(tmp_path, tensors), r"unexpected keys \['base_model\.model\.attn\.q_proj\."
                                              r"base_layer\.weight'\]")


def test_a_key_with_the_adapter_name_is_unexpected(tmp_path):
    """PEFT removes ".default" from the keys it saves; a key that kept it is not the layout."""
    tensors = _hand_tensors(np.random.default_rng(0))
    tensors[f"{PREFIX}attn.q_proj.lora_A.default.weight"] = tensors.pop(f"{PREFIX}attn.q_proj.lora_A.weight")
    _refused(_hand_folder(tmp_path, tensors), r"unexpected keys \['base_model\.model\.attn\.q_proj\.lora_A\."
                                              r"default\.weight'\]")


def test_shape_mismatch_refused(tmp_path):
    tensors = _hand_tensors(np.random.default_rng(0))
    tensors[f"{PREFIX}attn.q_proj.lora_A.weight"] = np.zeros((4, 9), np.float32)
    _refused(_hand_folder(tmp_path, tensors), r"attn\.q_proj\.lora_A\.weight has shape \(4, 9\) in the file, "
                                              r"the model expects \(4, 8\)")


def test_other_layers_refused(tmp_path):
    tensors = {k.replace("v_proj", "k_proj"): v for k, v in _hand_tensors(np.random.default_rng(0)).items()}
    _refused(_hand_folder(tmp_path, tensors, target_modules=["q_proj", "k_proj"]),
             r"the folder adapts layers \['attn\.k_proj', 'attn\.q_proj'\], the model has LoRA on "
             r"\['attn\.q_proj', 'attn\.v_proj'\]")


def test_config_r_not_matching_the_model_refused(tmp_path):
    _refused(_hand_folder(tmp_path, r=8), r"layer 'attn\.q_proj' has r=8 in the config, the model has r=4")


def test_rank_pattern_not_matching_the_model_refused(tmp_path):
    _refused(_hand_folder(tmp_path, rank_pattern={"v_proj": 2}),
             r"layer 'attn\.v_proj' has r=2 in the config, the model has r=4")


def test_config_alpha_not_matching_the_model_refused(tmp_path):
    _refused(_hand_folder(tmp_path, lora_alpha=8), r"has lora_alpha=8 in the config, the model has alpha=16\.0")


def test_alpha_pattern_not_matching_the_model_refused(tmp_path):
    _refused(_hand_folder(tmp_path, alpha_pattern={"attn.v_proj": 32}),
             r"layer 'attn\.v_proj' has lora_alpha=32 in the config")


def test_rslora_not_matching_the_model_refused(tmp_path):
    _refused(_hand_folder(tmp_path, use_rslora=True), r"use_rslora=True, layer 'attn\.q_proj' has rslora=False")


def test_dora_folder_into_lora_model_refused(tmp_path):
    tensors = _hand_tensors(np.random.default_rng(0))
    for proj in ("q_proj", "v_proj"):
        tensors[f"{PREFIX}attn.{proj}.lora_magnitude_vector"] = np.ones(8, np.float32)
    _refused(_hand_folder(tmp_path, tensors, use_dora=True), r"the folder is DoRA .* the model's layer is plain LoRA")


def test_lora_folder_into_dora_model_refused(tmp_path):
    model = add_lora(_block(), ["q_proj", "v_proj"], r=4, alpha=16.0, use_dora=True, rng=3)
    _refused(_hand_folder(tmp_path), r"the folder is plain LoRA .* the model's layer is DoRA",
             (model, Snapshot(model)))


def test_embedding_keys_for_a_linear_layer_refused(tmp_path):
    tensors = {f"{PREFIX}attn.q_proj.lora_embedding_A": np.zeros((4, 8), np.float32),
               f"{PREFIX}attn.q_proj.lora_embedding_B": np.zeros((8, 4), np.float32),
               **{k: v for k, v in _hand_tensors(np.random.default_rng(0)).items() if "v_proj" in k}}
    _refused(_hand_folder(tmp_path, tensors), r"layer 'attn\.q_proj' has an Embedding's .* the model's layer "
                                              r"is a Linear")


def test_dora_on_an_embedding_refused(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {f"{PREFIX}tok_emb.lora_embedding_A": rng.standard_normal((2, 11)),
               f"{PREFIX}tok_emb.lora_embedding_B": rng.standard_normal((8, 2)),
               f"{PREFIX}tok_emb.lora_magnitude_vector": np.ones(8)}
    lm = add_lora(_lm(), ["tok_emb"], r=2, alpha=2.0, rng=0)
    _refused(_hand_folder(tmp_path, tensors, r=2, lora_alpha=2, use_dora=True, target_modules=["tok_emb"]),
             r"'tok_emb' is an Embedding with a lora_magnitude_vector \(DoRA on an embedding\)", (lm, Snapshot(lm)))


def test_target_modules_not_naming_a_layer_refused(tmp_path):
    _refused(_hand_folder(tmp_path, target_modules=["q_proj"]),
             r"layer 'attn\.v_proj' has tensors but the config's target_modules \['q_proj'\] does not name it")


@pytest.mark.parametrize("field, value, why", [
    ("fan_in_fan_out", True, r"fan_in_fan_out=True is not supported: the base layer stores W as \(d_in, d_out\)"),
    ("bias", "all", r"bias='all' is not supported: the adapter also trains the base layers' biases"),
    ("bias", "lora_only", r"bias='lora_only' is not supported"),
    ("modules_to_save", ["lm_head"], r"modules_to_save=\['lm_head'\] is not supported"),
    ("layer_replication", [[0, 2], [1, 2]], r"layer_replication=.* is not supported"),
    ("lora_bias", True, r"lora_bias=True is not supported: lora_B has a bias"),
    ("init_lora_weights", "pissa_niter_4", r"init_lora_weights='pissa_niter_4' is not supported: a fast "
                                           r"randomized SVD"),
    ("init_lora_weights", "olora", r"init_lora_weights='olora' is not supported: an init that rewrites "
                                   r"the base weights"),
    ("init_lora_weights", "loftq", r"init_lora_weights='loftq' is not supported"),
    ("peft_type", "IA3", r"peft_type is 'IA3'; lora_np loads LoRA adapters"),
    ("r", 0, r"config r must be an int >= 1, got 0"),
    ("lora_alpha", "16", r"config lora_alpha must be a number > 0, got '16'"),
])
def test_unsupported_option_refused(tmp_path, field, value, why):
    _refused(_hand_folder(tmp_path, **{field: value}), why)


def test_pissa_folder_into_a_plain_model_refused(tmp_path):
    _refused(_hand_folder(tmp_path, init_lora_weights="pissa"),
             r"the folder is a PiSSA adapter \(init_lora_weights='pissa'\): it applies to the residual")


def test_plain_or_pissa_converted_folder_into_a_pissa_model_refused(tmp_path):
    """PEFT's PiSSA → LoRA conversion writes a plain rank-2r adapter (init_lora_weights = true):
    it belongs on the original weights, not on a PiSSA layer's residual."""
    model = add_lora(_block(), ["q_proj", "v_proj"], r=4, alpha=16.0, init="pissa", rng=3)
    _refused(_hand_folder(tmp_path), r"is a PiSSA layer .* the folder is a plain LoRA adapter .* converted "
                                     r"to LoRA too \(rank 2r\)", (model, Snapshot(model)))


def test_pissa_folder_for_another_residual_refused(tmp_path):
    trained = _trained("pissa")
    save_adapter(trained, tmp_path / "ad", format="peft")
    _, _, _, metadata = _read(tmp_path / "ad")
    assert set(json.loads(metadata["lora_np"])["W_res_norm"]) == {"attn.q_proj", "mlp.fc2"}
    other = add_lora(TransformerBlock(8, 2, 12, rng=7), ["q_proj", "fc2"], r=2, alpha=4.0, init="pissa", rng=0)
    _refused(tmp_path / "ad", r"'attn\.q_proj': the PiSSA adapter was trained on a residual weight with "
                              r"‖W_res‖_F = .*, this model's is", (other, Snapshot(other)))


def _bf16_file(path, key):
    """A safetensors file with one BF16 tensor, written byte by byte (NumPy cannot make one)."""
    header = json.dumps({"__metadata__": {"format": "pt"},
                         key: {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]}}).encode()
    header += b" " * (-len(header) % 8)
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\x80\x3f\x00\x40")   # 1.0, 2.0


def test_bfloat16_refused_with_how_to_convert(tmp_path):
    folder = _hand_folder(tmp_path)
    _bf16_file(folder / "adapter_model.safetensors", f"{PREFIX}attn.q_proj.lora_A.weight")
    _refused(folder, r"is bfloat16 \(BF16\), which safetensors' NumPy API cannot read \(NumPy has no "
                     r"bfloat16\); convert the adapter to float32 first")


def test_integer_tensor_refused(tmp_path):
    tensors = _hand_tensors(np.random.default_rng(0))
    tensors[f"{PREFIX}attn.q_proj.lora_A.weight"] = np.zeros((4, 8), np.int32)
    _refused(_hand_folder(tmp_path, tensors), r"'base_model\.model\.attn\.q_proj\.lora_A\.weight' has dtype "
                                              r"I32; a LoRA adapter holds floats")


def test_non_finite_tensor_refused(tmp_path):
    tensors = _hand_tensors(np.random.default_rng(0))
    tensors[f"{PREFIX}attn.v_proj.lora_B.weight"][0, 0] = np.nan
    _refused(_hand_folder(tmp_path, tensors), r"attn\.v_proj\.lora_B\.weight must hold finite floats")


class _Boom:
    """Unpickling this creates a directory: proof that something was unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_pickled_adapter_model_bin_is_never_unpickled(tmp_path):
    folder = _hand_folder(tmp_path)
    (folder / "adapter_model.safetensors").unlink()
    (folder / "adapter_model.bin").write_bytes(pickle.dumps(_Boom(str(tmp_path / "UNPICKLED"))))
    _refused(folder, r"holds adapter_model\.bin, a pickled PyTorch file, which lora_np never unpickles")
    assert not os.path.exists(tmp_path / "UNPICKLED")


def test_missing_weights_file_refused(tmp_path):
    folder = _hand_folder(tmp_path)
    (folder / "adapter_model.safetensors").unlink()
    _refused(folder, r"has no adapter_model\.safetensors")


def test_missing_config_refused(tmp_path):
    folder = _hand_folder(tmp_path)
    (folder / "adapter_config.json").unlink()
    _refused(folder, r"has no adapter_config\.json; not a PEFT adapter folder")


@pytest.mark.parametrize("text, why", [("{r: 4", "is not valid JSON"),
                                       ("[1, 2]", "is not a PEFT adapter config"),
                                       ('{"r": 4}', "is not a PEFT adapter config")])
def test_bad_config_refused(tmp_path, text, why):
    folder = _hand_folder(tmp_path)
    (folder / "adapter_config.json").write_text(text)
    _refused(folder, why)


def test_damaged_safetensors_refused(tmp_path):
    folder = _hand_folder(tmp_path)
    path = folder / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:60])
    _refused(folder, r"adapter_model\.safetensors is not a readable safetensors file")


def test_random_bytes_refused(tmp_path):
    folder = _hand_folder(tmp_path)
    (folder / "adapter_model.safetensors").write_bytes(np.random.default_rng(0).bytes(500))
    _refused(folder, r"is not a readable safetensors file")


def test_merged_model_refused(tmp_path):
    model, _ = _target()
    merge_lora(model)
    _refused(_hand_folder(tmp_path), r"layer 'attn\.q_proj' is merged; unmerge the model first",
             (model, Snapshot(model)))


def test_an_empty_folder_is_not_an_adapter(tmp_path):
    (tmp_path / "empty").mkdir()
    _refused(tmp_path / "empty", r"has no adapter_config\.json")


# ---------------------------------------------------------------------------------------------
# refusals on save
# ---------------------------------------------------------------------------------------------


def test_save_refuses_what_one_lora_config_cannot_say(tmp_path):
    mixed = add_lora(_block(), ["q_proj"], r=2, alpha=4.0, rslora=True, rng=0)
    add_lora(mixed, ["v_proj"], r=2, alpha=4.0, rng=1)
    with pytest.raises(ValueError, match=r"PEFT's config has one use_rslora for every layer .* the layers "
                                         r"differ: false: \['attn\.v_proj'\]; true: \['attn\.q_proj'\]"):
        save_adapter(mixed, tmp_path / "a", format="peft")
    dora_emb = add_lora(_lm(), ["q_proj"], r=2, alpha=4.0, use_dora=True, rng=0)
    add_lora(dora_emb, ["tok_emb"], r=2, alpha=4.0, rng=1)
    with pytest.raises(ValueError, match=r"use_dora applies to every adapted layer, and lora_np's embeddings "
                                         r"\['tok_emb'\] are plain LoRA"):
        save_adapter(dora_emb, tmp_path / "b", format="peft")
    drop = add_lora(_block(), ["q_proj"], r=2, alpha=4.0, dropout=0.1, rng=0)
    add_lora(drop, ["v_proj"], r=2, alpha=4.0, rng=1)
    with pytest.raises(ValueError, match=r"one lora_dropout for every layer"):
        save_adapter(drop, tmp_path / "c", format="peft")
    assert not os.listdir(tmp_path)


def test_save_refuses_bad_arguments(tmp_path):
    model = _trained("lora-block")
    with pytest.raises(ValueError, match=r"format must be one of \('npz', 'peft'\), got 'torch'"):
        save_adapter(model, tmp_path / "a", format="torch")
    with pytest.raises(ValueError, match=r"task_type must be one of .*'CAUSAL_LM'.*, got 'causal'"):
        save_adapter(model, tmp_path / "a", format="peft", task_type="causal")
    with pytest.raises(TypeError, match=r"base_model_name_or_path must be a str or None"):
        save_adapter(model, tmp_path / "a", format="peft", base_model_name_or_path=3)
    with pytest.raises(TypeError, match=r"are PEFT config fields; pass format='peft'"):
        save_adapter(model, tmp_path / "a.npz", task_type="CAUSAL_LM")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"is a file; format='peft' writes a folder"):
        save_adapter(model, tmp_path / "file", format="peft")
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_save_refuses_a_bare_layer(tmp_path):
    from lora_np import Linear, LoRALinear
    with pytest.raises(ValueError, match=r"the model itself is the LoRA layer; PEFT adapts the named sub-modules"):
        save_adapter(LoRALinear(Linear(6, 5, rng=0), r=2, alpha=4.0), tmp_path / "a", format="peft")
    assert not os.listdir(tmp_path)


def test_save_refuses_a_merged_model_or_one_without_lora(tmp_path):
    with pytest.raises(ValueError, match="no LoRA layers"):
        save_adapter(_block(), tmp_path / "a", format="peft")
    model = merge_lora(_trained("lora-block"))
    with pytest.raises(ValueError, match="unmerge the model first"):
        save_adapter(model, tmp_path / "a", format="peft")
    assert not os.listdir(tmp_path)


def test_qlora_adapter_round_trips_as_a_plain_peft_lora_folder(tmp_path):
    """A LoRA on an NF4 base is saved as PEFT saves a QLoRA adapter: plain LoRA keys and config
    (the 4-bit format belongs to the base model's config, not to the adapter)."""
    from lora_np import MLP
    from lora_np.quant import QuantizedLinear

    def model(seed):
        m = MLP(64, 64, 8, rng=0)
        m.fc1 = QuantizedLinear.from_linear(m.fc1)
        return add_lora(m, ["fc1", "fc2"], r=2, alpha=4.0, rng=seed)

    trained = model(1)
    randomize(trained, np.random.default_rng(3))
    save_adapter(trained, tmp_path / "ad", format="peft")
    config, tensors, _, _ = _read(tmp_path / "ad")
    assert sorted(tensors) == [f"{PREFIX}fc{i}.lora_{n}.weight" for i in (1, 2) for n in "AB"]
    assert config["init_lora_weights"] is True and config["target_modules"] == ["fc1", "fc2"]
    fresh = model(2)
    for n, p in fresh.parameters().items():
        if not n.endswith((".A", ".B")):
            p[...] = trained.parameters()[n]
    load_adapter(fresh, tmp_path / "ad")
    x = np.random.default_rng(0).standard_normal((3, 64))
    np.testing.assert_array_equal(fresh(x), trained(x))
