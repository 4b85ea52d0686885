"""Clean-up that a signal cannot cut short: once it starts, the jobs are cancelled whatever arrives.

``down``, and ``up``/``submit`` stopping their deployment (after Ctrl-C, a failure or the batch's end), look
at the jobs (squeue, sacct: up to 20 s each when slurmctld is slow) and then cancel them. With Python's
default handling a second Ctrl-C (or a SIGTERM, SIGHUP) in the look raised KeyboardInterrupt there, and the
jobs stayed queued or running. Inside :func:`held_signals` SIGINT, SIGTERM and SIGHUP are held instead:

* a signal during a :func:`look` (what the report says: which jobs had ended already) ends the look at once,
  and the clean-up goes straight on to the cancel;
* a signal anywhere else is only noted, so ``scancel`` always runs to its end;
* when the outermost hold ends (the cancel issued), a signal that came is handed to the handler that was
  there before (Ctrl-C's KeyboardInterrupt): what follows (the wait for the jobs to end, the report) is
  skipped. When the hold began while an exception was being handled (clean-up after Ctrl-C or a failure,
  which raises anyway), nothing is handed on.

Only the main thread's handlers can change: elsewhere (a handover successor's start in its thread) the hold
does nothing.
"""

from __future__ import annotations

import signal
import sys
import threading
import types
import typing as tp

T = tp.TypeVar("T")

HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

Handler = tp.Callable[[int, types.FrameType | None], tp.Any] | int | signal.Handlers | None


class _LookCutShort(BaseException):
    """Raised by the held-signal handler inside a :func:`look` (a BaseException: no ``except Exception`` of
    the code looking swallows it)."""


class _Hold:
    def __init__(self) -> None:
        self.depth = 0
        self.looking = False
        self.held: list[int] = []
        self.previous: dict[int, Handler] = {}
        self.hand_on = True


_hold = _Hold()


def _on_signal(signum: int, frame: types.FrameType | None) -> None:
    _hold.held.append(signum)
    if _hold.looking:
        _hold.looking = False  # one signal ends the look; any later one is only noted
        raise _LookCutShort


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


class held_signals:  # noqa: N801 - used as a function: ``with held_signals():``
    """Hold SIGINT, SIGTERM and SIGHUP until the block ends (nested holds: until the outermost one ends)."""

    def __enter__(self) -> held_signals:
        if not _main_thread():
            return self
        if _hold.depth == 0:
            _hold.held = []
            _hold.looking = False
            # Begun while an exception is handled (after Ctrl-C, a failure): the caller raises anyway.
            _hold.hand_on = sys.exc_info()[1] is None
            _hold.previous = {sig: signal.getsignal(sig) for sig in HELD_SIGNALS}
            for sig in HELD_SIGNALS:
                signal.signal(sig, _on_signal)
        _hold.depth += 1
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: types.TracebackType | None) -> None:
        if not _main_thread() or _hold.depth == 0:
            return
        _hold.depth -= 1
        if _hold.depth:
            return
        for sig, handler in _hold.previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        held, previous = list(_hold.held), dict(_hold.previous)
        _hold.held, _hold.previous = [], {}
        if held and _hold.hand_on and exc_type is None:
            _hand_on(held[0], previous.get(held[0]))

    @property
    def signalled(self) -> bool:
        """A signal came during the hold so far."""
        return bool(_hold.held)


def _hand_on(signum: int, handler: Handler) -> None:
    """What ``signum`` would have done without the hold: Ctrl-C's KeyboardInterrupt, as a rule."""
    if callable(handler):
        handler(signum, None)
    elif handler == signal.SIG_DFL:
        signal.raise_signal(signum)


def look(fn: tp.Callable[[], T]) -> T | None:
    """``fn()``, or None when a held signal came before or during it (inside :func:`held_signals`: the
    look is only for the report, the cancel must not wait for it). Outside a hold: just ``fn()``."""
    if not _main_thread() or _hold.depth == 0:
        return fn()
    if _hold.held:
        return None  # a signal came already: straight on to the cancel
    try:
        _hold.looking = True
        try:
            return fn()
        finally:
            _hold.looking = False
    except _LookCutShort:
        return None


def signalled() -> bool:
    """A signal came during the current hold (False outside one)."""
    return bool(_hold.held) and _hold.depth > 0
