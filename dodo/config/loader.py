"""Load a job: dataclass defaults <- fragments named in ``defaults:`` <- the job file <- overrides.

A job file and every fragment (``configs/<group>/<name>.yaml``) are partial config trees of the
same shape. They are deep-merged (mappings merge; lists and scalars replace) into one plain tree,
and ``build_config`` turns that tree into a typed ``JobConfig``. Alongside the tree we keep
``sources``: full key path -> the file or override that last set it, so that every expected
failure is a single ConfigError naming that file, the full key path and the fix.
The loader only reads; it never writes anything.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from dodo.config.errors import ConfigError, ConfigValueError
from dodo.config.schema import JobConfig

T = TypeVar("T")
OVERRIDE = "command line override"
DEFAULT = "default"  # the source of a key that no file or override set
_PACKAGE_CONFIGS = Path(__file__).resolve().parents[2] / "configs"
_NO_VALUE = object()
# Size caps on what a job file may hold (dodo/config/limits: why each number, docs/quickstart.md).
MAX_FILE_BYTES = 1_000_000  # a job file or fragment; real ones are a few kB
MAX_DEPTH = 32  # nesting of mappings and lists; the schema itself is 5 deep
MAX_NODES = 100_000  # values after expanding YAML aliases (an "alias bomb" expands to billions)
MAX_STR = 4096  # one string (PATH_MAX); a name or path longer than this is a mistake
MAX_LIST = 10_000  # elements of one list
INT64 = 2**63


# ---------------------------------------------------------------- public API


def load_job(job_path: str | os.PathLike, overrides: Sequence[str] = (),
             configs_dir: str | os.PathLike | None = None, cluster_profile: str | None = None) -> JobConfig:
    """Compose the job file with its fragments and ``key.path=value`` overrides; validate it.

    The cluster profile the job names (or ``cluster_profile``, from ``--cluster``, or a
    ``cluster.profile=NAME`` override) is merged in before the overrides: dodo/cluster/profiles.py.
    """
    from dodo.cluster import profiles

    path = Path(job_path)
    if not path.is_file():
        raise ConfigError(_missing_job_message(path, str(job_path)))
    tree: dict = {}
    sources: dict[str, str] = {}
    # Show the job path as the user typed it, so the message matches their command line.
    _compose(path, str(job_path), _find_configs_dir(path, configs_dir), tree, sources, chain=())
    parsed = [parse_override(text) for text in overrides]
    for key, value in parsed:
        if key in ("cluster", "cluster.profile") and isinstance(value, str):
            cluster_profile = value
    profiles.apply(tree, sources, cluster_profile)
    for key, value in parsed:
        if key in ("cluster", "cluster.profile") and isinstance(value, str):
            continue
        _check_override_key(key)
        for part in reversed(key.split(".")):
            value = {part: value}
        _merge(tree, value, OVERRIDE, sources)
    return build_config(JobConfig, tree, sources)


def parse_override(text: str) -> tuple[str, object]:
    """``'a.b=value'`` -> ``('a.b', value)``, the value read as YAML (numbers, [lists], null)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or not all(key.split(".")):
        raise ConfigError(f"{OVERRIDE} {_short(text)} is malformed; expected key.path=value, "
                          f"e.g. train.steps=100")
    try:
        _check_yaml_size(raw, f"{OVERRIDE} {_short(text)}")
        return key, yaml.load(raw, Loader=_StrictLoader)
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{OVERRIDE} {_short(text)}: cannot read the value {_short(raw)} ({problem}); "
                          f"quote strings and write lists as [a, b]") from None


