"""srctl's tables keep whole rows when written to a pipe (rich alone would squeeze them to 80 columns)."""

import os
import subprocess
import sys

ROW = ["pair-0123456789abcdef", "app01.example.com", "disk0 (256 MiB)", "nbd", "initial-sync 45%", "full, 1.0 GiB sent",
       "3 s", "0 B", "12.0 MiB", "40.0 MiB/s", "12", "-"]
PRINT_WIDE_TABLE = (
    "from siterecovery.controller.cli import output\n"
    f"output.print_table('Replication', [f'COLUMN{{i}}' for i in range({len(ROW)})], [{ROW!r}])\n"
)


def run_piped(columns: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    if columns:
        env["COLUMNS"] = columns
    done = subprocess.run([sys.executable, "-c", PRINT_WIDE_TABLE], env=env, capture_output=True, text=True,
                          check=True)
    return done.stdout


def test_a_pipe_gets_every_cell_whole_on_one_line():
    out = run_piped(None)
    (line,) = [line for line in out.splitlines() if "pair-0123456789abcdef" in line]
    assert all(cell in line for cell in ROW), line
    assert "…" not in out


def test_columns_still_wins_when_set():
    out = run_piped("80")
    assert max(len(line) for line in out.splitlines()) <= 80
