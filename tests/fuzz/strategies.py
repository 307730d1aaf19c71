"""Hypothesis strategies that build any protobuf request from its descriptor.

Values lean on the edges: integer type limits, NaN and infinities, Timestamps and Durations
outside their valid range or with negative nanos, enum numbers nobody defined, text with NUL,
very long text, and long repeated fields. Text is mixed with plausible values (names of things
that exist, event types, models) so that requests also get past the first checks and reach the
code behind them. Raw-byte strategies make truncated, corrupted and invalid-UTF-8 encodings.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from google.protobuf import (
    any_pb2,
    descriptor_pool,
    duration_pb2,
    json_format,
    message_factory,
    timestamp_pb2,
)
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

from lodestar.common.events import EVENT_TYPES, TYPE_URL_PREFIX, new_event

F = FieldDescriptor
INT_RANGES: dict[int, tuple[int, int]] = {
    F.TYPE_INT32: (-(2**31), 2**31 - 1),
    F.TYPE_SINT32: (-(2**31), 2**31 - 1),
    F.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    F.TYPE_INT64: (-(2**63), 2**63 - 1),
    F.TYPE_SINT64: (-(2**63), 2**63 - 1),
    F.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    F.TYPE_UINT32: (0, 2**32 - 1),
    F.TYPE_FIXED32: (0, 2**32 - 1),
    F.TYPE_UINT64: (0, 2**64 - 1),
    F.TYPE_FIXED64: (0, 2**64 - 1),
}
#: Numbers that break things: type limits, the edges of int32 and of safe doubles, huge money.
EDGE_INTEGERS = [
    0, 1, -1, 2, 100, 2**31 - 1, 2**31, -(2**31), 2**32, 2**53, 10**11, -(10**11), 10**12,
    10**15, 10**18, 2**62, 2**63 - 1, -(2**63), -(2**63) + 1, 2**64 - 1,
]  # fmt: skip
EDGE_FLOATS = [
    0.0,
    -0.0,
    1.0,
    -1.0,
    1e308,
    -1e308,
    5e-324,
    float("nan"),
    float("inf"),
    -float("inf"),
]

MIN_TIMESTAMP = -62_135_596_800  # 0001-01-01T00:00:00Z
MAX_TIMESTAMP = 253_402_300_799  # 9999-12-31T23:59:59Z
MAX_DURATION = 315_576_000_000  # 10,000 years, protobuf's limit
EDGE_SECONDS = [
    0, -1, 1, MIN_TIMESTAMP, MIN_TIMESTAMP - 1, MAX_TIMESTAMP, MAX_TIMESTAMP + 1, MAX_DURATION,
    -MAX_DURATION, MAX_DURATION + 1, 10**11, -(10**11), 2**31 - 1, 2**63 - 1, -(2**63),
]  # fmt: skip
EDGE_NANOS = [0, 1, -1, 999_999_999, -999_999_999, 1_000_000_000, 2**31 - 1, -(2**31)]

#: Plausible text, so that some requests pass validation and reach the code behind it.
WORDS = [
    "", "a", "core", "usage-tracker", "fuzz", "fuzz-module", "web", "p1", "s1", "ann", "t",
    "claude-sonnet-4", "claude-sonnet-4*", "gpt-4o", "llama3:8b", "anthropic", "openai", "ollama",
    "USD", "EUR", "UTC", "Europe/Paris", "America/Los_Angeles", "Mars/Olympus_Mons", "+14:00",
    "2026-01-01", "2020-01-01", "0001-01-01", "9999-12-31", "2026-02-30", "*", "%", "_", "..",
    "1.0.0", "127.0.0.1:1", "test://fuzz", "lodestar://usage-tracker", "model", "project",
    "provider", "session", "user", "day", "hour", "week", "month", "'; DROP TABLE x; --",
    "\x00", "a\x00b", "\u202e", "\U0001f600", "ß", "İ",
]  # fmt: skip


class Vocabulary:
    """Text that names things: fixed words, and names the servers answered with (ids, ...).

    Learned names wait until ``settle`` (called between hypothesis runs): within one run the
    words must not change, or replaying an example would draw something else.
    """

    def __init__(self, words: Sequence[str], *, keep: int = 300) -> None:
        self.words = list(words)
        self.clean = [w for w in self.words if w.isprintable() and w]
        self.learned: list[str] = []
        self.by_field: dict[str, list[str]] = {}
        self._pending: list[tuple[str, str]] = []
        self._keep = keep

    def learn(self, named: Sequence[tuple[str, str]]) -> None:
        """Remember ``(field name, text)`` pairs from responses, for the next run."""
        self._pending += [(name, word) for name, word in named if word.isprintable()]

    def settle(self) -> None:
        """Make what was learned so far drawable (between hypothesis runs only)."""
        for name, word in self._pending:
            for words in (self.learned, self.by_field.setdefault(name, [])):
                if word not in words:
                    words.append(word)
                del words[: -self._keep]
        self._pending = []

    def any_word(self) -> st.SearchStrategy[str]:
        """A fixed word (some with NUL or odd characters)."""
        return _pick(lambda: self.words)

    def clean_word(self, field: str = "") -> st.SearchStrategy[str]:
        """A plausible name for ``field``: one a response carried in a field of that name, any
        learned one, or a fixed printable word."""
        return st.one_of(
            _pick(lambda: self.by_field.get(field) or self.learned or self.clean),
            _pick(lambda: self.learned or self.clean),
            _pick(lambda: self.clean),
        )


def _pick(words: Callable[[], list[str]]) -> st.SearchStrategy[str]:
    """A word of the list ``words()`` returns when the example is drawn (it may grow)."""
    return st.integers(min_value=0, max_value=10**6).map(lambda i: _nth(words(), i))


def _nth(words: list[str], index: int) -> str:
    return words[index % len(words)] if words else ""


def event_types() -> list[str]:
    """Full names of every payload type the bus carries."""
    return sorted(EVENT_TYPES)


Path = tuple[FieldDescriptor, ...]
#: An edit that leaves a field out.
UNSET = object()
LEAF_TYPES = {"google.protobuf.Timestamp", "google.protobuf.Duration", "google.protobuf.Any"}


class MessageBuilder:
    """Strategies for messages of any type, following the descriptor field by field.

    Most messages are plausible (every field a value a real client would send) with one to three
    fields set to an edge value, so validation is tested field by field and requests also get
    through it; the rest are wild, every field an edge value.
    """

    def __init__(
        self,
        vocabulary: Vocabulary,
        *,
        seeds: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
        max_depth: int = 4,
    ) -> None:
        self.vocabulary = vocabulary
        self.seeds = seeds or {}
        self.max_depth = max_depth
        self.event_types = event_types()
        for field in ("type", "event_types"):
            vocabulary.by_field.setdefault(field, []).extend(self.event_types)

    def message(self, descriptor: Descriptor) -> st.SearchStrategy[Message]:
        """A request of ``descriptor``'s type: mostly plausible with a few edges, some wild."""
        mutated = self.mutated(descriptor)
        sparse = self.mutated(descriptor, sparse=True)
        return st.one_of(mutated, mutated, sparse, self.wild(descriptor))

    def mutated(
        self, descriptor: Descriptor, *, sparse: bool = False
    ) -> st.SearchStrategy[Message]:
        """A plausible message with up to three leaf fields set to edge values; ``sparse``: with
        only some of its fields set."""
        paths = leaf_paths(descriptor, self.max_depth)
        plausible = self.plausible(descriptor, sparse=sparse)
        seeds = self._seeds(descriptor)
        if seeds is not None:
            plausible = st.one_of(plausible, seeds)
        if not paths:
            return plausible
        edits = st.lists(
            st.sampled_from(paths).flatmap(
                lambda path: self.edge(path[-1]).map(lambda value: (path, value))
            ),
            max_size=3,
        )
        return st.tuples(plausible, edits).map(_edited)

    def _seeds(self, descriptor: Descriptor) -> st.SearchStrategy[Message] | None:
        """The known-good requests of this type, if there are any (a fresh copy each draw)."""
        cls = message_factory.GetMessageClass(descriptor)
        encoded = [
            json_format.ParseDict(seed, cls()).SerializeToString()
            for seed in self.seeds.get(descriptor.full_name, ())
        ]
        return st.sampled_from(encoded).map(cls.FromString) if encoded else None

    # --- plausible values -----------------------------------------------------------------------

    def plausible(
        self, descriptor: Descriptor, depth: int = 0, *, sparse: bool = False
    ) -> st.SearchStrategy[Message]:
        """A message such as a careful client would send (ids it was given, small numbers)."""
        name = descriptor.full_name
        if name == "google.protobuf.Timestamp":
            return recent_timestamps()
        if name == "google.protobuf.Duration":
            return st.builds(
                lambda s, n: duration_pb2.Duration(seconds=s, nanos=n),
                st.integers(0, 3600),
                st.integers(0, 999_999_999),
            )
        if name == "google.protobuf.Any":
            return self.payload(plausible=True).map(_pack)
        if name == "lodestar.events.v1.Event":
            return self.event()
        return self._fields(descriptor, depth, plausible=True, sparse=sparse)

    def plausible_value(self, field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
        """One plausible value of ``field``'s type."""
        if field.type in INT_RANGES:
            low = max(INT_RANGES[field.type][0], 0)
            return st.one_of(st.integers(low, 1000), st.integers(low, 10**6))
        if field.type in (F.TYPE_DOUBLE, F.TYPE_FLOAT):
            return st.floats(min_value=0, max_value=1000)
        if field.type == F.TYPE_BOOL:
            return st.booleans()
        if field.type == F.TYPE_STRING:
            return self.vocabulary.clean_word(field.name)
        if field.type == F.TYPE_BYTES:
            return st.binary(max_size=32)
        if field.type == F.TYPE_ENUM:
            defined = [v.number for v in field.enum_type.values]
            return st.sampled_from([n for n in defined if n != 0] or defined)
        return self.plausible(field.message_type, depth + 1)

    # --- edge values ----------------------------------------------------------------------------

    def edge(self, field: FieldDescriptor) -> st.SearchStrategy[Any]:
        """A value of ``field``'s type that tests a bound (or a list of them, if repeated), or
        ``UNSET``: the field left out."""
        single = self.edge_value(field)
        if _is_map(field):
            return st.just(UNSET)
        if _is_repeated(field):
            plausible = self.plausible_value(field, self.max_depth - 1)
            return st.one_of(
                st.lists(single, min_size=1, max_size=3),
                st.lists(plausible, min_size=100, max_size=300),
                st.just(UNSET),
            )
        return st.one_of(single, single, single, st.just(UNSET))

    def edge_value(self, field: FieldDescriptor) -> st.SearchStrategy[Any]:
        """One edge value of ``field``'s type."""
        if field.type in INT_RANGES:
            low, high = INT_RANGES[field.type]
            return st.one_of(st.sampled_from(_edges(low, high)), st.integers(low, high))
        if field.type == F.TYPE_DOUBLE:
            return st.one_of(st.sampled_from(EDGE_FLOATS), st.floats())
        if field.type == F.TYPE_FLOAT:
            return st.one_of(st.sampled_from(EDGE_FLOATS), st.floats(width=32))
        if field.type == F.TYPE_BOOL:
            return st.booleans()
        if field.type == F.TYPE_STRING:
            return self.odd_text()
        if field.type == F.TYPE_BYTES:
            return st.one_of(st.binary(max_size=64), st.binary(min_size=1000, max_size=5000))
        if field.type == F.TYPE_ENUM:
            defined = [v.number for v in field.enum_type.values]
            return st.one_of(
                st.just(0), integers(-(2**31), 2**31 - 1).filter(lambda n: n not in defined)
            )
        name = field.message_type.full_name
        if name == "google.protobuf.Timestamp":
            return timestamps()
        if name == "google.protobuf.Duration":
            return durations()
        if name == "google.protobuf.Any":
            return self.odd_any()
        return self.wild(field.message_type, 1)

    def odd_text(self) -> st.SearchStrategy[str]:
        """Text that tests a bound: NUL and control characters, odd Unicode, very long."""
        return st.one_of(
            st.just(""),
            self.vocabulary.any_word(),
            st.text(max_size=40),
            st.tuples(
                self.vocabulary.clean_word(), st.sampled_from(["\x00", "\n", " ", "\u202e"])
            ).map("".join),
            st.integers(min_value=100, max_value=70_000).map(lambda n: "x" * n),
            self.vocabulary.clean_word().map(lambda w: w.upper()),
        )

    def odd_any(self) -> st.SearchStrategy[Message]:
        """An ``Any`` whose payload is wild, of an unknown type, or not an encoding at all."""
        foreign = st.builds(
            lambda url, value: any_pb2.Any(type_url=url, value=value),
            st.one_of(
                st.sampled_from(self.event_types).map(lambda n: TYPE_URL_PREFIX + n),
                self.odd_text(),
            ),
            st.binary(max_size=64),
        )
        return st.one_of(self.payload(plausible=False).map(_pack), foreign, st.just(any_pb2.Any()))

    # --- wild messages --------------------------------------------------------------------------

    def wild(self, descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
        """A message whose set fields all hold edge values."""
        name = descriptor.full_name
        if name == "google.protobuf.Timestamp":
            return timestamps()
        if name == "google.protobuf.Duration":
            return durations()
        if name == "google.protobuf.Any":
            return self.odd_any()
        return self._fields(descriptor, depth, plausible=False)

    def _fields(
        self, descriptor: Descriptor, depth: int, *, plausible: bool, sparse: bool = False
    ) -> st.SearchStrategy[Message]:
        cls = message_factory.GetMessageClass(descriptor)
        if depth >= self.max_depth:
            return st.just(cls())
        parts = [
            self._group(group, depth, plausible, sparse) for group in _field_groups(descriptor)
        ]

        def build(chosen: tuple[list[tuple[FieldDescriptor, Any]], ...]) -> Message:
            message = cls()
            for settings in chosen:
                for field, value in settings:
                    _set(message, field, value)
            return message

        return st.tuples(*parts).map(build)

    def _group(
        self, group: list[FieldDescriptor], depth: int, plausible: bool, sparse: bool
    ) -> st.SearchStrategy[list[tuple[FieldDescriptor, Any]]]:
        """A plain field, set (always when plausible and not sparse) or not; or one field of a
        oneof (when plausible, most often its first, usually the one to start with)."""
        options = [
            self._field_value(field, depth, plausible).map(lambda v, f=field: [(f, v)])
            for field in group
        ]
        unset: st.SearchStrategy[list[tuple[FieldDescriptor, Any]]] = st.just([])
        if plausible and not sparse:
            return st.one_of(options[0], options[0], *options)
        return st.one_of(unset, *options)

    def _field_value(
        self, field: FieldDescriptor, depth: int, plausible: bool
    ) -> st.SearchStrategy[Any]:
        if not plausible:
            if _is_map(field):
                entry = field.message_type
                key = self.edge_value(entry.fields_by_name["key"])
                value = self.edge_value(entry.fields_by_name["value"])
                return st.dictionaries(key, value, max_size=4)
            if _is_repeated(field):
                return st.lists(self.edge_value(field), max_size=4)
            return self.edge_value(field)
        if _is_map(field):
            entry = field.message_type
            key = self.plausible_value(entry.fields_by_name["key"], depth + 1)
            value = self.plausible_value(entry.fields_by_name["value"], depth + 1)
            return st.dictionaries(key, value, max_size=2)
        if _is_repeated(field):
            return st.lists(self.plausible_value(field, depth + 1), min_size=1, max_size=3)
        return self.plausible_value(field, depth + 1)

    # --- events ---------------------------------------------------------------------------------

    def payload(self, *, plausible: bool) -> st.SearchStrategy[Message]:
        """An event payload of any type the bus carries: plausible with a few edges, or wild."""
        pool = descriptor_pool.Default()
        build = self.mutated if plausible else self.wild
        return st.sampled_from(self.event_types).flatmap(
            lambda name: build(pool.FindMessageTypeByName(name))
        )

    def event(self) -> st.SearchStrategy[Message]:
        """An envelope as the SDK builds it (fresh UUIDv7, time now) around a payload."""
        return st.builds(
            lambda payload, source: new_event(payload, source=source),
            self.payload(plausible=True),
            st.sampled_from(["test://fuzz", "lodestar://usage-tracker", "myapp://gateway"]),
        )


def integers(low: int, high: int) -> st.SearchStrategy[int]:
    """Integers of a field's range, leaning on its limits and on numbers that overflow sums."""
    return st.one_of(
        st.sampled_from(_edges(low, high)),
        st.integers(min_value=max(low, -1000), max_value=min(high, 1000)),
        st.integers(min_value=low, max_value=high),
    )


def _edges(low: int, high: int) -> list[int]:
    return sorted({v for v in EDGE_INTEGERS if low <= v <= high} | {low, high, low + 1, high - 1})


def recent_timestamps() -> st.SearchStrategy[Message]:
    """Valid Timestamps within a few days of now."""
    return st.builds(
        lambda d, n: timestamp_pb2.Timestamp(seconds=int(time.time()) + d, nanos=n),
        st.integers(min_value=-3 * 86400, max_value=3600),
        st.integers(0, 999_999_999),
    )


def timestamps() -> st.SearchStrategy[Message]:
    """Timestamps far from now, at and beyond the valid range's ends, with bad nanos."""
    far = st.integers(min_value=-400 * 86400, max_value=400 * 86400).map(
        lambda d: int(time.time()) + d
    )
    seconds = st.one_of(far, st.sampled_from(EDGE_SECONDS), integers(-(2**63), 2**63 - 1))
    nanos = st.one_of(
        st.just(0),
        st.integers(0, 999_999_999),
        st.sampled_from(EDGE_NANOS),
        integers(-(2**31), 2**31 - 1),
    )
    return st.builds(lambda s, n: timestamp_pb2.Timestamp(seconds=s, nanos=n), seconds, nanos)


def durations() -> st.SearchStrategy[Message]:
    """Durations small and huge, out of range, with nanos of the wrong sign."""
    seconds = st.one_of(
        st.integers(0, 3600), st.sampled_from(EDGE_SECONDS), integers(-(2**63), 2**63 - 1)
    )
    nanos = st.one_of(st.just(0), st.sampled_from(EDGE_NANOS), integers(-(2**31), 2**31 - 1))
    return st.builds(lambda s, n: duration_pb2.Duration(seconds=s, nanos=n), seconds, nanos)


# --- raw bytes ------------------------------------------------------------------------------------


def corrupted(encodings: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """Random bytes, and valid encodings truncated, with a byte flipped or garbage appended."""
    truncated = encodings.flatmap(
        lambda data: (
            st.integers(0, max(0, len(data) - 1)).map(lambda n: data[:n])
            if data
            else st.just(b"\x08")
        )
    )
    flipped = st.tuples(encodings, st.integers(0, 10**6), st.integers(1, 255)).map(_flip)
    appended = st.tuples(encodings, st.binary(min_size=1, max_size=16)).map(lambda t: t[0] + t[1])
    return st.one_of(
        st.binary(max_size=256),
        st.sampled_from([b"\xff", b"\x08", b"\x0a\x05ab", b"\x08" + b"\x80" * 10 + b"\x01"]),
        truncated,
        flipped,
        appended,
    )


def with_invalid_utf8(message: Message) -> bytes | None:
    """``message``'s encoding with the first text found replaced by invalid UTF-8, or None.

    The text is found in the encoding as bytes and overwritten in place with 0xFF bytes (same
    length, so every length prefix stays right); that includes text inside ``Any`` payloads.
    """
    data = message.SerializeToString()
    for text in _texts(message):
        encoded = text.encode()
        if len(encoded) >= 1 and data.count(encoded) >= 1 and not encoded.isdigit():
            start = data.index(encoded)
            return data[:start] + b"\xff" * len(encoded) + data[start + len(encoded) :]
    return None


def _texts(message: Message) -> list[str]:
    found: list[str] = []
    for field, value in message.ListFields():
        values = value if _is_repeated(field) and not _is_map(field) else [value]
        for item in values:
            if field.type == F.TYPE_STRING and len(item) >= 3:
                found.append(item)
            elif field.type == F.TYPE_MESSAGE and not _is_map(field):
                if isinstance(item, any_pb2.Any) and item.value:
                    found += _any_texts(item)
                found += _texts(item)
    return found


def _any_texts(packed: any_pb2.Any) -> list[str]:
    name = packed.type_url.rpartition("/")[2]
    try:
        cls = message_factory.GetMessageClass(descriptor_pool.Default().FindMessageTypeByName(name))
        return _texts(cls.FromString(packed.value))
    except Exception:
        return []


# --- leaf paths -----------------------------------------------------------------------------------


def leaf_paths(descriptor: Descriptor, max_depth: int) -> list[Path]:
    """Every field chain from ``descriptor`` to a scalar, a list or a well-known type."""
    paths: list[Path] = []
    for field in descriptor.fields:
        nested = field.type == F.TYPE_MESSAGE and not _is_map(field)
        if not nested or field.message_type.full_name in LEAF_TYPES or max_depth <= 1:
            paths.append((field,))
            continue
        if _is_repeated(field):
            paths.append((field,))
        paths += [(field, *rest) for rest in leaf_paths(field.message_type, max_depth - 1)]
    return paths


def _edited(args: tuple[Message, list[tuple[Path, Any]]]) -> Message:
    """The message with each path's leaf set to its edge value."""
    message, edits = args
    for path, value in edits:
        target = message
        for field in path[:-1]:
            container = getattr(target, field.name)
            if _is_repeated(field):
                target = container[0] if len(container) else container.add()
            else:
                target = container
        leaf = path[-1]
        if value is UNSET or _is_repeated(leaf) or leaf.type == F.TYPE_MESSAGE:
            target.ClearField(leaf.name)
        if value is not UNSET:
            _set(target, leaf, value)
    return message


# --- helpers --------------------------------------------------------------------------------------


def _field_groups(descriptor: Descriptor) -> list[list[FieldDescriptor]]:
    """Fields grouped by real oneof (one of them is set at most); other fields alone."""
    groups: list[list[FieldDescriptor]] = []
    seen: set[str] = set()
    for field in descriptor.fields:
        oneof = field.containing_oneof
        if oneof is not None and len(oneof.fields) > 1:
            if oneof.full_name not in seen:
                seen.add(oneof.full_name)
                groups.append(list(oneof.fields))
        else:
            groups.append([field])
    return groups


def _is_repeated(field: FieldDescriptor) -> bool:
    return bool(field.is_repeated)


def _is_map(field: FieldDescriptor) -> bool:
    return bool(
        _is_repeated(field)
        and field.type == F.TYPE_MESSAGE
        and field.message_type.GetOptions().map_entry
    )


def _set(message: Message, field: FieldDescriptor, value: Any) -> None:
    target = getattr(message, field.name)
    if _is_map(field):
        value_field = field.message_type.fields_by_name["value"]
        for key, item in value.items():
            if value_field.type == F.TYPE_MESSAGE:
                target[key].CopyFrom(item)
            else:
                target[key] = item
    elif _is_repeated(field):
        if field.type == F.TYPE_MESSAGE:
            for item in value:
                target.add().CopyFrom(item)
        else:
            target.extend(value)
    elif field.type == F.TYPE_MESSAGE:
        target.CopyFrom(value)
    else:
        setattr(message, field.name, value)


def _pack(payload: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(payload)
    return packed


def _flip(args: tuple[bytes, int, int]) -> bytes:
    data, position, mask = args
    if not data:
        return b"\xff"
    index = position % len(data)
    return data[:index] + bytes([data[index] ^ mask]) + data[index + 1 :]
