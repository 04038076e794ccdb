"""A replaying HTTP transport for the Azure management SDKs.

`ReplayTransport` is an azure-core `HttpTransport`: the SDK client under test
runs its whole pipeline (serialisation, headers, error mapping, long-running
operation polling through `Azure-AsyncOperation` and `Location`) and the
transport answers each request with the next recorded response instead of the
network. It checks each request against the recording (method, path,
api-version) and keeps every request it saw, so a test asserts what was sent.
`sleep()` records the delay it was asked for and returns at once: the poller
and the retry policies wait through the transport, so honoured `Retry-After`
values become assertions instead of wall-clock time.

Recordings are JSON files under tests/unit/azure/recordings/, a list of
exchanges shaped like the public Azure REST API examples:

    {"request": {"method": "PUT", "path": "/subscriptions/.../virtualMachines/vm1",
                 "api-version": "2025-04-01"},            # api-version optional
     "response": {"status": 201, "headers": {...}, "body": {...}}}

`{placeholders}` in paths, headers and bodies are filled from `values`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from azure.core.exceptions import HttpResponseError, ResponseNotReadError
from azure.core.pipeline.transport import HttpTransport
from azure.core.rest import HttpResponse
from azure.core.utils import case_insensitive_dict

RECORDINGS = Path(__file__).resolve().parent / "unit" / "azure" / "recordings"


@dataclass
class SentRequest:
    method: str
    url: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any

    @property
    def api_version(self) -> str:
        return self.query.get("api-version", "")


class ReplayResponse(HttpResponse):
    """A finished response built from a recording (content already in memory)."""

    def __init__(self, request: Any, status: int, headers: Mapping[str, str], body: Any) -> None:
        self._request = request
        self._status = status
        if body is None:
            content = b""
        elif isinstance(body, (dict, list)):
            content = json.dumps(body).encode()
        else:
            content = str(body).encode()
        self._headers = case_insensitive_dict(headers)
        if content and "content-type" not in self._headers:
            self._headers["Content-Type"] = "application/json; charset=utf-8"
        self._content = content
        self._closed = False

    # --- the azure.core.rest.HttpResponse interface ---
    @property
    def request(self) -> Any:
        return self._request

    @property
    def status_code(self) -> int:
        return self._status

    @property
    def headers(self) -> Any:
        return self._headers

    @property
    def reason(self) -> str:
        return {200: "OK", 201: "Created", 202: "Accepted", 204: "No Content", 404: "Not Found", 409: "Conflict",
                429: "Too Many Requests"}.get(self._status, "Status")

    @property
    def content_type(self) -> str | None:
        return self._headers.get("content-type")

    @property
    def encoding(self) -> str:
        return "utf-8"

    @property
    def url(self) -> str:
        return self._request.url

    @property
    def is_closed(self) -> bool:
        return self._closed

    @property
    def is_stream_consumed(self) -> bool:
        return True

    @property
    def content(self) -> bytes:
        if self._content is None:
            raise ResponseNotReadError(self)
        return self._content

    def text(self, encoding: str | None = None) -> str:
        return self._content.decode(encoding or "utf-8")

    def json(self) -> Any:
        return json.loads(self._content) if self._content else None

    def raise_for_status(self) -> None:
        if self._status >= 400:
            raise HttpResponseError(response=self)

    def read(self) -> bytes:
        return self._content

    def iter_raw(self, **kwargs: Any) -> Iterator[bytes]:
        yield self._content

    def iter_bytes(self, **kwargs: Any) -> Iterator[bytes]:
        yield self._content

    def close(self) -> None:
        self._closed = True

    def __enter__(self) -> ReplayResponse:
        return self

    def __exit__(self, *args: Any) -> None:
        self.close()


def _fill(value: Any, values: Mapping[str, str]) -> Any:
    if isinstance(value, str):
        for key, replacement in values.items():
            value = value.replace("{" + key + "}", replacement)
        return value
    if isinstance(value, list):
        return [_fill(v, values) for v in value]
    if isinstance(value, dict):
        return {_fill(k, values): _fill(v, values) for k, v in value.items()}
    return value


def load(name: str, values: Mapping[str, str]) -> list[dict]:
    """The exchanges of recordings/<name>.json with placeholders filled."""
    return _fill(json.loads((RECORDINGS / f"{name}.json").read_text()), values)


@dataclass
class ReplayTransport(HttpTransport):
    """Answers requests from a queue of recorded exchanges; records requests and sleeps."""

    exchanges: list[dict] = field(default_factory=list)
    requests: list[SentRequest] = field(default_factory=list)
    sleeps: list[float] = field(default_factory=list)

    def queue(self, exchanges: list[dict]) -> None:
        self.exchanges.extend(exchanges)

    def send(self, request: Any, **kwargs: Any) -> ReplayResponse:
        parts = urlsplit(request.url)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        raw = request.content if hasattr(request, "content") else request.body
        if isinstance(raw, (bytes, bytearray)):
            raw = raw.decode()
        body = json.loads(raw) if raw else None
        sent = SentRequest(request.method, request.url, parts.path, query, dict(request.headers), body)
        self.requests.append(sent)
        if not self.exchanges:
            raise AssertionError(f"unexpected request, nothing recorded for it: {request.method} {request.url}")
        exchange = self.exchanges.pop(0)
        want = exchange["request"]
        if (want["method"], want["path"].lower()) != (sent.method, sent.path.lower()):
            raise AssertionError(
                f"request {len(self.requests)}: expected {want['method']} {want['path']}, got {sent.method} {sent.path}"
            )
        if "api-version" in want and want["api-version"] != sent.api_version:
            raise AssertionError(
                f"request {len(self.requests)}: expected api-version {want['api-version']}, got {sent.api_version}"
            )
        response = exchange["response"]
        return ReplayResponse(request, response["status"], response.get("headers", {}), response.get("body"))

    @property
    def done(self) -> bool:
        return not self.exchanges

    def sleep(self, duration: float) -> None:
        self.sleeps.append(duration)

    def open(self) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> ReplayTransport:
        return self

    def __exit__(self, *args: Any) -> None:
        pass