def build_config(cls: type[T], data: Mapping, sources: Mapping[str, str] | None = None,
                 prefix: str = "") -> T:
    """Turn a plain mapping into the dataclass ``cls``, checking keys and types on the way.

    ``prefix`` is the key path of ``cls`` in the whole tree ("" at the root) and ``sources`` maps
    full key paths to the file that set them; both serve only to make error messages precise.
    """
    sources = sources or {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{_source_of(sources, prefix)}: {prefix or 'the config'} must be a "
                          f"mapping of settings, got {_got(data)}")
    field_types = _field_types(cls)
    for key in data:
        if key not in field_types:
            path = _join(prefix, str(key))
            raise ConfigError(_unknown_key_message(_source_of(sources, path), path, list(field_types)))
    kwargs = {}
    for name, tp in field_types.items():
        if name in data:
            kwargs[name] = _convert(data[name], tp, _join(prefix, name), sources)
        elif _default(cls, name) is _NO_VALUE:
            raise ConfigError(f"{_source_of(sources, prefix)}: missing key {_join(prefix, name)!r}; "
                              f"it has no default, so set it")
    try:
        return cls(**kwargs)
    except ConfigValueError as e:
        path = _join(prefix, e.key)
        value = kwargs[e.key] if e.key in kwargs else _default(cls, e.key)
        shown = path if value is _NO_VALUE else f"{path}={_fmt(value)}"
        raise ConfigError(f"{_source_of(sources, path)}: {shown}: {e.message}") from None


def config_to_dict(cfg: Any) -> dict:
    """The config as plain dicts, lists and scalars (safe for YAML and JSON)."""
    return dataclasses.asdict(cfg)


def dump_config(cfg: Any) -> str:
    """The fully resolved config as YAML, without ``defaults:``; it is itself a valid job file."""
    return yaml.dump(config_to_dict(cfg), Dumper=_Dumper, sort_keys=False, allow_unicode=True)


