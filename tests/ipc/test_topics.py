"""Topic/filter validation and matching tables (MQTT rules), and the trie against the reference."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipc.errors import InvalidArguments
from ipc.topics import MAX_TOPIC_BYTES, TopicTrie, matches, validate_filter, validate_topic

VALID_TOPICS = ["a", "a/b", "/", "/a", "a/", "a//b", "$SYS/x", "sensors/turbine-1/raw", "é/ü", "x" * 1000]
INVALID_TOPICS = ["", "a/+", "+", "#", "a/#", "a/b+", "a\x00b", 3, None, "x" * (MAX_TOPIC_BYTES + 1),
                  "€" * (MAX_TOPIC_BYTES // 3 + 1), "a\ud800"]
VALID_FILTERS = ["#", "+", "a/#", "a/+/c", "+/+", "/+", "+/", "a//#", "$SYS/#", "a/b"]
INVALID_FILTERS = ["", "a#", "a/#/b", "a+", "a/+b/c", "##", "#/a", "a\x00", 1]


@pytest.mark.parametrize("topic", VALID_TOPICS)
def test_valid_topics(topic: str) -> None:
    assert validate_topic(topic) == topic


@pytest.mark.parametrize("topic", INVALID_TOPICS)
def test_invalid_topics(topic: object) -> None:
    with pytest.raises(InvalidArguments) as info:
        validate_topic(topic)
    assert info.value.code == "INVALID_ARGUMENTS"


@pytest.mark.parametrize("topic_filter", VALID_FILTERS)
def test_valid_filters(topic_filter: str) -> None:
    assert validate_filter(topic_filter) == topic_filter


@pytest.mark.parametrize("topic_filter", INVALID_FILTERS)
def test_invalid_filters(topic_filter: object) -> None:
    with pytest.raises(InvalidArguments):
        validate_filter(topic_filter)


def test_max_length_counts_utf8_bytes() -> None:
    validate_topic("x" * MAX_TOPIC_BYTES)
    validate_topic("€" * (MAX_TOPIC_BYTES // 3))


MATCH_TABLE = [
    ("a/b", "a/b", True),
    ("a/b", "a/c", False),
    ("a/+", "a/b", True),
    ("a/+", "a/b/c", False),
    ("a/+", "a/", True),          # + matches an empty level
    ("a/+", "a", False),
    ("+/+", "/finance", True),
    ("/+", "/finance", True),
    ("+", "/finance", False),
    ("a/#", "a", True),           # '#' includes the parent level
    ("a/#", "a/b/c", True),
    ("a/#", "ab", False),
    ("#", "a/b", True),
    ("#", "/", True),
    ("+/#", "a", True),
    ("a/+/#", "a/b", True),
    ("a/+/#", "a", False),
    ("#", "$SYS/x", False),       # leading wildcards never match $-topics
    ("+/x", "$SYS/x", False),
    ("$SYS/#", "$SYS/x", True),
    ("$SYS/+", "$SYS/x", True),
    ("a/$x", "a/$x", True),
    ("+/$x", "a/$x", True),
    ("a//b", "a//b", True),
    ("a/+/b", "a//b", True),
]


@pytest.mark.parametrize(("topic_filter", "topic", "expected"), MATCH_TABLE)
def test_match_table(topic_filter: str, topic: str, expected: bool) -> None:
    assert matches(topic_filter, topic) is expected
    trie: TopicTrie[str] = TopicTrie()
    trie.add(topic_filter, "v")
    assert (trie.match(topic) == ["v"]) is expected


def test_trie_remove_prunes_and_counts() -> None:
    trie: TopicTrie[int] = TopicTrie()
    filters = ["a/b", "a/+", "a/#", "#", "+/b", "a/b"]
    for i, f in enumerate(filters):
        trie.add(f, i)
    assert len(trie) == 6
    assert sorted(trie.match("a/b")) == [0, 1, 2, 3, 4, 5]
    assert trie.remove("a/b", 0) and not trie.remove("a/b", 0)
    assert not trie.remove("x/y", 1)
    for i, f in list(enumerate(filters))[1:]:
        assert trie.remove(f, i)
    assert len(trie) == 0
    assert trie.match("a/b") == []
    assert trie._root.empty()  # nothing left behind after churn


def test_same_value_under_two_filters_is_returned_once() -> None:
    trie: TopicTrie[str] = TopicTrie()
    trie.add("a/#", "s")
    trie.add("a/+", "s")
    assert trie.match("a/b") == ["s"]


LEVEL = st.sampled_from(["a", "b", "", "$x", "c"])
TOPIC = st.lists(LEVEL, min_size=1, max_size=5).map("/".join).filter(bool)
FILTER = st.lists(st.sampled_from(["a", "b", "", "$x", "+"]), min_size=1, max_size=5).flatmap(
    lambda levels: st.booleans().map(lambda hash_: "/".join([*levels, "#"] if hash_ else levels))
).filter(bool)


@settings(max_examples=300, deadline=None)
@given(st.lists(FILTER, max_size=12), st.lists(TOPIC, min_size=1, max_size=8), st.data())
def test_trie_equals_naive_matcher(filters: list[str], topics: list[str], data: st.DataObject) -> None:
    trie: TopicTrie[int] = TopicTrie()
    live: dict[int, str] = {}
    for i, f in enumerate(filters):
        trie.add(f, i)
        live[i] = f
    for i in data.draw(st.lists(st.sampled_from(sorted(live)), unique=True)) if live else []:
        assert trie.remove(live.pop(i), i)
    assert len(trie) == len(live)
    for t in topics:
        assert sorted(trie.match(t)) == sorted(i for i, f in live.items() if matches(f, t))


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=30))
def test_validation_raises_only_invalid_arguments(text: str) -> None:
    for fn in (validate_topic, validate_filter):
        with contextlib.suppress(InvalidArguments):
            fn(text)
