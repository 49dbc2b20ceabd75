"""The one error path of every ``streamfuse`` command.

A :class:`~streamfuse.errors.StreamfuseError` that reaches a command line becomes
``error: <message>`` on stderr and exit status 2; its message says what is wrong and how
to fix it, so a traceback would add nothing. Any other exception is a bug and keeps its
traceback. Every command group is made with :func:`new_typer`, whose group runs its
commands inside :func:`cli_errors`; a command that is also mounted on its own (``train``,
``record``, ``replay``) wears ``@cli_errors()`` as well.
"""

from __future__ import annotations

import contextlib
from typing import Any

import typer
from rich.console import Console
from rich.text import Text
from typer.core import TyperGroup

from streamfuse.errors import StreamfuseError

EXIT_ERROR = 2
_stderr = Console(stderr=True, highlight=False)


class cli_errors(contextlib.ContextDecorator):  # noqa: N801 - used like a function: `with cli_errors():`
    """Turn a :class:`StreamfuseError` into ``error: ...`` on stderr and exit status 2,
    as a context manager or as a command's decorator (``@cli_errors()``)."""

    def __enter__(self) -> cli_errors:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is not None and isinstance(exc, StreamfuseError):
            # Text: a message may hold [brackets]; one line per message however wide the terminal
            _stderr.print(Text.assemble(("error: ", "red"), str(exc)), soft_wrap=True)
            raise typer.Exit(EXIT_ERROR) from None
        return False


class ErrorsGroup(TyperGroup):
    """A command group whose commands run inside :func:`cli_errors`."""

    def invoke(self, ctx: Any) -> Any:
        with cli_errors():
            return super().invoke(ctx)


def new_typer(**options: Any) -> typer.Typer:
    """A ``typer.Typer`` command group with the project's error path and defaults
    (help when run without a command, no shell-completion options, no pretty tracebacks)."""
    defaults = {"no_args_is_help": True, "add_completion": False, "pretty_exceptions_enable": False}
    return typer.Typer(cls=ErrorsGroup, **{**defaults, **options})
