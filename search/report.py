"""``pcam-report``: one self-contained HTML page of plotly figures for a study (and its refit).

Optuna's own plots where it has them (history, timeline, importances, parallel coordinates,
slices, contour); plotly for the rest (intermediate values by state, compute per state,
architectures, the refit's ROC curves, calibration and confusion matrix). Every section
degrades to a sentence when it cannot be drawn (no refit yet, one trial, only pruned trials).
"""

from __future__ import annotations

import argparse
import html
import math
import sys
import webbrowser
from collections.abc import Callable
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
from optuna.trial import FrozenTrial, TrialState
from plotly.subplots import make_subplots
from rich.console import Console
from sklearn.metrics import confusion_matrix, roc_auc_score, roc_curve

from data_pipeline.atomic import write_text_atomic
from data_pipeline.cli_common import EXIT_BAD_INPUT
from data_pipeline.version import add_version
from search.common import study as studies
from search.common.attrs import (
    AUC_FOLDS,
    COMMAND,
    DATASET_FINGERPRINT,
    EPOCHS_RUN,
    ERROR_MESSAGE,
    ERROR_TYPE,
    FOLD_EPOCHS,
    FOLDS_FILE,
    INTERMEDIATE_FOLDS,
    LOSS_CURVE,
    REFIT,
    SECONDS,
    SPACE,
    VERSION,
    get_record,
)
from search.common.cli_args import add_study_args, print_error

STATE_COLOURS = {
    "COMPLETE": "#2ca02c",
    "PRUNED": "#ff7f0e",
    "FAIL": "#d62728",
    "RUNNING": "#1f77b4",
    "WAITING": "#7f7f7f",
}
Section = tuple[str, "go.Figure | str"]  # title, figure or a sentence saying why not


def _trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(deepcopy=False)


def _valued(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """COMPLETE and PRUNED trials with a value (a PRUNED one's is its last mean AUC)."""
    states = (TrialState.COMPLETE, TrialState.PRUNED)
    return [t for t in study.get_trials(deepcopy=False, states=states) if t.value is not None]


def fig_history(study: optuna.Study) -> go.Figure | str:
    """Optuna's history of COMPLETE trials, plus the PRUNED ones at their last mean AUC
    (Optuna's plot leaves them out: a study of mostly pruned trials looked nearly empty)."""
    if not studies.best_trial(study):
        return "No COMPLETE trial yet: nothing to plot as a best-so-far line."
    fig = optuna.visualization.plot_optimization_history(study, target_name="mean fold AUC")
    pruned = [t for t in _valued(study) if t.state == TrialState.PRUNED]
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
    if not _trials(study):
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
        for t in _trials(study)
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
    for t in _trials(study):
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
    _integer_axis(fig, max(max(t.intermediate_values, default=1) for t in _trials(study)))
    return fig


def _integer_axis(fig: go.Figure, top: int) -> None:
    """Whole-number ticks on x (fold-epochs are counts: no 1.2, 1.4 ...), about 12 of them."""
    fig.update_xaxes(tickformat="d", tick0=0, dtick=max(1, math.ceil(top / 12)))


def fig_losses(study: optuna.Study) -> go.Figure | str:
    """Mean train (dashed) and held-out (solid) loss per fold-epochs of the best 10 trials by
    value (COMPLETE and PRUNED): over- or under-fitting shows as the two curves part."""
    got = [t for t in _valued(study) if t.user_attrs.get(LOSS_CURVE)]
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


def _needs_complete(
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
    done = [t for t in _trials(study) if t.state == TrialState.COMPLETE]
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
    trials = _valued(study)
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
    trials = _valued(study)
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


_SORT_JS = (
    "function srt(th){const t=th.closest('table'),i=[...th.parentNode.children].indexOf(th),"
    "d=th.dataset.d=th.dataset.d==='a'?'d':'a',rows=[...t.tBodies[0].rows];rows.sort((a,b)=>{"
    "const x=a.cells[i].dataset.v,y=b.cells[i].dataset.v,nx=parseFloat(x),ny=parseFloat(y);"
    "const c=isNaN(nx)||isNaN(ny)?x.localeCompare(y):nx-ny;return d==='a'?c:-c});"
    "rows.forEach(r=>t.tBodies[0].appendChild(r))}"
)


def trials_table(study: optuna.Study) -> str:
    """Every trial as an HTML table: number, state, mean AUC, fold-epochs, seconds and
    params; click a header to sort by it."""
    trials = _trials(study)
    if not trials:
        return "<p class='note'>No trials yet.</p>"
    names = sorted({k for t in trials for k in t.params})
    head = ["trial", "state", "mean fold AUC", "fold-epochs", "seconds", *names]

    def cell(v: object) -> str:
        shown = f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))
        return f"<td data-v='{html.escape(str('' if v is None else v))}'>{html.escape(shown)}</td>"

    rows = []
    for t in trials:
        secs = (
            (t.datetime_complete - t.datetime_start).total_seconds()
            if t.datetime_complete and t.datetime_start
            else None
        )
        vals = [t.number, t.state.name, t.value, t.user_attrs.get(FOLD_EPOCHS), secs]
        rows.append("<tr>" + "".join(cell(v) for v in vals + [t.params.get(n) for n in names]))
    ths = "".join(f"<th onclick='srt(this)'>{html.escape(h)}</th>" for h in head)
    return (
        f"<script>{_SORT_JS}</script><table class='trials'><thead><tr>{ths}</tr></thead>"
        f"<tbody>{'</tr>'.join(rows)}</tr></tbody></table>"
    )


