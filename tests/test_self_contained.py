"""The repository is self-contained: nothing it ships or tests names a path of one machine or reaches outside it."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

from tests.reference import REFERENCE_DIR

ROOT = Path(__file__).resolve().parents[1]
CHECKED = ("nnunet_lefusion", "tests", "benchmarks", "trainers", "setup.py", "Makefile", ".ci")
# Absolute folders of a particular machine, and relative climbs out of the repository (".." then a folder).
OUTSIDE = re.compile(r"""["'\s(=](/(work|tmp|root|home|mnt|data|scratch|opt)/|(\.\./)+[A-Za-z_])""")


def checked_files() -> list[Path]:
    """The files under CHECKED that the repository holds or would hold: git-ignored outputs (a benchmark run's logs
    name the machine's folders) are left out; outside a git checkout, every file."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", *CHECKED],
                            cwd=ROOT, capture_output=True, text=True)
    if listed.returncode == 0:
        found = [ROOT / name for name in listed.stdout.split("\0") if name and (ROOT / name).is_file()]
    else:
        found = []
        for name in CHECKED:
            path = ROOT / name
            found += ([f for f in path.rglob("*") if f.is_file() and "__pycache__" not in f.parts]
                      if path.is_dir() else [path])
    guard = Path(__file__).resolve()  # its examples below are what the guard must catch
    return [f for f in found if f.suffix in {".py", ".yaml", ".ini", ".txt", ""} and f != guard]


def test_no_file_names_a_path_outside_the_repository():
    files = checked_files()
    assert any(f.name == "conftest.py" for f in files) and len(files) > 30
    offending = [f"{f.relative_to(ROOT)}:{n}: {line.strip()}"
                 for f in files
                 for n, line in enumerate(f.read_text(errors="replace").splitlines(), 1) if OUTSIDE.search(line)]
    assert offending == []


def test_the_guard_catches_what_it_is_for():
    folder = "sha" + "red"   # spelt apart so that no file of the repository names the folder outside it
    for line in (f'REFERENCE = Path("/work/{folder}/lefusion")', "x = open('/tmp/cache.json')",
                 f'p = "../{folder}/lefusion/ref.json"', f"cd ../{folder} && ls"):
        assert OUTSIDE.search(line), line
    for line in ('root = tmp_path / "x"', "a / b", '"nnUNet_raw"', "x = y  # 1/2 ../.."):
        assert not OUTSIDE.search(line), line


def test_the_reference_numbers_are_inside_the_repository():
    assert REFERENCE_DIR.is_relative_to(ROOT)
    assert {p.name for p in REFERENCE_DIR.iterdir()} >= {"lefusion_reference.json", "tiny_unet3d_reference.pt"}
