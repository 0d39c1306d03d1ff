"""A slot-based decode engine (continuous batching): a finished sequence's slot takes the next request
at once, so a batch of mixed-length answers no longer waits for its longest one.

The API follows JetStream's engine (prefill -> insert -> generate, repeated):

    eng = Engine(model, params, SamplingConfig(max_new_tokens=256, temperature=0.0, eos_id=eos), slots=16)
    outs = eng.run([Request(ids) for ids in prompts])           # token ids per request, in order

    # requests that arrive over time (the HTTP server): scheduler.Scheduler(eng), one sync at a time

    eng.warm_up()                                               # compile every program a request may need

    # or driving it by hand:
    state = eng.init_state()
    prefix = eng.prefill([ids])                                 # prompts -> their KV cache + first logits
    state = eng.insert(prefix, state, slot=3, prompt=ids)       # into a free slot of the decode batch
    state, toks, emitted, logprobs = eng.generate(state)        # `steps_per_sync` steps for every slot

How it works:
  * the decode state holds one KV cache row per slot, `cache_len` columns long, used as a ring: step t
    writes every slot's new key/value at column t mod cache_len (one in-place update for the batch, as
    in `generate.py`); `insert` writes a prompt's prefilled keys/values into the columns just before t.
    A slot's columns are not in token order, which attention does not need: GPT-2's learned positions
    are added to the input, so each key carries its own position, and a per-slot mask (`GPT.decode`'s
    (B, 1, S) form) says which columns are the slot's tokens. A slot never overwrites its own columns
    while its prompt bucket + its token budget <= cache_len (`check` refuses a request that would);
  * the shapes are fixed per engine: the cache and history lengths by its sizes, prompts by buckets of
    `bucket` tokens, prefill batches by powers of two up to `slots`, and `insert` takes one prefilled
    row. A run therefore compiles at most (buckets x log2(slots)+1) prefills, one insert per bucket and
    one decode step (two when some requests want log-probabilities), however requests arrive
    (`compiled_programs` counts them);
  * every slot carries its position, token budget, generated count, sampling settings (temperature,
    top-k, top-p: per request) and PRNG key (typed, of any jax PRNG implementation): sampling a
    request's n-th token uses fold_in(request key, n), so with threefry keys (jax's default) sampled
    outputs do not depend on which slot or batch neighbours a request gets, and greedy outputs equal
    `generate.generate`'s (tested). rbg's bits under vmap depend on the batch size, so with rbg keys a
    sample repeats for the same slots and arrivals only;
  * `generate` runs up to `steps_per_sync` steps on the device (a while_loop that stops early when no
    slot is active) before the host frees finished slots (EOS, budget, or a stop string, checked on the
    host) and refills them. More steps per sync means fewer host round trips and more idle slot-steps;
  * `no_repeat_ngram_size` bans per slot over the slot's own prompt + output (its token history);
  * with `logprobs=k` each step also returns the chosen token's log-probability under the model (the
    raw logits' log-softmax, before temperature or filters) and the k most likely tokens'.

Outputs are the same as `generate.generate` gives each prompt alone: EOS included when produced,
nothing after it.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from biomedlm_jax.inference import scheduler as scheduler_lib
from biomedlm_jax.inference.sampling import (
    NEG_INF,
    SamplingConfig,
    ban_repeated_ngrams,
    greedy,
    left_pad,
    positions_from_mask,
)
from biomedlm_jax.models.gpt import GPT, init_cache, transposed_head


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where the decode state lives on a mesh: slots split over the mesh's data axes ("data", "fsdp"),
    everything else replicated. Every program that returns the state pins it here, so the state a
    program donates comes back with the same shardings and its buffers are reused. (The cache's first
    axis is slots x heads, slot-major, so a data shard holds whole slots with all their heads; heads
    are not split over "tensor".)"""

    mesh: jax.sharding.Mesh
    data_axes: tuple = ("data", "fsdp")
    seq_major: bool = False  # the model's cache layout (GPTConfig.kv_seq_major)

    @property
    def ways(self) -> int:
        return int(np.prod([self.mesh.shape[a] for a in self.data_axes]))

    def shardings(self, state: dict) -> dict:
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        def spec(name, x):
            if name == "cache":  # (B*H, S, hd) or (S, B*H, hd); a leading L with scan_layers
                rows = x.ndim - (2 if self.seq_major else 3)  # the slots x heads axis
                return P(*([None] * rows), self.data_axes, *([None] * (x.ndim - rows - 1)))
            return P(self.data_axes, *([None] * (x.ndim - 1))) if x.ndim else P()

        return {k: jax.tree.map(lambda x, k=k: NamedSharding(self.mesh, spec(k, x)), v) for k, v in state.items()}

    def pin(self, state: dict) -> dict:
        return jax.lax.with_sharding_constraint(state, self.shardings(state))


