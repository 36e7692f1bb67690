"""Read-only study folders (a mount, a shared disk): clear errors before any work, and the
commands that only read (pcam-report with --out elsewhere) still work. Tests run as root,
where permission bits do not stop writes, so the folder is a tmpfs mounted read-only."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from search.commands.refit import refit_main
from search.commands.search_args import main as search_main
from search.common import study as studies
from search.report import main as report_main

MAKE_STUDY = """
import sys
from pathlib import Path
import optuna
from search.common import study as studies
storage = studies.make_storage(studies.sqlite_url(Path(sys.argv[1]) / studies.DB_FILE))
st = optuna.create_study(study_name="pcam", storage=storage, direction="maximize")
for v in (0.8, 0.9):
    t = st.ask()
    t.suggest_float("lr", 1e-3, 1e-2, log=True)
    st.tell(t, v)
"""


def _mount(path: Path, *opts: str) -> bool:
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", ",".join(["size=16m", *opts]), "tmpfs", str(path)],
        capture_output=True,
    )
    return r.returncode == 0


@pytest.fixture
def read_only_studies(tmp_path):
    """A studies folder holding study 'pcam' (2 COMPLETE trials), then remounted read-only."""
    root = tmp_path / "ro"
    root.mkdir()
    if not _mount(root):
        pytest.skip("cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN)")
    try:
        # in another process: its open database file would keep the mount busy
        subprocess.run([sys.executable, "-c", MAKE_STUDY, str(root)], check=True)
        subprocess.run(["mount", "-o", "remount,ro", str(root)], check=True)
        yield root
    finally:
        subprocess.run(["umount", "-l", str(root)], capture_output=True)


def test_report_reads_a_study_in_a_read_only_folder(read_only_studies, tmp_path, capsys):
    # WAL needs a writable folder even to read: the file opens read-only and immutable
    out = tmp_path / "report"
    assert report_main(["--studies-dir", str(read_only_studies), "--out", str(out)]) == 0
    assert "0.9000" in (out / "report.html").read_text()
    # its default output folder is in the read-only one: named, exit 2, nothing written
    assert report_main(["--studies-dir", str(read_only_studies)]) == 2
    assert f"{read_only_studies} is read-only" in capsys.readouterr().err


def test_search_refuses_a_read_only_studies_folder_before_ray(read_only_studies, capsys):
    assert search_main(["--studies-dir", str(read_only_studies), "--trials", "1"]) == 2
    err = capsys.readouterr().err
    assert f"{read_only_studies} is read-only" in err and "starting a private Ray" not in err


def test_search_refuses_a_missing_folder_on_a_read_only_disk(read_only_studies, capsys):
    deep = read_only_studies / "new" / "studies"
    assert search_main(["--studies-dir", str(deep), "--trials", "1"]) == 2
    assert f"{read_only_studies} is read-only" in capsys.readouterr().err
    assert not deep.exists()


def test_refit_refuses_a_read_only_studies_folder_before_any_work(read_only_studies, capsys):
    assert refit_main(["--best", "--studies-dir", str(read_only_studies), "--no-progress"]) == 2
    assert f"{read_only_studies} is read-only" in capsys.readouterr().err


def test_writable_root_names_the_nearest_existing_folder(tmp_path):
    assert studies.writable_root(tmp_path / "a" / "b") is None
    if not _mount(tmp_path / "m" if (tmp_path / "m").mkdir() is None else tmp_path, "ro"):
        pytest.skip("cannot mount a tmpfs here")
    try:
        assert studies.writable_root(tmp_path / "m" / "x" / "y") == (tmp_path / "m").resolve()
    finally:
        subprocess.run(["umount", "-l", str(tmp_path / "m")], capture_output=True)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))


def test_search_with_a_read_only_home_says_what_to_set(_kaggle_master, tmp_path, capsys):
    # HOME on a read-only mount, the cache elsewhere: whatever Ray needs from ~ either works
    # or is said in one line naming HOME and what to set; never a traceback
    home = tmp_path / "home"
    home.mkdir()
    if not _mount(home, "ro"):
        pytest.skip("cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN)")
    try:
        env = {**os.environ, "HOME": str(home), "PCAM_CACHE_DIR": str(tmp_path / "cache")}
        args = ["--data", str(_kaggle_master), "--studies-dir", str(tmp_path / "studies")]
        args += ["--trials", "1", "--max-epochs", "1", "--folds", "2", "--no-progress"]
        r = subprocess.run(
            [sys.executable, "-m", "search.commands.search_args", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert "Traceback" not in r.stderr, r.stderr[-3000:]
        if r.returncode != 0:
            assert r.returncode == 1 and f"HOME ({home}) cannot be written" in r.stderr
    finally:
        subprocess.run(["umount", "-l", str(home)], capture_output=True)
