"""Channel names and subscription patterns (SPEC §3). Pure: no I/O.

A channel is ``<type>`` or ``<type>:<key>``. A pattern is ``<typepat>[:<keypat>]``
where typepat is ``*``, ``<domain>.*`` or a type and keypat is a key or ``*``; a
pattern without a key part matches the type with any key or none.

Matching is done by lookup, not by scanning: :func:`candidate_patterns` lists the
(at most nine) normalized patterns that can match a channel, so the node's index
finds subscribers with a handful of dict lookups whatever its size.
"""

from __future__ import annotations

import re
from typing import NamedTuple

TYPE_RE = re.compile(r"[a-z][a-z0-9_]*\.[a-z][a-z0-9_]*\Z")
DOMAIN_RE = re.compile(r"[a-z][a-z0-9_]*\Z")
KEY_RE = re.compile(r"[A-Za-z0-9_\-./@]{1,128}\Z")
MAX_PATTERN_LENGTH = 300

ANY = "*"
NO_KEY = ""  # keypat of a pattern without a key part: any key or none


class ChannelError(ValueError):
    """Not a valid channel or pattern."""


class Channel(NamedTuple):
    type: str
    key: str | None

    @property
    def domain(self) -> str:
        return self.type.partition(".")[0]

    def __str__(self) -> str:
        return self.type if self.key is None else f"{self.type}:{self.key}"


class Pattern(NamedTuple):
    """A normalized pattern: typepat is ``*``, ``<domain>.*`` or a type."""

    typepat: str
    keypat: str  # a key, ``*``, or NO_KEY

    def __str__(self) -> str:
        return self.typepat if self.keypat == NO_KEY else f"{self.typepat}:{self.keypat}"

    @property
    def domain(self) -> str | None:
        """The one domain this pattern can match, or None for ``*``."""
        return None if self.typepat == ANY else self.typepat.partition(".")[0]

    def matches(self, channel: Channel) -> bool:
        return self in candidate_patterns(channel)


def parse_channel(text: str) -> Channel:
    """Parse an event channel name such as ``market.ticker:BTC/USDT``."""
    if type(text) is not str or len(text) > MAX_PATTERN_LENGTH:
        raise ChannelError("channel must be a string of at most 300 characters")
    event_type, sep, key = text.partition(":")
    if not TYPE_RE.match(event_type):
        raise ChannelError(f"invalid event type in channel {text!r}")
    if not sep:
        return Channel(event_type, None)
    if not KEY_RE.match(key):
        raise ChannelError(f"invalid key in channel {text!r}: 1-128 of [A-Za-z0-9_-./@]")
    return Channel(event_type, key)


def parse_pattern(text: str) -> Pattern:
    """Parse a subscription pattern such as ``order.*`` or ``market.ticker:BTC/USDT``."""
    if type(text) is not str or not text or len(text) > MAX_PATTERN_LENGTH:
        raise ChannelError("pattern must be a non-empty string of at most 300 characters")
    typepat, sep, keypat = text.partition(":")
    if typepat != ANY:
        domain, dot, name = typepat.partition(".")
        valid = dot and DOMAIN_RE.match(domain) and (name == ANY or DOMAIN_RE.match(name))
        if not valid:
            raise ChannelError(f"invalid type pattern in {text!r}: use *, <domain>.* or <domain>.<name>")
    if not sep:
        return Pattern(typepat, NO_KEY)
    if keypat != ANY and not KEY_RE.match(keypat):
        raise ChannelError(f"invalid key pattern in {text!r}: * or 1-128 of [A-Za-z0-9_-./@]")
    return Pattern(typepat, keypat)


def candidate_patterns(channel: Channel) -> tuple[Pattern, ...]:
    """Every normalized pattern that matches ``channel``."""
    typepats = (channel.type, channel.domain + ".*", ANY)
    if channel.key is None:
        return tuple(Pattern(t, NO_KEY) for t in typepats)
    keypats = (channel.key, ANY, NO_KEY)
    return tuple(Pattern(t, k) for t in typepats for k in keypats)
