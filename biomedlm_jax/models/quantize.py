"""int8 weight-only quantization with Qwix (post-training, per output channel).

    qmodel, qparams = quantize.quantize(model, params, "int8")
    logits = qmodel.apply({"params": qparams}, ids)                 # as the float model, int8 weights
    generate.generate(qmodel, qparams, prompts, rng, cfg)           # decoding reads int8 weights

What is quantized: every projection kernel (attention qkv/out, MLP up/down, and a LoRA-merged or
task model's transformer the same way) is stored as int8 with one fp32 scale per output channel
(absmax calibration: scale = max |w| over the input axes / 127); activations stay in the model's
compute dtype (bf16 or fp32), and each matmul dequantizes its weight on the fly. Qwix's PTQ
provider intercepts the model's `dot_general`s (model.project), so the model code is unchanged: the
quantized model is `qwix.quantize_model(model, PtqProvider(rules))` and its params are
`qwix.quantize_params(float params, abstract quantized params)`, where each kernel becomes a
`WithAux(QArray(qvalue int8, scale))` that keeps the kernel's shape and logical axis names (so the
same sharding rules place it).

Not quantized: LayerNorm scales and biases, projection biases (a few KB), and the token and
position embeddings. The tied LM head is the token embedding; decoding multiplies every new token by
all of it, so `transposed_head` gives the decode loop an int8 copy (`quantized_head`), per vocabulary
row. Scoring (`GPT.__call__`, used by evaluate_lm / evaluate_mcqa / the harness's loglikelihood)
keeps the float embedding as its head, which is 30% of the weights of BioMedLM-2.7B and is read
once per forward pass over a whole sequence.

Quality and speed are measured by `bench_inference decode --quantize=int8` and
`evaluate_lm --quantize=int8` (docs/benchmarks.md).
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

MODES = ("int8",)
HEAD_KEY = "lm_head_int8"  # qparams[HEAD_KEY]: the int8 tied head for decoding (model.transposed_head)

# The methods of GPT that generation and scoring call (`method="decode"` etc.): Qwix intercepts
# the ops of exactly these.
_METHODS = ("__call__", "decode", "hidden_states", "logits")


def check_mode(mode: Optional[str], flag: str = "--quantize") -> Optional[str]:
    """The mode, or None for "" / "none"; ValueError naming the flag otherwise."""
    if mode in (None, "", "none"):
        return None
    if mode not in MODES:
        raise ValueError(f"{flag}={mode!r}: choose from {', '.join(MODES)} (or none)")
    return mode


def _rules(mode: str):
    import qwix

    # Every dot_general whose rhs is a parameter: per-output-channel int8 weights. act_qtype stays
    # None, so activations are not quantized (weight-only). An MCQA classifier's score head (a few
    # thousand weights that decide the answer) stays float.
    return [qwix.QuantizationRule(module_path=r"(?!score).*", weight_qtype=jnp.int8)]


def quantize_model(model, mode: str = "int8"):
    """The Qwix PTQ wrapper of a flax.linen model (GPT or mcqa's heads): same methods, int8 weights."""
    import qwix

    check_mode(mode)
    methods = tuple(m for m in _METHODS if hasattr(model, m))
    return qwix.quantize_model(model, qwix.PtqProvider(_rules(mode)), methods=methods)


def quantize_params(qmodel, params, example_args=None):
    """Float params -> params of `qmodel` (`quantize_model(model)`): int8 kernels, the rest as given.
    example_args: inputs to trace `qmodel.init` with (default: one (1, 8) row of token ids)."""
    import qwix

    args = (jnp.zeros((1, 8), jnp.int32),) if example_args is None else example_args
    abstract = jax.eval_shape(lambda: qmodel.init(jax.random.PRNGKey(0), *args))["params"]
    # The abstract tree (no memory) says how to quantize each kernel; the float tree supplies values.
    return qwix.quantize_params(params, abstract)


def quantize(model, params, mode: Optional[str] = "int8"):
    """(qmodel, qparams) for a GPT and its float params; (model, params) when mode is None/"none".

    qmodel is a subclass of the model's class (Qwix's wrapper), so `.config` and jit-static use are
    as before; a scan_layers model comes back unscanned (its config says so). qparams holds the int8 kernels and, under `HEAD_KEY`, the int8 tied head that
    `model.transposed_head` hands to the decode loop."""
    if check_mode(mode) is None:
        return model, params
    if model.config.scan_layers:
        # Qwix picks a kernel's scale axes per layer, so a stacked (n_layer, ...) kernel would share
        # scales across layers: quantize the unstacked model (one block per layer, same math).
        from biomedlm_jax.models import gpt

        params = gpt.unstack_layers(params, model.config.n_layer)
        model = type(model)(model.config.replace(scan_layers=False))
    qmodel = quantize_model(model, mode)
    qparams = dict(quantize_params(qmodel, params), **{HEAD_KEY: quantized_head(params["wte"]["embedding"])})
    return qmodel, qparams


def quantize_classifier(clf, mode: Optional[str] = "int8"):
    """An mcqa.Classifier with an int8 backbone (its score head float); unchanged for mode none."""
    import dataclasses

    if check_mode(mode) is None:
        return clf
    model, params = clf.model, clf.params
    if model.config.scan_layers:  # as in `quantize`: per-layer scales need the unstacked layers
        from biomedlm_jax.models import gpt

        params = dict(params, transformer=gpt.unstack_layers(params["transformer"], model.config.n_layer))
        model = model.clone(config=model.config.replace(scan_layers=False))
    qmodel = quantize_model(model, mode)
    ids = jnp.zeros((1, 1, 8), jnp.int32)
    return dataclasses.replace(clf, model=qmodel, params=quantize_params(qmodel, params, (ids, ids > -1)))


def quantized_head(wte):
    """The tied head wte.T as an int8 (C, V) Qwix QArray with one fp32 scale per vocabulary column."""
    import qwix

    return qwix.quantize(jnp.asarray(wte).T.astype(jnp.float32), jnp.int8, channelwise_axes=(1,),
                         scale_dtype=jnp.float32)


def is_quantized(params) -> bool:
    """Whether a param tree holds Qwix-quantized kernels."""
    from qwix._src.providers.ptq import WithAux

    return any(isinstance(x, WithAux) for x in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, WithAux)))


def decode_read_params(params):
    """What one decode step reads of a quantized param tree, for `bench_inference.decode_roofline`: everything
    but the float token embedding, of which a step gathers one row per sequence (its head is the
    int8 copy under HEAD_KEY). A float tree is returned as it is (its embedding is the head)."""
    if HEAD_KEY not in params:
        return params
    return {k: v for k, v in params.items() if k != "wte"}


def weight_bytes(params) -> int:
    return int(sum(np.dtype(x.dtype).itemsize * x.size for x in jax.tree.leaves(params)))


