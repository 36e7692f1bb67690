import importlib.metadata

import pytest

from data_pipeline.cli import main as data_main
from search.commands.refit import predict_main, refit_main
from search.commands.search_args import main as search_main
from search.report import main as report_main


@pytest.mark.parametrize(
    "main, prog",
    [
        (search_main, "pcam-search"),
        (refit_main, "pcam-refit"),
        (predict_main, "pcam-predict"),
        (report_main, "pcam-report"),
        (data_main, "pcam-data"),
    ],
)
def test_every_command_prints_its_version(main, prog, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    want = f"{prog} {importlib.metadata.version('pcam-search')}"
    assert capsys.readouterr().out.strip() == want
