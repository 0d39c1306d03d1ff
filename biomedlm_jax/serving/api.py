"""The OpenAI-compatible HTTP API over a `Batcher` (FastAPI): any OpenAI client can use the model.

    POST /v1/completions   prompt (a string, a list of strings, token ids or lists of them), max_tokens,
                           temperature, top_p, top_k (an extension, as vLLM has it), stop, seed, stream
                           (server-sent events), logprobs (0..--max_logprobs), n=1, echo=false
    GET  /v1/models        the one model served
    POST /v1/chat/completions  one user turn through the run's prompt template (seq2seq fine-tunes; see
                           serving.chat), answered in the chat shape; 404 naming /v1/completions without one
    POST /tokenize         {"prompt"} -> {"tokens", "count", "max_model_len"}  (vLLM's shape)
    POST /detokenize       {"tokens"} -> {"prompt"}
    GET  /health           ok, slots, active, queued and counters; 503 while the engine is down, being
                           rebuilt, or stalled with work waiting (Batcher.health)
    GET  /metrics          Prometheus (serving.metrics)

With --request_timeout a completion is cancelled once that many seconds have passed since it arrived;
its unfinished choices end with finish_reason "timeout" and the server logs it.

With --api_key every route but /health needs `Authorization: Bearer KEY` (401 otherwise); with
--cors_origins browsers on those origins may call it. Every response, whatever its status, carries an
`X-Request-Id` (the client's, or a new one) and gets one access-log line.

Errors have OpenAI's shape, {"error": {"message", "type", "param", "code"}}, on every route: 400 for bad
JSON, unknown fields, out-of-range values (top_k above the vocabulary, a seed outside int64), prompts
that do not fit the context (naming the field; a text too long to fit is refused before it is
tokenized), more prompts than the queue can ever hold, and a body over --max_body_bytes (default: what the largest acceptable request needs); 404 for
another model's name and unknown routes, 405 for
a wrong method, 429 with Retry-After when the queue is full now, 503 when the engine thread has died
(/health then answers 503 too). A client that disconnects, streamed
or not, frees its slot at the engine's next sync. Each request logs one line: prompts, tokens, time to
first token, latency, finish reasons.

Each prompt of a request is one engine request; a list of prompts gives one choice per prompt (index in
prompt order). Sampling a prompt uses the key fold_in(key(seed), prompt index), so a request with a seed
repeats its answer (with jax's default threefry keys, whatever else the server is doing).
"""
from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid
from typing import Literal, Optional, Sequence, Union

import jax
import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from biomedlm_jax.inference import engine as engine_lib
from biomedlm_jax.serving import chat as chat_lib
from biomedlm_jax.serving import metrics as metrics_lib
from biomedlm_jax.serving.batcher import Batcher, Job, Overloaded
from biomedlm_jax.serving.choice import Choice
from biomedlm_jax.serving.http import AccessLog, ApiError, ApiKey, BodyLimit

