"""Placeholder while this command group is being built."""

import typer

app = typer.Typer()
