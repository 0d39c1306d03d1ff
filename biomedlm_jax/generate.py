"""Fast generation: a static-shape KV cache, one jitted prefill and one jitted decode loop.

    python -m biomedlm_jax.generate --init_from=hf:DIR|orbax:WORKDIR --prompt="Metformin is" \
        [--max_new_tokens=64 --temperature=0.7 --top_k=50 --top_p=0.95 --seed=0 --no_repeat_ngram_size=6]
    python -m biomedlm_jax.generate --init_from=... --interactive
    python -m biomedlm_jax.generate --init_from=... --input=prompts.jsonl --output=out.jsonl [--batch_size=16]
    ... [--quantize=int8]   # int8 weights (models/quantize.py), any of the three modes

`--input` runs the continuous-batching engine (inference/engine.py) with `--batch_size` slots: a finished
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
import json
import sys

import jax

from biomedlm_jax.core import errors
from biomedlm_jax.inference.generate import generate
from biomedlm_jax.inference.sampling import SamplingConfig


def main(argv=None) -> int:
    from biomedlm_jax.data import tokenizer as tokenizer_lib
    from biomedlm_jax.formats import loading

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
    errors.add_verbose_flag(p)
    args = p.parse_args(argv)
    if sum(x is not None and x is not False for x in (args.prompt, args.input, args.interactive or None)) != 1:
        p.error("give exactly one of --prompt, --input or --interactive")
    if args.input and not args.output:
        p.error("--input needs --output")

    from biomedlm_jax.models import quantize

    try:
        quantize.check_mode(args.quantize)
    except ValueError as e:
        p.error(str(e))
    try:
        model, params, tok = loading.load_for_inference(args.init_from, args.dtype)
    except (ValueError, FileNotFoundError) as e:  # CheckpointError, CheckpointDamaged, a missing checkpoint
        print(f"generate: error: {e}", file=sys.stderr)
        return 1
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
    from biomedlm_jax.inference import engine

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
