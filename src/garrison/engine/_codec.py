"""The journal's value codec: JSON with a few typed tags, never pickle.

JSON types pass through as they are (tuples come back as lists). These come back as
themselves: `datetime`, `date`, `time`, `timedelta`, `UUID`, `Decimal`, `bytes`, `set`,
`frozenset` (tuples inside them come back as tuples), `Enum` members, dataclasses and
pydantic models. `IntEnum`/`StrEnum` members are ints/strs to JSON and come back as
their plain value (equal to the member). A tagged value is an object
`{"$garrison": TAG, "v": ..., "type": "module:QualName"}`; the key `$garrison` is reserved.

Reading a journal never runs code it names: a class is looked up among the modules this
process has already imported (`sys.modules`), and only dataclasses, pydantic models and
enums are rebuilt. A class that is not loaded is a clear `SerializationError`.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime as dt
import enum
import json
import sys
import traceback
import uuid
from decimal import Decimal
from typing import Any

from garrison.errors import GarrisonError, SerializationError

__all__ = ["decode", "encode", "error_from_data", "error_to_data", "roundtrip"]

_TAG = "$garrison"


def _type_path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _is_pydantic_model(value: object) -> bool:
    pydantic = sys.modules.get("pydantic")
    return pydantic is not None and isinstance(value, pydantic.BaseModel)


def _default(value: Any) -> Any:
    # Order matters: datetime is a subclass of date; IntEnum of int (handled by json first).
    if isinstance(value, dt.datetime):
        return _with_offset({_TAG: "datetime", "v": value.isoformat()}, value.utcoffset())
    if isinstance(value, dt.date):
        return {_TAG: "date", "v": value.isoformat()}
    if isinstance(value, dt.time):
        return _with_offset({_TAG: "time", "v": value.isoformat()}, value.utcoffset())
    if isinstance(value, dt.timedelta):
        return {_TAG: "timedelta", "v": [value.days, value.seconds, value.microseconds]}
    if isinstance(value, uuid.UUID):
        return {_TAG: "uuid", "v": str(value)}
    if isinstance(value, Decimal):
        return {_TAG: "decimal", "v": str(value)}
    if isinstance(value, bytes | bytearray):
        return {_TAG: "bytes", "v": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, set | frozenset):
        return {_TAG: type(value).__name__, "v": list(value)}
    if isinstance(value, enum.Enum):
        return {_TAG: "enum", "type": _type_path(type(value)), "v": value.value}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        return {_TAG: "dataclass", "type": _type_path(type(value)), "v": fields}
    if _is_pydantic_model(value):
        body = value.model_dump(mode="json")
        return {_TAG: "pydantic", "type": _type_path(type(value)), "v": body}
    raise TypeError(type(value))


def encode(value: Any, *, what: str = "value") -> str:
    """Encode `value` as journal JSON.

    Raises:
        SerializationError: naming the offending type and `what` (for example
            "result of step 'charge'").
    """
    try:
        text = json.dumps(value, default=_default, separators=(",", ":"), ensure_ascii=False)
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:  # lone surrogates (os.fsdecode of a bad file name)
                text = json.dumps(value, default=_default, separators=(",", ":"))
        return text
    except (TypeError, ValueError, RecursionError) as exc:
        bad = exc.args[0] if exc.args and isinstance(exc.args[0], type) else type(value)
        name = getattr(bad, "__qualname__", str(bad))
        raise SerializationError(f"{what}: {_why(exc, name)}", type_name=name,
                                 what=what) from exc


def _why(exc: BaseException, name: str) -> str:
    """What is wrong with a value json.dumps refused, and the fix."""
    said = str(exc)
    if isinstance(exc, RecursionError):
        return ("nested too deeply to be stored in the journal (about a thousand levels "
                "of lists or dicts); flatten it, or store it as text")
    if said.startswith("keys must be"):
        key = said.rsplit(" ", 1)[-1]
        return (f"a dict with a {key} key cannot be stored in the journal: keys must be "
                "str, int, float, bool or None; convert the keys (e.g. to strings) first")
    if "Circular reference" in said:
        return ("the value contains itself (a circular reference) and cannot be stored in "
                "the journal; break the cycle first")
    if "integer string conversion" in said:
        return ("an int too large to be stored in the journal (over 4300 digits); store it "
                "as text (str) instead")
    return (f"a {name} cannot be stored in the journal. Use JSON types, a dataclass, a "
            "pydantic model, datetime/UUID/Decimal/bytes, or convert it first.")


def _lookup_class(path: str) -> type:
    module_name, _, qualname = path.partition(":")
    obj: Any = sys.modules.get(module_name)
    if obj is None:
        raise SerializationError(
            f"the journal holds a {path} but module {module_name!r} is not imported in this "
            "process; import it before starting the worker.",
            type_name=path,
            what="journal value",
        )
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    if not isinstance(obj, type):
        raise SerializationError(
            f"the journal holds a {path} but no such class exists in {module_name!r}; "
            "was it renamed? Keep the old name importable or start a new run.",
            type_name=path,
            what="journal value",
        )
    return obj


def _with_offset(body: dict[str, Any], offset: dt.timedelta | None) -> dict[str, Any]:
    """A UTC offset with sub-second parts does not survive `fromisoformat` (CPython
    reads it as UTC): such an offset is kept beside the text, in microseconds."""
    if offset is not None and offset.microseconds:
        body["offset_us"] = offset // dt.timedelta(microseconds=1)
    return body


def _offset(value: Any, body: dict[str, Any]) -> Any:
    if "offset_us" in body:
        zone = dt.timezone(dt.timedelta(microseconds=body["offset_us"]))
        return value.replace(tzinfo=zone)
    return value


def _rebuild(tag: str, body: dict[str, Any]) -> Any:
    v = body["v"]
    if tag == "datetime":
        return _offset(dt.datetime.fromisoformat(v), body)
    if tag == "date":
        return dt.date.fromisoformat(v)
    if tag == "time":
        return _offset(dt.time.fromisoformat(v), body)
    if tag == "timedelta":
        return dt.timedelta(days=v[0], seconds=v[1], microseconds=v[2])
    if tag == "uuid":
        return uuid.UUID(v)
    if tag == "decimal":
        return Decimal(v)
    if tag == "bytes":
        return base64.b64decode(v)
    if tag == "set":
        return {_hashable(item) for item in v}
    if tag == "frozenset":
        return frozenset(_hashable(item) for item in v)
    if tag not in _CLASS_TAGS or not isinstance(body.get("type"), str):
        raise SerializationError(
            f"the journal holds a value tagged {tag!r} that this Garrison cannot read; "
            "was it written by a newer version, or edited by hand?",
            type_name=str(tag),
            what="journal value",
        )
    cls = _lookup_class(body["type"])
    if tag == "enum" and issubclass(cls, enum.Enum):
        return cls(v)
    if tag == "dataclass" and dataclasses.is_dataclass(cls):
        init = {f.name for f in dataclasses.fields(cls) if f.init}
        obj = cls(**{k: val for k, val in v.items() if k in init})
        for key, val in v.items():
            if key not in init:
                object.__setattr__(obj, key, val)
        return obj
    if tag == "pydantic" and hasattr(cls, "model_validate"):
        return cls.model_validate(v)
    raise SerializationError(
        f"the journal tags a value as {tag!r} but {body['type']} is not one",
        type_name=body["type"],
        what="journal value",
    )


_CLASS_TAGS = frozenset({"enum", "dataclass", "pydantic"})


def _hashable(item: Any) -> Any:
    """Set members were tuples before JSON made them lists: make them tuples again."""
    if isinstance(item, list):
        return tuple(_hashable(x) for x in item)
    return item


def _object_hook(obj: dict[str, Any]) -> Any:
    tag = obj.get(_TAG)
    if tag is None or not isinstance(tag, str) or "v" not in obj:
        return obj
    return _rebuild(tag, obj)


def decode(text: str) -> Any:
    """Decode journal JSON written by `encode`."""
    return json.loads(text, object_hook=_object_hook)


_SCALARS = (str, int, float, bool, type(None))


def roundtrip(value: Any, *, what: str = "value") -> tuple[str, Any]:
    """Encode `value` and decode it again, so a first run sees exactly what a replay will."""
    text = encode(value, what=what)
    if type(value) in _SCALARS:  # exact types only: an IntEnum must come back as an int
        return text, value
    return text, decode(text)


def error_to_data(error: BaseException) -> dict[str, Any]:
    """An exception as journal data: type, message, traceback text and JSON-able args."""
    cls = type(error)
    args: list[Any] | None
    try:  # plain JSON: a UUID, a datetime, bytes (UnicodeDecodeError) as tagged values
        args = json.loads(json.dumps(list(error.args), default=_default))
    except (TypeError, ValueError, RecursionError):
        args = None
    data: dict[str, Any] = {
        "type": _type_path(cls),
        "message": error_text(error),
        "traceback": "".join(traceback.format_exception(error)),
        "args": args,
    }
    if isinstance(error, OSError) and isinstance(error.filename, str) and (
            args is not None and len(args) == 2):  # (errno, strerror): the file is not in
        filename2 = error.filename2 if isinstance(error.filename2, str) else None
        data["args"] = [*args, error.filename, None, filename2]  # OSError's own order
    attrs: dict[str, Any] = {}
    for key, value in getattr(error, "__dict__", {}).items():
        if key.startswith("__"):
            continue
        try:
            json.dumps(value, default=_default)
        except (TypeError, ValueError, RecursionError):
            continue  # an attribute that cannot be journaled stays out
        attrs[key] = value
    if attrs:
        data["attrs"] = encode(attrs)
    return data


def error_text(error: BaseException) -> str:
    """`str(error)`, or what can be said when its `__str__` raises (it reads an
    attribute the error does not have, as one rebuilt from the journal may not)."""
    try:
        return str(error)
    except Exception as exc:
        return f"<{type(error).__qualname__}: str() raised {type(exc).__qualname__}: {exc}>"


def _replay_note(data: dict[str, Any]) -> str:
    return f"(rebuilt from the journal; original traceback:)\n{data.get('traceback')}"


def _rebuilt(cls: type[Exception], data: dict[str, Any]) -> BaseException | None:
    """`cls` rebuilt from `data`, or None where it cannot be: its `__new__` wants
    arguments (pydantic's `ValidationError`), or the rebuilt error cannot even be shown
    (its `__str__` reads an attribute that was not journaled)."""
    try:
        args = data.get("args")
        values = (tuple(decode(json.dumps(args))) if args is not None
                  else (str(data.get("message", "")),))
        error: BaseException
        if cls.__module__ == "builtins":
            # Python's own errors: their __init__ has no side effects and sets what their
            # str() and fields read (OSError's errno and filename, UnicodeDecodeError's
            # encoding and reason), which args alone do not.
            try:
                error = cls(*values)
            except Exception:
                error = cls.__new__(cls)
                error.args = values
        else:
            error = cls.__new__(cls)
            error.args = values
    except Exception:
        return None
    attrs = data.get("attrs")
    if attrs:
        # No __dict__ (slots), or an attribute's class is gone: the args remain.
        with contextlib.suppress(AttributeError, SerializationError):
            error.__dict__.update(decode(attrs))
    elif issubclass(cls, GarrisonError):
        GarrisonError.__init__(error, str(data.get("message", "")))  # type: ignore[arg-type]
    try:
        str(error)
    except Exception:
        return None
    error.add_note(_replay_note(data))
    return error


def error_from_data(data: dict[str, Any]) -> BaseException:
    """Rebuild a journaled error as the same exception type when that type is loaded here,
    with the same args and JSON-able attributes (its `__init__` is not called).

    Falls back to `StepFailed` carrying type, message and traceback text (also for a
    type that cannot be rebuilt: its `__new__` wants arguments, or it cannot be shown
    without an attribute that was not journaled). Only classes
    already imported by this process are considered; no module is imported.
    """
    from garrison.errors import StepFailed

    path = str(data.get("type", "builtins:Exception"))
    module_name, _, qualname = path.partition(":")
    obj: Any = sys.modules.get(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part, None) if obj is not None else None
    if isinstance(obj, type) and issubclass(obj, Exception):
        error = _rebuilt(obj, data)
        if error is not None:
            return error
    return StepFailed(
        f"{path}: {data.get('message')}",
        error_type=path,
        error_message=data.get("message"),
        traceback=data.get("traceback"),
    )
