"""Typed settings over stdlib frozen dataclasses: one home per configuration key.

Each parameter group is a frozen dataclass whose fields are declared with `setting(default, doc, ...)`: the
default, a one-line doc, the allowed range or choices, the flat DataFlex / LLaMA-Factory name(s) and an optional
extra check live on the field, and everything else (the `DEFAULTS` dicts, the flat-key table, the generated
docs/config.md and docs/parameters.sample.yml) is derived from it.

Why not pydantic: its error reports are multi-line and its coercions (`"1"` -> 1, `1.0` -> 1) would change what
is accepted, while every user mistake here must stay one `ConfigError` line (`train.learning_rate must be > 0,
got nan`), nothing is silently converted, and the project gains no dependency. The machinery needed is small:
a type check from the annotation, finiteness, ge/gt/le/lt, choices and one optional callable.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import math
import numbers
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ClassVar, TypeVar, Union

from dataflex.core.errors import ConfigError

__all__ = [
    "FieldInfo",
    "Schema",
    "Setting",
    "check_value",
    "describe",
    "did_you_mean",
    "flat_names",
    "setting",
    "type_name",
]

_META_KEY = "dataflex_setting"

# `check` returns None when the value is fine, else what the value must be ("a positive integer (or -1 ...)").
Check = Callable[[Any], "str | None"]


@dataclasses.dataclass(frozen=True)
class Setting:
    """The metadata `setting()` attaches to a dataclass field."""

    doc: str
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple[Any, ...] | None = None
    flat: str | None = None
    aliases: tuple[str, ...] = ()
    check: Check | None = None
    # Format string of the error line, for keys whose historical message differs from the generic one
    # ({name}: group.key, {key}, {value!r}, {allowed}).
    message: str | None = None


def setting(
    default: Any,
    doc: str,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: Sequence[Any] | None = None,
    flat: str | None = None,
    aliases: Sequence[str] = (),
    check: Check | None = None,
    message: str | None = None,
) -> Any:
    """A dataclass field carrying its default, one-line doc and constraints (see the module docstring).

    `flat` overrides the group's flat DataFlex name for this key, `aliases` adds more flat names; `check` is called
    after the type and range checks and returns None or what the value must be (the docs show its docstring)."""
    meta = Setting(
        doc=doc,
        ge=ge,
        gt=gt,
        le=le,
        lt=lt,
        choices=tuple(choices) if choices is not None else None,
        flat=flat,
        aliases=tuple(aliases),
        check=check,
        message=message,
    )
    metadata = {_META_KEY: meta}
    if isinstance(default, list | dict):
        # A mutable default gets a fresh copy per instance (dataclasses refuse a shared one).
        return dataclasses.field(default_factory=functools.partial(copy.deepcopy, default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


S = TypeVar("S", bound="Schema")


class Schema:
    """Mixin for a frozen dataclass of `setting()` fields: checked on construction, `from_dict`, `to_dict`.

    `group` names the parameter group (`train`, `less`, ...) in error lines; `flat_prefix` is how a key is spelled
    in a flat DataFlex YAML (`""`: the key itself, `"less_"`: `less_<key>`, None: only explicit `flat=` names)."""

    group: ClassVar[str] = ""
    flat_prefix: ClassVar[str | None] = None

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            check_value(type(self), f.name, getattr(self, f.name), self.group)
        self.validate()

    def validate(self) -> None:
        """Checks across this group's own fields; groups override it (the run-wide ones are in dataflex.config)."""

    @classmethod
    def from_dict(cls: type[S], mapping: Mapping[str, Any] | None, group_name: str | None = None) -> S:
        """The group from a (partial) mapping: missing keys take their defaults, unknown keys are refused."""
        group = group_name or cls.group
        if mapping is None:
            mapping = {}
        if not isinstance(mapping, Mapping):
            raise ConfigError(
                f"parameters' '{group}' section must be a mapping of keys to values, got {type(mapping).__name__}"
            )
        names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
        unknown = sorted(set(mapping) - set(names))
        if unknown:
            listed = ", ".join(f"{group}.{k}{did_you_mean(k, names, prefix=group + '.')}" for k in unknown)
            raise ConfigError(f"unknown parameter(s) {listed}; valid: {', '.join(sorted(names))}")
        # Checked here under the caller's group name; construction re-checks (cheap) and runs validate().
        for name, value in mapping.items():
            check_value(cls, name, value, group)
        return cls(**mapping)

    def to_dict(self) -> dict[str, Any]:
        """Plain values (deep copies), key by key: the grouped Kedro parameters of this group."""
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]


