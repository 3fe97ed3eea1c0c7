"""Safe loading is a rule: nothing a checkpoint names is imported unless it is on an allow-list.

Every torch file is scanned *statically* before anything unpickles it: the pickle streams (``*/data.pkl``
and every other ``.pkl`` inside torch's zip container, or the pickles of the legacy raw format) are walked
with :func:`pickletools.genops` and every global they reference (``GLOBAL``, ``STACK_GLOBAL`` resolved by
simulating the stack and memo, ``INST``, extension codes) is compared with the allow-list. Anything else
raises :class:`~scanner.errors.UnsafeFileError` naming the globals; the file is never unpickled.

Files that pass are read in one of three ways, none of which can run code the file names:

* plain tensors / containers → ``torch.load(path, map_location="cpu", weights_only=True)``;
* Dassl checkpoints that also pickle their LR scheduler / optimizer *objects* (``ConstantWarmupScheduler``
  keeps its successor scheduler in ``__dict__``) → a restricted unpickler that maps those few *named*
  classes to inert records without ever importing them (see :data:`INERT_GLOBALS`);
* TorchScript archives (OpenAI's ``ViT-B-16.pt``) → the same restricted unpickler over the archive's
  ``data.pkl`` + ``data/`` storages; ``torch.jit.load`` is never called (it would run the archive's code).

``.safetensors`` files are validated (header size, JSON, dtypes, shapes, offsets) before a byte is mapped.
"""

from __future__ import annotations

import _compat_pickle
import functools
import io
import json
import math
import pickle
import pickletools
import struct
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal

import torch

from scanner.errors import CheckpointError, UnsafeFileError

DEFAULT_MAX_BYTES = 2 * 1024**3
#: A single tensor may not hold more elements than this (a ViT-L/14 token embedding is 38M).
DEFAULT_MAX_TENSOR_ELEMS = 512 * 1024**2
#: A pickle stream is metadata only (tensor bytes live elsewhere); 256 MiB is far beyond any real one.
MAX_PICKLE_BYTES = 256 * 1024**2
#: safetensors headers are JSON describing tensors; real ones are kilobytes.
MAX_SAFETENSORS_HEADER = 100 * 1024**2
#: First pickle of torch's legacy (non-zip) format.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

_DTYPE_NAMES = (
    "float64", "float32", "float16", "bfloat16", "complex64", "complex128", "complex32",
    "int64", "int32", "int16", "int8", "uint8", "uint16", "uint32", "uint64", "bool",
    "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
    "qint8", "quint8", "qint32", "quint4x2",
    "double", "float", "half", "long", "int", "short", "cfloat", "cdouble",
)
# Legacy typed storage classes torch.save writes into the persistent ids, with the dtype they hold.
_STORAGE_DTYPES: dict[str, torch.dtype] = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "ComplexFloatStorage": torch.complex64,
    "ComplexDoubleStorage": torch.complex128,
}
_REBUILD_FUNCTIONS = (
    "_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
    "_rebuild_parameter_with_state", "_rebuild_sparse_tensor", "_rebuild_device_tensor_from_numpy",
    "_rebuild_meta_tensor_no_storage", "_rebuild_nested_tensor", "_rebuild_qtensor",
    "_rebuild_wrapper_subclass",
)


