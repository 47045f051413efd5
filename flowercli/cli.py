"""The command-line interface: parse, call the library, render. Nothing else lives here.

Heavy libraries (torch, transformers, h5py) are imported inside the commands so that
`flowercli --help` stays fast.
"""

from __future__ import annotations

import functools
import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, List, Optional

import typer
from rich.console import Console

from flowercli import __version__
from flowercli.config import DATA_DIR_ENV, RUNS_DIR_ENV, default_data_dir, default_runs_dir
from flowercli.errors import FlowerError
from flowercli.report import Reporter, Task

app = typer.Typer(
    name="flowercli",
    help="Sentence in, flower out: a text-conditional GAN for Oxford 102 Flowers.\n\n"
    "Pipeline: download -> embed -> train -> generate -> eval. Each stage reads the files the "
    "previous one wrote under the data directory (--data-dir, or $" + DATA_DIR_ENV + ").",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)


# ---------------------------------------------------------------------------------------------
# Shared machinery: error handling, output, progress.


class RichReporter(Reporter):
    """Renders library progress on stderr: bars on a terminal, plain lines otherwise."""

    def __init__(self, quiet: bool = False, verbose: bool = False, console: Console | None = None):
        self.console = console or Console(stderr=True, highlight=False, soft_wrap=True)
        self.quiet = quiet
        self.verbose = verbose

    def info(self, message: str) -> None:
        if not self.quiet:
            self.console.print(message, markup=False)

    def debug(self, message: str) -> None:
        if self.verbose and not self.quiet:
            self.console.print(message, markup=False, style="dim")

    def warn(self, message: str) -> None:
        # Warnings show even with --quiet: they are about the result the user gets.
        self.console.print(f"Warning: {message}", markup=False, style="yellow")

    @contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[Task]:
        if self.quiet or not self.console.is_terminal:
            yield Task()
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            console=self.console,
            transient=True,
        ) as progress:
            tid = progress.add_task(description, total=total, info="")

            class _RichTask(Task):
                def advance(self, n: int = 1) -> None:
                    progress.advance(tid, n)

                def update(self, **fields: object) -> None:
                    text = " ".join(
                        f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items()
                    )
                    progress.update(tid, info=text)

            yield _RichTask()


def handle_errors(fn: Callable) -> Callable:
    """Turn user-facing errors into one line on stderr and a stable exit code, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FlowerError as e:
            err = Console(stderr=True, highlight=False, soft_wrap=True)
            err.print(f"Error: {e}", markup=False, style="red")
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            Console(stderr=True).print("Interrupted.", markup=False)
            raise typer.Exit(130) from None

    return wrapper


def emit_json(obj: object) -> None:
    """One JSON document per line on stdout, for scripts."""
    sys.stdout.write(json.dumps(obj, sort_keys=True) + "\n")
    sys.stdout.flush()


DataDirOpt = typer.Option(
    None, "--data-dir", "-d", envvar=DATA_DIR_ENV, help="Data directory [default: ./data]."
)
RunsDirOpt = typer.Option(None, "--runs-dir", envvar=RUNS_DIR_ENV, help="Runs directory [default: ./runs].")
QuietOpt = typer.Option(False, "--quiet", "-q", help="Print only results and errors.")
VerboseOpt = typer.Option(False, "--verbose", "-v", help="Print more detail.")


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"flowercli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    pass


# --- download ---------------------------------------------------------------------------------
# --- end download -----------------------------------------------------------------------------

# --- embed ------------------------------------------------------------------------------------
# --- end embed --------------------------------------------------------------------------------

# --- train ------------------------------------------------------------------------------------
# --- end train --------------------------------------------------------------------------------

# --- generate ---------------------------------------------------------------------------------
# --- end generate -----------------------------------------------------------------------------

# --- eval -------------------------------------------------------------------------------------
# --- end eval ---------------------------------------------------------------------------------


def main() -> None:
    app()
