"""A busy worker's heartbeat: a thread that keeps its claimed slots, and its own row, fresh on the database's clock.

Contract: while the ``with`` block runs, every ``interval_s`` each slot still held gets a heartbeat
(``heartbeat_slot``), and the worker's row one (``touch_worker``) so a busy worker never shows as lost. A slot that
another worker took over (its heartbeat went stale and it was reaped) sets that slot's ``lost`` event and is not
beaten again. The worker calls ``release(slot_id)`` before it closes or gives back a slot itself: the release waits for
a beat in flight, so a beat never meets a slot this worker has just finished and takes it for one taken over.
"""

from __future__ import annotations

import logging
import threading
import time
from types import TracebackType

from sqlalchemy import Engine

from storage import heartbeat_slot, slot_holder, touch_worker

log = logging.getLogger("kdsearch.worker")


class SlotHeartbeat:
    def __init__(self, db: Engine, worker_id: str, lost: dict[int, threading.Event], *, interval_s: float,
                 grace_period_s: float) -> None:
        self.db = db
        self.worker_id = worker_id
        self.interval_s = interval_s
        self.grace_period_s = grace_period_s
        self._held = dict(lost)  # slot id -> its lost event; only the slots still to beat
        self._lock = threading.Lock()  # one beat, or one release, at a time
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def __enter__(self) -> SlotHeartbeat:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self._done.set()
        self._thread.join()

    def release(self, slot_id: int) -> None:
        """Stop beating ``slot_id``: the worker is about to close it or give it back."""
        with self._lock:
            self._held.pop(slot_id, None)

    def _run(self) -> None:
        last_beat = time.monotonic()
        while not self._done.wait(self.interval_s):
            with self._lock:
                try:
                    self._beat(last_beat)
                except Exception:
                    log.warning("heartbeat failed", exc_info=True)
                    continue
            now = time.monotonic()
            gap, last_beat = now - last_beat, now
            if gap > self.grace_period_s / 2:
                # Half the grace period between two beats: the host is overloaded or the database slow, and a little
                # more would have had this worker's healthy trials taken over.
                log.warning("heartbeat %.1f s after the last one (interval %.0f s, grace period %.0f s)",
                            gap, self.interval_s, self.grace_period_s)

    def _beat(self, last_beat: float) -> None:
        touch_worker(self.db, self.worker_id)
        for slot_id, lost in list(self._held.items()):
            if not heartbeat_slot(self.db, slot_id, self.worker_id):
                state, holder = slot_holder(self.db, slot_id) or ("gone", None)
                log.warning("slot %d was taken over by another worker (now %s, held by %s; %.1f s after this "
                            "worker's last heartbeat, grace period %.0f s)", slot_id, state, holder,
                            time.monotonic() - last_beat, self.grace_period_s)
                lost.set()
                del self._held[slot_id]