def _pin(state, placement: Optional[Placement]):
    return state if placement is None else placement.pin(state)


@dataclasses.dataclass
class Request:
    """One generation request. max_new_tokens: this request's budget (default: the engine's, at most
    that); stop: strings that end the request when its decoded output contains one (needs the engine's
    `detokenize`); key: PRNG key for sampling, typed or raw (default: fold_in(run's key, request
    index)); temperature / top_k / top_p: this request's sampling (default: the engine's config);
    logprobs: whether its tokens' log-probabilities are wanted (with an engine built with `logprobs`;
    the decode step computes them only while some active request wants them)."""

    prompt: Sequence[int]
    max_new_tokens: Optional[int] = None
    stop: Sequence[str] = ()
    key: Optional[jax.Array] = None
    temperature: Optional[float] = None
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    logprobs: bool = False


@dataclasses.dataclass(frozen=True)
class Prefix:
    """Prefilled prompts (a batch of n, left-padded to one bucket length P): one KV cache per row,
    masks and the first token's logits. `insert` takes one row of it."""

    rows: list  # per row: a cache as init_cache(cfg, 1, P)
    mask: np.ndarray  # (n, P) True for real tokens (left padding False), on the host
    logits: jax.Array  # (n, V) fp32
    row_logits: list  # per row: its (V,) first-token logits (no gather to compile per batch shape)
    lengths: tuple  # real prompt tokens per row


def _sample(logits, keys, n_gen, temperature, top_k, top_p):
    """One token per slot: greedy where the slot's temperature is 0, else a sample with its own
    temperature, top-k (0 = off) and top-p (1 = off), keyed by its key folded with its generated count.
    Slots that all decode greedily never pay for a sort."""
    greedy_tok = greedy(logits)

    def sampled(_):
        lg = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]

        def filtered(lg):
            V = lg.shape[-1]
            desc = -jnp.sort(-lg, axis=-1)
            kth = jnp.take_along_axis(desc, jnp.clip(top_k - 1, 0, V - 1)[:, None], axis=-1)
            kth = jnp.where(((top_k > 0) & (top_k < V))[:, None], kth, -jnp.inf)
            desc = jnp.where(desc < kth, NEG_INF, desc)
            probs = jax.nn.softmax(desc, axis=-1)
            keep = ((jnp.cumsum(probs, axis=-1) - probs) < top_p[:, None]) | (top_p >= 1.0)[:, None]
            cut = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)  # the least likely kept
            return jnp.where(lg < jnp.maximum(cut, kth), NEG_INF, lg)

        lg = jax.lax.cond(((top_k > 0) | (top_p < 1.0)).any(), filtered, lambda x: x, lg)
        step_keys = jax.vmap(jax.random.fold_in)(keys, n_gen)
        tok = jax.vmap(lambda lg, key: jax.random.categorical(key, lg[None], axis=-1)[0])(lg, step_keys)
        return jnp.where(temperature > 0, tok.astype(jnp.int32), greedy_tok)

    return jax.lax.cond((temperature > 0).any(), sampled, lambda _: greedy_tok, None)


def _ban_per_slot(logits, history, hist_len, n: int):
    """`ban_repeated_ngrams` with each slot's own history length."""
    S = history.shape[1]

    def one(lg, toks, length):
        valid = jnp.arange(S) < length
        return ban_repeated_ngrams(lg[None], toks[None], valid[None], length, n)[0]

    return jax.vmap(one)(logits, history, hist_len)