# ---------------------------------------------------------------- reading files


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys, which plain YAML silently resolves to the last."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first_line: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # '<<: *anchor' may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                seen = key in first_line
            except TypeError:  # unhashable key: the base class reports it
                continue
            if seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first set on line {first_line[key]})",
                    key_node.start_mark)
            first_line[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


class _Dumper(yaml.SafeDumper):
    """Writes lists inline ([mlp, attention]) so a dumped config reads like a job file."""


_Dumper.add_representer(
    list, lambda dumper, value: dumper.represent_sequence("tag:yaml.org,2002:seq", value, flow_style=True))


def _check_yaml_size(text: str, shown: str) -> None:
    """Refuse deep nesting and alias bombs before PyYAML builds anything.

    PyYAML's composer and constructor recurse per nesting level (a RecursionError past ~1000)
    and expand every alias (9 levels of 10 aliases are 10**9 objects: a MemoryError). Its event
    parser is a flat state machine, so one pass over the events measures the depth and the size
    after alias expansion cheaply. Aliases themselves stay allowed (`<<: *defaults` is common).
    """
    anchors: dict[str, int] = {}
    stack: list[list] = [[None, 0]]  # [anchor, values inside] per open collection
    try:
        for event in yaml.parse(text, Loader=_StrictLoader):
            if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                stack.append([event.anchor, 1])
                if len(stack) - 1 > MAX_DEPTH:
                    line = event.start_mark.line + 1
                    raise ConfigError(f"{shown}:{line}: nested more than {MAX_DEPTH} levels deep; a job file's "
                                      "settings are a few levels deep: flatten it")
            elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                anchor, count = stack.pop()
                if anchor:
                    anchors[anchor] = count
                stack[-1][1] += count
            elif isinstance(event, yaml.ScalarEvent):
                if event.anchor:
                    anchors[event.anchor] = 1
                stack[-1][1] += 1
            elif isinstance(event, yaml.AliasEvent):
                stack[-1][1] += anchors.get(event.anchor, 1)
            if stack[-1][1] > MAX_NODES or stack[0][1] > MAX_NODES:
                raise ConfigError(f"{shown}: more than {MAX_NODES:,} values (YAML aliases *name counted as "
                                  "expanded); a job file holds settings: put long lists in a file it names, "
                                  "and do not nest aliases of aliases")
    except yaml.YAMLError:
        return  # a syntax error: yaml.load below reports it with its line and column


def _read_yaml(path: Path, shown: str, job: bool = False) -> dict:
    if not path.is_file():  # a FIFO or a device: reading it could block or never end
        raise ConfigError(f"{shown} is not a regular file (a pipe, socket or device); write the job to a "
                          ".yaml file and pass that")
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise ConfigError(f"{shown} is {size:,} bytes, more than the {MAX_FILE_BYTES:,} a job file or "
                              "fragment may have; job files hold settings, not data: name data by path")
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{shown}: cannot read the file: {_short(str(e), 200)}") from None
    try:
        _check_yaml_size(text, shown)
        data = yaml.load(text, Loader=_StrictLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{shown}:{mark.line + 1}:{mark.column + 1}" if mark else shown
        problem = e.problem or "syntax error"
        if e.context and e.context_mark and e.context_mark is not mark:
            # e.g. an unclosed '[' is reported at the end of the file; say where it was opened.
            problem += f" ({e.context} started at line {e.context_mark.line + 1}, column {e.context_mark.column + 1})"
        elif e.context:
            problem += f" ({e.context})"
        raise ConfigError(f"{where}: invalid YAML: {problem}; fix the file at that line and column") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{shown}: invalid YAML: {e}") from None
    if data is None and job:  # most likely a file that was truncated or never written
        raise ConfigError(f"job file {shown!r} is empty; a job names at least its fragments, e.g. "
                          "'defaults: [model/tiny, adapter/bottleneck, data/synthetic, train/demo]' (copy jobs/demo.yaml)")
    if data is None:  # an empty fragment is an empty config
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{shown}: the top level must be a mapping of keys such as "
                          f"'train: {{steps: 100}}', got {_got(data)}")
    return data


# ---------------------------------------------------------------- composing


def _find_configs_dir(job: Path, explicit: str | os.PathLike | None) -> Path:
    if explicit is not None:
        return Path(explicit)
    if os.environ.get("DODO_CONFIGS"):
        return Path(os.environ["DODO_CONFIGS"])
    beside = job.absolute().parent.parent / "configs"
    return beside if beside.is_dir() else _PACKAGE_CONFIGS


def _compose(path: Path, shown: str, configs_dir: Path, tree: dict, sources: dict[str, str],
             chain: tuple[Path, ...]) -> None:
    """Merge ``path``'s fragments (depth first, in list order), then its own keys, into ``tree``."""
    resolved = path.resolve()
    if resolved in chain:
        cycle = " -> ".join(_display(p) for p in (*chain[chain.index(resolved):], resolved))
        raise ConfigError(f"{shown}: defaults form a cycle: {cycle}; remove one of these entries")
    data = _read_yaml(path, shown, job=not chain)
    defaults = data.pop("defaults", None) or []
    if not isinstance(defaults, list) or not all(isinstance(d, str) for d in defaults):
        raise ConfigError(f"{shown}: defaults must be a list of fragment names like "
                          f"[model/tiny, train/demo], got {_got(defaults)}")
    for entry in defaults:
        fragment = _find_fragment(configs_dir, entry, shown)
        _compose(fragment, _display(fragment), configs_dir, tree, sources, (*chain, resolved))
    _merge(tree, data, shown, sources)


def _find_fragment(configs_dir: Path, entry: str, listed_in: str) -> Path:
    where = f"{listed_in}: defaults entry {entry!r}"
    group, _, name = entry.removesuffix(".yaml").partition("/")
    if not group or not name or ".." in entry.split("/"):
        raise ConfigError(f"{where} must be group/name, e.g. model/tiny")
    if not configs_dir.is_dir():
        raise ConfigError(f"{where}: configs folder {_display(configs_dir)}/ does not exist; "
                          f"set DODO_CONFIGS to your configs/ folder")
    group_dir = configs_dir / group
    if not group_dir.is_dir():
        groups = sorted(p.name for p in configs_dir.iterdir() if p.is_dir())
        raise ConfigError(f"{where}: no group {group!r} in {_display(configs_dir)}/; available "
                          f"groups: {', '.join(groups) or 'none'}" + _did_you_mean(group, groups))
    path = group_dir / f"{name}.yaml"
    if not path.is_file():
        names = sorted(p.relative_to(group_dir).with_suffix("").as_posix() for p in group_dir.rglob("*.yaml"))
        raise ConfigError(f"{where}: {_display(path)} not found; available in {_display(group_dir)}/: "
                          f"{', '.join(names) or 'none'}" + _did_you_mean(name, names, f"{group}/"))
    return path


def _merge(tree: dict, data: Mapping, source: str, sources: dict[str, str], prefix: str = "") -> None:
    """Deep-merge ``data`` into ``tree``: mappings merge, anything else replaces."""
    for key, value in data.items():
        path = _join(prefix, str(key))
        if isinstance(value, Mapping):
            if not isinstance(tree.get(key), dict):
                _forget(sources, path)
                tree[key] = {}
            _merge(tree[key], value, source, sources, path)
        else:
            _forget(sources, path)  # a scalar replacing a section: its old leaves are gone
            tree[key] = copy.deepcopy(value)
            sources[path] = source


def _forget(sources: dict[str, str], path: str) -> None:
    for key in [k for k in sources if k == path or k.startswith(path + ".")]:
        del sources[key]


def _check_override_key(key: str) -> None:
    """Overrides are checked against the schema itself, so a typo never silently adds a key."""
    cls: Any = JobConfig
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(cls):
            parent = ".".join(parts[:i])
            raise ConfigError(f"{OVERRIDE}: {parent} is a single value, not a section; "
                              f"write {parent}=VALUE")
        if hasattr(cls, "config_class_for"):
            return  # its keys depend on a value inside it (model.family): build_config checks them
        field_types = _field_types(cls)
        if part not in field_types:
            raise ConfigError(_unknown_key_message(OVERRIDE, ".".join(parts[:i + 1]), list(field_types)))
        cls = field_types[part]


def _section_class(tp: type, value: Mapping, path: str, sources: Mapping[str, str]) -> type:
    """The class to build a section with: ``tp``, or the subclass its ``config_class_for`` hook
    picks from the raw mapping (``model``: the keys of the family named by ``model.family``,
    dodo/models/config.py)."""
    select = getattr(tp, "config_class_for", None)
    if select is None:
        return tp
    try:
        return select(value)
    except ConfigValueError as e:
        key = _join(path, e.key)
        raise ConfigError(f"{_source_of(sources, key)}: {key}: {e.message}") from None


# ---------------------------------------------------------------- types


def _field_types(cls: type) -> dict[str, Any]:
    hints = get_type_hints(cls)  # resolves the string annotations of `from __future__ import annotations`
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _convert(value: Any, tp: Any, path: str, sources: Mapping[str, str]) -> Any:
    """Check ``value`` against the annotation ``tp``; return it in that type."""
    origin, args = get_origin(tp), get_args(tp)

    def wrong(expected: str, hint: str = "") -> ConfigError:
        return ConfigError(f"{_source_of(sources, path)}: {path} must be {expected}, got {_got(value)}{hint}")

    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1:  # e.g. int | Literal["auto"]: the first alternative that takes the value
            errors = []
            for alt in rest:
                try:
                    return _convert(value, alt, path, sources)
                except ConfigError as err:
                    errors.append(str(err).split(f"{path} must be ", 1)[-1].split(", got ", 1)[0])
            raise wrong(" or ".join(errors))
        return _convert(value, rest[0], path, sources)
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        choices = [str(a) for a in args]
        hint = _did_you_mean(value, choices) if isinstance(value, str) else ""
        raise wrong(f"one of ({', '.join(choices)})", hint)
    if origin is list:
        if isinstance(value, list) and len(value) > MAX_LIST:
            raise ConfigError(f"{_source_of(sources, path)}: {path} has {len(value):,} elements, more than "
                              f"{MAX_LIST:,}; name a file that holds them instead")
        if not isinstance(value, list):
            raise wrong("a list", f"; write it as [{_fmt(value)}]" if isinstance(value, (str, int, float)) else "")
        return [_convert(item, args[0], f"{path}[{i}]", sources) for i, item in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise wrong("a mapping of settings", f"; write it as {path.rpartition('.')[2]}: {{key: value}}")
        return build_config(_section_class(tp, value, path, sources), value, sources, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise wrong("true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if not -INT64 <= value < INT64:
                raise wrong("an integer that fits in 64 bits (below 2**63)")
            return value
        raise wrong("an integer", f"; write {int(value)}" if isinstance(value, float) and value.is_integer() else "")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value) if abs(value) < 1e308 else math.inf
        elif isinstance(value, str) and len(value) < 100:
            try:
                number = float(value)  # YAML 1.1 reads 1e-4 (no dot in the mantissa) as a string
            except ValueError:
                pass
        if number is None:
            raise wrong("a number")
        if not math.isfinite(number):  # .inf, .nan, 1e999: no setting means "infinite"
            raise wrong("a finite number (not .inf or .nan)")
        return number
    if tp is str:
        if isinstance(value, str):
            if len(value) > MAX_STR:
                raise ConfigError(f"{_source_of(sources, path)}: {path} is {len(value):,} characters long, more "
                                  f"than {MAX_STR:,}; a name or path is short: check the file")
            return value
        # YAML reads yes/no/on/off as booleans and 2024 as a number.
        raise wrong("a string", "; put it in quotes" if isinstance(value, (bool, int, float)) else "")
    raise TypeError(f"config field {path}: unsupported annotation {tp!r}")


def _default(cls: type, name: str) -> Any:
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
    return _NO_VALUE


# ---------------------------------------------------------------- messages


def _source_of(sources: Mapping[str, str], path: str) -> str:
    """The file that set ``path``, or that set something under it, or the section above it."""
    path = path.split("[", 1)[0]  # list items come from whoever set the list
    if path in sources:
        return sources[path]
    for key, source in sources.items():
        if key.startswith(path + ".") or not path:
            return source
    while "." in path:
        path = path.rpartition(".")[0]
        if path in sources:
            return sources[path]
    return DEFAULT


def _unknown_key_message(source: str, path: str, siblings: list[str]) -> str:
    parent, _, key = path.rpartition(".")
    close = difflib.get_close_matches(key, siblings, n=1)
    if close:
        return f"{source}: unknown key {path!r}; did you mean {_join(parent, close[0])!r}?"
    where = f"in {parent}" if parent else "at the top level"
    return f"{source}: unknown key {path!r}; valid keys {where}: {', '.join(siblings)}"


def _missing_job_message(path: Path, shown: str) -> str:
    if path.is_dir():
        return f"job file {shown!r} is a folder; name a .yaml file inside it"
    if path.exists():  # a FIFO, socket or device
        return (f"job file {_short(shown)} is not a regular file (a pipe, socket or device); write the job "
                "to a .yaml file and pass that")
    folder = os.path.dirname(shown)
    folder_shown = f"{folder}/" if folder else "the current folder"
    if not path.parent.is_dir():
        return f"job file {shown!r} not found: the folder {folder_shown} does not exist"
    jobs = sorted(p.name for p in path.parent.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
    if not jobs:
        return f"job file {shown!r} not found; there are no .yaml job files in {folder_shown}"
    message = f"job file {shown!r} not found; available in {folder_shown}: {', '.join(jobs)}"
    close = difflib.get_close_matches(path.name, jobs, n=1)
    return message + (f"; did you mean {os.path.join(folder, close[0])!r}?" if close else "")


def _did_you_mean(word: str, choices: list[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f"; did you mean {prefix + close[0]!r}?" if close else ""


def _got(value: Any) -> str:
    if value is None:
        return "null"
    text = repr(value)
    return f"{text if len(text) <= 60 else text[:57] + '...'} ({type(value).__name__})"


def _fmt(value: Any) -> str:
    """A value as it would be written in YAML: -5, 1.5, [mlp, attention], null."""
    text = yaml.dump(value, Dumper=_Dumper, default_flow_style=True, width=1000).strip()
    return text.removesuffix("...").strip()


def _short(text: str, limit: int = 80) -> str:
    """repr(text), cut: a message quotes what the user wrote, never all of it."""
    shown = repr(text)
    return shown if len(shown) <= limit else f"{shown[:limit - 3]}...' ({len(text):,} characters)"


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _display(path: Path) -> str:
    """A path relative to the current folder when it lies under it, else absolute."""
    relative = os.path.relpath(path)
    return str(path.absolute()) if relative.startswith("..") else relative
