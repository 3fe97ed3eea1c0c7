"""``scan_path``: discover model units under a path, load each through its adapter, run the detector.

This is the library entry point (``scanner.scan_path``); the CLI and the daemon are thin shells over it.
Every per-model failure becomes data in the report (verdict ``unsafe`` or ``error`` with a category and
a message); one corrupt model never stops the others. Importing this module does not import torch: the
first progress line is printed before the heavy imports so a scan never starts silently.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from scanner import __version__
from scanner.adapters import Adapter, LoadContext, model_sha256
from scanner.errors import ConfigError, ScannerError, UnsafeFileError
from scanner.report import ClassScore, ModelReport, ScanReport, Verdict
from scanner.settings import Settings

if TYPE_CHECKING:
    import torch

    from scanner.engine.result import DetectionResult

log = logging.getLogger(__name__)

Emit = Callable[[str], None]
#: the detector's progress callback: (stage, done, total)
StageProgress = Callable[[str, int, int], None]
MAX_TRIGGER_PNGS = 16  # per model: the target plus the highest-scoring classes


# --------------------------------------------------------------------------- discovery
def claimant(path: Path, adapters: Sequence[Adapter]) -> Adapter | None:
    """The first adapter that claims ``path`` as a model unit, or None."""
    for adapter in adapters:
        try:
            if adapter.claims(path):
                return adapter
        except Exception:  # a buggy third-party claims() must not stop discovery
            continue
    return None


def loaded_adapters(settings: Settings | None = None) -> list[Adapter]:
    """Every adapter the plugins register (restricted by the settings' ``load_plugins``)."""
    from scanner import plugins

    plugins.load_plugins(settings.load_plugins if settings is not None else None)
    return plugins.adapters()


def discover_models(root: Path, adapters: Sequence[Adapter] | None = None, *,
                    exclude: Iterable[Path] = ()) -> list[Path]:
    """Model units under ``root``, sorted: ``root`` itself when an adapter claims it, else every claimed
    directory (not descended into: a model directory is one unit) and claimed file, recursively.

    Hidden entries and symlinked directories are not followed; paths in ``exclude`` (e.g. declared
    backbone files) are left out. Unclaimed files are not listed.
    """
    root = Path(root)
    adapters = loaded_adapters() if adapters is None else list(adapters)
    skip = {Path(p).resolve() for p in exclude}
    if not root.exists() or root.resolve() in skip:
        return []
    if claimant(root, adapters) is not None:
        return [root]
    if root.is_file():
        return []
    units: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        keep = []
        for d in sorted(dirnames):
            sub = here / d
            if d.startswith(".") or sub.is_symlink() or sub.resolve() in skip:
                continue
            if claimant(sub, adapters) is not None:
                units.append(sub)
            else:
                keep.append(d)
        dirnames[:] = keep  # os.walk descends only into unclaimed directories
        for f in sorted(filenames):
            p = here / f
            if f.startswith(".") or p.resolve() in skip or not p.is_file():
                continue
            if claimant(p, adapters) is not None:
                units.append(p)
    return sorted(units)


def describe_adapters(adapters: Sequence[Adapter]) -> str:
    """``"coop (…), safetensors (…)"``: what the installed adapters look for, for 'nothing found' messages."""
    if not adapters:
        return ("no adapters are installed: install the first-party plugins "
                "(pip install -e plugins/scanner-coop -e plugins/scanner-safetensors) or check "
                "SCANNER_LOAD_PLUGINS")
    parts = []
    for a in adapters:
        desc = getattr(a, "description", "")
        parts.append(f"{a.name} ({desc})" if desc else a.name)
    return "adapters looked for: " + "; ".join(parts)


# --------------------------------------------------------------------------- progress
class _Progress:
    """Progress lines and per-stage bars on stderr (silent when disabled)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._bar: Any = None

    def line(self, text: str) -> None:
        if self.enabled:
            self.close_bar()
            print(f"scanner: {text}", file=sys.stderr, flush=True)

    def stage(self, stage: str, done: int, total: int) -> None:
        """The detector's callback: one bar per model, labelled with the current stage."""
        if not self.enabled:
            return
        if self._bar is None or self._bar.total != total:
            self.close_bar()
            from tqdm import tqdm

            self._bar = tqdm(total=total, file=sys.stderr, leave=False, dynamic_ncols=True, mininterval=0.5)
        self._bar.set_description_str(f"  {stage}", refresh=False)
        self._bar.n = done
        self._bar.refresh()

    def close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


# --------------------------------------------------------------------------- detector
DetectFn = Callable[..., "DetectionResult"]


def detector_config(settings: Settings) -> Any:
    """The engine's ``DetectorConfig`` from the settings: detector name, threshold, ``n_images`` = the
    OOD pool size, then ``detector_options`` (which win). Raises :class:`ConfigError` for option names
    the detector does not have or values it rejects."""
    from scanner.engine import DetectorConfig

    fields = {f.name for f in dataclasses.fields(DetectorConfig)}
    changes: dict[str, Any] = {"detector": settings.detector, "n_images": settings.ood_size}
    if settings.threshold is not None:
        changes["threshold"] = settings.threshold
    changes = {k: v for k, v in changes.items() if k in fields}
    for key, value in settings.detector_options.items():
        changes[key] = tuple(value) if isinstance(value, list) else value
    unknown = sorted(set(changes) - fields)
    if unknown:
        raise ConfigError(
            f"detector option(s) {', '.join(unknown)} are not DetectorConfig fields; known: "
            f"{', '.join(sorted(fields))}"
        )
    try:
        return DetectorConfig(**changes)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid detector options {changes}: {exc}") from exc


def _detector(settings: Settings) -> tuple[DetectFn | None, Any, str]:
    """(detect function, its config, why-missing). The engine is imported lazily (it pulls torch)."""
    try:
        from scanner.engine import DETECTORS, detect
    except ImportError as exc:
        return None, None, f"the detector is not available in this installation ({exc})"
    if settings.detector in DETECTORS:
        return detect, detector_config(settings), ""
    from scanner import plugins

    extra = plugins.detectors()
    if settings.detector in extra:
        # A plugin detector takes the same arguments as scanner.engine.detect; config is None.
        return extra[settings.detector].detect, None, ""
    raise ConfigError(
        f"unknown detector {settings.detector!r}; expected one of {', '.join([*DETECTORS, *extra])}"
    )


# --------------------------------------------------------------------------- OOD pools
def ood_pool(settings: Settings, size: int, limit: int | None = None) -> torch.Tensor:
    """The settings' OOD pool at ``size`` px (the ``ood_dir`` folder, else the bundled photos), at most
    ``limit`` images (default ``ood_size``); a smaller limit gives a prefix of the full pool."""
    from scanner.zoo.ood import default_ood_pool, load_ood_folder

    n = settings.ood_size if limit is None else min(limit, settings.ood_size)
    if settings.ood_dir is not None:
        return load_ood_folder(settings.ood_dir, size, limit=n)
    return default_ood_pool(n, size, settings.seed)


class _Pools:
    """OOD pools built once per run and per input resolution; a failure is remembered, not retried."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._pools: dict[int, tuple[torch.Tensor, str]] = {}
        self._failed: ScannerError | None = None

    def get(self, size: int) -> tuple[torch.Tensor, str]:
        if self._failed is not None:
            raise self._failed
        if size not in self._pools:
            from scanner.zoo.ood import pool_sha256

            try:
                pool = ood_pool(self.settings, size)
            except ScannerError as exc:
                self._failed = exc
                raise
            self._pools[size] = (pool, pool_sha256(pool))
        return self._pools[size]


# --------------------------------------------------------------------------- one model
def _trigger_arrays(result: DetectionResult) -> dict[int, Any]:
    """uint8 (H, W, 3) arrays of the target's and the top-scoring classes' trigger images."""
    ranked = sorted(result.classes, key=lambda c: c.anomaly_score, reverse=True)
    wanted = [result.target_index] if result.target_index is not None else []
    wanted += [c.index for c in ranked if c.index not in wanted]
    out = {}
    for index in wanted[:MAX_TRIGGER_PNGS]:
        img = result.trigger_images.get(index)
        if img is None:
            continue
        # (3, S, S) float in [0, 1] -> (S, S, 3) uint8
        arr = img.detach().float().clamp(0, 1).mul(255).round().to("cpu").byte().permute(1, 2, 0)
        out[index] = arr.numpy()
    return out


def _fill_from_result(report: ModelReport, result: DetectionResult) -> None:
    report.verdict = Verdict.BACKDOORED if result.backdoored else Verdict.CLEAN
    report.target_index = result.target_index if result.backdoored else None
    report.target_class = result.target_name if result.backdoored else None
    report.anomaly_score = float(result.anomaly_score)
    report.threshold = float(result.threshold)
    report.detector = result.detector
    report.class_scores = [
        ClassScore(c.index, c.name, float(c.anomaly_score), {k: float(v) for k, v in c.evidence.items()})
        for c in result.classes
    ]
    if result.backdoored:
        report.message = f"class {report.target_class!r} is a likely backdoor target" + (
            f": {result.reason}" if result.reason
            else f": anomaly score {report.anomaly_score:.2f} > threshold {report.threshold:.3g}"
        )
    elif result.reason:
        report.message = result.reason
    else:
        report.message = (
            f"no class stands out: highest anomaly score {report.anomaly_score:.2f} <= threshold "
            f"{report.threshold:.3g}"
        )


@dataclasses.dataclass
class _Run:
    """What every model of one scan shares."""

    settings: Settings
    ctx: LoadContext
    pools: _Pools
    detect: DetectFn | None
    config: Any
    missing: str  # why ``detect`` is None
    progress: _Progress


def _scan_unit(unit: Path, adapter: Adapter, run: _Run) -> tuple[ModelReport, dict[int, Any]]:
    """The report of one unit and (when HTML is wanted) its trigger images (H, W, 3) uint8."""
    settings, ctx, progress = run.settings, run.ctx, run.progress
    report = ModelReport(path=str(unit), verdict=Verdict.ERROR, adapter=adapter.name, seed=settings.seed)
    try:
        report.sha256 = ctx.sha256(unit)
    except OSError as exc:
        report.category, report.message = "io", f"cannot read {unit}: {exc.strerror or exc}"
        return report, {}
    try:
        loaded = adapter.load(unit, ctx)
    except UnsafeFileError as exc:
        report.verdict, report.category, report.message = Verdict.UNSAFE, exc.category, str(exc)
        report.unsafe_globals = list(exc.globals_found)
        return report, {}
    except ScannerError as exc:
        report.category, report.message = exc.category, str(exc)
        return report, {}
    except OSError as exc:
        report.category, report.message = "io", f"cannot read {unit}: {exc.strerror or exc}"
        return report, {}
    except Exception as exc:  # a buggy adapter must not stop the other models
        report.category = "adapter"
        report.message = f"adapter {adapter.name!r} failed: {type(exc).__name__}: {exc}"
        return report, {}
    report.backbone, report.backbone_sha256 = loaded.backbone_name, loaded.backbone_sha256
    if run.detect is None:
        report.category, report.message = "detection", run.missing
        return report, {}
    try:
        model = loaded.model.to(settings.device)
        pool, pool_hash = run.pools.get(model.backbone.image_size)
        report.ood_sha256 = pool_hash
        report.accel = _attach_accel(settings, model, pool, pool_hash)
        result = run.detect(model, pool.to(settings.device), run.config, seed=settings.seed,
                            progress=progress.stage)
    except ScannerError as exc:
        report.category, report.message = exc.category, str(exc)
        return report, {}
    except Exception as exc:  # NaNs, shape bugs, out-of-memory: data in the report, never a crash
        report.category = "detection"
        report.message = f"the detector failed on this model: {type(exc).__name__}: {exc}"
        return report, {}
    finally:
        progress.close_bar()
        # the backbone is shared with the next model on it, whose learner is loaded on the CPU
        loaded.model.to("cpu")
    _fill_from_result(report, result)
    report.ood_sha256 = result.ood_sha256 or report.ood_sha256
    if settings.report_dir is not None and result.raw_triggers and report.sha256:
        _save_detection(settings.report_dir, report, result, report.sha256)
    return report, _trigger_arrays(result) if settings.report_dir is not None else {}


def _attach_accel(settings: Settings, model: Any, pool: torch.Tensor, pool_hash: str) -> dict[str, Any]:
    """Inject forward-only encoders (onnxruntime, per ``settings.accel``) into ``model``; what serves it.

    The pool is registered so its clean features are encoded once per backbone per process, whichever
    model asks first. Never raises: anything unexpected leaves the model on torch (logged, reported).
    """
    if settings.accel == "torch":
        return {"image": "torch", "text": "torch"}
    from scanner.accel.features import INT8_GATE_IMAGES, forward_features

    try:
        feats = forward_features(model.backbone, settings.accel, cache_dir=settings.cache_dir / "onnx",
                                 int8=settings.accel_int8, device=settings.device)
        if feats is None:
            return {"image": "torch", "text": "torch"}
        feats.register_pool(pool, pool_hash)
        gate = pool[-INT8_GATE_IMAGES:] if settings.accel_int8 else None
        info = feats.attach(model, gate)
    except Exception as exc:  # the scan goes on in torch whatever happened here
        model.use_forward_only(None, None)
        why = f"{type(exc).__name__}: {exc}"
        log.warning("forward-only encoders unavailable for backbone %s (%s); using torch", model.backbone.name, why)
        return {"image": "torch-fallback", "text": "torch-fallback", "image_fallback_reason": why,
                "text_fallback_reason": why}
    log.info("forward-only work of backbone %s: image %s, text %s%s", model.backbone.name, info.image, info.text,
             f" (onnxruntime provider {info.provider})" if info.provider else "")
    return info.to_dict()


def _save_detection(report_dir: Path, report: ModelReport, result: DetectionResult, sha256: str) -> None:
    """The re-applicable triggers for ``scanner repair --report`` (artefact ``detection``)."""
    from scanner.render.html import MODELS_DIR, model_slug
    from scanner.repair.saved_detection import FILE_NAME, SavedDetection, save_detection

    rel = Path(MODELS_DIR) / model_slug(report) / FILE_NAME
    save_detection(SavedDetection.from_result(result, sha256), report_dir / rel)
    report.artefacts["detection"] = rel.as_posix()


def backbone_store(settings: Settings) -> Any:
    """The bundled CLIP plus the declared backbones; a declaration that cannot be used is a
    :class:`ConfigError` (the run stops before any model is loaded)."""
    from scanner.backbones import BackboneStore, entry_from_table
    from scanner.errors import BackboneError

    entries = []
    for b in settings.backbones:
        if not b.path.exists():
            raise ConfigError(
                f"backbone {b.name!r}: {b.path} does not exist; fix its path in the `backbones` settings "
                f"or the --backbone {b.name}=PATH flag"
            )
        table: dict[str, Any] = {"path": str(b.path), "format": b.format}
        if b.arch:
            table["arch"] = b.arch
        if b.sha256:
            table["sha256"] = b.sha256
        try:
            entries.append(entry_from_table(b.name, table))
        except BackboneError as exc:
            raise ConfigError(str(exc)) from exc
    # Backbones are declared by the user and larger than prompt files: the store keeps its own limit.
    return BackboneStore(entries)


# --------------------------------------------------------------------------- the scan
def scan_path(path: Path | str, settings: Settings | None = None, *, progress: bool = False,
              adapters: Sequence[Adapter] | None = None) -> ScanReport:
    """Scan a checkpoint file, a model directory or a registry tree (recursively).

    Returns the :class:`ScanReport`; ``report.exit_code()`` is what ``scanner scan-once`` exits with.
    With ``progress`` a first line is printed to stderr before anything slow happens, then one line per
    model and a bar per detector stage. ``adapters`` overrides the plugin registry (tests, embedding).
    Raises only for run-level problems (invalid settings or plugins); per-model problems are verdicts.
    """
    started = time.time()
    root = Path(path)
    settings = settings or Settings()
    out = _Progress(progress)
    out.line(f"discovering models under {root}")
    report = ScanReport(root=str(root), started_at=started, scanner_version=__version__)
    if not root.exists():
        report.models.append(ModelReport(
            path=str(root), verdict=Verdict.ERROR, category="io",
            message=f"{root} does not exist (it may have been moved or deleted)",
        ))
        report.finished_at = time.time()
        return report
    adapters = loaded_adapters(settings) if adapters is None else list(adapters)
    declared = [b.path for b in settings.backbones]
    units = discover_models(root, adapters, exclude=declared)
    if root.is_file() and not units:
        # The user named this file: say it was not scanned rather than dropping it silently.
        report.models.append(ModelReport(
            path=str(root), verdict=Verdict.SKIPPED, category="unsupported",
            message=f"no adapter recognises {root.name}; {describe_adapters(adapters)}",
        ))
    out.line(f"found {len(units)} model(s)")
    if units:
        detect, config, missing = _detector(settings)
        ctx = LoadContext(backbones=backbone_store(settings), max_file_bytes=settings.max_file_bytes,
                          device=settings.device)
        run = _Run(settings, ctx, _Pools(settings), detect, config, missing, out)
        for i, unit in enumerate(units, 1):
            t0 = time.perf_counter()
            adapter = claimant(unit, adapters)
            assert adapter is not None  # discover_models only returns claimed units
            out.line(f"[{i}/{len(units)}] {unit} ({adapter.name})")
            model, triggers = _scan_unit(unit, adapter, run)
            model.duration_s = time.perf_counter() - t0
            if settings.report_dir is not None:
                _write_model_html(settings.report_dir, model, triggers)
            report.models.append(model)
            _notify(model)
            out.line(f"[{i}/{len(units)}] {model.verdict.value}: {unit} ({model.duration_s:.1f} s)")
    report.finished_at = time.time()
    if settings.report_dir is not None:
        from scanner.render.html import write_index

        write_index(settings.report_dir, report)
    return report


def _write_model_html(report_dir: Path, model: ModelReport, triggers: dict[int, Any]) -> None:
    from scanner.render.html import save_trigger_pngs, write_model_page

    if triggers:
        model.artefacts.update(save_trigger_pngs(report_dir, model, triggers))
    model.artefacts["html"] = write_model_page(report_dir, model)


def _notify(model: ModelReport) -> None:
    from scanner import plugins

    plugins.notify_scan_completed(model)


__all__ = ["describe_adapters", "detector_config", "discover_models", "model_sha256", "scan_path"]
