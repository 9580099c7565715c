"""Key-ordering benchmark 1: encode and parse cost per key space, and sort-order checks.

For every key space of the layout (design notes, key table) this measures
the cost of building a key from its fields and of reading the fields back
(ns/key), and checks on ``n`` random keys that sorting the encoded keys
gives the same order as sorting by the intended fields:

* queue names end with ``:`` in every key, so a queue's keys are contiguous
  and never mixed with those of a queue whose name extends it (``a`` and
  ``a-b``); the intended order of queues is the order of ``name + ':'``;
* priorities and times are compared as integers;
* job ids are compared as the 128-bit ULID values, which follow enqueue order.

The job spaces are parsed with :func:`taquba_core.keys.parse_job_key`; the
other spaces have no parser in the core (the queue reads them by slicing
where it needs to), so the benchmark parses them the same way.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ulid import ULID

from taquba_core import keys
from taquba_core.ids import MonotonicUlid

from .common import Table, Target

QUEUES = ["a", "a-b", "ab", "a b", "a.b", "b", "emails", "é", "aé", "zz" * 20, "Q" * 255, "0", "a_"]
METRICS = ["pending", "scheduled", "claimed", "done", "dead"]
NOW_MS = 1_760_000_000_000


def _queue_order(queue: str) -> bytes:
    return queue.encode() + b":"


def _id_order(job_id: str) -> int:
    return int(ULID.from_str(job_id))


@dataclass
class Space:
    name: str
    make: Callable[[random.Random, MonotonicUlid], tuple[Any, ...]]  # random fields
    encode: Callable[..., bytes]
    parse: Callable[[bytes], Any]
    order: Callable[[tuple[Any, ...]], tuple[Any, ...]]  # the intended sort key of the fields
    queue_of: Callable[[tuple[Any, ...]], str | None]
    prefix_of: Callable[[str], bytes] | None = None  # the scan prefix of one queue, for per-queue spaces


def _time(rng: random.Random) -> int:
    return rng.choice([NOW_MS + rng.randrange(-10**9, 10**9), rng.randrange(keys.TIME_MAX + 1), rng.randrange(1000)])


def _id(rng: random.Random, gen: MonotonicUlid) -> str:
    return gen.new(rng.choice([NOW_MS + rng.randrange(1000), rng.randrange(2**48)]))


def _parse_jobindex(key: bytes) -> str:
    return key[len(keys.JOBINDEX):].decode()


def _parse_dedup(key: bytes) -> tuple[str, str]:
    queue, dedup = key[len(keys.DEDUP):].decode().split(":", 1)
    return queue, dedup


def _parse_stats(key: bytes) -> tuple[str, str]:
    queue, metric = key[len(keys.STATS):].decode().rsplit(":", 1)
    return queue, metric


def _parse_user(key: bytes) -> bytes:
    return key[len(keys.USER):]


SPACES = [
    Space(
        "pending",
        lambda r, g: (r.choice(QUEUES), r.choice([0, 100, 1000, 10000, r.randrange(2**32)]), _id(r, g)),
        keys.pending_key,
        keys.parse_job_key,
        lambda f: (_queue_order(f[0]), f[1], _id_order(f[2])),
        lambda f: f[0],
        keys.pending_prefix,
    ),
    Space(
        "claimed",
        lambda r, g: (_time(r), r.choice(QUEUES), _id(r, g)),
        keys.claimed_key,
        keys.parse_job_key,
        lambda f: (f[0], _queue_order(f[1]), _id_order(f[2])),
        lambda f: None,
    ),
    Space(
        "scheduled",
        lambda r, g: (_time(r), r.choice(QUEUES), _id(r, g)),
        keys.scheduled_key,
        keys.parse_job_key,
        lambda f: (f[0], _queue_order(f[1]), _id_order(f[2])),
        lambda f: None,
    ),
    Space(
        "done",
        lambda r, g: (_time(r), r.choice(QUEUES), _id(r, g)),
        keys.done_key,
        keys.parse_job_key,
        lambda f: (f[0], _queue_order(f[1]), _id_order(f[2])),
        lambda f: None,
    ),
    Space(
        "dead",
        lambda r, g: (r.choice(QUEUES), _id(r, g)),
        keys.dead_key,
        keys.parse_job_key,
        lambda f: (_queue_order(f[0]), _id_order(f[1])),
        lambda f: f[0],
        keys.dead_prefix,
    ),
    Space(
        "jobindex",
        lambda r, g: (_id(r, g),),
        keys.jobindex_key,
        _parse_jobindex,
        lambda f: (_id_order(f[0]),),
        lambda f: None,
    ),
    Space(
        "dedup",
        lambda r, g: (r.choice(QUEUES), r.choice(["k", "order-%d" % r.randrange(10**6), "x:y", "é%d" % r.randrange(99)])),
        keys.dedup_key,
        _parse_dedup,
        lambda f: (_queue_order(f[0]), f[1].encode()),
        lambda f: f[0],
    ),
    Space(
        "stats",
        lambda r, g: (r.choice(QUEUES), r.choice(METRICS)),
        keys.stats_key,
        _parse_stats,
        lambda f: (_queue_order(f[0]), f[1].encode()),
        lambda f: f[0],
        keys.stats_prefix,
    ),
    Space(
        "usr",
        lambda r, g: (r.randbytes(r.randrange(1, 24)),),
        keys.user_key,
        _parse_user,
        lambda f: (f[0],),
        lambda f: None,
    ),
]


def _ns_per_key(fn: Callable[[], object], n: int, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter_ns()
        fn()
        best = min(best, (time.perf_counter_ns() - start) / n)
    return best


def run(n: int = 100_000, seed: int = 20261129) -> tuple[list[Table], list[Target]]:
    rng = random.Random(seed)
    table = Table(
        f"Key spaces: encode/parse cost and sort order ({n:,} random keys each)",
        ["space", "encode ns/key", "parse ns/key", "sorted keys = sorted fields", "per-queue prefix scans exact"],
    )
    failures = []
    for space in SPACES:
        gen = MonotonicUlid()
        fields = [space.make(rng, gen) for _ in range(n)]
        encode = space.encode
        encoded = [encode(*f) for f in fields]
        parse = space.parse
        enc_ns = _ns_per_key(lambda: [encode(*f) for f in fields], n)
        parse_ns = _ns_per_key(lambda: [parse(k) for k in encoded], n)
        # Round trip: parsing gives the fields back.
        for f, k in zip(fields[:2000], encoded[:2000]):
            parsed = parse(k)
            if isinstance(parsed, keys.ParsedKey):
                assert parsed.job_id == f[-1] and parsed.queue in f, (space.name, f, parsed)
        by_key = sorted(set(encoded))
        by_fields = []
        seen = set()
        for f in sorted(fields, key=space.order):
            k = encode(*f)
            if k not in seen:
                seen.add(k)
                by_fields.append(k)
        order_ok = by_key == by_fields
        prefix_ok: bool | None = None
        if space.prefix_of is not None:
            prefix_ok = True
            for queue in QUEUES:
                prefix = space.prefix_of(queue)
                scanned = {k for k in encoded if k.startswith(prefix)}
                own = {k for f, k in zip(fields, encoded) if space.queue_of(f) == queue}
                prefix_ok &= scanned == own
        if not order_ok or prefix_ok is False:
            failures.append(space.name)
        table.add(space.name, enc_ns, parse_ns, "yes" if order_ok else "NO", {True: "yes", False: "NO", None: "—"}[prefix_ok])
    table.notes.append(
        "queues include names that extend one another (a, a-b, ab, a b, a.b, a_) and non-ASCII ones; "
        "priorities span 0..2^32-1, times 0..10^20-1, ids are ULIDs from the monotonic generator"
    )
    table.notes.append("jobindex/dedup/stats/usr have no parser in the core: parsed by slicing, as the queue does")
    target = Target(
        "1. sorted encoded keys = sorted intended fields, every key space",
        "all spaces",
        float(len(SPACES) - len(failures)),
        not failures,
        f"{len(SPACES) - len(failures)}/{len(SPACES)} spaces agree on {n:,} keys" + (f"; failed: {failures}" if failures else ""),
    )
    return [table], [target]
