"""A token-level radix tree over the page pool: requests never pay twice for the same prefix.

As SGLang's RadixAttention (Zheng et al. 2023, arXiv:2312.07104): every finished
request's tokens (prompt and answer) are inserted into a radix tree over token
ids; the next request walks the tree and reuses the KV of the longest common
prefix, prefilling only the rest. A chat's turn t+1 starts with turn t's prompt
and answer, each step of a tool-calling loop with the whole history so far, so from the second
request on almost nothing is prefilled.

Nodes: each edge holds a run of tokens and, for every layer, where their keys and
values sit in that layer's :class:`~longkv.kv.pool.PagePool` (the first slot of a
run of consecutive slots; the node holds a reference to the pages under them).
Nothing is copied: inserting a finished sequence retains the pages its new tokens
already sit in, a hit attaches the node's slots to the new sequence's page table
(:meth:`~longkv.kv.cache.LayerKV.attach`), and splitting a node only splits its
slot range (the page at the cut is referenced by both halves). A page goes back to
the pool when neither the tree nor any sequence holds it.

Memory: a byte budget over all nodes; past it, least-recently-used leaves that no
session pins are evicted (a leaf at a time, so a parent goes only after its
children). A session pins the path of its last request; when only pinned nodes are
left over the budget, the least recently used session loses its pin.

Fail closed: a tree holds KV of one kind only (one namespace per engine setting,
see :func:`namespace`); the server inserts only KV computed under the dense policy
(or an eviction policy that provably evicted nothing), and only up to tokens whose
forward finished. The logits after a whole prompt are kept beside its KV, so an
identical request reuses every token and samples from the very logits a cold run
computed (warm equals cold, bit for bit).

Not thread-safe: the server touches it from its one engine thread only.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import torch

from longkv.kv.cache import KVCache
from longkv.kv.pool import PagePool
from longkv.policies import KVPolicy

MAX_SHARED_SPANS = 4  # slot runs a hit attaches in place per layer; later nodes of a long path are copied


class _Node:
    """An edge of the tree: tokens ``[start, start + len(tokens))`` of every path through it."""

    __slots__ = ("children", "last_used", "logits", "parent", "per_token", "pins", "pools", "slots", "start", "tokens")

    def __init__(
        self, parent: _Node | None, tokens: list[int], pools: list[PagePool], slots: list[int], start: int, per_token: int = 0
    ) -> None:
        self.parent = parent
        self.tokens = tokens
        self.pools = pools  # per layer: the pool holding these tokens' KV
        self.slots = slots  # per layer: first slot of the tokens (consecutive slots), [] for a root
        self.start = start
        self.per_token = per_token  # bytes of one token's KV over every layer
        self.children: dict[int, _Node] = {}
        self.pins = 0
        self.last_used = 0
        self.logits: dict[int, torch.Tensor] = {}  # depth d (start < d <= end) -> (V,) logits after d tokens

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)

    def retain(self, offset: int, n: int) -> None:
        """Reference the pages under tokens [start + offset, start + offset + n) in every layer."""
        for pool, s in zip(self.pools, self.slots, strict=True):
            pool.retain_slots(s + offset, n)

    def release(self, offset: int, n: int) -> None:
        for pool, s in zip(self.pools, self.slots, strict=True):
            pool.release_slots(s + offset, n)

    def nbytes(self) -> int:
        return self.per_token * len(self.tokens) + sum(t.nbytes for t in self.logits.values())


@dataclass
class Match:
    """The longest cached prefix of a token list.

    Attributes:
        length: tokens matched.
        path: nodes from the root's child down to the one holding the last matched token;
            the last one may be matched only in part.
        logits: (V,) logits after exactly ``length`` tokens, if kept (only then can a
            request reuse its whole prompt).
    """

    length: int = 0
    path: list[_Node] = field(default_factory=list)
    logits: torch.Tensor | None = None


def reuse_length(match: Match, n_ids: int, chunk_size: int) -> int:
    """How many of a prompt's ``n_ids`` tokens to take from a ``match``: all of them where the logits after
    them were kept. Else the last tokens are recomputed for their logits, and the cut avoids a token computed
    alone, whose attention is a decode step's where a run from scratch computes it in a chunk with others
    (chunks end on multiples of ``chunk_size``, see ``PrefillPlan``): the resumed prompt's first chunk holds
    two tokens at least, and the last reused token is not one that ended an earlier prompt alone in its
    chunk (at a multiple of ``chunk_size``). 0 for no hit."""
    if match.length == n_ids and match.logits is not None:
        return n_ids
    reuse = min(match.length, n_ids - 2)
    if chunk_size > 2 and reuse % chunk_size in (1, chunk_size - 1):
        reuse -= 1
    return max(reuse, 0)


@dataclass
class CacheStats:
    """Counters since start (tokens and bytes)."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    evicted_tokens: int = 0
    inserted_tokens: int = 0


