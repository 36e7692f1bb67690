"""The submission's figures, from the refit record: ROC per fold and out-of-fold, calibration,
confusion matrix."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import plotly.graph_objects as go
from sklearn.metrics import confusion_matrix, roc_auc_score, roc_curve

from search.common.attrs import (
    REFIT,
    get_record,
)


def refit_label(rec: dict) -> str:
    return rec.get("label") or f"trial {rec['trial']}"


def members_line(rec: dict) -> str:
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
    title = f"{refit_label(rec)}: OOF AUC {rec['oof_auc']:.4f}"
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
