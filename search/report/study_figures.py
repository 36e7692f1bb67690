"""The study's figures: history, states over time, compute per state, curves, losses,
parameters (importances, parallel coordinates, slices, contour), architectures. Each takes
the study and returns a plotly figure, or a sentence saying why there is none yet."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import optuna
import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
from optuna.trial import FrozenTrial, TrialState
from plotly.subplots import make_subplots

from search.common import study as studies
from search.common.attrs import (
    AUC_FOLDS,
    EPOCHS_RUN,
    FOLD_EPOCHS,
    INTERMEDIATE_FOLDS,
    LOSS_CURVE,
    SECONDS,
    SPACE,
    get_record,
)

STATE_COLOURS = {
    "COMPLETE": "#2ca02c",
    "PRUNED": "#ff7f0e",
    "FAIL": "#d62728",
    "RUNNING": "#1f77b4",
    "WAITING": "#7f7f7f",
}


def all_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(deepcopy=False)


def valued_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """COMPLETE and PRUNED trials with a value (a PRUNED one's is its last mean AUC)."""
    states = (TrialState.COMPLETE, TrialState.PRUNED)
    return [t for t in study.get_trials(deepcopy=False, states=states) if t.value is not None]


def fig_history(study: optuna.Study) -> go.Figure | str:
    """Optuna's history of COMPLETE trials, plus the PRUNED ones at their last mean AUC
    (Optuna's plot leaves them out: a study of mostly pruned trials looked nearly empty)."""
    if not studies.best_trial(study):
        return "No COMPLETE trial yet: nothing to plot as a best-so-far line."
    fig = optuna.visualization.plot_optimization_history(study, target_name="mean fold AUC")
    pruned = [t for t in valued_trials(study) if t.state == TrialState.PRUNED]
    if pruned:
        fig.add_scatter(
            x=[t.number for t in pruned],
            y=[t.value for t in pruned],
            mode="markers",
            marker={"color": STATE_COLOURS["PRUNED"], "symbol": "x", "size": 6},
            name="PRUNED (last mean AUC)",
        )
    return fig


def fig_timeline(study: optuna.Study) -> go.Figure | str:
    if not all_trials(study):
        return "The study has no trials."
    return optuna.visualization.plot_timeline(study)


def fig_compute_per_state(study: optuna.Study) -> go.Figure | str:
    """Trial-seconds and fold-epochs by final state: what ASHA saved shows as cheap PRUNED
    bars (studies from before fold racing count epochs)."""
    rows = [
        (
            t.state.name,
            float(t.user_attrs.get(SECONDS, 0.0)),
            int(t.user_attrs.get(FOLD_EPOCHS, t.user_attrs.get(EPOCHS_RUN, 0))),
        )
        for t in all_trials(study)
    ]
    if not rows:
        return "The study has no trials."
    df = pd.DataFrame(rows, columns=["state", "seconds", "epochs"])
    g = (
        df.groupby("state")
        .agg(trials=("state", "size"), seconds=("seconds", "sum"), epochs=("epochs", "sum"))
        .reset_index()
    )
    fig = go.Figure()
    fig.add_bar(
        x=g["state"],
        y=g["seconds"],
        name="trial-seconds",
        marker_color=[STATE_COLOURS.get(s, "#999") for s in g["state"]],
        text=[
            f"{n} trials, {e} fold-epochs" for n, e in zip(g["trials"], g["epochs"], strict=True)
        ],
    )
    fig.update_layout(yaxis_title="training seconds (summed over trials)", showlegend=False)
    return fig


def fig_intermediate(study: optuna.Study) -> go.Figure | str:
    """Every trial's mean fold AUC per report, against fold-epochs trained (racing: fold 0
    alone at 1, then the folds catch up, then k per epoch), coloured by its final state."""
    fig = go.Figure()
    shown: set[str] = set()
    for t in all_trials(study):
        if not t.intermediate_values:
            continue
        steps = sorted(t.intermediate_values)
        folds = t.user_attrs.get(INTERMEDIATE_FOLDS, {})
        s = t.state.name
        fig.add_scatter(
            x=steps,
            y=[t.intermediate_values[k] for k in steps],
            mode="lines+markers",
            line={"color": STATE_COLOURS.get(s, "#999"), "width": 1},
            marker={"size": 4},
            name=s,
            legendgroup=s,
            showlegend=s not in shown,
            hovertext=[
                f"trial {t.number} ({s}): mean of {folds.get(str(k), '?')} fold(s)" for k in steps
            ],
            opacity=0.7,
        )
        shown.add(s)
    if not shown:
        return "No trial reported an epoch yet."
    fig.update_layout(
        xaxis_title="fold-epochs trained", yaxis_title="mean held-out AUC of the folds so far"
    )
    _integer_axis(fig, max(max(t.intermediate_values, default=1) for t in all_trials(study)))
    return fig


def _integer_axis(fig: go.Figure, top: int) -> None:
    """Whole-number ticks on x (fold-epochs are counts: no 1.2, 1.4 ...), about 12 of them."""
    fig.update_xaxes(tickformat="d", tick0=0, dtick=max(1, math.ceil(top / 12)))


def fig_losses(study: optuna.Study) -> go.Figure | str:
    """Mean train (dashed) and held-out (solid) loss per fold-epochs of the best 10 trials by
    value (COMPLETE and PRUNED): over- or under-fitting shows as the two curves part."""
    got = [t for t in valued_trials(study) if t.user_attrs.get(LOSS_CURVE)]
    if not got:
        return "No trial recorded loss curves (studies from before this report version)."
    fig = go.Figure()
    top = 1
    for i, t in enumerate(sorted(got, key=studies.value_of, reverse=True)[:10]):
        curve = t.user_attrs[LOSS_CURVE]
        steps = sorted(int(k) for k in curve)
        top = max(top, steps[-1])
        colour = pio.templates["plotly"].layout.colorway[i % 10]
        for j, (name, dash) in enumerate((("train", "dash"), ("held-out", "solid"))):
            fig.add_scatter(
                x=steps,
                y=[curve[str(k)][j] for k in steps],
                mode="lines+markers",
                line={"color": colour, "dash": dash, "width": 1},
                marker={"size": 4},
                name=f"trial {t.number} {name} ({t.state.name.lower()})",
            )
    fig.update_layout(xaxis_title="fold-epochs trained", yaxis_title="mean loss (BCE)")
    _integer_axis(fig, top)
    return fig


def needs_complete(
    n: int, make: Callable[[optuna.Study], go.Figure]
) -> Callable[[optuna.Study], object]:
    def draw(study: optuna.Study) -> go.Figure | str:
        done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if len(done) < n:
            return f"Needs at least {n} COMPLETE trials (the study has {len(done)})."
        return make(study)

    return draw


def fig_contour(study: optuna.Study) -> go.Figure | str:
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    names = {k for t in done for k in t.params}
    if not {"lr", "batch_size"} <= names:
        return "lr and batch_size are not both searched in this study."
    if len(done) < 3:
        return f"Needs at least 3 COMPLETE trials (the study has {len(done)})."
    return optuna.visualization.plot_contour(study, params=["lr", "batch_size"])


def fig_architectures(study: optuna.Study) -> go.Figure | str:
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    fixed = get_record(study, SPACE, {}).get("fixed", {})
    archs = {t.params.get("arch", fixed.get("arch", "?")) for t in done}
    if len(archs) < 2:
        return f"Only one architecture was searched ({', '.join(sorted(archs)) or 'none'})."
    fig = go.Figure()
    for a in sorted(archs):
        vals = [t.value for t in done if t.params.get("arch", fixed.get("arch")) == a]
        fig.add_box(y=vals, name=a, boxpoints="all")
    fig.update_layout(yaxis_title="mean fold AUC (COMPLETE trials)")
    res = [t for t in done if "unfreeze" in t.params]
    if res:
        fig.add_scatter(
            x=[f"unfreeze={t.params['unfreeze']}" for t in res],
            y=[t.value for t in res],
            mode="markers",
            name="ResNets by unfrozen stages",
        )
    return fig


def fig_fold_spread(study: optuna.Study) -> go.Figure | str:
    """Each COMPLETE trial's held-out AUC per fold (best 20 by mean): how much of a gap
    between two trials is fold noise."""
    done = [t for t in all_trials(study) if t.state == TrialState.COMPLETE]
    done = [t for t in done if t.user_attrs.get(AUC_FOLDS)]
    if not done:
        return "No COMPLETE trial with per-fold AUCs yet."
    fig = go.Figure()
    for t in sorted(done, key=studies.value_of, reverse=True)[:20]:
        fig.add_box(
            y=t.user_attrs[AUC_FOLDS],
            name=f"#{t.number}",
            boxpoints="all",
            jitter=0.3,
            showlegend=False,
        )
    fig.update_layout(xaxis_title="trial (best mean first)", yaxis_title="held-out AUC per fold")
    return fig


def _param_columns(trials: list[FrozenTrial]) -> list[tuple[str, list, bool]]:
    """(name, values per trial (None where not asked), log scale) for every param."""
    names = sorted({k for t in trials for k in t.params})
    out = []
    for n in names:
        dist = next(t.distributions[n] for t in trials if n in t.distributions)
        out.append((n, [t.params.get(n) for t in trials], bool(getattr(dist, "log", False))))
    return out


def _numeric(values: list) -> bool:
    return all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in values if v is not None
    )


