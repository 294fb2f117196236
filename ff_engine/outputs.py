"""Output files that are either complete or absent.

* ``OutputFolder`` creates a destination folder (and its missing parents) only when asked — after the inputs
  are validated — and proves it writable at once by creating and removing a probe file, so an unwritable
  destination fails before any compute; ``discard()`` removes the folders it created if they are still empty.
* ``temporary_beside(path)`` names a hidden file beside ``path``; writers fill it and ``os.replace`` it onto
  ``path`` when complete (atomic within a filesystem), so a failed or interrupted run never leaves a partial file
  under the final name.
(``os.access`` is not used: it says yes to root in a read-only folder, and it cannot see a full disk.)
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from ff_engine.errors import ConfigError


def temporary_beside(path: Path) -> Path:
    """A fresh hidden name in ``path``'s folder that keeps its suffix (``.video.1a2b3c4d.partial.mp4``)."""
    return path.parent / f".{path.stem}.{secrets.token_hex(4)}.partial{path.suffix}"


def create_exclusive(path: Path) -> None:
    """Create an empty file that did not exist (mode from the umask, as any output file gets)."""
    os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))


def check_folder_target(folder: str | Path, what: str) -> Path:
    """Refuse, without creating anything, a folder path that cannot become a folder (a file is in the way)."""
    folder = Path(folder)
    probe = folder.absolute()
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"{what} {str(folder)!r}: {probe} is a file, not a folder")
    return folder


class OutputFolder:
    """A destination folder made on demand (see the module docstring); ``what`` names the parameter in errors."""

    def __init__(self, folder: str | Path, what: str):
        self.path, self.what = check_folder_target(folder, what), what
        self.created: list[Path] = []  # outermost first
        missing = [p for p in [self.path.absolute(), *self.path.absolute().parents] if not p.exists()]
        try:
            for p in reversed(missing):
                p.mkdir()
                self.created.append(p)
            probe = temporary_beside(self.path / "probe")
            create_exclusive(probe)
            probe.unlink()
        except OSError as exc:
            self.discard()
            raise ConfigError(f"{what} {str(self.path)!r} is not writable: {exc.strerror or exc}") from None

    def discard(self) -> None:
        """Remove the folders this created, innermost first, while they are empty; idempotent."""
        while self.created:
            try:
                self.created[-1].rmdir()
            except OSError:
                break
            self.created.pop()
        self.created = []


