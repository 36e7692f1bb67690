"""The command lines' help: fast (no torch before the arguments are good) and plain text."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "ray", "optuna", "timm", "sklearn", "pandas")

PROBE = """
import sys
from search.commands.search_args import main
try:
    main({argv!r})
except SystemExit as e:
    code = e.code
heavy = sorted(m for m in {heavy!r} if m in sys.modules)
print("EXIT", code, "HEAVY", heavy)
"""


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["--trials", "many"]])
def test_search_cli_args_answer_without_importing_torch(argv):
    # --help took 12.5 s because torch and timm were imported before argparse ran
    code = PROBE.format(argv=argv, heavy=HEAVY)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout
    want = "2" if argv[0] == "--trials" else "0"
    assert f"EXIT {want} HEAVY []" in out, out


def _helps() -> dict[str, str]:
    from data_pipeline.cli import parser as data_parser
    from search.commands.refit import predict_parser, refit_parser
    from search.commands.search_args import parser as search_parser
    from search.report import main as report_main

    out = {"pcam-search": search_parser().format_help()}
    out["pcam-refit"] = refit_parser().format_help()
    out["pcam-predict"] = predict_parser().format_help()
    data = data_parser()
    out["pcam-data"] = data.format_help()
    sub = next(a for a in data._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, p in sub.choices.items():
        out[f"pcam-data {name}"] = p.format_help()
    with pytest.raises(SystemExit):
        import contextlib
        import io

        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            report_main(["--help"])
    out["pcam-report"] = buf.getvalue()
    return out


def test_cli_help_has_no_raw_rst_or_empty_defaults():
    for name, text in _helps().items():
        assert "``" not in text, name
        assert "(default: None)" not in text and "(default: False)" not in text, name


def test_cli_help_data_check_says_its_folder_is_required():
    text = _helps()["pcam-data check"]
    assert "required" in text and "embedded" not in text


def test_search_cli_args_says_what_is_starting_before_the_slow_imports(tmp_path):
    # nothing was shown for the first ~20 s of a search (imports, Ray's start)
    not_db = tmp_path / "x.db"
    not_db.write_text("not a database")
    r = subprocess.run(
        [sys.executable, "-m", "search.commands.search_args", "--storage", f"sqlite:///{not_db}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2
    lines = r.stderr.splitlines()
    assert lines[0].startswith("pcam-search: loading torch"), r.stderr
    assert str(not_db) in r.stderr  # the storage is checked before Ray starts


def test_search_budget_clock_includes_the_heavy_imports():
    # --budget S is S seconds of the command: its clock starts before torch, Ray and Optuna
    # are imported (~20 s on 2 cores), not after them
    probe = """
import sys, time
import search.commands.search_args as ca
t_before = time.monotonic()
seen = {}
def fake(args, argv, t_cmd=None):
    seen["t"] = t_cmd
    seen["heavy"] = "torch" in sys.modules
    return 0
import types
sys.modules["search.commands.search"] = types.SimpleNamespace(run_args=fake)
ca.main(["--budget", "60"])
print("OK", seen["t"] is not None and t_before <= seen["t"] < time.monotonic())
"""
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert "OK True" in out.stdout, out.stdout + out.stderr


def _parsers():
    from data_pipeline.cli import parser as data_parser
    from search.commands.refit import predict_parser, refit_parser
    from search.commands.search_args import parser as search_parser
    from search.report import parser as report_parser

    yield "pcam-search", search_parser()
    yield "pcam-refit", refit_parser()
    yield "pcam-predict", predict_parser()
    yield "pcam-report", report_parser()
    data = data_parser()
    for action in data._subparsers._group_actions:  # pcam-data's subcommands
        for name, sub in action.choices.items():
            yield f"pcam-data {name}", sub


@pytest.mark.parametrize("command, ap", list(_parsers()), ids=lambda v: str(v)[:20])
def test_every_flag_has_help_text(command, ap):
    silent = [
        a.option_strings or [a.dest]
        for a in ap._actions
        if a.help in (None, "") and a.dest not in ("help", "version")
    ]
    assert not silent, f"{command}: flags without help: {silent}"


@pytest.mark.parametrize("command", ["pcam-search", "pcam-refit", "pcam-report"])
def test_study_name_is_an_alias_of_study(command):
    ap = dict(_parsers())[command]
    extra = ["--best"] if command == "pcam-refit" else []
    assert ap.parse_args(["--study-name", "resnets", *extra]).study == "resnets"


def test_no_progress_and_quiet_are_one_flag():
    from data_pipeline.cli import parser as data_parser

    for flag in ("--no-progress", "--quiet"):
        assert data_parser().parse_args(["build", flag]).no_progress