def _refit_label(rec: dict) -> str:
    return rec.get("label") or f"trial {rec['trial']}"


def _members_line(rec: dict) -> str:
    """Members, weights and scores of an ensemble refit (pcam-refit --ensemble)."""
    parts = []
    for m in rec["members"]:
        test = f", test {m['test_auc']:.4f}" if m.get("test_auc") is not None else ""
        parts.append(f"{m['label']} (weight {m['weight']:.2f}, OOF {m['oof_auc']:.4f}{test})")
    curve = " ".join(f"{a:.4f}" for a in rec.get("selection_curve", []))
    return (
        "; ".join(parts)
        + f". Nested estimate {rec['nested_auc']:.4f} (mean AUC of each fold, scored by a "
        f"selection made without it). Selection curve, OOF AUC by greedy step: {curve}"
    )


def _refit_record(study: optuna.Study) -> tuple[dict, pd.DataFrame] | str:
    rec = get_record(study, REFIT)
    if not rec:
        return "No refit yet: run `pcam-refit --best` to add ROC curves and calibration."
    if not rec.get("oof_csv"):
        return (
            "The refit's models were trained on every labelled patch and the search kept no "
            "fold models of its params: no out-of-fold predictions to plot."
        )
    path = Path(rec["oof_csv"])
    if not path.is_file():
        return f"The refit's out-of-fold file {path} is missing."
    return rec, pd.read_csv(path)


def fig_roc(study: optuna.Study) -> go.Figure | str:
    got = _refit_record(study)
    if isinstance(got, str):
        return got
    rec, oof = got
    fig = go.Figure()
    for f in sorted(oof["fold"].unique()):
        d = oof[oof["fold"] == f]
        if d["label"].nunique() < 2:
            continue
        fpr, tpr, _ = roc_curve(d["label"], d["prob"])
        fig.add_scatter(
            x=fpr,
            y=tpr,
            mode="lines",
            name=f"fold {f} (AUC {roc_auc_score(d['label'], d['prob']):.4f})",
            line={"width": 1},
        )
    fpr, tpr, _ = roc_curve(oof["label"], oof["prob"])
    fig.add_scatter(
        x=fpr,
        y=tpr,
        mode="lines",
        line={"width": 3, "color": "black"},
        name=f"out-of-fold (AUC {rec['oof_auc']:.4f})",
    )
    fig.add_scatter(
        x=[0, 1], y=[0, 1], mode="lines", line={"dash": "dot", "color": "#999"}, showlegend=False
    )
    title = f"{_refit_label(rec)}: OOF AUC {rec['oof_auc']:.4f}"
    if rec.get("test_auc") is not None:
        title += f", ensemble test AUC {rec['test_auc']:.4f}"
    if rec.get("validation_minus_test") is not None:
        title += f" (like for like, validation - test = {rec['validation_minus_test']:+.4f})"
    fig.update_layout(
        title=title, xaxis_title="false positive rate", yaxis_title="true positive rate"
    )
    return fig


