"""The journal codec: every documented type comes back as itself, and failures say why."""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import functools
import json
import re
import uuid
from decimal import Decimal
from typing import Any

import pydantic
import pytest
from hypothesis import given
from hypothesis import strategies as st

from garrison.engine._codec import decode, encode, error_from_data, error_to_data, roundtrip
from garrison.errors import RunNotFoundError, SerializationError, StepFailed


class Colour(enum.Enum):
    RED = "red"
    BLUE = 2


class Priority(enum.IntEnum):
    LOW = 1
    HIGH = 2


class Tier(enum.StrEnum):
    FREE = "free"
    PAID = "paid"


@dataclasses.dataclass(frozen=True)
class Money:
    amount: Decimal
    currency: str


@dataclasses.dataclass
class Line:
    sku: str
    price: Money
    tags: frozenset[str]
    when: dt.date
    colour: Colour
    total: int = dataclasses.field(init=False, default=0)


class Customer(pydantic.BaseModel):
    id: uuid.UUID
    name: str
    since: dt.datetime
    tier: Tier


class Order(pydantic.BaseModel):
    customer: Customer
    notes: list[str]


class Unstorable:
    """A plain class: neither JSON, dataclass, pydantic model nor enum."""


class NeedsKeyword(Exception):
    def __init__(self, *, code: int) -> None:
        super().__init__(f"code {code}")


UTC_PLUS_2 = dt.timezone(dt.timedelta(hours=2))

DOCUMENTED_VALUES = {
    "datetime-utc": dt.datetime(2024, 5, 1, 12, 30, 5, 123456, tzinfo=dt.UTC),
    "datetime-offset": dt.datetime(2024, 5, 1, 12, 30, tzinfo=UTC_PLUS_2),
    "datetime-naive": dt.datetime(2024, 5, 1, 12, 30),
    "date": dt.date(2024, 2, 29),
    "time": dt.time(23, 59, 59, 999999),
    "time-with-tz": dt.time(8, 15, tzinfo=UTC_PLUS_2),
    "timedelta": dt.timedelta(days=3, seconds=7, microseconds=11),
    "timedelta-negative": dt.timedelta(days=-2, hours=5),
    "uuid": uuid.UUID("12345678-1234-5678-1234-567812345678"),
    "decimal": Decimal("12345678901234567890.000000001"),
    "decimal-negative-exponent": Decimal("-1.5E-30"),
    "bytes": b"\x00\xffbinary\n",
    "bytes-empty": b"",
    "set": {1, "two", 3.5},
    "frozenset": frozenset({"a", "b"}),
    "enum": Colour.BLUE,
    "dataclass-frozen": Money(Decimal("9.99"), "EUR"),
    "dataclass-nested": Line(
        "sku-1", Money(Decimal("1.10"), "USD"), frozenset({"gift"}), dt.date(2024, 1, 2),
        Colour.RED,
    ),
    "pydantic-nested": Order(
        customer=Customer(
            id=uuid.UUID(int=7), name="Ana",
            since=dt.datetime(2020, 1, 1, tzinfo=dt.UTC), tier=Tier.PAID,
        ),
        notes=["leave at door"],
    ),
    "containers": {"ids": [uuid.UUID(int=1)], "at": {"when": dt.date(2024, 1, 1)}},
}


@pytest.mark.parametrize("value", DOCUMENTED_VALUES.values(), ids=DOCUMENTED_VALUES.keys())
def test_documented_type_comes_back_as_itself(value: Any) -> None:
    _, back = roundtrip(value)

    assert back == value
    assert type(back) is type(value)


def test_datetime_keeps_its_utc_offset() -> None:
    _, back = roundtrip(dt.datetime(2024, 5, 1, 12, 30, tzinfo=UTC_PLUS_2))

    assert back.utcoffset() == dt.timedelta(hours=2)


def test_dataclass_field_outside_init_comes_back() -> None:
    line = Line("s", Money(Decimal(1), "EUR"), frozenset(), dt.date(2024, 1, 1), Colour.RED)
    line.total = 42

    _, back = roundtrip(line)

    assert back.total == 42


def test_tuples_come_back_as_lists() -> None:
    _, back = roundtrip({"pair": (1, ("a", 2.5)), "empty": ()})

    assert back == {"pair": [1, ["a", 2.5]], "empty": []}