def fig_parallel(study: optuna.Study) -> go.Figure | str:
    """Parallel coordinates of COMPLETE *and* PRUNED trials (Optuna's own plot shows only
    COMPLETE ones), a state axis first, coloured by mean fold AUC (a PRUNED trial's: its last
    one). A param a trial was not asked (conditional) sits at "n/a" below its axis."""
    trials = valued_trials(study)
    if len(trials) < 2:
        return f"Needs at least 2 COMPLETE or PRUNED trials (the study has {len(trials)})."
    dims: list[dict[str, object]] = [
        {
            "label": "state",
            "values": [1 if t.state == TrialState.COMPLETE else 0 for t in trials],
            "tickvals": [0, 1],
            "ticktext": ["PRUNED", "COMPLETE"],
        }
    ]
    for name, vals, log in _param_columns(trials):
        if _numeric(vals):
            xs = [
                None if v is None else (math.log10(v) if log and v > 0 else float(v)) for v in vals
            ]
            known = [x for x in xs if x is not None]
            lo, hi = min(known), max(known)
            na = lo - 0.1 * (hi - lo or 1.0)
            d: dict[str, object] = {
                "label": f"log10 {name}" if log else name,
                "values": [na if x is None else x for x in xs],
            }
            if any(x is None for x in xs):
                ticks = list(np.linspace(lo, hi, 4))
                d.update(tickvals=[na, *ticks], ticktext=["n/a", *(f"{x:.3g}" for x in ticks)])
        else:
            cats = sorted({str(v) for v in vals if v is not None})
            cats = (["n/a"] if any(v is None for v in vals) else []) + cats
            d = {
                "label": name,
                "values": [cats.index("n/a" if v is None else str(v)) for v in vals],
                "tickvals": list(range(len(cats))),
                "ticktext": cats,
            }
        dims.append(d)
    values = [t.value for t in trials]
    dims.append({"label": "mean fold AUC", "values": values})
    fig = go.Figure(
        go.Parcoords(
            line={"color": values, "colorscale": "Viridis", "showscale": True},
            dimensions=dims,
        )
    )
    return fig


