"""PEFT's adapter folder: ``adapter_config.json`` + ``adapter_model.safetensors``, read and written
in NumPy (the ``safetensors`` package's NumPy API; no PyTorch, nothing unpickled).

This is the layout Hugging Face PEFT's ``save_pretrained`` writes for a LoRA adapter and
``PeftModel.from_pretrained`` reads, so an adapter trained in lora_np can be loaded by PEFT onto a
PyTorch model whose modules have the same dotted names and shapes, and one trained in PEFT can be
loaded here. ``lora.save_adapter(model, directory, format="peft")`` and
``lora.load_adapter(model, directory)`` use it; this module knows the file layout and the
config, not the layers (it sits below ``lora``).

Tensor keys (PEFT's ``get_peft_model_state_dict``: the adapter name ``"default"`` is removed
from every key, and the model's keys carry the ``PeftModel`` prefix ``"base_model.model."``)::

    base_model.model.<module path>.lora_A.weight         A (r, d_in)    Linear
    base_model.model.<module path>.lora_B.weight         B (d_out, r)   Linear
    base_model.model.<module path>.lora_magnitude_vector m (d_out,)     DoRA (use_dora)
    base_model.model.<module path>.lora_embedding_A      A (r, V)       Embedding
    base_model.model.<module path>.lora_embedding_B      B (d, r)       Embedding

DoRA's magnitude is the norm of each *output row* of the (d_out, d_in) weight ``W + s B A`` in
both PEFT (``torch.linalg.norm(weight, dim=1)``) and lora_np (``functional.dora_weight_norm``),
and both leave the bias outside the rescaling, so m is stored as is. The embedding layout is the
same in both too (A (r, V), B (d, r), ΔW = s (B A)ᵀ).

Config fields written (``LoraConfig``'s names): ``peft_type: "LORA"``, ``r`` and ``lora_alpha``
(the most common values; layers that differ go to ``rank_pattern`` / ``alpha_pattern`` under
their full module path), ``target_modules``, ``lora_dropout``, ``use_rslora``, ``use_dora``,
``init_lora_weights`` (``True`` for lora_np's "kaiming" — PEFT's default —, ``"gaussian"``,
``"pissa"``), ``bias: "none"``, ``fan_in_fan_out: false``, ``task_type``,
``base_model_name_or_path``, ``inference_mode: true`` and PEFT's defaults for the rest.

What is refused on reading, with the reason: ``fan_in_fan_out: true`` (GPT-2's Conv1D layout),
``bias`` other than ``"none"``, ``modules_to_save`` (whole trained modules, not an adapter),
``layer_replication``, ``lora_bias``, an ``init_lora_weights`` that rewrites the base weights in
a way lora_np does not reproduce (``"pissa_niter_k"``, ``"olora"``, ``"loftq"``, ``"corda"``,
``"eva"``, …), any ``peft_type`` but LORA, bfloat16 tensors (NumPy has no bfloat16, so
safetensors' NumPy API cannot read them: convert the file to float32 first), non-float tensors,
and ``adapter_model.bin`` (a pickle).
"""

from __future__ import annotations

import collections
import json
import math
import os
import pathlib
import re

import numpy as np

from .validate import check_choice

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "PREFIX", "tensor_key", "build_config", "write_folder",
           "is_peft_path", "read_folder", "match_layers", "pattern_key"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
#: the PeftModel's prefix of every key: PeftModel.base_model (LoraModel) .model (the user's model)
PREFIX = "base_model.model."
#: lora_np's array name -> the last part of PEFT's key, per kind of layer
SUFFIXES = {"linear": {"A": "lora_A.weight", "B": "lora_B.weight", "m": "lora_magnitude_vector"},
            "embedding": {"A": "lora_embedding_A", "B": "lora_embedding_B"}}
#: safetensors dtypes NumPy reads; BF16 is refused with its own message
FLOAT_DTYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64}
#: PEFT's TaskType values (None: a plain PeftModel)
TASK_TYPES = (None, "SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS",
              "FEATURE_EXTRACTION")
#: lora_np's LoRALinear init -> PEFT's init_lora_weights
INIT_TO_PEFT = {"kaiming": True, "gaussian": "gaussian", "pissa": "pissa"}


def tensor_key(path: str, kind: str, name: str) -> str:
    """PEFT's key for lora_np's array ``name`` ("A", "B", "m") of the layer at ``path``."""
    return f"{PREFIX}{path}.{SUFFIXES[kind][name]}"


