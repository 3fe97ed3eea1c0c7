"""The few hooks a scanner plugin may implement.

Plugins never hand the core a list: they call the ``register`` callback the core passes in, once per
object (llm's pattern). The core therefore owns names, order and duplicate detection.

A plugin module looks like::

    from scanner.hookspecs import hookimpl

    @hookimpl
    def register_adapters(register):
        register(MyAdapter())
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import click

    from scanner.adapters import Adapter
    from scanner.report import ModelReport

PROJECT_NAME = "scanner"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def register_adapters(register: Callable[[Adapter], None]) -> None:
    """Call ``register(adapter)`` for each model-format adapter this plugin provides."""


@hookspec
def register_attacks(register: Callable[[Any], None]) -> None:
    """Call ``register(attack)`` for each backdoor attack (used by the zoo and benchmarks)."""


@hookspec
def register_detectors(register: Callable[[Any], None]) -> None:
    """Call ``register(detector)`` for each extra detector (baselines, research variants)."""


@hookspec
def register_commands(cli: click.Group) -> None:
    """Attach extra ``scanner`` sub-commands to the click group ``cli``."""


@hookspec
def scan_completed(report: ModelReport) -> None:
    """Called once per model after its verdict is final (also for ``unsafe``/``error``/``skipped``).

    Exceptions raised here are reported on stderr and never change the verdict or stop a scan.
    """
