"""Checkpoints of a language model and its tokenizer: a round trip gives bit-identical logits
and the same tokenizer; every corrupt, truncated or mismatched file is a ValueError naming what
is wrong, and loading never unpickles."""

import json
import zipfile

import numpy as np
import pytest

from lora_np import MLP, add_lora
from lora_np.text import checkpoint
from lora_np.text.checkpoint import CHECKPOINT_FORMAT, load_lm, save_lm
from lora_np.text.model import LanguageModel
from lora_np.text.tokenizer import CharTokenizer

TOK = CharTokenizer("abcdefgh \n")
TINY = dict(vocab_size=TOK.vocab_size, d_model=8, n_heads=2, n_layers=2, d_hidden=16, context=6)


class TinyMLP(MLP):
    """Any Module with ``config()`` can be checkpointed once it is in ``checkpoint.MODELS``."""

    def __init__(self, d_in, d_hidden, d_out, rng=None, dtype="float64"):
        super().__init__(d_in, d_hidden, d_out, rng=rng, dtype=np.dtype(dtype))
        self._cfg = {"d_in": d_in, "d_hidden": d_hidden, "d_out": d_out, "dtype": np.dtype(dtype).name}

    def config(self):
        return dict(self._cfg)


@pytest.fixture
def tiny_mlp(monkeypatch):
    monkeypatch.setitem(checkpoint.MODELS, "TinyMLP", TinyMLP)
    return TinyMLP(5, 7, 3, rng=1)


def _lm(dtype=np.float32, seed=3):
    model = LanguageModel(**TINY, rng=seed, dtype=dtype)
    for p in model.parameters().values():        # off the init: biases and LayerNorms non-trivial
        p += np.random.default_rng(seed).standard_normal(p.shape).astype(dtype) * 0.1
    return model


def _ids(seed=0, shape=(3, 6)):
    return np.random.default_rng(seed).integers(0, TOK.vocab_size, shape)


def test_round_trip_of_any_module(tiny_mlp, tmp_path):
    path = tmp_path / "mlp.npz"
    save_lm(path, tiny_mlp, TOK, {"note": "anything JSON-able", "n": [1, 2.5]})
    model, tok, meta = load_lm(path)
    assert type(model) is TinyMLP and tok == TOK and meta == {"note": "anything JSON-able", "n": [1, 2.5]}
    x = np.random.default_rng(0).standard_normal((4, 5))
    np.testing.assert_array_equal(model(x), tiny_mlp(x))
    for name, p in tiny_mlp.parameters().items():
        np.testing.assert_array_equal(model.parameters()[name], p, err_msg=name)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_round_trip_of_a_language_model_is_bit_identical(dtype, tmp_path):
    original = _lm(dtype)
    path = tmp_path / "lm.ckpt"                  # exactly this name: nothing appended
    save_lm(path, original, TOK)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lm.ckpt"]      # no temporary left
    model, tok, meta = load_lm(path)
    assert isinstance(model, LanguageModel) and model.config() == original.config() and meta == {}
    assert tok == TOK and all(p.dtype == dtype for p in model.parameters().values())
    idx = _ids()
    np.testing.assert_array_equal(model(idx), original(idx))
    assert model.training and set(model.trainable_parameters()) == set(original.parameters())


def test_the_file_is_compressed_float_arrays_and_a_json_config(tmp_path):
    path = tmp_path / "lm.npz"
    model = _lm()
    save_lm(path, model, TOK, {"steps": 3})
    with zipfile.ZipFile(path) as z:
        assert all(i.compress_type == zipfile.ZIP_DEFLATED for i in z.infolist())
    with np.load(path, allow_pickle=False) as f:
        config = json.loads(str(f["__config__"]))
        assert set(f.files) == {"__config__", *model.parameters()}
        assert all(f[k].dtype == np.float32 for k in f.files if k != "__config__")
    assert config == {"format": CHECKPOINT_FORMAT, "version": 1, "meta": {"steps": 3},
                      "model": {"class": "LanguageModel", "config": model.config()},
                      "tokenizer": TOK.to_dict()}


def test_save_refuses_and_writes_nothing(tiny_mlp, tmp_path):
    path = tmp_path / "x.npz"
    cases = [
        (MLP(2, 3, 1), TOK, None, TypeError, "model must be one of"),
        (_lm(), "abc", None, TypeError, "tokenizer must be a CharTokenizer"),
        (_lm(), TOK, [1], TypeError, "meta must be a dict"),
        (_lm(), TOK, {"x": object()}, TypeError, "JSON-able"),
        (_lm(), CharTokenizer("abc"), None, ValueError, "vocab_size is 10 but the tokenizer has 3"),
        (add_lora(_lm(), ["q_proj"], r=2, alpha=2, rng=0), TOK, None, ValueError, "save_adapter"),
    ]
    for model, tok, meta, error, match in cases:
        with pytest.raises(error, match=match):
            save_lm(path, model, tok, meta)
        assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------- damaged files


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "lm.npz"
    save_lm(path, _lm(), TOK, {"steps": 1})
    return path


