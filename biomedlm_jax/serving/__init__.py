"""Layer 4, serving: the model behind an HTTP endpoint. `batcher` (one thread that owns the decode engine
and admits requests into slots as they free, across HTTP requests: continuous batching), `api` (the
OpenAI-compatible FastAPI app: /v1/completions plain and streamed, /v1/models, /health, errors in
OpenAI's shape), `server` (load a checkpoint, size and warm the engine, run uvicorn; or serve from a
thread).

Imports: every layer below (core, models, data, formats, training, inference).
"""
