"""The server's outer guard: bounds on what one request may send, and an answer for whatever the app could not answer.

    app.add_middleware(RequestGuard, limits=RequestLimits(max_body_bytes=4 << 20, read_timeout_s=30.0),
                       count=metrics.finished, endpoints=("/v1/completions", ...))

A pure ASGI middleware (Starlette puts it inside its own outermost error middleware, around the
routes). For each HTTP request:
- an id, sent back as the `x-request-id` header and named in the log line of a failure;
- a body over `max_body_bytes` is a 413: at once when Content-Length says so (nothing is read),
  else as soon as the bytes received pass the limit, so no more than the limit is ever held;
- a body that has not arrived whole within `read_timeout_s` of the request's headers is a 408
  (slow or stalled uploads cannot hold a connection longer than that);
- an exception the app lets out is a 500 in the OpenAI error shape, logged with the request id
  and its traceback; once a response has started (a stream), the connection just ends.
Answers that close the request early (413, 408) carry `Connection: close`. Every answer the guard
makes itself is counted with `count(endpoint, status)` (a path that is not in `endpoints` counts
as OTHER_ENDPOINT, so hostile paths cannot grow the metrics).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import secrets
from typing import Any, Callable, Iterable

from absl import logging

from qwen_logical.serving.request_body import printable

OTHER_ENDPOINT = "other"
REQUEST_ID_HEADER = b"x-request-id"


@dataclasses.dataclass(frozen=True)
class RequestLimits:
  """max_body_bytes: the largest request body taken (HTTP 413 above it); read_timeout_s: the time a
  request's body has, from its headers' arrival, to arrive whole (HTTP 408 after it)."""

  max_body_bytes: int = 4 << 20
  read_timeout_s: float = 30.0

  def __post_init__(self):
    if isinstance(self.max_body_bytes, bool) or not isinstance(self.max_body_bytes, int) or self.max_body_bytes < 1:
      raise ValueError(f"max_body_bytes={self.max_body_bytes!r} must be a positive integer (bytes).")
    if not isinstance(self.read_timeout_s, (int, float)) or not self.read_timeout_s > 0:
      raise ValueError(f"read_timeout_s={self.read_timeout_s!r} must be a positive number of seconds.")


def error_json(message: str, status: int, error_type: str, request_id: str | None = None) -> bytes:
  """An OpenAI-shaped error body as UTF-8 bytes (`code`: the status' name, e.g. "request_timeout")."""
  code = {408: "request_timeout", 413: "request_too_large", 500: "internal_error"}.get(status)
  body = {"error": {"message": printable(message), "type": error_type, "param": None, "code": code}}
  if request_id is not None:
    body["error"]["request_id"] = request_id
  return json.dumps(body, ensure_ascii=False).encode("utf-8")


class Refused(Exception):
  """Raised from the guarded `receive`: the body broke a limit; the guard answers `status`."""

  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status = status


class _BoundedReceive:
  """An ASGI `receive` that refuses a body past the size limit or the deadline; after the body, plain."""

  def __init__(self, receive, limits: RequestLimits):
    self._receive, self._limits = receive, limits
    self._deadline = asyncio.get_running_loop().time() + limits.read_timeout_s
    self._received = 0
    self.complete = False  # the whole body (or a disconnect) has arrived

  async def __call__(self) -> dict[str, Any]:
    if self.complete:
      return await self._receive()
    remaining = self._deadline - asyncio.get_running_loop().time()
    try:
      message = await asyncio.wait_for(self._receive(), max(remaining, 0.0))
    except asyncio.TimeoutError:
      raise Refused(408, f"The request body did not arrive within {self._limits.read_timeout_s:g} s of its "
                    f"headers ({self._received} bytes came): the server's read timeout. Send the body "
                    "at once, or faster.") from None
    if message["type"] != "http.request":
      self.complete = True
      return message
    self._received += len(message.get("body", b""))
    if self._received > self._limits.max_body_bytes:
      raise Refused(413, _too_large(self._limits.max_body_bytes, f"more than {self._limits.max_body_bytes} came"))
    if not message.get("more_body", False):
      self.complete = True
    return message


def _too_large(limit: int, what: str) -> str:
  return (f"The request body is too large ({what}): this server takes at most {limit} bytes "
          "(serve.max_body_bytes).")


def _content_length(scope) -> int | None:
  for name, value in scope.get("headers", ()):
    if name == b"content-length":
      try:
        return int(value)
      except ValueError:
        return None
  return None


class RequestGuard:
  """The middleware (see the module docstring); `count(endpoint, status)` counts its own answers."""

  def __init__(self, app, limits: RequestLimits, count: Callable[[str, int], None], endpoints: Iterable[str]):
    self.app, self.limits, self.count = app, limits, count
    self.endpoints = frozenset(endpoints)

  async def __call__(self, scope, receive, send) -> None:
    if scope["type"] != "http":
      await self.app(scope, receive, send)
      return
    request_id = secrets.token_hex(8)
    scope.setdefault("state", {})["request_id"] = request_id
    endpoint = scope["path"] if scope["path"] in self.endpoints else OTHER_ENDPOINT
    started = False

    async def send_with_id(message) -> None:
      nonlocal started
      if message["type"] == "http.response.start":
        started = True
        message = {**message, "headers": [*message.get("headers", ()), (REQUEST_ID_HEADER, request_id.encode())]}
      await send(message)

    length = _content_length(scope)
    if length is not None and length > self.limits.max_body_bytes:
      await self._answer(send_with_id, endpoint, 413, _too_large(self.limits.max_body_bytes, f"{length} bytes"))
      return
    try:
      await self.app(scope, _BoundedReceive(receive, self.limits), send_with_id)
    except Refused as e:
      if not started:
        await self._answer(send_with_id, endpoint, e.status, str(e))
    except Exception:  # noqa: BLE001 -- the last resort: whatever the app let out becomes a logged 500
      logging.exception("Request %s (%s %s) failed with an unexpected error; answering 500", request_id,
                        scope.get("method"), printable(scope["path"]))
      if not started:
        await self._answer(send_with_id, endpoint, 500, f"The server failed on this request (request id "
                           f"{request_id}); the error is in its log.", "server_error", request_id)

  async def _answer(self, send, endpoint: str, status: int, message: str, error_type: str = "invalid_request_error",
                    request_id: str | None = None) -> None:
    body = error_json(message, status, error_type, request_id)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status != 500:
      headers.append((b"connection", b"close"))  # the rest of the body is not read
    self.count(endpoint, status)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
