"""``DaemonConfig``: every knob of ``scanner daemon``, resolved once and validated at start-up.

Precedence is the project's: command-line flag > ``SCANNER_*`` environment variable > the ``[daemon]``
table of the TOML settings file > default. The webhook secret is never a flag (flags leak into ``ps`` and
shell history): it comes from ``SCANNER_WEBHOOK_SECRET`` or from a file named by a flag/env/TOML.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scanner.errors import ConfigError

DEFAULT_METRICS_ADDR = "127.0.0.1:9464"
MIN_SECRET_LENGTH = 16

# field name -> environment variable (the secret's two sources are handled apart)
_ENV_NAMES: dict[str, str] = {
    "watch_dirs": "SCANNER_WATCH",
    "quarantine_dir": "SCANNER_QUARANTINE_DIR",
    "state_file": "SCANNER_STATE_FILE",
    "metrics_addr": "SCANNER_METRICS_ADDR",
    "webhook_addr": "SCANNER_WEBHOOK_ADDR",
    "polling": "SCANNER_POLLING",
    "poll_interval_s": "SCANNER_POLL_INTERVAL",
    "settle_seconds": "SCANNER_SETTLE_SECONDS",
    "reconcile_interval_s": "SCANNER_RECONCILE_INTERVAL",
    "workers": "SCANNER_WORKERS",
    "queue_size": "SCANNER_QUEUE_SIZE",
    "max_attempts": "SCANNER_MAX_ATTEMPTS",
    "shutdown_grace_s": "SCANNER_SHUTDOWN_GRACE",
}


@dataclass(frozen=True)
class DaemonConfig:
    """Resolved daemon settings. Build with :meth:`resolve` (or directly in tests), then :meth:`validate`."""

    watch_dirs: tuple[Path, ...]
    quarantine_dir: Path
    state_file: Path
    #: ``host:port`` of the Prometheus exposition; ``None`` disables it. Loopback unless configured.
    metrics_addr: str | None = DEFAULT_METRICS_ADDR
    #: ``host:port`` of the signed registry hook; ``None`` disables it.
    webhook_addr: str | None = None
    #: HMAC-SHA256 shared secret of the hook; ``repr=False`` so it never reaches a log line.
    webhook_secret: str | None = field(default=None, repr=False)
    #: stat-polling observer instead of inotify (NFS, CIFS, some bind mounts deliver no inotify events)
    polling: bool = False
    poll_interval_s: float = 1.0
    #: a unit is scanned once its size and mtime (every file's, for a directory) are unchanged this long
    settle_seconds: float = 2.0
    #: full-tree pass period; catches events lost to inotify overflow, a full queue or downtime
    reconcile_interval_s: float = 300.0
    workers: int = 1
    #: bounded work queue; when full, units wait for the next reconcile instead of growing memory
    queue_size: int = 1024
    #: a model whose scan was interrupted this many times (e.g. it crashes the daemon) is recorded as error
    max_attempts: int = 5
    #: on SIGTERM, in-flight scans get this long to finish; unfinished ones are requeued at next start
    shutdown_grace_s: float = 30.0
    #: signed webhook requests older or newer than this are rejected as stale
    replay_window_s: float = 300.0

    @classmethod
    def resolve(
        cls,
        flags: Mapping[str, Any],
        env: Mapping[str, str] | None = None,
        toml: Mapping[str, Any] | None = None,
    ) -> DaemonConfig:
        """Merge flag > env > TOML ``[daemon]`` table > default; flags/toml use the field names.

        ``flags`` values of ``None`` (or empty tuples) mean "not given". ``webhook_secret_file`` may appear
        in any source; the secret itself only in the environment (``SCANNER_WEBHOOK_SECRET``) or a file.
        """
        env = os.environ if env is None else env
        toml = toml or {}
        known = {f.name for f in dataclasses.fields(cls)} - {"webhook_secret"}
        unknown = set(toml) - known - {"webhook_secret_file"}
        if unknown:
            raise ConfigError(
                f"Unknown key(s) in the [daemon] settings table: {', '.join(sorted(unknown))}. "
                f"Expected some of: {', '.join(sorted(known | {'webhook_secret_file'}))}."
            )
        values: dict[str, Any] = {}
        for name in known:
            flag = flags.get(name)
            if flag is not None and flag != ():
                values[name] = flag
            elif name in _ENV_NAMES and env.get(_ENV_NAMES[name], "") != "":
                values[name] = _parse_env(name, env[_ENV_NAMES[name]])
            elif name in toml:
                values[name] = toml[name]
        for required, hint in (
            ("watch_dirs", "--watch DIR"),
            ("quarantine_dir", "--quarantine DIR"),
            ("state_file", "--state FILE"),
        ):
            if required not in values:
                raise ConfigError(
                    f"The daemon needs {required.replace('_', ' ')}: none was given. Pass {hint}, set "
                    f"{_ENV_NAMES[required]}, or add `{required} = ...` to the [daemon] settings table."
                )
        watch = values["watch_dirs"]
        values["watch_dirs"] = tuple(Path(p) for p in ([watch] if isinstance(watch, str | Path) else watch))
        values["quarantine_dir"] = Path(values["quarantine_dir"])
        values["state_file"] = Path(values["state_file"])
        values["webhook_secret"] = _read_secret(flags, env, toml)
        for name, value in list(values.items()):
            values[name] = _coerce(name, value)
        return cls(**values)

    def validate(self) -> None:
        """Check what can be checked before binding ports; raise ``ConfigError`` on the first fault.

        Creates the quarantine folder if missing (and probes it with a real file: ``os.access`` lies
        for root).
        """
        if not self.watch_dirs:
            raise ConfigError("No watch folder was given. Pass --watch DIR (repeatable).")
        for w in self.watch_dirs:
            if not w.is_dir():
                what = "does not exist" if not w.exists() else "is not a directory"
                raise ConfigError(
                    f"Watch folder {w} {what}. Expected an existing directory of models; "
                    "create it or fix --watch."
                )
        if self.settle_seconds < 0 or self.poll_interval_s <= 0 or self.reconcile_interval_s <= 0:
            raise ConfigError(
                "settle_seconds must be >= 0 and poll/reconcile intervals > 0; found "
                f"settle={self.settle_seconds}, poll={self.poll_interval_s}, "
                f"reconcile={self.reconcile_interval_s}."
            )
        if self.workers < 1 or self.queue_size < 1 or self.max_attempts < 1:
            raise ConfigError(
                f"workers, queue_size and max_attempts must be >= 1; found {self.workers}, "
                f"{self.queue_size}, {self.max_attempts}."
            )
        q = self.quarantine_dir.resolve()
        for w in self.watch_dirs:
            wr = w.resolve()
            if q == wr or q.is_relative_to(wr) or wr.is_relative_to(q):
                raise ConfigError(
                    f"Quarantine folder {self.quarantine_dir} overlaps watched folder {w}. A quarantined "
                    "model must leave the tree consumers read; choose a quarantine folder outside "
                    "every --watch folder."
                )
        _probe_writable(self.quarantine_dir, "quarantine folder", "--quarantine")
        _probe_writable(self.state_file.parent, "folder of the state file", "--state")
        if self.state_file.exists() and not self.state_file.is_file():
            raise ConfigError(
                f"State file {self.state_file} is not a regular file. Point --state at a file path."
            )
        for label, addr in (("metrics", self.metrics_addr), ("webhook", self.webhook_addr)):
            if addr is not None:
                parse_addr(addr, label)
        if self.webhook_addr is not None:
            if not self.webhook_secret:
                raise ConfigError(
                    "The webhook is enabled (--webhook-addr) but no shared secret was found. Set "
                    "SCANNER_WEBHOOK_SECRET or pass --webhook-secret-file FILE."
                )
            if len(self.webhook_secret) < MIN_SECRET_LENGTH:
                raise ConfigError(
                    f"The webhook secret is {len(self.webhook_secret)} characters; at least "
                    f"{MIN_SECRET_LENGTH} are required. Generate one with "
                    "`python -c 'import secrets; print(secrets.token_hex(32))'`."
                )


def parse_addr(addr: str, label: str = "listen") -> tuple[str, int]:
    """``"127.0.0.1:9464"`` -> ``("127.0.0.1", 9464)``; ``"[::1]:80"`` works; port 0 picks a free port."""
    host, sep, port = addr.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(
            f"The {label} address {addr!r} is not HOST:PORT. Expected e.g. 127.0.0.1:9464 (port 0..65535)."
        )
    return host, int(port)


def _probe_writable(folder: Path, what: str, flag: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".scanner-probe-"):
            pass
    except OSError as exc:
        raise ConfigError(
            f"The {what} {folder} is not a writable directory ({exc.strerror or exc}). "
            f"Fix its permissions or point {flag} elsewhere."
        ) from exc


def _read_secret(flags: Mapping[str, Any], env: Mapping[str, str], toml: Mapping[str, Any]) -> str | None:
    secret_file = (
        flags.get("webhook_secret_file")
        or env.get("SCANNER_WEBHOOK_SECRET_FILE")
        or toml.get("webhook_secret_file")
    )
    if secret_file:
        try:
            return Path(secret_file).read_text().strip() or None
        except OSError as exc:
            raise ConfigError(
                f"Cannot read the webhook secret file {secret_file} ({exc.strerror or exc}). "
                "Expected a readable file holding the shared secret."
            ) from exc
    secret = env.get("SCANNER_WEBHOOK_SECRET", "").strip()
    return secret or None


def _parse_env(name: str, raw: str) -> Any:
    if name == "watch_dirs":
        return tuple(p for p in raw.split(os.pathsep) if p)
    return raw


_BOOL_TRUE = {"1", "true", "yes", "on"}
_BOOL_FALSE = {"0", "false", "no", "off"}


def _coerce(name: str, value: Any) -> Any:
    """Strings from the environment into the field's type, with an error that names the source."""
    types = {f.name: f.type for f in dataclasses.fields(DaemonConfig)}
    kind = str(types[name])
    try:
        if kind == "bool" and isinstance(value, str):
            low = value.strip().lower()
            if low not in _BOOL_TRUE | _BOOL_FALSE:
                raise ValueError(value)
            return low in _BOOL_TRUE
        if kind == "int":
            return int(value)
        if kind == "float":
            return float(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"Daemon setting {name} has value {value!r}; expected {kind}. Fix the flag, "
            f"{_ENV_NAMES.get(name, 'environment variable')} or the [daemon] settings table."
        ) from exc
    return value
