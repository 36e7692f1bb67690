"""The Ray instance: start a private one (or join a cluster), check it can run our trials
(reachable, the private internals we rely on, the same data on every node), shut it down."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from pathlib import Path

import optuna
import ray
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from search.training.engine import PoolImages, TrainData
from search.tuning.ray_adapter.trial import METRIC, TIME_ATTR

NODE_CHECK_S = 120  # check_data_on_nodes: a node whose worker has not answered by then fails


def init_ray(
    address: str | None, num_cpus: int | None, num_gpus: int | None, verbose: bool
) -> dict:
    """Start a private Ray instance, or join the cluster at ``address``.

    Returns the cluster's resources ({"CPU": n, "GPU": m, ...}).
    """
    # Before ray.init: no per-trial CSV/JSON/TensorBoard writers (we log to Optuna). Pending
    # trials (RUNNING in the study before they run) are bounded by max_concurrent_trials; a
    # TUNE_MAX_PENDING_TRIALS_PG of 1 was measured to serialise trials on a 2-node cluster.
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "0")
    if not verbose:
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the old reporter honours verbose=0
    kwargs: dict = dict(
        include_dashboard=False,
        log_to_driver=verbose,
        logging_level=logging.INFO if verbose else logging.ERROR,
        ignore_reinit_error=True,
    )
    # As in Ray's own scripts, RAY_ADDRESS joins a cluster too. Without either, "local" starts
    # a private instance: plain ray.init() would silently join any `ray start` cluster running
    # on this machine (and then refuse num_cpus).
    address = address or os.environ.get("RAY_ADDRESS")
    # the project's settings (PCAM_AMP, ...) reach every worker, on every node: a cluster's
    # workers are started by its raylets, not from this process's environment
    forwarded = worker_env(os.environ)
    if forwarded:
        kwargs["runtime_env"] = {"env_vars": forwarded}
    if address:
        check_reachable(address)
    try:
        if address:
            ray.init(address=address, **kwargs)
        else:
            # a loaded machine must not declare its own node dead: the GCS marks a raylet
            # dead after health_check_failure_threshold missed checks (Ray's default: 5 x 3 s
            # periods; seen on 2 cores beside two heavy jobs). Here ~5 minutes of silence.
            kwargs["_system_config"] = LOCAL_HEALTH_CHECK
            ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, **kwargs)
    except Exception as e:  # noqa: BLE001 - whatever Ray raised: said in one line, with hints
        raise RayStartError(_start_failure(e, address)) from e
    return ray.cluster_resources()


LOCAL_HEALTH_CHECK = {
    "health_check_period_ms": 10_000,
    "health_check_timeout_ms": 30_000,
    "health_check_failure_threshold": 30,
}


class RayStartError(RuntimeError):
    """Ray did not start (or join): the one-line reason and what to try."""


def _start_failure(e: Exception, address: str | None) -> str:
    """What failed when Ray did not start, and what to try."""
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
    where = f"joining the Ray cluster at {address}" if address else "starting a private Ray"
    hints = []
    home = Path.home()
    if not os.access(home, os.W_OK):
        hints.append(
            f"HOME ({home}) cannot be written and Ray keeps its token in ~/.ray: set HOME to "
            "a writable folder, or RAY_AUTH_TOKEN_PATH to a writable file"
        )
    tmp = Path(os.environ.get("RAY_TMPDIR", "/tmp"))
    if not os.access(tmp, os.W_OK):
        hints.append(f"{tmp} cannot be written: set RAY_TMPDIR to a writable folder")
    hints.append("`ray stop --force` ends a stale Ray instance of this user")
    return f"{where} failed ({type(e).__name__}: {first}); " + "; ".join(hints)


class InternalsChanged(RuntimeError):
    """A private attribute of Ray Tune or Optuna the adapter needs is gone (an upgrade)."""


def check_internals() -> None:
    """``InternalsChanged`` naming the attribute when a private one the project needs is
    missing. No public API gives them: the searcher's trial map and study (``_ot_trials``,
    ``_ot_study``, ``_completed_trials``: the study is recorded truthfully through them),
    ASHA's ``_max_t`` (a STOP below it is PRUNED) and ``_trial_info`` (a promoted trial of
    the growing top rung leaves it unrecorded), and Optuna's storage handle (study system
    attrs, closing a dead driver's trials). Checked before every search, so a Ray or Optuna
    release that renames one fails at once instead of recording a wrong study."""
    study = optuna.create_study(storage=optuna.storages.InMemoryStorage())
    study.enqueue_trial({})
    trial = study.trials[0]
    objects = {
        "ray.tune.search.optuna.OptunaSearch": (
            OptunaSearch(metric=METRIC, mode="max"),
            ("_ot_trials", "_ot_study", "_completed_trials"),
        ),
        "ray.tune.schedulers.ASHAScheduler": (
            ASHAScheduler(time_attr=TIME_ATTR, metric=METRIC, mode="max", max_t=3),
            ("_max_t", "_trial_info"),
        ),
        "optuna.study.Study": (study, ("_storage", "_study_id")),
        "optuna.trial.FrozenTrial": (trial, ("_trial_id",)),
    }
    for name, (obj, attrs) in objects.items():
        for attr in attrs:
            if not hasattr(obj, attr):
                raise InternalsChanged(
                    f"{name}.{attr} is gone (ray {ray.__version__}, optuna {optuna.__version__})"
                    ": this pcam-search needs the versions pyproject.toml names"
                )


CONNECT_TIMEOUT_S = 10.0  # a cluster address that does not answer by then is an error


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """A ``ConnectionError`` naming ``address`` when nothing listens there: ``ray.init`` would
    retry a dead GCS address for minutes. ``auto`` (Ray finds the local cluster) is left to
    Ray."""
    if address in ("auto", "local"):
        return
    host_port = address.removeprefix("ray://").rsplit("/", 1)[0]
    host, sep, port = host_port.rpartition(":")
    if not sep or not port.isdigit():
        raise ConnectionError(f"--address {address!r}: expected HOST:PORT (or ray://HOST:PORT)")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        why = e.strerror or type(e).__name__
        raise ConnectionError(
            f"no Ray cluster answers at {address} ({why} within {timeout:.0f} s): start one "
            "there with `ray start --head`, or leave --address out for a private Ray"
        ) from None


ENV_PREFIX = "PCAM_"  # environment variables of the project, forwarded to Ray's workers


def worker_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The driver's ``PCAM_*`` settings, for every trial's worker."""
    return {k: v for k, v in environ.items() if k.startswith(ENV_PREFIX)}


