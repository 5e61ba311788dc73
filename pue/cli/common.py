"""Shared CLI plumbing: one-line errors with the right exit code, --debug for tracebacks, rich output.

Nothing printed is parsed as rich markup: the consoles are made with `markup=False`, so text from a checkpoint, a
bundle, a file name or the user (`[INST]`, `[bold]`) prints literally; the program's own styling is `rich.text.Text`
(`styled`, `verdict`, `progress_printer`).
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer

from pue.errors import EXIT_ERROR, PueError

F = TypeVar("F", bound=Callable[..., Any])

_state = {"debug": False}

# The gate's options, one definition for every command that gates a bundle (quantize, trt, floor); the defaults are
# `pue.fidelity.FidelityThresholds`' (None keeps them: `FidelityThresholds.with_overrides`)
HELDOUT_OPTION = typer.Option(None, "--heldout", help="Held-out patch folder for the gate; default: the shipped ones.")
GATE_MEAN_OPTION = typer.Option(None, "--gate-mean", help="Fidelity gate: minimum mean cosine (default 0.995).")
GATE_MIN_OPTION = typer.Option(None, "--gate-min", help="Fidelity gate: minimum per-item cosine (default 0.98).")
GATE_TOP1_OPTION = typer.Option(None, "--gate-top1", help="Fidelity gate: minimum top-1 self-retrieval (default 0.98).")


def set_debug(debug: bool) -> None:
    _state["debug"] = debug
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def console(stderr: bool = True) -> Any:
    """A rich console that prints every string literally (no markup, no emoji codes, no highlighting)."""
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, markup=False, emoji=False)


def styled(text: str, style: str) -> Any:
    """`text` in `style`, never parsed as markup."""
    from rich.text import Text

    return Text(text, style=style)


def verdict(passed: bool, passed_text: str = "pass", failed_text: str = "FAIL") -> Any:
    return styled(passed_text, "green") if passed else styled(failed_text, "red")


def progress_printer(out: Any) -> Callable[[str], None]:
    """A progress callback for the library: a dim bullet, then the message as plain text."""
    from rich.text import Text

    return lambda message: out.print(Text.assemble(("· ", "dim"), str(message)))


def handle_errors(func: F) -> F:
    """PueError → one line on stderr and its exit code (no traceback unless --debug)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except PueError as exc:
            if _state["debug"]:
                raise
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            typer.echo("interrupted (outputs are written atomically: no partial bundle is left behind)", err=True)
            raise typer.Exit(130) from None
        except (typer.Exit, typer.Abort):
            raise
        except Exception as exc:  # a bug: keep the traceback behind --debug, but say what happened
            if _state["debug"]:
                raise
            typer.echo(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", err=True)
            raise typer.Exit(EXIT_ERROR) from None

    return wrapper  # type: ignore[return-value]


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