def _split_key(key: str):
    """``(path, kind, name)`` for a PEFT LoRA key, None for any other key."""
    if not key.startswith(PREFIX):
        return None
    rest = key[len(PREFIX):]
    for kind, names in SUFFIXES.items():
        for name, suffix in names.items():
            if rest.endswith("." + suffix) and len(rest) > len(suffix) + 1:
                return rest[: -len(suffix) - 1], kind, name
    return None


def pattern_key(patterns, path: str):
    """The first key of ``patterns`` (a rank_pattern or alpha_pattern) that names ``path``, or
    None: PEFT's ``get_pattern_key``, ``re.match(rf"(.*\\.)?({key})$", path)`` — a key is a
    regular expression that must match the end of the module path, at a dot or at its start."""
    for key in patterns:
        try:
            if re.match(rf"(.*\.)?({key})$", path):
                return key
        except re.error:
            continue                               # a key that is not a regex names nothing
    return None


def _layer_r_alpha(config: dict, path: str):
    rk = pattern_key(config.get("rank_pattern") or {}, path)
    ak = pattern_key(config.get("alpha_pattern") or {}, path)
    r = config["rank_pattern"][rk] if rk is not None else config["r"]
    alpha = config["alpha_pattern"][ak] if ak is not None else config["lora_alpha"]
    return r, alpha


def _targets_match(targets, path: str) -> bool:
    """PEFT's rule for ``target_modules``: a string is a regex the whole module path must match;
    a list names a module by its path or by a last part (``path.endswith("." + t)``)."""
    if isinstance(targets, str):
        return re.fullmatch(targets, path) is not None
    return any(path == t or path.endswith("." + t) for t in targets)


def _number(x):
    """An integral float as an int (``16`` rather than ``16.0``, as PEFT's configs read)."""
    return int(x) if float(x).is_integer() else float(x)


# --------------------------------------------------------------------------- writing


def _one(what: str, values: dict, why: str):
    """The single value all layers share, else a ValueError naming the layers that differ."""
    distinct = sorted({json.dumps(v) for v in values.values()})
    if len(distinct) > 1:
        groups = {d: sorted(p for p, v in values.items() if json.dumps(v) == d) for d in distinct}
        raise ValueError(f"save_adapter: PEFT's config has one {what} for every layer ({why}); "
                         f"the layers differ: " + "; ".join(f"{d}: {ps}" for d, ps in groups.items()))
    return next(iter(values.values()))


def _target_modules(adapted, module_paths):
    """``target_modules`` that names exactly the adapted layers among ``module_paths`` under
    PEFT's matching: each layer by its last name (``"q_proj"``) when that name selects adapted
    layers only, else by its full path; if even that selects more (a path that is the end of
    another), an anchored regex of the paths."""
    adapted = sorted(adapted)
    paths = [p for p in module_paths if p]

    def selects(targets):
        return sorted(p for p in paths if _targets_match(targets, p))

    targets = set()
    for p in adapted:
        last = p.rsplit(".", 1)[-1]
        targets.add(last if set(selects([last])) <= set(adapted) else p)
    for candidate in (sorted(targets), adapted):
        if selects(candidate) == adapted:
            return candidate
    return "^(" + "|".join(re.escape(p) for p in adapted) + ")$"


