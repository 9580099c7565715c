"""Store adapters for taquba: in-memory (pure Python) and SlateDB, opened by URL."""

from .eventloop import run
from .memory import MemoryStore
from .slatedb_store import SlateDBStore
from .url import open_store

__all__ = ["MemoryStore", "SlateDBStore", "open_store", "run"]
