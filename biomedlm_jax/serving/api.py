"""The OpenAI-compatible HTTP API over a `Batcher` (FastAPI): any OpenAI client can use the model.

    POST /v1/completions   prompt (a string, a list of strings, token ids or lists of them), max_tokens,
                           temperature, top_p, top_k (an extension, as vLLM has it), stop, seed, stream
                           (server-sent events), logprobs (0..--max_logprobs), n=1, echo=false
    GET  /v1/models        the one model served
    POST /tokenize         {"prompt"} -> {"tokens", "count", "max_model_len"}  (vLLM's shape)
    POST /detokenize       {"tokens"} -> {"prompt"}
    GET  /health           ok, slots, active, queued and counters (503 when the engine thread has died)

With --api_key every route but /health needs `Authorization: Bearer KEY` (401 otherwise); with
--cors_origins browsers on those origins may call it. Every response, whatever its status, carries an
`X-Request-Id` (the client's, or a new one) and gets one access-log line.

Errors have OpenAI's shape, {"error": {"message", "type", "param", "code"}}, on every route: 400 for bad
JSON, unknown fields, out-of-range values (top_k above the vocabulary, a seed outside int64), prompts
that do not fit the context (naming the field; a text too long to fit is refused before it is
tokenized), more prompts than the queue can ever hold, and a body over --max_body_bytes (default: what the largest acceptable request needs); 404 for
another model's name and unknown routes (/v1/chat/completions says to use /v1/completions), 405 for
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
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from biomedlm_jax.inference import engine as engine_lib
from biomedlm_jax.serving.batcher import Batcher, Job, Overloaded

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


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None, kind: str = "invalid_request_error",
                 code: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code, self.headers = status, message, param, kind, code, headers

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.kind, "param": self.param,
                                       "code": self.code}}, status_code=self.status, headers=self.headers)


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
        max_tokens = limit if req.max_tokens is None else req.max_tokens
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


class Choice:
    """One prompt's answer as it grows: text decoded from all tokens so far, cut at a stop string;
    `delta` gives what can be streamed (held back: a partial UTF-8 character, and any tail that may be
    the start of a stop string)."""

    def __init__(self, index: int, tok, eos_id: int, stop, logprobs: Optional[int]):
        self.index, self.tok, self.eos_id, self.stop = index, tok, eos_id, tuple(stop)
        self.tokens, self.logprobs, self.n_top = [], [], logprobs
        self.offsets: list[int] = []  # with logprobs: each token's text_offset (see add)
        self.sent = 0  # characters streamed
        self.finish_reason: Optional[str] = None
        self.text, self.cut = "", False

    def add(self, update: engine_lib.Update) -> None:
        if self.cut:
            return
        for t, lp in zip(update.tokens, update.logprobs or [None] * len(update.tokens)):
            if t == self.eos_id:
                break
            if self.n_top is not None:
                # where this token's text starts: the complete characters before it. A character split
                # over several tokens (UTF-8 bytes) decodes to U+FFFD until its last byte arrives, so
                # a trailing U+FFFD is not yet text (a genuine trailing U+FFFD would be miscounted).
                self.offsets.append(len(self.tok.decode(self.tokens).rstrip("\ufffd")))
            self.tokens.append(t)
            self.logprobs.append(lp)
        self.text = self.tok.decode(self.tokens)
        hits = [i for i in (self.text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.text, self.cut, self.finish_reason = self.text[: min(hits)], True, "stop"
            self._trim_tokens()
        elif update.done:
            self.finish_reason = update.finish_reason

    def _trim_tokens(self) -> None:
        """Keep the tokens whose text starts before the cut (the stop string and after are not output)."""
        keep = 0
        while keep < len(self.tokens) and len(self.tok.decode(self.tokens[:keep])) < len(self.text):
            keep += 1
        del self.tokens[keep:], self.logprobs[keep:], self.offsets[keep:]

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def delta(self) -> str:
        end = len(self.text)
        if not self.done:
            end -= max((len(s) for s in self.stop), default=1) - 1
            while end > self.sent and self.text[end - 1] == "\ufffd":
                end -= 1
        out = self.text[self.sent: max(end, self.sent)]
        self.sent += len(out)
        return out

    def logprobs_json(self, start: int = 0) -> Optional[dict]:
        if self.n_top is None:
            return None
        toks = [self.tok.decode([t]) for t in self.tokens[start:]]
        offsets = self.offsets[start:]
        return {"tokens": toks, "token_logprobs": [lp[0] for lp in self.logprobs[start:]],
                "top_logprobs": [{self.tok.decode([t]): v for t, v in lp[1][: self.n_top]} for lp in self.logprobs[start:]],
                "text_offset": offsets}


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes gets a 400 (OpenAI's error shape) before it is
    read (by its Content-Length) or as soon as the bytes received pass the limit (a chunked body)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    def _refuse(self) -> JSONResponse:
        return ApiError(400, f"the request body is larger than this server's limit of {self.limit} bytes "
                        "(its --max_body_bytes)", code="request_too_large").response()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or ()).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._refuse()(scope, receive, send)
        seen, too_large = 0, False

        async def limited_receive():
            nonlocal seen, too_large
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:  # the app gets an unparseable end of body, and its answer is replaced
                    too_large = True
                    return {"type": "http.request", "body": b"\x00", "more_body": False}
            return message

        async def guarded_send(message):
            if not too_large:
                await send(message)

        await self.app(scope, limited_receive, guarded_send)
        if too_large:
            await self._refuse()(scope, receive, send)


_REQUEST_ID_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-:")


class AccessLog:
    """ASGI middleware: every response, whatever its status (refusals included), gets one log line
    (method, path, status, milliseconds, request id, client) and an `X-Request-Id` header: the client's
    own (up to 128 of [A-Za-z0-9._-:]) or a new one. The id is in scope["state"]["request_id"]."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        given = dict(scope.get("headers") or ()).get(b"x-request-id", b"").decode("latin-1")
        rid = given if 0 < len(given) <= 128 and set(given) <= _REQUEST_ID_CHARS else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        status = ["-"]

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message = dict(message, headers=list(message.get("headers") or ()) + [(b"x-request-id", rid.encode())])
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            client = scope.get("client") or ("-", 0)
            log.info("access %s %s %s %.0fms request_id=%s client=%s", scope["method"], scope["path"], status[0],
                     1e3 * (time.perf_counter() - t0), rid, client[0])


