"""Write docs/options.md: one Markdown table per config section, rendered from the code.

Types and defaults come from ``dataclasses.fields`` and ``inspect.signature``; descriptions from each class's
Google-style ``Args:`` docstring (``name: text`` or ``a, b: text`` entries, continuation lines indented), or, for a
dataclass field the docstring does not describe, from the comment at the end of the field's line. The page is
never edited by hand, so that it cannot drift from the code: ``tests/test_docs.py`` fails when it differs from
what this script renders now.

    python scripts/options_doc.py            # rewrite docs/options.md
    python scripts/options_doc.py --check    # exit 1 if docs/options.md is stale
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import inspect
import io
import json
import re
import sys
import tokenize
import types
import typing
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "options.md"
COMMAND = "python scripts/options_doc.py"

# (heading: where the options go in a config, the class by its public name). Order is the page's order.
SECTIONS = [
    ("model", "fedlm.ptuning.PTuningModule"),
    ("model.task", "fedlm.tasks.config.TaskConfig"),
    ("model.task.decoding", "fedlm.model.decoding.DecodingConfig"),
    ("model.encoder", "fedlm.model.PromptEncoderConfig"),
    ("model.cache", "fedlm.ptuning.config.CacheConfig"),
    ("model.optimizer", "fedlm.ptuning.config.OptimizerConfig"),
    ("model.dp_sgd", "fedlm.ptuning.dp_sgd.DPSGDConfig"),
    ("data.init_args (every data module)", "fedlm.data.TaskData"),
    ("data.init_args (FinancialPhraseBank)", "fedlm.data.FinancialPhraseBank"),
    ("data.init_args (RecordFiles)", "fedlm.data.RecordFiles"),
    ("data.init_args (WordNet)", "fedlm.data.wordnet.WordNet"),
    ("data.init_args.partition", "fedlm.data.partition.PartitionConfig"),
    ("federation", "fedlm.federation.FederationConfig"),
    ("federation.server", "fedlm.federation.ServerConfig"),
    ("federation.dp", "fedlm.federation.privacy.DPConfig"),
    ("federation.secure_aggregation", "fedlm.federation.SecureAggregationConfig"),
    ("federation.robust", "fedlm.federation.robust.RobustConfig"),
    ("federation.poison", "fedlm.federation.robust.PoisonConfig"),
    ("federation.enrollment", "fedlm.federation.enrollment.EnrollmentConfig"),
    ("wandb", "fedlm.cli.tracking.WandbConfig"),
    ("fedlm experiment", "fedlm.experiment.runner.TriadConfig"),
]


@dataclasses.dataclass
class Option:
    name: str
    type: Any  # an annotation: resolved where possible, else its source text
    default: Any  # inspect.Parameter.empty: required
    description: str = ""


def load(path: str) -> type:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def own_docstring(cls: type) -> str:
    """The class's docstring, or '' for the signature dataclasses write when there is none."""
    doc = cls.__dict__.get("__doc__") or ""
    return "" if doc.startswith(f"{cls.__name__}(") else inspect.cleandoc(doc)


def parse_args_section(doc: str) -> tuple[str, list[tuple[list[str], str]]]:
    """(the text before ``Args:``, its entries as (field names, description)); ``a, b: text`` names two fields."""
    lines = doc.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == "Args:"), None)
    if start is None:
        return doc.strip(), []
    summary = "\n".join(lines[:start]).strip()
    base = len(lines[start]) - len(lines[start].lstrip())
    entries: list[tuple[list[str], list[str]]] = []
    entry_indent = None
    for line in lines[start + 1 :]:
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        if indent <= base:
            break  # the next section (Returns:, Raises:, ...)
        if entry_indent is None:
            entry_indent = indent
        if indent == entry_indent:
            names, sep, text = line.strip().partition(":")
            if not sep:
                raise ValueError(f"an Args: entry without 'name: text': {line.strip()!r}")
            entries.append(([n.strip().lstrip("*") for n in names.split(",")], [text.strip()]))
        else:
            entries[-1][1].append(line.strip())
    return summary, [(names, " ".join(text).strip()) for names, text in entries]


