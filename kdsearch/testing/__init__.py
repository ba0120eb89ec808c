"""Helpers that tests and benches share, so neither imports the other: real API and worker processes on loopback
ports (``processes``), tiny models, data and specs (``fixtures``), extra "hosts" (``hosts``: an S3 server, skewed
clocks) and the dashboard's timed calls (``dashboard``).

Like the rest of ``kdsearch`` it imports none of the rooms (search_space, storage, distill, service): processes are
started as commands. Test doubles that need a room live in it: ``service.testing`` holds the sleeping and faulty
trial engines (``KDSEARCH_ENGINE=service.testing:SleepEngine``) and the bulk-seeded study.
"""

from kdsearch.testing.dashboard import time_calls
from kdsearch.testing.fixtures import (
    NEGATIVE,
    NEUTRAL,
    POSITIVE,
    POSTGRES_ADMIN_URL,
    tiny_spec,
    write_dataset,
    write_tiny_model,
)
from kdsearch.testing.hosts import s3_server, skewed_clock
from kdsearch.testing.processes import KDSEARCH, ROOT, Stack, free_port

__all__ = [
    "KDSEARCH",
    "NEGATIVE",
    "NEUTRAL",
    "POSITIVE",
    "POSTGRES_ADMIN_URL",
    "ROOT",
    "Stack",
    "free_port",
    "s3_server",
    "skewed_clock",
    "time_calls",
    "tiny_spec",
    "write_dataset",
    "write_tiny_model",
]
