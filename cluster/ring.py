"""The hash ring (SPEC §7): which live node owns a user.

Ketama consistent hashing (uhashring, 160 points per node, md5) over the ids of
the live nodes, keyed by the token's ``sub``. Every node's points depend only on
its own id, so adding one node to N moves about 1/(N+1) of the users, all of
them onto the new node, and removing one moves only that node's users. Routers
and nodes build the same ring from the same membership list, so a node can tell
which of its connections now belong elsewhere. Anonymous clients get a random
key: they may land anywhere and are never moved.
"""

from __future__ import annotations

import secrets
from typing import Iterable, Iterator

from uhashring import HashRing

from cluster.auth import Identity

HASH_SPACE = 1 << 32


class Ring:
    """An immutable ketama ring over a set of node ids."""

    __slots__ = ("node_ids", "_ring")

    def __init__(self, node_ids: Iterable[str] = ()) -> None:
        self.node_ids: frozenset[str] = frozenset(node_ids)
        self._ring = HashRing(nodes=sorted(self.node_ids), hash_fn="ketama") if self.node_ids else None

    def __len__(self) -> int:
        return len(self.node_ids)

    def __contains__(self, node_id: object) -> bool:
        return node_id in self.node_ids

    def node_for(self, key: str) -> str | None:
        """The node that owns ``key``, or None when there is no live node."""
        if self._ring is None:
            return None
        return self._ring.get_node(key)

    def candidates(self, key: str) -> Iterator[str]:
        """The owner of ``key`` first, then the nodes that would own it if the ones before were gone."""
        if self._ring is None:
            return iter(())
        return (node for node in self._ring.iterate_nodes(key) if node is not None)

    def shares(self) -> dict[str, float]:
        """The exact fraction of the hash space each node owns (what /v1/cluster reports)."""
        if self._ring is None:
            return {}
        runtime = self._ring.runtime
        points: list[int] = runtime._keys  # sorted hash points of the continuum
        owners: dict[int, str] = runtime._ring
        shares = dict.fromkeys(self.node_ids, 0.0)
        previous = points[-1] - HASH_SPACE  # the arc before the first point wraps around
        for point in points:
            shares[owners[point]] += (point - previous) / HASH_SPACE
            previous = point
        return shares


def routing_key(identity: Identity) -> str:
    """The ring key of a client: its user id, or a fresh random key when anonymous."""
    return identity.user_id if identity.user_id is not None else "anon:" + secrets.token_hex(8)
