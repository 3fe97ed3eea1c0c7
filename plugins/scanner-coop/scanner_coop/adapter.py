"""The ``coop`` adapter: Dassl model directories and bare ``.pth.tar`` / ``.pth`` / ``.ckpt`` files."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from scanner.adapters import LoadContext, LoadedModel
from scanner.errors import CheckpointError

PROMPT_DIR = "prompt_learner"
CLASSNAMES_FILE = "classnames.txt"
META_FILE = "scanner.json"
_DASSL_NAME = re.compile(r"^(model\.pth\.tar-\d+|model-best\.pth\.tar)$")
FILE_SUFFIXES = (".pth.tar", ".pth", ".ckpt")


def _is_checkpoint_name(name: str) -> bool:
    return bool(_DASSL_NAME.match(name)) or name.endswith(FILE_SUFFIXES)


def _holds_checkpoint(folder: Path, *, any_suffix: bool) -> bool:
    try:
        names = [p.name for p in folder.iterdir() if not p.name.startswith(".")]
    except OSError:
        return False
    if any_suffix:
        return any(_is_checkpoint_name(n) or n.endswith(".safetensors") for n in names)
    return any(_DASSL_NAME.match(n) for n in names)


def _sidecars(ckpt: Path) -> tuple[list[str] | None, dict[str, Any]]:
    """``classnames.txt`` and ``scanner.json`` next to ``prompt_learner/`` (or next to a bare file)."""
    folders = [ckpt.parent.parent, ckpt.parent] if ckpt.parent.name == PROMPT_DIR else [ckpt.parent]
    names: list[str] | None = None
    meta: dict[str, Any] = {}
    for folder in folders:
        names_file, meta_file = folder / CLASSNAMES_FILE, folder / META_FILE
        if names is None and names_file.is_file():
            try:
                text = names_file.read_text(encoding="utf-8")
            except UnicodeDecodeError as exc:
                raise CheckpointError(
                    f"{names_file} is not UTF-8 text ({exc}); write one class name per line"
                ) from exc
            names = [line.strip() for line in text.splitlines() if line.strip()] or None
        if not meta and meta_file.is_file():
            try:
                loaded = json.loads(meta_file.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise CheckpointError(f"{meta_file} is not valid JSON ({exc}); fix or remove it") from exc
            if not isinstance(loaded, dict):
                raise CheckpointError(f"{meta_file} must hold a JSON object; found {type(loaded).__name__}")
            meta = loaded
    return names, meta


class CoOpAdapter:
    """CoOp-family prompt learners in CoOp's own (Dassl) checkpoint layout."""

    name = "coop"
    description = (
        "Dassl model dirs with prompt_learner/model.pth.tar-N or model-best.pth.tar; "
        ".pth.tar/.pth/.ckpt files"
    )

    def claims(self, path: Path) -> bool:
        """By name and layout only: nothing is opened."""
        if path.is_file():
            return _is_checkpoint_name(path.name)
        if not path.is_dir():
            return False
        if (path / PROMPT_DIR).is_dir() and _holds_checkpoint(path / PROMPT_DIR, any_suffix=True):
            return True
        if path.name == PROMPT_DIR:
            return _holds_checkpoint(path, any_suffix=True)
        # Dassl's file names are specific enough to mark a folder without prompt_learner/ as a model dir.
        return _holds_checkpoint(path, any_suffix=False)

    def load(self, path: Path, ctx: LoadContext) -> LoadedModel:
        from scanner.prompting.checkpoints import (
            find_checkpoint,
            learner_from_state,
            read_dassl,
            read_safetensors,
        )
        from scanner.prompting.classifier import PromptedCLIP

        ckpt = find_checkpoint(path)
        epoch: int | None = None
        if ckpt.suffix == ".safetensors":  # a Dassl-style folder holding the project's safe format
            state, meta = read_safetensors(ckpt, max_bytes=ctx.max_file_bytes)
            names = meta.get("classnames")
            names_source = "metadata"
        else:
            state, epoch = read_dassl(ckpt, max_bytes=ctx.max_file_bytes)
            names, meta = _sidecars(ckpt)
            names_source = CLASSNAMES_FILE
        config = meta.get("learner") if isinstance(meta.get("learner"), dict) else None
        backbone, learner = ctx.fit_backbone(
            meta.get("backbone"), meta.get("backbone_sha256"),
            lambda bb: learner_from_state(bb, state, list(names) if names else None, config),
        )
        model = PromptedCLIP(backbone, learner)
        return LoadedModel(
            model=model,
            classnames=list(learner.classnames),
            adapter=self.name,
            path=path,
            sha256=ctx.sha256(path),
            backbone_name=backbone.name,
            backbone_sha256=backbone.content_hash(),
            meta={
                "checkpoint": str(ckpt),
                "epoch": epoch,
                "learner_type": learner.learner_type,
                "n_ctx": learner.n_ctx,
                "classnames_source": names_source if names else "token_suffix",
            },
        )
