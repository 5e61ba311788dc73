"""Errors raised by pue and the exit codes the command-line tools map them to.

User errors (bad input, missing dependency, broken bundle) are `PueError`s and print as one line.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_GATE_FAILED = 3


class PueError(Exception):
    """An error the user can fix: the message says what was expected, what was found, what to do."""

    exit_code: int = EXIT_ERROR

    def __init__(self, message: str, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(message if hint is None else f"{message} ({hint})")


class InputError(PueError):
    """A bad input item (image, text, array): names the item's index and path where known."""

    def __init__(
        self, message: str, index: int | None = None, path: str | None = None, hint: str | None = None
    ) -> None:
        self.index = index
        self.path = path
        where = []
        if index is not None:
            where.append(f"item {index}")
        if path is not None:
            where.append(str(path))
        prefix = f"{' '.join(where)}: " if where else ""
        super().__init__(prefix + message, hint)


class BundleError(PueError):
    """A bundle that is missing, malformed, tampered with or built for something else."""


class CheckpointError(PueError):
    """A checkpoint directory that cannot be loaded or is not supported."""


class MissingDependencyError(PueError):
    """An optional dependency is not installed; the message names the pip extra."""

    def __init__(self, package: str, extra: str, purpose: str) -> None:
        self.package = package
        self.extra = extra
        packages = package.split(", ")
        what = f"the Python package '{package}', which is" if len(packages) == 1 else f"{package}, which are"
        super().__init__(f"{purpose} needs {what} not installed", f'install it with: pip install "pue[{extra}]"')


class ProviderError(PueError):
    """An execution provider or device that was asked for is not what the session got."""


class OutputExistsError(PueError):
    """An output path exists and --overwrite was not given."""

    def __init__(self, path: str) -> None:
        super().__init__(f"output '{path}' already exists", "pass --overwrite to replace it, or choose another path")


class GateFailedError(PueError):
    """A fidelity gate failed; `report` holds the measurements."""

    exit_code = EXIT_GATE_FAILED

    def __init__(self, message: str, report: dict, report_path: str | None = None) -> None:
        self.report = report
        self.report_path = report_path
        hint = f"measurements written to {report_path}" if report_path else None
        super().__init__(message, hint)
