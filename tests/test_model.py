"""Stateful model test: random sequences of the whole public API against a plain-Python model.

A hypothesis ``RuleBasedStateMachine`` drives a real :class:`Queue` and the
model in ``model.py`` side by side; after every step the raw store is
scanned once and checked against the design's invariants and the model
(see ``model.check_dump``), and every return value against the model.  The
same machine runs on ``MemoryStore`` and on SlateDB ``memory://`` (and a
short profile on S3, served by moto).  A differential test replays one random
sequence on both stores and requires identical observations and identical
raw stores (job ids replaced by their creation ordinals).

Profiles (``TAQUBA_MODEL_PROFILE``):

* ``ci`` (default, ``make test``): 200 examples of up to 50 steps per store;
* ``soak`` (``make soak``): examples of up to 100 steps until at least
  ``TAQUBA_SOAK_STEPS`` (default 10,000) steps per store have run; prints
  the step count and the violations.

A failure prints the failing sequence of steps and a ``@reproduce_failure``
blob (put it on ``class QueueMachine``); ``TAQUBA_MODEL_SEED=<n>`` fixes the
random seed.  See docs/testing.md.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, rule, run_state_machine_as_test
from model import (
    ANY_OP,
    OPS,
    OUTCOMES,
    Harness,
    Op,
    StoreHandle,
    UrlHandle,
    handle_for,
    run_ops,
)

_common: dict[str, Any] = {
    "deadline": None,
    "suppress_health_check": list(HealthCheck),
    "print_blob": True,
}
settings.register_profile("ci", max_examples=200, stateful_step_count=50, **_common)
settings.register_profile("soak", max_examples=150, stateful_step_count=100, database=None, **_common)
settings.register_profile("s3", max_examples=6, stateful_step_count=30, database=None, **_common)

PROFILE = os.environ.get("TAQUBA_MODEL_PROFILE", "ci")
SOAK_STEPS = int(os.environ.get("TAQUBA_SOAK_STEPS", "10000"))


class Tally:
    """Examples and steps run, per store kind (printed at the end of each test)."""

    def __init__(self) -> None:
        self.examples = 0
        self.steps = 0


class QueueMachine(RuleBasedStateMachine):
    """One rule per public operation; each rule is one :meth:`Harness.step`.

    Subclasses set :meth:`make_handle` (which store) and ``tally``.
    """

    tally = Tally()

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.harness = Harness(self.make_handle())
        self.loop.run_until_complete(self.harness.start())
        self.tally.examples += 1

    def make_handle(self) -> StoreHandle:
        return handle_for("inmemory")

    def run(self, op: Op) -> None:
        self.loop.run_until_complete(self.harness.step(op))
        self.tally.steps += 1

    def teardown(self) -> None:
        try:
            self.loop.run_until_complete(self.harness.close())
        finally:
            self.loop.close()

    # Rules group related operations, so that hypothesis' swarm testing (which
    # switches whole rules off per example) keeps producers, consumers and
    # settlements together in most examples.

    @rule(op=st.one_of(OPS["enqueue"], OPS["enqueue_with"], OPS["enqueue_with"], OPS["enqueue_batch"]))
    def enqueue(self, op: Op) -> None:
        """enqueue, enqueue_with (every option), enqueue_batch."""
        self.run(op)

    @rule(op=st.one_of(OPS["claim"], OPS["claim_batch"], OPS["claim_woken"]))
    def claim(self, op: Op) -> None:
        """claim, claim_next, claim_batch, claim_with_wait (at once, or parked and woken)."""
        self.run(op)

    @rule(op=st.one_of(OPS["ack"], OPS["ack"], OPS["nack"], OPS["dead_letter"], OPS["renew"]))
    def settle(self, op: Op) -> None:
        """ack, nack, dead_letter, renew_lease on a current or a stale claim."""
        self.run(op)

    @rule(op=st.one_of(OPS["cancel"], OPS["requeue"]))
    def cancel_or_requeue(self, op: Op) -> None:
        self.run(op)

    @rule(op=st.one_of(OPS["advance"], OPS["advance"], OPS["promote"], OPS["reap"], OPS["reopen"]))
    def time_passes(self, op: Op) -> None:
        """Advance the manual clock (also backwards, and to just before, at or after
        the next run_at, lease expiry or retention deadline); promote_now; reap_now (expired
        claims, then the done and dead retention sweeps); close the queue and its
        store, reopen both (recovery at open)."""
        self.run(op)

    @rule(op=st.one_of(OPS["get_job"], OPS["wait"], OPS["list_jobs"], OPS["dead_jobs"]))
    def read(self, op: Op) -> None:
        """get_job, wait_for_completion, list_jobs, dead_jobs (stats and list_queues run after every step)."""
        self.run(op)

    @rule(op=st.one_of(OPS["kv_put"], OPS["kv_delete"], OPS["kv_write"], OPS["kv_get"], OPS["kv_scan"]))
    def caller_kv(self, op: Op) -> None:
        self.run(op)


def machine_for(make_handle: Any) -> tuple[type[QueueMachine], Tally]:
    tally = Tally()
    machine = type(
        "QueueMachine",
        (QueueMachine,),
        {"make_handle": lambda self: make_handle(), "tally": tally},
    )
    return machine, tally


def run_machine(label: str, make_handle: Any, profile: str) -> Tally:
    """Run the machine under ``profile``; ``soak`` repeats until ``SOAK_STEPS`` steps ran."""
    machine, tally = machine_for(make_handle)
    if os.environ.get("TAQUBA_MODEL_SEED"):
        machine = seed(int(os.environ["TAQUBA_MODEL_SEED"]))(machine)
    OUTCOMES.clear()
    started = time.monotonic()
    violations = 0
    try:
        while True:
            run_state_machine_as_test(machine, settings=settings.get_profile(profile))
            if profile != "soak" or tally.steps >= SOAK_STEPS:
                break
    except BaseException:
        violations = 1
        raise
    finally:
        print(
            f"\nmodel [{label}] profile {profile}: {tally.examples} examples, {tally.steps} steps, "
            f"{violations} violations, {time.monotonic() - started:.1f}s"
        )
        if profile == "soak":
            print("outcomes (operation, result: count):")
            for (name, outcome), count in sorted(OUTCOMES.items()):
                print(f"  {name:<14} {outcome:<22} {count}")
    return tally


@pytest.mark.parametrize("kind", ["inmemory", "slatedb-memory"])
def test_state_machine(kind: str) -> None:
    tally = run_machine(kind, lambda: handle_for(kind), PROFILE)
    floor = settings.get_profile(PROFILE).max_examples if PROFILE != "soak" else 1
    assert tally.examples >= floor
    if PROFILE == "soak":
        assert tally.steps >= SOAK_STEPS


@pytest.mark.slow
def test_state_machine_on_s3(s3_url: str) -> None:
    """A short profile on S3 (moto on 127.0.0.1): a fresh prefix per example; reopen is a real reopen."""
    counter = itertools.count()
    run_machine("s3", lambda: UrlHandle(f"{s3_url}-{next(counter)}?flush_interval_ms=10", "s3"), "s3")


DIFFERENTIAL = Tally()


@settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck), print_blob=True)
@given(ops=st.lists(ANY_OP, min_size=20, max_size=60))
def differential(ops: list[Op]) -> None:
    memory = asyncio.run(run_ops("inmemory", ops))
    slate = asyncio.run(run_ops("slatedb-memory", ops))
    DIFFERENTIAL.examples += 1
    DIFFERENTIAL.steps += len(ops)
    assert len(memory) == len(slate) == len(ops)
    for n, (a, b) in enumerate(zip(memory, slate)):
        assert a == b, f"step {n} ({ops[n][0]}) differs:\n  MemoryStore {a}\n  SlateDB     {b}"


def test_memory_and_slatedb_observe_the_same() -> None:
    """One random sequence on both stores: identical results and identical raw stores after every step
    (job and claim ids replaced by their creation ordinals)."""
    differential()
    print(f"\ndifferential: {DIFFERENTIAL.examples} sequences, {DIFFERENTIAL.steps} steps on each store")
