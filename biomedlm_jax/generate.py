"""Fast generation: a static-shape KV cache, one jitted prefill and one jitted decode loop.

    python -m biomedlm_jax.generate --init_from=hf:DIR|orbax:WORKDIR --prompt="Metformin is" \
        [--max_new_tokens=64 --temperature=0.7 --top_k=50 --top_p=0.95 --seed=0 --no_repeat_ngram_size=6]
    python -m biomedlm_jax.generate --init_from=... --interactive
    python -m biomedlm_jax.generate --init_from=... --input=prompts.jsonl --output=out.jsonl [--batch_size=16]
    ... [--quantize=int8]   # int8 weights (quantize.py), any of the three modes

`--input` runs the continuous-batching engine (engine.py) with `--batch_size` slots: a finished
answer's slot takes the next prompt at once, and completions are written in input order as they
finish. Greedy outputs are the same as `generate()` gives; sampled ones use one key per output row
(fold_in(seed, row)), so they do not depend on the batch a prompt lands in.

How it works (`generate`):
  * prompts are left-padded to a bucket length (a multiple of `bucket`), so different prompt lengths
    reuse one compiled program; positions count real tokens only (0 at each prompt's first token),
    and a key mask hides the padding, so a padded prompt decodes exactly like an unpadded one;
  * the cache (n_layer, B * H, P + max_new, hd) is preallocated; `prefill` runs the prompt through
    the model once and writes its keys/values; `decode` is a `lax.while_loop` that samples a token,
    writes it and runs one cached step, until every row has produced EOS or max_new tokens;
  * sampling: greedy (temperature 0), temperature, top-k, top-p (the smallest set whose probability
    reaches p), `no_repeat_ngram_size` (a token that would repeat an n-gram of prompt + output is
    banned, as HF does; BioMedLM's generation used 6), and an explicit PRNG key;
  * `num_return_sequences` repeats each prompt; streaming calls back with each new token from inside
    the loop (`jax.experimental.io_callback`), so the terminal shows tokens as they come.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from biomedlm_jax.model import GPT, init_cache, transposed_head

# The sampling primitives live in sampling.py (shared with engine.py); imported here under their old names.
from biomedlm_jax.sampling import (  # noqa: E402,F401
    NEG_INF,
    SamplingConfig,
    ban_repeated_ngrams,
    greedy,
    left_pad,
    positions_from_mask,
    sample_token,
    top_k_filter,
    top_p_filter,
)


@functools.partial(jax.jit, static_argnames=("model", "max_len"))
def prefill(model: GPT, params, ids, mask, max_len: int):
    """Run the (left-padded) prompts through the model once.

    Returns (last logits (B, V), cache, kv_mask, head): `head` is the (C, V) tied head the decode loop
    multiplies every new token by (`model.transposed_head`)."""
    B, P = ids.shape
    cache = init_cache(model.config, B, max_len)
    kv_mask = jnp.zeros((B, max_len), bool).at[:, :P].set(mask)
    logits, cache = model.apply({"params": params}, ids, kv_mask, positions_from_mask(mask), cache, 0,
                                method="decode")
    return logits[:, -1], cache, kv_mask, transposed_head(params, model.config)


# The streaming callback is looked up at run time, so one compiled loop serves every prompt's callback.
_STREAM_SINK: list = [None]


def _to_sink(step, tok, done):
    if _STREAM_SINK[0] is not None:
        _STREAM_SINK[0](int(step), np.asarray(tok), np.asarray(done))


def _decode_loop(model: GPT, params, ids, mask, last_logits, cache, kv_mask, head, rng, cfg: SamplingConfig,
                 streaming: bool = False):
    B, P = ids.shape
    S = P + cfg.max_new_tokens
    tokens = jnp.zeros((B, S), jnp.int32).at[:, :P].set(ids)
    next_pos = mask.sum(-1).astype(jnp.int32)  # (B,) position of the next token
    eos = -1 if cfg.eos_id is None else cfg.eos_id

    def cond(state):
        step, _, _, _, _, done, _, _ = state
        return (step < cfg.max_new_tokens) & ~done.all()

    def body(state):
        step, tokens, kv_mask, cache, logits, done, pos, rng = state
        rng, key = jax.random.split(rng)
        cur = P + step
        if cfg.no_repeat_ngram_size:
            logits = ban_repeated_ngrams(logits, tokens, kv_mask, cur, cfg.no_repeat_ngram_size)
        tok = sample_token(logits, key, cfg)
        tok = jnp.where(done, cfg.pad_id, tok)
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, tok[:, None], cur, axis=1)
        kv_mask = jax.lax.dynamic_update_slice_in_dim(kv_mask, (~done)[:, None], cur, axis=1)
        if streaming:
            io_callback(_to_sink, None, step, tok, done, ordered=True)
        done = done | (tok == eos)
        logits, cache = model.apply({"params": params}, tok[:, None], kv_mask, pos[:, None], cache, cur, head,
                                    method="decode")
        return step + 1, tokens, kv_mask, cache, logits[:, 0], done, pos + 1, rng

    state = (jnp.int32(0), tokens, kv_mask, cache, last_logits, jnp.zeros((B,), bool), next_pos, rng)
    step, tokens, *_ = jax.lax.while_loop(cond, body, state)
    return tokens[:, P:], step


_decode = jax.jit(_decode_loop, static_argnames=("model", "cfg", "streaming"))


def generate(model: GPT, params, prompts: Sequence[Sequence[int]], rng, cfg: SamplingConfig, *,
             num_return_sequences: int = 1, bucket: int = 64, stream: Optional[Callable] = None) -> list[list[int]]:
    """Generated token ids per prompt (num_return_sequences rows per prompt, in order), each cut at and
    including EOS. `stream(step, tokens (B,), done (B,))` is called with every step's tokens."""
    prompts = [list(p) for p in prompts for _ in range(num_return_sequences)]
    ids, mask = left_pad(prompts, bucket, cfg.pad_id)
    max_len = ids.shape[1] + cfg.max_new_tokens
    if max_len > model.config.n_positions:
        # positions count real tokens, so only the longest real prompt + new tokens must fit
        longest = max(len(p) for p in prompts)
        if longest + cfg.max_new_tokens > model.config.n_positions:
            raise ValueError(f"prompt of {longest} tokens + {cfg.max_new_tokens} new exceeds n_positions="
                             f"{model.config.n_positions}")
    logits, cache, kv_mask, head = prefill(model, params, jnp.asarray(ids), jnp.asarray(mask), max_len)
    _STREAM_SINK[0] = stream
    try:
        out, steps = _decode(model, params, jnp.asarray(ids), jnp.asarray(mask), logits, cache, kv_mask, head, rng,
                             cfg, stream is not None)
        out, steps = np.asarray(out), int(steps)
    finally:
        _STREAM_SINK[0] = None
    out = out[:, :steps]
    results = []
    for row in out:
        row = row.tolist()
        if cfg.eos_id is not None and cfg.eos_id in row:
            row = row[: row.index(cfg.eos_id) + 1]
        results.append(row)
    return results


