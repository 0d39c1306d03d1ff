"""HF GPT-2 / BioMedLM checkpoints (safetensors) <-> Flax params.

    from biomedlm_jax.formats import hf
    model, params = hf.load_pretrained(path)             # dir with config.json + model.safetensors
    logits = model.apply({"params": params}, input_ids)   # (B, T, V) float32
    hf.save_pretrained(model, params, out_dir)            # GPT2LMHeadModel.from_pretrained(out_dir) loads it

HF's GPT-2 uses `Conv1D` layers whose weight is stored (in_features, out_features): the same
orientation as a Flax Dense kernel (and the transpose of `nn.Linear`), so kernels are *not*
transposed; only the fused QKV and attention-output matrices are reshaped to the per-head layout the
Flax model uses (see `models/gpt.py`: `Attention`). The LM head is tied to `wte` and not stored.

config.json <-> GPTConfig is `hf_config.py`. Only safetensors are read: pickled `pytorch_model.bin` files can run arbitrary code when loaded, so
they are refused with a message saying how to convert them. Every `GPT2Config` field that changes the
math is either honoured or refused; loading is all-or-nothing (a missing, unexpected or mis-shaped
tensor is an error naming the file and tensor, before any parameter is returned).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
from typing import Callable, Iterator, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from biomedlm_jax.core import paths
from biomedlm_jax.core.errors import CheckpointError
from biomedlm_jax.data import tokenizer as tokenizer_lib
from biomedlm_jax.formats.hf_config import CONFIG_NAME, config_to_hf, load_config, read_hf_config
from biomedlm_jax.models.gpt import GPT, stack_layers
from biomedlm_jax.models.gpt_config import GPTConfig

WEIGHTS_NAME = "model.safetensors"

INDEX_NAME = "model.safetensors.index.json"

PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack")



# Buffers older GPT-2 checkpoints store next to the weights (the causal mask); not parameters.
_IGNORED = re.compile(r"^(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)$")



# Classifier heads (read by `read_classifier_head`, skipped by the backbone loader): BioMedLM's
# GPT2ForMultipleChoice / GPT2ForSequenceClassification name theirs `classifier`, transformers' `score`.
HEAD_TENSORS = ("classifier.weight", "classifier.bias", "score.weight", "score.bias")



HEAD_ARCHITECTURES = {"GPT2ForMultipleChoice": "choice", "GPT2ForSequenceClassification": "seqcls"}



def layout(cfg: GPTConfig):
    """[(hf_name, flax_path, hf_shape, flax_shape)] for every tensor, per-layer (unstacked) paths."""
    C, H, hd, F = cfg.d_model, cfg.n_head, cfg.head_dim, cfg.ffn_dim
    rows = [
        ("wte.weight", ("wte", "embedding"), (cfg.vocab_size, C), (cfg.vocab_size, C)),
        ("wpe.weight", ("wpe", "embedding"), (cfg.n_positions, C), (cfg.n_positions, C)),
        ("ln_f.weight", ("ln_f", "scale"), (C,), (C,)),
        ("ln_f.bias", ("ln_f", "bias"), (C,), (C,)),
    ]
    for i in range(cfg.n_layer):
        b = f"h_{i}"
        rows += [
            (f"h.{i}.ln_1.weight", (b, "ln_1", "scale"), (C,), (C,)),
            (f"h.{i}.ln_1.bias", (b, "ln_1", "bias"), (C,), (C,)),
            (f"h.{i}.attn.c_attn.weight", (b, "attn", "c_attn", "kernel"), (C, 3 * C), (C, 3, H, hd)),
            (f"h.{i}.attn.c_attn.bias", (b, "attn", "c_attn", "bias"), (3 * C,), (3, H, hd)),
            (f"h.{i}.attn.c_proj.weight", (b, "attn", "c_proj", "kernel"), (C, C), (H, hd, C)),
            (f"h.{i}.attn.c_proj.bias", (b, "attn", "c_proj", "bias"), (C,), (C,)),
            (f"h.{i}.ln_2.weight", (b, "ln_2", "scale"), (C,), (C,)),
            (f"h.{i}.ln_2.bias", (b, "ln_2", "bias"), (C,), (C,)),
            (f"h.{i}.mlp.c_fc.weight", (b, "mlp", "c_fc", "kernel"), (C, F), (C, F)),
            (f"h.{i}.mlp.c_fc.bias", (b, "mlp", "c_fc", "bias"), (F,), (F,)),
            (f"h.{i}.mlp.c_proj.weight", (b, "mlp", "c_proj", "kernel"), (F, C), (F, C)),
            (f"h.{i}.mlp.c_proj.bias", (b, "mlp", "c_proj", "bias"), (C,), (C,)),
        ]
    return rows



def _set(tree: dict, path, value):
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value



def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree



def weight_files(path: str) -> list[str]:
    path = paths.downloaded(path)  # safetensors reads local files: a gs:// checkpoint is copied once
    single, index = os.path.join(path, WEIGHTS_NAME), os.path.join(path, INDEX_NAME)
    if os.path.exists(single):
        return [single]
    if os.path.exists(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index (needs a 'weight_map' object): {e}") from e
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not os.path.exists(os.path.join(path, f))]
        if missing:
            raise CheckpointError(f"{index}: shard file(s) {missing} listed in the index are missing")
        return [os.path.join(path, f) for f in files]
    pickled = [n for n in PICKLE_NAMES if os.path.exists(os.path.join(path, n))]
    if pickled:
        raise CheckpointError(
            f"{path}: found {pickled[0]} but no {WEIGHTS_NAME}. Pickle checkpoints are never loaded (unpickling "
            "runs arbitrary code). Convert once where you trust the file: `python -c \"from transformers import "
            f"GPT2LMHeadModel as M; M.from_pretrained('{path}').save_pretrained('{path}', safe_serialization=True)\"`"
        )
    raise FileNotFoundError(f"{path}: no {WEIGHTS_NAME} or {INDEX_NAME} found")



def _read_tensors(path: str) -> Iterator[tuple[str, str, Callable[[], np.ndarray]]]:
    """Yields (file, tensor name, lazy loader) for every tensor in the checkpoint's safetensors files."""
    for file in weight_files(path):
        try:
            handle = safe_open(file, framework="numpy")
        except Exception as e:  # safetensors raises SafetensorError for truncated/garbage files
            raise CheckpointError(f"{file}: not a readable safetensors file: {e}") from e
        for name in handle.keys():
            yield file, name, (lambda h=handle, n=name: h.get_tensor(n))