@functools.cache
def allowed_globals() -> frozenset[str]:
    """Globals ``torch.save`` of tensors, state dicts and Dassl/CoOp checkpoints needs (and nothing else).

    Mirrors what torch's own weights-only unpickler accepts: tensor rebuild functions, storage types,
    dtypes, ``OrderedDict``, ``torch.Size``, ``torch.device``, ``set``/``bytearray``/``complex`` and
    ``_codecs.encode`` (protocol 2 writes ``bytes`` through it). These are *names*; nothing is imported here.
    """
    names = {
        "collections.OrderedDict", "collections.Counter", "torch.nn.parameter.Parameter",
        "torch.serialization._get_layout", "torch.Size", "torch.Tensor", "torch.device",
        "_codecs.encode", "builtins.bytearray", "builtins.set", "builtins.complex",
        "torch._tensor._rebuild_from_type_v2", "torch.storage.UntypedStorage", "torch.storage.TypedStorage",
        "torch.strided", "torch.sparse_coo", "torch.sparse_csr",
        "torch.per_tensor_affine", "torch.per_tensor_symmetric", "torch.per_channel_affine",
        "torch.per_channel_symmetric", "torch.per_channel_affine_float_qparams",
    }
    names.update(f"torch.{d}" for d in _DTYPE_NAMES)
    names.update(f"torch.{s}" for s in _STORAGE_DTYPES)
    names.update(f"torch.cuda.{s}" for s in _STORAGE_DTYPES)
    names.update(f"torch._utils.{f}" for f in _REBUILD_FUNCTIONS)
    return frozenset(names)


#: Classes real Dassl checkpoints pickle as *objects* (the warmup scheduler keeps its successor scheduler,
#: which keeps its optimizer). They are data to us: the restricted reader turns each into an inert record
#: holding its ``__dict__`` and never imports the class. Only zip-format torch files take this path.
INERT_GLOBALS: frozenset[str] = frozenset(
    {f"torch.optim.lr_scheduler.{c}" for c in (
        "StepLR", "MultiStepLR", "CosineAnnealingLR", "ExponentialLR", "ConstantLR", "LinearLR",
        "CosineAnnealingWarmRestarts", "ReduceLROnPlateau", "SequentialLR", "PolynomialLR")}
    | {f"torch.optim.{m}.{c}" for m, c in (
        ("sgd", "SGD"), ("adam", "Adam"), ("adamw", "AdamW"), ("rmsprop", "RMSprop"))}
    | {f"dassl.optim.lr_scheduler.{c}" for c in ("ConstantWarmupScheduler", "LinearWarmupScheduler")}
    | {"copyreg._reconstructor", "builtins.object", "collections.defaultdict", "builtins.dict",
       "builtins.list"}
)
#: Helpers the TorchScript pickler writes around typed containers; the reader replaces them by identity.
_TORCHSCRIPT_HELPERS = frozenset(
    f"torch.jit._pickle.{f}" for f in (
        "restore_type_tag", "build_intlist", "build_doublelist", "build_boollist", "build_tensorlist",
        "build_genericlist", "build_intlist")
)
_TORCHSCRIPT_CLASS_PREFIX = "__torch__."

FileKind = Literal["plain", "inert", "torchscript"]


# ----------------------------------------------------------------------------- static scan
def _canonical(module: str, name: str) -> str:
    """``module.name`` after the Python 2 renames of protocol < 3 (``__builtin__`` → ``builtins``)."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    return f"{module}.{name}"


def _opcodes(stream: BinaryIO) -> list[tuple[pickletools.OpcodeInfo, Any, int | None]]:
    """The opcodes of the one pickle at the stream's position, up to and including STOP.

    A crafted ``STRING`` argument with an invalid escape makes ``codecs.escape_decode`` (inside genops) emit
    a DeprecationWarning: a hostile file must not make the scanner print warnings, so they are dropped here.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return list(pickletools.genops(stream))


