"""taquba core: the queue logic, independent of any store backend."""

from .clock import Clock, ManualClock, SystemClock
from .config import PRIORITY_HIGH, PRIORITY_LOW, PRIORITY_NORMAL, QueueConfig
from .errors import (
    CancelRequested,
    ClaimLost,
    Contention,
    CorruptRecord,
    InvalidArgument,
    InvalidQueueName,
    InvalidStoreUrl,
    JobNotFound,
    KvValueTooLarge,
    ReadOnlyStore,
    StoreClosed,
    StoreConflict,
    StoreError,
    StoreFenced,
    TaqubaError,
)
from .kv import KVStore, Transaction
from .kvapi import MAX_KV_VALUE_SIZE
from .queue import CancelOutcome, EnqueueOptions, EnqueueResult, Queue, QueueStats, WaitOutcome, WaitStatus
from .record import JobRecord, JobStatus
from .worker import AckWith, PermanentFailure, WorkerStats, run_worker, run_worker_concurrent

__all__ = [
    "MAX_KV_VALUE_SIZE",
    "PRIORITY_HIGH",
    "PRIORITY_LOW",
    "PRIORITY_NORMAL",
    "AckWith",
    "CancelOutcome",
    "CancelRequested",
    "ClaimLost",
    "Clock",
    "Contention",
    "CorruptRecord",
    "EnqueueOptions",
    "EnqueueResult",
    "InvalidArgument",
    "InvalidQueueName",
    "InvalidStoreUrl",
    "JobNotFound",
    "JobRecord",
    "JobStatus",
    "KVStore",
    "KvValueTooLarge",
    "ManualClock",
    "PermanentFailure",
    "Queue",
    "QueueConfig",
    "QueueStats",
    "ReadOnlyStore",
    "StoreClosed",
    "StoreConflict",
    "StoreError",
    "StoreFenced",
    "SystemClock",
    "TaqubaError",
    "Transaction",
    "WaitOutcome",
    "WaitStatus",
    "WorkerStats",
    "run_worker",
    "run_worker_concurrent",
]