# ----------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    from biomedlm_jax import convert
    from biomedlm_jax import tokenizer as tokenizer_lib

    p = argparse.ArgumentParser(prog="python -m biomedlm_jax.generate", description="Generate text with a KV cache")
    p.add_argument("--init_from", required=True, help="hf:DIR or orbax:WORKDIR")
    p.add_argument("--prompt", default=None)
    p.add_argument("--interactive", action="store_true", help="read prompts from the terminal until EOF")
    p.add_argument("--input", default=None, help="JSONL with a 'prompt' per line")
    p.add_argument("--output", default=None, help="JSONL: each input object plus 'completion'")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=0)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--no_repeat_ngram_size", type=int, default=0)
    p.add_argument("--num_return_sequences", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default=None, help="compute and weight dtype, e.g. bfloat16 (default: the checkpoint's)")
    p.add_argument("--quantize", default="none", help="int8: Qwix int8 weight-only quantization (default none)")
    args = p.parse_args(argv)
    if sum(x is not None and x is not False for x in (args.prompt, args.input, args.interactive or None)) != 1:
        p.error("give exactly one of --prompt, --input or --interactive")
    if args.input and not args.output:
        p.error("--input needs --output")

    from biomedlm_jax import quantize

    try:
        quantize.check_mode(args.quantize)
    except ValueError as e:
        p.error(str(e))
    model, params, tok = convert.load_for_inference(args.init_from, args.dtype)
    model, params = quantize.quantize(model, params, args.quantize)
    eos = tok.token_to_id(tokenizer_lib.EOS_TOKEN)
    cfg = SamplingConfig(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.no_repeat_ngram_size,
                         eos_id=eos, pad_id=eos if eos is not None else 0)
    rng = jax.random.PRNGKey(args.seed)

    def run_one(text: str, key) -> None:
        ids = tok.encode(text).ids or [eos]
        emitted: list[int] = []
        printed = [""]

        def stream(step, toks, done):
            if bool(done[0]):
                return
            emitted.append(int(toks[0]))
            if int(toks[0]) == eos:
                return
            full = tok.decode(emitted)
            if not full.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                sys.stdout.write(full[len(printed[0]):])
                sys.stdout.flush()
                printed[0] = full

        generate(model, params, [ids], key, cfg, stream=stream)
        sys.stdout.write("\n")

    if args.prompt is not None:
        for i in range(args.num_return_sequences):
            sys.stdout.write(args.prompt)
            run_one(args.prompt, jax.random.fold_in(rng, i))
        return 0
    if args.interactive:
        i = 0
        while True:
            try:
                text = input("prompt> ")
            except EOFError:
                return 0
            if text.strip():
                run_one(text, jax.random.fold_in(rng, i))
                i += 1
    records = []
    with open(args.input, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                rec["prompt"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise SystemExit(f"{args.input}:{lineno}: expected a JSON object with a 'prompt' ({e})")
            records.append(rec)
    from biomedlm_jax import engine

    n_ret = args.num_return_sequences
    prompts = [tok.encode(r["prompt"]).ids or [eos] for r in records]
    longest = max((len(q) for q in prompts), default=1)
    if longest + cfg.max_new_tokens > model.config.n_positions:
        raise SystemExit(f"{args.input}: a prompt of {longest} tokens + --max_new_tokens={cfg.max_new_tokens} exceeds "
                         f"the model's n_positions={model.config.n_positions}")
    requests = [engine.Request(q, key=jax.random.fold_in(rng, i * n_ret + j)) for i, q in enumerate(prompts)
                for j in range(n_ret)]
    done: dict = {}
    with open(args.output, "w", encoding="utf-8") as out:
        written = [0]

        def on_done(n, ids):  # write each record as soon as it and every record before it are done
            done[n] = tok.decode([t for t in ids if t != eos])
            while all((written[0] * n_ret + j) in done for j in range(n_ret)) and written[0] < len(records):
                texts = [done.pop(written[0] * n_ret + j) for j in range(n_ret)]
                rec = records[written[0]]
                out.write(json.dumps(dict(rec, completion=texts[0] if n_ret == 1 else texts), ensure_ascii=False) + "\n")
                out.flush()
                written[0] += 1

        if requests:
            eng = engine.Engine(model, params, cfg, slots=min(args.batch_size, len(requests)), max_prompt_len=longest)
            eng.run(requests, rng, on_done=on_done)
    print(f"wrote {len(records)} completions to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
