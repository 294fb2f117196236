"""Action scripts: what a user types to steer an action-conditioned world model, as per-frame action indices.

``"right:120,stay:24,left:96"`` (NAME:FRAMES, comma-separated), or a file holding such a script or one action name
per line.  The engine takes indices into the model's ``cfg.actions``; the CLI, the server and the benchmarks parse
scripts here so every entry point refuses the same bad input with the same one line.
"""

from __future__ import annotations

import re
from pathlib import Path

from ff_engine.errors import ConfigError

_PART = re.compile(r"\s*([a-z][a-z0-9_-]*)\s*:\s*(\d+)\s*")
MAX_SCRIPT_FRAMES = 1_000_000


def parse_actions(script: str, names: tuple[str, ...], max_frames: int = MAX_SCRIPT_FRAMES) -> list[int]:
    """One action index (into ``names``) per frame; one ``ConfigError`` naming the bad part otherwise."""
    if not names:
        raise ConfigError("actions: this model takes no actions")
    path = Path(script)
    if "," not in script and ":" not in script and path.suffix and path.is_file():
        text = path.read_text().strip()
        script = text if ":" in text else ",".join(f"{line.strip()}:1" for line in text.splitlines() if line.strip())
    out: list[int] = []
    for part in script.split(","):
        m = _PART.fullmatch(part)
        if not m:
            raise ConfigError(f"actions: {part.strip()!r} is not NAME:FRAMES (e.g. right:120,stay:24,left:96)")
        name, n = m.group(1), int(m.group(2))
        if name not in names:
            raise ConfigError(f"actions: unknown action {name!r}; this model's actions are {list(names)}")
        if n < 1 or len(out) + n > max_frames:
            raise ConfigError(f"actions: {part.strip()!r} needs 1 to {max_frames - len(out)} frames")
        out += [names.index(name)] * n
    return out
