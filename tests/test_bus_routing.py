"""Bus routing (SPEC §3): which Redis subscriptions carry which channels, and their reference counts."""

from __future__ import annotations

import fnmatch

from hypothesis import given
from hypothesis import strategies as st

from cluster.bus_interest import InterestCounts
from cluster.bus_routing import (
    ADMIN_CHANNEL,
    EVENTS_PREFIX,
    covering_names,
    identity_interest,
    is_glob,
    pattern_interest,
    routed_message,
    split_routed,
    user_channel,
)
from cluster.channels import Channel, parse_pattern

TYPES = ["market.ticker", "market.orderbook", "order.filled", "order.created", "risk.alert"]
KEYS = ["BTC/USDT", "ETH-USD", "a.b@c_d", "x"]

channels = st.builds(Channel, st.sampled_from(TYPES), st.sampled_from([None, *KEYS]))
patterns = st.sampled_from(
    [
        "*",
        "*:*",
        "*:BTC/USDT",
        "market.*",
        "market.*:*",
        "market.*:ETH-USD",
        "order.*",
        "market.ticker",
        "market.ticker:*",
        "market.ticker:BTC/USDT",
        "order.filled",
        "order.filled:x",
        "risk.alert:*",
    ]
)


def redis_delivers(name: str, channel: Channel) -> bool:
    """What Redis does with a SUBSCRIBE (exact name) or PSUBSCRIBE (glob) for ``events:<channel>``."""
    bus_channel = EVENTS_PREFIX + str(channel)
    return fnmatch.fnmatchcase(bus_channel, name) if is_glob(name) else name == bus_channel


@given(patterns, channels, st.booleans())
def test_a_patterns_bus_subscriptions_carry_every_channel_it_matches(text, channel, anonymous):
    pattern = parse_pattern(text)
    names = pattern_interest(pattern, anonymous, ["market"])
    if pattern.matches(channel) and (not anonymous or channel.domain == "market"):
        assert any(redis_delivers(name, channel) for name in names), (text, str(channel), names)


@given(patterns, channels)
def test_a_patterns_bus_subscriptions_carry_only_channels_of_its_type_and_key(text, channel):
    pattern = parse_pattern(text)
    names = pattern_interest(pattern, False, ["market"])
    if any(redis_delivers(name, channel) for name in names):
        domain_match = pattern.domain is None or pattern.domain == channel.domain
        assert domain_match, (text, str(channel))
        if pattern.keypat not in ("", "*"):
            assert channel.key == pattern.keypat


@given(patterns, channels, st.booleans())
def test_covering_names_list_every_subscription_that_delivers_a_channel(text, channel, anonymous):
    """The reader processes a message once, through the first of these the node holds."""
    for name in pattern_interest(parse_pattern(text), anonymous, ["market"]):
        if redis_delivers(name, channel):
            assert name in covering_names(channel), (name, str(channel))
    assert covering_names(channel)[0] == EVENTS_PREFIX + str(channel)


def test_anonymous_star_is_narrowed_to_the_public_domains():
    assert pattern_interest(parse_pattern("*"), True, ["market", "news"]) == ("events:market.*", "events:news.*")
    assert pattern_interest(parse_pattern("*"), False, ["market"]) == ("events:*",)


def test_exact_channels_use_subscribe_and_wildcards_the_narrowest_glob():
    assert pattern_interest(parse_pattern("market.ticker:BTC/USDT"), False, ()) == ("events:market.ticker:BTC/USDT",)
    assert pattern_interest(parse_pattern("order.filled"), False, ()) == (
        "events:order.filled",
        "events:order.filled:*",
    )
    assert pattern_interest(parse_pattern("market.ticker:*"), False, ()) == ("events:market.ticker:*",)
    assert pattern_interest(parse_pattern("order.*"), False, ()) == ("events:order.*",)


def test_identity_holds_the_user_channel_and_admins_push_admin():
    assert identity_interest("alice", False) == ("push:user:{alice}",)
    assert identity_interest("root", True) == ("push:user:{root}", ADMIN_CHANNEL)
    assert identity_interest(None, False) == ()
    assert user_channel("a{b}") == "push:user:{a{b}}"


def test_routed_message_is_channel_space_envelope():
    message = routed_message("order.filled:o-17", b'{"id":"x"}')
    assert message == b'order.filled:o-17 {"id":"x"}'
    assert split_routed(message) == (b"order.filled:o-17", b'{"id":"x"}')
    assert split_routed(b'{"id":"x"}') == (b"", b'{"id":"x"}')


def test_a_name_is_subscribed_once_while_anything_holds_it():
    counts = InterestCounts(linger_seconds=2.0)
    assert counts.acquire(["a", "b"]) == ["a", "b"]
    assert counts.acquire(["a"]) == []
    counts.release(["a"], now=0.0)
    assert counts.expired(now=10.0) == [], "still held once"
    counts.release(["a"], now=1.0)
    assert counts.expired(now=2.9) == [], "lingers"
    assert counts.expired(now=3.0) == ["a"]
    assert counts.subscribed == {"b"}


def test_a_name_wanted_again_within_its_linger_is_never_unsubscribed():
    counts = InterestCounts(linger_seconds=2.0)
    counts.acquire(["a"])
    counts.release(["a"], now=0.0)
    assert counts.acquire(["a"]) == [], "still subscribed: nothing to send"
    assert counts.expired(now=10.0) == []


def test_a_reconnect_subscribes_everything_wanted_and_forgets_lingering_names():
    counts = InterestCounts(linger_seconds=2.0)
    counts.acquire(["a", "b"])
    counts.release(["b"], now=0.0)
    assert counts.reset() == ["a"]
    assert counts.expired(now=10.0) == []
    assert counts.acquire(["b"]) == ["b"]


def test_releasing_what_is_not_held_changes_nothing():
    counts = InterestCounts(linger_seconds=0.0)
    counts.release(["zzz"], now=0.0)
    assert counts.expired(now=1.0) == [] and counts.wanted == {}