@dataclasses.dataclass(frozen=True)
class FieldInfo:
    """One key of a group, for docs generation."""

    group: str
    name: str
    type: str
    default: Any
    doc: str
    allowed: str
    flat: tuple[str, ...]


def describe(cls: type[Schema], group: str | None = None) -> list[FieldInfo]:
    """Every key of a group with its doc, default, type, constraints and flat names, in declaration order."""
    out = []
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        meta = _setting(cls, f.name)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        out.append(
            FieldInfo(
                group=group or cls.group,
                name=f.name,
                type=type_name(_hints(cls)[f.name]),
                default=default,
                doc=meta.doc,
                allowed=_allowed_text(meta),
                flat=flat_names(cls, f.name),
            )
        )
    return out


def flat_names(cls: type[Schema], name: str) -> tuple[str, ...]:
    """The flat DataFlex / LLaMA-Factory key(s) of a grouped key: its flat name first, then its aliases."""
    meta = _setting(cls, name)
    primary = meta.flat or (cls.flat_prefix + name if cls.flat_prefix is not None else None)
    return (primary, *meta.aliases) if primary else meta.aliases


def did_you_mean(key: str, candidates: Sequence[str] | Iterator[str], prefix: str = "") -> str:
    """` (did you mean x?)` for the closest candidate, or "" when none is close."""
    close = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.75)
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


# ---------------------------------------------------------------------------------------------- checking


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    # The modules use `from __future__ import annotations`: resolve the strings once per class.
    return typing.get_type_hints(cls)


@functools.cache
def _settings(cls: type) -> dict[str, Setting]:
    out = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if _META_KEY not in f.metadata:  # a plain dataclass field: a programming error, not a user one
            raise TypeError(f"{cls.__name__}.{f.name} is not declared with setting()")
        out[f.name] = f.metadata[_META_KEY]
    return out


def _setting(cls: type, name: str) -> Setting:
    return _settings(cls)[name]


def check_value(cls: type, name: str, value: Any, group: str) -> None:
    """Type (from the annotation), finiteness, range, choices, then the field's `check`: one ConfigError line."""
    meta = _setting(cls, name)
    tp = _hints(cls)[name]
    qualified = f"{group}.{name}" if group else name

    def fail(expect: str) -> ConfigError:
        if meta.message:
            allowed = ", ".join(map(str, meta.choices or ()))
            return ConfigError(meta.message.format(name=qualified, key=name, value=value, allowed=allowed))
        return ConfigError(f"{qualified} must be {expect}, got {value!r}")

    if not _conforms(value, tp):
        raise fail(_expectation(tp, meta, with_type=True))
    if not _finite(value):
        # NaN / inf are refused by name (`must be a finite number > 0, got nan`): a comparison would let inf pass.
        rng = _range_text(meta)
        what = "hold only finite numbers" if isinstance(value, list | tuple | dict) else "be a finite number"
        raise ConfigError(f"{qualified} must {what}{' ' + rng if rng else ''}, got {value!r}")
    if _is_number(value) and not _in_range(value, meta):
        raise fail(_expectation(tp, meta, with_type=False))
    if meta.choices is not None and value is not None and value not in meta.choices:
        if meta.message:
            raise fail("")
        raise ConfigError(f"{qualified} {value!r} is not valid; use one of {', '.join(map(str, meta.choices))}")
    if meta.check is not None and value is not None:
        problem = meta.check(value)
        if problem:
            raise fail(problem)


