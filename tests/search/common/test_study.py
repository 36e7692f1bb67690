import os
import socket
import sqlite3
import subprocess
import sys

import optuna
import pytest
from optuna.trial import TrialState

from search.common import study as studies
from search.common.attrs import (
    DRIVER,
    ERROR_MESSAGE,
    ERROR_TYPE,
    INTERRUPTED,
    PROMOTED_FROM,
    RETRY_OF,
    TRIAL_EPOCHS,
)


def _sqlite(tmp_path):
    return studies.sqlite_url(tmp_path / "s.db")


def test_safe_url_hides_password():
    assert studies.safe_url("postgresql://bob:s3cret@db.example/x") == (
        "postgresql://bob:***@db.example/x"
    )
    assert studies.safe_url("sqlite:///studies/pcam.db") == "sqlite:///studies/pcam.db"


def test_make_storage_sqlite_uses_wal(tmp_path):
    studies.make_storage(_sqlite(tmp_path))
    mode = sqlite3.connect(tmp_path / "s.db").execute("PRAGMA journal_mode").fetchone()[0]
    # WAL is what lets a dashboard read while the search writes
    assert mode == "wal"


def test_make_storage_unreachable_server_is_clear_and_hides_password():
    with pytest.raises(studies.StorageError) as e:
        studies.make_storage("postgresql://bob:s3cret@127.0.0.1:1/x")
    assert "s3cret" not in str(e.value)
    assert "127.0.0.1:1" in str(e.value)


def _study_with_running(tmp_path, driver):
    st = optuna.create_study(
        storage=studies.make_storage(_sqlite(tmp_path)), study_name="z", direction="maximize"
    )
    t = st.ask()
    t.set_user_attr(DRIVER, driver)
    done = st.ask()
    st.tell(done, 0.7)
    return st


