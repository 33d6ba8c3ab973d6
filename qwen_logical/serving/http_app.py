"""The HTTP layer: an OpenAI-compatible FastAPI app around an engine.

    app = create_app(engine, ServedModel(name, tokenizer, engine.context, vocab_size))
    uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=8000)).run()
    app.state.serving.drain(30.0)                      # from another thread: 503 for new requests, finish the rest

Routes: POST /v1/chat/completions, POST /v1/completions (JSON, or server-sent events with
"stream": true), GET /v1/models, GET /health, GET /metrics, GET /openapi.json (the request bodies'
schemas). serving.guard bounds each request's body (size, read time) and turns whatever escapes
the handlers into a logged, counted 500; every error is an OpenAI-shaped body. The engine calls back from its own
thread; each request's events cross into the event loop with `call_soon_threadsafe` onto an
asyncio queue, and one coroutine per request turns them into text (serving.completions) and
responses (serving.openai_api). A client that goes away cancels its request in the engine.
"""

from __future__ import annotations

import asyncio
import json
import time

from absl import logging
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from qwen_logical.serving import openai_api, openai_bodies
from qwen_logical.serving.choice_stream import stream_chunks
from qwen_logical.serving.completions import Output, RequestError, merge
from qwen_logical.serving.http_run import CLIENT_CLOSED, GONE, Run
from qwen_logical.serving.engine import QueueFullError, ServingError
from qwen_logical.serving.guard import OTHER_ENDPOINT, RequestGuard, RequestLimits
from qwen_logical.serving.metrics import Metrics
from qwen_logical.serving.openai_api import ServedModel
from qwen_logical.serving.openai_schema import request_body, request_schemas
from qwen_logical.serving.request_body import decode_json
from qwen_logical.serving.token_text import TextPosition, TokenPieces

ENDPOINTS = {"chat": "/v1/chat/completions", "completion": "/v1/completions"}


def _sse(body: dict | str) -> str:
  data = body if isinstance(body, str) else json.dumps(body, ensure_ascii=False, separators=(",", ":"))
  return f"data: {data}\n\n"


class _EventStream(StreamingResponse):
  """Server-sent events whose request is closed however the response ends (done, or client gone)."""

  def __init__(self, content, run: Run):
    super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    self._run = run

  async def __call__(self, scope, receive, send):
    try:
      await super().__call__(scope, receive, send)
    finally:
      self._run.close(self._run.status)