def _scan_stream(stream: BinaryIO, where: str) -> tuple[list[str], Any]:
    """Globals referenced by the one pickle at the stream's position; also the value if it is a lone int.

    The stack is simulated from pickletools' opcode signatures: strings pushed by the *UNICODE/STRING
    opcodes or fetched from the memo are tracked so ``STACK_GLOBAL`` resolves to the real
    ``module.name`` even when an attacker routes the names through the memo, POPs or DUPs.
    """
    found: list[str] = []
    stack: list[Any] = []
    marks: list[int] = []
    memo: dict[int, Any] = {}
    unknown = object()
    value: Any = None
    try:
        for op, arg, _pos in _opcodes(stream):
            name = op.name
            if name in ("GLOBAL", "INST"):
                module, _, attr = str(arg).partition(" ")
                found.append(_canonical(module, attr))
            elif name == "STACK_GLOBAL":
                attr_v = stack[-1] if stack else unknown
                module_v = stack[-2] if len(stack) > 1 else unknown
                if isinstance(module_v, str) and isinstance(attr_v, str):
                    found.append(_canonical(module_v, attr_v))
                else:
                    found.append("<unresolved STACK_GLOBAL>")
            elif name in ("EXT1", "EXT2", "EXT4"):
                found.append(f"<copyreg extension {arg}>")
            # --- keep the simulated stack in step: pop what the opcode consumes, push what it makes.
            if name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[int(str(arg))] = stack[-1] if stack else unknown
                continue
            if name == "MEMOIZE":
                memo[len(memo)] = stack[-1] if stack else unknown
                continue
            if name == "MARK":
                marks.append(len(stack))
                continue
            if name == "STOP":
                value = stack[-1] if stack else None
                break
            if name == "DUP":
                stack.append(stack[-1] if stack else unknown)
                continue
            before = op.stack_before
            if (before and before[0] is pickletools.markobject) or pickletools.stackslice in before:
                cut = marks.pop() if marks else 0
                del stack[cut:]
                before = [b for b in before if b not in (pickletools.markobject, pickletools.stackslice)]
            for _ in before:
                if stack:
                    stack.pop()
            if name in ("GET", "BINGET", "LONG_BINGET"):
                stack.append(memo.get(int(str(arg)), unknown))
            elif name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING",
                          "BINSTRING", "SHORT_BINSTRING"):
                stack.append(arg if isinstance(arg, str) else unknown)
            elif name in ("LONG1", "LONG4", "LONG", "INT", "BININT", "BININT1", "BININT2"):
                stack.append(arg)
            else:
                stack.extend(unknown for _ in op.stack_after)
    except (ValueError, struct.error, EOFError, UnicodeDecodeError) as exc:
        raise CheckpointError(
            f"{where}: the pickle stream is truncated or corrupt ({exc}); expected a complete torch "
            "checkpoint — re-export or re-download the file"
        ) from exc
    return found, value


def _open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{path}: the zip container is truncated or corrupt ({exc}); expected a torch.save zip archive "
            "— re-export or re-download the file"
        ) from exc


def _read_member(zf: zipfile.ZipFile, name: str, limit: int, path: Path) -> bytes:
    info = zf.getinfo(name)
    if info.file_size > limit:
        raise CheckpointError(
            f"{path}: archive member {name} declares {info.file_size} bytes, above the {limit}-byte limit; "
            "raise the size limit if the file is trusted"
        )
    try:
        with zf.open(info) as fh:
            data = fh.read(limit + 1)
    except (zipfile.BadZipFile, OSError, EOFError, zipfile.LargeZipFile, NotImplementedError) as exc:
        raise CheckpointError(
            f"{path}: archive member {name} cannot be read ({exc}); the file is corrupt"
        ) from exc
    if len(data) > limit:
        raise CheckpointError(f"{path}: archive member {name} is larger than the {limit}-byte limit")
    return data


def _is_torchscript(zf: zipfile.ZipFile) -> bool:
    return any(n.endswith("constants.pkl") for n in zf.namelist())


def _scan_zip(path: Path, zf: zipfile.ZipFile) -> list[str]:
    pkls = [n for n in zf.namelist() if n.endswith(".pkl")]
    if not any(n.endswith("data.pkl") for n in pkls):
        raise CheckpointError(
            f"{path}: zip archive without a data.pkl; expected a torch.save or TorchScript archive"
        )
    found: list[str] = []
    for name in pkls:
        data = _read_member(zf, name, MAX_PICKLE_BYTES, path)
        globals_, _ = _scan_stream(io.BytesIO(data), f"{path}:{name}")
        found.extend(globals_)
    return found


