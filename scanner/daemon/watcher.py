"""Filesystem events -> settled model units.

The watchdog observer (inotify by default; stat polling for NFS/CIFS/bind mounts that deliver no inotify
events) reports created, modified, closed and moved paths. Each is mapped to its model unit (temp names
are ignored, so a temp-name-then-rename upload is seen once, under its final name) and handed to the
:class:`Settler`, which releases the unit only when its size and mtime (every file's, for a directory)
have been unchanged for ``settle_seconds``: a half-written upload is never scanned.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from scanner.daemon.units import Signature, discover_units, is_temp_name, signature, unit_for_path

log = logging.getLogger(__name__)

_HANDLED = frozenset({"created", "modified", "moved", "closed"})


class Settler:
    """Holds units until their signature is stable for ``settle_seconds``, then calls ``on_settled(unit)``."""

    def __init__(self, settle_seconds: float, on_settled: Callable[[Path], None]) -> None:
        self.settle_seconds = settle_seconds
        self._on_settled = on_settled
        self._lock = threading.Lock()
        # unit -> (last signature seen or None before the first look, monotonic time it was first seen so)
        self._units: dict[Path, tuple[Signature | None, float]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def touch(self, unit: Path) -> None:
        """Start (or keep) watching ``unit``; a change of its signature restarts its settle clock."""
        with self._lock:
            self._units.setdefault(unit, (None, time.monotonic()))

    def __contains__(self, unit: Path) -> bool:
        with self._lock:
            return unit in self._units

    def __len__(self) -> int:
        with self._lock:
            return len(self._units)

    def check(self) -> list[Path]:
        """One pass: refresh signatures, release settled units; returns the released ones."""
        now = time.monotonic()
        with self._lock:
            items = list(self._units.items())
        settled: list[Path] = []
        for unit, (old_sig, since) in items:
            try:
                sig = signature(unit)
            except FileNotFoundError:
                sig = None  # vanished (renamed away, deleted): nothing to scan under this name
            with self._lock:
                if sig is None:
                    self._units.pop(unit, None)
                elif sig != old_sig or not sig:  # changed, or a model directory with no files yet
                    self._units[unit] = (sig, now)
                elif now - since >= self.settle_seconds:
                    self._units.pop(unit, None)
                    settled.append(unit)
        for unit in settled:
            self._on_settled(unit)
        return settled

    def start(self) -> None:
        tick = max(0.05, min(0.5, self.settle_seconds / 4))

        def loop() -> None:
            while not self._stop.wait(tick):
                try:
                    self.check()
                except Exception:  # a bad unit must not stop settling for every other upload
                    log.exception("settle pass failed")

        self._thread = threading.Thread(target=loop, name="scanner-settler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


class UnitEventHandler(FileSystemEventHandler):
    """Maps watchdog events under the watched roots to units and hands them to ``touch``."""

    def __init__(self, roots: Sequence[Path], touch: Callable[[Path], None]) -> None:
        super().__init__()
        self._roots = tuple(roots)
        self._touch = touch

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type not in _HANDLED:
            return
        raw = event.dest_path if event.event_type == "moved" else event.src_path
        path = Path(os.fsdecode(raw))
        try:
            self.intake(path, is_dir=event.is_directory, new=event.event_type in ("created", "moved"))
        except OSError:  # the path vanished while we looked at it
            log.debug("event path %s vanished", path)

    def intake(self, path: Path, *, is_dir: bool, new: bool) -> None:
        root = next((r for r in self._roots if path == r or path.is_relative_to(r)), None)
        if root is None:
            return  # moved out of the watched tree (e.g. into quarantine)
        if any(is_temp_name(part) for part in path.relative_to(root).parts):
            return  # still being written under a temp name: seen when it is renamed into place
        unit = unit_for_path(path, root)
        if unit is not None:
            self._touch(unit)
        elif is_dir and new:
            # a folder renamed into place may hold several loose checkpoints or model directories. Each find is
            # mapped to its unit again: a folder still being copied in can become a model directory between
            # the look above and this walk, and its checkpoint is then part of it, not a loose file
            units = {unit_for_path(found, root) for found in discover_units(path)}
            for inner in sorted(u for u in units if u is not None):
                self._touch(inner)


class OverflowSignal(logging.Handler):
    """Calls ``on_overflow`` on watchdog's "inotify queue overflowed" warning (starts a reconcile)."""

    def __init__(self, on_overflow: Callable[[], None]) -> None:
        super().__init__(level=logging.WARNING)
        self._on_overflow = on_overflow

    def emit(self, record: logging.LogRecord) -> None:
        if "overflow" in record.getMessage().lower():
            self._on_overflow()


def make_observer(
    roots: Sequence[Path], handler: FileSystemEventHandler, polling: bool, poll_interval_s: float
) -> BaseObserver:
    """A started-later observer watching every root recursively."""
    # A folder renamed into place while watchdog is still adding watches for its temp name keeps its inodes, so
    # inotify hands back watches watchdog already holds and it re-registers the same callback on them with a
    # RuntimeWarning ("Callback with id ... already exists ... will be overwritten"): the callback overwrites
    # itself. Every temp-name-then-rename upload could print it. Set here, not at import, so the filter goes in
    # front of whatever filters the host process installed since (an identical one is replaced, not stacked).
    warnings.filterwarnings("ignore", message=r"Callback with id .* already exists", category=RuntimeWarning,
                            module=r"watchdog\.")
    observer: BaseObserver = PollingObserver(timeout=poll_interval_s) if polling else Observer()
    for root in roots:
        observer.schedule(handler, str(root), recursive=True)
    return observer
