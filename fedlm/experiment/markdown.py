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


def table_rows(text: str) -> tuple[list[str], list[list[str]]]:
    """The header and the rows' cells of the first table in ``text`` as ``table`` wrote them: what a report keeps
    of rows made in an earlier session, whose runs are gone."""
    lines = text.splitlines()
    first = next((i for i, line in enumerate(lines) if line.startswith("| ")), None)
    if first is None:
        raise ValueError("no Markdown table to merge into")
    end = next((i for i in range(first, len(lines)) if not lines[i].startswith("|")), len(lines))
    header, *rows = [line[2:-2].split(" | ") for line in lines[first:end] if line.startswith("| ")]
    return header, rows


def sections(text: str) -> list[tuple[str, list[str]]]:
    """``text`` cut at its ``## `` headings: (heading, its lines, starting with the heading line), in order; the
    lines before the first heading come under the heading ``""``."""
    cut: list[tuple[str, list[str]]] = [("", [])]
    for line in text.splitlines():
        if line.startswith("## "):
            cut.append((line.removeprefix("## "), []))
        cut[-1][1].append(line)
    return cut


def put_section(text: str, title: str, lines: list[str]) -> list[str]:
    """``text``'s lines with its section ``title`` replaced by ``lines`` (which start with its heading), or with
    ``lines`` added at the end when it has no such section."""
    cut = sections(text)
    if any(heading == title for heading, _ in cut):
        cut = [(heading, lines if heading == title else part) for heading, part in cut]
    else:
        cut.append((title, lines))
    joined: list[str] = []
    for _, part in cut:  # one blank line between sections, whatever each ended with
        part = "\n".join(part).strip("\n").splitlines()
        joined += ([""] if joined and part else []) + part
    return joined


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