def fig_calibration(study: optuna.Study) -> go.Figure | str:
    got = _refit_record(study)
    if isinstance(got, str):
        return got
    _, oof = got
    mean_p, frac, count = calibration_bins(oof["label"].to_numpy(), oof["prob"].to_numpy())
    fig = go.Figure()
    fig.add_histogram(
        x=oof["prob"], nbinsx=50, name="predictions", yaxis="y2", marker_color="#ccc", opacity=0.6
    )
    fig.add_scatter(
        x=mean_p,
        y=frac,
        mode="lines+markers",
        name="out-of-fold",
        marker={"size": 5 + 15 * np.sqrt(count / count.max())},
        hovertext=[f"{n} predictions" for n in count],
    )
    fig.add_scatter(
        x=[0, 1], y=[0, 1], mode="lines", line={"dash": "dot", "color": "#999"}, name="perfect"
    )
    fig.update_layout(
        xaxis_title="mean predicted probability",
        yaxis_title="fraction positive",
        yaxis2={"overlaying": "y", "side": "right", "title": "predictions", "showgrid": False},
    )
    return fig


CAL_BINS = 10  # equal-width probability bins of the calibration curve
CAL_MIN_SHARE = 0.02  # a bin with fewer of the predictions merges into its neighbour


def calibration_bins(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean predicted probability, fraction positive, count) per bin: equal-width bins, each
    holding at least ``CAL_MIN_SHARE`` of the predictions (thin bins merge into the next).
    Quantile bins zig-zagged where predictions bunch up: many bins a hair apart in mean
    probability, each too small for its fraction positive to mean anything."""
    edges = np.linspace(0, 1, CAL_BINS + 1)
    idx = np.clip(np.digitize(p, edges[1:-1]), 0, CAL_BINS - 1)
    groups, cur = [], []
    need = max(1, int(np.ceil(CAL_MIN_SHARE * len(p))))
    for b in range(CAL_BINS):
        cur.append(b)
        if np.isin(idx, cur).sum() >= need:
            groups.append(cur)
            cur = []
    if cur and groups:
        groups[-1] += cur
    elif cur:
        groups.append(cur)
    out = [(p[m].mean(), y[m].mean(), m.sum()) for g in groups if (m := np.isin(idx, g)).any()]
    mean_p, frac, count = (np.array(c, dtype=float) for c in zip(*out, strict=True))
    return mean_p, frac, count


def fig_confusion(study: optuna.Study) -> go.Figure | str:
    got = _refit_record(study)
    if isinstance(got, str):
        return got
    _, oof = got
    fpr, tpr, thr = roc_curve(oof["label"], oof["prob"])
    best = int(np.argmax(tpr - fpr))  # Youden's J = sensitivity + specificity - 1
    t = float(min(thr[best], 1.0))
    cm = confusion_matrix(oof["label"], (oof["prob"] >= t).astype(int), labels=[0, 1])
    fig = go.Figure(
        go.Heatmap(
            z=cm,
            x=["pred 0", "pred 1"],
            y=["true 0", "true 1"],
            text=cm,
            texttemplate="%{text}",
            colorscale="Blues",
            showscale=False,
        )
    )
    fig.update_layout(
        title=f"out-of-fold at the Youden threshold {t:.3f}", yaxis={"autorange": "reversed"}
    )
    return fig


SECTIONS: list[tuple[str, Callable[[optuna.Study], object]]] = [
    ("Optimisation history (best so far)", fig_history),
    ("Trial states over time", fig_timeline),
    ("Compute per final state", fig_compute_per_state),
    ("Mean fold AUC per fold-epochs trained, by final state", fig_intermediate),
    ("Per-fold AUC spread of the best COMPLETE trials", fig_fold_spread),
    ("Train and held-out loss of the best trials", fig_losses),
    (
        "Parameter importances",
        _needs_complete(2, optuna.visualization.plot_param_importances),
    ),
    ("Parallel coordinates (COMPLETE and PRUNED trials)", fig_parallel),
    ("Slices: mean fold AUC by param (COMPLETE and PRUNED trials)", fig_slices),
    ("lr x batch size", fig_contour),
    ("Architectures", fig_architectures),
    ("Refit: ROC curves per fold and out-of-fold", fig_roc),
    ("Refit: calibration", fig_calibration),
    ("Refit: confusion matrix", fig_confusion),
]


# sections that draw for any trials; the others need a COMPLETE or PRUNED trial's values
ANY_STATE = ("Trial states over time", "Compute per final state")


def all_failed(study: optuna.Study) -> str | None:
    """The sentence for a study whose every finished trial FAILED (no value to plot, and
    no refit possible), naming the commonest error; None otherwise."""
    trials = _trials(study)
    fails = [t for t in trials if t.state == TrialState.FAIL]
    if not fails or _valued(study) or any(t.state == TrialState.RUNNING for t in trials):
        return None
    errors = pd.Series(
        [
            f"{t.user_attrs.get(ERROR_TYPE, '?')}: {t.user_attrs.get(ERROR_MESSAGE, '')}"
            for t in fails
        ]
    ).value_counts()
    return (
        f"All {len(fails)} trials FAILED, so there is nothing to plot and nothing to refit; "
        f"commonest error ({errors.iloc[0]} of {len(fails)}): {errors.index[0][:300]} "
        "(every trial's error: the table below, or optuna-dashboard)."
    )


def sections(study: optuna.Study) -> list[Section]:
    """Every section's figure, or the sentence saying why it is not drawn."""
    out: list[Section] = []
    failed = all_failed(study)
    for title, draw in SECTIONS:
        if failed and title not in ANY_STATE:
            out.append((title, failed))
            continue
        try:
            out.append((title, draw(study)))
        except Exception as e:  # a plot that cannot be drawn must not sink the report
            out.append((title, f"Not drawn: {type(e).__name__}: {e}"))
    return out


