"""The Optuna side of a search: storage, the study, resume bookkeeping. No Ray here.

Only the driver process writes the study (Ray Tune keeps the searcher in the driver), which is
the shape SQLite handles; WAL journaling plus a long busy timeout lets optuna-dashboard or any
other reader open the live file without "database is locked" killing the search.
"""

from __future__ import annotations

import os
import re
import socket
import sqlite3
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import optuna
import sqlalchemy.exc
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.engine import make_url

from data_pipeline.cache import pid_alive
from search.common.attrs import (
    DRIVER,
    ERROR_MESSAGE,
    ERROR_TYPE,
    FAIL_REASON,
    INTERRUPTED,
    PROMOTED_FROM,
    RETRY_OF,
    TRIAL_EPOCHS,
)

SQLITE_TIMEOUT_S = 60  # seconds a writer waits for a lock before "database is locked"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


STUDY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")  # also a folder name: no paths


def check_study_name(name: str) -> str:
    """``name`` if it is a safe study name (it names the folder studies/<name>), else a
    ValueError naming it: letters, digits, '.', '_', '-', not starting with '.' or '-'."""
    if not STUDY_NAME.fullmatch(name):
        raise ValueError(
            f"study name {name!r} is not allowed: use up to 100 letters, digits, '.', '_' or "
            "'-', starting with a letter or digit (it names the folder studies/<name>)"
        )
    return name


def safe_url(url: str) -> str:
    """The storage URL with any password replaced by ``***``: the only form we print or save."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy parses: print nothing secret-looking
        return url.split("@")[-1] if "@" in url else url


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{Path(path).resolve()}"


DB_FILE = "pcam.db"  # the default SQLite file in the studies folder


def default_storage_url(storage: str, studies_dir: Path) -> str:
    """``storage`` if given, else the SQLite file ``<studies_dir>/pcam.db`` (every CLI)."""
    return storage or sqlite_url(Path(studies_dir) / DB_FILE)


OPTUNA_TABLE = "studies"  # a table every Optuna RDB schema has


def _enable_wal(url: str) -> None:
    """Check a SQLite file is a study database (or new), then switch it to WAL (a property of
    the file: set once, kept by every opener). WAL lets readers (the dashboard) read while the
    search writes and vice versa. Any failure is a ``StorageError`` naming the file."""
    db = make_url(url).database
    if not db or db == ":memory:":
        return
    path = Path(db)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        con = sqlite3.connect(db, timeout=SQLITE_TIMEOUT_S)
        try:
            rows = con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            tables = {r[0] for r in rows}
            if tables and OPTUNA_TABLE not in tables:
                raise StorageError(
                    f"{path}: a SQLite database without Optuna's tables (it has "
                    f"{sorted(tables)[:5]}): not a study database; use another --storage or "
                    "--studies-dir (it was left untouched)"
                )
            con.execute("PRAGMA journal_mode=WAL")
        finally:
            con.close()
    except (OSError, sqlite3.Error) as e:
        hint = " (is the folder read-only?)" if "readonly" in str(e) or "open" in str(e) else ""
        raise StorageError(f"cannot open study storage {path}: {e}{hint}") from None


def writable_root(path: Path) -> Path | None:
    """The nearest existing folder at or above ``path`` if nothing can be written there (a
    read-only mount or folder), else None. (``os.access`` sees read-only mounts even as root.)"""
    here = Path(path).resolve()
    while not here.exists() and here != here.parent:
        here = here.parent
    return None if os.access(here, os.W_OK) else here


def check_writable(path: Path, what: str) -> None:
    """A ``StorageError`` naming the read-only folder when ``path`` (a folder, existing or
    not) cannot be written: said before any work, never a traceback half-way."""
    ro = writable_root(path)
    if ro is not None:
        raise StorageError(
            f"{ro} is read-only: {what} writes to {path}; use a writable folder "
            "(--studies-dir, --out) or --storage"
        )


def _read_only_sqlite(url: str) -> str | None:
    """For an existing SQLite file in a folder nothing can be written to: the URL that opens
    it read-only and immutable (WAL needs a writable folder for its -shm file even to read;
    nothing can change the file there, so immutable is true). None otherwise."""
    db = make_url(url).database
    if not db or db == ":memory:" or not Path(db).is_file():
        return None
    if writable_root(Path(db).parent) is None:
        return None
    return f"sqlite:///file:{Path(db).resolve()}?mode=ro&immutable=1&uri=true"


def make_storage(url: str) -> optuna.storages.RDBStorage:
    """An RDB storage for ``sqlite:///...`` or ``postgresql://...`` (any SQLAlchemy URL). An
    existing SQLite study in a read-only folder opens read-only (reports, refits that write
    elsewhere); writing to it then fails naming the file.

    Errors name the URL without its password.
    """
    kwargs: dict = {}
    ro = _read_only_sqlite(url) if url.startswith("sqlite") else None
    if ro:
        url = ro
    elif url.startswith("sqlite"):
        _enable_wal(url)
        kwargs = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}}
    else:
        kwargs = {"pool_pre_ping": True}
    for attempt in range(4):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
        except sqlalchemy.exc.IntegrityError as e:
            # two processes creating the schema of a new database at once (a search and a
            # dashboard): the other one won; open what it made
            err: Exception = e
            time.sleep(0.5 * (attempt + 1))
        except Exception as e:
            err = e
            break
    raise StorageError(f"cannot open study storage {safe_url(url)}: {_clean(err, url)}")


def check_storage(url: str, write: bool = False) -> None:
    """Open an existing storage to fail fast on a bad URL or file (a ``StorageError``); a
    SQLite file that does not exist yet is left uncreated (nothing is written before the run's
    other checks pass). ``write``: the SQLite file's folder must be writable too (a search)."""
    if url.startswith("sqlite"):
        db = make_url(url).database
        if write and db and db != ":memory:":
            check_writable(Path(db).parent, "the study database")
        if not db or db == ":memory:" or not Path(db).exists():
            return
    make_storage(url)