def _arrays(path):
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def _rewrite(path, arrays=None, config=None):
    """The checkpoint at ``path`` with some arrays replaced (None removes one) and/or the config
    edited by ``config(dict)``, written back uncompressed."""
    a = _arrays(path)
    if config is not None:
        cfg = json.loads(str(a["__config__"]))
        config(cfg)
        a["__config__"] = np.array(json.dumps(cfg))
    for k, v in (arrays or {}).items():
        if v is None:
            del a[k]
        else:
            a[k] = v
    with open(path, "wb") as fh:
        np.savez(fh, **a)
    return path


def _load_fails(path, match):
    with pytest.raises(ValueError, match=match) as info:
        load_lm(path)
    assert str(path) in str(info.value)


def test_not_a_checkpoint(tmp_path, saved):
    _load_fails(tmp_path / "missing.npz", "cannot open the file")
    (tmp_path / "junk.npz").write_bytes(b"not a zip archive at all" * 10)
    _load_fails(tmp_path / "junk.npz", "not a zip archive")
    np.save(tmp_path / "one.npy", np.zeros(3))
    _load_fails(tmp_path / "one.npy", r"\.npy file")
    np.savez(tmp_path / "other.npz", W=np.zeros(3))
    _load_fails(tmp_path / "other.npz", "no '__config__' entry")


def test_truncated_and_corrupted_files(saved, tmp_path):
    data = saved.read_bytes()
    for cut in (len(data) // 2, len(data) - 30, 100):
        (tmp_path / "cut.npz").write_bytes(data[:cut])
        _load_fails(tmp_path / "cut.npz", "not a lora_np checkpoint")
    # flip bytes inside the compressed data of the largest entry: zlib or the CRC notices
    with zipfile.ZipFile(saved) as z:
        big = max(z.infolist(), key=lambda i: i.compress_size)
    start = big.header_offset + 30 + len(big.filename) + len(big.extra)
    bad = bytearray(data)
    for i in range(start + big.compress_size // 3, start + big.compress_size // 3 + 64):
        bad[i] ^= 0x5A
    (tmp_path / "flipped.npz").write_bytes(bytes(bad))
    _load_fails(tmp_path / "flipped.npz", "not a lora_np checkpoint")


RAN = []


def _ran():
    RAN.append(True)


class _Payload:
    def __reduce__(self):
        return (_ran, ())


def test_an_object_array_is_never_unpickled(saved):
    a = _arrays(saved)
    a["head.W"] = np.array([_Payload()], dtype=object)
    with open(saved, "wb") as fh:
        np.savez(fh, **a)                  # np.savez pickles object arrays
    _load_fails(saved, "Python objects")
    assert RAN == []


def _model_cfg(**changes):
    return lambda c: c["model"]["config"].update(changes)


@pytest.mark.parametrize("edit, match", [
    (lambda c: c.update(format="lora_np.adapter"), "format 'lora_np.adapter'"),
    (lambda c: c.update(version=2), "version 2"),
    (lambda c: c.update(meta="x"), "'meta' must be a dict"),
    (lambda c: c.pop("tokenizer"), "'tokenizer' must be a dict"),
    (lambda c: c["model"].update({"class": "GPT2"}), "class': one of"),
    (lambda c: c["model"].update(config=[1]), "class': one of"),
    (_model_cfg(n_heads=3), "does not build a LanguageModel: d_model must be divisible"),
    (_model_cfg(depth=3), "does not build a LanguageModel"),
    (_model_cfg(n_layers=1), r"has parameters the config does not build \(\['blocks.1"),
    (_model_cfg(n_layers=3), r"lacks some it builds \(\['blocks.2"),
    (_model_cfg(dtype="float64"), "is float32 .* the config builds float64"),
    (_model_cfg(d_hidden=12), r"is float32 \(16, 8\) in the file, the config builds float32 \(12, 8\)"),
    (lambda c: c.update(tokenizer={"chars": "ba"}), "bad tokenizer: .*sorted and unique"),
    (lambda c: c.update(tokenizer={"chars": "abc"}), "vocab_size is 10 but the tokenizer has 3"),
])
def test_a_config_that_does_not_fit(saved, edit, match):
    _load_fails(_rewrite(saved, config=edit), match)


def test_bad_config_entry(saved):
    a = _arrays(saved)
    for bad, match in [(np.array("{not json"), "not valid JSON"),
                       (np.array(["a", "b"]), "must be one string"),
                       (np.array(json.dumps([1, 2])), "format")]:
        _load_fails(_rewrite(saved, {"__config__": bad}), match)
        _rewrite(saved, {"__config__": a["__config__"]})


@pytest.mark.parametrize("arrays, match", [
    ({"head.W": None}, r"lacks some it builds \(\['head.W'\]\)"),
    ({"extra.W": np.zeros(3, np.float32)}, r"does not build \(\['extra.W'\]\)"),
    ({"head.W": np.zeros((3, 3), np.float32)}, r"'head.W' is float32 \(3, 3\)"),
    ({"head.W": np.zeros((10, 8), np.float64)},
     r"'head.W' is float64 \(10, 8\) in the file, the config builds float32"),
    ({"head.W": np.zeros((10, 8), np.int32)}, r"'head.W' is int32"),
    ({"ln_f.gamma": np.full(8, np.nan, np.float32)}, "'ln_f.gamma' has non-finite values"),
])
def test_parameters_that_do_not_fit(saved, arrays, match):
    _load_fails(_rewrite(saved, arrays), match)