def _probe(pool: PoolImages) -> tuple[str, str]:
    """(host, the pool file's signature there, or the error that reading it gave)."""
    try:
        return socket.gethostname(), pool.signature()
    except Exception as e:  # noqa: BLE001 - any failure is the answer: the node cannot read
        return socket.gethostname(), f"error: {e}"


def check_data_on_nodes(data: TrainData, want: str | None = None) -> list[str]:
    """Problems (one line per node) where a node that may run trials cannot read the data.

    Trials map the cache's ``images.npy`` at the driver's path (``PoolImages``), so every node
    needs the same file there (a shared --cache-dir, or the cache built on each node from the
    same source). One tiny task per alive node with CPUs reads its size and ends; a missing file
    or other bytes than the driver's is a problem. In-RAM data (not a cache) goes through the
    object store and needs no check, nor does a one-node instance (the driver's machine).
    ``want``: the signature to match (default: the driver's file's).
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if not isinstance(data.images, PoolImages):
        return []
    pool = PoolImages(data.images.path, data.images.rows[:0])
    want = want or pool.signature()
    probe = ray.remote(num_cpus=0)(_probe)
    alive = [n for n in ray.nodes() if n["Alive"]]
    if len(alive) < 2:  # the driver's own machine: it just read the file
        return []
    nodes = [n for n in alive if n["Resources"].get("CPU", 0) > 0]
    refs = [
        probe.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
        ).remote(pool)
        for n in nodes
    ]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=NODE_CHECK_S)
    problems = []
    for node, ref in zip(nodes, refs, strict=True):
        where = f"node {node['NodeID'][:12]} ({node['NodeManagerAddress']})"
        if ref not in ready:
            problems.append(f"{where}: did not answer within {NODE_CHECK_S} s")
            continue
        host, got = ray.get(ref)
        where = f"node {node['NodeID'][:12]} ({host}, {node['NodeManagerAddress']})"
        if got.startswith("error: "):
            problems.append(f"{where}: {got[7:]}")
        elif got != want:
            problems.append(
                f"{where}: {pool.path} holds other data than the driver's (size or bytes "
                "differ); build the cache there from the same source, or share the folder"
            )
    return problems


def cluster_resources() -> dict:
    """Resources of the Ray instance joined by ``init_ray`` ({"CPU": n, "GPU": m, ...})."""
    return ray.cluster_resources()


def shutdown_ray() -> None:
    ray.shutdown()


def dead_local_processes() -> list[str]:
    """Ray's own processes this driver started (a private Ray: raylet, GCS) that have died;
    empty when all live or when the driver joined a cluster (it started none). A dead raylet
    is otherwise noticed only after the GCS health check gives up (minutes, see
    ``LOCAL_HEALTH_CHECK``), while Tune waits for a node that will not come back."""
    node = getattr(ray._private.worker, "_global_node", None)
    if node is None:
        return []
    return sorted({kind for kind, _ in node.dead_processes() if kind in ("raylet", "gcs_server")})