def field_comments(cls: type) -> dict[str, str]:
    """Dataclass fields' end-of-line comments (``name: int = 1  # what it is``)."""
    try:
        source = inspect.cleandoc("\n" + inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    comments = {tok.start[0]: tok.string.lstrip("#").strip() for tok in tokens if tok.type == tokenize.COMMENT}
    body = ast.parse(source).body[0].body
    return {
        node.target.id: comments[node.lineno]
        for node in body
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.lineno in comments
    }


def dataclass_options(cls: type) -> list[Option]:
    hints = resolved_hints(cls)
    found = []
    for f in dataclasses.fields(cls):
        default = f.default
        if default is dataclasses.MISSING:
            made = f.default_factory is not dataclasses.MISSING
            default = f.default_factory() if made else inspect.Parameter.empty
        found.append(Option(f.name, hints.get(f.name, f.type), default))
    return found


def init_options(cls: type) -> list[Option]:
    """The ``__init__`` arguments after ``self``; ``**kwargs`` is kept (its docstring entry says where they go)."""
    hints = resolved_hints(cls.__init__)
    found = []
    for p in list(inspect.signature(cls.__init__).parameters.values())[1:]:
        if p.kind is p.VAR_KEYWORD:
            found.append(Option("**" + p.name, None, p.default))
        else:
            found.append(Option(p.name, hints.get(p.name, p.annotation), p.default))
    return found


def options(cls: type) -> tuple[str, list[Option], list[list[str]]]:
    """The class's summary, its options, and the groups of options one docstring entry describes together."""
    summary, entries = parse_args_section(own_docstring(cls))
    described = {name: text for names, text in entries for name in names}
    is_dataclass = dataclasses.is_dataclass(cls)
    found = dataclass_options(cls) if is_dataclass else init_options(cls)
    comments = field_comments(cls) if is_dataclass else {}
    unknown = sorted(set(described) - {o.name.lstrip("*") for o in found})
    if unknown:
        raise ValueError(f"{cls.__name__}'s Args: docstring describes {unknown}, which it does not take")
    for option in found:
        key = option.name.lstrip("*")
        option.description = described.get(key) or comments.get(key, "")
    return summary, found, [names for names, _ in entries if len(names) > 1]


def resolved_hints(obj: Any) -> dict[str, Any]:
    try:
        return typing.get_type_hints(obj)
    except Exception:  # a name only imported under TYPE_CHECKING: keep the annotations' source text
        return {}


def type_text(annotation: Any) -> str:
    if annotation is None or annotation is inspect.Parameter.empty:
        return ""
    if isinstance(annotation, str):
        return annotation
    if annotation is type(None):
        return "None"
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(json.dumps(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_text(a) for a in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(type_text(a) for a in args)}]"
    return getattr(annotation, "__name__", str(annotation))


def value_text(value: Any) -> str:
    """A default as it is written in YAML."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return re.sub(r"e([+-])0*(\d)", r"e\1\2", repr(value))
    if isinstance(value, (int, str)):
        return str(value)
    return json.dumps(value)


def joined(cells: list[str]) -> str:
    """The cells of the fields one entry describes: once if they are all alike."""
    return cells[0] if len(set(cells)) == 1 else ", ".join(cells)


def code(text: str) -> str:
    return f"`{text}`" if text else ""


def cell(text: str) -> str:
    """Docstring text as a table cell: ``rst`` literals as Markdown code, pipes escaped."""
    return re.sub(r"``(.+?)``", r"`\1`", text).replace("|", "\\|")


def render() -> str:
    anchors = {load(path): slug(heading) for heading, path in SECTIONS}

    def type_cell(annotation: Any) -> str:
        union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
        parts = typing.get_args(annotation) if union else (annotation,)
        if not any(part in anchors for part in parts):
            return cell(code(type_text(annotation)))
        # a class with a section of its own: link to it
        return " \\| ".join(f"[`{p.__name__}`](#{anchors[p]})" if p in anchors else code(type_text(p)) for p in parts)

    def default_cell(option: Option) -> str:
        if option.name.startswith("**"):
            return ""
        if option.default is inspect.Parameter.empty:
            return "required"
        if type(option.default) in anchors:
            return f"[its defaults](#{anchors[type(option.default)]})"
        return cell(code(value_text(option.default)))

    def rows(found: list[Option], groups: list[list[str]]) -> list[str]:
        """One row per docstring entry: ``a, b: text`` gives one row for both fields."""
        by_name = {o.name.lstrip("*"): o for o in found}
        done: set[str] = set()
        out = []
        for option in found:
            key = option.name.lstrip("*")
            if key in done:
                continue
            group = next((g for g in groups if key in g), [key])
            done.update(group)
            members = [by_name[name] for name in group]
            names = ", ".join(code(o.name) for o in members)
            kinds = joined([type_cell(o.type) for o in members])
            defaults = joined([default_cell(o) for o in members])
            out.append(f"| {names} | {kinds} | {defaults} | {cell(option.description)} |")
        return out

    lines = [
        "# Options",
        "",
        f"Generated by `{COMMAND}` from the config classes' docstrings and signatures: do not edit by hand;",
        "change the docstring, then rerun the command (`tests/test_docs.py` fails while this page is stale).",
        "",
        "Each section is a part of a `fedlm fit` config (`data.init_args` is the data module's; `fedlm experiment`",
        "takes its own config). Any field can be set in a YAML file or on the command line, e.g.",
        "`--model.encoder.virtual_tokens 20`.",
        "",
        *(f"- [{heading}](#{slug(heading)})" for heading, _ in SECTIONS),
    ]
    for heading, path in SECTIONS:
        summary, found, groups = options(load(path))
        intro = f"`{path}`" + (f": {' '.join(cell(summary).split())}" if summary else "")
        lines += ["", f"## {heading}", "", intro, "", "| field | type | default | description |", "|---|---|---|---|"]
        lines += rows(found, groups)
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/options.md differs from the code")
    check = parser.parse_args().check
    text = render()
    if check:
        stale = not OUT.is_file() or OUT.read_text(encoding="utf-8") != text
        print(f"{OUT.relative_to(REPO)} is {'stale: run ' + COMMAND if stale else 'up to date'}")
        return int(stale)
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))  # this checkout's fedlm, whatever is installed
    sys.exit(main())
