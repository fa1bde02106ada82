"""The one YAML loader of every lmforge config root: training (``lmforge.config.Config``), ``data prepare``
(``PrepareConfig``) and ``finetune`` (``FinetuneConfig``).

``load_root(schema, path, overrides)``: read the YAML file → merge ``--section.key=value`` overrides over it →
validate with the root's pydantic schema. Every problem is a ``ConfigError`` whose lines read

    WHERE: unknown key 'optimizer.weight_decai'; did you mean 'optimizer.weight_decay'?
    WHERE: invalid value for 'sources.0.weight': -1 (Input should be greater than 0)
    WHERE: missing required key 'output.dir'
    WHERE: clean.min_chars=9 exceeds clean.max_chars=4            (a cross-field check)

WHERE is ``file:line:column`` of the key (unknown keys) or of its value (bad values), taken from the marks of
``yaml.compose``'s nodes; ``command line`` for a key an override set; for a missing key, the line of the
nearest section that is there; for a cross-field check, the place of the one key it names that can be found.
Otherwise the file name alone (nothing when there is no file). Key paths join list indices with dots
(``sources.0.field``), as pydantic reports them.
"""

from __future__ import annotations

import difflib
import functools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from lmforge.errors import ConfigError

COMMAND_LINE = "command line"
KeyPath = tuple[str, ...]
M = TypeVar("M", bound=BaseModel)
# a dotted key path inside a message: model.d_model, optimizer.betas[1] (leading letter: not 1e-3)
_NAMED_KEY = re.compile(r"(?<![\w.])([A-Za-z_]\w*(?:\.[A-Za-z_]\w*|\.\d+|\[\d+\])+)")
_LEADING_KEY = re.compile(r"^([A-Za-z_]\w*):")  # "sources: at least one source is required"


# ---------------------------------------------------------------------------------------------
# Where each key came from
# ---------------------------------------------------------------------------------------------


@dataclass
class Origins:
    """Where each key path of a merged config tree came from.

    ``marks[path] = (key mark, value mark)`` of the YAML file; ``overridden`` = the leaf paths the command
    line set (an override replaces everything under its path). ``fallback`` is printed when neither knows."""

    file: str = ""
    marks: dict[KeyPath, tuple[yaml.Mark, yaml.Mark]] = field(default_factory=dict)
    overridden: list[KeyPath] = field(default_factory=list)
    fallback: str = ""

    def _at(self, mark: yaml.Mark) -> str:
        return f"{self.file}:{mark.line + 1}:{mark.column + 1}"

    def exact(self, path: KeyPath, *, at_key: bool = False) -> Optional[str]:
        """Place of exactly this key (or a value an override replaced), or None."""
        if any(path[: len(o)] == o for o in self.overridden):
            return COMMAND_LINE
        if path in self.marks:
            return self._at(self.marks[path][0 if at_key else 1])
        return None

    def where(self, loc: tuple, *, at_key: bool = False) -> str:
        path = tuple(str(p) for p in loc)
        found = self.exact(path, at_key=at_key)
        if found:
            return found
        if path and any(o[: len(path)] == path for o in self.overridden):  # a section the command line made
            return COMMAND_LINE
        for n in range(len(path) - 1, 0, -1):  # the nearest enclosing section
            if path[:n] in self.marks:
                return self._at(self.marks[path[:n]][0])
            if any(o[:n] == path[:n] for o in self.overridden):
                return COMMAND_LINE
        return self.fallback

    def named_in(self, message: str, root: type[BaseModel]) -> str:
        """Place of the one key of ``root`` a message names that can be found; else ``fallback``."""
        valid = set(valid_keys(root))
        places = set()
        named = _NAMED_KEY.findall(message) + _LEADING_KEY.findall(message)
        for raw in named:
            parts = tuple(re.sub(r"\[(\d+)\]", r".\1", raw).split("."))
            if ".".join(p for p in parts if not p.isdigit()) in valid:
                place = self.exact(parts)
                if place:
                    places.add(place)
        return places.pop() if len(places) == 1 else self.fallback


