"""JAX checkpoints in EleutherAI's lm-evaluation-harness: the `biomedlm_jax` model backend.

    import lm_eval, biomedlm_jax.evaluation.harness  # registers "biomedlm_jax"
    lm_eval.simple_evaluate(model="biomedlm_jax", model_args="init_from=hf:/path/to/BioMedLM,dtype=bfloat16",
                            tasks=["pubmedqa_local"], task_manager=lm_eval.tasks.TaskManager(include_path=TASKS_DIR))

or `python -m biomedlm_jax.lm_eval --init_from=... --tasks=...` (biomedlm_jax/lm_eval.py).

Parity with the harness's `hf` backend is the point, so every step that decides a number follows it:

  * tokenization is the harness's own `TemplateLM` (the context/continuation split, trailing spaces
    moved to the continuation, the prefix token for an empty context), on the checkpoint's tokenizer
    (GPT-2 family: no BOS added, the prefix token is `<|endoftext|>`, as `tokenizer.bos_token`);
  * `loglikelihood`: the input is `(context + continuation)[-(max_length + 1):][:-1]`, scored in fp32
    log-softmax, `is_greedy` when the argmax equals every continuation token;
  * `loglikelihood_rolling`: the harness's `get_rolling_token_windows` / `make_disjoint_window` with
    the prefix token and `max_length`, window sums added up;
  * `generate_until`: the harness's gen-kwargs normalisation and stop handling, contexts cut from
    the left to `max_length - max_gen_toks`, greedy (or sampled with `do_sample`/`temperature`/`top_k`/
    `top_p`, one key per request) on the continuous-batching engine (inference/engine.py, `batch_size` slots):
    EOS or a stop string frees a request's slot for the next one, special tokens are dropped when
    decoding, the text is cut at the first stop string.

`quantize=int8` scores and generates with Qwix int8 weights (models/quantize.py).

Scoring requests are sorted by length and run in batches of `batch_size` rows padded to a multiple
of `bucket` tokens, so a task compiles a handful of shapes, not one per request. Batches are split over
all local devices (data parallel). `mesh_shape="1,-1,1"` (data, fsdp, tensor) shards the weights as
the trainer does, for models that do not fit one device.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    handle_stop_sequences,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from tqdm import tqdm

from biomedlm_jax.data import tokenizer as tokenizer_lib
from biomedlm_jax.formats import checkpoint, loading, sources
from biomedlm_jax.inference import engine, generate
from biomedlm_jax.models import sharding

TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lm_eval_tasks")
_TRACES = {"loglikelihood": 0}  # bumped each time the scoring function is traced (tests bound compiles)


def _tokenizer_config(init_from: str) -> dict:
    src = sources.parse(init_from)
    folder = src.path if src.kind == "hf" else checkpoint.tokenizer_dir(src.path)
    f = os.path.join(folder, "tokenizer_config.json")
    if not os.path.exists(f):
        return {}
    with open(f, encoding="utf-8") as fh:
        cfg = json.load(fh)
    return cfg if isinstance(cfg, dict) else {}


def _token_name(value) -> Optional[str]:
    return value.get("content") if isinstance(value, dict) else value


def _clean_up_tokenization(text: str) -> str:
    """transformers' `clean_up_tokenization` (used only when the tokenizer config asks for it)."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
                 (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


@register_model("biomedlm_jax")
class JaxLM(TemplateLM):
    """The harness's `LM` interface on a biomedlm_jax model (`hf:DIR` or `orbax:WORKDIR`)."""

    backend = "causal"

    def __init__(self, init_from: str, dtype: str = "float32", batch_size=16, max_batch_size=None,
                 max_length: Optional[int] = None, max_gen_toks: int = 256, bucket: int = 64,
                 mesh_shape: Optional[str] = None, seed: int = 0, quantize: str = "none", **kwargs):
        from biomedlm_jax.models import quantize as quant_lib

        super().__init__()
        quant_lib.check_mode(quantize, "quantize")
        self.model, self.params, self.tok = loading.load_for_inference(init_from, None if dtype == "float32" else dtype)
        cfg = _tokenizer_config(init_from)
        eos = _token_name(cfg.get("eos_token")) or tokenizer_lib.EOS_TOKEN
        bos = _token_name(cfg.get("bos_token")) or eos
        self._eot = self.tok.token_to_id(eos)
        self._prefix = self.tok.token_to_id(bos) if self.tok.token_to_id(bos) is not None else self._eot
        if self._eot is None:
            raise ValueError(f"{init_from}: the tokenizer has no {eos!r} token")
        self._clean_up = bool(cfg.get("clean_up_tokenization_spaces", False))
        self._max_length = int(max_length) if max_length else self.model.config.n_positions
        self._max_gen_toks = int(max_gen_toks)
        self.bucket = int(bucket)
        self.seed = int(seed)
        self.init_from = init_from
        # "1,-1,1" in Python, "1 -1 1" inside a harness model_args string (which splits on commas)
        shape = sharding.parse_mesh_shape(mesh_shape) if mesh_shape else (-1, 1, 1)
        self.mesh = sharding.make_mesh(shape, devices=jax.local_devices())
        ways = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        bs = 16 if batch_size in (None, "auto") or str(batch_size).startswith("auto") else int(batch_size)
        self._batch_size = -(-bs // ways) * ways  # a multiple of the batch shards
        self.params = self._place(self.params)
        if quant_lib.check_mode(quantize, "quantize"):  # int8 copies of the placed kernels keep their shardings
            self.model, self.params = quant_lib.quantize(self.model, self.params, quantize)
            self._param_shardings = jax.tree.map(lambda x: x.sharding, self.params)
        self._rows = NamedSharding(self.mesh, P(("data", "fsdp")))
        self._ll = jax.jit(self._ll_sums, out_shardings=NamedSharding(self.mesh, P()),
                           in_shardings=(self._param_shardings,) + (self._rows,) * 5)

    # --- placement ----------------------------------------------------------------------------------

    def _place(self, params):
        """Weights on the mesh: sharded by the model's logical axis names (the trainer's rules)."""
        placed, self._param_shardings = sharding.place_params(self.model, params, self.mesh)
        return placed

    # --- the harness's properties -------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self._eot

    @property
    def prefix_token_id(self) -> int:
        return self._prefix

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return self.init_from.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, left_truncate_len=None, **kwargs):
        ids = self.tok.encode(string).ids  # GPT-2 family: no special tokens are added either way
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        text = self.tok.decode(list(tokens), skip_special_tokens=skip_special_tokens)
        return _clean_up_tokenization(text) if self._clean_up else text

    # --- scoring ------------------------------------------------------------------------------------

    def _ll_sums(self, params, ids, starts, targets, weights, last):
        """Scores of the continuation positions only: the tied head runs on `C = targets.shape[1]`
        positions per row (from `starts`), not on all T. Per row: the summed log-probs and greedy flags
        of the weighted positions before `last`, and the full log-softmax and argmax at `last` (the final
        continuation position), so requests that differ only in their last token share a row (e.g.
        one-token answers to one question)."""
        _TRACES["loglikelihood"] += 1
        hidden = self.model.apply({"params": params}, ids, method="hidden_states")
        pos = jnp.minimum(starts[:, None] + jnp.arange(targets.shape[1])[None], ids.shape[1] - 1)
        hidden = jnp.take_along_axis(hidden, pos[..., None], axis=1)
        logits = self.model.apply({"params": params}, hidden, method="logits").astype(jnp.float32)  # (B, C, V)
        logz = jax.nn.logsumexp(logits, axis=-1)
        tok_lp = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0] - logz
        greedy = jnp.all((jnp.argmax(logits, axis=-1) == targets) | (weights == 0), axis=-1)
        at_last = jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0]  # (B, V)
        return ((tok_lp * weights).sum(-1), greedy, at_last - jnp.take_along_axis(logz, last[:, None], axis=1),
                jnp.argmax(at_last, axis=-1))

    def _padded_len(self, n: int) -> int:
        return min(-(-n // self.bucket) * self.bucket, self.max_length)  # rows never exceed max_length

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        groups: dict = {}  # (input row, continuation length) -> request indices; they differ in the last target
        for n, (_, context_enc, continuation_enc) in enumerate(requests):
            if not context_enc or not continuation_enc or len(continuation_enc) > self.max_length:
                raise ValueError(f"cannot score a request with {len(context_enc)} context and {len(continuation_enc)} "
                                 f"continuation tokens (max_length {self.max_length})")
            full = (context_enc + continuation_enc)[-(self.max_length + 1):]
            groups.setdefault((tuple(full[:-1]), len(continuation_enc)), []).append(n)
        rows = sorted(groups, key=lambda k: (-len(k[0]), -k[1]))
        out: list = [None] * len(requests)
        B = self.batch_size
        for start in tqdm(range(0, len(rows), B), disable=disable_tqdm, desc="biomedlm_jax loglikelihood"):
            chunk = rows[start: start + B]
            T = self._padded_len(max(len(inp) for inp, _ in chunk))
            C = min(T, -(-max(c for _, c in chunk) // 16) * 16)  # continuation positions, in steps of 16
            ids = np.zeros((B, T), np.int32)
            starts = np.zeros((B,), np.int32)
            tgt = np.zeros((B, C), np.int32)
            w = np.zeros((B, C), np.float32)
            last = np.zeros((B,), np.int32)
            for r, (inp, contlen) in enumerate(chunk):
                ids[r, : len(inp)] = inp
                starts[r] = len(inp) - contlen  # positions start .. len(inp) - 1 predict the continuation
                tgt[r, : contlen - 1] = inp[starts[r] + 1:]  # before the last, the row's own next tokens
                w[r, : contlen - 1] = 1.0
                last[r] = contlen - 1
            with jax.set_mesh(self.mesh):
                sums, greedy, logp_last, argmax_last = jax.device_get(self._ll(self.params, ids, starts, tgt, w, last))
            for r, key in enumerate(chunk):
                for n in groups[key]:
                    final = requests[n][2][-1]
                    out[n] = (float(sums[r] + logp_last[r, final]), bool(greedy[r] and argmax_last[r] == final))
                    if requests[n][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[n][0], out[n])
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for n, (string,) in enumerate(req.args for req in requests):
            for w in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None,) + w)
                owner.append(n)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for n, (lp, _) in zip(owner, scores):
            totals[n] += lp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # --- generation ---------------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups: dict = {}
        for n, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(n)
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        out: list = [None] * len(requests)
        pbar = tqdm(total=len(requests), disable=disable_tqdm, desc="biomedlm_jax generate_until")
        for members in groups.values():
            kwargs = normalize_gen_kwargs(dict(requests[members[0]].args[1]), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen = int(kwargs.pop("max_gen_toks"))
            max_ctx = self.max_length - max_gen
            if max_ctx <= 0:
                raise ValueError(f"max_gen_toks={max_gen} leaves no room for a context in max_length={self.max_length}")
            sample = bool(kwargs.get("do_sample")) and float(kwargs.get("temperature", 1.0) or 0.0) > 0
            cfg = generate.SamplingConfig(
                max_new_tokens=max_gen, temperature=float(kwargs.get("temperature", 1.0)) if sample else 0.0,
                top_k=int(kwargs.get("top_k") or 0) if sample else 0, top_p=float(kwargs.get("top_p") or 1.0) if sample else 1.0,
                eos_id=self.eot_token_id, pad_id=self.eot_token_id)
            contexts = {n: self.tok_encode(requests[n].args[0], left_truncate_len=max_ctx) or [self.prefix_token_id]
                        for n in members}
            longest = max(len(c) for c in contexts.values())
            eng = engine.Engine(self.model, self.params, cfg, slots=self.batch_size, max_prompt_len=longest,
                                bucket=self.bucket, detokenize=self.tok_decode, mesh=self.mesh)
            key = jax.random.PRNGKey(self.seed)
            reqs = [engine.Request(contexts[n], stop=tuple(until), key=jax.random.fold_in(key, n)) for n in members]

            def done(i, toks, members=members, until=until):
                n = members[i]
                if toks and toks[-1] == self.eot_token_id:
                    toks = toks[:-1]
                text = postprocess_generated_text(generation=self.tok_decode(toks), stop=until, think_end_token=None)
                out[n] = text
                self.cache_hook.add_partial("generate_until", requests[n].args, text)
                pbar.update(1)

            with jax.set_mesh(self.mesh):
                eng.run(reqs, key, on_done=done)
        pbar.close()
        return out
