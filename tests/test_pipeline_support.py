"""Shared helpers of the pipeline / scan-once tests (no tests here).

``build_registry`` writes a small real registry once per test session: a random-init bundled-architecture
backbone saved as an open_clip ``.safetensors`` file (declared to the scanner like a user's backbone) and
CoOp/CoCoOp learners on it in both formats, plus a corrupt file, malicious pickles and a non-model file.
"""

from __future__ import annotations

import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from scanner.clip import BUNDLED_NAME, create_backbone
from scanner.prompting import CoCoOpLearner, CoOpLearner, save_dassl, save_safetensors
from scanner.settings import BackboneDeclaration, Settings

CLASSNAMES = ["cat", "dog", "ship", "car"]
BACKBONE_NAME = "tiny-random"



class Payload:
    """Pickles to ``os.system(<command>)``: executed only if something unpickles it unsafely."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (self.command,))


class EvalPayload:
    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (eval, (self.code,))


@dataclass(frozen=True)
class Registry:
    root: Path  # the registry tree
    backbone_file: Path  # outside the tree
    backbone_sha256: str  # ClipBackbone.content_hash() of the declared backbone
    marker: Path  # created by the payloads if any of them ever runs

    def settings(self, **kw: Any) -> Settings:
        """The declared test backbone, a 64-image pool and a cheaper detector budget (tests stay fast)."""
        decl = BackboneDeclaration(BACKBONE_NAME, self.backbone_file, "open_clip", BUNDLED_NAME)
        kw.setdefault("detector_options", {"batch_size": 16, "candidates": 1, "bf16": False})
        return Settings(backbones=(decl,), ood_size=64, cache_dir=self.root.parent / "cache", **kw)


def build_registry(base: Path) -> Registry:
    """Write (once) and describe the test registry under ``base``."""
    root, backbone_file, marker = base / "registry", base / "tiny-random.safetensors", base / "PWNED"
    done = base / ".built"
    backbone = create_backbone(BUNDLED_NAME, seed=0)
    if not done.exists():
        base.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in backbone.model.state_dict().items()}, str(backbone_file))
        coop = CoOpLearner(backbone, CLASSNAMES, n_ctx=4, seed=1)
        save_dassl(coop, root / "team-a" / "coop-model", epoch=5)
        save_dassl(coop, root / "team-a" / "coop-nometa", epoch=5, write_classnames=False,
                   write_metadata=False)
        cocoop = CoCoOpLearner(backbone, CLASSNAMES, n_ctx=4, seed=2)
        save_safetensors(cocoop, root / "team-b" / "cocoop.safetensors")
        (root / "team-b" / "README.txt").write_text("not a model\n")
        (root / "team-b" / ".hidden").mkdir()
        save_safetensors(coop, root / "team-b" / ".hidden" / "ignored.safetensors")
        # corrupt: a torch zip header followed by garbage
        (root / "team-c").mkdir(parents=True)
        (root / "team-c" / "corrupt.pth.tar").write_bytes(b"PK\x03\x04" + os.urandom(200))
        # unsafe: a Dassl-shaped checkpoint with a payload nested in the dict (torch zip format) ...
        evil_dir = root / "team-c" / "evil-model" / "prompt_learner"
        evil_dir.mkdir(parents=True)
        payload = {"state_dict": {"ctx": torch.zeros(4, backbone.text_width)}, "epoch": 1,
                   "optimizer": {"hook": Payload(f"touch {marker}")}}
        torch.save(payload, evil_dir / "model.pth.tar-1")
        # ... and a raw pickle calling eval
        (root / "team-c" / "evil-eval.pth").write_bytes(
            pickle.dumps({"state_dict": EvalPayload(f"open({str(marker)!r}, 'w')")}, protocol=2)
        )
        done.write_text("ok")
    return Registry(root, backbone_file, backbone.content_hash(), marker)


def wrong_backbone_model(base: Path) -> Path:
    """A CoOp model dir whose metadata names a backbone nobody declared (ViT-B-16 with some hash)."""
    backbone = create_backbone(BUNDLED_NAME, seed=0)
    model_dir = base / "wrong-backbone"
    save_dassl(CoOpLearner(backbone, CLASSNAMES, n_ctx=4), model_dir, epoch=1)
    meta = json.loads((model_dir / "scanner.json").read_text())
    meta["backbone"], meta["backbone_sha256"] = "ViT-B-16", "ab" * 32
    (model_dir / "scanner.json").write_text(json.dumps(meta))
    return model_dir