def _strip_prefix(name: str) -> str:
    return name[len("transformer.") :] if name.startswith("transformer.") else name



def load_params_numpy(path: str, cfg: GPTConfig, dtype=np.float32) -> dict:
    """Read every tensor named by the layout, check names and shapes, return a numpy param tree."""
    by_name = {hf_name: (flax_path, hf_shape, flax_shape) for hf_name, flax_path, hf_shape, flax_shape in layout(cfg)}
    params: dict = {}
    seen: dict[str, str] = {}
    lm_head = None
    for file, name, load in _read_tensors(path):
        key = _strip_prefix(name)
        if key in seen:
            raise CheckpointError(f"{file}: tensor {name} also appears in {seen[key]}")
        if _IGNORED.match(name) or name in HEAD_TENSORS:
            continue
        if key == "lm_head.weight":
            lm_head = (file, name, load)
            continue
        if key not in by_name:
            raise CheckpointError(
                f"{file}: unexpected tensor {name}; is this a GPT2LMHeadModel with n_layer={cfg.n_layer}?"
            )
        seen[key] = file
        flax_path, hf_shape, flax_shape = by_name[key]
        array = load()
        if tuple(array.shape) != hf_shape:
            raise CheckpointError(
                f"{file}: tensor {name} has shape {tuple(array.shape)}, config.json implies {hf_shape}"
            )
        _set(params, flax_path, np.asarray(array, dtype=dtype).reshape(flax_shape))
    missing = [n for n in by_name if n not in seen]
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} tensor(s) missing from the checkpoint, e.g. {missing[:3]}")
    if lm_head is not None:
        file, name, load = lm_head
        head = np.asarray(load(), dtype=dtype)
        if head.shape != params["wte"]["embedding"].shape or not np.array_equal(head, params["wte"]["embedding"]):
            raise CheckpointError(f"{file}: {name} differs from wte.weight; untied LM heads are not supported")
    return stack_layers(params, cfg.n_layer) if cfg.scan_layers else params



