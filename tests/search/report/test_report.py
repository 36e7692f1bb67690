"""The HTML report on made-up studies: full, pruned-only, single-trial, no refit."""

from __future__ import annotations

import numpy as np
import optuna
import pytest

from search import report
from search.common import study as studies
from search.common.attrs import CONFIG, FOLDS_FILE, PROMOTED_FROM, REFIT, TRIAL_EPOCHS
from search.report import refit_figures, study_figures


def test_report_full_study_draws_every_section(tmp_path, made_up_study, with_refit):
    st = with_refit(made_up_study(6, 6, 1), tmp_path)
    got = dict(report.sections(st))
    # every section is a figure: nothing degraded to a sentence on a complete study
    not_drawn = {k: v for k, v in got.items() if isinstance(v, str)}
    assert not not_drawn
    html = report.render(st)
    assert html.count("Plotly.newPlot") == len(report.SECTIONS)
    assert "abc123" in html and "pcam-search --trials 10" in html and "test AUC 0.7800" in html
    assert "validation - test = +0.0300" in html  # the like-for-like gap is shown


@pytest.mark.parametrize("case", ["pruned_only", "single", "empty"])
def test_report_degrades_with_a_sentence(case, tmp_path, made_up_study):
    st = {
        "pruned_only": made_up_study(0, 4),
        "single": made_up_study(1, 0),
        "empty": optuna.create_study(direction="maximize"),
    }[case]
    path = report.write_report(st, tmp_path / "report")
    html = path.read_text()
    assert "No refit yet" in html
    assert "Traceback" not in html and "Not drawn" not in html
    if case != "single":
        assert "No COMPLETE trial yet" in html


def test_intermediate_values_coloured_by_state(made_up_study):
    fig = study_figures.fig_intermediate(made_up_study(2, 3))
    # one line per trial, in its final state's colour
    colours = [tr.line.color for tr in fig.data]
    assert colours.count(study_figures.STATE_COLOURS["COMPLETE"]) == 2
    assert colours.count(study_figures.STATE_COLOURS["PRUNED"]) == 3


def test_report_cli_missing_study_is_clear(tmp_path, capsys):
    url = studies.sqlite_url(tmp_path / "pcam.db")
    optuna.create_study(study_name="pcam", storage=studies.make_storage(url))
    rc = report.main(["--studies-dir", str(tmp_path), "--study", "nope"])
    assert rc == 2 and "no study 'nope'" in capsys.readouterr().err


def test_report_png_without_kaleido_is_clear(tmp_path, capsys):
    try:
        import kaleido  # noqa: F401

        pytest.skip("kaleido is installed: --png works")
    except ImportError:
        pass
    url = f"sqlite:///{tmp_path / 'pcam.db'}"
    optuna.create_study(storage=url, study_name="pcam")
    rc = report.main(["--studies-dir", str(tmp_path), "--png"])
    assert rc == 2 and 'pip install "pcam-search[png]"' in capsys.readouterr().err


@pytest.mark.parametrize(
    "folds_file, warned",
    [("/c/folds/patch-no-slide-map-k3-s0.csv", True), ("/c/folds/slide-k3-s0.csv", False)],
)
def test_report_header_warns_when_folds_are_patch_folds(made_up_study, folds_file, warned):
    st = made_up_study(2, 0)
    st.set_user_attr(FOLDS_FILE, folds_file)
    html = report.render(st)
    assert ("folds patch-no-slide-map: ids without a slide" in html) == warned


def test_report_shows_ensemble_members_weights_and_nested_estimate(
    tmp_path, made_up_study, with_refit
):
    st = with_refit(made_up_study(3, 0), tmp_path)
    rec = dict(st.user_attrs[REFIT])
    rec.update(
        kind="ensemble",
        label="ensemble of 2 (trial 1, trial 2)",
        members=[
            {"label": "trial 1", "weight": 0.6, "oof_auc": 0.81, "test_auc": 0.80},
            {"label": "trial 2", "weight": 0.4, "oof_auc": 0.79, "test_auc": None},
        ],
        selection_curve=[0.81, 0.83],
        nested_auc=0.8123,
    )
    st.set_user_attr(REFIT, rec)
    html = report.render(st)
    assert "ensemble of 2 (trial 1, trial 2): OOF AUC" in html
    assert "trial 1 (weight 0.60, OOF 0.8100, test 0.8000)" in html
    assert "Nested estimate 0.8123" in html and "0.8100 0.8300" in html