def shares_dense_kv(policy: KVPolicy, n_tokens: int) -> bool:
    """Whether a run of ``n_tokens`` under ``policy`` computes exactly the dense KV (and may share the cache).

    Asks the policy (:meth:`~longkv.policies.KVPolicy.dense_kv_upto`): dense with an
    uncoded store does; streaming does while it never evicts; anything else, or a
    quantized KV store, does not (fail closed).
    """
    return n_tokens <= policy.dense_kv_upto()


def namespace(*settings: object) -> str:
    """A namespace key: KV computed under different settings never meets in one tree."""
    return "|".join(str(s) for s in settings)


class PrefixCache:
    """Radix tree over token ids with KV at its nodes, under a byte budget.

    Args:
        capacity_bytes: most bytes of KV (and kept logits) held; 0 disables caching.
        max_sessions: most sessions whose paths are pinned at once (least recently used goes first).
    """

    def __init__(self, capacity_bytes: int, max_sessions: int = 256) -> None:
        self.capacity = int(capacity_bytes)
        self.max_sessions = max_sessions
        self._roots: dict[Hashable, _Node] = {}
        self._sessions: OrderedDict[str, _Node] = OrderedDict()
        self._clock = itertools.count(1)
        self.bytes = 0
        self.tokens = 0
        self.stats = CacheStats()

    # ----------------------------------------------------------------- lookup
    def _root(self, ns: Hashable) -> _Node:
        root = self._roots.get(ns)
        if root is None:
            root = self._roots[ns] = _Node(None, [], [], [], 0)
        return root

    def _walk(self, root: _Node, ids: list[int]) -> tuple[list[_Node], int]:
        """Nodes along the longest prefix of ``ids`` in the tree, and its length."""
        path: list[_Node] = []
        node, i = root, 0
        while i < len(ids):
            child = node.children.get(ids[i])
            if child is None:
                break
            edge = child.tokens
            n = min(len(edge), len(ids) - i)
            c = 1  # the first token matched (it is the child's key)
            while c < n and edge[c] == ids[i + c]:
                c += 1
            path.append(child)
            i += c
            if c < len(edge):
                break
            node = child
        return path, i

    def match(self, ns: Hashable, ids: list[int]) -> Match:
        """The longest cached prefix of ``ids`` in namespace ``ns``; marks its nodes as used."""
        if self.capacity <= 0 or ns not in self._roots:
            return Match()
        path, n = self._walk(self._roots[ns], ids)
        now = next(self._clock)
        for node in path:
            node.last_used = now
        logits = path[-1].logits.get(n) if path else None
        return Match(n, path, logits)

    def load(self, match: Match, cache: KVCache, n_tokens: int) -> None:
        """Attach the KV of the first ``n_tokens`` (<= ``match.length``) matched tokens to an empty ``cache``.

        The tokens land at positions ``0 .. n_tokens - 1`` (dense caches hold every
        position). The first :data:`MAX_SHARED_SPANS` nodes of the path are read in
        place (their pages retained, no copy); the KV of deeper nodes (short turns
        of a long chat) is copied in, so attention reads a few parts per layer at most.
        """
        assert n_tokens <= match.length and all(layer.n == 0 for layer in cache.layers)
        for depth, node in enumerate(match.path):
            take = min(len(node.tokens), n_tokens - node.start)
            if take <= 0:
                break
            for layer, pool, s in zip(cache.layers, node.pools, node.slots, strict=True):
                if depth < MAX_SHARED_SPANS:
                    layer.attach(pool, s, take)
                else:
                    layer.copy_in(pool, s, take)

    # ----------------------------------------------------------------- insert
    def _split(self, node: _Node, at: int) -> _Node:
        """Cut ``node``'s edge after ``at`` tokens; return the new upper node (``node`` stays the lower one).

        Keeping ``node`` as the deeper part keeps every outside reference to it (a session's
        pin) pointing at the same tokens.
        """
        assert 0 < at < len(node.tokens) and node.parent is not None
        parent = node.parent
        upper = _Node(parent, node.tokens[:at], node.pools, list(node.slots), node.start, node.per_token)
        upper.pins, upper.last_used = node.pins, node.last_used
        cut = node.start + at
        upper.logits = {d: t for d, t in node.logits.items() if d <= cut}
        node.logits = {d: t for d, t in node.logits.items() if d > cut}
        n = len(node.tokens)
        upper.retain(0, at)
        node.retain(at, n - at)
        node.release(0, n)  # the page at the cut stays: both halves reference it
        node.tokens = node.tokens[at:]
        node.slots = [s + at for s in node.slots]
        node.start = cut
        parent.children[upper.tokens[0]] = upper
        upper.children[node.tokens[0]] = node
        node.parent = upper
        return upper

    def insert(
        self,
        ns: Hashable,
        ids: list[int],
        cache: KVCache,
        logits: dict[int, torch.Tensor] | None = None,
        fresh_from: int = 0,
        session: str | None = None,
    ) -> int:
        """Store the KV of ``ids`` (``cache`` holds it at positions ``0 .. len(ids) - 1``).

        Nothing is copied: the tree takes a reference to the pages the tokens new to it
        sit in (``cache``'s, or pages it shares). ``logits`` maps a depth d to the logits
        after ``ids[:d]``, computed over this tree's KV for ``ids[:fresh_from]`` and
        ``cache``'s for the rest: they are kept only when the tree holds no other KV for
        those tokens (else a later request would pair them with KV they did not come
        from). ``session`` pins the inserted path (and unpins its previous one).
        Nothing is stored when the new tokens alone exceed the budget, or when
        ``cache`` does not hold ``ids`` at positions ``0 .. len(ids) - 1`` (fail closed).
        Returns the number of tokens added.
        """
        if self.capacity <= 0 or not ids:
            return 0
        layers = cache.layers
        if any(layer.n < len(ids) or not layer.shareable for layer in layers) or not torch.equal(
            layers[0].positions()[: len(ids)].cpu(), torch.arange(len(ids), dtype=torch.int64, device="cpu")
        ):
            return 0
        root = self._root(ns)
        path, n = self._walk(root, ids)
        if path and n < path[-1].end:  # diverges (or ends) inside an edge: cut it there
            path[-1] = self._split(path[-1], n - path[-1].start)
        added = len(ids) - n
        per_token = self._bytes_per_token(cache)
        if added * per_token > self.capacity:
            return 0
        self._pin_path(path, +1)  # keep our own path while making room
        try:
            self._evict_until(self.capacity - added * per_token)
        finally:
            self._pin_path(path, -1)
        now = next(self._clock)
        parent = path[-1] if path else root
        end = parent
        if added:
            # the new tokens' slots per layer, as runs of consecutive slots (the same cuts in every layer)
            runs = [layer.spans(n, len(ids)) for layer in layers]
            if any([m for _, m in r] != [m for _, m in runs[0]] for r in runs):
                return 0  # layers laid out differently: fail closed (a dense cache never is)
            pools = [layer.pool for layer in layers]
            for pool in set(pools):
                pool.hold(self)
            at = n
            for j, (_, m) in enumerate(runs[0]):
                end = _Node(parent, list(ids[at : at + m]), pools, [r[j][0] for r in runs], at, per_token)
                end.retain(0, m)
                parent.children[end.tokens[0]] = end
                self.bytes += end.nbytes()
                path.append(end)
                parent, at = end, at + m
            assert at == len(ids)
            self.tokens += added
            self.stats.inserted_tokens += added
        for node in path:
            node.last_used = now
        for d, t in (logits or {}).items() if n <= fresh_from else ():
            holder = self._node_at(path, d)
            if holder is not None and d not in holder.logits:
                holder.logits[d] = t.detach().float().clone()
                self.bytes += holder.logits[d].nbytes
        if session is not None and end is not root:
            self.pin(session, end)
        self._evict_until(self.capacity)
        return added

    @staticmethod
    def _node_at(path: list[_Node], depth: int) -> _Node | None:
        for node in path:
            if node.start < depth <= node.end:
                return node
        return None

    @staticmethod
    def _bytes_per_token(cache: KVCache) -> int:
        return sum(layer.pool.fmt.bytes_per_slot(layer.n_kv_heads) for layer in cache.layers)

    # ----------------------------------------------------------------- sessions
    def _pin_path(self, path: list[_Node], delta: int) -> None:
        for node in path:
            node.pins += delta
            assert node.pins >= 0

    def _pin_node(self, node: _Node, delta: int) -> None:
        n: _Node | None = node
        while n is not None and n.parent is not None:
            n.pins += delta
            assert n.pins >= 0
            n = n.parent

    def pin(self, session: str, node: _Node) -> None:
        """Pin the path from the root to ``node`` for ``session`` (replacing its previous pin)."""
        self.unpin(session)
        self._pin_node(node, +1)
        self._sessions[session] = node
        while len(self._sessions) > self.max_sessions:
            self.unpin(next(iter(self._sessions)))

    def unpin(self, session: str) -> None:
        """Release a session's pin (no-op for an unknown session)."""
        node = self._sessions.pop(session, None)
        if node is not None:
            self._pin_node(node, -1)

    @property
    def sessions(self) -> int:
        """Sessions holding a pin."""
        return len(self._sessions)

    # ----------------------------------------------------------------- eviction
    def _leaves(self) -> list[_Node]:
        out: list[_Node] = []
        stack = [c for r in self._roots.values() for c in r.children.values()]
        while stack:
            node = stack.pop()
            if node.children:
                stack.extend(node.children.values())
            else:
                out.append(node)
        return out

    def _remove(self, node: _Node) -> None:
        assert not node.children and node.parent is not None
        del node.parent.children[node.tokens[0]]
        node.release(0, len(node.tokens))
        self.bytes -= node.nbytes()
        self.tokens -= len(node.tokens)
        self.stats.evictions += 1
        self.stats.evicted_tokens += len(node.tokens)
        node.parent = None

    def _evict_until(self, target: int) -> None:
        """Evict LRU unpinned leaves (then sessions' pins, oldest first) until ``bytes <= target``."""
        while self.bytes > max(target, 0):
            free = [leaf for leaf in self._leaves() if leaf.pins == 0]
            if free:
                self._remove(min(free, key=lambda n: n.last_used))
            elif self._sessions:
                self.unpin(next(iter(self._sessions)))
            else:
                break  # only nodes pinned by an insertion in progress are left

    def relocate(self, pool: PagePool, slot: Callable[[int], int]) -> None:
        """``pool`` moved its pages (:meth:`PagePool.compact`): point every node's slots there at the new ones."""
        stack = [c for r in self._roots.values() for c in r.children.values()]
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            node.slots = [slot(s) if p is pool else s for p, s in zip(node.pools, node.slots, strict=True)]

    def clear(self) -> None:
        """Drop everything (sessions too); the pages go back to their pools."""
        stack = [c for r in self._roots.values() for c in r.children.values()]
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            node.release(0, len(node.tokens))
        self._roots.clear()
        self._sessions.clear()
        self.bytes = 0
        self.tokens = 0
