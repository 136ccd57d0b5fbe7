"""Channel names and subscription patterns of SPEC §3. Pure: no processes.

Ambiguity resolved by the code (documented here): a key pattern of ``*``
(``market.ticker:*``) means "any key" and does not match the keyless channel
``market.ticker``; a pattern without a key part (``market.ticker``) matches
both.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cluster.channels import Channel, ChannelError, Pattern, candidate_patterns, parse_channel, parse_pattern

KEY_ALPHABET = "ABCXYZabcxyz0189_-./@"


def matches(pattern: str, channel: str) -> bool:
    return parse_pattern(pattern).matches(parse_channel(channel))


# --- channel grammar --------------------------------------------------------------


def test_channel_is_a_type():
    assert parse_channel("order.filled") == Channel("order.filled", None)
    assert str(parse_channel("order.filled")) == "order.filled"


def test_channel_is_a_type_and_a_key():
    channel = parse_channel("market.ticker:BTC/USDT")
    assert channel == Channel("market.ticker", "BTC/USDT")
    assert channel.domain == "market"
    assert str(channel) == "market.ticker:BTC/USDT"


@pytest.mark.parametrize("key", ["BTC/USDT", "a", "strategy-42", "bt_1.2", "user@desk", "A-Z_a-z.0/9@x", "x" * 128])
def test_channel_key_is_1_to_128_of_the_allowed_characters(key):
    assert parse_channel(f"backtest.progress:{key}").key == key


@pytest.mark.parametrize("key", ["", "x" * 129, "BTC USDT", "a:b", "ü", "a*", "a#b", "a\nb", "a+b", "a,b"])
def test_channel_key_outside_the_grammar_is_refused(key):
    with pytest.raises(ChannelError):
        parse_channel(f"backtest.progress:{key}")


@pytest.mark.parametrize(
    "name", ["", "order", "Order.filled", "order.filled.x", "order.*", "*", "order-x.filled", "9order.filled", ".x"]
)
def test_channel_type_outside_the_grammar_is_refused(name):
    with pytest.raises(ChannelError):
        parse_channel(name)


# --- pattern grammar ---------------------------------------------------------------


@pytest.mark.parametrize(
    "text,expected",
    [
        ("*", Pattern("*", "")),
        ("order.*", Pattern("order.*", "")),
        ("risk.alert", Pattern("risk.alert", "")),
        ("market.ticker:BTC/USDT", Pattern("market.ticker", "BTC/USDT")),
        ("market.ticker:*", Pattern("market.ticker", "*")),
        ("market.*:BTC/USDT", Pattern("market.*", "BTC/USDT")),
        ("*:BTC/USDT", Pattern("*", "BTC/USDT")),
        ("*:*", Pattern("*", "*")),
    ],
)
def test_pattern_is_typepat_with_optional_keypat(text, expected):
    assert parse_pattern(text) == expected
    assert str(parse_pattern(text)) == text


@pytest.mark.parametrize(
    "text",
    [
        "",
        "order",
        "*.filled",
        "order.fil*",
        "order.**",
        "or*.filled",
        "Order.filled",
        "order.filled:",
        "order.filled:BT*",
        "order.filled:a b",
        "order.filled:" + "x" * 129,
        "**",
        "order.filled.x",
        "order.filled:a:b",
        " order.filled",
        "x" * 301,
    ],
)
def test_pattern_outside_the_grammar_is_refused(text):
    with pytest.raises(ChannelError):
        parse_pattern(text)


@pytest.mark.parametrize("value", [None, 1, ["order.*"], b"order.*"])
def test_pattern_must_be_a_string(value):
    with pytest.raises(ChannelError):
        parse_pattern(value)


# --- matching -------------------------------------------------------------------------


def test_pattern_without_key_matches_the_type_with_any_key():
    assert matches("market.ticker", "market.ticker:BTC/USDT")
    assert matches("market.ticker", "market.ticker:ETH/USDT")


def test_pattern_without_key_matches_the_type_with_no_key():
    assert matches("market.ticker", "market.ticker")


def test_pattern_without_key_does_not_match_another_type():
    assert not matches("market.ticker", "market.trades:BTC/USDT")
    assert not matches("market.ticker", "market.orderbook")


def test_pattern_with_key_matches_only_that_key():
    assert matches("market.ticker:BTC/USDT", "market.ticker:BTC/USDT")
    assert not matches("market.ticker:BTC/USDT", "market.ticker:ETH/USDT")
    assert not matches("market.ticker:BTC/USDT", "market.ticker:btc/usdt")
    assert not matches("market.ticker:BTC/USDT", "market.ticker")


def test_keypat_star_matches_any_key_but_not_a_keyless_channel():
    assert matches("market.ticker:*", "market.ticker:BTC/USDT")
    assert matches("market.ticker:*", "market.ticker:x")
    assert not matches("market.ticker:*", "market.ticker")


def test_domain_star_matches_every_type_of_the_domain():
    for channel in ("order.created", "order.filled:o-1", "order.cancelled", "order.new_kind"):
        assert matches("order.*", channel)


def test_domain_star_does_not_match_other_domains():
    assert not matches("order.*", "orders.filled")
    assert not matches("order.*", "risk.alert")
    assert not matches("market.*", "spirit.notification")


def test_domain_star_with_key_matches_that_key_in_the_domain():
    assert matches("market.*:BTC/USDT", "market.ticker:BTC/USDT")
    assert matches("market.*:BTC/USDT", "market.trades:BTC/USDT")
    assert not matches("market.*:BTC/USDT", "market.trades:ETH/USDT")
    assert not matches("market.*:BTC/USDT", "market.trades")


def test_star_matches_every_channel():
    for channel in ("order.filled", "market.ticker:BTC/USDT", "spirit.notification", "future.thing:k"):
        assert matches("*", channel)


def test_star_with_key_matches_that_key_in_every_type():
    assert matches("*:BTC/USDT", "market.ticker:BTC/USDT")
    assert matches("*:BTC/USDT", "order.filled:BTC/USDT")
    assert not matches("*:BTC/USDT", "order.filled")


def test_a_channel_has_at_most_nine_candidate_patterns():
    assert len(candidate_patterns(parse_channel("market.ticker:BTC/USDT"))) == 9
    assert len(candidate_patterns(parse_channel("market.ticker"))) == 3


# --- property: matching agrees with a direct reading of the SPEC ---------------------


def spec_matches(pattern: str, channel: str) -> bool:
    """SPEC §3 read literally (with the code's choice for ``:*`` and keyless channels)."""
    typepat, has_keypat, keypat = pattern.partition(":")
    ctype, has_key, ckey = channel.partition(":")
    if typepat == "*":
        type_ok = True
    elif typepat.endswith(".*"):
        type_ok = ctype.split(".")[0] == typepat[:-2]
    else:
        type_ok = typepat == ctype
    if not has_keypat:
        key_ok = True
    elif keypat == "*":
        key_ok = bool(has_key)
    else:
        key_ok = bool(has_key) and ckey == keypat
    return type_ok and key_ok


domains = st.sampled_from(["order", "market", "risk", "ai", "orderx"])
names = st.sampled_from(["filled", "ticker", "alert", "x_1"])
keys = st.text(KEY_ALPHABET, min_size=1, max_size=4)
types = st.builds(lambda d, n: f"{d}.{n}", domains, names)
channels = st.one_of(types, st.builds(lambda t, k: f"{t}:{k}", types, keys))
typepats = st.one_of(st.just("*"), domains.map(lambda d: f"{d}.*"), types)
patterns = st.one_of(
    typepats,
    st.builds(lambda t, k: f"{t}:{k}", typepats, st.one_of(st.just("*"), keys)),
)


@given(patterns, channels)
def test_matching_agrees_with_the_spec(pattern, channel):
    assert matches(pattern, channel) == spec_matches(pattern, channel)


@given(patterns, channels)
def test_a_matching_pattern_is_among_the_channel_candidates(pattern, channel):
    parsed = parse_pattern(pattern)
    assert (parsed in candidate_patterns(parse_channel(channel))) == spec_matches(pattern, channel)


@given(st.text(max_size=40))
def test_channel_and_pattern_parsers_only_raise_channel_error(text):
    for parse in (parse_channel, parse_pattern):
        try:
            parse(text)
        except ChannelError:
            pass