def _scan_raw(path: Path) -> list[str]:
    # Legacy torch format: magic number, protocol, sys_info, the object, storage keys, then raw bytes.
    # Any other raw pickle is one stream.
    with path.open("rb") as fh:
        globals_, value = _scan_stream(fh, str(path))
        if value != _LEGACY_MAGIC:
            return globals_
        for _ in range(4):
            more, _v = _scan_stream(fh, str(path))
            globals_.extend(more)
    return globals_


def _check_size(path: Path, max_bytes: int) -> int:
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read the file ({exc.strerror or exc})") from exc
    if size == 0:
        raise CheckpointError(f"{path}: the file is empty; expected a checkpoint — re-export the model")
    if size > max_bytes:
        raise CheckpointError(
            f"{path}: {size} bytes is above the {max_bytes}-byte size limit; raise the limit only for "
            "trusted files"
        )
    return size


def scan_pickle_globals(path: Path) -> list[str]:
    """Every ``module.name`` the file's pickles reference, in order, duplicates removed.

    Works on torch zip archives (every ``.pkl`` member, TorchScript included), legacy torch files and
    raw pickles. Raises :class:`CheckpointError` when the container or a stream is truncated/corrupt.
    """
    path = Path(path)
    _check_size(path, max_bytes=1 << 62)
    found = _scan_zip(path, _open_zip(path)) if zipfile.is_zipfile(path) else _scan_raw(path)
    return list(dict.fromkeys(found))


def _classify(path: Path) -> tuple[FileKind, list[str]]:
    is_zip = zipfile.is_zipfile(path)
    torchscript = False
    if is_zip:
        zf = _open_zip(path)
        torchscript = _is_torchscript(zf)
        found = list(dict.fromkeys(_scan_zip(path, zf)))
    else:
        found = list(dict.fromkeys(_scan_raw(path)))
    allowed = allowed_globals()
    if torchscript:
        bad = [g for g in found if not (g in allowed or g in _TORCHSCRIPT_HELPERS
                                        or g.startswith(_TORCHSCRIPT_CLASS_PREFIX))]
        kind: FileKind = "torchscript"
    else:
        inert_ok = is_zip
        bad = [g for g in found if g not in allowed and not (inert_ok and g in INERT_GLOBALS)]
        kind = "inert" if any(g in INERT_GLOBALS for g in found) else "plain"
    if bad:
        raise UnsafeFileError(
            f"{path}: loading would import {', '.join(bad)}, outside the allow-list of tensor/state-dict "
            "globals; the file was not executed. Treat it as hostile, or re-save its tensors as "
            ".safetensors",
            globals_found=bad,
        )
    return kind, found


