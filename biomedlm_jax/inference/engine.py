"""A slot-based decode engine (continuous batching): a finished sequence's slot takes the next request
at once, so a batch of mixed-length answers no longer waits for its longest one.

The API follows JetStream's engine (prefill -> insert -> generate, repeated):

    eng = Engine(model, params, SamplingConfig(max_new_tokens=256, temperature=0.0, eos_id=eos), slots=16)
    outs = eng.run([Request(ids) for ids in prompts])           # token ids per request, in order

    # or driving it by hand:
    state = eng.init_state()
    prefix = eng.prefill([ids])                                 # prompts -> their KV cache + first logits
    state = eng.insert(prefix, state, slot=3)                   # into a free slot of the decode batch
    state, toks, emitted = eng.generate(state)                  # `steps_per_sync` steps for every slot

How it works:
  * the decode state holds one KV cache row per slot, `cache_len` columns long, used as a ring: step t
    writes every slot's new key/value at column t mod cache_len (one in-place update for the batch, as
    in `generate.py`); `insert` writes a prompt's prefilled keys/values into the columns just before t.
    A slot's columns are not in token order, which attention does not need: GPT-2's learned positions
    are added to the input, so each key carries its own position, and a per-slot mask (`GPT.decode`'s
    (B, 1, S) form) says which columns are the slot's tokens. A slot never overwrites its own columns
    while prompt bucket + max_new_tokens <= cache_len;
  * every slot carries its position, token budget, generated count and PRNG key: sampling a request's
    n-th token uses fold_in(request key, n), so sampled outputs do not depend on which slot or batch
    neighbours a request gets, and greedy outputs equal `generate.generate`'s (tested);
  * `generate` runs up to `steps_per_sync` steps on the device (a while_loop that stops early when no
    slot is active) before the host frees finished slots (EOS, budget, or a stop string, checked on the
    host) and refills them. More steps per sync means fewer host round trips and more idle slot-steps;
  * `no_repeat_ngram_size` bans per slot over the slot's own prompt + output (its token history).

Outputs are the same as `generate.generate` gives each prompt alone: EOS included when produced,
nothing after it.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from biomedlm_jax.inference.sampling import (
    SamplingConfig,
    ban_repeated_ngrams,
    greedy,
    left_pad,
    positions_from_mask,
    top_k_filter,
    top_p_filter,
)
from biomedlm_jax.models.gpt import GPT, init_cache, transposed_head


@dataclasses.dataclass
class Request:
    """One generation request. max_new_tokens: this request's budget (default: the engine's, at most
    that); stop: strings that end the request when its decoded output contains one (needs the engine's
    `detokenize`); key: PRNG key for sampling (default: fold_in(run's key, request index))."""

    prompt: Sequence[int]
    max_new_tokens: Optional[int] = None
    stop: Sequence[str] = ()
    key: Optional[jax.Array] = None


@dataclasses.dataclass(frozen=True)
class Prefix:
    """Prefilled prompts (a batch of n, left-padded to one bucket length P): their KV cache, masks and
    the first token's logits. `insert` takes one row of it."""

    cache: object  # as init_cache(cfg, n, P)
    mask: jax.Array  # (n, P) True for real tokens (left padding False)
    logits: jax.Array  # (n, V) fp32
    lengths: tuple  # real prompt tokens per row


def _sample(logits, keys, n_gen, cfg: SamplingConfig):
    """One token per slot: greedy, or each slot's own key folded with its generated count."""
    if cfg.temperature == 0.0:
        return greedy(logits)
    step_keys = jax.vmap(jax.random.fold_in)(keys, n_gen)

    def one(lg, key):
        lg = lg[None] / cfg.temperature
        lg = top_p_filter(top_k_filter(lg, cfg.top_k), cfg.top_p)
        return jax.random.categorical(key, lg, axis=-1)[0]

    return jax.vmap(one)(logits, step_keys).astype(jnp.int32)


def _ban_per_slot(logits, history, hist_len, n: int):
    """`ban_repeated_ngrams` with each slot's own history length."""
    S = history.shape[1]

    def one(lg, toks, length):
        valid = jnp.arange(S) < length
        return ban_repeated_ngrams(lg[None], toks[None], valid[None], length, n)[0]

    return jax.vmap(one)(logits, history, hist_len)


def _decode_steps(model: GPT, params, head, state, cfg: SamplingConfig, n_steps: int):
    """Up to n_steps decode steps for every slot; stops early when no slot is active.

    Returns (state, tokens (n_steps, B), emitted (n_steps, B)): emitted marks the tokens produced by
    slots active at that step."""
    B, S = state["kv_mask"].shape
    eos = -1 if cfg.eos_id is None else cfg.eos_id
    rows = jnp.arange(B)

    def cond(carry):
        i, st, _, _ = carry
        return (i < n_steps) & st["active"].any()

    def body(carry):
        i, st, toks, emitted = carry
        active = st["active"]
        logits = st["logits"]
        if cfg.no_repeat_ngram_size:
            logits = _ban_per_slot(logits, st["history"], st["hist_len"], cfg.no_repeat_ngram_size)
        tok = jnp.where(active, _sample(logits, st["keys"], st["n_gen"], cfg), cfg.pad_id)
        col = st["t"] % S
        kv_mask = jax.lax.dynamic_update_slice_in_dim(st["kv_mask"], active[:, None], col, axis=1)
        H = st["history"].shape[1]
        history = st["history"].at[rows, jnp.minimum(st["hist_len"], H - 1)].set(
            jnp.where(active, tok, st["history"][rows, jnp.minimum(st["hist_len"], H - 1)]))
        n_gen = st["n_gen"] + active
        finished = active & ((tok == eos) | (n_gen >= st["budget"]))
        logits, cache = model.apply({"params": params}, tok[:, None], kv_mask[:, None, :], st["pos"][:, None],
                                    st["cache"], col, head, method="decode")
        new = dict(st, cache=cache, kv_mask=kv_mask, logits=logits[:, 0], history=history,
                   hist_len=st["hist_len"] + active, pos=st["pos"] + active, n_gen=n_gen,
                   active=active & ~finished, t=st["t"] + 1)
        toks = jax.lax.dynamic_update_index_in_dim(toks, tok, i, 0)
        emitted = jax.lax.dynamic_update_index_in_dim(emitted, active, i, 0)
        return i + 1, new, toks, emitted

    toks = jnp.full((n_steps, B), cfg.pad_id, jnp.int32)
    emitted = jnp.zeros((n_steps, B), bool)
    _, state, toks, emitted = jax.lax.while_loop(cond, body, (jnp.int32(0), state, toks, emitted))
    return state, toks, emitted


# Module-level jits with the model and sampling config static: every Engine on the same model shares
# their compiled programs (the lm-eval backend builds one per generation-kwargs group).
generate_steps = jax.jit(_decode_steps, static_argnames=("model", "cfg", "n_steps"), donate_argnames=("state",))
_free_slot = jax.jit(lambda state, slot: dict(state, active=state["active"].at[slot].set(False)), donate_argnums=(0,))
_head = jax.jit(transposed_head, static_argnums=1)


@functools.partial(jax.jit, static_argnames=("model",))
def _prefill(model: GPT, params, ids, mask):
    """Left-padded prompts (n, P) through the model: (last logits (n, V), their (n * H, P, hd) cache)."""
    cache = init_cache(model.config, ids.shape[0], ids.shape[1])
    logits, cache = model.apply({"params": params}, ids, mask, positions_from_mask(mask), cache, 0, method="decode")
    return logits[:, -1], cache


@functools.partial(jax.jit, static_argnames=("n_head",), donate_argnums=(0,))
def _insert(state, prefix_cache, prefix_mask, prefix_logits, row, prompt_row, length, budget, key, slot,
            n_head: int):
    """Write row `row` of a prefilled batch into `slot`: its P cache columns end just before column t
    (mod S)."""
    B, S = state["kv_mask"].shape
    P = prefix_mask.shape[1]
    shift = (state["t"] - P) % S

    def place(buf, prefix):  # buf (B*H, S, hd), prefix (n*H, P, hd)
        block = jax.lax.dynamic_slice_in_dim(prefix, row * n_head, n_head, axis=0)
        full = jnp.zeros((n_head, S, block.shape[2]), buf.dtype).at[:, :P].set(block.astype(buf.dtype))
        return jax.lax.dynamic_update_slice_in_dim(buf, jnp.roll(full, shift, axis=1), slot * n_head, axis=0)

    if isinstance(state["cache"], dict):  # scan_layers: (L, B*H, S, hd)
        cache = {n: jax.vmap(place)(state["cache"][n], prefix_cache[n]) for n in ("k", "v")}
    else:
        cache = [{n: place(c[n], p[n]) for n in ("k", "v")} for c, p in zip(state["cache"], prefix_cache)]
    mask_row = jnp.roll(jnp.zeros((S,), bool).at[:P].set(prefix_mask[row]), shift)
    return dict(
        state, cache=cache,
        kv_mask=jax.lax.dynamic_update_index_in_dim(state["kv_mask"], mask_row, slot, 0),
        logits=jax.lax.dynamic_update_index_in_dim(state["logits"], prefix_logits[row], slot, 0),
        history=jax.lax.dynamic_update_index_in_dim(state["history"], prompt_row, slot, 0),
        hist_len=state["hist_len"].at[slot].set(length),
        pos=state["pos"].at[slot].set(length),
        n_gen=state["n_gen"].at[slot].set(0),
        budget=state["budget"].at[slot].set(budget),
        keys=state["keys"].at[slot].set(key),
        active=state["active"].at[slot].set(budget > 0),
    )


def sizes(n_positions: int, max_new_tokens: int, max_prompt_len: Optional[int], bucket: int) -> tuple[int, int, int]:
    """(max_prompt_len, cache_len, history_len) of an engine: the longest prompt it takes (default: all
    positions the answer budget leaves), its KV cache length (prompt bucket-rounded + budget) and its
    token history length."""
    max_prompt_len = max_prompt_len or max(1, n_positions - max_new_tokens)
    if max_prompt_len + max_new_tokens > n_positions:
        raise ValueError(f"max_prompt_len={max_prompt_len} + max_new_tokens={max_new_tokens} exceeds "
                         f"n_positions={n_positions}")
    return max_prompt_len, -(-max_prompt_len // bucket) * bucket + max_new_tokens, max_prompt_len + max_new_tokens


def empty_state(cfg, slots: int, cache_len: int, history_len: int) -> dict:
    """A decode state with every slot free: one KV cache row of `cache_len` columns per slot."""
    B, S = slots, cache_len
    return {
        "cache": init_cache(cfg, B, S),
        "kv_mask": jnp.zeros((B, S), bool),
        "logits": jnp.zeros((B, cfg.vocab_size), jnp.float32),
        "history": jnp.zeros((B, history_len), jnp.int32),
        "hist_len": jnp.zeros((B,), jnp.int32),
        "pos": jnp.zeros((B,), jnp.int32),
        "n_gen": jnp.zeros((B,), jnp.int32),
        "budget": jnp.zeros((B,), jnp.int32),
        "keys": jnp.zeros((B, 2), jnp.uint32),
        "active": jnp.zeros((B,), bool),
        "t": jnp.int32(0),
    }


def state_shapes(model: GPT, params, cfg: SamplingConfig, *, slots: int, max_prompt_len: Optional[int] = None,
                 bucket: int = 64) -> dict:
    """What an Engine would hold, as shapes only (params may be abstract): {"state", "head",
    "cache_len"}; with `generate_steps` this is the decode step to lower for another device."""
    _, cache_len, history_len = sizes(model.config.n_positions, cfg.max_new_tokens, max_prompt_len, bucket)
    return {"state": jax.eval_shape(lambda: empty_state(model.config, slots, cache_len, history_len)),
            "head": jax.eval_shape(lambda p: transposed_head(p, model.config), params), "cache_len": cache_len}


class Engine:
    """Continuous batching over `slots` decode rows. See the module docstring.

    max_prompt_len: the longest prompt (tokens) the engine will take; with max_new_tokens it fixes the
    cache length (bucket-rounded prompt + max_new_tokens, at most n_positions + bucket).
    detokenize: ids -> text, needed only for requests with stop strings."""

    def __init__(self, model: GPT, params, cfg: SamplingConfig, *, slots: int = 16, max_prompt_len: Optional[int] = None,
                 bucket: int = 64, steps_per_sync: int = 8, detokenize: Optional[Callable[[list], str]] = None):
        if slots < 1 or steps_per_sync < 1:
            raise ValueError(f"slots={slots} and steps_per_sync={steps_per_sync} must be >= 1")
        self.model, self.params, self.cfg = model, params, cfg
        self.slots, self.bucket, self.steps_per_sync = slots, bucket, steps_per_sync
        self.detokenize = detokenize
        self.max_prompt_len, self.cache_len, self.history_len = sizes(model.config.n_positions, cfg.max_new_tokens,
                                                                      max_prompt_len, bucket)
        self.head = _head(params, model.config)

    # --- the engine API ------------------------------------------------------------------------------

    def init_state(self) -> dict:
        """An empty decode state (all slots free)."""
        return empty_state(self.model.config, self.slots, self.cache_len, self.history_len)

    def prefill(self, prompts: Sequence[Sequence[int]]) -> Prefix:
        """Run prompts through the model together, left-padded to one multiple of `bucket`; the batch is
        padded to a power of two (repeating the last prompt) so few batch shapes compile."""
        prompts = [list(p) for p in prompts]
        for p in prompts:
            if not p:
                raise ValueError("empty prompt: give at least one token (e.g. <|endoftext|>)")
            if len(p) > self.max_prompt_len:
                raise ValueError(f"prompt of {len(p)} tokens exceeds the engine's max_prompt_len={self.max_prompt_len}")
        n = 1 << (len(prompts) - 1).bit_length()
        ids, mask = left_pad(prompts + [prompts[-1]] * (n - len(prompts)), self.bucket, self.cfg.pad_id)
        logits, cache = _prefill(self.model, self.params, jnp.asarray(ids), jnp.asarray(mask))
        return Prefix(cache, jnp.asarray(mask), logits, tuple(len(p) for p in prompts))

    def insert(self, prefix: Prefix, state: dict, slot: int, prompt: Sequence[int], max_new_tokens: Optional[int] = None,
               key: Optional[jax.Array] = None, row: int = 0) -> dict:
        """Put row `row` of a prefilled batch (its prompt: `prompt`) into `slot`, which must be free,
        with its token budget and PRNG key."""
        budget = self.cfg.max_new_tokens if max_new_tokens is None else min(int(max_new_tokens), self.cfg.max_new_tokens)
        hist = np.zeros((self.history_len,), np.int32)
        hist[: len(prompt)] = prompt
        key = jax.random.PRNGKey(0) if key is None else key
        if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
            key = jax.random.key_data(key)
        return _insert(state, prefix.cache, prefix.mask, prefix.logits, jnp.int32(row), jnp.asarray(hist),
                       jnp.int32(prefix.lengths[row]), jnp.int32(budget), key, jnp.int32(slot),
                       n_head=self.model.config.n_head)

    def generate(self, state: dict):
        """Up to `steps_per_sync` steps for all slots: (state, tokens (n, B), emitted (n, B))."""
        return generate_steps(self.model, self.params, self.head, state, cfg=self.cfg, n_steps=self.steps_per_sync)

    def free(self, state: dict, slot: int) -> dict:
        """End the request in `slot` now (a stop string, a cancelled request)."""
        return _free_slot(state, jnp.int32(slot))

    # --- scheduling --------------------------------------------------------------------------------

    def run(self, requests: Sequence[Request], rng: Optional[jax.Array] = None,
            on_done: Optional[Callable[[int, list], None]] = None) -> list[list[int]]:
        """Generate for every request, `slots` at a time, refilling a slot as soon as it finishes.
        Returns token ids per request (in the order given); `on_done(index, ids)` is called as each
        finishes. Requests are admitted in the order given."""
        rng = jax.random.PRNGKey(0) if rng is None else rng
        for n, r in enumerate(requests):
            if len(r.prompt) == 0:
                raise ValueError(f"request {n}: empty prompt: give at least one token (e.g. <|endoftext|>)")
            if r.stop and self.detokenize is None:
                raise ValueError(f"request {n} has stop strings but the engine has no detokenize function")
        results: list = [None] * len(requests)
        pending = collections.deque(range(len(requests)))
        owner: list = [None] * self.slots  # request index per slot
        state = self.init_state()
        eos = self.cfg.eos_id

        def finish(slot: int, toks: list) -> None:
            n = owner[slot]
            if eos is not None and eos in toks:
                toks = toks[: toks.index(eos) + 1]
            results[n] = toks
            owner[slot] = None
            if on_done is not None:
                on_done(n, toks)

        outs: list = [[] for _ in range(self.slots)]
        while pending or any(o is not None for o in owner):
            admitted = []  # (slot, request index): every free slot takes the next request
            for slot in range(self.slots):
                while owner[slot] is None and pending:
                    n = pending.popleft()
                    owner[slot], outs[slot] = n, []
                    if requests[n].max_new_tokens is not None and requests[n].max_new_tokens <= 0:
                        finish(slot, [])
                    else:
                        admitted.append((slot, n))
            if admitted:
                prefix = self.prefill([requests[n].prompt for _, n in admitted])
                for row, (slot, n) in enumerate(admitted):
                    r = requests[n]
                    key = r.key if r.key is not None else jax.random.fold_in(rng, n)
                    state = self.insert(prefix, state, slot, r.prompt, r.max_new_tokens, key, row)
            state, toks, emitted = self.generate(state)
            toks, emitted, active = np.asarray(toks), np.asarray(emitted), np.asarray(state["active"])
            for slot in range(self.slots):
                if owner[slot] is None:
                    continue
                outs[slot].extend(toks[emitted[:, slot], slot].tolist())
                stop = requests[owner[slot]].stop
                if not active[slot]:
                    finish(slot, outs[slot])
                elif stop and any(s in self.detokenize(outs[slot]) for s in stop):
                    state = self.free(state, slot)
                    finish(slot, outs[slot])
        return results


def generate_all(model: GPT, params, prompts: Sequence[Sequence[int]], cfg: SamplingConfig, *, slots: int = 16,
                 rng: Optional[jax.Array] = None, bucket: int = 64, steps_per_sync: int = 8,
                 max_new_tokens: Optional[Sequence[int]] = None, stop: Sequence[str] = (),
                 detokenize: Optional[Callable[[list], str]] = None) -> list[list[int]]:
    """Token ids per prompt through an `Engine` sized for these prompts (the cache fits the longest)."""
    if not prompts:
        return []
    longest = max(len(p) for p in prompts)
    if longest + cfg.max_new_tokens > model.config.n_positions:
        raise ValueError(f"prompt of {longest} tokens + {cfg.max_new_tokens} new exceeds n_positions="
                         f"{model.config.n_positions}")
    eng = Engine(model, params, cfg, slots=min(slots, len(prompts)), max_prompt_len=longest, bucket=bucket,
                 steps_per_sync=steps_per_sync, detokenize=detokenize)
    budgets = max_new_tokens or [None] * len(prompts)
    return eng.run([Request(p, b, tuple(stop)) for p, b in zip(prompts, budgets)], rng)
