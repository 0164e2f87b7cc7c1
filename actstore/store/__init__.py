"""The activation store (docs/store-format.md is the specification).

Modules, bottom to top: ``format`` (constants, the dtype codec, column kinds, the store
identity), ``progress`` (rows_done, range records, which windows a resume still needs),
``layout`` (files, sizes, what the format defines), ``checksums`` (crc32c tables),
``checks`` (open-time checks), ``chunks`` (verified block reads), ``shard_files`` (row-block
writes), ``reader`` (:class:`ActivationStore`, :func:`open_store`), ``create``
(:func:`create_store`, :func:`remove_store`), ``integrity`` (:func:`check_store`), ``cli``
(``actstore verify``).
"""
from __future__ import annotations

from actstore.errors import StoreError
from actstore.store.create import create_store, remove_store
from actstore.store.format import (
                                   COMPRESSIONS,
                                   DEFAULT_COMPRESSION,
                                   DTYPES,
                                   FORMAT_NAME,
                                   FORMAT_VERSION,
                                   POSITIONS,
                                   SITES,
                                   TARGET_KINDS,
                                   default_rows_per_chunk,
                                   store_identity,
)
from actstore.store.integrity import IntegrityReport, check_store
from actstore.store.progress import merge_intervals
from actstore.store.reader import ActivationStore, open_store
from actstore.store.shard_files import ShardFiles

__all__ = ["StoreError", "ActivationStore", "open_store", "create_store", "remove_store",
           "check_store", "IntegrityReport",
           "ShardFiles", "merge_intervals", "default_rows_per_chunk", "store_identity",
           "FORMAT_NAME", "FORMAT_VERSION", "SITES", "POSITIONS", "TARGET_KINDS", "DTYPES",
           "COMPRESSIONS", "DEFAULT_COMPRESSION"]
