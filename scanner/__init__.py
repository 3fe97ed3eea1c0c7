"""scanner: detect backdoors in prompt-tuned CLIP models before they are deployed.

Library entry point: ``scanner.scan_path(path, settings) -> ScanReport``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from scanner.pipeline import scan_path as scan_path


def __getattr__(name: str) -> Any:
    # Lazy: importing ``scanner`` must stay cheap (the CLI prints progress within 2 s); torch loads on use.
    if name == "scan_path":
        from scanner.pipeline import scan_path

        return scan_path
    raise AttributeError(name)
