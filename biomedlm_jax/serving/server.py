"""A model behind the OpenAI-compatible API: load it, size the engine, warm it up, serve with uvicorn.

    srv = build("hf:DIR", slots=16, max_len=1024)     # or Server(model, params, tokenizer, ...)
    srv.run("127.0.0.1", 8000)                         # blocks; or, in a thread (tests, notebooks):
    with srv.serving(port=0) as url: ...               # url = "http://127.0.0.1:PORT"
"""
from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from typing import Optional, Sequence

import jax

from biomedlm_jax.inference import engine as engine_lib
from biomedlm_jax.inference.sampling import SamplingConfig
from biomedlm_jax.serving import api
from biomedlm_jax.serving.batcher import Batcher
from biomedlm_jax.serving.chat import PromptTemplate

log = logging.getLogger("biomedlm_jax.serve")


class Server:
    def __init__(self, model, params, tokenizer, *, model_name: str, eos_id: int, slots: int = 16,
                 max_len: Optional[int] = None, max_tokens_limit: Optional[int] = None, bucket: int = 64,
                 steps_per_sync: int = 8, max_queue: Optional[int] = None, max_logprobs: int = 5,
                 no_repeat_ngram_size: int = 0, warmup: bool = True, mesh=None, max_body_bytes: Optional[int] = None,
                 api_key: Optional[str] = None, cors_origins: Sequence[str] = (), shutdown_timeout: float = 30.0,
                 request_timeout: Optional[float] = None, stall_timeout: float = 60.0,
                 prompt_template: Optional[PromptTemplate] = None):
        max_len = max_len or model.config.n_positions
        limit = max_len - 1 if max_tokens_limit is None else max_tokens_limit
        if not 0 <= limit < max_len:
            raise ValueError(f"--max_tokens_limit={limit} must be in [0, max_len={max_len})")
        cfg = SamplingConfig(max_new_tokens=limit, temperature=1.0, no_repeat_ngram_size=no_repeat_ngram_size,
                             eos_id=eos_id, pad_id=eos_id)
        self.engine = engine_lib.Engine(model, params, cfg, slots=slots, max_len=max_len, bucket=bucket,
                                        steps_per_sync=steps_per_sync, detokenize=tokenizer.decode,
                                        logprobs=max_logprobs, mesh=mesh)
        self.warm_up = None
        if warmup:  # every program a request may need, compiled before the port opens
            t0 = time.perf_counter()
            self.warm_up = self.engine.warm_up()
            # and one request end to end (the small per-request ops: keys, host transfers)
            key = jax.random.fold_in(jax.random.key(0), 0)
            self.engine.run([engine_lib.Request([eos_id], 2, key=key, temperature=1.0, top_k=2, top_p=0.9,
                                                logprobs=True)])
            self.warm_up["seconds"] = time.perf_counter() - t0
            log.info("warm-up: %d programs compiled in %.1f s (prompt buckets x prefill batches, inserts, "
                     "decode with and without logprobs)", self.warm_up["programs"], self.warm_up["seconds"])
        self.batcher = Batcher(self.engine, max_queue or 4 * slots, stall_timeout=stall_timeout).start()
        self.app = api.create_app(self.batcher, tokenizer, model_name, eos_id, max_logprobs, max_body_bytes,
                                  api_key=api_key, cors_origins=cors_origins, request_timeout=request_timeout,
                                  prompt_template=prompt_template)
        self.shutdown_timeout = shutdown_timeout
        self.model_name = model_name

    def run(self, host: str, port: int) -> None:
        """Serve until interrupted (SIGINT / SIGTERM)."""
        log.info("serving %s on http://%s:%d/v1 (%d slots, max_len %d)", self.model_name, host, port,
                 self.engine.slots, self.engine.max_len)
        try:
            # on SIGINT / SIGTERM: stop accepting, let requests in flight finish for at most shutdown_timeout s
            _uvicorn(self.app, host=host, port=port, timeout_graceful_shutdown=self.shutdown_timeout).run()
        finally:
            self.batcher.close()

    def serving(self, host: str = "127.0.0.1", port: int = 0):
        """Serve from a thread while a `with` block runs; yields the base URL (port 0: a free port)."""
        return in_thread(self.app, host, port)

    def close(self) -> None:
        self.batcher.close()


def _uvicorn(app, **kw):
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, **kw))


@contextlib.contextmanager
def in_thread(app, host: str = "127.0.0.1", port: int = 0):
    """Serve `app` from a thread while the block runs; yields the base URL (port 0: a free port)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    srv = _uvicorn(app)
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not srv.started:
        if not thread.is_alive():
            raise RuntimeError("the HTTP server did not start")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        srv.should_exit = True
        thread.join(10)
        sock.close()


def build(init_from: str, *, quantize: str = "none", dtype: Optional[str] = None, model_name: str = "model",
          mesh_shape: Optional[str] = None, **kw) -> Server:
    """A Server for any checkpoint source (hf:, orbax:, peft:), with int8 weights if asked. With
    `mesh_shape` ("data,fsdp,tensor" over this host's devices, one axis may be -1) the weights are
    sharded by the trainer's rules and the decode slots split over data x fsdp; without it, one device."""
    import jax

    from biomedlm_jax.data import tokenizer as tokenizer_lib
    from biomedlm_jax.formats import loading
    from biomedlm_jax.models import quantize as quantize_lib
    from biomedlm_jax.models import sharding

    model, params, tok = loading.load_for_inference(init_from, dtype)
    if kw.get("prompt_template") is None:  # a seq2seq fine-tune's run carries the template it trained on
        kw["prompt_template"] = run_prompt_template(init_from)
    mesh = None
    if mesh_shape:
        mesh = sharding.make_mesh(sharding.parse_mesh_shape(mesh_shape), devices=jax.local_devices())
        ways = mesh.shape["data"] * mesh.shape["fsdp"]
        if kw.get("slots", 16) % ways:
            raise ValueError(f"--slots={kw.get('slots', 16)} must be a multiple of the mesh's data x fsdp ways "
                             f"({ways}, from --mesh_shape={mesh_shape})")
        params, _ = sharding.place_params(model, params, mesh)  # int8 copies keep the placed shardings
    model, params = quantize_lib.quantize(model, params, quantize)
    if mesh is not None:
        kw["mesh"] = mesh
    eos = tok.token_to_id(tokenizer_lib.EOS_TOKEN)
    if eos is None:
        raise ValueError(f"{init_from}: the tokenizer has no {tokenizer_lib.EOS_TOKEN} token")
    return Server(model, params, tok, model_name=model_name, eos_id=eos, **kw)


def run_prompt_template(init_from: str) -> Optional[PromptTemplate]:
    """The prompt template an orbax run was fine-tuned with (its checkpoint meta), else None."""
    from biomedlm_jax.formats import checkpoint, sources

    src = sources.parse(init_from, "--init_from", sources.KINDS)
    if src.kind != "orbax":
        return None
    return PromptTemplate.from_meta(checkpoint.read_meta(src.path)[1])
