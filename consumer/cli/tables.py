"""Tables on stdout, drawn by rich: columns sized to the content and the terminal.

Widths are never guessed by hand (a hand-padded table once had five widths for six cells and
silently dropped its last column, the error). On a terminal the table fits its width, long
cells folding onto further lines. Off a terminal, stdout is a pipe or a file with no width of
its own (rich would assume 80 columns and squeeze the rows): there the table is as wide as its
content, one line per row with no trailing blanks, so ``grep``, ``awk`` and ``cut`` work on it.

rich is imported inside the functions: every command module imports this one, and ``leveret
worker`` must not pay rich's memory for tables it never draws (tests/package/test_lean_imports.py).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from rich.table import Table

# Never narrower than this off a terminal, even for a table of short cells.
PIPE_MIN_WIDTH = 80


def plain_table() -> Table:
    """Columns separated by two spaces, no borders: each line reads as whitespace-separated
    fields, the first being the row's name or id."""
    from rich.table import Table

    return Table(box=None, show_edge=False, pad_edge=False)


def print_table(table: Table) -> None:
    """Print ``table`` on stdout (see the module docstring for the width it gets)."""
    from rich.console import Console

    if sys.stdout.isatty():
        Console(file=sys.stdout, highlight=False).print(table)
        return
    natural = Console(width=1_000_000, no_color=True).measure(table).maximum
    console = Console(width=max(PIPE_MIN_WIDTH, natural), no_color=True, highlight=False)
    with console.capture() as captured:
        console.print(table)
    for line in captured.get().splitlines():
        click.echo(line.rstrip())