def _header(study: optuna.Study) -> str:
    counts = studies.tally(study)
    best = studies.best_trial(study)
    attrs = study.user_attrs
    rows = [
        ("study", study.study_name),
        ("trials", ", ".join(f"{k.lower()} {v}" for k, v in sorted(counts.items())) or "none"),
        ("dataset fingerprint", attrs.get(DATASET_FINGERPRINT, "?")),
        ("folds", attrs.get(FOLDS_FILE, "?")),
        ("package version", attrs.get(VERSION, "?")),
        ("reproduce", attrs.get(COMMAND, "?")),
    ]
    if best is not None:
        rows.insert(2, ("best mean fold AUC", f"{best.value:.4f} (trial {best.number})"))
        rows.insert(3, ("best params", ", ".join(f"{k}={v}" for k, v in best.params.items())))
    folds_name = Path(attrs.get(FOLDS_FILE, "")).name
    if folds_name.startswith(("patch-no-slide-map", "slide-partial-map")):
        rows.insert(
            1,
            (
                "warning",
                f"folds {folds_name.split('-k')[0]}: ids without a slide are their own group, "
                "so the folds are (mostly) patch-level and CV AUC is optimistic; add a slide "
                "map (patch_id_wsi.csv)",
            ),
        )
    rec = get_record(study, REFIT)
    if rec:
        folds = ", ".join(f"{a:.4f}" for a in rec.get("oof_auc_folds", []))
        line = f"{_refit_label(rec)}: OOF AUC {rec['oof_auc']:.4f} (folds {folds})"
        if rec.get("oof_auc_best_epochs") is not None:
            line += (
                f"; at each fold's best epoch {rec['oof_auc_best_epochs']:.4f} (epochs "
                f"{rec.get('best_epochs')}, optimistic: chosen on the same fold)"
            )
        if rec.get("test_auc") is not None:
            line += f"; ensemble + TTA test AUC {rec['test_auc']:.4f}"
        if rec.get("test_auc_folds") is not None:
            tf = ", ".join(f"{a:.4f}" for a in rec["test_auc_folds"])
            line += (
                f"; each fold model alone on test, 1 view: {tf} (validation - test = "
                f"{rec['validation_minus_test']:+.4f})"
            )
        rows.append(("refit", line))
        if rec.get("kind") == "ensemble":
            rows.append(("ensemble members", _members_line(rec)))
    body = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows
    )
    return f"<table class='head'>{body}</table>"


