"""scanner plugin: CoOp / CoOp-CSC / CoCoOp prompt learners saved the way CoOp's Dassl trainer saves them.

A *model directory* is one unit: ``MODEL/prompt_learner/model.pth.tar-<epoch>`` (or ``model-best.pth.tar``,
a ``.ckpt``), with optional ``MODEL/classnames.txt`` and ``MODEL/scanner.json`` beside it. A bare
``.pth.tar`` / ``.pth`` / ``.ckpt`` file is a unit too. Files are read with the project's safe loader
(static pickle scan, then ``torch.load(weights_only=True)``): anything that would import code is
reported ``unsafe`` and never executed. Class names come from ``classnames.txt`` or ``scanner.json``,
else they are decoded from ``token_suffix`` against the backbone's token-embedding table.

MaPLe-style multi-modal prompts are not read by this adapter yet (their state dicts carry
``compound_prompts_*`` tensors that a CoOp learner rejects with a clear error).
"""

from __future__ import annotations

from collections.abc import Callable

from scanner.hookspecs import hookimpl
from scanner_coop.adapter import CoOpAdapter

__all__ = ["CoOpAdapter", "register_adapters"]


@hookimpl
def register_adapters(register: Callable[[CoOpAdapter], None]) -> None:
    register(CoOpAdapter())