def test_encode_writes_compact_json() -> None:
    assert encode({"name": "a b", "n": [1, 2]}) == '{"name":"a b","n":[1,2]}'


@pytest.mark.parametrize("member", [Priority.HIGH, Tier.PAID], ids=["IntEnum", "StrEnum"])
def test_int_and_str_enums_come_back_as_their_plain_equal_value(member: enum.Enum) -> None:
    _, back = roundtrip(member)

    assert back == member
    assert type(back) is type(member.value)


@pytest.mark.parametrize(
    "value",
    [{(1, 2), (3, ("a", 4))}, frozenset({("x", 1.5)})],
    ids=["set", "frozenset"],
)
def test_tuples_inside_sets_come_back_as_tuples(value: Any) -> None:
    _, back = roundtrip(value, what="result of step 'pairs'")

    assert back == value
    assert type(back) is type(value)


# -- encode failures ------------------------------------------------------------------


def test_unserializable_value_names_its_type_and_what() -> None:
    what = "result of step 'charge_card'"

    with pytest.raises(SerializationError) as e:
        encode({"receipt": [Unstorable()]}, what=what)

    assert str(e.value).startswith(f"{what}: a Unstorable cannot be stored in the journal.")
    assert (e.value.type_name, e.value.what) == ("Unstorable", what)  # type: ignore[attr-defined]
    assert isinstance(e.value.__cause__, TypeError)


def test_dataclass_class_itself_is_not_mistaken_for_an_instance() -> None:
    with pytest.raises(SerializationError, match="a type cannot be stored"):
        encode(Money)


def test_encoded_text_is_valid_utf8_even_for_lone_surrogates() -> None:
    name = "report-\udcff.pdf"

    text = encode({"file": name})

    text.encode("utf-8")
    assert decode(text) == {"file": name}


# -- decode failures ------------------------------------------------------------------


def tagged(tag: str, type_path: str, v: Any) -> str:
    return json.dumps({"$garrison": tag, "type": type_path, "v": v})


def test_decoding_class_of_a_module_not_imported_names_module_and_fix() -> None:
    text = tagged("dataclass", "billing_plugin_never_imported:Invoice", {"n": 1})

    with pytest.raises(SerializationError) as e:
        decode(text)

    assert "module 'billing_plugin_never_imported' is not imported" in str(e.value)
    assert "import it before starting the worker" in str(e.value)
    assert e.value.type_name == "billing_plugin_never_imported:Invoice"  # type: ignore[attr-defined]


def test_decoding_class_missing_from_an_imported_module_asks_if_renamed() -> None:
    text = tagged("dataclass", f"{__name__}:MoneyV2", {"amount": "1", "currency": "EUR"})

    with pytest.raises(SerializationError, match=r"no such class exists .* was it renamed"):
        decode(text)


def test_decoding_never_rebuilds_a_class_that_is_not_of_the_tagged_kind() -> None:
    # `Unstorable` is loaded but is no dataclass: it must not be instantiated.
    text = tagged("dataclass", f"{__name__}:Unstorable", {})

    with pytest.raises(SerializationError, match="tags a value as 'dataclass'"):
        decode(text)


def test_decoding_unknown_tag_without_type_is_a_serialization_error() -> None:
    with pytest.raises(SerializationError, match="value tagged 'pickle' that this Garrison"):
        decode('{"$garrison": "pickle", "v": 1}')


def test_object_without_v_is_plain_data_even_with_the_reserved_key() -> None:
    assert decode('{"$garrison": "uuid"}') == {"$garrison": "uuid"}


# -- errors as journal data ---------------------------------------------------------


def failing_charge() -> None:
    raise ValueError("card declined", 402)


def raised(fn: Any) -> BaseException:
    try:
        fn()
    except Exception as exc:
        return exc
    raise AssertionError(f"{fn.__name__} did not raise")


def through_journal(error: BaseException) -> BaseException:
    data = json.loads(encode(error_to_data(error)))
    return error_from_data(data)


def test_builtin_error_comes_back_as_same_type_with_original_traceback_note() -> None:
    back = through_journal(raised(failing_charge))

    assert type(back) is ValueError
    assert back.args == ("card declined", 402)
    note = "\n".join(back.__notes__)
    assert "rebuilt from the journal" in note
    assert "in failing_charge" in note and "ValueError: ('card declined', 402)" in note


