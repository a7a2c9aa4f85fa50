"""Shorter waits when a Flower message's parts are not there yet.

Flower 1.41 sends a message as a tree of objects (one per array, plus the records and
the message itself), pushed and pulled one by one. A receiver that asks for an object
the sender has not pushed yet is told it is unavailable and retries after 1 s, then 2,
4, 8 and 10 s (``PULL_INITIAL_BACKOFF``, ``PULL_BACKOFF_CAP``). In a round that is the
common case, not the exception: a SuperNode learns of a message as soon as the
ServerApp registers it, before the arrays arrive, and its ClientApp asks for them while
the SuperNode is still pulling them from the SuperLink. Measured with ten hospitals on
one machine: about 7 s of every round's 20 went into such sleeps in the ClientApp's
pull alone.

:func:`shorten_pull_backoff` makes this process retry after 0.05 s, doubling to at most
1 s, and allows more tries so the longest wait for one object stays what Flower allows
(tens of minutes, for big models on slow links). It changes the defaults of Flower's
two pull functions, which every caller in Flower uses.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

INITIAL_BACKOFF = 0.05
BACKOFF_CAP = 1.0
MAX_TRIES = 10_000  # Flower's 500 tries at up to 10 s each, at up to 1 s each


def _set_defaults(fn: Callable[..., Any], **values: object) -> None:
    """Replace keyword defaults of ``fn`` by name (positional and keyword-only)."""
    params = inspect.signature(fn).parameters
    missing = set(values) - set(params)
    if missing:
        raise RuntimeError(f"{fn.__qualname__} has no parameters {sorted(missing)}")
    positional = [
        p.name
        for p in params.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is not p.empty
    ]
    if fn.__defaults__:
        defaults = list(fn.__defaults__)
        for i, name in enumerate(positional):
            if name in values:
                defaults[i] = values[name]
        fn.__defaults__ = tuple(defaults)
    kw = dict(fn.__kwdefaults__ or {})
    kw.update({k: v for k, v in values.items() if k in kw})
    fn.__kwdefaults__ = kw or None


def shorten_pull_backoff() -> None:
    """Apply the shorter retry schedule to Flower's object pulls in this process."""
    from flwr.supercore.inflatable import inflatable_utils as iu

    waits = {
        "initial_backoff": INITIAL_BACKOFF,
        "backoff_cap": BACKOFF_CAP,
        "max_tries_per_object": MAX_TRIES,
    }
    _set_defaults(iu.pull_objects, **waits)
    _set_defaults(iu.pull_and_inflate_object_from_tree, **waits)


def bound_pull_time(seconds: float) -> None:
    """Give up pulling a message's parts after ``seconds`` (Flower's default: 2 hours).

    A hospital killed while it uploads its reply leaves the reply registered at the
    SuperLink and its parts missing; the ServerApp, pulling them, would wait until
    the SuperLink drops the upload (about 3 minutes) however short ``--round-timeout``
    is. Flower then turns the reply into an error, which the round records as that
    hospital's failure.
    """
    from flwr.supercore.inflatable import inflatable_utils as iu

    _set_defaults(iu.pull_objects, max_time=seconds)
    _set_defaults(iu.pull_and_inflate_object_from_tree, max_time=seconds)
