"""What long work tells the user while it runs. The library reports through one `Reporter` passed
down from the entry point; this base class says nothing (the Python API's default, and every
process but the first of a run of several). console.RichReporter shows it on the terminal.

    with reporter.status("loading model"): ...          # a spinner around one long step
    reporter.say("width: intermediate_size 1536 → 1075")  # a decision made before the work starts
    reporter.warn("teacher is not the parent model")    # worth a look, not a stop
    reporter.step("rep 3/5 dense 4x256")                # where a long pipeline is now
    with reporter.bar("thanos 2:4", total=30) as bar:   # counted work
        bar.describe("thanos 2:4 · layer 3.q_proj"); bar.advance()
    reporter.record("recover.step", {...})              # a measurement the console formats
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext


class Bar:
    """A count of finished steps of one piece of work; this one shows nothing."""

    def advance(self, steps: int = 1) -> None:
        pass

    def update(self, completed: int | None = None, *, total: int | None = None) -> None:
        pass

    def describe(self, text: str) -> None:
        pass


class Reporter:
    """Says nothing; subclasses show what they are told. Used as a context manager, it clears what
    it still shows when the work ends."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def status(self, message: str):
        return nullcontext()

    def say(self, line: str) -> None:
        pass

    def warn(self, line: str) -> None:
        pass

    def step(self, message: str) -> None:
        """Where a long pipeline is now (a terminal shows the latest; a log gets a line each)."""

    @contextmanager
    def bar(self, description: str, total: int | None = None):
        yield Bar()

    def record(self, kind: str, values: dict) -> None:
        """A measurement taken while working (kind names what it is, e.g. 'recover.step')."""


SILENT = Reporter()
