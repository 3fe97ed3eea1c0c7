"""``scanner demo``: the bundled default, end to end (README command 1)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from scanner.cli import main
from scanner.errors import ScannerError


@main.command()
@click.option("--work", type=click.Path(path_type=Path), default=Path("demo-out"), show_default=True,
              help="work folder: the quick zoo is cached here and each run gets its own registry")
def demo(work: Path) -> None:
    """Bundled CLIP -> quick zoo -> daemon scanning a registry, with quarantine and metrics."""
    from scanner.demo import run_demo

    click.echo("scanner demo: bundled CLIP, quick zoo, daemon scan of a registry", err=True)
    try:
        sys.exit(run_demo(click.echo, work))
    except ScannerError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