def load_pretrained(path: str, **config_overrides):
    """(GPT model, params) from an HF GPT2LMHeadModel directory (GPT-2, BioMedLM, or our exports).

    `config_overrides` set GPTConfig fields that do not change the weights' meaning, e.g.
    `dtype="bfloat16"`, `param_dtype`, `attention_impl`, `remat_policy`, `scan_layers`, dropout rates.
    Params are put on the default device; the trainer reshards them as its mesh requires.
    """
    cfg = load_config(path, **config_overrides)
    np_dtype = np.dtype(jnp.dtype(cfg.param_dtype))
    params = load_params_numpy(path, cfg, dtype=np_dtype)
    return GPT(cfg), jax.tree.map(jnp.asarray, params)



def load_tokenizer(path: str):
    """The tokenizer stored next to the weights (tokenizer.json, or vocab.json + merges.txt)."""
    return tokenizer_lib.load_tokenizer(path)



@dataclasses.dataclass
class ClassifierHead:
    """A fine-tuned classifier's head, in the Flax `Dense` layout of `mcqa.MCQAModel`'s `score`."""

    kind: str  # "choice" (one score per option, with bias) | "seqcls" (num_labels scores, no bias)
    kernel: np.ndarray  # (d_model, 1 or num_labels)
    bias: Optional[np.ndarray] = None  # (1,) for choice
    labels: Optional[tuple] = None  # seqcls label names in output order; None when config.json has only LABEL_i
    pad_token_id: Optional[int] = None

    def params(self) -> dict:
        """The head as `mcqa.MCQAModel`'s `score` params (a bias only on the choice head)."""
        return {"kernel": self.kernel, **({"bias": self.bias} if self.kind == "choice" else {})}



def _id2label(hf_config: dict, n: int, source: str) -> Optional[tuple]:
    id2label = hf_config.get("id2label")
    if not id2label:
        return None
    try:
        labels = tuple(str(id2label[str(i)] if str(i) in id2label else id2label[i]) for i in range(n))
    except KeyError as e:
        raise CheckpointError(f"{source}: id2label {id2label} does not name labels 0..{n - 1}") from e
    return None if all(re.fullmatch(r"LABEL_\d+", lab) for lab in labels) else labels



def read_classifier_head(path: str, cfg: GPTConfig, dtype=np.float32) -> Optional[ClassifierHead]:
    """The classifier head stored in an HF checkpoint directory, or None for a plain LM.

    Reads BioMedLM's fine-tuned layouts (`classifier.weight` [+ `classifier.bias`] from its
    GPT2ForMultipleChoice / GPT2ForSequenceClassification) and transformers'
    GPT2ForSequenceClassification (`score.weight`). The kind comes from `architectures` in config.json,
    else from the tensors (a one-row weight with a bias is a choice head)."""
    source = paths.join(path, CONFIG_NAME)
    hf_config = read_hf_config(path)
    found = {name: (file, load) for file, name, load in _read_tensors(path) if name in HEAD_TENSORS}
    arch = [HEAD_ARCHITECTURES[a] for a in hf_config.get("architectures") or [] if a in HEAD_ARCHITECTURES]
    if not found:
        if arch:
            raise CheckpointError(f"{path}: config.json names a {arch[0]} classifier but the weights hold no "
                                  "classifier.weight or score.weight")
        return None
    names = [n for n in ("classifier", "score") if f"{n}.weight" in found]
    if len(names) != 1:
        raise CheckpointError(f"{path}: expected one classifier weight (classifier.weight or score.weight), found "
                              f"{sorted(found)}")
    file, load = found[f"{names[0]}.weight"]
    weight = np.asarray(load(), dtype=dtype)
    bias = found.get(f"{names[0]}.bias")
    bias = None if bias is None else np.asarray(bias[1](), dtype=dtype)
    if weight.ndim != 2 or weight.shape[1] != cfg.d_model:
        raise CheckpointError(f"{file}: {names[0]}.weight has shape {weight.shape}, expected (labels, {cfg.d_model})")
    kind = arch[0] if arch else ("choice" if weight.shape[0] == 1 and bias is not None else "seqcls")
    if kind == "choice":
        if weight.shape[0] != 1:
            raise CheckpointError(f"{file}: a multiple-choice head scores each option once; {names[0]}.weight has "
                                  f"shape {weight.shape}, expected (1, {cfg.d_model})")
        bias = np.zeros((1,), dtype) if bias is None else bias.reshape(1)
        return ClassifierHead("choice", weight.T.copy(), bias, None, hf_config.get("pad_token_id"))
    if bias is not None and np.any(bias != 0):
        raise CheckpointError(f"{file}: the sequence-classification head has a {names[0]}.bias; BioMedLM's and "
                              "transformers' GPT2ForSequenceClassification heads have none")
    n = weight.shape[0]
    if hf_config.get("num_labels", n) != n and "id2label" not in hf_config:
        raise CheckpointError(f"{source}: num_labels={hf_config['num_labels']} but {names[0]}.weight has {n} rows")
    return ClassifierHead("seqcls", weight.T.copy(), None, _id2label(hf_config, n, source),
                          hf_config.get("pad_token_id"))



