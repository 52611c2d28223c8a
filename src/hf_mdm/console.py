"""The error boundary of every `hf-mdm` command: what a user's input can cause becomes one line on stderr,
`hf-mdm COMMAND: error: MESSAGE`, and exit code 2 (argparse's own form for bad usage); anything else is a bug and
keeps its traceback. Library code raises ValueError (or OSError, ...) and never exits; only this layer does.
"""

import os
import sys
from collections.abc import Callable

from .constants import DEBUG_ENV


def expected_errors() -> tuple[type[BaseException], ...]:
    """What a user's input can cause (a bad value, a missing or unreadable file or folder, an offline Hub id, a
    corrupt weights file, a missing optional package): reported in one line. Anything else is a bug: a traceback."""
    from huggingface_hub.errors import HfHubHTTPError
    from safetensors import SafetensorError

    return (ValueError, OSError, ImportError, HfHubHTTPError, SafetensorError)


def describe(error: BaseException) -> str:
    """One line: the message's lines joined, prefixed by the error's kind where the message alone would not say."""
    text = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, ValueError):
        return text
    if isinstance(error, FileNotFoundError) and error.filename and str(error.filename) not in text:
        text = f"{text}: {error.filename}"
    return f"{type(error).__name__}: {text}"


def run_command(command: str, func: Callable, *args, debug: bool | None = None):
    """Runs `func(*args)`; an expected error is printed as one line and exits with code 2 (a traceback with
    `debug`, or the HF_MDM_DEBUG environment variable)."""
    debug = bool(os.environ.get(DEBUG_ENV)) if debug is None else debug
    try:
        return func(*args)
    except expected_errors() as error:
        if debug:
            raise
        print(f"hf-mdm {command}: error: {describe(error)}", file=sys.stderr)
        raise SystemExit(2) from None
