"""A report's Markdown file and the command line that writes it: the parts every report shares, so that tables,
hand-written notes and the line that rebuilds a report look the same in each."""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Sequence
from pathlib import Path


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A Markdown table, one line per row; cells are given formatted."""
    first, *rest = [f"| {' | '.join(cells)} |" for cells in (header, *rows)]
    return "\n".join([first, "|" + "---|" * len(header), *rest])


def appendix(notes: Path | None) -> list[str]:
    """A hand-written Markdown file (the reading a computed table cannot give) as lines after a blank one; none
    without a file."""
    return ["", notes.read_text().strip()] if notes is not None else []


def write(out: Path, lines: list[str]) -> Path:
    """The report's lines to ``out`` (its folder made), ending in a newline."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    return out


def command_line(prog: str, runs: Path, out: Path, notes: Path | None) -> str:
    """The command that rebuilds a report from its runs, as the report prints it."""
    return f"{prog} {runs} --out {out}" + (f" --notes {notes}" if notes else "")


def parser(prog: str, doc: str, runs: str, nargs: str | None = None) -> argparse.ArgumentParser:
    """A report's command line, described by the first paragraph of its module's ``doc``: the runs' folder(s)
    (``runs`` says which) and ``--notes``; each report adds its ``--out`` and its own options."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    parser.add_argument("runs", type=Path, nargs=nargs, help=runs)
    parser.add_argument("--notes", type=Path, default=None, help="hand-written Markdown (the reading) to copy in")
    return parser


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """The arguments, refused before any run is read when ``--notes`` names no file."""
    args = parser.parse_args(argv)
    if args.notes is not None and not args.notes.is_file():
        parser.error(f"--notes {args.notes}: no such file")
    return args