def _is_int(value: Any) -> bool:
    # numbers.Integral admits numpy integers (a computed value); bool is one too, and never an int here.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _finite(value: Any) -> bool:
    if _is_number(value) and not _is_int(value):
        return math.isfinite(value)
    if isinstance(value, list | tuple):
        return all(_finite(v) for v in value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    return True


def _in_range(value: float, meta: Setting) -> bool:
    return not (
        (meta.ge is not None and value < meta.ge)
        or (meta.gt is not None and value <= meta.gt)
        or (meta.le is not None and value > meta.le)
        or (meta.lt is not None and value >= meta.lt)
    )


def _args(tp: Any) -> tuple[Any, ...]:
    return typing.get_args(tp) if typing.get_origin(tp) in (Union, types.UnionType) else (tp,)


def _base(tp: Any) -> Any:
    """The annotation without `| None`, when one type remains (for wording)."""
    rest = [a for a in _args(tp) if a is not type(None)]
    return rest[0] if len(rest) == 1 else None


def _conforms(value: Any, tp: Any) -> bool:
    if tp is Any:
        return True
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return any(_conforms(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:  # YAML `true` is a bool, and bool is an int subclass: never an int here
        return _is_int(value)
    if tp is float:  # an int is a valid float (kept as given: val_size treats 3 and 3.0 differently)
        return _is_number(value)
    if tp is str:
        return isinstance(value, str)
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        return isinstance(value, list | tuple) and all(_conforms(v, item) for v in value)
    if origin is dict:
        key_tp, value_tp = typing.get_args(tp) or (Any, Any)
        return isinstance(value, dict) and all(
            _conforms(k, key_tp) and _conforms(v, value_tp) for k, v in value.items()
        )
    return isinstance(value, tp)


# ---------------------------------------------------------------------------------------------- wording

_SINGULAR = {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "null"}
_PLURAL = {int: "integers", float: "numbers", str: "strings", bool: "booleans", type(None): "nulls"}


def _phrase(tp: Any, plural: bool = False) -> str:
    if tp is Any:
        return "values" if plural else "any value"
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        parts = [a for a in typing.get_args(tp) if a is not type(None)]
        text = " or ".join(_phrase(a, plural) for a in parts)
        return text + (" or null" if type(None) in typing.get_args(tp) else "")
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        return ("lists of " if plural else "a list of ") + _phrase(item, plural=True)
    if origin is dict:
        return "mappings" if plural else "a mapping"
    table = _PLURAL if plural else _SINGULAR
    return table.get(tp, getattr(tp, "__name__", str(tp)))


def _range_text(meta: Setting) -> str:
    low = ("[", meta.ge) if meta.ge is not None else ("(", meta.gt) if meta.gt is not None else None
    high = ("]", meta.le) if meta.le is not None else (")", meta.lt) if meta.lt is not None else None
    if low and high:
        return f"in {low[0]}{_num(low[1])}, {_num(high[1])}{high[0]}"
    if low:
        return f"{'>=' if low[0] == '[' else '>'} {_num(low[1])}"
    if high:
        return f"{'<=' if high[0] == ']' else '<'} {_num(high[1])}"
    return ""


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _expectation(tp: Any, meta: Setting, *, with_type: bool) -> str:
    """What a valid value is, in words: `a positive integer`, `> 0`, `a number in [0, 1)`, `a string or null`."""
    base = _base(tp)
    optional = type(None) in _args(tp)
    rng = _range_text(meta)
    if base is int and rng == ">= 1":
        text = "a positive integer"
    elif base is int and rng:
        text = f"an integer {rng}"
    elif rng and not with_type:
        text = rng  # a number out of range: `learning_rate must be > 0, got -1`
    elif rng:
        text = f"{_phrase(base) if base is not None else _phrase(tp)} {rng}"
    else:
        return _phrase(tp)
    return text + (" or null" if optional else "")


def _allowed_text(meta: Setting) -> str:
    parts = []
    if meta.choices is not None:
        parts.append(", ".join(f"`{c}`" for c in meta.choices))
    rng = _range_text(meta)
    if rng:
        parts.append(rng)
    if meta.check is not None and meta.check.__doc__:
        parts.append(meta.check.__doc__.strip().splitlines()[0])
    return "; ".join(parts)


def type_name(tp: Any) -> str:
    """The annotation as users read it: `int`, `float | null`, `str | list[str]`."""
    if tp is Any:
        return "any"
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        names = [type_name(a) for a in args if a is not type(None)]
        return " | ".join(names + (["null"] if type(None) in args else []))
    if origin is list:
        return f"list[{', '.join(type_name(a) for a in typing.get_args(tp))}]"
    if origin is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def annotation_problem(value: Any, tp: Any) -> str | None:
    """What `value` should be to fit the annotation `tp` (e.g. "a number"), or None when it fits: the same type and
    finiteness rules as config fields, for checking a component's parameters against its constructor."""
    try:
        fits = _conforms(value, tp)
    except TypeError:  # an annotation these rules do not cover (Sequence[float], a numpy type): the component checks
        return None
    if not fits:
        return _phrase(tp)
    if not _finite(value):
        return "finite"
    return None