def classifier_to_hf(head: ClassifierHead, dtype=None) -> dict[str, np.ndarray]:
    """Head tensors as the exported checkpoint names them: BioMedLM's GPT2ForMultipleChoice
    (`classifier.weight`, `classifier.bias`) or transformers' GPT2ForSequenceClassification (`score.weight`)."""
    cast = (lambda a: np.ascontiguousarray(a if dtype is None else a.astype(dtype)))  # noqa: E731
    if head.kind == "choice":
        return {"classifier.weight": cast(np.asarray(head.kernel).T), "classifier.bias": cast(np.asarray(head.bias).reshape(1))}
    return {"score.weight": cast(np.asarray(head.kernel).T)}



def classifier_config(cfg: GPTConfig, head: ClassifierHead, torch_dtype: str = "float32") -> dict:
    out = config_to_hf(cfg, torch_dtype)
    out["pad_token_id"] = head.pad_token_id
    if head.kind == "choice":
        out["architectures"] = ["GPT2ForMultipleChoice"]  # BioMedLM's finetune/utils/custom_modeling_gpt2.py
        return out
    labels = head.labels or tuple(f"LABEL_{i}" for i in range(head.kernel.shape[1]))
    out.update(architectures=["GPT2ForSequenceClassification"], num_labels=len(labels),
               id2label={str(i): lab for i, lab in enumerate(labels)}, label2id={lab: i for i, lab in enumerate(labels)})
    return out



def _to_host(x) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))



def iter_hf(params, cfg: GPTConfig, dtype=None):
    """(HF tensor name, numpy array) for every tensor, one at a time (GPT2LMHeadModel names, tied head
    omitted): each is brought to the host and converted only when asked for, so a writer that streams
    holds one tensor beyond the params. A scanned model's layer i is sliced from its stacked weights."""
    params = nn.unbox(params)
    for hf_name, flax_path, hf_shape, flax_shape in layout(cfg):
        try:
            if cfg.scan_layers and flax_path[0].startswith("h_"):
                arr = _get(params["h"], flax_path[1:])[int(flax_path[0][2:])]
            else:
                arr = _get(params, flax_path)
        except KeyError as e:
            raise CheckpointError(f"params have no {'/'.join(flax_path)} (needed for {hf_name})") from e
        if tuple(arr.shape) != flax_shape:
            raise CheckpointError(f"param {'/'.join(flax_path)} has shape {arr.shape}, expected {flax_shape}")
        arr = _to_host(arr).reshape(hf_shape)
        if dtype is not None:
            arr = arr.astype(dtype, copy=False)
        yield "transformer." + hf_name, np.ascontiguousarray(arr)


def params_to_hf(params, cfg: GPTConfig, dtype=None) -> dict[str, np.ndarray]:
    """Flax params -> {HF tensor name: numpy array} (GPT2LMHeadModel names, tied head omitted)."""
    return dict(iter_hf(params, cfg, dtype))



