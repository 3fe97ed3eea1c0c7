"""On-disk cache of exported graphs, keyed by everything that changes the bytes or their validity.

Layout (one pair per graph): ``<stem>.onnx`` and its sidecar ``<stem>.json`` holding the key, the file's
sha256 and size, and what the producer reported (exporter, parity...). ``<stem>.lock`` serialises
producers. A graph is trusted only when the sidecar parses, names the same key and the bytes hash to the
recorded sha256; anything else (truncated file, bit flips, a crash between the two renames, an older
exporter or onnxruntime) is re-produced. The bytes that were verified are the bytes handed to
onnxruntime, so a file swapped after the check can never be loaded unverified.

Two processes producing the same graph: each takes an exclusive ``fcntl`` lock on the stem's lock file,
re-checks the cache under the lock, and only then produces into a temp file in the same folder that is
atomically renamed into place — the second process finds the first one's file and produces nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from scanner.errors import ScannerError

log = logging.getLogger(__name__)

#: bump when the layout or the sidecar schema changes; part of every key
FORMAT_VERSION = 1
CACHE_ENV = "SCANNER_CACHE_DIR"


class CacheUnwritableError(ScannerError):
    """The ONNX cache folder cannot be created or written (read-only, not a directory, no permission)."""

    category = "cache"


def default_cache_dir() -> Path:
    """``$SCANNER_CACHE_DIR/onnx`` if set, else ``$XDG_CACHE_HOME`` (or ``~/.cache``) ``/scanner/onnx``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser() / "onnx"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "scanner" / "onnx"


@dataclass(frozen=True)
class CacheKey:
    """Identity of one cached graph; any field change means a different file."""

    backbone_hash: str  # ClipBackbone.content_hash(): the weights
    arch: str  # only for readable file names
    which: str  # "image" | "text"
    variant: str  # "fp32" | "int8"
    exporter: str
    opset: int
    ort_version: str
    torch_version: str
    onnx_version: str
    extra: str = ""  # e.g. the int8 gate's pool and text hashes
    format_version: int = field(default=FORMAT_VERSION)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()

    def stem(self) -> str:
        safe_arch = "".join(c if c.isalnum() or c in "-_." else "_" for c in self.arch)
        return f"{safe_arch}-{self.which}-{self.variant}-{self.digest()[:24]}"


@dataclass(frozen=True)
class CachedGraph:
    """A verified graph: its bytes, where it lives, its sidecar, and whether this call produced it."""

    data: bytes
    path: Path
    meta: dict[str, Any]
    produced: bool


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_durably(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


class OnnxCache:
    """A folder of verified ONNX graphs (see the module docstring for the protocol)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def paths(self, key: CacheKey) -> tuple[Path, Path, Path]:
        """(graph, sidecar, lock) paths of ``key``."""
        stem = key.stem()
        return self.root / f"{stem}.onnx", self.root / f"{stem}.json", self.root / f"{stem}.lock"

    def load(self, key: CacheKey) -> CachedGraph | None:
        """The verified graph of ``key``, or None when absent, corrupt or stale (logged, never raised)."""
        graph, sidecar, _ = self.paths(key)
        if not graph.exists() and not sidecar.exists():
            return None
        problem = ""
        meta: dict[str, Any] = {}
        data = b""
        try:
            meta = json.loads(sidecar.read_text())
            data = graph.read_bytes()
        except (OSError, ValueError) as exc:
            problem = f"unreadable ({type(exc).__name__}: {exc})"
        if not problem:
            if meta.get("key_digest") != key.digest():
                problem = "its sidecar names another key"
            elif meta.get("size") != len(data) or meta.get("sha256") != _sha256(data):
                problem = "sha256 does not match its sidecar"
        if problem:
            log.warning(
                "cached ONNX graph %s is corrupt or stale (%s); it will be re-exported", graph, problem
            )
            return None
        return CachedGraph(data, graph, meta, produced=False)

    @contextlib.contextmanager
    def _locked(self, lock_path: Path) -> Iterator[None]:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise CacheUnwritableError(
                f"the ONNX cache folder {self.root} cannot be written ({exc.strerror or exc}); expected a "
                f"writable directory — set {CACHE_ENV} or --cache-dir to one"
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def get_or_create(self, key: CacheKey, produce: Callable[[Path], dict[str, Any]]) -> CachedGraph:
        """The verified graph of ``key``; when missing or bad, ``produce(tmp_path)`` writes it (once).

        ``produce`` writes an .onnx file at the path it is given and returns JSON-able facts to keep in
        the sidecar; whatever it raises propagates (the temp file is removed). Raises
        CacheUnwritableError when a graph must be produced and the folder cannot be written.
        """
        found = self.load(key)
        if found is not None:
            return found
        graph, sidecar, lock = self.paths(key)
        with self._locked(lock):
            found = self.load(key)  # another process may have produced it while we waited
            if found is not None:
                return found
            fd, tmp_name = tempfile.mkstemp(dir=self.root, prefix=f".{key.stem()}.", suffix=".onnx.tmp")
            os.close(fd)
            tmp = Path(tmp_name)
            tmp_meta = tmp.with_suffix(".json.tmp")
            try:
                facts = produce(tmp)
                os.chmod(tmp, 0o644)  # mkstemp makes 0600; the cache is meant to be shared
                data = tmp.read_bytes()
                meta = {
                    **facts,
                    "key": asdict(key),
                    "key_digest": key.digest(),
                    "sha256": _sha256(data),
                    "size": len(data),
                }
                _write_durably(tmp_meta, json.dumps(meta, indent=1, sort_keys=True).encode())
                with open(tmp, "rb+") as fh:
                    os.fsync(fh.fileno())
                # Graph first, sidecar last: the sidecar is the commit record readers verify against.
                os.replace(tmp, graph)
                os.replace(tmp_meta, sidecar)
            finally:
                for leftover in (tmp, tmp_meta):
                    with contextlib.suppress(FileNotFoundError):
                        leftover.unlink()
            return CachedGraph(data, graph, meta, produced=True)
