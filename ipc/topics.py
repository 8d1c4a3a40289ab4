"""Topic names and filters with MQTT rules, and the subscription trie that routes publishes.

The rules are MQTT 3.1.1/5 so that topics mean the same on the local bus, in the cloud bridge and
in a Greengrass component: ``+`` is a whole level, ``#`` only as the whole last level, published
topics carry no wildcard, empty levels are legal, ``$``-topics are not matched by a filter that
starts with a wildcard (so ``#`` does not snoop on ``$sys``-style internal topics).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from ipc.errors import InvalidArguments

MAX_TOPIC_BYTES = 65535

V = TypeVar("V", bound=Hashable)


def _check_common(text: object, what: str) -> str:
    if not isinstance(text, str):
        raise InvalidArguments(f"{what} must be a string, got {type(text).__name__}", {what: repr(text)})
    if not text:
        raise InvalidArguments(f"{what} must not be empty", {what: text})
    if "\x00" in text:
        raise InvalidArguments(f"{what} must not contain NUL", {what: text})
    if len(text) > MAX_TOPIC_BYTES // 4 and len(text.encode("utf-8", "surrogatepass")) > MAX_TOPIC_BYTES:
        raise InvalidArguments(f"{what} is longer than {MAX_TOPIC_BYTES} bytes", {what: text[:64]})
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidArguments(f"{what} is not valid UTF-8", {what: repr(text[:64])}) from exc
    return text


def validate_topic(topic: object) -> str:
    """A topic one may publish to: no wildcards."""
    t = _check_common(topic, "topic")
    if "+" in t or "#" in t:
        raise InvalidArguments(f"topic {t!r} contains a wildcard; wildcards are for subscriptions only",
                               {"topic": t})
    return t


def validate_filter(topic_filter: object) -> str:
    """A subscription filter: ``+`` whole level, ``#`` whole last level."""
    f = _check_common(topic_filter, "filter")
    if "+" not in f and "#" not in f:
        return f
    levels = f.split("/")
    last = len(levels) - 1
    for i, level in enumerate(levels):
        if ("+" in level and level != "+") or ("#" in level and level != "#"):
            raise InvalidArguments(f"filter {f!r}: a wildcard must occupy a whole level", {"filter": f})
        if level == "#" and i != last:
            raise InvalidArguments(f"filter {f!r}: '#' is allowed only as the last level", {"filter": f})
    return f


def matches(topic_filter: str, topic: str) -> bool:
    """Whether a (valid) filter matches a (valid) topic; the reference the trie is tested against."""
    flevels = topic_filter.split("/")
    tlevels = topic.split("/")
    if topic.startswith("$") and flevels[0] in ("+", "#"):
        return False
    for i, f in enumerate(flevels):
        if f == "#":
            return True
        if i >= len(tlevels):
            return False
        if f != "+" and f != tlevels[i]:
            return False
    return len(flevels) == len(tlevels)


@dataclass(slots=True, eq=False)
class _Node(Generic[V]):
    children: dict[str, _Node[V]] = field(default_factory=dict)
    plus: _Node[V] | None = None
    exact: dict[V, None] = field(default_factory=dict)   # filters ending at this node
    hash: dict[V, None] = field(default_factory=dict)    # filters ending with '#' below this node

    def empty(self) -> bool:
        return not (self.children or self.plus or self.exact or self.hash)


class TopicTrie(Generic[V]):
    """Filters to values; ``match(topic)`` costs O(levels x wildcard branches), not O(subscriptions).

    Values are kept in dicts (insertion ordered) so matching is deterministic and removal is O(1).
    """

    __slots__ = ("_count", "_root")

    def __init__(self) -> None:
        self._root: _Node[V] = _Node()
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add(self, topic_filter: str, value: V) -> None:
        node = self._root
        levels = topic_filter.split("/")
        for level in levels:
            if level == "#":
                if value not in node.hash:
                    node.hash[value] = None
                    self._count += 1
                return
            if level == "+":
                if node.plus is None:
                    node.plus = _Node()
                node = node.plus
            else:
                nxt = node.children.get(level)
                if nxt is None:
                    nxt = node.children[level] = _Node()
                node = nxt
        if value not in node.exact:
            node.exact[value] = None
            self._count += 1

    def remove(self, topic_filter: str, value: V) -> bool:
        """Remove one (filter, value); prunes empty branches so churn does not leak nodes."""
        path: list[tuple[_Node[V], str]] = []
        node = self._root
        levels = topic_filter.split("/")
        for level in levels:
            if level == "#":
                if value in node.hash:
                    del node.hash[value]
                    self._count -= 1
                    self._prune(path, node)
                    return True
                return False
            nxt = node.plus if level == "+" else node.children.get(level)
            if nxt is None:
                return False
            path.append((node, level))
            node = nxt
        if value in node.exact:
            del node.exact[value]
            self._count -= 1
            self._prune(path, node)
            return True
        return False

    @staticmethod
    def _prune(path: list[tuple[_Node[V], str]], node: _Node[V]) -> None:
        while path and node.empty():
            parent, level = path.pop()
            if level == "+":
                parent.plus = None
            else:
                del parent.children[level]
            node = parent

    def match(self, topic: str) -> list[V]:
        out: list[V] = []
        levels = topic.split("/")
        dollar = topic.startswith("$")
        self._walk(self._root, levels, 0, out, dollar)
        if len(out) > 1:
            out = list(dict.fromkeys(out))  # a value subscribed by two overlapping filters gets one copy
        return out

    def _walk(self, node: _Node[V], levels: list[str], i: int, out: list[V], dollar: bool) -> None:
        # '#' at this node matches the parent level too ("a/#" matches "a"); not at root for $-topics
        if node.hash and not (dollar and i == 0):
            out.extend(node.hash)
        if i == len(levels):
            out.extend(node.exact)
            return
        child = node.children.get(levels[i])
        if child is not None:
            self._walk(child, levels, i + 1, out, dollar)
        if node.plus is not None and not (dollar and i == 0):
            self._walk(node.plus, levels, i + 1, out, dollar)

    def values(self) -> Iterator[V]:
        stack = [self._root]
        while stack:
            n = stack.pop()
            yield from n.exact
            yield from n.hash
            stack.extend(n.children.values())
            if n.plus is not None:
                stack.append(n.plus)
