"""The llama.cpp side of tests/test_gguf.py: each function loads a GGUF file in llama-cpp-python and
returns plain data. The tests call them through isolation.run_isolated, in a process of their own, so
a crash in llama.cpp (issue 44: Q8_0 on AMX hosts) fails that test, not the run. No JAX here: a
spawned process imports only this module, numpy and llama_cpp."""
from __future__ import annotations

import numpy as np

from biomedlm_jax.formats import gguf


def logits(path, ids, extra_bufts=None) -> np.ndarray:
    """(T, V) logits of every position of `ids`."""
    return gguf.llama_logits(gguf.load_llama(path, n_ctx=len(ids), logits_all=True, extra_bufts=extra_bufts), ids)


def greedy(path, prompts, new, eos=None, n_ctx=128) -> list:
    """llama.cpp's greedy continuation of each prompt (ids)."""
    llm = gguf.load_llama(path, n_ctx=n_ctx)
    return [gguf.llama_greedy(llm, p, new, eos)[0] for p in prompts]


def many_logits(path, sequences, n_ctx=128) -> list:
    llm = gguf.load_llama(path, n_ctx=n_ctx, logits_all=True)
    return [gguf.llama_logits(llm, ids) for ids in sequences]


def tokenizer_view(path, texts, ids_lists, n_ctx=256) -> dict:
    """What llama.cpp makes of the file's vocabulary: its ids for `texts` (special tokens parsed),
    its text for `ids_lists`, the vocabulary size and the end-of-text id."""
    llm = gguf.load_llama(path, n_ctx=n_ctx)
    return {"ids": [llm.tokenize(t.encode("utf-8"), add_bos=False, special=True) for t in texts],
            "texts": [llm.detokenize(ids, special=True).decode("utf-8") for ids in ids_lists],
            "n_vocab": llm.n_vocab(), "eos": llm.token_eos()}


def loaded_extra_bufts(path, extra_bufts=None, cpu_reports_amx=None) -> bool:
    """The use_extra_bufts llama.cpp loaded `path` with; cpu_reports_amx=True/False stands in for the
    CPU's flags (a host without AMX can check what an AMX host gets)."""
    if cpu_reports_amx is not None:
        gguf.cpu_has_amx = lambda *a, **k: cpu_reports_amx
    return bool(gguf.load_llama(path, n_ctx=16, extra_bufts=extra_bufts).model_params.use_extra_bufts)


def crash(path, segfault_first=False) -> None:
    """The isolation test's stand-in for llama.cpp's crash: a SIGSEGV (segfault_first), else whatever
    loading `path` raises."""
    import ctypes

    if segfault_first:
        ctypes.string_at(0)
    gguf.load_llama(path, n_ctx=16)


def load_log(path, extra_bufts) -> str:
    """llama.cpp's log of loading `path` (verbose), for checking which buffer types it considered."""
    import contextlib
    import io

    from llama_cpp import Llama

    err = io.StringIO()
    with contextlib.redirect_stderr(err), gguf.llama_extra_bufts(extra_bufts):
        Llama(model_path=path, n_ctx=16, n_gpu_layers=0, verbose=True)
    return err.getvalue()


def build_reports_amx() -> bool:
    return gguf.llama_cpp_reports_amx()
