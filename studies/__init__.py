"""The shipped search spaces (``*.toml``), installed as package data so that ``pip install .``
and ``pip install git+…`` find them (``search.tuning.space.STUDIES_DIR``). When the tools run
from the repository, this folder is also the default ``--studies-dir`` for study databases
and outputs (gitignored)."""
