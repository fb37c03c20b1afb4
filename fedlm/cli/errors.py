"""fedlm's own errors, which the ``fedlm`` command prints as ``fedlm: error: <message>`` (exit 2) without a traceback.

Their messages say what is wrong and what to change, so a traceback would only bury them; ``FEDLM_TRACEBACK=1``
shows it anyway. Any other exception is a bug, and keeps its traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from fedlm.errors import FedlmError

TRACEBACK_ENV = "FEDLM_TRACEBACK"


def reporting_errors(command: Callable[[], None], cleanup: Callable[[], None]) -> None:
    """Run ``command``; on one of fedlm's own errors print it and exit 2 (every rank under torchrun does, each once)
    after ``cleanup``, unless ``FEDLM_TRACEBACK=1`` asks for the traceback."""
    try:
        command()
    except FedlmError as err:
        if os.environ.get(TRACEBACK_ENV) == "1":
            raise
        cleanup()
        print(f"fedlm: error: {err}\nfedlm: (set {TRACEBACK_ENV}=1 to see the traceback)", file=sys.stderr, flush=True)
        sys.exit(2)
