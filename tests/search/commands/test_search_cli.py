"""Real Ray Tune searches of tiny trials on small generated data (CPU): what the study records."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from optuna.trial import TrialState

from data_pipeline.cli_common import EXIT_FAILED, EXIT_INTERRUPTED
from search.commands.search_args import main
from search.common import study as studies
from search.common.attrs import (
    AUC_FOLDS,
    DEVICE,
    EARLY_STOPPED,
    EPOCHS_RUN,
    ERROR_MESSAGE,
    ERROR_TYPE,
    FAIL_REASON,
    FOLD_EPOCHS,
    INTERMEDIATE_FOLDS,
    INTERRUPTED,
    MODELS_DIR,
    NODE,
    PRECISION,
    RESUMED_FROM,
    RETRY_OF,
    SECONDS,
    get_record,
)
from search.common.config import CPU_DEFAULTS
from search.common.ensemble import load_ensemble
from search.training.checkpoint import CHECKPOINTS_DIR
from search.training.checkpoint import SHARE_ENV as CHECKPOINT_SHARE_ENV
from search.tuning.deadline import TIE_AUC
from search.tuning.ladder import epochs_of

# lr 1e30 makes the loss NaN in the first epoch: those trials must end FAIL, not kill the search
SPACE = """
[fixed]
arch = "simple_cnn"
width = 8
crop = 32
optimizer = "sgd"
batch_size = 32
aug = 0.0

[params.lr]
type = "categorical"
choices = [1e-4, 0.003, 1e30]