def build_config(layers: dict, module_paths, *, base_model_name_or_path=None, task_type=None) -> dict:
    """PEFT's ``adapter_config.json`` (a dict) for lora_np's LoRA layers.

    ``layers``: module path -> ``{"kind": "linear" | "embedding", "r", "alpha", "rslora",
    "dora", "dropout", "init"}`` (dropout and init for Linear layers only). ``module_paths``:
    every module path of the model (to choose a ``target_modules`` that names exactly these
    layers). Raises ValueError for what one PEFT LoraConfig cannot express: layers that differ
    in rsLoRA, DoRA, init or dropout (PEFT has one value of each for all layers), DoRA next to
    a LoRA embedding (PEFT's ``use_dora`` applies to every target).
    """
    if base_model_name_or_path is not None and not isinstance(base_model_name_or_path, str):
        raise TypeError(f"save_adapter: base_model_name_or_path must be a str or None, got "
                        f"{base_model_name_or_path!r}")
    check_choice("task_type", task_type, TASK_TYPES)
    if "" in layers:
        raise ValueError("save_adapter: the model itself is the LoRA layer; PEFT adapts the named "
                         "sub-modules of a model (keys base_model.model.<module path>.lora_A.weight), "
                         "so put the layer inside a model (e.g. as a child named like the PyTorch module)")
    linear = {p: c for p, c in layers.items() if c["kind"] == "linear"}
    rslora = _one("use_rslora", {p: c["rslora"] for p, c in layers.items()}, "s = α/√r or α/r")
    dora = _one("use_dora", {p: c["dora"] for p, c in linear.items()}, "DoRA or plain LoRA") \
        if linear else False
    if dora and len(linear) < len(layers):
        raise ValueError("save_adapter: PEFT's use_dora applies to every adapted layer, and lora_np's "
                         f"embeddings {sorted(set(layers) - set(linear))} are plain LoRA (lora_np has no "
                         "DoRA for embeddings); save the DoRA and the embedding adapters separately")
    init = _one("init_lora_weights", {p: c["init"] for p, c in linear.items()}, "one init scheme") \
        if linear else "kaiming"
    dropout = _one("lora_dropout", {p: c["dropout"] for p, c in linear.items()}, "one dropout") \
        if linear else 0.0
    r0 = collections.Counter(c["r"] for c in layers.values()).most_common(1)[0][0]
    a0 = collections.Counter(c["alpha"] for c in layers.values()).most_common(1)[0][0]
    config = {
        "alpha_pattern": {p: _number(c["alpha"]) for p, c in sorted(layers.items()) if c["alpha"] != a0},
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": INIT_TO_PEFT[init],
        "layer_replication": None,
        "layers_pattern": None,
        "layers_to_transform": None,
        "loftq_config": {},
        "lora_alpha": _number(a0),
        "lora_dropout": float(dropout),
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": int(r0),
        "rank_pattern": {p: int(c["r"]) for p, c in sorted(layers.items()) if c["r"] != r0},
        "revision": None,
        "target_modules": _target_modules(layers, module_paths),
        "task_type": task_type,
        "use_dora": bool(dora),
        "use_rslora": bool(rslora),
    }
    for p, c in layers.items():               # the patterns must give every layer its own r, α back
        if _layer_r_alpha(config, p) != (c["r"], c["alpha"]):
            raise ValueError(f"save_adapter: layer {p!r}'s rank_pattern/alpha_pattern entry would "
                             f"also name another layer (a module path that ends with {p!r})")
    return config


def write_folder(directory, config: dict, tensors: dict, metadata: dict | None = None) -> pathlib.Path:
    """Write ``adapter_config.json`` (sorted keys, indent 2, as PEFT writes it) and
    ``adapter_model.safetensors`` (metadata ``{"format": "pt"}`` plus ``metadata``) into
    ``directory``, creating it. Each file is written under a temporary name and then renamed,
    so a failed write leaves no half-written adapter. Other files in the folder are left alone."""
    from safetensors.numpy import save_file

    folder = pathlib.Path(directory)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"save_adapter: {folder} is a file; format='peft' writes a folder "
                         f"({CONFIG_NAME} + {WEIGHTS_NAME})")
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", **(metadata or {})}
    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    tmp_w, tmp_c = folder / (WEIGHTS_NAME + ".tmp"), folder / (CONFIG_NAME + ".tmp")
    try:
        save_file(arrays, str(tmp_w), metadata=meta)
        tmp_c.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp_w, folder / WEIGHTS_NAME)
        os.replace(tmp_c, folder / CONFIG_NAME)
    finally:
        for tmp in (tmp_w, tmp_c):
            if tmp.exists():
                tmp.unlink()
    return folder


# --------------------------------------------------------------------------- reading


def is_peft_path(path) -> bool:
    """True for a folder, or for a path whose file name is ``adapter_config.json`` or
    ``adapter_model.safetensors`` (its folder is the adapter)."""
    p = pathlib.Path(path)
    return p.is_dir() or p.name in (CONFIG_NAME, WEIGHTS_NAME)


def _folder(path) -> pathlib.Path:
    p = pathlib.Path(path)
    return p if p.is_dir() or p.name not in (CONFIG_NAME, WEIGHTS_NAME) else p.parent


