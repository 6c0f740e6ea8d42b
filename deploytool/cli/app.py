"""Root command: builds the app from one Typer per command group and maps errors to exit codes."""

from __future__ import annotations

import os
import signal
import sys
import threading
import warnings
from typing import Annotated

import typer

from deploytool.cli import bench, commit, demo, doctor, engine, export, serve, train, verify

app = typer.Typer(
    name="deploytool",
    help="Train routed PyTorch models to commit to one expert; export, verify, benchmark and serve them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
for group in (train, commit, export, verify, engine, bench, serve, doctor, demo):
    app.add_typer(group.app)


def _version(value: bool) -> None:
    if value:
        from deploytool import __version__

        typer.echo(f"deploytool {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    debug: Annotated[bool, typer.Option("--debug", envvar="DEPLOYTOOL_DEBUG",
                                        help="Show tracebacks (for bug reports).")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    if debug:
        os.environ["DEPLOYTOOL_DEBUG"] = "1"


def _click_exception_types() -> tuple[type, type]:
    """(ClickException, Abort) of the click that Typer uses: vendored in Typer >= 0.29, else click."""
    try:
        from typer._click.exceptions import ClickException
    except ImportError:
        from click.exceptions import ClickException
    return ClickException, typer.Abort


def main(argv: list[str] | None = None) -> None:
    """Console entry point: every error is one line on stderr with its exit code, never a traceback.

    Exit codes (deploytool.errors): 0 ok, 1 a check failed, 2 bad input (usage errors too), 3 missing
    dependency or hardware, 70 an internal error, 130 interrupted (Ctrl-C, also when a library wrapped
    it in its own error). `--debug` (or DEPLOYTOOL_DEBUG=1) re-raises instead.
    """
    from deploytool.errors import EXIT_INTERRUPTED

    args = sys.argv[1:] if argv is None else argv
    debug = os.environ.get("DEPLOYTOOL_DEBUG") == "1" or "--debug" in args
    if debug:  # --debug is a root option; accepted after the command too, as the error lines suggest
        os.environ["DEPLOYTOOL_DEBUG"] = "1"
        args = [a for a in args if a != "--debug"]
    click_error, abort = _click_exception_types()
    if not debug:  # library warnings (torch's, numpy's) would break the one-line contract of every error
        warnings.simplefilter("ignore")
    _TERMINATED.clear()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminated)  # unwind, so temporary files are removed, then exit 143
    try:
        result = app(args=args, prog_name="deploytool", standalone_mode=False)
        if result == EXIT_INTERRUPTED:  # Typer turns Ctrl-C into a quiet Exit(130)
            typer.echo("interrupted", err=True)
        sys.exit(result if isinstance(result, int) else 0)
    except (KeyboardInterrupt, abort):
        typer.echo("interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except Exception as exc:
        if _TERMINATED:  # SIGTERM arrived, and a library (torch.onnx) wrapped our SystemExit in its own error
            sys.exit(128 + _TERMINATED[-1])
        if _interrupted(exc):
            typer.echo("interrupted", err=True)
            sys.exit(EXIT_INTERRUPTED)
        if debug and not isinstance(exc, click_error):
            raise
        code, line = _report(exc, click_error, args)
        if line:
            typer.echo(line, err=True)
        sys.exit(code)


#: the signal numbers of SIGTERMs received: once one arrived, whatever error unwinds after it is its doing
_TERMINATED: list[int] = []


def _terminated(signum, frame) -> None:
    if not _TERMINATED:
        typer.echo("terminated", err=True)
    _TERMINATED.append(signum)
    raise SystemExit(128 + signum)


def _interrupted(exc: BaseException) -> bool:
    """True when Ctrl-C is behind `exc` (torch.onnx, for one, wraps it in its own error)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def _report(exc: Exception, click_error: type, args: list[str]) -> tuple[int, str]:
    """(exit code, the one line to print) for an exception that reached the top."""
    from deploytool.deps import install_hint
    from deploytool.errors import EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_MISSING, DeployToolError, first_line

    if isinstance(exc, DeployToolError):
        return exc.exit_code, f"error: {first_line(exc)}"
    if isinstance(exc, click_error):  # usage: unknown option, a value that does not parse, a missing argument
        if type(exc).__name__ == "NoArgsIsHelpError":
            exc.show()
            return EXIT_BAD_INPUT, ""
        command = _command_path(args)
        hint = f" (see 'deploytool {command} --help')" if command else " (see 'deploytool --help')"
        return EXIT_BAD_INPUT, f"error: {' '.join(exc.format_message().split())}{hint}"
    if isinstance(exc, ModuleNotFoundError) and exc.name:  # an optional package imported without deps.require
        return EXIT_MISSING, f"error: {exc.name} is not installed: {install_hint(exc.name)}"
    if isinstance(exc, (ValueError, OSError)):  # bad values and paths that reached the library unwrapped
        return EXIT_BAD_INPUT, f"error: {first_line(exc)}"
    if type(exc) is RuntimeError and str(exc).startswith("Symlink loop"):  # pathlib's resolve() on a loop
        return EXIT_BAD_INPUT, f"error: {first_line(exc)}: a path given points, through links, back at itself"
    return EXIT_INTERNAL, (f"internal error: {type(exc).__name__}: {first_line(exc)[:300]} "
                           "(rerun with --debug for the traceback)")


def _command_path(args: list[str]) -> str:
    """The command named in argv (the first word that is a registered command), for the --help hint."""
    names = {c.name for c in typer.main.get_command(app).commands.values()}
    return next((a for a in args if a in names), "")


if __name__ == "__main__":
    main()
