"""``scanner daemon``, ``scanner quarantine list|show|release``, ``scanner accept-risk``, ``scanner hook``."""

from __future__ import annotations

import datetime as dt
import getpass
import importlib
import importlib.util
import json
import logging
import os
import sys
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import click

from scanner.cli import main
from scanner.cli._shared import fail
from scanner.errors import ConfigError, ScannerError
from scanner.report import ScanReport


def _fail(exc: ScannerError) -> NoReturn:
    fail(str(exc), 2 if isinstance(exc, ConfigError) else 3)


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid:{os.getuid()}"


def _daemon_table(config_file: Path | None) -> dict[str, Any]:
    """The ``[daemon]`` table of the settings file (same file discovery as ``scanner.settings``)."""
    from scanner.settings import find_config_file

    path = find_config_file(config_file, os.environ)
    if path is None or not path.is_file():
        return {}
    try:
        with path.open("rb") as fh:
            table = tomllib.load(fh).get("daemon", {})
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(
            f"config file {path} cannot be read as TOML ({exc}); fix it or pass another --config"
        ) from exc
    if not isinstance(table, dict):
        raise ConfigError(
            f"config file {path}: `daemon` must be a table ([daemon]), found {type(table).__name__}"
        )
    return table


def _load_scan_fn(spec: str | None) -> Callable[[Path, Any], ScanReport]:
    """``None`` -> ``scanner.pipeline.scan_path``; ``module:attr`` or ``/path/file.py:attr`` otherwise."""
    if spec is None:
        from scanner.pipeline import scan_path

        return lambda path, settings: scan_path(path, settings)
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise ConfigError(f"--scan-fn {spec!r} is not MODULE:FUNCTION or FILE.py:FUNCTION.")
    try:
        if target.endswith(".py"):
            module_spec = importlib.util.spec_from_file_location(Path(target).stem, target)
            if module_spec is None or module_spec.loader is None:
                raise ImportError(target)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
        fn = getattr(module, attr)
    except (ImportError, AttributeError, OSError) as exc:
        raise ConfigError(f"--scan-fn {spec!r} cannot be loaded ({exc}).") from exc
    return fn


