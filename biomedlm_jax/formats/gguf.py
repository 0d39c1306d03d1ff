"""GGUF export for llama.cpp (and everything built on it: llama-cpp-python, ollama, LM Studio).

    python -m biomedlm_jax.convert --from=orbax:WORKDIR --to=gguf:model-f16.gguf  [--gguf_type=F16|Q8_0|F32]
    python -m biomedlm_jax.convert --from=hf:DIR --to=gguf:model-q8_0.gguf --gguf_type=Q8_0

llama.cpp's own converter (convert_hf_to_gguf.py) rejects BioMedLM's tokenizer ("pre-tokenizer not
recognized": it fingerprints tokenizers it knows). This writer needs no fingerprint: it writes the
run's own byte-level BPE (its vocabulary, merges, `<|endoftext|>`, `[PAD]` and any added tokens) with
llama.cpp's "gpt-2" pre-tokenizer, which is GPT-2's split regex, the one BioMedLM's tokenizer uses.

The file is llama.cpp's GPT-2 architecture ("gpt2"):
  * tensors token_embd, position_embd, blk.N.{attn_norm, attn_qkv, attn_output, ffn_norm, ffn_up,
    ffn_down}.{weight,bias}, output_norm, and output.weight: the tied head written as its own copy of
    token_embd, as llama.cpp's converter writes GPT-2 (readers that require it find it). Linear weights
    are stored (out, in), i.e. HF's Conv1D weights transposed;
  * llama.cpp's graph scales attention scores by 1/sqrt(head_dim) only. BioMedLM also divides by
    layer index + 1 (`scale_attn_by_inverse_layer_idx`), and `scale_attn_weights=False` drops the
    1/sqrt: the difference is folded into the query rows of attn_qkv (weight and bias), which
    scales q.k exactly as the model does;
  * its feed-forward is GELU with the tanh approximation (HF "gelu_new", ours by default); a model
    with another activation is refused rather than exported wrong;
  * types: F32, F16 (2-D weights in F16; norms, biases and position embeddings in F32, as llama.cpp's
    converter does), or Q8_0 (2-D weights in blocks of 32 with an f16 scale each, `gguf.quants.quantize`; a tensor whose
    rows are not a multiple of 32 stays F16).
Vocabulary rows beyond the tokenizer's (a model padded to a rounder vocab size) get placeholder
tokens of type UNUSED so llama.cpp's vocabulary matches the embedding. MCQA classifiers carry a task
head that llama.cpp's GPT-2 graph has no place for: `convert` refuses them.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Optional, Sequence

import numpy as np

from biomedlm_jax.data import tokenizer as tokenizer_lib

TYPES = ("F32", "F16", "Q8_0")
TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


class GGUFExportError(ValueError):
    pass


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte -> printable character table (the alphabet of byte-level BPE tokens)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


def tokenizer_metadata(tok, vocab_size: int) -> dict:
    """{"tokens", "types", "merges", "eos", "pad"} for a byte-level BPE `tokenizers.Tokenizer`, the
    token list padded with UNUSED placeholders to `vocab_size`. tok=None gives a placeholder vocabulary
    for benchmarking random-init models: the 256 byte symbols, one merge ("Ġ t" -> "Ġt": llama.cpp
    refuses a BPE vocabulary without merges), then unused tokens."""
    import gguf

    T = gguf.TokenType
    if tok is None:
        if vocab_size < 257:
            raise GGUFExportError(f"a placeholder vocabulary needs >= 257 rows (256 bytes + one merge); the model has {vocab_size}")
        tokens = _bytes_to_unicode() + ["Ġt"] + [f"[UNUSED{i}]" for i in range(vocab_size - 257)]
        types = [T.NORMAL] * 257 + [T.UNUSED] * (vocab_size - 257)
        return {"tokens": tokens, "types": types, "merges": ["Ġ t"], "eos": None, "pad": None}
    spec = json.loads(tok.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise GGUFExportError("GGUF export supports byte-level BPE tokenizers (GPT-2 / BioMedLM); this one has model "
                              f"{model.get('type')!r} and pre-tokenizer {json.dumps(spec.get('pre_tokenizer'))[:80]}")
    pre = spec.get("pre_tokenizer") or {}
    for part in pre.get("pretokenizers") or [pre]:
        if part.get("type") == "ByteLevel" and (part.get("add_prefix_space") or part.get("use_regex") is False):
            raise GGUFExportError(
                f"the tokenizer's ByteLevel pre-tokenizer has add_prefix_space={part.get('add_prefix_space')}, "
                f"use_regex={part.get('use_regex')}; llama.cpp's gpt-2 pre-tokenizer splits with GPT-2's regex and "
                "adds no leading space (BioMedLM's: add_prefix_space=False), so prompts would tokenize differently")
    if spec.get("normalizer") is not None:
        raise GGUFExportError(f"the tokenizer has a normalizer ({json.dumps(spec['normalizer'])[:80]}); llama.cpp's "
                              "gpt-2 tokenizer applies none, so prompts would tokenize differently")
    vocab = tok.get_vocab(with_added_tokens=True)
    n = len(vocab)
    by_id = {i: t for t, i in vocab.items()}
    if sorted(by_id) != list(range(n)):
        missing = sorted(set(range(max(by_id) + 1)) - set(by_id))[:5]
        raise GGUFExportError(f"the tokenizer's ids are not contiguous (missing e.g. {missing}); GGUF needs one token per id")
    if n > vocab_size:
        raise GGUFExportError(f"the tokenizer has {n} tokens but the model's embedding only {vocab_size} rows")
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(n):
        tokens.append(by_id[i])
        if i in added:  # special (<|endoftext|>, [PAD], [SEP]) -> CONTROL; plain added tokens -> USER_DEFINED
            types.append(T.CONTROL if added[i].get("special") else T.USER_DEFINED)
        else:
            types.append(T.NORMAL)
    tokens += [f"[UNUSED{i}]" for i in range(n, vocab_size)]
    types += [T.UNUSED] * (vocab_size - n)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if not merges:
        raise GGUFExportError("the tokenizer has no BPE merges; llama.cpp refuses a GPT-2 vocabulary without them")
    pad = next((tok.token_to_id(p) for p in ("[PAD]", "<|pad|>") if tok.token_to_id(p) is not None), None)
    return {"tokens": tokens, "types": types, "merges": merges, "eos": tok.token_to_id(tokenizer_lib.EOS_TOKEN),
            "pad": pad}


_BLOCK = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
          "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
_TOP = {"wte.weight": ("token_embd.weight", "output.weight"), "wpe.weight": ("position_embd.weight",),
        "ln_f.weight": ("output_norm.weight",), "ln_f.bias": ("output_norm.bias",)}


def _names(hf_name: str) -> tuple[str, ...]:
    """GGUF names of an HF tensor (the tied embedding is also written as output.weight)."""
    if hf_name in _TOP:
        return _TOP[hf_name]
    _, i, rest = hf_name.split(".", 2)  # h.{i}.{module}.{weight|bias}
    module, kind = rest.rsplit(".", 1)
    return (f"blk.{i}.{_BLOCK[module]}.{kind}",)


def gguf_shapes(cfg) -> list[tuple[str, tuple]]:
    """(GGUF name, shape) of every tensor in file order, from the config alone (2-D weights (out, in))."""
    from biomedlm_jax.formats import hf

    out = []
    for hf_name, _, hf_shape, _ in hf.layout(cfg):
        transposed = len(hf_shape) == 2 and hf_name.startswith("h.")
        out += [(n, tuple(reversed(hf_shape)) if transposed else tuple(hf_shape)) for n in _names(hf_name)]
    return out


def iter_gguf_tensors(params, cfg):
    """(GGUF name, fp32 array in GGUF's (out, in) layout) one tensor at a time, in `gguf_shapes` order,
    with the attention scaling folded into q."""
    from biomedlm_jax.formats import hf

    check_exportable(cfg)
    C, hd = cfg.d_model, cfg.head_dim
    for name, arr in hf.iter_hf(params, cfg, np.float32):
        hf_name = name.removeprefix("transformer.")
        if hf_name.startswith("h."):
            i = int(hf_name.split(".")[1])
            if ".attn.c_attn." in hf_name:  # Conv1D (in, 3C) / (3C,): entries [0, C) of the last axis are q
                ours = (1.0 / np.sqrt(hd) if cfg.scale_attn_weights else 1.0) / (
                    i + 1 if cfg.scale_attn_by_inverse_layer_idx else 1)
                fold = np.ones(3 * C, np.float32)
                fold[:C] = ours * np.sqrt(hd)  # llama.cpp multiplies q.k by 1/sqrt(hd); q * fold makes it `ours`
                arr = arr * fold
            if arr.ndim == 2:
                arr = np.ascontiguousarray(arr.T)  # Conv1D (in, out) -> (out, in)
        for g_name in _names(hf_name):
            yield g_name, arr


def check_exportable(cfg) -> None:
    if cfg.activation not in TANH_GELU:
        raise GGUFExportError(f"activation={cfg.activation!r}: llama.cpp's GPT-2 graph computes tanh-GELU "
                              f"({', '.join(TANH_GELU)}); this model would run differently there")


def _storage(name: str, shape: tuple, ftype: str) -> str:
    """How a tensor is stored: F32 for vectors, position embeddings and F32 files; Q8_0 where rows
    split into blocks of 32; else F16."""
    if len(shape) == 1 or ftype == "F32" or name == "position_embd.weight":
        return "F32"
    if ftype == "Q8_0" and shape[-1] % 32 == 0:
        return "Q8_0"
    return "F16"


def write_gguf(cfg, params, tok, path: str, ftype: str = "F16", name: str = "biomedlm-jax") -> str:
    """Write `params` (a GPT's float params, unscanned or scanned) and `tok` as a GGUF file."""
    import gguf

    ftype = ftype.upper()
    if ftype not in TYPES:
        raise GGUFExportError(f"GGUF type {ftype!r}: choose from {', '.join(TYPES)}")
    check_exportable(cfg)  # before anything is written
    meta = tokenizer_metadata(tok, cfg.vocab_size)
    Q = gguf.GGMLQuantizationType
    file_type = {"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
                 "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[ftype]
    tmp = f"{path}.tmp-{os.getpid()}"  # written whole, then renamed: a killed export leaves no half file
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    w = gguf.GGUFWriter(tmp, "gpt2")
    w.add_name(name)
    w.add_context_length(cfg.n_positions)
    w.add_embedding_length(cfg.d_model)
    w.add_feed_forward_length(cfg.ffn_dim)
    w.add_block_count(cfg.n_layer)
    w.add_head_count(cfg.n_head)
    w.add_layer_norm_eps(cfg.layer_norm_epsilon)
    w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(meta["tokens"])
    w.add_token_types(meta["types"])
    w.add_token_merges(meta["merges"])
    if meta["eos"] is not None:
        w.add_bos_token_id(meta["eos"])  # GPT-2 has one <|endoftext|> for both
        w.add_eos_token_id(meta["eos"])
    if meta["pad"] is not None:
        w.add_pad_token_id(meta["pad"])
    w.add_add_bos_token(False)  # BioMedLM's prompts start with their first text token
    # Streaming: every tensor's info first (from the config), then each tensor computed, converted and
    # written in turn, so the export holds one tensor (in fp32 and as stored) beyond the params.
    plan = gguf_shapes(cfg)
    for tname, shape in plan:
        kind = _storage(tname, shape, ftype)
        n = int(np.prod(shape))
        if kind == "Q8_0":
            byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, Q.Q8_0)
            w.add_tensor_info(tname, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=Q.Q8_0)
        else:
            dt = np.dtype(np.float32 if kind == "F32" else np.float16)
            w.add_tensor_info(tname, shape, dt, n * dt.itemsize)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for (tname, shape), (got, arr) in zip(plan, iter_gguf_tensors(params, cfg), strict=True):
            if got != tname or arr.shape != shape:
                raise GGUFExportError(f"tensor {got} {arr.shape} where {tname} {shape} was planned")
            kind = _storage(tname, shape, ftype)
            if kind == "Q8_0":
                w.write_tensor_data(gguf.quants.quantize(arr, Q.Q8_0))
            else:
                w.write_tensor_data(arr.astype(np.float32 if kind == "F32" else np.float16, copy=False))
            del arr
    except BaseException:
        w.close()
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    w.close()
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------------------------------
# Running a GGUF file in llama.cpp (llama-cpp-python): the tests' and benchmarks' reference
# ----------------------------------------------------------------------------------------------------


# llama.cpp's CPU backend "extra buffer types" (llama_model_params.use_extra_bufts, on by default) copy
# the weights into layouts of its own at load time: AMX tiles on CPUs with Intel AMX (Sapphire Rapids
# and later Xeons) and repacked (interleaved) blocks for some quantized types. On AMX hosts the AMX
# path segfaults in ggml_backend_amx_mul_mat (llama.cpp issue 20824, open, no upstream fix): every
# Q8_0 GPT-2 file crashed llama-cpp-python 0.3.36 there, at every width tried, while F32 and F16 ran.
# With extra buffers off the same files run. So they are off wherever AMX is reported, and on
# elsewhere (llama.cpp's default); `extra_bufts=True` turns them back on. llama.cpp's own command
# line calls this `--no-repack` (-nr, env LLAMA_ARG_NO_REPACK); docs/inference.md has the details.
EXTRA_BUFTS_CHOICES = ("auto", "on", "off")


def cpu_has_amx(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether the CPU's flags (Linux /proc/cpuinfo) include Intel AMX (amx_int8, amx_bf16 or amx_tile)."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags") and {"amx_int8", "amx_bf16", "amx_tile"} & set(line.split()):
                    return True
    except OSError:
        return False
    return False


def llama_cpp_reports_amx() -> bool:
    """Whether the installed llama.cpp build reports AMX (`AMX_INT8 = 1` in llama_print_system_info;
    llama-cpp-python builds llama.cpp for the CPU of the host that installs it)."""
    import llama_cpp

    return b"AMX_INT8 = 1" in llama_cpp.llama_print_system_info()


def extra_bufts_setting(choice) -> bool:
    """The `use_extra_bufts` to load with: True/"on" and False/"off" as given; None/"auto" is off when
    AMX is reported (by the CPU's flags or by the llama.cpp build) and on otherwise."""
    if choice in (True, "on"):
        return True
    if choice in (False, "off"):
        return False
    if choice not in (None, "auto"):
        raise ValueError(f"extra_bufts={choice!r}: choose from {', '.join(EXTRA_BUFTS_CHOICES)}")
    return not (cpu_has_amx() or llama_cpp_reports_amx())


@contextlib.contextmanager
def llama_extra_bufts(on: bool):
    """Every llama_cpp.Llama created inside loads with `use_extra_bufts=on` (llama-cpp-python has no
    argument for it: its Llama starts from llama_model_default_params(), which this wraps)."""
    import llama_cpp.llama_cpp as C

    default = C.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = on
        return p

    C.llama_model_default_params = params
    try:
        yield
    finally:
        C.llama_model_default_params = default


def load_llama(path: str, n_ctx: int = 0, n_threads: Optional[int] = None, logits_all: bool = False,
               extra_bufts=None):
    """llama_cpp.Llama on a GGUF file, on the CPU, quiet (logits_all: keep every position's logits).
    extra_bufts: None/"auto" (off where AMX is reported, see above), True/"on" or False/"off"."""
    from llama_cpp import Llama

    on = extra_bufts_setting(extra_bufts)
    with llama_extra_bufts(on):
        llm = Llama(model_path=path, n_ctx=n_ctx, n_threads=n_threads or os.cpu_count(), n_batch=512,
                    n_gpu_layers=0, verbose=False, logits_all=logits_all)
    if bool(llm.model_params.use_extra_bufts) != on:  # a llama-cpp-python that no longer starts from the defaults
        raise RuntimeError(f"llama-cpp-python loaded {path} with use_extra_bufts="
                           f"{bool(llm.model_params.use_extra_bufts)}, not {on}")
    return llm


def llama_cpp_server_main(argv: Optional[Sequence[str]] = None) -> None:
    """llama-cpp-python's OpenAI server (`python -m llama_cpp.server ARGS`) with extra buffers set as
    load_llama sets them: `--extra_bufts=auto|on|off` (default auto) before the server's own flags."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    choice = "auto"
    for a in list(argv):
        if a.startswith("--extra_bufts="):
            choice = a.split("=", 1)[1]
            argv.remove(a)
    on = extra_bufts_setting(choice)
    from llama_cpp.server.__main__ import main

    sys.argv = ["llama_cpp.server"] + argv
    with llama_extra_bufts(on):
        main()


def llama_logits(llm, ids: Sequence[int]) -> np.ndarray:
    """(T, V) logits of every position of `ids` in llama.cpp (teacher forcing; needs logits_all)."""
    llm.reset()
    llm.eval(list(ids))
    return np.array(llm.scores[: len(ids)])


def _last_logits(llm) -> np.ndarray:
    import llama_cpp

    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)).copy()


def llama_greedy(llm, prompt: Sequence[int], new: int, eos: Optional[int] = None) -> tuple[list[int], list]:
    """llama.cpp greedy decoding of `new` tokens after `prompt` (ids), stopping after `eos`:
    (tokens, each step's logits)."""
    llm.reset()
    llm.eval(list(prompt))
    out, logits = [], []
    for _ in range(new):
        lg = _last_logits(llm)
        logits.append(lg)
        t = int(np.argmax(lg))
        out.append(t)
        if t == eos:
            break
        llm.eval([t])
    return out, logits


def time_llama_cpp(path: str, prompt: Sequence[int], new: int, repeats: int = 3, extra_bufts=None) -> float:
    """Best seconds over `repeats` of prefill + `new` greedy steps in llama.cpp at batch 1."""
    llm = load_llama(path, n_ctx=len(prompt) + new + 1, extra_bufts=extra_bufts)
    llama_greedy(llm, prompt, min(new, 4))  # warm up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        llama_greedy(llm, prompt, new)
        best = min(best, time.perf_counter() - t0)
    return best
