"""The library of bundled scenarios, found inside the installed package (`throttle.scenarios`).

The repository's top-level `scenarios/` folder is that package: editing a file there changes what
an editable install runs, and a built wheel carries a copy. Nothing here reads files by a path
relative to the source tree.
"""

from __future__ import annotations

import difflib
from importlib import resources
from pathlib import Path

from throttle.errors import ThrottleError

PACKAGE = "throttle.scenarios"
DEFAULT_SCENARIO = "twitter-2021-03-10"


def bundled() -> list[Path]:
    """Every bundled scenario file, sorted by name."""
    root = Path(str(resources.files(PACKAGE)))
    return sorted(root.glob("*.toml"))


def names() -> list[str]:
    return [p.stem for p in bundled()]


def bundled_path(name: str) -> Path:
    """A bundled scenario's file by its name (`twitter-2021-03-10`); ThrottleError if none."""
    for path in bundled():
        if path.stem == name:
            return path
    raise ThrottleError(_unknown(name))


def find_scenario(name_or_path: str) -> Path:
    """A scenario file by path, or a bundled one by name (`twitter-2021-03-10`)."""
    p = Path(name_or_path)
    if p.exists() or p.suffix == ".toml" or "/" in name_or_path:
        return p
    return bundled_path(name_or_path)


def _unknown(name: str) -> str:
    close = difflib.get_close_matches(name, names(), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]}?" if close else "; `throttle scenarios list` shows the bundled ones"
    return f"{name}: no such scenario file or bundled scenario name{hint}"
