"""Paths the master target is told to write: they must stay inside its own directories.

The controller sends absolute paths (target disk, journal directory, a
materialised copy). A path is accepted only when it is absolute, has no `..`
component, and, with every symbolic link resolved, lies strictly inside one of
the allowed roots (resolved the same way).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from siterecovery.common import errors


def inside(path: str, roots: Sequence[Path], *, what: str) -> Path:
    """The resolved `path`, or InvalidInput when it is not strictly inside one of `roots`."""
    names = ", ".join(str(r) for r in roots)
    if not path or "\0" in path or not os.path.isabs(path):
        raise errors.InvalidInput(
            f"{what} {path!r} is not an absolute path",
            hint=f"it must lie inside {names}", code="path-invalid",
        )
    if ".." in PurePosixPath(path).parts:
        raise errors.InvalidInput(
            f"{what} {path} contains '..'", hint=f"give a plain path inside {names}", code="path-traversal"
        )
    resolved = Path(os.path.realpath(path))
    for root in roots:
        real_root = Path(os.path.realpath(root))
        if resolved != real_root and resolved.is_relative_to(real_root):
            return resolved
    raise errors.InvalidInput(
        f"{what} {path} lies outside this master target's directories ({names})",
        hint="configure the directory as a datastore/retention directory on the master target, "
        "or choose a path inside one",
        code="path-outside",
    )