def read_folder(path):
    """``(config, tensors, metadata)`` of the PEFT adapter folder at ``path`` (or of the folder of
    its ``adapter_config.json`` / ``adapter_model.safetensors``): the config as a dict, every
    tensor as a NumPy array, the safetensors metadata as a dict of strings. Never unpickles.

    Raises ValueError naming the folder and the reason: a missing file, a config that is not a
    JSON object with ``peft_type``, a pickled ``adapter_model.bin`` instead of safetensors, a
    damaged safetensors file, a bfloat16 or non-float tensor.
    """
    from safetensors import safe_open

    folder = _folder(path)
    where = f"load_adapter: {folder}"
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not folder.is_dir():
        raise ValueError(f"{where} is not a folder; a PEFT adapter is a folder with {CONFIG_NAME} "
                         f"and {WEIGHTS_NAME}")
    if not config_path.is_file():
        raise ValueError(f"{where} has no {CONFIG_NAME}; not a PEFT adapter folder")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{where}: {CONFIG_NAME} is not valid JSON ({e})") from None
    if not isinstance(config, dict) or "peft_type" not in config:
        raise ValueError(f"{where}: {CONFIG_NAME} is not a PEFT adapter config (expected a JSON "
                         f"object with 'peft_type', got {type(config).__name__})")
    if not weights_path.is_file():
        if (folder / "adapter_model.bin").is_file():
            raise ValueError(f"{where} holds adapter_model.bin, a pickled PyTorch file, which lora_np "
                             "never unpickles; save the adapter with safetensors (PEFT's "
                             "save_pretrained(..., safe_serialization=True), the default)")
        raise ValueError(f"{where} has no {WEIGHTS_NAME}")
    try:
        with safe_open(str(weights_path), framework="numpy") as f:
            metadata = dict(f.metadata() or {})
            kinds = {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}
            for k, (dtype, shape) in sorted(kinds.items()):
                if dtype == "BF16":
                    raise _Refused(f"tensor {k!r} is bfloat16 (BF16), which safetensors' NumPy API "
                                   "cannot read (NumPy has no bfloat16); convert the adapter to "
                                   "float32 first (in PyTorch: load it with safetensors.torch, "
                                   "call .float() on each tensor, save it again)")
                if dtype not in FLOAT_DTYPES:
                    raise _Refused(f"tensor {k!r} has dtype {dtype}; a LoRA adapter holds floats "
                                   f"({', '.join(FLOAT_DTYPES)})")
            tensors = {k: f.get_tensor(k) for k in kinds}
    except _Refused as e:
        raise ValueError(f"{where}/{WEIGHTS_NAME}: {e}") from None
    except Exception as e:                # safetensors raises its own SafetensorError for a bad file
        raise ValueError(f"{where}/{WEIGHTS_NAME} is not a readable safetensors file "
                         f"({type(e).__name__}: {e})") from None
    return config, tensors, metadata


class _Refused(Exception):
    """A readable file lora_np does not accept (its message is the reason)."""


#: config fields whose non-default value changes what the adapter means in a way lora_np does
#: not represent: field -> (value(s) accepted, the reason)
_UNSUPPORTED = {
    "fan_in_fan_out": ((False, None), "the base layer stores W as (d_in, d_out) (GPT-2's Conv1D); "
                                      "lora_np's Linear stores (d_out, d_in)"),
    "bias": (("none", None), "the adapter also trains the base layers' biases; lora_np's "
                             "adapters hold A, B (and m) only"),
    "modules_to_save": ((None, []), "the folder also holds whole trained modules, not an adapter"),
    "layer_replication": ((None, []), "PEFT duplicated layers of the base model"),
    "lora_bias": ((False, None), "lora_B has a bias"),
    "use_qalora": ((False, None), "QA-LoRA pools the input"),
    "trainable_token_indices": ((None,), "the folder trains single token embeddings"),
    "target_parameters": ((None, []), "LoRA on bare parameters, not on layers"),
    "alora_invocation_tokens": ((None,), "activated LoRA (aLoRA) depends on the input tokens"),
}