def _decode_steps(model: GPT, params, head, state, cfg: SamplingConfig, n_steps: int, logprobs: Optional[int] = None,
                  placement: Optional[Placement] = None):
    """Up to n_steps decode steps for every slot; stops early when no slot is active.

    Returns (state, tokens (n_steps, B), emitted (n_steps, B), lp): emitted marks the tokens produced
    by slots active at that step; lp is {} or, with logprobs=k, {"token": (n_steps, B), "top_ids" and
    "top": (n_steps, B, k)} log-probabilities."""
    B, S = state["kv_mask"].shape
    eos = -1 if cfg.eos_id is None else cfg.eos_id
    rows = jnp.arange(B)

    def cond(carry):
        i, st, _, _, _ = carry
        return (i < n_steps) & st["active"].any()

    def body(carry):
        i, st, toks, emitted, lp = carry
        active = st["active"]
        logits = st["logits"]
        if cfg.no_repeat_ngram_size:
            logits = _ban_per_slot(logits, st["history"], st["hist_len"], cfg.no_repeat_ngram_size)
        tok = _sample(logits, st["keys"], st["n_gen"], st["temperature"], st["top_k"], st["top_p"])
        tok = jnp.where(active, tok, cfg.pad_id)
        if logprobs is not None:
            lsm = jax.nn.log_softmax(st["logits"], axis=-1)
            new = {"token": jnp.take_along_axis(lsm, tok[:, None], axis=-1)[:, 0]}
            if logprobs:
                new["top"], new["top_ids"] = jax.lax.top_k(lsm, logprobs)
            lp = {k: jax.lax.dynamic_update_index_in_dim(lp[k], new[k], i, 0) for k in lp}
        col = st["t"] % S
        kv_mask = jax.lax.dynamic_update_slice_in_dim(st["kv_mask"], active[:, None], col, axis=1)
        H = st["history"].shape[1]
        history = st["history"].at[rows, jnp.minimum(st["hist_len"], H - 1)].set(
            jnp.where(active, tok, st["history"][rows, jnp.minimum(st["hist_len"], H - 1)]))
        n_gen = st["n_gen"] + active
        finished = active & ((tok == eos) | (n_gen >= st["budget"]))
        logits, cache = model.apply({"params": params}, tok[:, None], kv_mask[:, None, :], st["pos"][:, None],
                                    st["cache"], col, head, method="decode")
        new_st = dict(st, cache=cache, kv_mask=kv_mask, logits=logits[:, 0], history=history,
                      hist_len=st["hist_len"] + active, pos=st["pos"] + active, n_gen=n_gen,
                      active=active & ~finished, t=st["t"] + 1)
        toks = jax.lax.dynamic_update_index_in_dim(toks, tok, i, 0)
        emitted = jax.lax.dynamic_update_index_in_dim(emitted, active, i, 0)
        return i + 1, _pin(new_st, placement), toks, emitted, lp

    toks = jnp.full((n_steps, B), cfg.pad_id, jnp.int32)
    emitted = jnp.zeros((n_steps, B), bool)
    lp = {}
    if logprobs is not None:
        lp = {"token": jnp.zeros((n_steps, B), jnp.float32)}
        if logprobs:
            lp.update(top=jnp.zeros((n_steps, B, logprobs), jnp.float32),
                      top_ids=jnp.zeros((n_steps, B, logprobs), jnp.int32))
    _, state, toks, emitted, lp = jax.lax.while_loop(cond, body, (jnp.int32(0), _pin(state, placement), toks,
                                                                  emitted, lp))
    return _pin(state, placement), toks, emitted, lp


# Module-level jits with the model and sampling config static: every Engine on the same model shares
# their compiled programs (the lm-eval backend builds one per generation-kwargs group).
generate_steps = jax.jit(_decode_steps, static_argnames=("model", "cfg", "n_steps", "logprobs", "placement"),
                         donate_argnames=("state",))
_free_slot = jax.jit(lambda state, slot, placement=None: _pin(dict(state, active=state["active"].at[slot].set(False)),
                                                             placement),
                     donate_argnums=(0,), static_argnames=("placement",))
_head = jax.jit(transposed_head, static_argnums=1)