def test_error_data_is_type_message_traceback_and_args() -> None:
    data = error_to_data(raised(failing_charge))

    assert data["type"] == "builtins:ValueError"
    assert data["message"] == "('card declined', 402)"
    assert data["args"] == ["card declined", 402]
    assert "Traceback (most recent call last)" in data["traceback"]


def test_error_with_another_constructor_signature_comes_back_with_its_args() -> None:
    back = through_journal(NeedsKeyword(code=7))

    assert type(back) is NeedsKeyword
    assert back.args == ("code 7",)


def test_error_of_a_type_not_loaded_comes_back_as_step_failed_with_its_fields() -> None:
    data = {
        "type": "payments_sdk.errors:CardDeclined",
        "message": "insufficient funds",
        "traceback": "Traceback (most recent call last):\n  ...\nCardDeclined: insufficient funds",
        "args": ["insufficient funds"],
    }

    back = error_from_data(data)

    assert isinstance(back, StepFailed)
    assert str(back) == "payments_sdk.errors:CardDeclined: insufficient funds"
    assert back.error_type == "payments_sdk.errors:CardDeclined"  # type: ignore[attr-defined]
    assert back.error_message == "insufficient funds"  # type: ignore[attr-defined]
    assert back.traceback == data["traceback"]  # type: ignore[attr-defined]


def test_error_with_unjsonable_args_comes_back_as_its_type_with_the_message() -> None:
    original = ValueError(Unstorable())
    back = through_journal(original)

    assert type(back) is ValueError
    assert back.args == (str(original),)


def test_garrison_error_keeps_its_id_fields_through_the_journal() -> None:
    back = through_journal(RunNotFoundError("no run 'r9'", run_id="r9"))

    assert type(back) is RunNotFoundError
    assert back.run_id == "r9"  # type: ignore[attr-defined]


# -- property: JSON-ish values round-trip ---------------------------------------------

_KEYS = st.text(max_size=8).filter(lambda k: k != "$garrison")
_JSON_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
)
_TYPED_LEAVES = (
    st.datetimes(
        timezones=st.none()
        | st.builds(dt.timezone, st.timedeltas(dt.timedelta(hours=-23), dt.timedelta(hours=23)))
    )
    | st.dates()
    | st.times()
    | st.timedeltas()
    | st.uuids()
    | st.decimals(allow_nan=False)
    | st.binary(max_size=20)
    | st.frozensets(st.integers() | st.text(max_size=5), max_size=4)
    | st.sets(st.tuples(st.integers(), st.text(max_size=5)), max_size=3)
    | st.sampled_from(Colour)
)


def _trees(leaves: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.recursive(
        leaves,
        lambda children: st.lists(children, max_size=4)
        | st.dictionaries(_KEYS, children, max_size=4),
        max_leaves=20,
    )


@given(_trees(_JSON_LEAVES))
def test_json_values_roundtrip_equal(value: Any) -> None:
    assert roundtrip(value)[1] == value


@given(_trees(_JSON_LEAVES | _TYPED_LEAVES))
def test_json_values_with_typed_leaves_roundtrip_equal(value: Any) -> None:
    assert roundtrip(value)[1] == value



def test_a_utc_offset_with_microseconds_survives_the_journal() -> None:
    import datetime as dt

    from garrison.engine._codec import decode, encode

    zone = dt.timezone(dt.timedelta(hours=-3, microseconds=1))
    for value in (dt.datetime(2000, 1, 1, tzinfo=zone), dt.time(1, 2, tzinfo=zone)):
        back = decode(encode(value))
        assert back == value and back.utcoffset() == value.utcoffset()


@pytest.mark.parametrize(("value", "says"), [
    ({(1, 2): "x"}, "a dict with a tuple key cannot be stored in the journal: keys must be"),
    (10 ** 5000, "an int too large to be stored in the journal (over 4300 digits)"),
    (functools.reduce(lambda inner, _: [inner], range(5000), []),
     "nested too deeply to be stored in the journal"),
], ids=["tuple-key", "huge-int", "deep"])
def test_a_value_json_refuses_is_named_with_its_fix(value: Any, says: str) -> None:
    with pytest.raises(SerializationError, match=re.escape(f"result of step 'x': {says}")):
        encode(value, what="result of step 'x'")


def test_a_circular_value_is_named_as_such() -> None:
    looped: dict[str, Any] = {}
    looped["self"] = looped
    with pytest.raises(SerializationError, match="contains itself"):
        encode(looped)