log = logging.getLogger("biomedlm_jax.serve")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class CompletionRequest(BaseModel):
    """The fields of OpenAI's legacy completions request. Fields it defines that this server does not
    implement are accepted only at their neutral value; any other field is an error."""

    model_config = ConfigDict(extra="forbid")
    model: Optional[str] = None
    prompt: Union[str, list[str], list[StrictInt], list[list[StrictInt]]]
    max_tokens: Optional[int] = Field(16, ge=0)
    temperature: Optional[float] = Field(1.0, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(1.0, gt=0.0, le=1.0)
    top_k: Optional[int] = Field(0, ge=0)  # and at most the vocabulary (Completions.jobs)
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = Field(None, ge=-2**63, lt=2**63)
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    logprobs: Optional[int] = Field(None, ge=0)
    n: Optional[int] = Field(1, ge=1, le=1)
    best_of: Optional[int] = Field(None, ge=1, le=1)
    echo: Optional[Literal[False]] = False
    suffix: Optional[Literal[None]] = None
    presence_penalty: Optional[float] = Field(0.0, ge=0.0, le=0.0)
    frequency_penalty: Optional[float] = Field(0.0, ge=0.0, le=0.0)
    logit_bias: Optional[dict[str, float]] = Field(None, max_length=0)
    user: Optional[str] = None


def _validation_error(exc: ValidationError) -> ApiError:
    """The 400 for a request body pydantic refused (its first error, the field named)."""
    err = exc.errors()[0]
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    param = loc[0] if loc else None
    if err.get("type") == "json_invalid":
        return ApiError(400, f"the request body is not valid JSON ({err.get('ctx', {}).get('error', err['msg'])})")
    if err.get("type") == "extra_forbidden":
        return ApiError(400, f"unknown field '{'.'.join(loc)}'", param, code="unknown_field")
    if err.get("type") == "missing":
        return ApiError(400, f"'{'.'.join(loc)}' is required", param)
    shown = ".".join(x for x in loc if not x.isdigit() and x not in ("list[int]", "str", "list[str]",
                                                                     "list[list[int]]", "int", "float"))
    return ApiError(400, f"'{shown or param}': {err['msg']}", param)


class Completions:
    """What one /v1/completions request needs: the tokenizer, the engine's limits and the batcher."""

    def __init__(self, batcher: Batcher, tokenizer, model_name: str, eos_id: int, max_logprobs: int):
        self.batcher, self.tok, self.model_name = batcher, tokenizer, model_name
        self.eos_id, self.max_logprobs = eos_id, max_logprobs
        self.engine = batcher.engine
        # No token is longer than the longest vocabulary entry (byte-level: at most one character per
        # byte), so a text longer than max_len such tokens cannot fit: refused before tokenizing it.
        self.max_prompt_chars = self.engine.max_len * max(map(len, tokenizer.get_vocab()), default=1)

    def check_model(self, name: Optional[str]) -> None:
        if self.model_name and name not in (None, self.model_name):
            raise ApiError(404, f"the model '{name}' does not exist; this server has '{self.model_name}'",
                           "model", code="model_not_found")

    def check_fits(self, text: str, what: str) -> None:
        """Refuse, before tokenizing, a text too long for any tokenization of it to fit the context."""
        if len(text) > self.max_prompt_chars:
            raise ApiError(400, f"{what}: {len(text)} characters cannot fit this model's context "
                           f"(max_len={self.engine.max_len} tokens)", "prompt", code="context_length_exceeded")

    def check_ids(self, ids, what: str, param: str) -> None:
        vocab = self.engine.model.config.vocab_size
        arr = np.asarray(ids, dtype=np.int64)
        if arr.size and (arr.min() < 0 or arr.max() >= vocab):
            raise ApiError(400, f"{what}: token ids must be in [0, {vocab})", param)

    def prompts(self, req: CompletionRequest) -> list[list[int]]:
        p = req.prompt
        if isinstance(p, str):
            p = [p]
        if not p:
            raise ApiError(400, "'prompt' is empty", "prompt")
        if isinstance(p[0], int):
            p = [p]
        if len(p) > self.batcher.max_queue:
            raise ApiError(400, f"{len(p)} prompts in one request; this server queues at most {self.batcher.max_queue} "
                           "(its --max_queue): send fewer per request", "prompt", code="too_many_prompts")
        out = []
        for i, item in enumerate(p):
            if isinstance(item, str):
                self.check_fits(item, f"prompt {i}")
            ids = self.tok.encode(item).ids if isinstance(item, str) else list(item)
            self.check_ids(ids, f"'prompt' {i}", "prompt")
            out.append(ids or [self.eos_id])
        return out

    def jobs(self, req: CompletionRequest, prompts: list, sinks: list) -> list[Job]:
        self.check_model(req.model)
        vocab = self.engine.model.config.vocab_size
        if req.top_k and req.top_k > vocab:
            raise ApiError(400, f"'top_k' must be at most the vocabulary size, {vocab}", "top_k")
        if req.logprobs is not None and req.logprobs > self.max_logprobs:
            raise ApiError(400, f"'logprobs' must be at most {self.max_logprobs} (the server's --max_logprobs)",
                           "logprobs")
        limit = self.engine.cfg.max_new_tokens
        room = self.engine.max_len - max(map(len, prompts))  # max_tokens null: what the context leaves
        max_tokens = max(0, min(limit, room)) if req.max_tokens is None else req.max_tokens
        if max_tokens > limit:
            raise ApiError(400, f"'max_tokens' is {max_tokens}; this server allows at most {limit}", "max_tokens")
        for i, ids in enumerate(prompts):
            try:
                self.engine.check(len(ids), max_tokens)
            except ValueError as e:
                raise ApiError(400, f"prompt {i}: {e} (this model's context: max_len={self.engine.max_len} tokens, "
                               "prompt + max_tokens)", "prompt", code="context_length_exceeded") from None
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > 4 or any(not s for s in stop):
            raise ApiError(400, "'stop' takes up to 4 non-empty strings", "stop")
        seed = secrets.randbits(31) if req.seed is None else req.seed
        base = jax.random.key(seed)
        temperature = 1.0 if req.temperature is None else req.temperature
        return [Job(engine_lib.Request(ids, max_tokens, tuple(stop), jax.random.fold_in(base, i), temperature,
                                       req.top_k or 0, 1.0 if req.top_p is None else req.top_p,
                                       logprobs=req.logprobs is not None), sink)
                for i, (ids, sink) in enumerate(zip(prompts, sinks))]


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: Optional[str] = None
    prompt: str


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: Optional[str] = None
    tokens: list[StrictInt]


ROUTES = ("POST /v1/completions, POST /v1/chat/completions, GET /v1/models, POST /tokenize, POST /detokenize, "
          "GET /health, GET /metrics")


def default_body_limit(max_queue: int, max_len: int) -> int:
    """The largest body an acceptable request needs: every prompt the queue can hold at the full
    context, 8 bytes a token (a JSON token id with its comma, or a token's text, escapes included, for
    ordinary text), plus 64 KiB for the other fields. 16 slots at 1,024 tokens: 576 KiB."""
    return max_queue * max_len * 8 + (64 << 10)


def create_app(batcher: Batcher, tokenizer, model_name: str, eos_id: int, max_logprobs: int = 5,
               max_body_bytes: Optional[int] = None, api_key: Optional[str] = None,
               cors_origins: Sequence[str] = (), request_timeout: Optional[float] = None,
               prompt_template: Optional[chat_lib.PromptTemplate] = None) -> FastAPI:
    """The app. request_timeout: seconds a completion may take from arrival (queueing included); then
    it is cancelled and its unfinished choices end with finish_reason "timeout". prompt_template: what
    /v1/chat/completions applies to a user turn (None: that route says to use /v1/completions)."""
    app = FastAPI(title="biomedlm-jax", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = metrics_lib.Metrics(batcher)
    batcher.on_admit = metrics.on_admit
    # middleware, innermost first: body limit, API key, CORS (preflights answered before the key check),
    # access log and request id (outermost: every response is logged, refusals included)
    app.add_middleware(BodyLimit, limit=max_body_bytes or default_body_limit(batcher.max_queue, batcher.engine.max_len))
    if api_key:
        app.add_middleware(ApiKey, key=api_key)
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["*"], expose_headers=["X-Request-Id"])
    app.add_middleware(AccessLog, on_response=lambda status: metrics.responses.labels(str(status)).inc())
    comp = Completions(batcher, tokenizer, model_name, eos_id, max_logprobs)
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def _api_error(request, exc):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):  # unknown routes (404) and methods (405), in OpenAI's shape
        where = f"{request.method} {request.url.path}"
        if exc.status_code in (404, 405):
            message = f"{where}: no such route; this server has {ROUTES}"
        else:
            message = f"{where}: {exc.detail}"
        return ApiError(exc.status_code, message, code="not_found" if exc.status_code == 404 else None,
                        headers=getattr(exc, "headers", None)).response()

    @app.get("/health")
    async def health():
        problem = batcher.health()
        body = {"status": problem or "ok", "model": model_name, "slots": batcher.engine.slots,
                "active": batcher.active, "queued": batcher.queued, "max_len": batcher.engine.max_len,
                **batcher.stats}
        return JSONResponse(body, status_code=503 if problem else 200)

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(metrics.exposition(), media_type=metrics_lib.CONTENT_TYPE)

    async def parse(request: Request, kind):
        try:  # parsed and validated in a worker thread: a large body does not hold up the event loop
            return await asyncio.to_thread(kind.model_validate_json, await request.body())
        except ValidationError as e:
            raise _validation_error(e) from None

    @app.post("/tokenize")
    async def tokenize(request: Request):
        """vLLM's shape: {"prompt"} -> {"tokens", "count", "max_model_len"}."""
        body = await parse(request, TokenizeRequest)
        comp.check_model(body.model)
        comp.check_fits(body.prompt, "'prompt'")
        ids = await asyncio.to_thread(lambda: tokenizer.encode(body.prompt).ids)
        return {"tokens": ids, "count": len(ids), "max_model_len": batcher.engine.max_len}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        """{"tokens"} -> {"prompt"} (the text those ids decode to)."""
        body = await parse(request, DetokenizeRequest)
        comp.check_model(body.model)
        comp.check_ids(body.tokens, "'tokens'", "tokens")
        return {"prompt": await asyncio.to_thread(tokenizer.decode, body.tokens, skip_special_tokens=False)}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "biomedlm-jax", "max_model_len": batcher.engine.max_len}]}

    def refuse_if_down():
        if not batcher.alive:
            raise ApiError(503, "the engine is not running; see the server's log", kind="server_error",
                           code="engine_down")

    @app.post("/v1/completions")
    async def completions(request: Request):
        t0 = time.perf_counter()
        body = await parse(request, CompletionRequest)
        refuse_if_down()
        return await complete(request, body, t0, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        t0 = time.perf_counter()
        if prompt_template is None:
            raise ApiError(404, "POST /v1/chat/completions: this model carries no prompt template (a seq2seq "
                           "fine-tune's run does; `serve --prompt_template` gives one): send the text as "
                           "'prompt' to POST /v1/completions", code="not_found")
        body = await parse(request, chat_lib.ChatRequest)
        fields = chat_lib.completion_fields(body, prompt_template)
        try:
            req = CompletionRequest.model_validate(fields)
        except ValidationError as e:
            raise _validation_error(e) from None
        refuse_if_down()
        return await complete(request, req, t0, chat=True)

    async def complete(request: Request, body: CompletionRequest, t0: float, chat: bool):
        # tokenizing (and checking ids) runs off the event loop, which keeps answering other clients
        prompts = await asyncio.to_thread(comp.prompts, body)
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue = asyncio.Queue()
        sinks = [(lambda item, i=i: loop.call_soon_threadsafe(inbox.put_nowait, (i, item))) for i in range(len(prompts))]
        jobs = comp.jobs(body, prompts, sinks)
        try:
            batcher.submit(jobs)
        except Overloaded as e:
            raise ApiError(429, f"the server is busy: {e}; retry shortly", kind="server_overloaded",
                           code="queue_full", headers={"Retry-After": "1"})
        stop = jobs[0].request.stop
        choices = [Choice(i, tokenizer, eos_id, stop, body.logprobs) for i in range(len(prompts))]
        rid, stamp = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())
        first = [None]
        deadline = None if request_timeout is None else t0 + request_timeout

        def usage():
            n_out = sum(len(c.tokens) for c in choices)
            n_in = sum(len(p) for p in prompts)
            return {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}

        def logline(status: str):
            u = usage()
            latency = time.perf_counter() - t0
            ttft = "-" if first[0] is None else f"{1e3 * (first[0] - t0):.0f}"
            metrics.latency.observe(latency)
            metrics.generated.inc(u["completion_tokens"])
            for c in choices:
                metrics.finished.labels(c.finish_reason or ("error" if status == "failed" else "cancelled")).inc()
            log.info("completion %s %s prompts=%d prompt_tokens=%d completion_tokens=%d ttft_ms=%s latency_ms=%.0f "
                     "finish=%s stream=%s request_id=%s", rid, status, len(prompts), u["prompt_tokens"],
                     u["completion_tokens"], ttft, 1e3 * latency,
                     ",".join(str(c.finish_reason) for c in choices), bool(body.stream),
                     request.scope.get("state", {}).get("request_id", "-"))

        checked = [time.perf_counter()]

        async def next_item():
            """The next update; None when the client has gone away (checked every 0.25 s); "timeout"
            when the request's deadline (--request_timeout) has passed."""
            while True:
                now = time.perf_counter()
                if deadline is not None and now >= deadline:
                    return "timeout"
                if now - checked[0] > 0.25:
                    checked[0] = now
                    if await request.is_disconnected():
                        return None
                wait = 0.25 if deadline is None else max(0.0, min(0.25, deadline - now))
                try:
                    return await asyncio.wait_for(inbox.get(), timeout=wait)
                except asyncio.TimeoutError:
                    pass

        def expire() -> None:
            """The deadline passed: every unfinished choice ends with finish_reason "timeout"."""
            for job in jobs:
                batcher.cancel(job)
            for c in choices:
                if not c.done:
                    c.finish_reason = "timeout"
            log.warning("request %s passed its deadline of %.1f s (--request_timeout): cancelled", rid,
                        request_timeout)

        async def on(item) -> Choice:
            """Apply one update; its text work (decoding every token so far, stop strings, offsets) runs
            in a worker thread, off the event loop."""
            i, u = item
            if isinstance(u, Exception):
                for job in jobs:
                    batcher.cancel(job)
                if isinstance(u, ValueError):
                    raise ApiError(400, str(u), "prompt")
                raise ApiError(500, f"the engine failed: {u}", kind="server_error")
            if first[0] is None and u.tokens:
                first[0] = time.perf_counter()
                metrics.ttft.observe(first[0] - t0)
            await asyncio.to_thread(choices[i].add, u)
            if choices[i].done and not u.done:  # a stop string: the engine may still be generating
                batcher.cancel(jobs[i])
            return choices[i]

        def response(choice_list: list, **extra) -> dict:
            return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": stamp,
                    "model": model_name, "choices": choice_list, **extra}

        def choice_json(c: Choice, text: str, start: int = 0) -> dict:
            if chat:
                return {"index": c.index, "message": chat_lib.message(text), "logprobs": None,
                        "finish_reason": c.finish_reason}
            return {"text": text, "index": c.index, "logprobs": c.logprobs_json(start), "finish_reason": c.finish_reason}

        with_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(c: Choice, text: str, start: int, first_chunk: bool) -> str:
            if chat:
                delta = dict(({"role": "assistant"} if first_chunk else {}), **({"content": text} if text else {}))
                data = {"id": rid, "object": "chat.completion.chunk", "created": stamp, "model": model_name,
                        "choices": [{"index": c.index, "delta": delta, "logprobs": None,
                                     "finish_reason": c.finish_reason}]}
                if with_usage:
                    data["usage"] = None
            else:
                data = response([choice_json(c, text, start)], **({"usage": None} if with_usage else {}))
            return f"data: {json.dumps(data)}\n\n"

        if not body.stream:
            status, item = "disconnected", None
            try:
                while not all(c.done for c in choices):
                    item = await next_item()
                    if item is None:
                        return JSONResponse({}, status_code=499)
                    if item == "timeout":
                        expire()
                        break
                    try:
                        await on(item)
                    except ApiError:
                        status = "failed"
                        raise
                status = "timeout" if item == "timeout" else "ok"
            finally:
                for job in jobs:
                    batcher.cancel(job)
                logline(status)
            return await asyncio.to_thread(lambda: response([choice_json(c, c.text) for c in choices], usage=usage()))

        async def events():
            sent_tokens = [0] * len(choices)
            started = [False] * len(choices)
            status = "disconnected"
            try:
                while not all(c.done for c in choices):
                    item = await next_item()
                    if item is None:
                        return
                    if item == "timeout":
                        expire()
                        for c in choices:
                            yield chunk(c, c.delta(), sent_tokens[c.index], not started[c.index])
                        status = "timeout"
                        break
                    try:
                        c = await on(item)
                    except ApiError as e:
                        yield f"data: {json.dumps({'error': {'message': e.message, 'type': e.kind}})}\n\n"
                        status = "failed"
                        return
                    text = c.delta()
                    if text or c.done:
                        start = sent_tokens[c.index]
                        sent_tokens[c.index] = len(c.tokens)
                        yield chunk(c, text, start, not started[c.index])
                        started[c.index] = True
                if with_usage:
                    yield f"data: {json.dumps(response([], usage=usage()))}\n\n"
                yield "data: [DONE]\n\n"
                status = "ok" if status != "timeout" else status
            finally:
                for job in jobs:
                    batcher.cancel(job)
                logline(status)

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app
