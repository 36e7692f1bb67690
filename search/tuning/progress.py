"""The live view of a search: counts by state, best mean AUC with its params, elapsed, ETA.

``Tally`` is plain state the Ray adapter updates from the driver; ``live(tally)`` renders it
with rich a few times a second instead of Ray's scrolling tables.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text


@dataclass
class Tally:
    """What happened in this run (earlier runs only as ``finished_before``)."""

    target: int  # trials to finish in this run
    finished_before: int = 0
    complete: int = 0
    pruned: int = 0
    failed: int = 0
    interrupted: int = 0  # stopped by Ctrl-C / timeout: not counted, re-run on resume
    fold_epochs: int = 0  # fold-epochs trained (one fold model, one pass over its rows)
    wasted: int = 0  # of those, fold-epochs of trials this run stopped unfinished
    halted: str = ""  # why the run had to stop (a full disk); "" while it may go on
    running: dict[int, int] = field(default_factory=dict)  # trial number -> epochs reported
    best_value: float | None = None
    best_number: int | None = None
    best_params: dict = field(default_factory=dict)
    last_error: str = ""
    t0: float = field(default_factory=time.monotonic)
    echo: Console | None = None  # without the live view: one line per finished trial here

    def record(
        self,
        number: int,
        state: str,
        value: float | None,
        params: dict,
        epochs: int,
        error: str = "",
    ) -> None:
        """Count one finished trial (state: COMPLETE, PRUNED, FAIL or INTERRUPTED)."""
        self.running.pop(number, None)
        if state == "COMPLETE":
            self.complete += 1
            if value is not None:
                self.offer_best(number, value, params)
        elif state == "PRUNED":
            self.pruned += 1
        elif state == "FAIL":
            self.failed += 1
            self.last_error = f"trial {number}: {error}"[:300]
        else:
            self.interrupted += 1
        if self.echo is not None:
            shown = f"{value:.4f}" if value is not None else "-"
            best = f"{self.best_value:.4f}" if self.best_value is not None else "-"
            self.echo.print(
                f"trial {number} {state.lower()} after {epochs} epoch(s): mean AUC {shown}"
                f"{'  ' + error if error else ''}   [{self.finished}/{self.target}, best {best}]",
                highlight=False,
                markup=False,
            )

    def __getstate__(self) -> dict:
        # Ray pickles the searcher (and so this) into its experiment folder: consoles hold locks
        return {**self.__dict__, "echo": None}

    @property
    def waste(self) -> float:
        """The share of this run's fold-epochs that went to trials it stopped unfinished."""
        return self.wasted / self.fold_epochs if self.fold_epochs else 0.0

    @property
    def finished(self) -> int:
        return self.complete + self.pruned + self.failed

    def offer_best(self, number: int, value: float, params: dict) -> None:
        if self.best_value is None or value > self.best_value:
            self.best_value, self.best_number, self.best_params = value, number, dict(params)

    def eta_s(self) -> float | None:
        """Seconds left at this run's pace so far (None before the first finished trial)."""
        if self.finished == 0:
            return None
        per_trial = (time.monotonic() - self.t0) / self.finished
        return per_trial * max(0, self.target - self.finished)

    def __rich__(self) -> Group:
        elapsed = time.monotonic() - self.t0
        eta = self.eta_s()
        head = Text.assemble(
            ("trials ", "bold"),
            f"{self.finished}/{self.target} this run ({self.finished_before} before)   ",
            ("complete ", "green"),
            f"{self.complete}  ",
            ("pruned ", "yellow"),
            f"{self.pruned}  ",
            ("failed ", "red"),
            f"{self.failed}  ",
            ("running ", "cyan"),
            f"{len(self.running)}   ",
            f"fold-epochs {self.fold_epochs}   elapsed {_hms(elapsed)}   ",
            f"ETA {_hms(eta) if eta is not None else '?'}",
        )
        best = Table.grid(padding=(0, 1))
        if self.best_value is None:
            best.add_row(Text("best: no complete trial yet", style="dim"))
        else:
            params = ", ".join(f"{k}={_short(v)}" for k, v in self.best_params.items())
            best.add_row(
                Text(
                    f"best mean AUC {self.best_value:.4f} (trial {self.best_number})",
                    style="bold green",
                ),
                Text(params, overflow="fold"),
            )
        parts: list[RenderableType] = [head, best]
        if self.last_error:
            parts.append(Text(f"last failure: {self.last_error}", style="red", overflow="fold"))
        return Group(*parts)


def _short(v: object) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


@contextlib.contextmanager
def live(tally: Tally, enabled: bool, console: Console | None = None) -> Iterator[None]:
    """Show ``tally`` live while the block runs (nothing when disabled)."""
    if not enabled:
        yield
        return
    with Live(
        tally, console=console or Console(stderr=True), refresh_per_second=2, transient=False
    ):
        yield