@main.command()
@click.option(
    "--watch",
    "watch_dirs",
    multiple=True,
    type=click.Path(path_type=Path),
    help="Folder to watch (repeatable).",
)
@click.option(
    "--quarantine", "quarantine_dir", type=click.Path(path_type=Path), help="Where flagged models are moved."
)
@click.option("--state", "state_file", type=click.Path(path_type=Path), help="SQLite state file.")
@click.option(
    "--metrics-addr", help="Prometheus exposition HOST:PORT (default 127.0.0.1:9464; 'off' disables)."
)
@click.option("--webhook-addr", help="Signed registry hook HOST:PORT (off unless given).")
@click.option(
    "--webhook-secret-file",
    type=click.Path(path_type=Path),
    help="File holding the hook's shared secret (or set SCANNER_WEBHOOK_SECRET).",
)
@click.option(
    "--polling/--no-polling", default=None, help="Stat polling instead of inotify (NFS, CIFS, bind mounts)."
)
@click.option("--settle-seconds", type=float, help="A unit is scanned once unchanged this long (default 2).")
@click.option("--reconcile-interval", "reconcile_interval_s", type=float, help="Seconds between full passes.")
@click.option("--workers", type=int, help="Worker threads (default 1).")
@click.option("--queue-size", type=int, help="Bounded work-queue size (default 1024).")
@click.option(
    "--config", "config_file", type=click.Path(path_type=Path), help="Settings TOML ([daemon] table)."
)
@click.option(
    "--log-level", default="INFO", show_default=True, type=click.Choice(["DEBUG", "INFO", "WARNING"])
)
@click.option(
    "--scan-fn", hidden=True, help="MODULE:FUNCTION or FILE.py:FUNCTION replacing scan_path (tests, soak)."
)
def daemon(
    watch_dirs: tuple[Path, ...],
    quarantine_dir: Path | None,
    state_file: Path | None,
    metrics_addr: str | None,
    webhook_addr: str | None,
    webhook_secret_file: Path | None,
    polling: bool | None,
    settle_seconds: float | None,
    reconcile_interval_s: float | None,
    workers: int | None,
    queue_size: int | None,
    config_file: Path | None,
    log_level: str,
    scan_fn: str | None,
) -> None:
    """Watch registry folders: scan every upload once, quarantine what is flagged, expose metrics.

    Stops cleanly on SIGTERM/SIGINT (in-flight scans finish or are requeued); SIGHUP forces a reconcile.
    """
    from scanner.daemon import DaemonConfig, Service

    logging.basicConfig(
        level=getattr(logging, log_level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        flags: dict[str, Any] = {
            "watch_dirs": watch_dirs,
            "quarantine_dir": quarantine_dir,
            "state_file": state_file,
            "metrics_addr": metrics_addr,
            "webhook_addr": webhook_addr,
            "webhook_secret_file": webhook_secret_file,
            "polling": polling,
            "settle_seconds": settle_seconds,
            "reconcile_interval_s": reconcile_interval_s,
            "workers": workers,
            "queue_size": queue_size,
        }
        config = DaemonConfig.resolve(flags, os.environ, _daemon_table(config_file))
        if (config.metrics_addr or "").lower() == "off":
            config = DaemonConfig(**{**_fields(config), "metrics_addr": None})
        settings: Any = None
        if scan_fn is None:
            from scanner.settings import load_settings

            settings = load_settings(config_file=config_file)
        service = Service(config, settings, scan_fn=_load_scan_fn(scan_fn))
        sys.exit(service.run())
    except ScannerError as exc:
        _fail(exc)


def _fields(config: Any) -> dict[str, Any]:
    import dataclasses

    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--config", "config_file", type=click.Path(path_type=Path), help="Settings TOML.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def hook(path: Path, config_file: Path | None, as_json: bool) -> None:
    """Scan PATH once, for registries that run a post-upload command; exit codes as `scan-once`.

    0 clean, 1 backdoored/unsafe, 3 error, 4 nothing scannable.
    """
    from scanner.pipeline import scan_path
    from scanner.settings import load_settings

    try:
        report = scan_path(path, load_settings(config_file=config_file))
    except ScannerError as exc:
        _fail(exc)
    if as_json:
        click.echo(report.to_json())
    else:
        for m in report.models:
            target = f" target={m.target_class}" if m.target_class else ""
            click.echo(f"{m.verdict.value:10s} {m.path}{target}{(' - ' + m.message) if m.message else ''}")
    sys.exit(int(report.exit_code()))


# ---------------------------------------------------------------------------------------- quarantine
_QUARANTINE_OPT = click.option(
    "--quarantine",
    "quarantine_dir",
    type=click.Path(path_type=Path),
    envvar="SCANNER_QUARANTINE_DIR",
    required=True,
    help="Quarantine folder (or SCANNER_QUARANTINE_DIR).",
)
_STATE_OPT = click.option(
    "--state",
    "state_file",
    type=click.Path(path_type=Path),
    envvar="SCANNER_STATE_FILE",
    help="Daemon state file (or SCANNER_STATE_FILE); needed to record accepted risk on release.",
)


@main.group()
def quarantine() -> None:
    """Inspect and release quarantined models (nothing is ever deleted)."""


@quarantine.command("list")
@_QUARANTINE_OPT
@click.option("--json", "as_json", is_flag=True)
@click.option("--all", "show_all", is_flag=True, help="Include released and aborted entries.")
def quarantine_list(quarantine_dir: Path, as_json: bool, show_all: bool) -> None:
    """List quarantine entries (id, verdict, content hash, original path)."""
    from scanner.daemon.quarantine import Quarantine

    entries = [e for e in Quarantine(quarantine_dir).entries() if show_all or e.status == "quarantined"]
    if as_json:
        click.echo(json.dumps([e.record | {"folder": str(e.folder)} for e in entries], indent=2))
        return
    if not entries:
        click.echo(f"no quarantined models in {quarantine_dir}")
    for e in entries:
        r = e.record
        click.echo(
            f"{e.entry_id}  {e.status:11s} {r['verdict']:10s} {r['sha256'][:16]}  {r['original_path']}"
        )


@quarantine.command("show")
@_QUARANTINE_OPT
@click.argument("entry_id")
def quarantine_show(quarantine_dir: Path, entry_id: str) -> None:
    """Print an entry's audit record (JSON)."""
    from scanner.daemon.quarantine import Quarantine

    try:
        entry = Quarantine(quarantine_dir).get(entry_id)
    except ScannerError as exc:
        _fail(exc)
    click.echo(json.dumps(entry.record | {"folder": str(entry.folder)}, indent=2))


@quarantine.command("release")
@_QUARANTINE_OPT
@_STATE_OPT
@click.argument("entry_id")
@click.option("--reason", required=True, help="Why this model is safe to release (recorded).")
@click.option(
    "--to", "to", type=click.Path(path_type=Path), help="Release here instead of the original path."
)
@click.option("--by", default=None, help="Who releases it (default: the current user).")
@click.option("--expires", help="Accepted-risk expiry: YYYY-MM-DD or a number of days (default: none).")
def quarantine_release(
    quarantine_dir: Path,
    state_file: Path | None,
    entry_id: str,
    reason: str,
    to: Path | None,
    by: str | None,
    expires: str | None,
) -> None:
    """Move a model back (original path unless occupied) and record who, when and why.

    With --state the model's content hash is also put on the accepted-risk list, so a running daemon
    does not quarantine it again.
    """
    from scanner.daemon.accepted_risk import AcceptedRiskList
    from scanner.daemon.quarantine import Quarantine
    from scanner.daemon.state import StateStore

    who = by or _user()
    try:
        q = Quarantine(quarantine_dir)
        entry = q.get(entry_id)
        expiry = _parse_expiry(expires)
        if state_file is not None:
            store = StateStore(state_file)
            try:
                AcceptedRiskList(store).accept(str(entry.record["sha256"]), who, reason, expiry)
            finally:
                store.close()
        else:
            click.echo(
                "warning: no --state given: a running daemon will quarantine this model again unless "
                "its hash is accepted (scanner accept-risk add).",
                err=True,
            )
        released = q.release(entry.entry_id, reason, by=who, to=to)
    except ScannerError as exc:
        _fail(exc)
    click.echo(f"released {released.entry_id} to {released.record['history'][-1]['to']}")


def _parse_expiry(value: str | None) -> float | None:
    if value is None:
        return None
    if value.isdigit():
        return time.time() + int(value) * 86400
    try:
        return dt.datetime.fromisoformat(value).replace(tzinfo=dt.UTC).timestamp()
    except ValueError:
        raise ConfigError(f"--expires {value!r} is neither YYYY-MM-DD nor a number of days.") from None


# ---------------------------------------------------------------------------------------- accepted risk
@main.group("accept-risk")
def accept_risk() -> None:
    """Let reviewed models (by content hash) through without quarantine; who, why and until when."""


@accept_risk.command("add")
@_STATE_OPT
@click.argument("sha256")
@click.option("--reason", required=True, help="Why the risk is accepted (recorded).")
@click.option("--by", default=None, help="Who accepts it (default: the current user).")
@click.option("--expires", help="YYYY-MM-DD or a number of days (default: until revoked).")
def accept_risk_add(
    state_file: Path | None, sha256: str, reason: str, by: str | None, expires: str | None
) -> None:
    """Accept the risk of the model with content hash SHA256."""
    from scanner.daemon.accepted_risk import AcceptedRiskList
    from scanner.daemon.state import StateStore

    try:
        store = StateStore(_need_state(state_file))
        entry = AcceptedRiskList(store).accept(sha256, by or _user(), reason, _parse_expiry(expires))
        store.close()
    except ScannerError as exc:
        _fail(exc)
    until = "until revoked" if entry.expires_at is None else f"until {_fmt(entry.expires_at)}"
    click.echo(f"accepted {entry.sha256} by {entry.accepted_by} {until}")


@accept_risk.command("list")
@_STATE_OPT
def accept_risk_list(state_file: Path | None) -> None:
    """List accepted risks."""
    from scanner.daemon.accepted_risk import AcceptedRiskList
    from scanner.daemon.state import StateStore

    try:
        store = StateStore(_need_state(state_file))
        entries = AcceptedRiskList(store).entries()
        store.close()
    except ScannerError as exc:
        _fail(exc)
    for e in entries:
        until = "-" if e.expires_at is None else _fmt(e.expires_at)
        state = "active" if e.active() else "expired"
        click.echo(f"{e.sha256}  {state:7s} until {until:20s} by {e.accepted_by}: {e.reason}")


@accept_risk.command("revoke")
@_STATE_OPT
@click.argument("sha256")
def accept_risk_revoke(state_file: Path | None, sha256: str) -> None:
    """Remove an accepted risk; the next reconcile quarantines the model if it is flagged."""
    from scanner.daemon.accepted_risk import AcceptedRiskList
    from scanner.daemon.state import StateStore

    try:
        store = StateStore(_need_state(state_file))
        removed = AcceptedRiskList(store).revoke(sha256)
        store.close()
    except ScannerError as exc:
        _fail(exc)
    click.echo("revoked" if removed else "no such accepted risk")


def _need_state(state_file: Path | None) -> Path:
    if state_file is None:
        raise ConfigError(
            "No state file: pass --state FILE or set SCANNER_STATE_FILE (the daemon's --state)."
        )
    if not state_file.is_file():
        raise ConfigError(f"State file {state_file} does not exist. Expected the daemon's --state file.")
    return state_file


def _fmt(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
