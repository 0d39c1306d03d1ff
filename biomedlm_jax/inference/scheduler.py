"""Requests that arrive over time, driven through an `engine.Engine` one sync at a time (the HTTP
server's batcher, `Engine.run`). This module does not import the engine (the engine imports it): an
engine and its `Request`s are passed in.

    sched = Scheduler(eng)
    updates = sched.admit([(handle, Request(ids, max_new_tokens=64, temperature=0.7))])
    updates = sched.step()                 # new tokens per request, and who finished
    sched.cancel(handle)                   # frees its slot (a client went away)
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Callable, Hashable, Optional, Sequence

import jax
import numpy as np



@dataclasses.dataclass
class Update:
    """What one sync did for one request: its new tokens (and their log-probabilities, with the engine's
    `logprobs`); when done, why ("stop": EOS or a stop string; "length": its budget) and its output."""

    handle: Hashable
    tokens: list
    logprobs: list  # per new token: (logprob, [(token id, logprob), ...]) or empty
    done: bool = False
    finish_reason: Optional[str] = None
    output: Optional[list] = None


class Scheduler:
    """An Engine driven one sync at a time, for requests that arrive over time (`Engine.run`, the HTTP
    server). Requests are identified by a caller's handle; the caller admits at most `free_slots()` at
    a time, calls `step` while `busy()`, and may `cancel` a request at any sync."""

    def __init__(self, engine):
        self.engine = engine
        self.state = engine.init_state()
        self.owner: list = [None] * engine.slots  # (handle, request) per slot
        self.outs: list = [[] for _ in range(engine.slots)]

    def free_slots(self) -> int:
        return sum(o is None for o in self.owner)

    def busy(self) -> bool:
        return any(o is not None for o in self.owner)

    def admit(self, items: Sequence[tuple]) -> list[Update]:
        """Prefill the requests together and put each into a free slot. A request with a budget of 0
        finishes at once (an Update with done). Raises ValueError (nothing admitted) for a request the
        engine cannot take, or when there are more than free slots."""
        eng = self.engine
        for handle, r in items:
            eng.check(len(r.prompt), r.max_new_tokens)
            if r.stop and eng.detokenize is None:
                raise ValueError(f"request {handle!r} has stop strings but the engine has no detokenize function")
        updates = [Update(h, [], [], True, "length", []) for h, r in items if eng.budget(r.max_new_tokens) <= 0]
        live = [(h, r) for h, r in items if eng.budget(r.max_new_tokens) > 0]
        free = [s for s, o in enumerate(self.owner) if o is None]
        if len(live) > len(free):
            raise ValueError(f"{len(live)} requests for {len(free)} free slots")
        if live:
            prefix = eng.prefill([r.prompt for _, r in live])
            for row, ((handle, r), slot) in enumerate(zip(live, free)):
                self.state = eng.insert(prefix, self.state, slot, r.prompt, r.max_new_tokens, r.key, row,
                                        r.temperature, r.top_k, r.top_p)
                self.owner[slot], self.outs[slot] = (handle, r), []
        return updates

    def step(self) -> list[Update]:
        """One `generate` call: an Update for every request that produced tokens or finished."""
        eng = self.engine
        want = any(o is not None and o[1].logprobs for o in self.owner)
        self.state, toks, emitted, lp = eng.generate(self.state, logprobs=want)
        toks, emitted, active = np.asarray(toks), np.asarray(emitted), np.asarray(self.state["active"])
        lp = {k: np.asarray(v) for k, v in lp.items()}
        updates = []
        for slot, owner in enumerate(self.owner):
            if owner is None:
                continue
            handle, r = owner
            rows = emitted[:, slot]
            new = toks[rows, slot].tolist()
            new_lp = []
            if lp:
                token_lp = lp["token"][rows, slot].tolist()
                tops = ([list(zip(i.tolist(), v.tolist())) for i, v in zip(lp["top_ids"][rows, slot], lp["top"][rows, slot])]
                        if "top" in lp else [[] for _ in new])
                new_lp = list(zip(token_lp, tops))
            self.outs[slot].extend(new)
            u = Update(handle, new, new_lp)
            if not active[slot]:
                eos = eng.cfg.eos_id
                u.finish_reason = "stop" if eos is not None and self.outs[slot][-1:] == [eos] else "length"
            elif r.stop and any(s in eng.detokenize(self.outs[slot]) for s in r.stop):
                self.state = eng.free(self.state, slot)
                u.finish_reason = "stop"
            if u.finish_reason is not None:
                u.done, u.output = True, self.outs[slot]
                self.owner[slot] = None
            if new or u.done:
                updates.append(u)
        return updates

    def cancel(self, handle: Hashable) -> bool:
        """Free the slot of the request with this handle (a client went away). False if it holds none."""
        for slot, owner in enumerate(self.owner):
            if owner is not None and owner[0] == handle:
                self.state = self.engine.free(self.state, slot)
                self.owner[slot] = None
                return True
        return False


def run(engine, requests: Sequence, rng: Optional[jax.Array] = None,
        on_done: Optional[Callable[[int, list], None]] = None) -> list[list[int]]:
    """`Engine.run`: every request, `slots` at a time, a slot refilled as soon as it finishes; token
    ids per request in the order given; `on_done(index, ids)` as each finishes."""
    rng = jax.random.PRNGKey(0) if rng is None else rng
    for n, r in enumerate(requests):
        if len(r.prompt) == 0:
            raise ValueError(f"request {n}: empty prompt: give at least one token (e.g. <|endoftext|>)")
        if r.stop and engine.detokenize is None:
            raise ValueError(f"request {n} has stop strings but the engine has no detokenize function")
    results: list = [None] * len(requests)
    pending = collections.deque(range(len(requests)))
    sched = Scheduler(engine)
    while pending or sched.busy():
        batch = []
        while pending and len(batch) < sched.free_slots():
            n = pending.popleft()
            r = requests[n]
            batch.append((n, r if r.key is not None else dataclasses.replace(r, key=jax.random.fold_in(rng, n))))
        updates = sched.admit(batch)
        if sched.busy():
            updates += sched.step()
        for u in updates:
            if u.done:
                results[u.handle] = u.output
                if on_done is not None:
                    on_done(u.handle, u.output)
    return results