[params.dropout]
type = "float"
low = 0.0
high = 0.5
"""
MAX_EPOCHS = 3
K = 2
# fold racing (--race-epochs 2): fold 0 alone for epochs 1-2, then fold 1 catches up to epoch
# 2, then both per epoch; steps are fold-epochs
STEPS = [1, 2, 4, 6]


def _args(root: Path, data: Path, trials: int, *extra: str) -> list[str]:
    space = root / "space.toml"
    space.write_text(SPACE)
    return [
        "--data",
        str(data),
        "--cache-dir",
        str(root / "cache"),
        "--studies-dir",
        str(root / "studies"),
        "--space",
        str(space),
        "--trials",
        str(trials),
        "--max-epochs",
        str(MAX_EPOCHS),
        "--folds",
        "2",
        "--grace-period",
        "1",
        "--reduction-factor",
        "2",
        "--race-epochs",
        "2",
        "--no-progress",
        *extra,
    ]


def _load(root: Path, name: str = "pcam") -> optuna.Study:
    url = studies.sqlite_url(root / "studies" / "pcam.db")
    return optuna.load_study(study_name=name, storage=url)


@pytest.fixture(scope="module")
def searched(_kaggle_master, tmp_path_factory):
    """One 12-trial search; returns its root folder."""
    root = tmp_path_factory.mktemp("search")
    assert main(_args(root, _kaggle_master, 12)) == 0
    return root


def test_search_states_are_truthful(searched):
    trials = _load(searched).trials
    states = {t.state for t in trials}
    # every trial ended; nothing left RUNNING for the dashboard
    assert states <= {TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL}
    assert len(trials) == 12
    for t in trials:
        steps = sorted(t.intermediate_values)
        if t.params["lr"] > 1:  # diverges: FAIL with the reason, never a value
            assert t.state == TrialState.FAIL
            assert t.user_attrs[ERROR_TYPE] == "TrialDiverged"
            assert "nan" in t.user_attrs[ERROR_MESSAGE]
        elif t.state == TrialState.COMPLETE:
            # every report's mean fold AUC (step = fold-epochs), the last one included; the
            # value is the mean over all k folds at the last epoch. A promoted trial (the
            # growing top rung) reports every epoch of its own, longer schedule
            epochs = epochs_of(t, MAX_EPOCHS)
            want_steps = STEPS + list(range(STEPS[-1] + K, K * epochs + 1, K))
            assert steps == want_steps
            assert t.value == pytest.approx(t.intermediate_values[want_steps[-1]])
            assert t.user_attrs[EPOCHS_RUN] == epochs
            assert t.user_attrs[FOLD_EPOCHS] == K * epochs
            assert len(t.user_attrs[AUC_FOLDS]) == K
            assert t.value == pytest.approx(sum(t.user_attrs[AUC_FOLDS]) / K)
            # the first values are fold 0 alone, then every value averages both folds
            want_folds = {"1": 1, "2": 1, **{str(s): 2 for s in want_steps[2:]}}
            assert t.user_attrs[INTERMEDIATE_FOLDS] == want_folds
            # what it trained on: the GPU's name on a CUDA host, else "cpu"
            want = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
            assert t.user_attrs[DEVICE] == want and t.user_attrs[SECONDS] > 0
            # and in which arithmetic: the engine's rule for that device (bf16 on AMX CPUs)
            from search.training.engine import precision

            dev = "cuda" if torch.cuda.is_available() else "cpu"
            assert t.user_attrs[PRECISION] == precision(dev)
        else:  # ASHA stopped it early: PRUNED, with the fold-epochs it did run
            assert t.state == TrialState.PRUNED
            assert 1 <= t.user_attrs[FOLD_EPOCHS] < K * MAX_EPOCHS
            assert steps == STEPS[: len(steps)] and steps[-1] == t.user_attrs[FOLD_EPOCHS]
            assert t.user_attrs[INTERMEDIATE_FOLDS]["1"] == 1
    assert TrialState.COMPLETE in states and TrialState.PRUNED in states
    # racing: some trials were stopped on fold 0 alone, having trained 1 fold-epoch
    assert any(t.user_attrs.get(FOLD_EPOCHS) == 1 for t in trials)


def test_search_study_attrs_describe_the_run(searched):
    study = _load(searched)
    attrs = study.user_attrs
    assert len(attrs["dataset_fingerprint"]) >= 8
    assert Path(attrs["folds_file"]).is_file()
    assert attrs["version"] and attrs["command"].startswith("pcam-search ")
    # the big records are the study's system attrs: the user attrs stay short
    assert not {"space", "config", "runs"} & set(attrs)
    space, cfg = get_record(study, "space"), get_record(study, "config")
    assert space["params"]["lr"]["choices"] == [1e-4, 0.003, 1e30]
    assert cfg["folds"] == 2 and cfg["max_epochs"] == MAX_EPOCHS
    # optuna-dashboard names the value "mean fold AUC", not "Objective 0"
    assert _load(searched).metric_names == ["mean fold AUC"]


def test_search_resume_counts_earlier_trials(searched, _kaggle_master, tmp_path):
    # --trials is the total of finished trials: 12 exist, so 2 more run. On a copy of the
    # module's study (the other tests read it as the 12-trial search); --keep-top above the
    # trial count, so no kept model of the original folder is deleted from the copy's run
    root = Path(shutil.copytree(searched, tmp_path / "copy"))
    keep = ["--keep-top", "100"]
    assert main(_args(root, _kaggle_master, 14, *keep)) == 0
    study = _load(root)
    assert studies.count_finished(study) == 14
    # asking again for 14 runs nothing
    assert main(_args(root, _kaggle_master, 14, *keep)) == 0
    assert len(_load(root).trials) == 14
    assert len(_load(searched).trials) == 12  # the original is untouched


def test_search_refuses_changed_folds_for_same_study(searched, _kaggle_master, capsys):
    args = _args(searched, _kaggle_master, 20)
    args[args.index("--folds") + 1] = "3"
    assert main(args) == 2
    assert "other settings" in capsys.readouterr().err


def _wait_for(pred, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    t0 = time.monotonic()
    while not pred():
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"search exited {proc.returncode} before {what}:\n{out}")
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.5)


def _cli(args: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "search.commands.search_args", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,
    )


def _states(root: Path) -> dict[str, int]:
    """Trials by state, read through a read-only SQLite connection: a poller that opened the
    file as an Optuna storage would create the schema itself and race the driver doing the
    same (seen in CI: the driver never created its study)."""
    db = root / "studies" / "pcam.db"
    if not db.is_file():
        return {}
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as c:
            return dict(c.execute("SELECT state, COUNT(*) FROM trials GROUP BY state").fetchall())
    except sqlite3.Error:  # schema not there yet
        return {}


def test_search_resume_after_kill_9(_kaggle_master, tmp_path):
    # a search killed with SIGKILL (driver and its Ray processes) leaves RUNNING trials;
    # the same command again marks them FAIL (interrupted), keeps the finished ones, and
    # completes the requested number of finished trials
    args = _args(tmp_path, _kaggle_master, 12)
    proc = _cli(args, start_new_session=True)
    try:

        def running_after_two_finished() -> bool:
            n = _states(tmp_path)
            return n.get("RUNNING", 0) >= 1 and n.get("COMPLETE", 0) + n.get("PRUNED", 0) >= 2

        _wait_for(running_after_two_finished, 120, "finished and running trials", proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    before = _load(tmp_path).trials
    finished_before = {t.number for t in before if t.state != TrialState.RUNNING}
    zombies = {t.number for t in before if t.state == TrialState.RUNNING}
    assert zombies

    out = subprocess.run(
        [sys.executable, "-m", "search.commands.search_args", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    after = {t.number: t for t in _load(tmp_path).trials}
    assert all(t.state != TrialState.RUNNING for t in after.values())
    ran = []
    for n in zombies:
        assert after[n].state == TrialState.FAIL and after[n].user_attrs[INTERRUPTED]
        # ... and their params were queued again, once each; those that ran had them. (A
        # trial killed between Optuna's ask and its first suggestion has no params to re-run;
        # one killed between two suggestions re-runs those it had, the others sampled anew.)
        retries = [t for t in after.values() if t.user_attrs.get(RETRY_OF) == n]
        if not after[n].params:
            assert not retries
            continue
        (again,) = retries
        if again.state != TrialState.WAITING:
            assert after[n].params.items() <= again.params.items()
            ran.append(again)
    assert ran or not any(after[n].params for n in zombies)  # queued params ran first ...
    waiting = [t for t in after.values() if t.state == TrialState.WAITING]
    sampled = [t for t in after.values() if t.number > max(x.number for x in before)]
    sampled = [t for t in sampled if RETRY_OF not in t.user_attrs]
    assert not (waiting and sampled)  # ... no new trial while a queued one still waited
    # nothing finished was lost or changed
    for t in before:
        if t.number in finished_before:
            assert after[t.number].state == t.state and after[t.number].value == t.value
    assert studies.count_finished(_load(tmp_path)) == 12


def test_search_ctrl_c_closes_running_trials(_kaggle_master, tmp_path):
    args = _args(tmp_path, _kaggle_master, 30)
    proc = _cli(args)

    def running_after_one_finished() -> bool:
        n = _states(tmp_path)  # one read per poll: the three counts agree
        return n.get("RUNNING", 0) >= 1 and n.get("COMPLETE", 0) + n.get("PRUNED", 0) >= 1

    _wait_for(running_after_one_finished, 120, "a running trial", proc)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    assert "run the same command again" in out
    counts = studies.tally(_load(tmp_path))
    # Ctrl-C leaves no RUNNING trial behind: they are FAIL (interrupted)
    assert counts.get("RUNNING", 0) == 0


def test_search_timeout_stops_cleanly(_kaggle_master, tmp_path, capsys):
    # --timeout ends the run with exit 0: trials that could not finish are not started (the run
    # says so), none is left RUNNING, and cut-off ones do not count toward --trials
    # 20 s: enough for Ray's first workers to start and finish a trial on a loaded 2-core
    # machine (8 s was, until one CI host's workers took longer to start)
    assert main(_args(tmp_path, _kaggle_master, 200, "--timeout", "20")) == 0
    out = capsys.readouterr().out
    assert "deadline reached" in out
    study = _load(tmp_path)
    counts = studies.tally(study)
    assert counts.get("RUNNING", 0) == 0 and counts.get("COMPLETE", 0) >= 1
    cut = [t for t in study.trials if t.user_attrs.get(INTERRUPTED)]
    assert studies.count_finished(study) == len(study.trials) - len(cut) < 200
    # the summary prints the waste: fold-epochs of the trials it stopped, of all trained
    wasted = sum(t.user_attrs.get(FOLD_EPOCHS, 0) for t in cut)
    total = sum(t.user_attrs.get(FOLD_EPOCHS, 0) for t in study.trials)
    assert f"({wasted} of {total} fold-epochs went to trials stopped unfinished)" in out


def test_search_budget_trains_the_final_model_in_the_rest_and_submits(
    _kaggle_master, tmp_path, capsys
):
    # --budget: search at least a quarter, then the best params trained again for more epochs
    # than the search's (as many as fit); the submission exists, the study records it
    args = _args(tmp_path, _kaggle_master, 200, "--budget", "60", "--search-share", "0.25")
    t0 = time.monotonic()
    assert main(args) == 0
    study = _load(tmp_path)
    refit = get_record(study, "refit")
    assert Path(refit["submission"]).is_file()
    # the best trial, or a faster one within TIE_AUC of it
    chosen = study.trials[refit["trial"]]
    assert chosen.state.name == "COMPLETE"
    assert chosen.value >= studies.best_trial(study).value - TIE_AUC
    assert refit["trained"] and refit["epochs"] > MAX_EPOCHS
    out = capsys.readouterr().out
    assert f"for {refit['epochs']} epochs" in out
    # a full-data final model (the default) has no OOF of its own: the line says whose it is
    assert refit["full_fit"] >= 1 and "pooled OOF AUC of the search's fold models" in out
    # and the refit line names the trial's own value as the mean of its folds' AUCs
    assert "the mean of its folds' AUCs" in out
    # the search stopped at about half the budget: the final model had the rest
    assert time.monotonic() - t0 > 30
    assert studies.tally(study).get("RUNNING", 0) == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_search_survives_live_dashboard_on_sqlite(_kaggle_master, tmp_path):
    # optuna-dashboard reading the live SQLite file must not make the search die of
    # "database is locked"
    args = _args(tmp_path, _kaggle_master, 10)
    url = studies.sqlite_url(tmp_path / "studies" / "pcam.db")
    studies.make_storage(url)  # the file exists before the dashboard opens it
    port = _free_port()
    dash = subprocess.Popen(
        [str(Path(sys.executable).parent / "optuna-dashboard"), url, "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    reads, errors, stop = [0], [], threading.Event()

    def hammer():
        while not stop.is_set():
            try:
                api = f"http://127.0.0.1:{port}/api/studies"
                with urllib.request.urlopen(api, timeout=10) as r:
                    for s in json.load(r)["study_summaries"]:
                        sid = s["study_id"]
                        urllib.request.urlopen(f"{api}/{sid}?after=0", timeout=10).read()
                        urllib.request.urlopen(f"{api}/{sid}/param_importances", timeout=30)
                reads[0] += 1
            except Exception as e:  # connection refused while the dashboard starts
                if reads[0]:
                    detail = e.read()[-300:] if hasattr(e, "read") else b""
                    errors.append(f"{e!r} {detail!r}")
                time.sleep(0.2)

    th = threading.Thread(target=hammer, daemon=True)
    th.start()
    try:
        rc = main(args)
        stop.set()
        th.join(15)
        # what the dashboard serves is what the search recorded: states, values, epochs
        api = f"http://127.0.0.1:{port}/api/studies"
        with urllib.request.urlopen(api, timeout=10) as r:
            (sid,) = [s["study_id"] for s in json.load(r)["study_summaries"]]
        # the dashboard caches trials for up to 10 s: wait until it serves no RUNNING trial
        deadline = time.monotonic() + 30
        while True:
            with urllib.request.urlopen(f"{api}/{sid}?after=0", timeout=30) as r:
                served = {t["number"]: t for t in json.load(r)["trials"]}
            if all(t["state"] != "Running" for t in served.values()) or (
                time.monotonic() > deadline
            ):
                break
            time.sleep(1)
    finally:
        stop.set()
        dash.terminate()
        dash.wait(10)
    assert rc == 0
    assert reads[0] > 5, "the dashboard never answered"
    assert not errors, errors[:5]
    study = _load(tmp_path)
    assert studies.count_finished(study) == 10
    assert set(served) == {t.number for t in study.trials}
    for t in study.trials:
        got = served[t.number]
        assert got["state"].upper() == t.state.name
        steps = {iv["step"]: iv["value"] for iv in got["intermediate_values"]}
        assert steps == pytest.approx(t.intermediate_values)
        if t.state == TrialState.COMPLETE:
            assert got["values"] == pytest.approx([t.value])


PG_URL = os.environ.get("PCAM_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


def _postgres_or_skip() -> None:
    import psycopg

    try:
        psycopg.connect(
            PG_URL.replace("postgresql://", "postgresql://", 1), connect_timeout=3
        ).close()
    except Exception as e:
        pytest.skip(f"no PostgreSQL server answers at {studies.safe_url(PG_URL)}: {e}")


def _with_password(url: str, password: str) -> str:
    # the local server trusts connections, so a made-up password still connects
    from sqlalchemy.engine import make_url

    return make_url(url).set(password=password).render_as_string(hide_password=False)


def test_search_on_postgres(_kaggle_master, tmp_path, capsys):
    _postgres_or_skip()
    name = f"pcam-test-{os.getpid()}-{int(time.time())}"
    url = _with_password(PG_URL, "s3cret-pw")
    args = _args(tmp_path, _kaggle_master, 4, "--storage", url, "--study", name)
    try:
        assert main(args) == 0
        # the password is never printed, nor stored in the study or any file we write
        out = capsys.readouterr()
        assert "s3cret-pw" not in out.out + out.err
        study = optuna.load_study(study_name=name, storage=PG_URL)
        assert "s3cret-pw" not in json.dumps(study.user_attrs)
        # nor in the records kept as system attrs (the config holds the storage URL)
        sys_attrs = study._storage.get_study_system_attrs(study._study_id)
        assert "***" in json.dumps(sys_attrs) and "s3cret-pw" not in json.dumps(sys_attrs)
        for f in (tmp_path / "studies").rglob("*"):
            if f.is_file():
                assert b"s3cret-pw" not in f.read_bytes(), f
        study = optuna.load_study(study_name=name, storage=PG_URL)
        assert studies.count_finished(study) == 4
        assert any(t.state == TrialState.COMPLETE for t in study.trials)
        # run again: resumes the same Postgres study instead of starting over
        args[args.index("--trials") + 1] = "5"
        assert main(args) == 0
        assert studies.count_finished(optuna.load_study(study_name=name, storage=PG_URL)) == 5
    finally:
        with contextlib.suppress(KeyError):
            optuna.delete_study(study_name=name, storage=PG_URL)


def _search_process(args: list[str], env: dict) -> subprocess.CompletedProcess:
    """``pcam-search args`` in its own process with ``env``; it must exit 0."""
    out = subprocess.run(
        [sys.executable, "-m", "search.commands.search_args", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out


def test_search_on_two_node_ray_cluster(_kaggle_master, tmp_path):
    # `ray start` a head and a second node (two raylets) on this machine; --address joins them.
    # The head offers no CPU, so every trial must be scheduled onto the node that joined; this
    # is deterministic, unlike "both nodes ran a trial", which a reused actor on a warm node
    # can starve when trials are shorter than a cold node's actor start (seen in CI).
    ray = str(Path(sys.executable).parent / "ray")
    # Ray 2.60's `ray start` wants token auth; a token made here keeps the test off ~/.ray
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    port = _free_port()
    head = subprocess.run(
        [
            ray,
            "start",
            "--head",
            f"--port={port}",
            "--num-cpus=0",
            "--include-dashboard=false",
            "--disable-usage-stats",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    try:
        assert head.returncode == 0, head.stdout + head.stderr
        node = subprocess.run(
            [ray, "start", f"--address=127.0.0.1:{port}", "--num-cpus=2"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert node.returncode == 0, node.stdout + node.stderr
        args = _args(tmp_path, _kaggle_master, 6, "--address", f"127.0.0.1:{port}")
        out = _search_process(args, env)
        assert "2 at once" in out.stdout, out.stdout  # the CPUs of the joined node were seen
        study = _load(tmp_path)
        assert studies.count_finished(study) == 6
        # node id (12 hex) -> CPUs, read from the cluster itself
        cpus = json.loads(
            subprocess.run(
                [
                    sys.executable,
                    "-c",
                    "import json, sys, ray; ray.init(address=sys.argv[1], logging_level='ERROR'); "
                    "print(json.dumps({n['NodeID'][:12]: n['Resources'].get('CPU', 0) "
                    "for n in ray.nodes() if n['Alive']}))",
                    f"127.0.0.1:{port}",
                ],
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
                check=True,
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        assert sorted(cpus.values()) == [0, 2], cpus
        # every node with CPUs reads the cache file: one whose bytes differ, or that has no
        # file, is named (a node with other data at the driver's path, or none)
        # the driver's PCAM_* settings reach workers the cluster's raylets start (their own
        # environment, from `ray start`, has none): set here, after the cluster started
        probe = (
            "import json, os, sys, numpy as np, ray\n"
            "from search.training.engine import PoolImages, TrainData\n"
            "from search.tuning.ray_adapter import check_data_on_nodes, init_ray\n"
            "os.environ['PCAM_PROBE'] = 'from-the-driver'\n"
            "init_ray(sys.argv[1], None, None, False)\n"
            "read = ray.remote(num_cpus=1)(lambda: os.environ.get('PCAM_PROBE'))\n"
            "env = ray.get(read.remote())\n"
            "data = TrainData(PoolImages(sys.argv[2], np.arange(2)), np.zeros(2))\n"
            "ok = check_data_on_nodes(data)\n"
            "other = check_data_on_nodes(data, want='0' * 40)\n"
            "os.remove(sys.argv[2])\n"
            "gone = check_data_on_nodes(data, want='0' * 40)\n"
            "print(json.dumps([ok, other, gone, env]))\n"
        )
        npy = tmp_path / "probe" / "images.npy"
        npy.parent.mkdir()
        np.save(npy, np.zeros((2, 96, 96, 3), np.uint8))
        ok, other, gone, worker_env = json.loads(
            subprocess.run(
                [sys.executable, "-c", probe, f"127.0.0.1:{port}", str(npy)],
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
                check=True,
            ).stdout.splitlines()[-1]
        )
        node_id = next(n for n, c in cpus.items() if c == 2)
        assert ok == [], ok
        assert worker_env == "from-the-driver"
        assert len(other) == 1 and node_id in other[0] and "other data" in other[0], other
        assert len(gone) == 1 and node_id in gone[0] and "not readable on" in gone[0], gone
        ran_on = {t.user_attrs.get(NODE) for t in study.trials}
        assert ran_on and all(cpus.get(n) == 2 for n in ran_on), (ran_on, cpus)
        # ... and their kept fold models are whole on the driver's disk: the trials send the
        # bytes to the model sink on the driver's node (no shared filesystem assumed)
        kept = [t.user_attrs[MODELS_DIR] for t in study.trials if t.user_attrs.get(MODELS_DIR)]
        home = (tmp_path / "studies" / "pcam" / "models").resolve()
        assert kept and all(Path(d).resolve().parent == home for d in kept)
        assert all(load_ensemble(d, "cpu").models for d in kept)
        # without --address (or RAY_ADDRESS) a search starts its own Ray, even with a
        # `ray start` cluster running on the machine
        args = _args(tmp_path, _kaggle_master, 2, "--study", "alone", "--max-epochs", "1")
        env.pop("RAY_ADDRESS", None)
        _search_process(args, env)
        alone = {t.user_attrs.get(NODE) for t in _load(tmp_path, "alone").trials}
        assert alone and not alone & set(cpus), (alone, cpus)
        # ... and RAY_ADDRESS joins the cluster, as for Ray's own scripts
        args = _args(tmp_path, _kaggle_master, 2, "--study", "env", "--max-epochs", "1")
        _search_process(args, {**env, "RAY_ADDRESS": f"127.0.0.1:{port}"})
        joined = {t.user_attrs.get(NODE) for t in _load(tmp_path, "env").trials}
        assert joined and all(cpus.get(n) == 2 for n in joined), (joined, cpus)
    finally:
        subprocess.run([ray, "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_search_self_stopped_trial_is_complete(_kaggle_master, tmp_path):
    # early stopping inside a trial (patience) must not read as ASHA pruning or interruption.
    # lr 1e-9 learns nothing; with batch 2 the held-out AUC only wobbles with BatchNorm's
    # running statistics, so patience 1 ends every fold well before epoch 6
    space = (
        SPACE.replace('optimizer = "sgd"', 'optimizer = "sgd"\npatience = 1')
        .replace("batch_size = 32", "batch_size = 2")
        .replace("choices = [1e-4, 0.003, 1e30]", "choices = [1e-9]")
    )
    args = _args(tmp_path, _kaggle_master, 2, "--max-epochs", "6", "--no-asha")  # last wins
    (tmp_path / "space.toml").write_text(space)  # _args wrote the default test space there
    assert main(args) == 0
    for t in _load(tmp_path).trials:
        assert t.state == TrialState.COMPLETE, (t.number, t.state, t.user_attrs)
        assert t.user_attrs[EARLY_STOPPED] is True
        epochs = t.user_attrs[EPOCHS_RUN]
        steps = [1, 2, *range(2 * K, K * epochs + 1, K)]  # fold 0 to epoch 2, then both
        assert epochs < 6 and sorted(t.intermediate_values) == steps
        assert t.value == pytest.approx(t.intermediate_values[steps[-1]])


def test_search_with_no_complete_trial_exits_1_naming_the_commonest_error(
    _kaggle_master, tmp_path, capsys
):
    # lr 1e30 makes every trial's loss NaN: the search ran, nothing completed, so it failed
    args = _args(tmp_path, _kaggle_master, 3, "--no-asha")
    (tmp_path / "space.toml").write_text(SPACE.replace("[1e-4, 0.003, 1e30]", "[1e30]"))
    assert main(args) == 1
    out = capsys.readouterr().out
    assert "no COMPLETE trial" in out and "3 trial(s) failed" in out and "TrialDiverged" in out
    assert studies.tally(_load(tmp_path)) == {"FAIL": 3}


def test_search_extended_space_end_to_end(_kaggle_master, tmp_path):
    args = _args(tmp_path, _kaggle_master, 4, "--max-epochs", "2", "--space", "extended")
    assert main(args) == 0
    study = _load(tmp_path)
    assert studies.count_finished(study) == 4
    assert all(t.state != TrialState.FAIL for t in study.trials), [
        t.user_attrs.get(ERROR_MESSAGE) for t in study.trials
    ]


def test_search_missing_pretrained_weights_is_a_clear_error(_kaggle_master, tmp_path, capsys):
    # asked-for weights that are not there stop the search before any trial, naming the file
    missing = tmp_path / "resnet18.safetensors"
    args = _args(tmp_path, _kaggle_master, 2, "--space", "default", "--pretrained", str(missing))
    assert main(args) == 2
    assert str(missing) in capsys.readouterr().err
    assert not (tmp_path / "studies" / "pcam.db").exists() or not _load(tmp_path).trials


def test_search_on_bad_data_names_the_problem_and_creates_no_study(kaggle_dir, tmp_path, capsys):
    # a label that is not 0/1: exit 2 with the offending id, and no (empty) study left behind
    labels = kaggle_dir / "train_labels.csv"
    lines = labels.read_text().splitlines()
    bad_id = lines[1].split(",")[0]
    lines[1] = f"{bad_id},7"
    labels.write_text("\n".join(lines) + "\n")
    assert main(_args(tmp_path, kaggle_dir, 2)) == 2
    err = capsys.readouterr().err
    assert bad_id in err and "Traceback" not in err
    db = tmp_path / "studies" / "pcam.db"
    assert not db.exists() or not optuna.get_all_study_names(studies.sqlite_url(db))


@pytest.mark.parametrize("storage", ["", "postgresql://u:secret@127.0.0.1:5432/test"])
def test_next_commands_name_the_same_study_from_any_folder(tmp_path, monkeypatch, storage):
    # the printed refit/report commands must reach this study when run from another folder
    from search.commands.refit import refit_parser
    from search.commands.search_study import next_commands
    from search.common.config import SearchConfig
    from search.submission.inputs import RefitConfig

    monkeypatch.chdir(tmp_path)
    cfg = SearchConfig(study="s1", storage=storage, studies_dir=Path("rel/studies"))
    dash, refit, report = next_commands(cfg)
    assert report.startswith("pcam-report ") and "secret" not in refit + dash
    elsewhere = tmp_path / "other"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    a = refit_parser().parse_args(shlex.split(refit)[1:])
    rc = RefitConfig(study=a.study, storage=a.storage, studies_dir=a.studies_dir)
    assert rc.study == "s1" and a.studies_dir == tmp_path / "rel/studies"
    if not storage:
        assert rc.storage_url == cfg.storage_url.replace(str(elsewhere), str(tmp_path))
        assert rc.storage_url == f"sqlite:///{tmp_path / 'rel/studies/pcam.db'}"
    else:
        assert a.storage == "postgresql://u:***@127.0.0.1:5432/test"


@pytest.mark.parametrize(
    "flags, epochs",
    [
        ([], CPU_DEFAULTS.max_epochs),
        (["--budget", "600"], CPU_DEFAULTS.budget_max_epochs),
        (["--budget", "600", "--search-share", "1"], CPU_DEFAULTS.max_epochs),
        (["--budget", "600", "--max-epochs", "7"], 7),
        (["--timeout", "600"], CPU_DEFAULTS.budget_max_epochs),
        (["--timeout", "600", "--max-epochs", "7"], 7),
    ],
)
def test_build_config_budget_searches_short_complete_trials(flags, epochs):
    # with a final model to train, trials are short complete runs unless the user says
    from search.commands.search_args import parser
    from search.commands.search_config import build_config

    cfg = build_config(parser().parse_args(flags), has_gpu=False)
    assert cfg.max_epochs == epochs
    assert cfg.final_max_epochs == CPU_DEFAULTS.final_max_epochs


def test_search_resume_takes_unset_frozen_settings_from_the_study(
    _kaggle_master, tmp_path, capsys
):
    # first run with --folds 2 --max-epochs 1; resuming with only --trials must not be
    # refused, and uses (and prints) the study's k
    assert main(_args(tmp_path, _kaggle_master, 1)) == 0
    base = ["--data", str(_kaggle_master), "--cache-dir", str(tmp_path / "cache")]
    base += ["--studies-dir", str(tmp_path / "studies"), "--space", str(tmp_path / "space.toml")]
    capsys.readouterr()
    assert main([*base, "--trials", "2", "--no-progress", "--no-asha"]) == 0
    out = capsys.readouterr().out
    assert "using its own settings" in out and "'folds': 2" in out
    assert "best mean 2-fold AUC" in out
    study = _load(tmp_path)
    assert studies.count_finished(study) == 2
    assert get_record(study, "config")["max_epochs"] == MAX_EPOCHS


def _paced_study(trials: list[tuple[float, float]]) -> optuna.Study:
    """An in-memory study of COMPLETE trials: (value, seconds per fold-epoch) each, 12
    fold-epochs trained."""
    import datetime as dt

    from optuna.distributions import FloatDistribution

    study = optuna.create_study(direction="maximize")
    t0 = dt.datetime(2026, 1, 1)
    for value, pace in trials:  # a template trial keeps its times: 12 x pace seconds
        study.add_trial(
            optuna.trial.FrozenTrial(
                number=0,
                trial_id=0,
                state=TrialState.COMPLETE,
                value=value,
                datetime_start=t0,
                datetime_complete=t0 + dt.timedelta(seconds=12 * pace),
                params={"lr": 1e-3},
                distributions={"lr": FloatDistribution(1e-5, 1e-1, log=True)},
                user_attrs={"fold_epochs": 12},
                system_attrs={},
                intermediate_values={},
            )
        )
    return study


@pytest.mark.parametrize(
    ("left", "want"),
    [(25, 1), (200, 0)],  # little time: the 2x faster tie trains more epochs; a lot: both cap
)
def test_final_plan_gives_a_tie_to_the_faster_trial_only_when_it_buys_epochs(left, want):
    import io

    from rich.console import Console

    from search.commands.final_step import final_plan
    from search.common.config import SearchConfig
    from search.tuning.deadline import Deadline

    study = _paced_study([(0.900, 1.0), (0.900 - TIE_AUC / 2, 0.5)])  # trial 1: a tie, 2x fast
    deadline = Deadline(full_fold_epochs=12, budget=600, search_share=0.25, final_fold_epochs=72)
    deadline.observe("best", seconds=12, fold_epochs=12, images_per_s=1e9)
    deadline.best = "best"
    cfg = SearchConfig(budget=left, max_epochs=4)
    number, epochs, models = final_plan(
        cfg, study, time.monotonic(), deadline, Console(file=io.StringIO())
    )
    assert number == want and epochs > 4 and models >= 1
    if want == 0:  # the best trial's plan already reaches the cap: speed buys nothing
        assert epochs == cfg.final_max_epochs


def test_search_dead_address_is_named_in_seconds(_kaggle_master, tmp_path, capsys):
    # nothing listens there: a clear error at once, not Ray retrying the GCS for minutes
    address = f"127.0.0.1:{_free_port()}"
    t0 = time.monotonic()
    assert main(_args(tmp_path, _kaggle_master, 2, "--address", address)) == 2
    assert time.monotonic() - t0 < 30
    err = capsys.readouterr().err
    assert f"no Ray cluster answers at {address}" in err and "Traceback" not in err


def test_build_config_takes_the_fold_seed():
    from search.commands.search_args import parser
    from search.commands.search_config import FROZEN_SETTINGS, build_config

    assert build_config(parser().parse_args([]), has_gpu=False).fold_seed == 0
    assert build_config(parser().parse_args(["--fold-seed", "1"]), has_gpu=False).fold_seed == 1
    assert "fold_seed" in FROZEN_SETTINGS  # kept with the study, like k


@pytest.mark.parametrize(
    "flags, says",
    [
        (["--folds", "1"], "--folds >= 2"),
        (["--trials", "0"], "--trials"),
        (["--timeout", "-5"], "--timeout must be > 0"),
        (["--keep-top", "-1"], "--keep-top must be >= 0"),
        (["--budget", "1"], "--budget 1 s is too short"),
    ],
)
def test_search_bad_flags_fail_before_ray_and_create_no_study(
    _kaggle_master, tmp_path, capsys, flags, says
):
    t0 = time.monotonic()
    assert main([*_args(tmp_path, _kaggle_master, 2), *flags]) == 2
    assert time.monotonic() - t0 < 10  # Ray's start alone takes longer
    out = capsys.readouterr()
    assert says in out.err and "starting a private Ray" not in out.err
    db = tmp_path / "studies" / "pcam.db"
    assert not db.exists() or not optuna.get_all_study_names(studies.sqlite_url(db))


def test_search_bad_space_file_fails_before_ray(_kaggle_master, tmp_path, capsys):
    args = _args(tmp_path, _kaggle_master, 2)
    (tmp_path / "space.toml").write_text(SPACE.replace("crop = 32", "crop = 32\ndepth = 7"))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "depth 7 is too deep for crop 32" in err and "starting a private Ray" not in err


def _trial_workers(leader: int) -> list[int]:
    """Pids of the Ray trial actors started under the search process ``leader`` (it runs in
    a process group of its own; another Ray on the machine is left alone). Their process
    title names the trainable."""
    cmd = ["pgrep", "-s", str(leader), "-f", "ray::ImplicitFunc"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def test_search_worker_killed_mid_trial_is_interrupted_not_a_fail_and_resumed(
    _kaggle_master, tmp_path, monkeypatch
):
    # the machinery failing (a trial's worker killed, as the OOM killer does) is not the
    # params' fault: the trial is FAIL *interrupted*, the search goes on, and the resume runs
    # its params again, continuing from the killed trial's last checkpoint
    monkeypatch.setenv(CHECKPOINT_SHARE_ENV, "1")  # a checkpoint after every report
    args = _args(tmp_path, _kaggle_master, 3, "--max-epochs", "8", "--no-asha")
    proc = _cli(args, start_new_session=True)
    try:

        def reporting() -> bool:
            return _reports(tmp_path) >= 2 and bool(_trial_workers(proc.pid))

        _wait_for(reporting, 180, "a trial reporting", proc)
        os.kill(_trial_workers(proc.pid)[0], signal.SIGKILL)
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out
    study = _load(tmp_path)
    killed = [t for t in study.trials if "worker or node" in t.user_attrs.get(FAIL_REASON, "")]
    assert killed and all(t.user_attrs[INTERRUPTED] for t in killed), out
    assert not [t for t in study.trials if t.state == TrialState.FAIL and t not in killed]
    assert studies.count_finished(study) == 3  # the killed trial did not count
    checkpoints = tmp_path / "studies" / "pcam" / CHECKPOINTS_DIR
    assert len(list(checkpoints.glob("*.pt"))) == 1  # the killed trial's (the others: removed)
    # the same command again (one trial more) runs the killed trial's params first ...
    assert main([*args, "--trials", "4"]) == 0
    again = [t for t in _load(tmp_path).trials if t.user_attrs.get(RETRY_OF) == killed[0].number]
    assert len(again) == 1 and again[0].params == killed[0].params
    # ... from where it was killed: its reports so far replayed, not trained again
    done = killed[0].intermediate_values
    assert again[0].user_attrs[RESUMED_FROM] >= max(done) > 0
    assert {s: again[0].intermediate_values[s] for s in done} == done
    assert again[0].state == TrialState.COMPLETE and not list(checkpoints.glob("*.pt"))


def test_search_raylet_killed_leaves_no_fail_against_params_and_resumes(_kaggle_master, tmp_path):
    # Ray's node going away mid-search (its raylet killed) is the machinery's failure: the
    # run ends with a one-line reason and a non-zero exit, no trial is FAIL against its
    # params, and the same command again re-runs the interrupted params and finishes
    args = _args(tmp_path, _kaggle_master, 3, "--max-epochs", "8", "--no-asha")
    proc = _cli(args, start_new_session=True)
    try:
        _wait_for(
            lambda: _reports(tmp_path) >= 2 and _trial_workers(proc.pid), 180, "a trial", proc
        )
        raylet = subprocess.run(
            ["pgrep", "-s", str(proc.pid), "-f", "ray/raylet"], capture_output=True, text=True
        ).stdout.split()
        assert raylet
        os.kill(int(raylet[0]), signal.SIGKILL)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode in (EXIT_FAILED, EXIT_INTERRUPTED), out
    assert "Traceback" not in out, out
    study = _load(tmp_path)
    assert not [
        t for t in study.trials if t.state == TrialState.FAIL and not t.user_attrs.get(INTERRUPTED)
    ]
    assert not [t for t in study.trials if t.state == TrialState.RUNNING]
    cut = [t for t in study.trials if t.user_attrs.get(INTERRUPTED) and t.params]
    assert cut
    # the same command again: the interrupted params run first, and the study fills up
    assert main(args) == 0
    after = _load(tmp_path)
    for t in cut:
        (again,) = [r for r in after.trials if r.user_attrs.get(RETRY_OF) == t.number]
        assert again.params == t.params and again.state != TrialState.FAIL
    assert studies.count_finished(after) == 3


def _reports(root: Path) -> int:
    """Intermediate values recorded so far (read-only, as ``_states``)."""
    db = root / "studies" / "pcam.db"
    if not db.is_file():
        return 0
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as c:
            return c.execute("SELECT COUNT(*) FROM trial_intermediate_values").fetchone()[0]
    except sqlite3.Error:  # schema not there yet
        return 0


def test_search_json_prints_the_outcome_alone_on_stdout(_kaggle_master, tmp_path, capsys):
    assert main(_args(tmp_path, _kaggle_master, 2, "--json")) == 0
    summary = json.loads(capsys.readouterr().out.strip())
    best = studies.best_trial(_load(tmp_path))
    assert summary["exit_code"] == 0 and summary["best_trial"] == best.number
    assert summary["value"] == best.value and summary["params"] == best.params
    assert summary["storage"].startswith("sqlite:///")