@functools.partial(jax.jit, static_argnames=("model",))
def _prefill(model: GPT, params, ids, mask):
    """Left-padded prompts (n, P) through the model: (last logits (n, V), the same per row, one (H, P, hd)
    cache per row, (P, H, hd) with the model's kv_seq_major)."""
    n, H = ids.shape[0], model.config.n_head
    cache = init_cache(model.config, n, ids.shape[1])
    logits, cache = model.apply({"params": params}, ids, mask, positions_from_mask(mask), cache, 0, method="decode")
    # cache leaves are (n * H, P, hd), or (L, n * H, P, hd) with scan_layers: split them by row here, so
    # that `_insert` takes one row and compiles once per bucket, not once per (batch, bucket)
    axis = -2 if model.config.kv_seq_major else -3  # the rows x heads axis
    rows = [jax.tree.map(lambda c, i=i: jax.lax.slice_in_dim(c, i * H, (i + 1) * H, axis=c.ndim + axis), cache)
            for i in range(n)]
    return logits[:, -1], [logits[i, -1] for i in range(n)], rows


@functools.partial(jax.jit, donate_argnums=(0,), static_argnames=("placement", "seq_major"))
def _insert(state, row_cache, row_mask, row_logits, prompt_row, length, budget, key, temperature, top_k, top_p, slot,
            placement: Optional[Placement] = None, seq_major: bool = False):
    """Write one prefilled row into `slot`: its P cache columns end just before column t (mod S)."""
    B, S = state["kv_mask"].shape
    P = row_mask.shape[0]
    shift = (state["t"] - P) % S

    seq = 0 if seq_major else 1  # the sequence axis of one layer's cache

    def place(buf, block):  # buf (B*H, S, hd), block (H, P, hd); or (S, B*H, hd) and (P, H, hd) seq-major
        H = block.shape[1 - seq]
        full = jnp.zeros((S, H, buf.shape[2]) if seq == 0 else (H, S, buf.shape[2]), buf.dtype)
        full = jax.lax.dynamic_update_slice_in_dim(full, block.astype(buf.dtype), 0, axis=seq)
        return jax.lax.dynamic_update_slice_in_dim(buf, jnp.roll(full, shift, axis=seq), slot * H, axis=1 - seq)

    if isinstance(state["cache"], dict):  # scan_layers: (L, ...) stacked
        cache = {n: jax.vmap(place)(state["cache"][n], row_cache[n]) for n in ("k", "v")}
    else:
        cache = [{n: place(c[n], p[n]) for n in ("k", "v")} for c, p in zip(state["cache"], row_cache)]
    mask_row = jnp.roll(jnp.zeros((S,), bool).at[:P].set(row_mask), shift)
    return _pin(dict(
        state, cache=cache,
        kv_mask=jax.lax.dynamic_update_index_in_dim(state["kv_mask"], mask_row, slot, 0),
        logits=jax.lax.dynamic_update_index_in_dim(state["logits"], row_logits, slot, 0),
        history=jax.lax.dynamic_update_index_in_dim(state["history"], prompt_row, slot, 0),
        hist_len=state["hist_len"].at[slot].set(length),
        pos=state["pos"].at[slot].set(length),
        n_gen=state["n_gen"].at[slot].set(0),
        budget=state["budget"].at[slot].set(budget),
        keys=state["keys"].at[slot].set(key),
        temperature=state["temperature"].at[slot].set(temperature),
        top_k=state["top_k"].at[slot].set(top_k),
        top_p=state["top_p"].at[slot].set(top_p),
        active=state["active"].at[slot].set(budget > 0),
    ), placement)


def compiled_programs() -> dict:
    """How many programs the engine's jitted functions have compiled in this process, by function."""
    return {"prefill": _prefill._cache_size(), "insert": _insert._cache_size(),
            "generate": generate_steps._cache_size(), "free": _free_slot._cache_size()}


