"""Work the event loop waits for in a thread of its own.

`asyncio.to_thread` borrows the loop's default pool, a few threads that tokenization and image
encoding also need, and the process waits for that pool's threads when it exits. Work that may
take long because a client made it so (a remote fetch, a huge grammar) runs here instead: a
daemon thread per call, which the caller bounds (a semaphore, a deadline) and the exit ends.
"""

import asyncio
import threading
from typing import Any, Callable


async def in_daemon_thread(fn: Callable[..., Any], *args: Any, name: str = "pyserve-worker") -> Any:
    """fn(*args) in a new daemon thread; its result, or its exception. Cancelling the await stops
    waiting, not the thread."""
    loop = asyncio.get_running_loop()
    result = loop.create_future()

    def settle(value: Any, error: BaseException | None) -> None:
        if not result.done():
            result.set_exception(error) if error is not None else result.set_result(value)

    def work() -> None:
        try:
            value, error = fn(*args), None
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
            value, error = None, exc
        try:
            loop.call_soon_threadsafe(settle, value, error)
        except RuntimeError:  # the loop has closed: nobody is waiting
            pass

    threading.Thread(target=work, name=name, daemon=True).start()
    return await result