def check_config(config: dict) -> None:
    """Refuse, with the reason, a PEFT config lora_np cannot load (see the module docstring)."""
    if config.get("peft_type") != "LORA":
        raise ValueError(f"load_adapter: peft_type is {config.get('peft_type')!r}; lora_np loads LoRA "
                         "adapters (peft_type 'LORA') only")
    for field, (ok, why) in _UNSUPPORTED.items():
        if field in config and config[field] not in ok:
            raise ValueError(f"load_adapter: {field}={config[field]!r} is not supported: {why}")
    init = config.get("init_lora_weights", True)
    if not (isinstance(init, bool) or init in ("gaussian", "pissa")):
        why = ("a fast randomized SVD, whose residual weight lora_np's exact SVD does not reproduce"
               if isinstance(init, str) and init.startswith("pissa_niter") else
               "an init that rewrites the base weights, which lora_np does not reproduce")
        raise ValueError(f"load_adapter: init_lora_weights={init!r} is not supported: {why}; "
                         "lora_np loads True, False, 'gaussian' and (exact-SVD) 'pissa' adapters")
    if config.get("loftq_config"):
        raise ValueError("load_adapter: loftq_config is set (LoftQ rewrites the quantised base "
                         "weights); not supported")
    config.setdefault("r", 8)                      # LoraConfig's defaults for a field left out
    config.setdefault("lora_alpha", 8)
    v = config["r"]
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"load_adapter: config r must be an int >= 1, got {v!r}")
    a = config["lora_alpha"]
    if isinstance(a, bool) or not isinstance(a, (int, float)) or not (math.isfinite(a) and a > 0):
        raise ValueError(f"load_adapter: config lora_alpha must be a number > 0, got {a!r}")
    for field in ("use_rslora", "use_dora"):
        if not isinstance(config.get(field, False), bool):
            raise ValueError(f"load_adapter: config {field} must be true or false, got {config[field]!r}")
    for field in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(field) or {}, dict):
            raise ValueError(f"load_adapter: config {field} must be a JSON object, got {config[field]!r}")
        config[field] = config.get(field) or {}


def match_layers(config: dict, tensors: dict, metadata: dict, layers: dict) -> dict:
    """The arrays to load into each layer, checked against the layers the model has.

    ``layers``: module path -> ``{"kind", "r", "alpha", "rslora", "dora", "init", "shapes":
    {name: shape}, "dtype", "W_res_norm" (PiSSA only)}``. Returns path -> {name: array in the
    layer's dtype}. Raises ValueError naming the layer or key for: an unsupported config, an
    unexpected or missing key, a different set of layers, kind (Linear/Embedding, LoRA/DoRA),
    r, lora_alpha, use_rslora, PiSSA or not, shape, non-finite entries. Changes nothing.
    """
    check_config(config)
    found: dict[str, dict] = {}
    unexpected = []
    for key in sorted(tensors):
        split = _split_key(key)
        if split is None:
            unexpected.append(key)
            continue
        path, kind, name = split
        found.setdefault(path, {})[name] = (key, kind)
    if unexpected:
        shown = unexpected[:5] + (["…"] if len(unexpected) > 5 else [])
        raise ValueError(f"load_adapter: unexpected keys {shown} in {WEIGHTS_NAME}; a LoRA adapter "
                         f"holds only '{PREFIX}<module>.lora_A.weight', '.lora_B.weight', "
                         "'.lora_magnitude_vector', '.lora_embedding_A', '.lora_embedding_B'")
    if set(found) != set(layers):
        raise ValueError(f"load_adapter: the folder adapts layers {sorted(found)}, the model has "
                         f"LoRA on {sorted(layers)}")
    targets = config.get("target_modules")
    out = {}
    for path, want in sorted(layers.items()):
        kinds = {kind for _, kind in found[path].values()}
        if want["kind"] == "embedding" and "m" in found[path]:
            raise ValueError(f"load_adapter: layer {path!r} is an Embedding with a lora_magnitude_vector "
                             "(DoRA on an embedding), which lora_np does not support")
        if kinds != {want["kind"]}:
            got = "an Embedding's (lora_embedding_A/B)" if "embedding" in kinds else "a Linear's (lora_A/B)"
            raise ValueError(f"load_adapter: layer {path!r} has {got} keys in the folder, the model's "
                             f"layer is {'an Embedding' if want['kind'] == 'embedding' else 'a Linear'}")
        if isinstance(targets, (str, list)) and targets and targets != "all-linear" \
                and not _targets_match(targets, path):
            raise ValueError(f"load_adapter: layer {path!r} has tensors but the config's target_modules "
                             f"{targets!r} does not name it")
        has_m = "m" in found[path]
        use_dora = config.get("use_dora", False)
        if has_m != want["dora"] or (want["kind"] == "linear" and use_dora != want["dora"]):
            raise ValueError(f"load_adapter: layer {path!r}: the folder is "
                             f"{'DoRA' if has_m or config.get('use_dora') else 'plain LoRA'} "
                             f"(use_dora={config.get('use_dora', False)}, lora_magnitude_vector "
                             f"{'present' if has_m else 'absent'}), the model's layer is "
                             f"{'DoRA' if want['dora'] else 'plain LoRA'} (add_lora(..., use_dora=...))")
        r, alpha = _layer_r_alpha(config, path)
        if r != want["r"]:
            raise ValueError(f"load_adapter: layer {path!r} has r={r!r} in the config, the model has "
                             f"r={want['r']}")
        if not isinstance(alpha, (int, float)) or not math.isclose(alpha, want["alpha"], rel_tol=1e-12):
            raise ValueError(f"load_adapter: layer {path!r} has lora_alpha={alpha!r} in the config, the "
                             f"model has alpha={want['alpha']}")
        if config.get("use_rslora", False) != want["rslora"]:
            raise ValueError(f"load_adapter: the folder has use_rslora={config.get('use_rslora', False)}, "
                             f"layer {path!r} has rslora={want['rslora']} (s = α/√r vs α/r)")
        if want["kind"] == "linear":
            _check_pissa(config, metadata, path, want)
        arrays = {}
        for name, shape in want["shapes"].items():
            if name not in found[path]:
                raise ValueError(f"load_adapter: {WEIGHTS_NAME} is missing key "
                                 f"{tensor_key(path, want['kind'], name)!r}")
            key, _ = found[path][name]
            a = tensors[key]
            if a.shape != tuple(shape):
                raise ValueError(f"load_adapter: {key} has shape {a.shape} in the file, the model "
                                 f"expects {tuple(shape)}")
            if not np.all(np.isfinite(a)):
                raise ValueError(f"load_adapter: {key} must hold finite floats, got NaN or inf")
            arrays[name] = a.astype(want["dtype"], copy=False)
        out[path] = arrays
    return out


