"""The ``safetensors`` adapter: ``*.safetensors`` files written by ``scanner.prompting.save_safetensors``."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from scanner.adapters import LoadContext, LoadedModel
from scanner.errors import CheckpointError

FORMAT_NAME = "scanner-prompt"  # the ``format`` metadata value scanner.prompting.checkpoints writes
_MAX_PEEK = 1 << 20  # header bytes read by claims(); real prompt-file headers are a few KiB


def _header_format(path: Path) -> str | None:
    """The ``__metadata__["format"]`` of a safetensors header, ``""`` when absent, None when unreadable."""
    try:
        with path.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return None
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_PEEK:
                return None
            header = json.loads(fh.read(n))
    except (OSError, ValueError):
        return None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return str(meta.get("format", "")) if isinstance(meta, dict) else ""


class SafetensorsAdapter:
    """Prompt learners in the project's safe single-file format."""

    name = "safetensors"
    description = "*.safetensors files with scanner-prompt metadata"

    def claims(self, path: Path) -> bool:
        """``.safetensors`` files whose header says ``scanner-prompt``, plus unreadable ones (so a corrupt
        prompt file is reported as an error). Other safetensors files (backbone weights) are not ours."""
        if not path.is_file() or path.suffix != ".safetensors":
            return False
        fmt = _header_format(path)
        return fmt is None or fmt == FORMAT_NAME

    def load(self, path: Path, ctx: LoadContext) -> LoadedModel:
        from scanner.prompting.checkpoints import learner_from_state, read_safetensors
        from scanner.prompting.classifier import PromptedCLIP

        state, meta = read_safetensors(path, max_bytes=ctx.max_file_bytes)
        if meta.get("format") != FORMAT_NAME:
            raise CheckpointError(
                f"{path} is a safetensors file without {FORMAT_NAME!r} metadata (a backbone or another "
                "tool's weights?); save prompt learners with scanner.prompting.save_safetensors"
            )
        names = meta.get("classnames")
        config = meta.get("learner") if isinstance(meta.get("learner"), dict) else None
        backbone, learner = ctx.fit_backbone(
            meta.get("backbone"), meta.get("backbone_sha256"),
            lambda bb: learner_from_state(bb, state, list(names) if names else None, config),
        )
        return LoadedModel(
            model=PromptedCLIP(backbone, learner),
            classnames=list(learner.classnames),
            adapter=self.name,
            path=path,
            sha256=ctx.sha256(path),
            backbone_name=backbone.name,
            backbone_sha256=backbone.content_hash(),
            meta={"learner_type": learner.learner_type, "n_ctx": learner.n_ctx,
                  "classnames_source": "metadata" if names else "token_suffix"},
        )
