"""fedlm's own errors, which the ``fedlm`` command prints as ``fedlm: error: <message>`` (exit 2) without a traceback.

Their messages say what is wrong and what to change, so a traceback would only bury them; ``FEDLM_TRACEBACK=1``
shows it anyway. Any other exception is a bug, and keeps its traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from fedlm.checkpointing import CheckpointError
from fedlm.data import DataError
from fedlm.federation.topology import TopologyError
from fedlm.model import BackboneNotFoundError, CheckpointMismatchError
from fedlm.model.export import PeftLayoutError, PromptFormatError
from fedlm.model.template import TemplateError

TRACEBACK_ENV = "FEDLM_TRACEBACK"


class ConfigError(ValueError):
    """A config value that a class rejected while the CLI built the run from its config."""


FEDLM_ERRORS = (
    ConfigError,
    DataError,
    TemplateError,
    TopologyError,
    CheckpointError,
    CheckpointMismatchError,
    BackboneNotFoundError,
    PromptFormatError,
    PeftLayoutError,
)


@contextmanager
def config_errors() -> Iterator[None]:
    """A plain ValueError raised while a run's classes are built from its config is the config's (every config check
    in fedlm raises one naming the field); its subclasses are left as they are."""
    try:
        yield
    except ValueError as err:
        if type(err) is not ValueError:
            raise
        raise ConfigError(str(err)) from err


def reporting_errors(command: Callable[[], None], cleanup: Callable[[], None]) -> None:
    """Run ``command``; on one of fedlm's own errors print it and exit 2 (every rank under torchrun does, each once)
    after ``cleanup``, unless ``FEDLM_TRACEBACK=1`` asks for the traceback."""
    try:
        command()
    except FEDLM_ERRORS as err:
        if os.environ.get(TRACEBACK_ENV) == "1":
            raise
        cleanup()
        print(f"fedlm: error: {err}\nfedlm: (set {TRACEBACK_ENV}=1 to see the traceback)", file=sys.stderr, flush=True)
        sys.exit(2)