def _check_pissa(config, metadata, path, want):
    """A PiSSA folder (``init_lora_weights: "pissa"``) belongs on the residual of the original
    weight, which lora_np's ``init="pissa"`` layer holds — as PEFT redoes the SVD on load."""
    pissa = config.get("init_lora_weights", True) == "pissa"
    if pissa != (want.get("init") == "pissa"):
        if pissa:
            raise ValueError(f"load_adapter: the folder is a PiSSA adapter (init_lora_weights='pissa'): "
                             "it applies to the residual W − s·B₀A₀ of the original weight, and "
                             f"layer {path!r} is not a PiSSA layer; build the model with add_lora(..., "
                             "init='pissa') on the original weights")
        raise ValueError(f"load_adapter: layer {path!r} is a PiSSA layer (its W is the residual "
                         f"W − s·B₀A₀) and the folder is a plain LoRA adapter (init_lora_weights="
                         f"{config.get('init_lora_weights', True)!r}); a plain adapter — a PiSSA "
                         "adapter converted to LoRA too (rank 2r) — loads into layers built without "
                         "init='pissa' on the original weights")
    if pissa:
        try:
            saved = json.loads(metadata.get("lora_np", "{}")).get("W_res_norm", {}).get(path)
        except (json.JSONDecodeError, AttributeError):
            saved = None
        got = want.get("W_res_norm")
        if isinstance(saved, (int, float)) and got is not None:    # PEFT's own folders record none
            check_residual_norm(path, saved, got)


def check_residual_norm(path: str, saved, got: float) -> None:
    """Refuse a PiSSA adapter trained on another residual weight: ``saved`` is the ‖W_res‖_F it
    recorded (a number, else refused), ``got`` the layer's; they must agree to 1e-6 (relative).
    ``lora.load_adapter`` uses it for an ``.npz`` adapter too."""
    if not isinstance(saved, (int, float)) or abs(got - saved) > 1e-6 * max(abs(saved), 1e-30):
        raise ValueError(f"load_adapter: layer {path!r}: the PiSSA adapter was trained on a residual "
                         f"weight with ‖W_res‖_F = {saved!r}, this model's is {got!r}; build the "
                         "model from the same base weights and r, alpha, rslora")
