"""Open a store from a URL, choosing the adapter by scheme."""

from __future__ import annotations

import re
from pathlib import Path

from taquba_core.errors import InvalidStoreUrl
from taquba_core.kv import KVStore

from .memory import MemoryStore
from .reader import PERSISTENT_SCHEMES, SlateDBReader
from .slatedb_store import SCHEMES as SLATEDB_SCHEMES
from .slatedb_store import SlateDBStore

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
ACCEPTED_FORMS = (
    "inmemory://, memory://, file:///abs/dir, a local path, "
    "s3://bucket/prefix, gs://bucket/prefix or az://container/prefix"
)


EPHEMERAL_SCHEMES = frozenset({"inmemory", "memory"})


def url_scheme(url: str) -> str | None:
    """The lower-cased scheme of ``url``; ``None`` for a plain path."""
    match = _SCHEME.match(url) if isinstance(url, str) else None
    return None if match is None else match.group(1).lower()


def names_persistent_store(url: str) -> bool:
    """Whether ``url`` names a store that outlives the process (a path, file, s3, gs, az)."""
    match = _SCHEME.match(url) if isinstance(url, str) else None
    return match is None or match.group(1).lower() in PERSISTENT_SCHEMES


async def open_store(url: str, *, read_only: bool = False) -> KVStore:
    """Open the store named by ``url``; ``read_only`` opens a view that does not fence the writer.

    Accepted forms:

    ==============================  =================================================
    ``inmemory://``                 :class:`MemoryStore`, pure Python, in this process
    ``memory://``                   SlateDB over an in-memory object store (fresh each open)
    ``file:///abs/dir``             SlateDB in a local directory (created when missing)
    ``some/dir``, ``/abs/dir``      a plain path, relative to the working directory or
                                    absolute: the same as ``file:///`` + its absolute form
    ``s3://bucket/prefix``          SlateDB on S3 or an S3-compatible server
    ``gs://bucket/prefix``          SlateDB on Google Cloud Storage
    ``az://container/prefix``       SlateDB on Azure Blob Storage
    ==============================  =================================================

    The cloud prefix defaults to ``taquba``.  SlateDB URLs (all but
    ``inmemory://``) accept ``?flush_interval_ms=N`` (see
    :mod:`taquba_backends.slatedb_store`, which also lists the environment
    variables that configure S3, GCS and Azure).  Anything of the form
    ``word:`` is read as a URL, so a relative path that contains a colon
    needs a ``./`` in front.

    With ``read_only`` (persistent SlateDB stores only), the store is opened
    through :class:`~taquba_backends.reader.SlateDBReader`: it sees what the
    writer made durable, and every write raises ``ReadOnlyStore``.

    Raises:
        InvalidStoreUrl: the scheme is unknown or the location malformed; the
            message names the URL.
        StoreError: the store cannot be reached or opened (read-only: no
            store exists there).
    """
    if not isinstance(url, str) or not url.strip():
        raise InvalidStoreUrl(f"invalid store URL {url!r}: expected {ACCEPTED_FORMS}")
    match = _SCHEME.match(url)
    if match is None:
        url = Path(url).expanduser().absolute().as_uri()
        match = _SCHEME.match(url)
        assert match is not None
    scheme = match.group(1).lower()
    if read_only and scheme not in PERSISTENT_SCHEMES:
        raise InvalidStoreUrl(f"store URL {url!r} names no persistent store to open read-only")
    if scheme == "inmemory":
        if url.lower() != "inmemory://":
            raise InvalidStoreUrl(f"invalid store URL {url!r}: inmemory:// takes no location or options")
        return MemoryStore()
    if scheme not in SLATEDB_SCHEMES:
        raise InvalidStoreUrl(f"invalid store URL {url!r}: unknown scheme {scheme!r}; expected {ACCEPTED_FORMS}")
    if read_only:
        return await SlateDBReader.open(url)
    return await SlateDBStore.open(url)
