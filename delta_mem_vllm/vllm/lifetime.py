"""vLLM engine processes that outlive the server that started them.

When the server is killed (kill -9, OOM), vLLM 0.32's engine-core and worker processes keep running
(spinning on their queues) and hold their memory and cores. Each Δ-Mem engine process therefore
watches its parent and exits once it is gone.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time

log = logging.getLogger("deltamem.vllm")
_watching = False


def exit_with_parent(interval: float = 1.0) -> None:
    """In a process started by multiprocessing: exit as soon as the parent process is gone."""
    global _watching
    if _watching or multiprocessing.parent_process() is None:
        return
    _watching = True
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        log.error("the process that started this vLLM process (pid %d) is gone: exiting", parent)
        os._exit(1)

    threading.Thread(target=watch, name="deltamem-parent-watch", daemon=True).start()