def _parse_size(size) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)\s*", str(size).upper())
    if not m:
        raise ValueError(f"max_shard_size={size!r}: use bytes or a string like '5GB', '500MB'")
    return int(float(m.group(1)) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[m.group(2)])



def save_pretrained(
    model: GPT,
    params,
    out_dir: str,
    *,
    tokenizer=None,
    dtype: Optional[str] = None,
    max_shard_size="5GB",
    head: Optional[ClassifierHead] = None,
    special_tokens: Optional[dict] = None,
) -> None:
    """Write an HF GPT2LMHeadModel directory: config.json, safetensors (sharded above max_shard_size).

    dtype: storage dtype ("float32", "bfloat16", "float16"); default float32. A tokenizer
    (`tokenizers.Tokenizer`) is saved next to the weights when given, with `special_tokens` (e.g.
    {"pad_token": "[PAD]"}) in its tokenizer_config.json. With a classifier `head` (`params` then being
    the backbone's), the directory is that classifier instead (`classifier_config`, `classifier_to_hf`).
    Files are written to a temporary directory and moved into place (on an object store: uploaded,
    config.json last), so an interrupted save never
    leaves a mixed checkpoint, and weight files of the other layout (single vs sharded) left by an
    earlier save are removed.
    """
    cfg = model.config
    save_dtype = np.dtype(jnp.dtype(dtype or "float32"))
    if save_dtype not in (np.float32, np.float16, np.dtype(ml_dtypes.bfloat16)):
        raise ValueError(f"dtype={dtype!r}: choose float32, bfloat16 or float16")
    tensors = params_to_hf(params, cfg, save_dtype)
    if head is not None:
        tensors.update(classifier_to_hf(head, save_dtype))
    limit = _parse_size(max_shard_size)
    shards: list[dict] = [{}]
    size = 0
    for name, arr in tensors.items():
        if shards[-1] and size + arr.nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = arr
        size += arr.nbytes

    if jax.process_index() != 0:  # every process gathers (above); one writes.
        return
    if paths.is_remote(out_dir):  # written locally, then uploaded with config.json last
        with tempfile.TemporaryDirectory(prefix="biomedlm_jax-save-") as tmp:
            written = _write_files(tmp, shards, tensors, cfg, head, save_dtype, tokenizer, special_tokens)
            paths.upload(tmp, out_dir)
        existing = paths.listdir(out_dir)
    else:
        os.makedirs(out_dir, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out_dir, prefix=".tmp-save-") as tmp:
            written = _write_files(tmp, shards, tensors, cfg, head, save_dtype, tokenizer, special_tokens)
            for name in os.listdir(tmp):
                os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
        existing = os.listdir(out_dir)
    for name in existing:  # stale weights of the other layout would shadow the new ones
        stale = name == WEIGHTS_NAME or name == INDEX_NAME or re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", name)
        if stale and name not in written:
            paths.Path(paths.join(out_dir, name)).unlink()



def _write_files(tmp: str, shards: list, tensors: dict, cfg: GPTConfig, head, save_dtype, tokenizer,
                 special_tokens) -> list[str]:
    """Write the checkpoint's files into the local folder `tmp`; returns the weight/config names."""
    written = []
    if len(shards) == 1:
        save_file(shards[0], os.path.join(tmp, WEIGHTS_NAME), metadata={"format": "pt"})
        written.append(WEIGHTS_NAME)
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(tmp, fname), metadata={"format": "pt"})
            weight_map.update({n: fname for n in shard})
            written.append(fname)
        index = {"metadata": {"total_size": sum(a.nbytes for a in tensors.values())}, "weight_map": weight_map}
        with open(os.path.join(tmp, INDEX_NAME), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2)
        written.append(INDEX_NAME)
    torch_dtype = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16"}.get(save_dtype, "bfloat16")
    hf_config = config_to_hf(cfg, torch_dtype) if head is None else classifier_config(cfg, head, torch_dtype)
    with open(os.path.join(tmp, CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump(hf_config, f, indent=2)
    written.append(CONFIG_NAME)
    if tokenizer is not None:
        tokenizer_lib.save_tokenizer(tokenizer, tmp, model_max_length=cfg.n_positions, special_tokens=special_tokens)
    return written
