"""What every command-line tool shares: bad input and Ctrl-C end as a message and an exit status
(2 and 130), never a traceback."""

from __future__ import annotations

import os
import sys
import threading
from typing import Callable

from lin_llm.errors import LinLLMError


def one_paragraph(text) -> str:
    """``text`` on one line: a message that wraps as one paragraph wherever it is printed."""
    return " ".join(str(text).split())


def run_command(body: Callable[[], int | None], *, interrupted: Callable[[], str] = lambda: "stopped",
                before_message: Callable[[], None] = lambda: None) -> int:
    """``body()``'s exit status (None: 0); a LinLLMError prints ``error: MESSAGE`` and gives 2, Ctrl-C
    prints ``interrupted: ...`` (``interrupted()`` says what was kept) and gives 130 (a KeyboardInterrupt
    subclass may carry its own ``word`` and ``exit_status``). ``before_message`` runs first (e.g. to
    end a line of streamed output)."""
    try:
        return body() or 0
    except LinLLMError as err:
        before_message()
        print(f"error: {one_paragraph(err)}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt as stop:  # a subclass may name itself: word, exit_status (SIGTERM: terminated, 143)
        before_message()
        status = getattr(stop, "exit_status", 130)
        print(f"{getattr(stop, 'word', 'interrupted')}: {one_paragraph(interrupted())}", file=sys.stderr, flush=True)
        if isinstance(stop, WorkAbandoned):
            # a compiled computation is still running (XLA cannot cancel one): leave now, as the
            # interpreter would otherwise wait for it, then abort while tearing down its threads
            sys.stdout.flush()
            os._exit(status)
        return status


class WorkAbandoned(KeyboardInterrupt):
    """Ctrl-C while ``interruptible`` work was still running in its thread."""


def interruptible(work: Callable[[], object]) -> object:
    """``work()`` in a worker thread while this thread waits, so that Ctrl-C (KeyboardInterrupt,
    which only the main thread receives, and only between Python bytecodes) is raised here at
    once even while the work is inside a long compiled computation: as WorkAbandoned, on which
    run_command ends the process. Re-raises what the work raised."""
    outcome: dict = {}
    done = threading.Event()  # not Thread.join: interrupted, it can mark a running thread stopped (bpo-45274)

    def target():
        try:
            outcome["value"] = work()
        except BaseException as err:  # noqa: BLE001 - handed to the waiting thread as it is
            outcome["error"] = err
        finally:
            done.set()

    threading.Thread(target=target, name="lin_llm-work", daemon=True).start()
    try:
        while not done.wait(0.05):
            pass
    except KeyboardInterrupt:
        if not done.is_set():
            raise WorkAbandoned() from None
        raise
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")
