"""The documentation: the options page is what the code renders."""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@functools.cache
def options_doc():
    """scripts/options_doc.py as a module (registered, since its dataclass needs its module in sys.modules)."""
    spec = importlib.util.spec_from_file_location("options_doc", REPO / "scripts" / "options_doc.py")
    module = sys.modules["options_doc"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
