"""Key encodings: byte order equals logical order; parsing round-trips; queue names."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ulid import ULID

from taquba_core import CorruptRecord, InvalidArgument, InvalidQueueName, TaqubaError
from taquba_core import keys
from taquba_core.ids import MonotonicUlid

ulids = st.integers(min_value=0, max_value=2**128 - 1).map(lambda n: str(ULID.from_int(n)))
priorities = st.integers(min_value=keys.PRIORITY_MIN, max_value=keys.PRIORITY_MAX)
times = st.integers(min_value=0, max_value=keys.TIME_MAX)


def _valid_name(name: str) -> bool:
    try:
        keys.validate_queue_name(name)
        return True
    except InvalidQueueName:
        return False


queue_names = st.text(
    alphabet=st.characters(blacklist_categories=("Cc", "Cs"), blacklist_characters=":"),
    min_size=1,
    max_size=80,
).filter(_valid_name)

TIME_KEYS = [keys.claimed_key, keys.scheduled_key, keys.done_key]


@given(queue_names, priorities, ulids, priorities, ulids)
def test_pending_key_order_is_priority_then_id(queue, p1, id1, p2, id2):
    k1, k2 = keys.pending_key(queue, p1, id1), keys.pending_key(queue, p2, id2)
    assert (k1 < k2) == ((p1, id1) < (p2, id2))
    assert (k1 == k2) == ((p1, id1) == (p2, id2))
    assert k1.startswith(keys.pending_prefix(queue)) and k2.startswith(keys.pending_prefix(queue))


@given(st.sampled_from(TIME_KEYS), times, queue_names, ulids, times, queue_names, ulids)
def test_time_first_key_order_is_time_order(make_key, t1, q1, id1, t2, q2, id2):
    k1, k2 = make_key(t1, q1, id1), make_key(t2, q2, id2)
    if t1 != t2:
        assert (k1 < k2) == (t1 < t2)
    space = k1.split(b":", 1)[0] + b":"
    # the sweep bound includes every key up to its time and nothing later
    assert k1 < keys.time_bound(space, t1)
    if t1 > 0:
        assert k1 >= keys.time_bound(space, t1 - 1)


@given(st.sampled_from(TIME_KEYS), times, queue_names, ulids)
def test_time_keys_round_trip(make_key, t, queue, job_id):
    key = make_key(t, queue, job_id)
    parsed = keys.parse_job_key(key)
    assert (parsed.queue, parsed.job_id, parsed.number) == (queue, job_id, t)
    assert key.startswith(parsed.space)


@given(queue_names, priorities, ulids)
def test_pending_and_dead_keys_round_trip(queue, priority, job_id):
    parsed = keys.parse_job_key(keys.pending_key(queue, priority, job_id))
    assert (parsed.space, parsed.queue, parsed.job_id, parsed.number) == (keys.PENDING, queue, job_id, priority)
    parsed = keys.parse_job_key(keys.dead_key(queue, job_id))
    assert (parsed.space, parsed.queue, parsed.job_id, parsed.number) == (keys.DEAD, queue, job_id, None)


@given(queue_names, queue_names)
def test_prefixes_of_distinct_queues_never_nest(q1, q2):
    if q1 != q2:
        for prefix in (keys.pending_prefix, keys.dead_prefix, keys.stats_prefix):
            assert not prefix(q1).startswith(prefix(q2))


@pytest.mark.parametrize(
    "key",
    [b"", b"pending", b"nope:a:b", b"pending:a:notanumber:id", b"claimed:x:q:id", b"\xff\xfe:1", b"dead:noid"],
)
def test_parse_job_key_rejects_malformed_keys(key):
    with pytest.raises(CorruptRecord) as info:
        keys.parse_job_key(key)
    assert repr(key) in str(info.value)


@pytest.mark.parametrize(
    "name",
    ["a", "queue-1", "with space", "a.b/c_d~e", "é" * 127, "x" * 255, "日本語", "emoji-🚀", "\u00a0nbsp"],
)
def test_valid_queue_names(name):
    assert keys.validate_queue_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "x" * 256,
        "é" * 128,  # 256 bytes of UTF-8
        "a:b",
        ":",
        "a:",
        "tab\there",
        "nul\x00",
        "line\nbreak",
        "del\x7f",
        "c1\x85",
        "\ud800",  # lone surrogate: not encodable as UTF-8
        1,
        None,
        b"bytes",
        ["a"],
    ],
)
def test_invalid_queue_names(name):
    with pytest.raises(InvalidQueueName) as info:
        keys.validate_queue_name(name)
    assert isinstance(info.value, TaqubaError) and isinstance(info.value, InvalidArgument)
    if isinstance(name, str) and len(name) < 40:
        assert repr(name) in str(info.value)


@pytest.mark.parametrize("priority", [-1, 2**32, 1.0, "1", None, True])
def test_check_priority_rejects(priority):
    with pytest.raises(InvalidArgument, match="priority"):
        keys.check_priority(priority)


@given(st.lists(st.integers(min_value=0, max_value=5), min_size=1, max_size=200))
@settings(max_examples=50)
def test_monotonic_ids_strictly_increase(steps):
    """Ids ascend even within one millisecond and when the clock steps back."""
    gen = MonotonicUlid()
    now = 1_700_000_000_000
    previous = ""
    for step in steps:
        now += step - 2  # sometimes the same millisecond, sometimes backwards
        job_id = gen.new(now)
        assert len(job_id) == 26 and job_id > previous
        previous = job_id
