"""A small tmpfs for a test that needs a volume to run full for real (mounting needs root)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def tmpfs(mount: Path, size: str, what: str) -> Iterator[Path]:
    """A tmpfs of `size` at `mount` (created) for the test's lifetime: "full" is real, whatever this
    machine's disk holds. Skipped without root, except in CI, where it fails."""
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True,
                            text=True)
    if result.returncode != 0:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"cannot mount a tmpfs for the {what}: {result.stderr}")
        pytest.skip(f"needs root to mount a tmpfs: {result.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