def sizes(n_positions: int, max_new_tokens: int, max_prompt_len: Optional[int], bucket: int,
          max_len: Optional[int] = None) -> tuple[int, int]:
    """(max_prompt_len, cache_len) of an engine (a slot's token history is cache_len long too).

    Without max_len: the longest prompt it takes (default: all positions the answer budget leaves) and
    a cache of the prompt bucket-rounded + the budget. With max_len (the most tokens one request holds,
    prompt + answer, as a server sizes it): prompts up to max_len and a cache of max_len + bucket - 1,
    which holds any prompt bucket + budget whose prompt + budget <= max_len."""
    if max_len is not None:
        if not 1 <= max_len <= n_positions:
            raise ValueError(f"max_len={max_len} must be in [1, n_positions={n_positions}]")
        return max_len, max_len + bucket - 1
    max_prompt_len = max_prompt_len or max(1, n_positions - max_new_tokens)
    if max_prompt_len + max_new_tokens > n_positions:
        raise ValueError(f"max_prompt_len={max_prompt_len} + max_new_tokens={max_new_tokens} exceeds "
                         f"n_positions={n_positions}")
    return max_prompt_len, -(-max_prompt_len // bucket) * bucket + max_new_tokens


def _key_impl(impl):
    """A PRNG implementation (None: jax's default) as jax.random.key takes it."""
    return jax.random.key_impl(jax.random.key(0, impl=impl))


def empty_state(cfg, slots: int, cache_len: int, prng_impl=None) -> dict:
    """A decode state with every slot free: one KV cache row of `cache_len` columns per slot, and a
    token history (prompt + output, for n-gram bans) as long."""
    B, S = slots, cache_len
    return {
        "cache": init_cache(cfg, B, S),
        "kv_mask": jnp.zeros((B, S), bool),
        "logits": jnp.zeros((B, cfg.vocab_size), jnp.float32),
        "history": jnp.zeros((B, S), jnp.int32),
        "hist_len": jnp.zeros((B,), jnp.int32),
        "pos": jnp.zeros((B,), jnp.int32),
        "n_gen": jnp.zeros((B,), jnp.int32),
        "budget": jnp.zeros((B,), jnp.int32),
        "keys": jax.random.split(jax.random.key(0, impl=prng_impl), B),
        "temperature": jnp.zeros((B,), jnp.float32),
        "top_k": jnp.zeros((B,), jnp.int32),
        "top_p": jnp.ones((B,), jnp.float32),
        "active": jnp.zeros((B,), bool),
        "t": jnp.int32(0),
    }


def state_shapes(model: GPT, params, cfg: SamplingConfig, *, slots: int, max_prompt_len: Optional[int] = None,
                 bucket: int = 64, max_len: Optional[int] = None) -> dict:
    """What an Engine would hold, as shapes only (params may be abstract): {"state", "head",
    "cache_len"}; with `generate_steps` this is the decode step to lower for another device."""
    _, cache_len = sizes(model.config.n_positions, cfg.max_new_tokens, max_prompt_len, bucket, max_len)
    return {"state": jax.eval_shape(lambda: empty_state(model.config, slots, cache_len)),
            "head": jax.eval_shape(lambda p: transposed_head(p, model.config), params), "cache_len": cache_len}


class Engine:
    """Continuous batching over `slots` decode rows. See the module docstring.

    max_prompt_len: the longest prompt (tokens) the engine will take; with max_new_tokens it fixes the
    cache length (bucket-rounded prompt + max_new_tokens, at most n_positions + bucket).
    max_len: instead, the most tokens (prompt + answer) one request may hold (a server's context);
    requests whose prompt + budget exceed it are refused (`check`).
    detokenize: ids -> text, needed only for requests with stop strings.
    logprobs: None, or k >= 0: `generate` also returns log-probabilities (the chosen token's and the k
    most likely tokens').
    prng_impl: the PRNG implementation of the slots' keys (default: jax's default).
    mesh: place the decode state on this mesh, slots over its data axes (see `Placement`); slots must
    divide by the data ways. Default: the state stays where jax puts it (one device)."""

    def __init__(self, model: GPT, params, cfg: SamplingConfig, *, slots: int = 16, max_prompt_len: Optional[int] = None,
                 max_len: Optional[int] = None, bucket: int = 64, steps_per_sync: int = 8,
                 detokenize: Optional[Callable[[list], str]] = None, logprobs: Optional[int] = None, prng_impl=None,
                 mesh: Optional[jax.sharding.Mesh] = None):
        if slots < 1 or steps_per_sync < 1:
            raise ValueError(f"slots={slots} and steps_per_sync={steps_per_sync} must be >= 1")
        if max_len is not None and max_prompt_len is not None:
            raise ValueError("give max_prompt_len or max_len, not both")
        self.model, self.params, self.cfg = model, params, cfg
        self.slots, self.bucket, self.steps_per_sync = slots, bucket, steps_per_sync
        self.detokenize, self.logprobs = detokenize, logprobs
        self.max_len = max_len
        self.prng_impl = _key_impl(prng_impl)
        self.max_prompt_len, self.cache_len = sizes(model.config.n_positions, cfg.max_new_tokens, max_prompt_len,
                                                    bucket, max_len)
        self.head = _head(params, model.config)
        self.placement = None
        if mesh is not None:
            self.placement = Placement(mesh, tuple(a for a in ("data", "fsdp") if a in mesh.shape),
                                       model.config.kv_seq_major)
            if slots % self.placement.ways:
                raise ValueError(f"slots={slots} must be a multiple of the mesh's data ways ({self.placement.ways})")

    # --- the engine API ------------------------------------------------------------------------------

    def init_state(self) -> dict:
        """An empty decode state (all slots free), placed on the engine's mesh if it has one."""
        state = empty_state(self.model.config, self.slots, self.cache_len, self.prng_impl)
        return state if self.placement is None else jax.device_put(state, self.placement.shardings(state))

    def budget(self, max_new_tokens: Optional[int] = None) -> int:
        """A request's token budget: its own, at most the engine's max_new_tokens."""
        return self.cfg.max_new_tokens if max_new_tokens is None else min(int(max_new_tokens), self.cfg.max_new_tokens)

    def check(self, prompt_len: int, max_new_tokens: Optional[int] = None) -> None:
        """Raise ValueError when the engine cannot take a prompt of this length with this budget."""
        if prompt_len < 1:
            raise ValueError("empty prompt: give at least one token (e.g. <|endoftext|>)")
        if prompt_len > self.max_prompt_len:
            raise ValueError(f"prompt of {prompt_len} tokens exceeds the engine's max_prompt_len={self.max_prompt_len}")
        if self.max_len is not None and prompt_len + self.budget(max_new_tokens) > self.max_len:
            raise ValueError(f"prompt of {prompt_len} tokens + {self.budget(max_new_tokens)} new tokens exceeds the "
                             f"engine's max_len={self.max_len}")

    def prefill(self, prompts: Sequence[Sequence[int]]) -> Prefix:
        """Run prompts through the model together, left-padded to one multiple of `bucket`; the batch is
        padded to a power of two (repeating the last prompt) so few batch shapes compile."""
        prompts = [list(p) for p in prompts]
        for p in prompts:
            self.check(len(p), 0)
        n = 1 << (len(prompts) - 1).bit_length()
        ids, mask = left_pad(prompts + [prompts[-1]] * (n - len(prompts)), self.bucket, self.cfg.pad_id)
        logits, row_logits, rows = _prefill(self.model, self.params, jnp.asarray(ids), jnp.asarray(mask))
        return Prefix(rows, mask, logits, row_logits, tuple(len(p) for p in prompts))

    def key(self, key: Optional[jax.Array]) -> jax.Array:
        """A request's PRNG key as the slots hold it (typed, the engine's implementation)."""
        if key is None:
            return jax.random.key(0, impl=self.prng_impl)
        if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(key, impl=self.prng_impl)
        if jax.random.key_impl(key) != self.prng_impl:
            raise ValueError(f"a request's key is a {jax.random.key_impl(key)} key; this engine's slots hold "
                             f"{self.prng_impl} keys (Engine(prng_impl=...))")
        return key

    def insert(self, prefix: Prefix, state: dict, slot: int, prompt: Sequence[int], max_new_tokens: Optional[int] = None,
               key: Optional[jax.Array] = None, row: int = 0, temperature: Optional[float] = None,
               top_k: Optional[int] = None, top_p: Optional[float] = None) -> dict:
        """Put row `row` of a prefilled batch (its prompt: `prompt`) into `slot`, which must be free,
        with its token budget, PRNG key and sampling settings (default: the engine's config)."""
        budget = self.budget(max_new_tokens)
        self.check(len(prompt), budget)
        hist = np.zeros((self.cache_len,), np.int32)
        hist[: len(prompt)] = prompt
        cfg = self.cfg
        return _insert(state, prefix.rows[row], prefix.mask[row], prefix.row_logits[row], jnp.asarray(hist),
                       jnp.int32(prefix.lengths[row]), jnp.int32(budget), self.key(key),
                       jnp.float32(cfg.temperature if temperature is None else temperature),
                       jnp.int32(cfg.top_k if top_k is None else top_k),
                       jnp.float32(cfg.top_p if top_p is None else top_p), jnp.int32(slot), placement=self.placement,
                       seq_major=self.model.config.kv_seq_major)

    def generate(self, state: dict, logprobs: bool = True):
        """Up to `steps_per_sync` steps for all slots: (state, tokens (n, B), emitted (n, B), logprobs).
        logprobs=False skips the engine's log-probabilities for this call (a second compiled variant)."""
        return generate_steps(self.model, self.params, self.head, state, cfg=self.cfg, n_steps=self.steps_per_sync,
                              logprobs=self.logprobs if logprobs else None, placement=self.placement)

    def warm_up(self, threads: int = 8) -> dict:
        """Compile every program a request may need, so no request waits for a compile: a prefill for
        each prompt bucket x prefill batch (powers of two up to `slots`), an insert per bucket, the
        decode step without and with log-probabilities, and free. The prefills (most of them) compile
        in `threads` parallel threads; then every program runs once on dummy inputs, in an engine
        state of its own that is dropped afterwards. Returns {"programs", "seconds"}."""
        import concurrent.futures

        t0 = time.perf_counter()
        pad = self.cfg.pad_id
        buckets = range(self.bucket, -(-self.max_prompt_len // self.bucket) * self.bucket + 1, self.bucket)
        batches = [1 << i for i in range((self.slots - 1).bit_length() + 1)]
        shapes = [(n, P) for P in buckets for n in batches]

        def compile_prefill(shape):
            ids, mask = np.full(shape, pad, np.int32), np.ones(shape, bool)
            _prefill.lower(self.model, self.params, jnp.asarray(ids), jnp.asarray(mask)).compile()

        with concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool:
            list(pool.map(compile_prefill, shapes))  # fills the compilation cache; raises the first error
        state = self.init_state()
        for n, P in shapes:  # each shape once for real (compiled above: traced and looked up only)
            prompt = [pad] * min(P, self.max_prompt_len)  # left-padded to P
            prefix = self.prefill([prompt] * n)
            if n == 1:
                state = self.insert(prefix, state, 0, prompt, max_new_tokens=0)
        variants = [False] + ([True] if self.logprobs is not None else [])
        for logprobs in variants:
            state, *_ = self.generate(state, logprobs=logprobs)
        state = self.free(state, 0)
        jax.block_until_ready(state)
        del state
        return {"programs": len(shapes) + len(buckets) + len(variants) + 1,
                "seconds": time.perf_counter() - t0}

    def free(self, state: dict, slot: int) -> dict:
        """End the request in `slot` now (a stop string, a cancelled request)."""
        return _free_slot(state, jnp.int32(slot), placement=self.placement)

    # --- scheduling --------------------------------------------------------------------------------

    def run(self, requests: Sequence[Request], rng: Optional[jax.Array] = None,
            on_done: Optional[Callable[[int, list], None]] = None) -> list[list[int]]:
        """Generate for every request, `slots` at a time, refilling a slot as soon as it finishes.
        Returns token ids per request (in the order given); `on_done(index, ids)` is called as each
        finishes. Requests are admitted in the order given (`scheduler.run`)."""
        return scheduler_lib.run(self, requests, rng, on_done)


def generate_all(model: GPT, params, prompts: Sequence[Sequence[int]], cfg: SamplingConfig, *, slots: int = 16,
                 rng: Optional[jax.Array] = None, bucket: int = 64, steps_per_sync: int = 8,
                 max_new_tokens: Optional[Sequence[int]] = None, stop: Sequence[str] = (),
                 detokenize: Optional[Callable[[list], str]] = None) -> list[list[int]]:
    """Token ids per prompt through an `Engine` sized for these prompts: the cache fits the longest,
    rounded up to a bucket, so calls whose longest prompts share a bucket share compiled programs."""
    if not prompts:
        return []
    longest = max(len(p) for p in prompts)
    room = model.config.n_positions - cfg.max_new_tokens
    if longest > room:
        raise ValueError(f"prompt of {longest} tokens + {cfg.max_new_tokens} new exceeds n_positions="
                         f"{model.config.n_positions}")
    eng = Engine(model, params, cfg, slots=min(slots, len(prompts)), max_prompt_len=min(-(-longest // bucket) * bucket, room),
                 bucket=bucket, steps_per_sync=steps_per_sync, detokenize=detokenize)
    budgets = max_new_tokens or [None] * len(prompts)
    return eng.run([Request(p, b, tuple(stop)) for p, b in zip(prompts, budgets)], rng)
