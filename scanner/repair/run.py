"""``repair_path``: the shell around :func:`repair_prompt` that ``scanner repair`` calls.

Load one model unit through the same adapters and safe loaders as a scan, read the user's labelled
image folder, take the reconstructed triggers from a saved detection (or run the detector), repair,
and write the repaired prompt next to it in the input's format with metadata recording the repair.
The input is never written to: the output must be a new path.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scanner import __version__
from scanner.adapters import Adapter, LoadContext, LoadedModel
from scanner.errors import CheckpointError, ConfigError, ScannerError
from scanner.repair.config import RepairConfig
from scanner.repair.data import LabelledImages, load_image_folder
from scanner.repair.finetune import RepairResult, repair_prompt
from scanner.repair.saved_detection import SavedDetection, find_detection, load_detection, save_detection
from scanner.settings import Settings

Emit = Callable[[str], None]
DASSL_ADAPTER = "coop"
SAFETENSORS_ADAPTER = "safetensors"


class NothingToRepair(ScannerError):
    """No adapter recognises the path given as the model."""

    category = "unsupported"


@dataclass
class RepairOutcome:
    """What ``repair_path`` did."""

    source: Path  # the model unit read (never written)
    output: Path  # the repaired unit written
    format: str  # "dassl" or "safetensors"
    result: RepairResult
    detection: SavedDetection
    data: LabelledImages
    metadata: dict[str, Any]  # the ``repair`` record stored with the output
    warnings: list[str] = field(default_factory=list)
    detection_path: Path | None = None  # where the detection was saved (--save-detection)


def output_format(adapter: str) -> str:
    return "dassl" if adapter == DASSL_ADAPTER else "safetensors"


def default_output(unit: Path, adapter: str) -> Path:
    """``MODEL-repaired/`` for a Dassl directory or file, ``NAME.repaired.safetensors`` otherwise."""
    if output_format(adapter) == "dassl":
        stem = unit.name.split(".")[0] if unit.is_file() else unit.name
        return unit.with_name(f"{stem}-repaired")
    stem = unit.name.removesuffix(".safetensors") if unit.is_file() else unit.name
    return unit.with_name(f"{stem}.repaired.safetensors")


def check_output(unit: Path, out: Path) -> None:
    """ConfigError unless ``out`` is a new path that neither is, holds nor lies inside the input."""
    src, dst = unit.resolve(), out.resolve()
    if dst == src or src in dst.parents or dst in src.parents:
        raise ConfigError(f"--out {out} would write over or around the input {unit}; choose a path outside it")
    if out.exists() or out.is_symlink():
        raise ConfigError(f"--out {out} already exists; nothing was written — remove it or choose another path")


def _load_unit(path: Path, settings: Settings, adapters: Sequence[Adapter] | None) -> tuple[LoadedModel, Adapter]:
    from scanner.pipeline import backbone_store, claimant, describe_adapters, discover_models, loaded_adapters

    adapters = loaded_adapters(settings) if adapters is None else list(adapters)
    adapter = claimant(path, adapters)
    if adapter is None:
        units = discover_models(path, adapters) if path.is_dir() else []
        if units:
            raise ConfigError(
                f"{path} holds {len(units)} model(s) ({', '.join(str(u) for u in units[:3])}"
                f"{' …' if len(units) > 3 else ''}); repair takes one model: pass its file or directory"
            )
        raise NothingToRepair(f"no adapter recognises {path} as a model; {describe_adapters(adapters)}")
    ctx = LoadContext(backbones=backbone_store(settings), max_file_bytes=settings.max_file_bytes,
                      device=settings.device)
    return adapter.load(path, ctx), adapter


def _detection(loaded: LoadedModel, settings: Settings, report: Path | None,
               progress: Callable[[str, int, int], None] | None) -> SavedDetection:
    if report is not None:
        try:
            det = load_detection(find_detection(report, loaded.sha256))
        except CheckpointError as exc:
            raise ConfigError(str(exc)) from exc
        if det.model_sha256 != loaded.sha256:
            raise ConfigError(
                f"the saved detection {report} was made on another model (content hash {det.model_sha256[:12]}…, "
                f"this model {loaded.sha256[:12]}…); scan this model or omit --report to detect now"
            )
        if det.classnames and len(det.classnames) != len(loaded.classnames):
            raise ConfigError(f"the saved detection {report} has {len(det.classnames)} classes; the model "
                              f"{len(loaded.classnames)}")
        return det
    from scanner.engine import detect
    from scanner.pipeline import detector_config, ood_pool

    model = loaded.model.to(settings.device)
    pool = ood_pool(settings, model.backbone.image_size)
    result = detect(model, pool.to(settings.device), detector_config(settings), seed=settings.seed,
                    progress=progress)
    return SavedDetection.from_result(result, loaded.sha256)


def _triggers_sha256(det: SavedDetection, order: Sequence[int]) -> str:
    h = hashlib.sha256()
    for k in order:
        t = det.raw_triggers[k].float().contiguous()
        h.update(f"{k}:{tuple(t.shape)}\n".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def repair_path(path: Path, data_dir: Path, settings: Settings | None = None, *, out: Path | None = None,
                shots: int | None = None, report: Path | None = None, config: RepairConfig | None = None,
                save_detection_to: Path | None = None, emit: Emit | None = None,
                progress: Callable[[str, int, int], None] | None = None,
                adapters: Sequence[Adapter] | None = None) -> RepairOutcome:
    """Repair the model unit at ``path`` with the labelled images of ``data_dir``; see module docstring.

    Raises ConfigError / DatasetError for input the user can fix (nothing is written), NothingToRepair
    when no adapter claims ``path``, and the loaders' / detector's ScannerErrors otherwise.
    """
    settings = settings or Settings()
    cfg = config or RepairConfig()
    say = emit or (lambda _msg: None)
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"model {path} does not exist")
    loaded, adapter = _load_unit(path, settings, adapters)
    fmt = output_format(adapter.name)
    out = Path(out) if out is not None else default_output(path, adapter.name)
    check_output(path, out)
    if save_detection_to is not None:
        check_output(path, save_detection_to)
    warnings: list[str] = []
    if fmt == "safetensors" and adapter.name != SAFETENSORS_ADAPTER:
        warnings.append(f"the input's format ({adapter.name}) has no writer here; the repaired model is written "
                        "as scanner safetensors")
    model = loaded.model
    data = load_image_folder(Path(data_dir), loaded.classnames, model.backbone.image_size, shots=shots,
                             min_per_class=cfg.min_per_class)
    if data.skipped:
        warnings.append(f"{len(data.skipped)} unreadable image(s) skipped, e.g. {data.skipped[0]}")
    say(f"{loaded.path}: {model.n_cls} classes, {len(data.labels)} labelled images from {data_dir}")
    say("reading the saved detection" if report is not None else "detecting (reconstructing triggers)…")
    det = _detection(loaded, settings, report, progress)
    order = det.suspects()[: cfg.max_triggers]
    target = det.target_index if det.backdoored else (order[0] if order else None)
    if not det.backdoored:
        warnings.append("the model scans clean (no class stands out); repairing anyway with the most suspicious "
                        "classes' reconstructed triggers — the repair cannot target a backdoor that was not found")
    if not order:
        warnings.append("the detection holds no re-applicable trigger; repairing with generic overlays only")
    name = loaded.classnames[target] if target is not None else None
    say(f"repairing ({cfg.mode}) with {len(order)} reconstructed trigger(s)"
        + (f", suspected target {name!r}" if name else ""))
    model = model.to(settings.device)
    from scanner.pipeline import ood_pool

    # a prefix of the detector's pool (same settings); the whole pool when the photos are picked by class quota
    ood = (ood_pool(settings, model.backbone.image_size, None if cfg.ood_balance else cfg.ood_images)
           .to(settings.device) if cfg.ood_images > 0 else None)
    result = repair_prompt(model, data.images.to(settings.device), data.labels.to(settings.device),
                           [det.raw_triggers[k] for k in order], cfg, seed=settings.seed, target=target, ood=ood)
    record = {
        "scanner_version": __version__,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": {"path": str(path), "sha256": loaded.sha256, "adapter": adapter.name},
        "data": {"path": str(data_dir), "sha256": data.sha256, "images": len(data.labels), "shots": shots},
        "trigger": {
            "detection": det.source, "detector": det.detector, "flagged": det.backdoored,
            "target_index": target, "target_name": name, "anomaly_score": det.anomaly_score,
            "classes": order, "forms": result.trigger_forms, "sha256": _triggers_sha256(det, order),
            "guard_choice": None if result.guard_choice is None else result.guard_choice.to_dict(),
        },
        "settings": cfg.to_dict(), "seed": settings.seed,
        "before": result.before.to_dict(), "after": result.after.to_dict(),
        "steps": result.steps, "seconds": round(result.seconds, 2),
    }
    _write(result, out, fmt, loaded, record)
    saved = save_detection(det, save_detection_to) if save_detection_to is not None else None
    return RepairOutcome(source=path, output=out, format=fmt, result=result, detection=det, data=data,
                         metadata=record, warnings=warnings, detection_path=saved)


def _write(result: RepairResult, out: Path, fmt: str, loaded: LoadedModel, record: dict[str, Any]) -> None:
    from scanner.prompting.checkpoints import save_dassl, save_safetensors

    learner = result.model.learner.to("cpu")
    extra = {"repair": record}
    if fmt == "dassl":
        epoch = loaded.meta.get("epoch")
        save_dassl(learner, out, epoch=int(epoch) if isinstance(epoch, int) else 0, extra_metadata=extra)
    else:
        save_safetensors(learner, out, extra_metadata=extra)
