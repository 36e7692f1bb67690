"""``pcam-report``: one self-contained HTML page of plotly figures for a study (and its refit).

Optuna's own plots where it has them (history, timeline, importances, parallel coordinates,
slices, contour); plotly for the rest (intermediate values by state, compute per state,
architectures, the refit's ROC curves, calibration and confusion matrix). Every section
degrades to a sentence when it cannot be drawn (no refit yet, one trial, only pruned trials).
"""

from __future__ import annotations

import argparse
import html
import sys
import webbrowser
from collections.abc import Callable
from pathlib import Path

import optuna
import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
from optuna.trial import TrialState
from rich.console import Console

from data_pipeline.atomic import write_text_atomic
from data_pipeline.cli_common import EXIT_BAD_INPUT
from data_pipeline.version import add_version
from search.common import study as studies
from search.common.attrs import (
    COMMAND,
    CONFIG,
    DATASET_FINGERPRINT,
    ERROR_MESSAGE,
    ERROR_TYPE,
    FOLD_EPOCHS,
    FOLDS_FILE,
    PROMOTED_FROM,
    REFIT,
    TRIAL_EPOCHS,
    VERSION,
    get_record,
)
from search.common.cli_args import add_study_args, print_error
from search.report.refit_figures import (
    fig_calibration,
    fig_confusion,
    fig_roc,
    members_line,
    refit_label,
)
from search.report.study_figures import (
    all_trials,
    fig_architectures,
    fig_compute_per_state,
    fig_contour,
    fig_fold_spread,
    fig_history,
    fig_intermediate,
    fig_losses,
    fig_parallel,
    fig_slices,
    fig_timeline,
    needs_complete,
    valued_trials,
)

Section = tuple[str, "go.Figure | str"]  # title, figure or a sentence saying why not


_SORT_JS = (
    "function srt(th){const t=th.closest('table'),i=[...th.parentNode.children].indexOf(th),"
    "d=th.dataset.d=th.dataset.d==='a'?'d':'a',rows=[...t.tBodies[0].rows];rows.sort((a,b)=>{"
    "const x=a.cells[i].dataset.v,y=b.cells[i].dataset.v,nx=parseFloat(x),ny=parseFloat(y);"
    "const c=isNaN(nx)||isNaN(ny)?x.localeCompare(y):nx-ny;return d==='a'?c:-c});"
    "rows.forEach(r=>t.tBodies[0].appendChild(r))}"
)


def trials_table(study: optuna.Study) -> str:
    """Every trial as an HTML table: number, state, mean AUC, its schedule's epochs (a
    promoted trial's own, and the trial it was promoted from), fold-epochs, seconds and
    params; click a header to sort by it."""
    trials = all_trials(study)
    if not trials:
        return "<p class='note'>No trials yet.</p>"
    names = sorted({k for t in trials for k in t.params})
    head = ["trial", "state", "mean fold AUC", "epochs", "promoted from", "fold-epochs"]
    head += ["seconds", *names]
    study_epochs = (get_record(study, CONFIG) or {}).get("max_epochs")

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
        epochs = t.user_attrs.get(TRIAL_EPOCHS, study_epochs)
        vals = [t.number, t.state.name, t.value, epochs, t.user_attrs.get(PROMOTED_FROM)]
        vals += [t.user_attrs.get(FOLD_EPOCHS), secs]
        rows.append("<tr>" + "".join(cell(v) for v in vals + [t.params.get(n) for n in names]))
    ths = "".join(f"<th onclick='srt(this)'>{html.escape(h)}</th>" for h in head)
    return (
        f"<script>{_SORT_JS}</script><table class='trials'><thead><tr>{ths}</tr></thead>"
        f"<tbody>{'</tr>'.join(rows)}</tr></tbody></table>"
    )


SECTIONS: list[tuple[str, Callable[[optuna.Study], object]]] = [
    ("Optimisation history (best so far)", fig_history),
    ("Trial states over time", fig_timeline),
    ("Compute per final state", fig_compute_per_state),
    ("Mean fold AUC per fold-epochs trained, by final state", fig_intermediate),
    ("Per-fold AUC spread of the best COMPLETE trials", fig_fold_spread),
    ("Train and held-out loss of the best trials", fig_losses),
    (
        "Parameter importances",
        needs_complete(2, optuna.visualization.plot_param_importances),
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
    trials = all_trials(study)
    fails = [t for t in trials if t.state == TrialState.FAIL]
    if not fails or valued_trials(study) or any(t.state == TrialState.RUNNING for t in trials):
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
        line = f"{refit_label(rec)}: OOF AUC {rec['oof_auc']:.4f} (folds {folds})"
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
            rows.append(("ensemble members", members_line(rec)))
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
