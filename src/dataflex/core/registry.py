"""One registry for selectors, mixers and weighters, with the seed page's decorators.

`REGISTRY.build` passes component params (from the components config) plus runtime objects
(dataset, accelerator, mixture_manager, ...) by constructor signature. Unlike DataFlex it never
drops a key silently: a config key the constructor does not take is an error naming the accepted ones.

A name is registered once. A user component may take a built-in's name (DataFlex's own components register
`random`, `odm`, `loss`, ... and must run unchanged): it replaces the built-in, with a one-line notice. Two user
classes under one name are an error (which one a run would get is not knowable).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
import traceback
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from dataflex.core.errors import ConfigError
from dataflex.utils.logging import logger

KINDS = ("selector", "mixer", "weighter")
# Section names used by DataFlex's components.yaml for each kind.
SECTIONS = {"selector": "selectors", "mixer": "mixers", "weighter": "weighters"}


class Registry:
    def __init__(self) -> None:
        self._store: dict[str, dict[str, type]] = {kind: {} for kind in KINDS}

    def register(self, kind: str, name: str) -> Callable[[type], type]:
        self._check_kind(kind)

        def deco(cls: type) -> type:
            known = self._store[kind].get(name)
            # Re-importing the same module (reload, notebooks) re-registers the same class: allow that.
            if known is None or _qualname(known) == _qualname(cls):
                self._store[kind][name] = cls
            elif _builtin(known) and not _builtin(cls):
                logger.warning(
                    "%s '%s': user class %s replaces the built-in %s", kind, name, _qualname(cls), _qualname(known)
                )
                self._store[kind][name] = cls
            elif _builtin(cls) and not _builtin(known):
                pass  # a built-in imported after the user's class that overrides it: the user's stays
            else:
                raise ConfigError(
                    f"{kind} name '{name}' is already registered by {_qualname(known)}; "
                    f"pick another name for {_qualname(cls)}"
                )
            return cls

        return deco

    def names(self, kind: str) -> list[str]:
        self._check_kind(kind)
        _import_builtin(kind)
        return sorted(self._store[kind])

    def get(self, kind: str, name: str) -> type:
        self._check_kind(kind)
        _import_builtin(kind)
        try:
            return self._store[kind][name]
        except KeyError:
            from dataflex.core.schema import did_you_mean

            valid = ", ".join(sorted(self._store[kind])) or "(none registered)"
            hint = did_you_mean(name, self._store[kind])
            raise ConfigError(
                f"unknown {kind} '{name}'{hint}; registered {SECTIONS[kind]}: {valid} "
                f"(register your own with @register_{kind}('{name}') in a module listed in user_modules)"
            ) from None

    @staticmethod
    def _signature(cls: type) -> tuple[list[inspect.Parameter], bool, list[str]]:
        params = [
            p for p in list(inspect.signature(cls.__init__).parameters.values())[1:] if p.kind != p.VAR_POSITIONAL
        ]
        takes_var_kw = any(p.kind == p.VAR_KEYWORD for p in params)
        return params, takes_var_kw, [p.name for p in params if p.kind != p.VAR_KEYWORD]

    def check(self, kind: str, name: str, cfg: Mapping[str, Any] | None = None) -> None:
        """The errors `build` raises for `cfg` alone (unknown name or parameter), without building anything."""
        cls = self.get(kind, name)
        _, takes_var_kw, accepted = self._signature(cls)
        unknown = sorted(set(cfg or {}) - set(accepted))
        if unknown and not takes_var_kw:
            raise ConfigError(
                f"{kind} '{name}' does not accept parameter(s) {', '.join(unknown)}; "
                f"accepted: {', '.join(accepted) or '(none)'}"
            )
        self._check_types(kind, name, cls, cfg or {})
        check_params = getattr(cls, "check_params", None)  # components ported from DataFlex have none
        if callable(check_params):
            params, _, _ = self._signature(cls)
            check_params({**{p.name: p.default for p in params if p.default is not p.empty}, **(cfg or {})})

    @staticmethod
    def _check_types(kind: str, name: str, cls: type, cfg: Mapping[str, Any]) -> None:
        """Each parameter against its constructor annotation (`delta: float` refuses "abc" and NaN), before any
        work; parameters without an annotation, or with one that cannot be resolved, are the component's to check."""
        from dataflex.core.schema import annotation_problem

        try:
            hints = typing.get_type_hints(cls.__init__)
        except Exception:  # forward references the component's module cannot resolve: nothing to check here
            return
        for key, value in cfg.items():
            if key in hints:
                problem = annotation_problem(value, hints[key])
                if problem == "finite":
                    raise ConfigError(f"{kind} '{name}': parameter {key} must be a finite number, got {value!r}")
                if problem:
                    raise ConfigError(f"{kind} '{name}': parameter {key} must be {problem}, got {value!r}")

    def build(
        self, kind: str, name: str, runtime: Mapping[str, Any] | None = None, cfg: Mapping[str, Any] | None = None
    ) -> Any:
        """Instantiate `name` with `cfg` (user params, all must be accepted) and the `runtime` objects it asks for."""
        self.check(kind, name, cfg)
        cls = self.get(kind, name)
        runtime = dict(runtime or {})
        cfg = dict(cfg or {})
        params, takes_var_kw, accepted = self._signature(cls)
        # User params first, then runtime objects it names (runtime wins: a dataset is not a user setting).
        kwargs = dict(cfg)
        for key, value in runtime.items():
            if takes_var_kw or key in accepted:
                kwargs[key] = value
        missing = [p.name for p in params if p.kind != p.VAR_KEYWORD and p.default is p.empty and p.name not in kwargs]
        if missing:
            raise ConfigError(
                f"{kind} '{name}' needs parameter(s) {', '.join(missing)}; set them under "
                f"{SECTIONS[kind]}.{name}.params in the components config"
            )
        return cls(**kwargs)

    @staticmethod
    def _check_kind(kind: str) -> None:
        if kind not in KINDS:
            raise ConfigError(f"unknown component kind '{kind}'; valid: {', '.join(KINDS)}")


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _builtin(cls: type) -> bool:
    """A component of this package (user modules loaded from a path are `dataflex_user_<stem>`)."""
    return cls.__module__.split(".")[0] == "dataflex"


