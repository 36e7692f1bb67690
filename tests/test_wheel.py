"""What `pip install .` / `pip install git+…` gives (a Kaggle notebook, a cluster node): the
wheel, not this checkout. Built here, unpacked outside the repo, and run from there."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_ships_the_spaces_and_searches_from_outside_the_repo(_kaggle_master, tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheels),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = wheels.glob("pcam_search-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {Path(n).name for n in names if n.startswith("studies/")}
    assert {"cpu.toml", "default.toml", "cpu-v1.toml", "extended.toml"} <= shipped
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}  # before the editable install's path hook
    code = (
        "import sys; from search.commands.search_args import main; "
        "from search.tuning.space import STUDIES_DIR; "
        "print(STUDIES_DIR); sys.exit(main(sys.argv[1:]))"
    )
    args = ["--data", str(_kaggle_master), "--trials", "1", "--max-epochs", "1", "--folds", "2"]
    args += ["--no-progress", "--cache-dir", str(tmp_path / "cache")]
    r = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=work, env=env, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert r.stdout.splitlines()[0] == str(site / "studies")
    assert (work / "studies" / "pcam.db").is_file()  # outputs land where the user runs it
