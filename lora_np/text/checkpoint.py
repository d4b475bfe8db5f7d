"""A language model and its tokenizer in one ``.npz`` file, loaded without pickle.

::

    save_lm("austen_lm.npz", model, tokenizer, {"steps": 2000, "test_loss": 1.4})
    model, tokenizer, meta = load_lm("austen_lm.npz")

The file is a compressed NumPy archive: one array per parameter, under its dotted name
(``"blocks.0.attn.q_proj.W"``), in the model's dtype, plus ``"__config__"``, a JSON string
(stored as a NumPy unicode array) with

* ``format``/``version`` — what the file is;
* ``model`` — the class name and the constructor arguments (``model.config()``) that rebuild it;
* ``tokenizer`` — its characters (``CharTokenizer.to_dict``): the ids the model was trained on;
* ``meta`` — anything JSON-able the caller records (steps, seed, held-out loss…).

Loading rebuilds the model from its config, then checks that the file holds exactly that
model's parameters (names, shapes, dtype, finite values) and a tokenizer of the model's
vocabulary size, before anything is copied in. Every failure is a ValueError that names the
file and what is wrong; NumPy is never allowed to unpickle (``allow_pickle=False``), so
loading a file cannot run code.

A LoRA-adapted model is not a checkpoint: its adapter is saved by ``lora_np.save_adapter`` on
top of the base model saved here.
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

import numpy as np

from ..lora import _read_npz
from ..modules import Module
from .model import LanguageModel
from .tokenizer import CharTokenizer

__all__ = ["save_lm", "load_lm", "MODELS", "CHECKPOINT_FORMAT", "CHECKPOINT_VERSION"]

CHECKPOINT_FORMAT = "lora_np.language_model"
CHECKPOINT_VERSION = 1
_CONFIG = "__config__"
#: class name -> class, for the models a checkpoint can rebuild (each has ``config()``, a dict
#: of JSON-able constructor arguments)
MODELS: dict = {"LanguageModel": LanguageModel}


def save_lm(path, model: Module, tokenizer: CharTokenizer, meta: dict | None = None) -> None:
    """Write ``model`` (its parameters, in its dtype) and ``tokenizer`` to ``path`` (exactly that
    name; compressed ``.npz``), with ``meta`` (a JSON-able dict) in the config.

    The model's class must be in ``MODELS`` and ``MODELS[name](**model.config())`` must build a
    model with exactly its parameters (so a LoRA-adapted model is refused: save its adapter
    with ``save_adapter``). The file appears complete or not at all (written to a temporary
    name beside it, then renamed). Raises TypeError/ValueError before writing anything.
    """
    name = type(model).__name__
    if not isinstance(model, Module) or MODELS.get(name) is not type(model):
        raise TypeError(f"save_lm: model must be one of {sorted(MODELS)}, got {name}")
    if not isinstance(tokenizer, CharTokenizer):
        raise TypeError(f"save_lm: tokenizer must be a CharTokenizer, got {type(tokenizer).__name__}")
    meta = {} if meta is None else meta
    if not isinstance(meta, dict):
        raise TypeError(f"save_lm: meta must be a dict, got {type(meta).__name__}")
    config = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
              "model": {"class": name, "config": model.config()},
              "tokenizer": tokenizer.to_dict(), "meta": meta}
    try:
        text = json.dumps(config, sort_keys=True, ensure_ascii=False)
    except (TypeError, ValueError) as e:
        raise TypeError(f"save_lm: model.config() and meta must be JSON-able: {e}") from None
    params = model.parameters()
    fresh = _build(MODELS[name], model.config(), "save_lm: model.config()")
    problem = _mismatch(fresh.parameters(), params, "the model", tokenizer, model.config())
    if problem:
        raise ValueError(f"save_lm: the model is not what its config builds: {problem}")
    arrays = {_CONFIG: np.array(text), **params}
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_lm(path) -> tuple[Module, CharTokenizer, dict]:
    """``(model, tokenizer, meta)`` from a file ``save_lm`` wrote. The model is in training
    mode with every parameter trainable, as a freshly built one.

    Raises ValueError naming the file and the problem: not an ``.npz``, damaged or truncated,
    an entry holding Python objects (never unpickled), no or bad config, an unknown model
    class, a config the class refuses, parameters missing, extra, of the wrong shape or dtype
    or not finite, a tokenizer whose size is not the model's vocabulary.
    """
    where = f"load_lm: {os.fspath(path)!s}"
    try:
        arrays = _read_npz(path)
    except (ValueError, zlib.error) as e:
        raise ValueError(f"{where} is not a lora_np checkpoint (.npz): {e}") from None
    if _CONFIG not in arrays:
        raise ValueError(f"{where} has no {_CONFIG!r} entry; not a checkpoint that save_lm wrote")
    config = _read_config(arrays.pop(_CONFIG), where)
    try:
        tokenizer = CharTokenizer.from_dict(config["tokenizer"])
    except ValueError as e:
        raise ValueError(f"{where}: bad tokenizer: {e}") from None
    model = _build(MODELS[config["model"]["class"]], config["model"]["config"], f"{where}: the config")
    problem = _mismatch(model.parameters(), arrays, "the file", tokenizer, config["model"]["config"])
    if problem:
        raise ValueError(f"{where}: {problem}")
    for name, p in model.parameters().items():     # everything checked: now copy in
        p[...] = arrays[name]
    return model, tokenizer, config["meta"]


# --------------------------------------------------------------------------- helpers


def _read_config(entry: np.ndarray, where: str) -> dict:
    """The parsed ``__config__``, checked for every key ``load_lm`` reads."""
    if entry.shape != () or entry.dtype.kind != "U":
        raise ValueError(f"{where}: {_CONFIG!r} must be one string, got dtype {entry.dtype}, "
                         f"shape {entry.shape}")
    try:
        config = json.loads(str(entry))
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: the config is not valid JSON: {e}") from None
    if not isinstance(config, dict) or config.get("format") != CHECKPOINT_FORMAT:
        got = config.get("format") if isinstance(config, dict) else config
        raise ValueError(f"{where} has format {got!r:.60}, expected {CHECKPOINT_FORMAT!r}")
    if config.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{where} has version {config.get('version')!r}, this lora_np reads "
                         f"version {CHECKPOINT_VERSION}")
    for key, kind in (("model", dict), ("tokenizer", dict), ("meta", dict)):
        if not isinstance(config.get(key), kind):
            raise ValueError(f"{where}: the config's {key!r} must be a {kind.__name__}, got "
                             f"{config.get(key)!r:.60}")
    model = config["model"]
    if model.get("class") not in MODELS or not isinstance(model.get("config"), dict):
        raise ValueError(f"{where}: the config's model must be {{'class': one of {sorted(MODELS)}, "
                         f"'config': {{...}}}}, got {model!r:.80}")
    return config


def _build(cls, config: dict, what: str) -> Module:
    """``cls(**config)``; a config the class refuses is a ValueError naming ``what``."""
    try:
        return cls(**config)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} does not build a {cls.__name__}: {e}") from None


def _mismatch(expected: dict, got: dict, source: str, tokenizer: CharTokenizer, config: dict) -> str:
    """What is wrong with the arrays ``got`` (from ``source``) as the parameters ``expected``,
    or with the tokenizer for this config; '' if nothing."""
    vocab = config.get("vocab_size")
    if vocab is not None and vocab != tokenizer.vocab_size:
        return (f"the model's vocab_size is {vocab} but the tokenizer has {tokenizer.vocab_size} "
                "characters")
    missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    if missing or extra:
        return (f"{source} has parameters the config does not build ({extra[:5]}) or lacks some "
                f"it builds ({missing[:5]}); a LoRA adapter is saved with save_adapter, on its base")
    for name, want in expected.items():
        a = got[name]
        if a.shape != want.shape or a.dtype != want.dtype:
            return (f"parameter {name!r} is {a.dtype} {a.shape} in {source}, the config builds "
                    f"{want.dtype} {want.shape}")
        if not np.all(np.isfinite(a)):
            return f"parameter {name!r} has non-finite values in {source}"
    return ""