def check_torch_file(path: Path, *, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
    """Raise :class:`UnsafeFileError` if loading ``path`` would import a global outside the allow-list,
    :class:`CheckpointError` if it is empty, too large, truncated or corrupt. Never unpickles anything."""
    path = Path(path)
    _check_size(path, max_bytes)
    _classify(path)


def is_torchscript_archive(path: Path) -> bool:
    """True for a zip with ``constants.pkl`` (what ``torch.jit.save`` writes, e.g. OpenAI's CLIP ``.pt``)."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        return False
    return _is_torchscript(_open_zip(path))


def safe_torch_load(path: Path, *, max_bytes: int = DEFAULT_MAX_BYTES,
                    max_tensor_elems: int = DEFAULT_MAX_TENSOR_ELEMS) -> Any:
    """Load a torch checkpoint without executing anything it names.

    Size limit, then the static scan (:func:`check_torch_file`), then ``torch.load(weights_only=True)``.
    Dassl checkpoints that pickle scheduler/optimizer objects come back with those objects as
    :class:`InertObject` records. A TorchScript archive comes back as a flat ``{name: tensor}`` dict of
    its module tree's tensors (see :func:`load_torchscript_tensors`). Any failure → :class:`CheckpointError`.
    """
    path = Path(path)
    _check_size(path, max_bytes)
    kind, _found = _classify(path)
    if kind == "torchscript":
        return load_torchscript_tensors(path, max_bytes=max_bytes, max_tensor_elems=max_tensor_elems)
    if kind == "inert":
        return _restricted_zip_load(path, "data.pkl", torchscript=False, max_tensor_elems=max_tensor_elems)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises RuntimeError/ValueError/EOFError/UnpicklingError...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{path}: torch.load(weights_only=True) failed: {first}; the file is truncated, corrupt or not "
            "a torch checkpoint"
        ) from exc


# ----------------------------------------------------------------------------- restricted reader
@dataclass
class InertObject:
    """Stand-in for a pickled object whose class is never imported: its qualified name and state."""

    qualname: str
    attrs: dict[str, Any] = field(default_factory=dict)
    state: Any = field(default=None, repr=False)  # non-dict state, kept as is
    args: tuple[Any, ...] = field(default=(), repr=False)

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict):
            self.attrs = {str(k): v for k, v in state.items()}
        else:
            self.state = state


@dataclass(frozen=True)
class _StorageType:
    dtype: torch.dtype


@dataclass(frozen=True)
class _LoadedStorage:
    flat: torch.Tensor  # (numel,) of the storage's dtype


def _inert_class(qualname: str) -> type:
    def new(cls: type, *args: Any, **kwargs: Any) -> InertObject:
        return InertObject(qualname, args=args)

    # A class object so NEWOBJ's ``cls.__new__(cls)`` works; instances are plain InertObject records.
    return type("InertClass", (), {"__new__": new, "qualname": qualname})


def _identity(value: Any, *_rest: Any) -> Any:
    return value


# The pure-Python unpickler (typeshed does not describe it); its dispatch table can be overridden.
_PyUnpickler: Any = pickle._Unpickler


class _RestrictedUnpickler(_PyUnpickler):
    """Pure-Python unpickler whose every global is resolved by name to data-only stand-ins.

    The pure-Python class lets BUILD be restricted too (only records and dicts accept state), so no
    ``__setstate__`` of a real class ever runs.
    """

    def __init__(self, data: bytes, *, storages: Callable[[str, torch.dtype, int], torch.Tensor],
                 torchscript: bool, max_tensor_elems: int, where: str) -> None:
        super().__init__(io.BytesIO(data))
        self._storages = storages
        self._torchscript = torchscript
        self._max_elems = max_tensor_elems
        self._where = where
        self._cache: dict[str, _LoadedStorage] = {}
        self.dispatch: dict[int, Callable[[Any], None]] = dict(_PyUnpickler.dispatch)
        self.dispatch[pickle.BUILD[0]] = _RestrictedUnpickler._load_build

    def find_class(self, module: str, name: str) -> Any:
        full = _canonical(module, name)
        module, _, name = full.rpartition(".")
        if full in ("torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_tensor"):
            return self._rebuild_tensor
        if full in ("torch._utils._rebuild_parameter", "torch._utils._rebuild_parameter_with_state"):
            return _identity
        if full == "collections.OrderedDict":
            return OrderedDict
        if full == "torch.Size":
            return torch.Size
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "torch" and name in _DTYPE_NAMES:
            return getattr(torch, name)
        if self._torchscript and (full in _TORCHSCRIPT_HELPERS):
            return _identity
        if self._torchscript and full.startswith(_TORCHSCRIPT_CLASS_PREFIX):
            return _inert_class(full)
        if not self._torchscript and full in INERT_GLOBALS:
            if full == "copyreg._reconstructor":
                return _reconstruct_inert
            if full == "collections.defaultdict":
                return lambda *_a: {}
            return _inert_class(full)
        raise UnsafeFileError(f"{self._where}: refusing global {full}", globals_found=[full])

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str) and isinstance(pid[4], int)):
            raise CheckpointError(f"{self._where}: unexpected persistent id {pid!r:.80}")
        stype, key, numel = pid[1], pid[2], pid[4]
        if key not in self._cache:
            if numel < 0 or numel > self._max_elems:
                raise CheckpointError(
                    f"{self._where}: storage {key} claims {numel} elements, above the limit"
                )
            self._cache[key] = _LoadedStorage(self._storages(key, stype.dtype, numel))
        return self._cache[key]

    def _rebuild_tensor(self, storage: Any, offset: Any, size: Any, stride: Any, *_rest: Any) -> torch.Tensor:
        if not (isinstance(storage, _LoadedStorage) and isinstance(offset, int) and offset >= 0
                and isinstance(size, tuple) and isinstance(stride, tuple)
                and all(isinstance(v, int) and v >= 0 for v in (*size, *stride))):
            raise CheckpointError(f"{self._where}: malformed tensor record")
        if math.prod(size) > self._max_elems:
            raise CheckpointError(f"{self._where}: a tensor of shape {size} is above the element limit")
        try:
            # as_strided checks the view stays inside the storage, so lying sizes cannot read out of bounds.
            return storage.flat.as_strided(size, stride, offset).clone()
        except RuntimeError as exc:
            raise CheckpointError(f"{self._where}: tensor shape does not fit its storage ({exc})") from exc

    def _load_build(self) -> None:
        stack = self.stack
        state = stack.pop()
        inst = stack[-1]
        if isinstance(inst, InertObject):
            inst.__setstate__(state)
        elif isinstance(inst, dict | torch.Tensor):
            pass  # OrderedDict._metadata / Parameter state: nothing we need
        else:
            raise CheckpointError(f"{self._where}: refusing to set state on {type(inst).__name__}")


def _reconstruct_inert(cls: Any, base: Any, state: Any = None) -> InertObject:
    # copyreg._reconstructor(cls, object, None) is how protocol < 2 pickles plain objects.
    qual = getattr(cls, "qualname", None)
    if not isinstance(qual, str):
        raise CheckpointError("refusing copyreg._reconstructor on a non-inert class")
    return InertObject(qual)


def _zip_prefix(zf: zipfile.ZipFile, pkl: str, path: Path) -> str:
    for n in zf.namelist():
        if n == pkl or n.endswith("/" + pkl):
            return n[: -len(pkl)]
    raise CheckpointError(f"{path}: archive has no {pkl}")


def _restricted_zip_load(path: Path, pkl: str, *, torchscript: bool, max_tensor_elems: int) -> Any:
    zf = _open_zip(path)
    prefix = _zip_prefix(zf, pkl, path)
    members = set(zf.namelist())
    if f"{prefix}byteorder" in members and zf.read(f"{prefix}byteorder").strip() not in (b"little", b""):
        raise CheckpointError(
            f"{path}: big-endian archives are not supported; re-save the file on a little-endian host"
        )
    folder = "constants" if pkl == "constants.pkl" else "data"

    def storage(key: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
        itemsize = torch.empty((), dtype=dtype).element_size()
        name = f"{prefix}{folder}/{key}"
        if name not in members:
            raise CheckpointError(f"{path}: storage {name} is missing from the archive")
        raw = _read_member(zf, name, numel * itemsize, path)
        if len(raw) != numel * itemsize:
            raise CheckpointError(
                f"{path}: storage {name} has {len(raw)} bytes, expected {numel * itemsize}; "
                "the file is corrupt"
            )
        if not raw:
            return torch.empty(0, dtype=dtype)
        return torch.frombuffer(bytearray(raw), dtype=dtype)

    data = _read_member(zf, f"{prefix}{pkl}", MAX_PICKLE_BYTES, path)
    unpickler = _RestrictedUnpickler(data, storages=storage, torchscript=torchscript,
                                     max_tensor_elems=max_tensor_elems, where=f"{path}:{pkl}")
    try:
        return unpickler.load()
    except (UnsafeFileError, CheckpointError):
        raise
    except Exception as exc:
        raise CheckpointError(f"{path}: {pkl} cannot be read ({type(exc).__name__}: {exc})") from exc


def _walk_tensors(obj: Any, prefix: str, out: dict[str, torch.Tensor], depth: int = 0) -> None:
    if depth > 64:
        raise CheckpointError("TorchScript module tree is nested deeper than 64 levels")
    if isinstance(obj, InertObject):
        for k, v in obj.attrs.items():
            _walk_tensors(v, f"{prefix}{k}.", out, depth + 1)
    elif isinstance(obj, torch.Tensor):
        out[prefix[:-1]] = obj


def load_torchscript_tensors(path: Path, *, max_bytes: int = DEFAULT_MAX_BYTES,
                             max_tensor_elems: int = DEFAULT_MAX_TENSOR_ELEMS) -> dict[str, torch.Tensor]:
    """The tensors of a TorchScript archive's module tree, named like a state dict (``visual.conv1.weight``).

    Reads ``data.pkl`` + ``data/`` with the restricted unpickler; the archive's code is never run.
    Non-tensor attributes are skipped; tensor attributes that are not parameters (e.g. OpenAI's
    ``attn_mask``) are included and left to the caller to drop.
    """
    path = Path(path)
    _check_size(path, max_bytes)
    kind, _ = _classify(path)
    if kind != "torchscript":
        raise CheckpointError(f"{path}: not a TorchScript archive (no constants.pkl)")
    root = _restricted_zip_load(path, "data.pkl", torchscript=True, max_tensor_elems=max_tensor_elems)
    out: dict[str, torch.Tensor] = {}
    _walk_tensors(root, "", out)
    if not out:
        raise CheckpointError(f"{path}: the TorchScript archive holds no tensors")
    return out


# ----------------------------------------------------------------------------- safetensors
_ST_ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}


def _iter_header(header: dict[str, Any], path: Path, data_len: int,
                 max_tensor_elems: int) -> Iterator[tuple[str, int, int]]:
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise CheckpointError(f"{path}: header entry {name!r} is not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in _ST_ITEMSIZE:
            raise CheckpointError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
        if not (isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape)):
            raise CheckpointError(f"{path}: tensor {name!r} has an invalid shape {shape!r:.80}")
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(o, int) and o >= 0 for o in offsets)):
            raise CheckpointError(f"{path}: tensor {name!r} has invalid data_offsets {offsets!r:.80}")
        elems = math.prod(shape)
        if elems > max_tensor_elems:
            raise CheckpointError(
                f"{path}: tensor {name!r} declares shape {shape} ({elems} elements), above the "
                f"{max_tensor_elems}-element limit"
            )
        begin, end = offsets
        if begin > end or end > data_len:
            raise CheckpointError(
                f"{path}: tensor {name!r} points at bytes {begin}..{end} but the data section has "
                f"{data_len} bytes; the header lies or the file is truncated"
            )
        if end - begin != elems * _ST_ITEMSIZE[dtype]:
            raise CheckpointError(
                f"{path}: tensor {name!r} of shape {shape} needs {elems * _ST_ITEMSIZE[dtype]} bytes, "
                f"the header gives {end - begin}"
            )
        yield name, begin, end


def safe_load_safetensors(path: Path, *, max_bytes: int = DEFAULT_MAX_BYTES,
                          max_tensor_elems: int = DEFAULT_MAX_TENSOR_ELEMS
                          ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and ``__metadata__`` of a ``.safetensors`` file, after validating its header.

    The 8-byte header length, the JSON, every dtype/shape/offset and the element limit are checked
    before any tensor is materialised, so a hostile header cannot make us allocate absurd memory.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    size = _check_size(path, max_bytes)
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: {size} bytes is too short for a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > min(MAX_SAFETENSORS_HEADER, size - 8):
            raise CheckpointError(
                f"{path}: safetensors header claims {n} bytes but the file has {size - 8} after the length "
                "field; the file is truncated or not safetensors"
            )
        raw = fh.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: safetensors header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object")
    meta = header.get("__metadata__") or {}
    if not (isinstance(meta, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())):
        raise CheckpointError(f"{path}: safetensors __metadata__ must map strings to strings")
    list(_iter_header(header, path, size - 8 - n, max_tensor_elems))
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"{path}: safetensors file cannot be read ({exc})") from exc
    return tensors, dict(meta)
