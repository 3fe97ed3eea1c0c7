"""The registry hook: a small HTTP API authenticated by an HMAC-SHA256 signature (stdlib ``http.server``).

Every request but ``/healthz`` carries two headers:

- ``X-Scanner-Timestamp``: Unix seconds when it was signed; outside ``replay_window_s`` of now -> 401;
- ``X-Scanner-Signature: sha256=<hex>``, the HMAC-SHA256 with the shared secret of
  ``timestamp + "." + body`` — for ``GET`` (no body) the request path stands in for the body, so a
  signature for one report cannot be replayed to read another.

Missing/malformed/stale credentials -> 401; a wrong signature, or one already used -> 403 (compared in
constant time). ``POST /v1/scan`` with ``{"path": ...}`` (absolute, or relative to a watched root) queues
the unit, skipping the settle step (the registry says the upload is complete); the path is resolved
(symlinks too) and must stay under a watched root, else 400. ``GET /v1/scans/<sha256>`` returns the
stored state and report; ``GET /healthz`` says whether workers and observer are alive.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from scanner.daemon.config import parse_addr
from scanner.errors import ConfigError

log = logging.getLogger(__name__)

TIMESTAMP_HEADER = "X-Scanner-Timestamp"
SIGNATURE_HEADER = "X-Scanner-Signature"
MAX_BODY = 64 * 1024
_SCAN_PATH = re.compile(r"^/v1/scans/([0-9a-fA-F]{64})$")

#: the daemon side of the API: (status, JSON body) for a submitted path / a looked-up hash; health dict
SubmitFn = Callable[[str], tuple[int, dict[str, Any]]]
LookupFn = Callable[[str], dict[str, Any] | None]
HealthFn = Callable[[], tuple[bool, dict[str, Any]]]


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The ``X-Scanner-Signature`` value for ``body`` signed at ``timestamp`` (what a registry computes)."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


@dataclass
class _Api:
    secret: str
    replay_window_s: float
    submit: SubmitFn
    lookup: LookupFn
    health: HealthFn

    def __post_init__(self) -> None:
        self._seen: dict[str, float] = {}  # signature -> expiry: a captured request cannot be replayed
        self._lock = threading.Lock()

    def authenticate(self, headers: Any, signed: bytes) -> tuple[int, str] | None:
        """``None`` if authentic, else (status, reason)."""
        ts, sig = headers.get(TIMESTAMP_HEADER), headers.get(SIGNATURE_HEADER)
        if not ts or not sig:
            return 401, f"unsigned request: {TIMESTAMP_HEADER} and {SIGNATURE_HEADER} are required"
        try:
            ts_value = float(ts)
        except ValueError:
            return 401, f"{TIMESTAMP_HEADER} must be Unix seconds"
        now = time.time()
        if abs(now - ts_value) > self.replay_window_s:
            return (
                401,
                f"stale request: timestamp is {now - ts_value:+.0f} s from now "
                f"(window {self.replay_window_s:.0f} s)",
            )
        expected = sign(self.secret, ts, signed)
        if not hmac.compare_digest(expected.encode(), sig.strip().encode()):
            return 403, "bad signature"
        with self._lock:
            for key in [k for k, exp in self._seen.items() if exp < now]:
                del self._seen[key]
            if expected in self._seen:
                return 403, "replayed request: this signature was already used"
            self._seen[expected] = ts_value + self.replay_window_s + 1
        return None


class WebhookServer:
    """The HTTP server in a background thread; ``port`` is the bound port (useful with port 0)."""

    def __init__(
        self,
        addr: str,
        secret: str,
        *,
        submit: SubmitFn,
        lookup: LookupFn,
        health: HealthFn,
        replay_window_s: float = 300.0,
    ) -> None:
        host, port = parse_addr(addr, "webhook")
        api = _Api(secret, replay_window_s, submit, lookup, health)
        handler = type("ScannerHookHandler", (_Handler,), {"api": api})
        try:
            self._server = ThreadingHTTPServer((host, port), handler)
        except OSError as exc:
            raise ConfigError(
                f"Cannot serve the webhook on {addr} ({exc.strerror or exc}). Is another daemon "
                "running? Pass --webhook-addr HOST:PORT with a free port."
            ) from exc
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="scanner-webhook", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class _Handler(BaseHTTPRequestHandler):
    api: _Api
    server_version = "scanner-hook"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("webhook %s - %s", self.address_string(), format % args)

    def _reply(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body, indent=2).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str) -> None:
        self._reply(status, {"error": HTTPStatus(status).phrase, "message": message})

    def do_GET(self) -> None:
        if self.path == "/healthz":
            ok, body = self.api.health()
            self._reply(200 if ok else 503, body)
            return
        match = _SCAN_PATH.match(self.path)
        if match is None:
            self._error(404, "unknown endpoint; try GET /v1/scans/<sha256> or POST /v1/scan")
            return
        denied = self.api.authenticate(self.headers, self.path.encode())
        if denied is not None:
            self._error(*denied)
            return
        found = self.api.lookup(match.group(1).lower())
        if found is None:
            self._error(404, "no model with this content hash has been seen")
            return
        self._reply(200, found)

    def do_POST(self) -> None:
        if self.path != "/v1/scan":
            self._error(404, 'unknown endpoint; POST /v1/scan with {"path": ...}')
            return
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY:
            self._error(
                413 if length > MAX_BODY else 400, f"body must be 0..{MAX_BODY} bytes with a Content-Length"
            )
            return
        body = self.rfile.read(length)
        denied = self.api.authenticate(self.headers, body)
        if denied is not None:
            self._error(*denied)
            return
        try:
            payload = json.loads(body)
            path = payload["path"]
            if not isinstance(path, str) or not path or "\0" in path:
                raise ValueError(path)
        except (ValueError, KeyError, TypeError):
            self._error(400, 'body must be JSON {"path": "<path under a watched folder>"}')
            return
        status, reply = self.api.submit(path)
        self._reply(status, reply)