def fig_slices(study: optuna.Study) -> go.Figure | str:
    """Mean fold AUC against each param, one panel per param in rows of 3 (Optuna's slice
    plot is one row 300 px per param: 3,000 px for the CPU space), PRUNED trials included."""
    trials = valued_trials(study)
    if not trials:
        return "No COMPLETE or PRUNED trial yet."
    cols = _param_columns(trials)
    if not cols:
        return "No searched params."
    ncol = min(3, len(cols))
    nrow = math.ceil(len(cols) / ncol)
    fig = make_subplots(rows=nrow, cols=ncol, subplot_titles=[c[0] for c in cols])
    for i, (_, vals, log) in enumerate(cols):
        r, c = i // ncol + 1, i % ncol + 1
        for state in ("COMPLETE", "PRUNED"):
            pts = [
                (v, t)
                for v, t in zip(vals, trials, strict=True)
                if v is not None and t.state.name == state
            ]
            fig.add_scatter(
                x=[v if _numeric(vals) else str(v) for v, _ in pts],
                y=[t.value for _, t in pts],
                mode="markers",
                marker={"color": STATE_COLOURS[state], "size": 5, "opacity": 0.7},
                name=state,
                legendgroup=state,
                showlegend=i == 0,
                hovertext=[f"trial {t.number}" for _, t in pts],
                row=r,
                col=c,
            )
        if log and _numeric(vals):
            fig.update_xaxes(type="log", row=r, col=c)
    fig.update_layout(height=max(420, 260 * nrow), yaxis_title="mean fold AUC")
    return fig