def test_fail_zombies_marks_dead_drivers_trials_fail(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead_pid = int(proc.stdout)  # a process that has exited
    st = _study_with_running(tmp_path, {"host": socket.gethostname(), "pid": dead_pid})
    assert studies.fail_zombies(st) == [0]
    t0 = st.trials[0]
    assert t0.state == TrialState.FAIL and t0.user_attrs[INTERRUPTED] is True
    # interrupted trials do not count toward --trials; the COMPLETE one does
    assert studies.count_finished(st) == 1


def test_fail_zombies_refuses_while_driver_alive(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        st = _study_with_running(tmp_path, {"host": socket.gethostname(), "pid": live.pid})
        with pytest.raises(studies.StudyBusyError, match=str(live.pid)):
            studies.fail_zombies(st)
        assert st.trials[0].state == TrialState.RUNNING
    finally:
        live.kill()
        live.wait()


def test_fail_zombies_ignores_own_process(tmp_path):
    st = _study_with_running(tmp_path, {"host": socket.gethostname(), "pid": os.getpid()})
    # stamped with this very pid: left by an earlier search in this process (a notebook, a
    # test), so stale: failed, not refused
    assert studies.fail_zombies(st) == [0]


def test_best_trial_ignores_pruned(tmp_path):
    st = optuna.create_study(storage=studies.make_storage(_sqlite(tmp_path)), direction="maximize")
    t = st.ask()
    t.report(0.99, 1)
    st.tell(t, state=TrialState.PRUNED)  # PRUNED keeps its last value 0.99
    st.tell(st.ask(), 0.8)
    assert studies.best_trial(st).value == 0.8


@pytest.mark.parametrize("name", ["../../x", "a/b", ".hidden", "-x", "", "x" * 101, "a b"])
def test_check_study_name_refuses_paths_and_odd_names(name):
    with pytest.raises(ValueError, match="not allowed"):
        studies.check_study_name(name)


def test_check_study_name_accepts_plain_names():
    for name in ("pcam", "resnets-2026.11", "A_1"):
        assert studies.check_study_name(name) == name


def test_search_refit_and_report_refuse_a_path_as_study_name(tmp_path, capsys):
    from search.commands.refit import refit_main
    from search.commands.search_args import main as search_main
    from search.report import main as report_main

    common = ["--studies-dir", str(tmp_path / "studies"), "--study", "../../x"]
    assert search_main(["--trials", "1", *common]) == 2
    assert refit_main(["--best", *common]) == 2
    assert report_main(common) == 2
    assert "not allowed" in capsys.readouterr().err
    assert not (tmp_path / "studies").exists() and not (tmp_path.parent / "x").exists()


def test_make_storage_file_that_is_not_a_database_is_named(tmp_path):
    junk = tmp_path / "notes.db"
    junk.write_text("not a database\n" * 100)
    with pytest.raises(studies.StorageError, match=str(junk)):
        studies.make_storage(studies.sqlite_url(junk))
    assert junk.read_text().startswith("not a database")


def test_make_storage_leaves_an_unrelated_sqlite_database_untouched(tmp_path):
    other = tmp_path / "app.db"
    con = sqlite3.connect(other)
    con.execute("CREATE TABLE users (id INTEGER)")
    con.commit()
    con.close()
    before = other.read_bytes()
    with pytest.raises(studies.StorageError, match="without Optuna's tables"):
        studies.make_storage(studies.sqlite_url(other))
    assert other.read_bytes() == before  # no Optuna tables, still not WAL
    assert not (tmp_path / "app.db-wal").exists()


def test_search_checks_the_storage_before_starting_ray(tmp_path, monkeypatch, capsys):
    from search.commands.search_args import main
    from search.tuning import ray_adapter

    def no_ray(*a, **k):
        raise AssertionError("Ray started before the storage was checked")

    monkeypatch.setattr(ray_adapter, "init_ray", no_ray)
    junk = tmp_path / "x.db"
    junk.write_bytes(b"\x00garbage" * 64)
    assert main(["--storage", studies.sqlite_url(junk), "--trials", "1"]) == 2
    assert str(junk) in capsys.readouterr().err


def _interrupted(study: optuna.Study) -> int:
    t = study.ask({"lr": optuna.distributions.FloatDistribution(1e-4, 1.0, log=True)})
    t.set_user_attr(INTERRUPTED, True)
    study.tell(t, state=TrialState.FAIL)
    return t.number


def test_requeue_interrupted_queues_each_interrupted_trial_once():
    study = optuna.create_study(direction="maximize")
    a = study.ask({"lr": optuna.distributions.FloatDistribution(1e-4, 1.0, log=True)})
    study.tell(a, state=TrialState.FAIL)  # the params' own failure: never re-run
    first = _interrupted(study)
    assert studies.requeue_interrupted(study) == [first]
    assert studies.requeue_interrupted(study) == []  # once each, even before it runs
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert len(waiting) == 1 and waiting[0].user_attrs[RETRY_OF] == first
    again = study.ask()  # the queued trial comes first, with the interrupted one's params
    assert again.suggest_float("lr", 1e-4, 1.0, log=True) == study.trials[first].params["lr"]


def test_requeue_interrupted_keeps_a_promoted_trials_length():
    study = optuna.create_study(direction="maximize")
    t = study.ask({"lr": optuna.distributions.FloatDistribution(1e-4, 1.0, log=True)})
    for key, v in ((INTERRUPTED, True), (TRIAL_EPOCHS, 24), (PROMOTED_FROM, 7)):
        t.set_user_attr(key, v)
    study.tell(t, state=TrialState.FAIL)
    number = t.number
    assert studies.requeue_interrupted(study) == [number]
    (retry,) = study.get_trials(states=(TrialState.WAITING,))
    assert retry.user_attrs == {RETRY_OF: number, TRIAL_EPOCHS: 24, PROMOTED_FROM: 7}


def test_failures_name_the_commonest_error_and_ignore_interrupted():
    study = optuna.create_study(direction="maximize")
    for kind in ("TrialDiverged", "TrialDiverged", "ValueError"):
        t = study.ask()
        t.set_user_attr(ERROR_TYPE, kind)
        t.set_user_attr(ERROR_MESSAGE, f"{kind} happened\nsecond line")
        study.tell(t, state=TrialState.FAIL)
    _interrupted(study)
    f = studies.failures(study)
    assert (f.total, f.error_type, f.count) == (3, "TrialDiverged", 2)
    assert f.example == "TrialDiverged happened"


@pytest.mark.parametrize("command", ["pcam-report", "pcam-refit"])
def test_reading_commands_do_not_create_an_empty_study_database(tmp_path, capsys, command):
    from search.commands.refit import refit_main
    from search.report import main as report_main

    where = ["--studies-dir", str(tmp_path / "studies")]
    rc = report_main(where) if command == "pcam-report" else refit_main(["--best", *where])
    assert rc == 2
    db = tmp_path / "studies" / "pcam.db"
    assert f"no study database at {db}" in capsys.readouterr().err
    assert not db.exists()
