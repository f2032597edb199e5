"""Named points where a test makes this process die or be interrupted, deterministically (no sleeps).

``DIG_CRASH_AT=<point>[:<n>[:INT]]``: the n-th time (default the first) the process passes ``crash_point(point)``
it sends itself SIGKILL (a crash: nothing runs after it), or SIGINT with ``:INT`` (Ctrl-C: KeyboardInterrupt in
the main thread). Unset, a crash point costs one environment lookup. The points are named where they are placed
(``data_prep.runner``: ``pair-listed`` between the manifest line and stats.json, ``pair-committed`` after both).
"""

from __future__ import annotations

import os
import signal
import threading

ENV = "DIG_CRASH_AT"
_passes: dict[str, int] = {}
_lock = threading.Lock()


def crash_point(name: str) -> None:
    spec = os.environ.get(ENV)
    if not spec or spec.split(":", 1)[0] != name:
        return
    _, _, rest = spec.partition(":")
    count, _, how = rest.partition(":")
    with _lock:
        _passes[name] = _passes.get(name, 0) + 1
        hit = _passes[name] == int(count or 1)
    if hit:
        os.kill(os.getpid(), signal.SIGINT if how.upper() == "INT" else signal.SIGKILL)