class ApiKey:
    """ASGI middleware: with a key set, every route but /health needs `Authorization: Bearer KEY`
    (compared in constant time); otherwise 401 in OpenAI's shape."""

    OPEN = ("/health",)

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in self.OPEN or scope["method"] == "OPTIONS":
            return await self.app(scope, receive, send)
        auth = dict(scope.get("headers") or ()).get(b"authorization", b"")
        scheme, _, given = auth.partition(b" ")
        if scheme.lower() == b"bearer" and secrets.compare_digest(given.strip(), self.key):
            return await self.app(scope, receive, send)
        error = ApiError(401, "a valid API key is required: send 'Authorization: Bearer KEY' (the server's --api_key)",
                         code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        await error.response()(scope, receive, send)


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: Optional[str] = None
    prompt: str


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: Optional[str] = None
    tokens: list[StrictInt]


ROUTES = "POST /v1/completions, GET /v1/models, POST /tokenize, POST /detokenize, GET /health"


def default_body_limit(max_queue: int, max_len: int) -> int:
    """The largest body an acceptable request needs: every prompt the queue can hold at the full
    context, 8 bytes a token (a JSON token id with its comma, or a token's text, escapes included, for
    ordinary text), plus 64 KiB for the other fields. 16 slots at 1,024 tokens: 576 KiB."""
    return max_queue * max_len * 8 + (64 << 10)


def create_app(batcher: Batcher, tokenizer, model_name: str, eos_id: int, max_logprobs: int = 5,
               max_body_bytes: Optional[int] = None, api_key: Optional[str] = None,
               cors_origins: Sequence[str] = ()) -> FastAPI:
    app = FastAPI(title="biomedlm-jax", docs_url=None, redoc_url=None, openapi_url=None)
    # middleware, innermost first: body limit, API key, CORS (preflights answered before the key check),
    # access log and request id (outermost: every response is logged, refusals included)
    app.add_middleware(BodyLimit, limit=max_body_bytes or default_body_limit(batcher.max_queue, batcher.engine.max_len))
    if api_key:
        app.add_middleware(ApiKey, key=api_key)
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["*"], expose_headers=["X-Request-Id"])
    app.add_middleware(AccessLog)
    comp = Completions(batcher, tokenizer, model_name, eos_id, max_logprobs)
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def _api_error(request, exc):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):  # unknown routes (404) and methods (405), in OpenAI's shape
        where = f"{request.method} {request.url.path}"
        if exc.status_code == 404 and request.url.path.rstrip("/") == "/v1/chat/completions":
            message = (f"{where}: this server has no chat endpoint (a BioMedLM model has no chat template); "
                       "send the text as 'prompt' to POST /v1/completions")
        elif exc.status_code in (404, 405):
            message = f"{where}: no such route; this server has {ROUTES}"
        else:
            message = f"{where}: {exc.detail}"
        return ApiError(exc.status_code, message, code="not_found" if exc.status_code == 404 else None,
                        headers=getattr(exc, "headers", None)).response()

    @app.get("/health")
    async def health():
        body = {"status": "ok" if batcher.alive else "engine_down", "model": model_name,
                "slots": batcher.engine.slots, "active": batcher.active, "queued": batcher.queued,
                "max_len": batcher.engine.max_len, **batcher.stats}
        return JSONResponse(body, status_code=200 if batcher.alive else 503)

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

    @app.post("/v1/completions")
    async def completions(request: Request):
        t0 = time.perf_counter()
        body = await parse(request, CompletionRequest)
        if not batcher.alive:
            raise ApiError(503, "the engine is not running; see the server's log", kind="server_error",
                           code="engine_down")
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
        rid, stamp = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        first = [None]

        def usage():
            n_out = sum(len(c.tokens) for c in choices)
            n_in = sum(len(p) for p in prompts)
            return {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}

        def logline(status: str):
            u = usage()
            ttft = "-" if first[0] is None else f"{1e3 * (first[0] - t0):.0f}"
            log.info("completion %s %s prompts=%d prompt_tokens=%d completion_tokens=%d ttft_ms=%s latency_ms=%.0f "
                     "finish=%s stream=%s request_id=%s", rid, status, len(prompts), u["prompt_tokens"],
                     u["completion_tokens"], ttft, 1e3 * (time.perf_counter() - t0),
                     ",".join(str(c.finish_reason) for c in choices), bool(body.stream),
                     request.scope.get("state", {}).get("request_id", "-"))

        checked = [time.perf_counter()]

        async def next_item():
            """The next update, or None when the client has gone away (checked every 0.25 s)."""
            while True:
                if time.perf_counter() - checked[0] > 0.25:
                    checked[0] = time.perf_counter()
                    if await request.is_disconnected():
                        return None
                try:
                    return await asyncio.wait_for(inbox.get(), timeout=0.25)
                except asyncio.TimeoutError:
                    pass

        def on(item) -> Choice:
            i, u = item
            if isinstance(u, Exception):
                for job in jobs:
                    batcher.cancel(job)
                if isinstance(u, ValueError):
                    raise ApiError(400, str(u), "prompt")
                raise ApiError(500, f"the engine failed: {u}", kind="server_error")
            if first[0] is None and u.tokens:
                first[0] = time.perf_counter()
            choices[i].add(u)
            if choices[i].done and not u.done:  # a stop string: the engine may still be generating
                batcher.cancel(jobs[i])
            return choices[i]

        def response(choice_list: list, **extra) -> dict:
            return {"id": rid, "object": "text_completion", "created": stamp, "model": model_name,
                    "choices": choice_list, **extra}

        def choice_json(c: Choice, text: str, start: int = 0) -> dict:
            return {"text": text, "index": c.index, "logprobs": c.logprobs_json(start), "finish_reason": c.finish_reason}

        with_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(c: Choice, text: str, start: int) -> str:
            data = response([choice_json(c, text, start)], **({"usage": None} if with_usage else {}))
            return f"data: {json.dumps(data)}\n\n"

        if not body.stream:
            try:
                while not all(c.done for c in choices):
                    item = await next_item()
                    if item is None:
                        logline("disconnected")
                        return JSONResponse({}, status_code=499)
                    on(item)
            finally:
                for job in jobs:
                    batcher.cancel(job)
            logline("ok")
            return response([choice_json(c, c.text) for c in choices], usage=usage())

        async def events():
            sent_tokens = [0] * len(choices)
            status = "disconnected"
            try:
                while not all(c.done for c in choices):
                    item = await next_item()
                    if item is None:
                        return
                    try:
                        c = on(item)
                    except ApiError as e:
                        yield f"data: {json.dumps({'error': {'message': e.message, 'type': e.kind}})}\n\n"
                        status = "failed"
                        return
                    text = c.delta()
                    if text or c.done:
                        start = sent_tokens[c.index]
                        sent_tokens[c.index] = len(c.tokens)
                        yield chunk(c, text, start)
                if with_usage:
                    yield f"data: {json.dumps(response([], usage=usage()))}\n\n"
                yield "data: [DONE]\n\n"
                status = "ok"
            finally:
                for job in jobs:
                    batcher.cancel(job)
                logline(status)

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app
