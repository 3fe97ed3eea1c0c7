"""``scanner scan-once``, ``scanner plugins`` and ``scanner settings``: thin shells over the library.

Exit codes of ``scan-once`` come from :meth:`scanner.report.ScanReport.exit_code`: 0 every scanned model
is clean, 1 any model backdoored or unsafe, 3 any error and none flagged, 4 nothing scannable; 2 is a
usage error (bad flag, invalid setting). This module imports neither torch nor the pipeline's heavy
parts at import time, so ``scanner --help`` stays fast and the first progress line comes early.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from scanner import plugins
from scanner.cli import main
from scanner.cli._shared import fail, model_source_options, settings_or_exit
from scanner.errors import ConfigError, ScannerError
from scanner.report import ExitCode, ScanReport
from scanner.settings import Settings


def _render(report: ScanReport, fmt: str) -> str:
    if fmt == "json":
        return report.to_json() + "\n"
    if fmt == "sarif":
        from scanner.render.sarif import to_sarif

        return json.dumps(to_sarif(report), indent=2) + "\n"
    from scanner.render.text import to_text

    return to_text(report)


@main.command("scan-once")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["text", "json", "sarif"]), default="text",
              show_default=True, help="Report format on stdout (or in --output).")
@click.option("--output", "-o", type=click.Path(dir_okay=False, writable=True, path_type=Path),
              help="Write the report to FILE instead of stdout.")
@click.option("--report-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Write an HTML report per model (triggers, per-class scores) and index.html here.")
@model_source_options
@click.option("--accel", type=click.Choice(["auto", "onnx", "torch"]), default=None,
              help="Forward-only encoder work: onnxruntime (torch fallback), torch, or auto (default).")
@click.option("--quiet", "-q", is_flag=True, help="No progress on stderr.")
def scan_once(path: Path, fmt: str, output: Path | None, report_dir: Path | None, ood_dir: Path | None,
              seed: int | None, config: Path | None, backbones: tuple[str, ...], accel: str | None,
              quiet: bool) -> None:
    """Scan PATH (a checkpoint, a model directory or a registry tree) once and exit with its verdict.

    \b
    Exit codes: 0 all scanned models clean; 1 any backdoored or unsafe;
    3 any error and none flagged; 4 nothing scannable; 2 usage error.
    """
    settings = settings_or_exit(config, backbones, {"seed": seed, "ood_dir": ood_dir, "report_dir": report_dir,
                                                    "accel": accel})
    from scanner.pipeline import describe_adapters, scan_path

    try:
        report = scan_path(path, settings, progress=not quiet)
    except ConfigError as exc:
        fail(str(exc), int(ExitCode.USAGE))
    except ScannerError as exc:  # plugin or other run-level failure: nothing was scanned
        fail(str(exc), int(ExitCode.ERROR))
    text = _render(report, fmt)
    if output is not None:
        output.write_text(text, encoding="utf-8")
    else:
        click.echo(text, nl=False)
    code = report.exit_code()
    if code is ExitCode.NOTHING_SCANNABLE:
        why = ("no model files found" if not report.models
               else "every path given was skipped (a skipped file is never reported as clean)")
        click.echo(f"scanner: nothing scannable under {path}: {why}; "
                   f"{describe_adapters(plugins.adapters())}", err=True)
    if settings.report_dir is not None and not quiet:
        click.echo(f"scanner: HTML report: {settings.report_dir / 'index.html'}", err=True)
    sys.exit(int(code))


@main.command("plugins")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def plugins_cmd(as_json: bool) -> None:
    """List the loaded plugins: name, distribution, version, hooks and the adapters they register."""
    try:
        infos = plugins.plugin_infos()
        owners = plugins.adapter_owners()
    except plugins.PluginError as exc:
        fail(str(exc), int(ExitCode.ERROR))
    adapters_of = {i.name: sorted(a for a, p in owners.items() if p == i.name) for i in infos}
    if as_json:
        rows = [{"name": i.name, "distribution": i.distribution, "version": i.version, "hooks": list(i.hooks),
                 "adapters": adapters_of[i.name]} for i in infos]
        click.echo(json.dumps(rows, indent=2))
        return
    if not infos:
        click.echo(f"no plugins loaded (installed entry points in group {plugins.ENTRY_POINT_GROUP!r}; "
                   f"{plugins.LOAD_ENV} may restrict them)")
        return
    for i in infos:
        adapters = f"  adapters: {', '.join(adapters_of[i.name])}" if adapters_of[i.name] else ""
        click.echo(f"{i.name:<16} {i.distribution or '-'} {i.version or ''}  "
                   f"hooks: {', '.join(i.hooks)}{adapters}")


@main.command("settings")
@click.option("--defaults", is_flag=True, help="Print the default settings instead of the effective ones.")
@click.option("--config", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Settings TOML file (default: ./scanner.toml when present).")
def settings_cmd(defaults: bool, config: Path | None) -> None:
    """Print settings as TOML (effective: flag > SCANNER_* env > file > default)."""
    settings = Settings() if defaults else settings_or_exit(config, (), {})
    click.echo(settings.to_toml(), nl=False)


def _attach_plugin_commands() -> None:
    try:
        plugins.register_commands(main)
    except plugins.PluginError as exc:
        # Keep the built-in commands usable; the commands that need plugins report the error again.
        click.echo(f"scanner: warning: {exc}", err=True)


_attach_plugin_commands()
