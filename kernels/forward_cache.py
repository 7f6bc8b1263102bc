"""A value built once per forward, from tensors every layer of that forward passes again.

The plugin hands every layer the same row tensors of its ``NsaForwardMetadata`` (``local_req``,
``local_kv_len``, the block table), so work that depends only on them (the Triton indexer's row
groups, the DeepGEMM indexer's gather plan) is built for the first layer and reused by the
others. Weak references: a new forward's tensors never match a freed one's, even at the same
address. Only torch-free Python here: every kernel module may use it.
"""

from __future__ import annotations

import weakref
from typing import Callable, Generic, Hashable, Sequence, TypeVar

T = TypeVar("T")


class SameTensorsCache(Generic[T]):
    """The last value, returned again while the same tensor objects and the same
    ``params`` come back; built anew otherwise."""

    def __init__(self):
        self._refs: tuple = ()
        self._params: Hashable = None
        self._value: T | None = None

    def get(self, tensors: Sequence[object], params: Hashable, build: Callable[[], T]) -> T:
        if (self._value is not None and self._params == params and len(self._refs) == len(tensors)
                and all(ref() is t for ref, t in zip(self._refs, tensors))):  # fmt: skip
            return self._value
        self._value = build()
        self._refs, self._params = tuple(weakref.ref(t) for t in tensors), params
        return self._value
