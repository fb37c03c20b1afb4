"""The documentation: the options page is what the code renders, the README stays short, and no link is dead."""

from __future__ import annotations

import functools
import importlib.util
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README_LIMIT = 12_500  # bytes: the README is the front page; the rest lives in docs/
# [text](target) and ![alt](target); the target ends at whitespace or ')' (an optional "title" is left out)
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)


@functools.cache
def options_doc():
    """scripts/options_doc.py as a module (registered, since its dataclass needs its module in sys.modules)."""
    spec = importlib.util.spec_from_file_location("options_doc", REPO / "scripts" / "options_doc.py")
    module = sys.modules["options_doc"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def markdown_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def relative_links(text: str) -> list[str]:
    """Link targets outside code blocks and code spans, minus web and mail links and pure #anchors."""
    prose = re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))
    targets = [match.group(1) for match in LINK.finditer(prose)]
    return [t for t in targets if not re.match(r"^(https?:|mailto:|#)", t)]


def dead_links(path: Path) -> list[str]:
    return [
        target
        for target in relative_links(path.read_text(encoding="utf-8"))
        if not (path.parent / target.split("#", 1)[0]).resolve().exists()
    ]


def test_options_page_is_what_the_code_renders():
    generator = options_doc()
    rendered = generator.render()
    page = generator.OUT.read_text(encoding="utf-8") if generator.OUT.is_file() else ""
    assert page == rendered, (
        f"docs/options.md differs from the config classes' docstrings and signatures; regenerate it with "
        f"`{generator.COMMAND}` and commit the result."
    )


def test_options_page_covers_every_config_section():
    page = (REPO / "docs" / "options.md").read_text(encoding="utf-8")
    for heading in ("model", "model.encoder", "data.init_args.partition", "federation", "federation.server",
                    "federation.dp", "federation.secure_aggregation"):  # fmt: skip
        assert f"\n## {heading}\n" in page, heading
    assert "| `clients` | `int` | required |" in page  # types and defaults come from the dataclass


def test_args_entries_are_parsed_with_shared_names_and_continuation_lines():
    generator = options_doc()
    doc = "The section.\n\nArgs:\n    a, b: first line\n        continued.\n    c: one line.\n\nReturns:\n    x: no arg"
    summary, entries = generator.parse_args_section(doc)
    assert summary == "The section."
    assert entries == [(["a", "b"], "first line continued."), (["c"], "one line.")]


def test_a_docstring_entry_for_a_field_the_class_lacks_is_refused():
    generator = options_doc()

    class Stale:
        """A class whose docstring outlived one of its fields.

        Args:
            kept: a field that exists.
            gone: a field that was removed.
        """

        def __init__(self, kept: int = 1) -> None:
            self.kept = kept

    with pytest.raises(ValueError, match="gone"):
        generator.options(Stale)


def test_readme_is_short():
    size = (REPO / "README.md").stat().st_size
    assert size <= README_LIMIT, f"README.md is {size} bytes, over {README_LIMIT}: move detail to docs/*.md, link it"


def test_every_relative_link_points_at_a_file_in_the_repository():
    dead = {str(path.relative_to(REPO)): links for path in markdown_files() if (links := dead_links(path))}
    assert not dead, f"links to files that do not exist: {dead}"


def test_the_link_check_finds_a_dead_link(tmp_path):
    (tmp_path / "there.md").write_text("x")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](there.md#part) [web](https://example.com/x.md) [anchor](#top) `[code](gone.md)`\n"
        "```\n[fenced](gone.md)\n```\n![img](missing.png) [dead](docs/nowhere.md)\n"
    )
    assert dead_links(page) == ["missing.png", "docs/nowhere.md"]
