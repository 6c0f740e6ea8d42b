"""Root command: builds the app from one Typer per command group and maps errors to exit codes."""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from deploytool.cli import bench, demo, doctor, engine, export, serve, train, verify

app = typer.Typer(
    name="deploytool",
    help="Train routed PyTorch models to commit to one expert; export, verify, benchmark and serve them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
for group in (train, export, verify, engine, bench, serve, doctor, demo):
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
    dependency or hardware, 130 interrupted. `--debug` (or DEPLOYTOOL_DEBUG=1) re-raises instead.
    """
    from deploytool.errors import EXIT_BAD_INPUT, EXIT_CHECK_FAILED, DeployToolError

    args = sys.argv[1:] if argv is None else argv
    debug = os.environ.get("DEPLOYTOOL_DEBUG") == "1" or "--debug" in args
    click_error, abort = _click_exception_types()
    try:
        result = app(args=args, prog_name="deploytool", standalone_mode=False)
        sys.exit(result if isinstance(result, int) else 0)
    except DeployToolError as exc:
        if debug:
            raise
        typer.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except (KeyboardInterrupt, abort):
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except click_error as exc:  # usage: unknown option, a value that does not parse, a missing argument
        if type(exc).__name__ == "NoArgsIsHelpError":
            exc.show()
        else:
            command = _command_path(args)
            hint = f" (see 'deploytool {command} --help')" if command else " (see 'deploytool --help')"
            typer.echo(f"error: {' '.join(exc.format_message().split())}{hint}", err=True)
        sys.exit(EXIT_BAD_INPUT)
    except (ValueError, OSError) as exc:  # bad values and paths that reached the library unwrapped
        if debug:
            raise
        typer.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_BAD_INPUT)
    except Exception as exc:  # a bug: one line, the traceback behind --debug
        if debug:
            raise
        typer.echo(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", err=True)
        sys.exit(EXIT_CHECK_FAILED)


def _command_path(args: list[str]) -> str:
    """The command named in argv (the first word that is a registered command), for the --help hint."""
    names = {c.name for c in typer.main.get_command(app).commands.values()}
    return next((a for a in args if a in names), "")


if __name__ == "__main__":
    main()
