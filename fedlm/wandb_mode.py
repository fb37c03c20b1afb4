"""Whether a W&B run goes online: one rule for the training runs (``fedlm.cli.tracking``) and the reports
(``fedlm.experiment``), kept below both so that neither imports the other."""

from __future__ import annotations

import netrc
import os
from urllib.parse import urlparse


def has_wandb_credentials() -> bool:
    """Whether wandb could authenticate without prompting: an API key in the environment or in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def default_wandb_mode() -> str:
    """``WANDB_MODE`` when set, else online with credentials and offline without: one rule for every W&B run."""
    return os.environ.get("WANDB_MODE") or ("online" if has_wandb_credentials() else "offline")
