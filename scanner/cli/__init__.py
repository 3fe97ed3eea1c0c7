"""The ``scanner`` command line: a thin shell over the library.

Each module in this package owns one command or command group and attaches itself to ``main`` on
import; plugins may add more through the ``register_commands`` hook.
"""

from __future__ import annotations

import importlib
import pkgutil

import click

from scanner import __version__


@click.group()
@click.version_option(__version__, prog_name="scanner")
def main() -> None:
    """Detect backdoors in prompt-tuned CLIP models before they are deployed."""


def _register() -> None:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


_register()
