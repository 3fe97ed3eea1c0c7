"""scanner plugin: the project's own ``.safetensors`` prompt-learner format.

One file holds the learner's tensors (``ctx``, ``token_prefix``/``token_suffix``, CoCoOp's ``meta_net.*``)
and string metadata: ``format = "scanner-prompt"``, the backbone's name and content hash, the learner
configuration and the class names. safetensors cannot carry code, so these files are never ``unsafe``.
"""

from __future__ import annotations

from collections.abc import Callable

from scanner.hookspecs import hookimpl
from scanner_safetensors.adapter import SafetensorsAdapter

__all__ = ["SafetensorsAdapter", "register_adapters"]


@hookimpl
def register_adapters(register: Callable[[SafetensorsAdapter], None]) -> None:
    register(SafetensorsAdapter())