def open_existing(url: str) -> optuna.storages.RDBStorage:
    """The storage of commands that only read a study (refit, report): a SQLite file that is
    not there is a ``StorageError`` naming it, not a new empty database."""
    if url.startswith("sqlite"):
        db = make_url(url).database
        if db and db != ":memory:" and not Path(db).is_file():
            raise StorageError(
                f"no study database at {db}: run pcam-search first, or point --studies-dir "
                "or --storage at the search's"
            )
    return make_storage(url)


def _clean(e: Exception, url: str) -> str:
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    pw = make_url(url).password if "://" in url else None
    return msg.replace(str(pw), "***") if pw else msg


class StorageError(RuntimeError):
    """The storage URL cannot be opened (server down, bad path, wrong driver)."""


class StudyBusyError(RuntimeError):
    """Another live pcam-search driver on this machine is running the same study."""


def driver_id() -> dict:
    """Who runs trials now: stored on each trial so a restart can tell zombies apart."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}


def fail_zombies(study: optuna.Study) -> list[int]:
    """Mark trials left RUNNING by a driver that is gone (Ctrl-C, ``kill -9``, crash) as FAIL.

    A RUNNING trial whose driver still lives on this host means a second search on the same
    study: that is refused (``StudyBusyError``) rather than corrupting the live one's trials.
    Returns the numbers of the trials failed.
    """
    host = socket.gethostname()
    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        drv = t.user_attrs.get(DRIVER, {})
        pid = drv.get("pid")
        if drv.get("host") == host and pid not in (None, os.getpid()) and pid_alive(int(pid)):
            raise StudyBusyError(
                f"study {study.study_name!r} is being searched by pcam-search pid "
                f"{drv['pid']} on this machine; wait for it or stop it first"
            )
        study._storage.set_trial_user_attr(t._trial_id, INTERRUPTED, True)
        study._storage.set_trial_user_attr(
            t._trial_id, FAIL_REASON, "left RUNNING by a search that was stopped or killed"
        )
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        failed.append(t.number)
    return failed


def requeue_interrupted(study: optuna.Study) -> list[int]:
    """Queue the params of every interrupted trial (deadline, Ctrl-C, a Ray failure) again,
    once each: the queued trial carries ``retry_of`` = the interrupted trial's number, so a
    second resume does not queue it twice (Optuna's ``RetryFailedTrialCallback`` is the same
    idea for trials that fail at runtime). Returns the numbers queued again."""
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get(RETRY_OF) for t in trials}
    queued = []
    for t in trials:
        if t.state != TrialState.FAIL or not t.user_attrs.get(INTERRUPTED) or not t.params:
            continue
        if t.number not in retried:
            # a promoted trial's retry keeps its length (search.tuning.ladder)
            kept = {k: t.user_attrs[k] for k in (TRIAL_EPOCHS, PROMOTED_FROM) if k in t.user_attrs}
            study.enqueue_trial(t.params, user_attrs={RETRY_OF: t.number, **kept})
            queued.append(t.number)
    return queued


@dataclass(frozen=True)
class Failures:
    """The commonest error of a study's FAIL trials (interrupted ones excluded)."""

    total: int  # FAIL trials of the params' own
    error_type: str  # the commonest ERROR_TYPE ("" when none)
    count: int  # trials it ended
    example: str  # one of their messages, shortened


def failures(study: optuna.Study) -> Failures:
    """Which error ended most of ``study``'s failed trials (see ``Failures``)."""
    failed = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
        if not t.user_attrs.get(INTERRUPTED)
    ]
    if not failed:
        return Failures(0, "", 0, "")
    counts = Counter(t.user_attrs.get(ERROR_TYPE, "unknown error") for t in failed)
    kind, n = counts.most_common(1)[0]
    example = next(
        str(t.user_attrs.get(ERROR_MESSAGE, ""))
        for t in failed
        if t.user_attrs.get(ERROR_TYPE, "unknown error") == kind
    )
    return Failures(len(failed), kind, n, example.splitlines()[0][:200] if example else "")


def count_finished(study: optuna.Study) -> int:
    """Trials that count toward ``--trials``: COMPLETE, PRUNED and FAIL, except those that
    failed only because the search itself was interrupted (they get re-run)."""
    return sum(
        1
        for t in study.get_trials(deepcopy=False, states=FINISHED)
        if not t.user_attrs.get(INTERRUPTED)
    )


def tally(study: optuna.Study) -> dict[str, int]:
    """Trial counts by state name (``COMPLETE``, ``PRUNED``, ``FAIL``, ``RUNNING``, ...)."""
    out: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        out[t.state.name] = out.get(t.state.name, 0) + 1
    return out


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    """Best COMPLETE trial (highest mean fold AUC), or None before the first one."""
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return max(done, key=value_of) if done else None


def value_of(trial: FrozenTrial) -> float:
    """A finished trial's value for ranking (-inf where it has none: never the best)."""
    return float("-inf") if trial.value is None else trial.value