def _node_marks(node: yaml.Node, prefix: KeyPath, out: dict, depth: int = 0) -> None:
    """Key path → (key mark, value mark) for every mapping key and list item under ``node``."""
    if depth > 64:  # a recursive alias
        return
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            path = prefix + (str(key_node.value),)
            out[path] = (key_node.start_mark, value_node.start_mark)
            _node_marks(value_node, path, out, depth + 1)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            path = prefix + (str(i),)
            out[path] = (item.start_mark, item.start_mark)
            _node_marks(item, path, out, depth + 1)


def read_yaml(path: str | Path) -> tuple[dict, dict[KeyPath, tuple[yaml.Mark, yaml.Mark]]]:
    """A YAML config file → (its mapping, the marks of its keys). Empty file → ({}, {})."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a config file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start} is {e.object[e.start:e.start + 1]!r})") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or getattr(e, "context", None) or e
        raise ConfigError(f"{path}{where}: not valid YAML ({problem})") from None
    finally:
        loader.dispose()
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        m = node.start_mark
        raise ConfigError(f"{path}:{m.line + 1}:{m.column + 1}: top level must be a mapping of sections "
                          f"(section: / key: value lines), got a {type(data).__name__}")
    marks: dict = {}
    _node_marks(node, (), marks)
    return data, marks


# ---------------------------------------------------------------------------------------------
# Overrides
# ---------------------------------------------------------------------------------------------


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for i, p in enumerate(parts[:-1]):
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override '{dotted}': '{'.'.join(parts[: i + 1])}' is a value, not a section")
        node = nxt
    node[parts[-1]] = value


def parse_overrides(args: list[str]) -> dict:
    """``['--optimizer.lr=1e-3', '--training.max_steps', '10']`` → nested dict (values parsed as YAML)."""
    tree: dict = {}
    i = 0
    while i < len(args):
        a = args[i]
        if not a.startswith("--"):
            raise ConfigError(f"expected an override like --section.key=value, got '{a}'")
        key = a[2:]
        if "=" in key:
            key, raw = key.split("=", 1)
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"override '--{key}' has no value")
            raw = args[i + 1]
            i += 1
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                value = float(value)
            except ValueError:
                pass
        _set_dotted(tree, key.replace("-", "_"), value)
        i += 1
    return tree


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _leaf_paths(tree: dict, prefix: KeyPath = ()) -> list[KeyPath]:
    """The paths ``deep_merge`` replaces: every non-mapping value (lists are replaced whole)."""
    out = []
    for k, v in tree.items():
        path = prefix + (str(k),)
        out += _leaf_paths(v, path) if isinstance(v, dict) and v else [path]
    return out


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def valid_keys(model: type[BaseModel], prefix: str = "") -> tuple[str, ...]:
    """Every key path of a schema; sections held in lists/optionals (``sources: list[SourceConfig]``) too."""
    keys: list[str] = []
    for name, fld in model.model_fields.items():
        path = f"{prefix}{name}"
        keys.append(path)
        ann = fld.annotation
        for t in (ann, *getattr(ann, "__args__", ())):
            if isinstance(t, type) and issubclass(t, BaseModel):
                keys.extend(valid_keys(t, path + "."))
    return tuple(keys)


def suggest_key(loc: tuple, root: type[BaseModel]) -> str:
    """'; did you mean KEY?' for an unknown key at ``loc``; list indices are matched away and put back
    (``sources.0.feild`` → ``sources.0.field``)."""
    path = ".".join(str(p) for p in loc if not isinstance(p, int))
    keys = list(valid_keys(root))
    close = difflib.get_close_matches(path, keys, n=1, cutoff=0.6)
    parent, _, leaf = path.rpartition(".")
    if not close and parent:  # try matching only the last component within its section
        siblings = [k for k in keys if k.rpartition(".")[0] == parent]
        close = [f"{parent}.{m}" if parent else m
                 for m in difflib.get_close_matches(leaf, [s.rpartition(".")[2] for s in siblings], n=1, cutoff=0.4)]
    if not close:
        return ""
    names, rebuilt = iter(close[0].split(".")), []
    for p in loc:
        rebuilt.append(str(p) if isinstance(p, int) else next(names, None))
    best = ".".join(rebuilt) if None not in rebuilt and next(names, None) is None else close[0]
    return f"; did you mean '{best}'?"


def _describe(e: dict, root: type[BaseModel]) -> str:
    """One pydantic error → the message part of its line (no location)."""
    path = ".".join(str(p) for p in e["loc"])
    if e["type"] == "extra_forbidden":
        hint = suggest_key(e["loc"], root)
        if not hint and "." not in path:
            hint = f" (sections: {', '.join(root.model_fields)})"
        return f"unknown key '{path}'{hint}"
    if e["type"] == "missing":
        return f"missing required key '{path}'"
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] == "value_error":  # cross-field checks already name their keys
        return msg
    ctx = e.get("ctx") or {}
    if "expected" in ctx:
        msg = f"allowed: {ctx['expected']}"
    label = f"'{path}'" if path else "config"
    return f"invalid value for {label}: {e.get('input')!r} ({msg})"


def format_validation_error(err: ValidationError, source: str, root: type[BaseModel],
                            origins: Optional[Origins] = None) -> str:
    """pydantic errors of schema ``root`` → one line each, naming the key path. Without ``origins`` every
    line starts with ``source:`` (when given); with them, with where the key sits (see the module doc)."""
    lines = []
    for e in err.errors():
        text = _describe(e, root)
        if origins is None:
            where = source
        elif e["type"] == "value_error":
            where = origins.named_in(text, root)
        else:
            where = origins.where(e["loc"], at_key=e["type"] == "extra_forbidden")
        lines.append(f"{where}: {text}" if where else text)
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The loader
# ---------------------------------------------------------------------------------------------


def validate_root(schema: type[M], tree: dict, origins: Origins | str = "",
                  prepare: Optional[Callable[[dict], dict]] = None) -> M:
    """Validate a merged tree with ``schema``; ``prepare`` (e.g. preset expansion) runs first and its
    ``ConfigError`` is placed at the key it names. ``origins`` as a plain string is the label of every line."""
    if isinstance(origins, str):
        origins = Origins(fallback=origins)
    try:
        return schema.model_validate(prepare(tree) if prepare else tree)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, origins.fallback, schema, origins)) from None
    except ConfigError as e:
        where = origins.named_in(str(e), schema)
        raise ConfigError(f"{where}: {e}" if where else str(e), e.hint) from None


def load_root(schema: type[M], path: str | Path | None = None, overrides: list[str] | dict | None = None, *,
              unwrap: Optional[str] = None, prepare: Optional[Callable[[dict], dict]] = None) -> M:
    """Read YAML ``path`` (optional), merge ``overrides`` (a CLI list or a nested dict) over it, validate.

    ``unwrap``: a file holding only this key is read as its contents (``prepare:`` for data configs)."""
    tree: dict = {}
    marks: dict = {}
    if path is not None:
        tree, marks = read_yaml(path)
        if unwrap and set(tree) == {unwrap}:
            if not isinstance(tree[unwrap], dict):
                m = marks[(unwrap,)][1]
                raise ConfigError(f"{path}:{m.line + 1}:{m.column + 1}: '{unwrap}' must be a mapping of sections")
            tree = tree[unwrap]
            marks = {p[1:]: m for p, m in marks.items() if len(p) > 1}
    over = parse_overrides(overrides) if isinstance(overrides, list) else (overrides or {})
    file = str(path) if path is not None else ""
    origins = Origins(file, marks, _leaf_paths(over), fallback=file)
    return validate_root(schema, deep_merge(tree, over), origins, prepare)