REGISTRY = Registry()


def register_selector(name: str) -> Callable[[type], type]:
    return REGISTRY.register("selector", name)


def register_mixer(name: str) -> Callable[[type], type]:
    return REGISTRY.register("mixer", name)


def register_weighter(name: str) -> Callable[[type], type]:
    return REGISTRY.register("weighter", name)


def _import_builtin(kind: str) -> None:
    # The package __init__ of each kind imports its built-in components (seed page, step two).
    importlib.import_module(f"dataflex.train.{kind}")


def import_user_modules(modules: Iterable[str] | str | None) -> list[str]:
    """Import user component modules: dotted names, or paths to .py files. Returns the module names."""
    if not modules:
        return []
    if isinstance(modules, str):
        modules = [m.strip() for m in modules.split(",") if m.strip()]
    imported = []
    for spec in modules:
        path = Path(spec)
        if spec.endswith(".py"):
            if not path.is_file():
                raise ConfigError(f"user module file '{spec}' does not exist; fix user_modules")
            mod_name = f"dataflex_user_{path.stem}"
            loader_spec = importlib.util.spec_from_file_location(mod_name, path)
            module = importlib.util.module_from_spec(loader_spec)
            package = _dataflex_package_for(path)
            if package:  # a file copied out of DataFlex's package: its `from .base_mixer import Mixer` resolves here
                module.__package__ = package
            sys.modules[mod_name] = module
            try:
                loader_spec.loader.exec_module(module)
            except Exception as exc:  # the user's code: any error is theirs to fix, said in one line
                sys.modules.pop(mod_name, None)
                raise ConfigError(f"user module {spec} failed to import: {_one_line(exc)}") from None
            imported.append(mod_name)
        else:
            try:
                importlib.import_module(spec)
            except ModuleNotFoundError as exc:
                if exc.name and spec.startswith(exc.name):
                    raise ConfigError(
                        f"cannot import user module '{spec}': {exc}; fix user_modules or PYTHONPATH"
                    ) from None
                raise ConfigError(f"user module {spec} failed to import: {_one_line(exc)}") from None
            except Exception as exc:
                raise ConfigError(f"user module {spec} failed to import: {_one_line(exc)}") from None
            imported.append(spec)
    return imported


# Where DataFlex's component files live, in DataFlex's package and in ours (same layout, same module names).
_COMPONENT_PACKAGES = ("dataflex.train.mixer", "dataflex.train.selector", "dataflex.train.weighter")


def _dataflex_package_for(path: Path) -> str | None:
    """The package whose sibling modules a file's relative imports (`from .base_mixer import ...`) name, when the
    file is one of DataFlex's component files copied out of its package; None for a file without them."""
    import ast

    try:
        tree = ast.parse(path.read_bytes())
    except (SyntaxError, ValueError):  # the import itself reports it, in one line
        return None
    relative = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 1 and n.module}
    if not relative:
        return None
    for package in _COMPONENT_PACKAGES:
        if all(importlib.util.find_spec(f"{package}.{name}") is not None for name in relative):
            return package
    return None


def _one_line(exc: BaseException) -> str:
    """`Type: message` on one line, with where in the user's file it happened when Python says."""
    where = ""
    if isinstance(exc, SyntaxError) and exc.lineno:
        where = f" (line {exc.lineno})"
    else:
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/dataflex/" not in f.filename]
        if frames:
            where = f" ({Path(frames[-1].filename).name}:{frames[-1].lineno})"
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}{where}"