def test_report_trials_table_lists_every_trial_and_sorts(made_up_study):
    st = made_up_study(3, 2, 1)
    html = report.render(st)
    table = html.split("<table class='trials'>")[1].split("</table>")[0]
    assert table.count("<tr>") == 1 + 6  # header + one row per trial
    assert "onclick='srt(this)'" in table and "function srt(" in html
    for state in ("COMPLETE", "PRUNED", "FAIL"):
        assert f">{state}<" in table


def test_report_trials_table_shows_a_promoted_trials_length_and_source(made_up_study):
    st = made_up_study(2, 0)
    st.set_user_attr(CONFIG, {"max_epochs": 12})
    t = st.ask()
    t.suggest_float("lr", 1e-4, 1e-1, log=True)
    t.set_user_attr(TRIAL_EPOCHS, 24)
    t.set_user_attr(PROMOTED_FROM, 1)
    st.tell(t, 0.99)
    table = report.render(st).split("<table class='trials'>")[1].split("</table>")[0]
    rows = table.split("<tr>")[2:]  # after the header
    cells = [r.split("</td>")[:5] for r in rows]
    shown = [[c.rsplit(">", 1)[-1] for c in r] for r in cells]
    assert shown[0][3:5] == ["12", ""] and shown[-1][3:5] == ["24", "1"]


def test_report_fold_spread_shows_each_complete_trials_folds(made_up_study):
    st = made_up_study(3, 1)
    fig = study_figures.fig_fold_spread(st)
    assert len(fig.data) == 3
    assert all(len(b.y) == 3 for b in fig.data)  # 3 folds each
    assert isinstance(study_figures.fig_fold_spread(made_up_study(0, 2)), str)


def test_report_history_and_parallel_coordinates_show_pruned_trials(made_up_study):
    st = made_up_study(2, 3)
    hist = study_figures.fig_history(st)
    pruned = [tr for tr in hist.data if tr.name == "PRUNED (last mean AUC)"]
    assert len(pruned) == 1 and len(pruned[0].x) == 3
    par = study_figures.fig_parallel(st)
    state_axis = par.data[0].dimensions[0]
    assert state_axis.label == "state" and sorted(state_axis.values) == [0, 0, 0, 1, 1]


def test_report_slices_wrap_into_rows_that_fit_the_page(made_up_study):
    st = made_up_study(4, 2)
    fig = study_figures.fig_slices(st)
    # 3 params -> one row of 3 panels; no fixed width (optuna's: 300 px per param)
    assert fig.layout.width is None
    xaxes = [k for k in fig.layout.to_plotly_json() if k.startswith("xaxis")]
    assert len(xaxes) == 3
    assert {tr.name for tr in fig.data} == {"COMPLETE", "PRUNED"}
    html = report.render(st)
    assert '"width":' not in html.split("Slices")[1].split("<h2>")[0]


def test_report_intermediate_axis_has_whole_number_ticks(made_up_study):
    fig = study_figures.fig_intermediate(made_up_study(2, 1))
    assert fig.layout.xaxis.tickformat == "d" and fig.layout.xaxis.dtick >= 1


def test_calibration_bins_hold_enough_predictions_when_they_bunch_up():
    # 2,000 predictions bunched in 0.40-0.47: quantile bins gave 10 points 0.007 apart
    rng = np.random.default_rng(0)
    p = np.concatenate([0.40 + 0.07 * rng.random(1960), rng.random(40)])
    y = (rng.random(len(p)) < p).astype(int)
    mean_p, frac, count = refit_figures.calibration_bins(y, p)
    assert count.sum() == len(p)
    assert (count >= 0.02 * len(p)).all()
    assert (np.diff(mean_p) > 0).all()
    assert np.isclose((frac * count).sum(), y.sum())  # every positive counted once


def test_report_study_with_only_failed_trials_says_so(made_up_study):
    st = made_up_study(0, 0, 3)
    got = dict(report.sections(st))
    sentence = got["Refit: calibration"]
    assert "All 3 trials FAILED" in sentence and "TrialDiverged" in sentence
    assert "pcam-refit" not in sentence  # a refit needs a COMPLETE trial
    assert not isinstance(got["Trial states over time"], str)


def test_report_loss_curves_of_the_best_trials(made_up_study):
    fig = study_figures.fig_losses(made_up_study(3, 2))
    assert len(fig.data) == 2 * 5  # train + held-out per trial
    assert {tr.line.dash for tr in fig.data} == {"dash", "solid"}
