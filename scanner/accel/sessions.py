"""onnxruntime sessions: provider choice, tuned options, and a thin batched runner.

Provider selection is a pure function of (available providers, GPU present, OpenVINO plugin present,
the user's choice) so it can be tested on any machine; ``best_providers()`` feeds it the real values.

Providers, best first: CUDA (the ``gpu`` extra and a GPU), OpenVINO (the ``openvino`` extra: Intel's
plugin execution provider for onnxruntime, faster than onnxruntime's own CPU kernels on Intel CPUs),
then onnxruntime's CPU provider. ``SCANNER_ONNX_PROVIDER`` (``auto``, ``cuda``, ``openvino``, ``cpu``)
narrows the choice; a provider that is asked for but missing is skipped with a warning.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
OPENVINO = "OpenVINOExecutionProvider"
CPU = "CPUExecutionProvider"
PROVIDER_ENV = "SCANNER_ONNX_PROVIDER"
PROVIDER_CHOICES = ("auto", "cuda", "openvino", "cpu")


def select_providers(
    available: Sequence[str], gpu_present: bool, openvino: bool = False, choice: str = "auto"
) -> list[str]:
    """Providers in priority order: CUDA when the onnxruntime build has it *and* a GPU exists, else
    OpenVINO when its plugin is registered (``openvino``), else the CPU provider alone.

    ``choice`` ("auto" or one provider's short name) restricts the pick; CPU always closes the list so a
    node the first provider cannot run still has a home.
    """
    _check_choice(choice)
    if choice in ("auto", "cuda") and gpu_present and CUDA in available:
        return [CUDA, CPU]
    if choice in ("auto", "openvino") and openvino:
        return [OPENVINO, CPU]
    return [CPU]


def provider_options(providers: Sequence[str]) -> list[str | tuple[str, dict[str, str]]]:
    """Providers with their options: CUDA with TF32 off. onnxruntime's CUDA provider runs fp32 matrix
    products in TF32 by default, which breaks fp32 parity with torch (ViT-B/16: 1.9e-3 max abs difference
    on an H100, against 1e-4 allowed); the scanner compares scores across backends, so it keeps fp32."""
    return [(p, {"use_tf32": "0"}) if p == CUDA else p for p in providers]


def gpu_present() -> bool:
    """Whether a CUDA device is visible (torch's view; onnxruntime-gpu needs the same driver)."""
    return bool(torch.cuda.is_available())


def provider_choice() -> str:
    """The user's ``SCANNER_ONNX_PROVIDER`` (default "auto"); an unknown value is a clear error."""
    choice = os.environ.get(PROVIDER_ENV, "auto").strip().lower() or "auto"
    _check_choice(choice)
    return choice


def _check_choice(choice: str) -> None:
    if choice not in PROVIDER_CHOICES:
        raise ValueError(f"{PROVIDER_ENV} must be one of {', '.join(PROVIDER_CHOICES)}; got {choice!r}")


@functools.cache
def openvino_device() -> ort.OrtEpDevice | None:
    """onnxruntime's handle on OpenVINO's CPU device, registering the plugin once per process; None
    when the ``openvino`` extra (``onnxruntime-ep-openvino``) is not installed or cannot load."""
    try:
        import onnxruntime_ep_openvino as ov_ep  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return None
    try:
        ort.register_execution_provider_library("scanner-openvino", ov_ep.get_library_path())
        devices = [d for d in ort.get_ep_devices() if d.ep_name == OPENVINO]
    except Exception as exc:  # a plugin that fails to load must not stop the scan: the CPU provider remains
        log.warning("the OpenVINO execution provider is installed but did not load (%s); using the CPU one", exc)
        return None
    cpu = [d for d in devices if d.ep_metadata.get("ov_device") == "CPU"]
    if not cpu:
        # e.g. an AMD EPYC (Zen 4): the plugin loads but offers no CPU device, so onnxruntime's own kernels serve
        log.info("the OpenVINO execution provider offers no CPU device on this machine; using the CPU one")
    return cpu[0] if cpu else None


def best_providers() -> list[str]:
    """The providers this process should use."""
    choice = provider_choice()
    picked = select_providers(
        ort.get_available_providers(), gpu_present(), openvino=openvino_device() is not None, choice=choice
    )
    if choice != "auto" and picked[0] != {"cuda": CUDA, "openvino": OPENVINO, "cpu": CPU}[choice]:
        log.warning("%s=%s is not available here; using %s", PROVIDER_ENV, choice, picked[0])
    return picked


def int8_providers() -> list[str]:
    """Providers for an int8 (dynamically quantised) graph: the best ones less OpenVINO, which ran it
    at half the speed of onnxruntime's own CPU kernels (scanner-tiny: 444 vs 902 images/s)."""
    return [p for p in best_providers() if p != OPENVINO]


def openvino_options(threads: int) -> dict[str, str]:
    """OpenVINO provider options: fp32 inference, latency mode, ``threads`` threads.

    OpenVINO's CPU plugin computes in bf16 by default on CPUs with AMX/AVX512-BF16 — measured 0.026
    (scanner-tiny) and 0.038 (ViT-B-32) max abs difference from torch fp32, against 1e-4 allowed — so
    fp32 is asked for explicitly; the scanner compares scores across backends. Latency mode runs one
    request on all threads (the throughput mode's two streams halved speed on sync calls).
    """
    config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": str(threads)}
    return {"load_config": json.dumps({"CPU": config})}


def _cpuinfo_physical_cores(text: str) -> int:
    # Distinct (physical id, core id) pairs; hyper-threads share a pair.
    pairs: set[tuple[str, str]] = set()
    phys = core = ""
    for line in [*text.splitlines(), ""]:
        if not line.strip():
            if core:
                pairs.add((phys, core))
            phys = core = ""
            continue
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "physical id":
            phys = value.strip()
        elif key == "core id":
            core = value.strip()
    return len(pairs)


@functools.cache
def physical_cores() -> int:
    """Physical cores usable by this process (≥ 1): affinity-limited, hyper-threads not counted."""
    logical = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        physical = _cpuinfo_physical_cores(Path("/proc/cpuinfo").read_text())
    except OSError:
        physical = 0
    return max(1, min(logical, physical) if physical else logical)


def session_options(threads: int | None = None) -> ort.SessionOptions:
    """ALL graph optimisations, intra-op threads = physical cores (or ``threads``), no inter-op pool,
    no spinning.

    The encoders are a single chain of ops, so parallelism lives inside ops (intra-op); a second pool
    would only oversubscribe the cores. Spinning is off because the scanner interleaves onnxruntime
    calls with torch work (trigger optimisation): idle onnxruntime threads that spin steal the cores
    torch needs next, and on a shared machine they steal them from everyone else. Measured on 2 busy
    cores, 2 threads, batch 32 (scanner-tiny image encoder): 121 images/s spinning, 178 without.
    """
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads or physical_cores()
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.log_severity_level = 3  # errors only: fusions it skips are not the user's business
    return so


class OnnxEncoder:
    """One onnxruntime session for one encoder graph; runs numpy-in, numpy-out in batches."""

    def __init__(
        self, model: bytes | Path, *, providers: Sequence[str] | None = None, threads: int | None = None
    ) -> None:
        src = str(model) if isinstance(model, Path) else model
        chosen = list(providers or best_providers())
        device = openvino_device() if chosen[0] == OPENVINO else None
        if device is not None:
            # A plugin provider is attached to the options, not named in ``providers``; onnxruntime
            # keeps its CPU provider behind it for any node OpenVINO does not take.
            so = session_options(threads)
            so.add_provider_for_devices([device], openvino_options(so.intra_op_num_threads))
            self.session = ort.InferenceSession(src, so)
        else:
            chosen = [p for p in chosen if p != OPENVINO] or [CPU]
            self.session = ort.InferenceSession(src, session_options(threads), providers=provider_options(chosen))
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_name = self.session.get_outputs()[0].name

    @property
    def providers(self) -> list[str]:
        """Providers the session actually got (onnxruntime drops ones that fail to initialise)."""
        return list(self.session.get_providers())

    def run(self, inputs: Sequence[np.ndarray], batch_size: int) -> np.ndarray:
        """Feed ``inputs`` (each with the same leading dim N) in chunks of ``batch_size``; (N, E) out."""
        n = int(inputs[0].shape[0])
        outs = []
        for start in range(0, n, batch_size):
            feed = {
                name: np.ascontiguousarray(arr[start : start + batch_size])
                for name, arr in zip(self.input_names, inputs, strict=True)
            }
            outs.append(self.session.run([self.output_name], feed)[0])
        if not outs:
            width = self.session.get_outputs()[0].shape[-1]
            return np.zeros((0, width if isinstance(width, int) else 0), np.float32)
        return np.concatenate(outs, axis=0)
