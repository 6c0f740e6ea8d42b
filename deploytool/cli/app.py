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


def main(argv: list[str] | None = None) -> None:
    """Console entry point: DeployToolError -> one line on stderr and its exit code, never a traceback.

    Typer's standalone mode handles usage errors (exit 2) and --help; everything ends in SystemExit.
    """
    from deploytool.errors import EXIT_BAD_INPUT, EXIT_CHECK_FAILED, DeployToolError

    args = sys.argv[1:] if argv is None else argv
    debug = os.environ.get("DEPLOYTOOL_DEBUG") == "1" or "--debug" in args
    try:
        app(args=args, prog_name="deploytool")
    except DeployToolError as exc:
        if debug:
            raise
        typer.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
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


if __name__ == "__main__":
    main()