class Serving:
  """The app's state: the engine, what it serves, the metrics, and whether it is draining."""

  def __init__(self, engine, served: ServedModel, metrics: Metrics | None = None):
    self.engine, self.served = engine, served
    self.pieces = TokenPieces(served.tokenizer)
    self.metrics = metrics or Metrics(engine.stats)
    self.draining = False
    self.inflight = 0  # requests accepted and not yet answered (changed on the event loop only)

  def drain(self, seconds: float, settle_s: float = 5.0) -> None:
    """Refuses new requests (503), lets the engine finish running ones within `seconds` (cancelling
    the rest), then waits up to `settle_s` for their responses to go out. Blocks; call it off the loop."""
    self.draining = True
    logging.info("Draining: new requests get 503; %d running, up to %.0f s to finish", self.inflight, seconds)
    self.engine.stop(seconds)
    deadline = time.monotonic() + settle_s
    while self.inflight > 0 and time.monotonic() < deadline:
      time.sleep(0.02)
    logging.info("Drained (%d responses still open)", self.inflight)

  def error(self, endpoint: str, status: int, message: str, param: str | None = None,
            error_type: str = "invalid_request_error") -> JSONResponse:
    self.metrics.finished(endpoint, status)
    return JSONResponse(openai_bodies.error_body(message, param, error_type), status_code=status)

  async def complete(self, request: Request, kind: str) -> Response:
    """POST /v1/chat/completions and /v1/completions."""
    endpoint = ENDPOINTS[kind]
    if self.draining:
      return self.error(endpoint, 503, "The server is shutting down and takes no new requests.",
                        error_type="server_error")
    parsed = None
    try:
      body = decode_json(await request.body())
      # Off the event loop: tokenizing a long prompt or compiling a JSON schema's grammar takes a while.
      parsed = await asyncio.to_thread(openai_api.parse_request, kind, body, self.served)
      self.engine.check(parsed.request)
    except RequestError as e:
      return self.error(endpoint, 400, str(e), e.param)
    except ServingError as e:
      return self.error(endpoint, 400, str(e), openai_api.engine_param(parsed, e.field))
    run = Run(self, parsed, endpoint)
    try:
      run.submit()
    except QueueFullError as e:
      return self.error(endpoint, 429, f"The server is busy (its queue is full): retry later. {e}",
                        error_type="rate_limit_exceeded")
    except ServingError as e:
      if e.field is not None:
        return self.error(endpoint, 400, str(e), openai_api.engine_param(parsed, e.field))
      return self.error(endpoint, 503, str(e), error_type="server_error")
    self.inflight += 1
    if parsed.stream:
      return _EventStream(self._events(run), run)
    try:
      return await self._whole(request, run)
    except BaseException as e:  # an Exception becomes the guard's 500 (counted there); a cancel, a 499
      run.close(500, count=not isinstance(e, Exception))
      raise

  async def _events(self, run: Run):
    """The SSE body: per choice a chunk per text delta (with its log-probabilities and tool-call
    deltas), its finish reason; usage when asked for; [DONE]."""
    parsed, pieces = run.parsed, self.pieces
    offsets = [TextPosition() for _ in run.choices]
    for i in range(len(run.choices)):
      if parsed.kind == "chat":
        yield _sse(openai_bodies.chunk_body(parsed, run.id, run.created, i, first=True))
    while not run.done:
      try:
        got = await run.next()
      except Exception as e:  # noqa: BLE001 -- the stream has started: its last event says what happened
        logging.exception("Stream %s failed; ending it with an error event", run.id)
        for choice in run.choices:
          choice.cancel()
        run.status, body = 500, openai_bodies.error_body(f"The server failed on this request ({run.id}): {e}",
                                                         error_type="server_error")
        yield _sse(body)
        break
      if got is None:
        continue
      i, output = got
      if output.finish_reason in ("cancelled", "error"):
        run.status, body = self._failure(output)
        yield _sse(body)
        break
      for chunk in stream_chunks(parsed, run, i, output, pieces, offsets):
        yield _sse(chunk)
    if parsed.include_usage and run.last():
      yield _sse(openai_bodies.usage_chunk(parsed, run.id, run.created, run.last()))
    yield _sse("[DONE]")

  async def _whole(self, request: Request, run: Run) -> Response:
    """The non-streamed answer; a client that disconnects meanwhile cancels the request."""
    watcher = asyncio.create_task(_watch_disconnect(request, run.events))
    try:
      while not run.done:
        await run.next()
    finally:
      watcher.cancel()
    if run.gone:
      run.close(CLIENT_CLOSED)
      return Response(status_code=CLIENT_CLOSED)
    failed = next((o[-1] for o in run.outputs if o and o[-1].finish_reason in ("cancelled", "error")), None)
    if failed is not None:
      status, body = self._failure(failed)
      run.close(status)
      return JSONResponse(body, status_code=status)
    run.close(200)
    whole = [merge(outputs) for outputs in run.outputs]
    split = run.parsed.tools or run.parsed.reasoning is not None
    replies = [reply.whole(o.text) for reply, o in zip(run.replies, whole)] if split else None
    return JSONResponse(openai_bodies.completion_body(run.parsed, run.id, run.created, whole, self.pieces, replies))

  @staticmethod
  def _failure(output: Output) -> tuple[int, dict]:
    if output.finish_reason == "cancelled":
      return 503, openai_bodies.error_body("The request was cancelled: the server is shutting down.",
                                        error_type="server_error")
    return 500, openai_bodies.error_body(f"The engine failed on this request: {output.error}",
                                         error_type="server_error")


async def _watch_disconnect(request: Request, events: asyncio.Queue) -> None:
  """Waits for the client to go away (the body was read already), then queues GONE."""
  while True:
    message = await request.receive()
    if message["type"] == "http.disconnect":
      events.put_nowait((0, GONE, time.perf_counter()))
      return


ROUTES = (*ENDPOINTS.values(), "/v1/models", "/health", "/metrics", "/openapi.json")


def create_app(engine, served: ServedModel, metrics: Metrics | None = None,
               limits: RequestLimits | None = None) -> FastAPI:
  """The app for `engine` (an Engine, or anything with check/submit/cancel/stop/stats); `limits` bound
  each request's body (default: RequestLimits(), 4 MiB within 30 s)."""
  serving = Serving(engine, served, metrics)
  app = FastAPI(title="qwen_logical", docs_url=None, redoc_url=None)
  app.state.serving = serving
  app.add_middleware(RequestGuard, limits=limits or RequestLimits(), count=serving.metrics.finished, endpoints=ROUTES)
  schemas = request_schemas(served)

  @app.exception_handler(HTTPException)
  async def http_error(request: Request, error: HTTPException):
    """Starlette's own refusals (404 no such route, 405 wrong method) in the OpenAI error shape."""
    path = request.url.path
    serving.metrics.finished(path if path in ROUTES else OTHER_ENDPOINT, error.status_code)
    body = openai_bodies.error_body(f"{error.detail}: {request.method} {path} (the routes: {', '.join(ROUTES)}).")
    return JSONResponse(body, status_code=error.status_code, headers=error.headers)

  @app.post("/v1/chat/completions", openapi_extra=request_body(schemas["chat"]))
  async def chat_completions(request: Request):
    return await serving.complete(request, "chat")

  @app.post("/v1/completions", openapi_extra=request_body(schemas["completion"]))
  async def text_completions(request: Request):
    return await serving.complete(request, "completion")

  @app.get("/v1/models")
  async def models():
    serving.metrics.finished("/v1/models", 200)
    return openai_bodies.models_body(served)

  @app.get("/health")
  async def health():
    if serving.draining:
      return JSONResponse({"status": "draining"}, status_code=503)
    return {"status": "ok"}

  @app.get("/metrics")
  async def metrics_text():
    return Response(serving.metrics.exposition(), media_type=serving.metrics.content_type)

  return app
