"""fedlm's own errors: their messages name the field, file or launch setting at fault and the fix, so the ``fedlm``
command prints them as ``fedlm: error: <message>`` without a traceback (``fedlm.cli.errors``). Any other exception
is a bug and keeps its traceback."""


class FedlmError(Exception):
    """Base of every error whose message is meant for the user, not for a debugger."""


class ConfigError(FedlmError, ValueError):
    """A config value that cannot work; the message names the field and what to set instead."""
