"""The prepared GPU check runs its dry run anywhere (what it would run, nothing run)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_prints_its_plan_and_runs_nothing(tmp_path):
    env = {
        **os.environ,
        "OUT": str(tmp_path / "out"),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    out = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "--gpus-per-trial 0.25" in out.stdout and "--trials 4" in out.stdout
    assert out.stdout.count("would measure") == 4  # 2 models x aug 0 and 0.5
    assert not (tmp_path / "out").exists()  # a dry run writes nothing
