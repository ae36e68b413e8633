"""Helpers for tests that run the real nnU-Net and plugin commands in a throw-away nnU-Net folder tree."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent


def run_cli(*cmd: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run a console script of this environment; return the completed process (stdout/stderr captured)."""
    tool = BIN / cmd[0]
    result = subprocess.run([str(tool), *cmd[1:]], env={**os.environ, **(env or {})}, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-5000:]}")
    return result


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    """The error lines a command printed (progress bars aside); a traceback counts as a failure to report."""
    assert "Traceback" not in result.stderr, result.stderr
    return [line for line in result.stderr.splitlines() if ": error:" in line]


def one_error_line(capsys, main, argv: list[str]) -> str:
    """Call an entry point in-process with bad ``argv``: it must exit 2 with one ``error:`` line, returned."""
    import pytest

    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and ": error: " in err[0], err
    return err[0]


def latest_training_log(fold: Path) -> str:
    """The text of the newest nnU-Net training log in a fold folder (earlier runs may have left theirs)."""
    return max(fold.glob("training_log_*.txt"), key=lambda f: f.stat().st_mtime_ns).read_text()
