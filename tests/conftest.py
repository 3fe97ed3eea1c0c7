"""Shared fixtures: tiny real models only (the bundled CLIP, or a random-init one of the same shape)."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from scanner.clip import BUNDLED_NAME, ClipBackbone, create_backbone

torch.set_num_threads(1)  # tiny models: threading overhead exceeds the gain on 2 busy cores


@pytest.fixture(scope="session")
def random_backbone() -> ClipBackbone:
    """The bundled architecture with seeded random weights: fast, for plumbing tests."""
    return create_backbone(BUNDLED_NAME, seed=0)


@pytest.fixture(scope="session")
def bundled_backbone() -> ClipBackbone:
    """The trained bundled CLIP."""
    from scanner.clip import load_bundled

    return load_bundled()


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread for the test, whatever an earlier test set (pre-training sets its own count): tiny
    models run ~40x slower with 2 threads on a busy 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def run_benchmark(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """Runs ``benchmarks/NAME.py``'s ``main()`` in this process with the given command-line arguments
    (``run_benchmark(NAME, *argv)``); ``sys.argv`` is restored after the test."""

    def run(name: str, *argv: str) -> None:
        path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        monkeypatch.setattr(sys, "argv", [path.name, *argv])
        module.main()

    return run