def render(study: optuna.Study) -> str:
    """The whole page; plotly.js is inlined once, so the file works offline."""
    parts, first = [], True
    for i, (title, fig) in enumerate(sections(study)):
        parts.append(f"<h2>{html.escape(title)}</h2>")
        if isinstance(fig, str):
            parts.append(f"<p class='note'>{html.escape(fig)}</p>")
            continue
        # no fixed width: every figure fits the page; a figure that sets its height keeps it
        fig.update_layout(width=None, autosize=True, margin={"t": 50, "b": 40})
        if fig.layout.height is None:
            fig.update_layout(height=420)
        parts.append(
            pio.to_html(
                fig,
                full_html=False,
                include_plotlyjs="inline" if first else False,
                div_id=f"fig{i}",
            )
        )
        first = False
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:auto;padding:1em}"
        "table.head th{text-align:left;padding-right:1em;vertical-align:top}"
        "p.note{color:#666;font-style:italic}"
        "table.trials{border-collapse:collapse;font-size:12px;display:block;overflow-x:auto}"
        "table.trials th{cursor:pointer;background:#eee}"
        "table.trials td,table.trials th{padding:2px 6px;border:1px solid #ddd}"
    )
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>pcam-search: "
        f"{html.escape(study.study_name)}</title><style>{style}</style></head><body>"
        f"<h1>Study {html.escape(study.study_name)}</h1>{_header(study)}"
        f"{''.join(parts)}<h2>All trials (click a column to sort)</h2>{trials_table(study)}"
        "</body></html>"
    )


def write_report(study: optuna.Study, out_dir: Path, png: bool = False) -> Path:
    """Write ``report.html`` (atomically) into ``out_dir``; returns its path.

    With ``png`` (needs the optional ``kaleido`` package) each figure is also written as
    ``<n>.png`` beside it.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    path = write_text_atomic(out_dir / "report.html", render(study))
    if png:
        for i, (_, fig) in enumerate(sections(study)):
            if not isinstance(fig, str):
                fig.write_image(out_dir / f"{i:02d}.png", width=1000, height=450)
    return path


def parser() -> argparse.ArgumentParser:
    """pcam-report's command line."""
    ap = argparse.ArgumentParser(
        prog="pcam-report",
        description="write an HTML report of a study under studies/<study>/report/",
    )
    add_version(ap)
    add_study_args(ap)
    ap.add_argument(
        "--out", type=Path, default=None, help="folder (default: studies/<study>/report)"
    )
    ap.add_argument("--open", action="store_true", help="open the page in the browser")
    ap.add_argument(
        "--png",
        action="store_true",
        help='also write each figure as PNG (needs: pip install "pcam-search[png]", and Chrome)',
    )
    return ap


def main(argv: list[str] | None = None) -> int:
    """``pcam-report``: write the study's HTML report; the exit code."""
    args = parser().parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    err = Console(stderr=True, soft_wrap=True)
    try:
        studies.check_study_name(args.study)
    except ValueError as e:
        print_error(err, str(e))
        return EXIT_BAD_INPUT
    url = studies.default_storage_url(args.storage, args.studies_dir)
    try:
        study = optuna.load_study(study_name=args.study, storage=studies.open_existing(url))
    except KeyError:
        return print_error(err, f"no study {args.study!r} in {studies.safe_url(url)}")
    except studies.StorageError as e:
        print_error(err, str(e))
        return EXIT_BAD_INPUT
    if args.png:
        try:
            import kaleido  # noqa: F401
        except ImportError:
            need = 'pip install "pcam-search[png]"'
            return print_error(err, f"--png needs the kaleido package: {need}")
    out = args.out or args.studies_dir / args.study / "report"
    try:
        studies.check_writable(out, "pcam-report")  # e.g. a read-only studies folder: --out
    except studies.StorageError as e:
        print_error(err, str(e))
        return EXIT_BAD_INPUT
    path = write_report(study, out, args.png)
    print(path.resolve())
    if args.open:
        webbrowser.open(path.resolve().as_uri())
    return 0


if __name__ == "__main__":
    sys.exit(main())
