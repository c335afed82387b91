"""The one switch for progress bars that libraries draw (transformers' weight loading, datasets' writers): quantlm's
own bars (blocks, steps, batches) are the progress a user follows, and an error stays one line."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


def set_library_bars(enabled: bool) -> bool:
    """Turn the libraries' bars on or off; returns whether transformers' were on before."""
    try:
        import transformers.utils.logging as tlog
    except ImportError:
        return False
    was = tlog.is_progress_bar_enabled()
    (tlog.enable_progress_bar if enabled else tlog.disable_progress_bar)()
    try:
        import datasets

        (datasets.enable_progress_bars if enabled else datasets.disable_progress_bars)()
    except ImportError:
        pass
    return was


@contextlib.contextmanager
def quiet_library_bars() -> Iterator[None]:
    """No library bars inside the block; the previous state is restored after it."""
    was = set_library_bars(False)
    try:
        yield
    finally:
        if was:
            set_library_bars(True)
