"""Writing an export: files are made in a staging folder next to the destination and moved into place at the
end, so a failed export leaves nothing half-written; an existing destination is refused unless overwriting.

Overwriting replaces only the files the export writes; nothing else in a destination folder is deleted.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from dinoscale.export.backbone import ExportError


def refuse_existing(paths: Sequence[Path], overwrite: bool) -> None:
    """ExportError if any of ``paths`` exists and ``overwrite`` is off."""
    existing = [str(p) for p in paths if p.exists() or p.is_symlink()]
    if existing and not overwrite:
        raise ExportError(f"output exists: {', '.join(existing)} (pass --overwrite / overwrite=True to replace it)")


@contextlib.contextmanager
def staged_files(destination: Path, names: Sequence[str], overwrite: bool) -> Iterator[Path]:
    """Yield a staging folder; the files ``names`` written into it are moved into the folder ``destination``.

    Only the named files count (an exporter may write fewer, e.g. no external-data file for a small ONNX model).
    """
    destination = Path(destination)
    if destination.exists() and not destination.is_dir():
        raise ExportError(f"output folder {destination} exists and is not a folder")
    refuse_existing([destination / name for name in names], overwrite)
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.partial-", dir=destination.parent))
    try:
        yield staging
        destination.mkdir(exist_ok=True)
        for name in names:
            if (staging / name).exists():
                shutil.move(staging / name, destination / name)  # a rename unless across file systems
    finally:
        shutil.rmtree(staging, ignore_errors=True)
