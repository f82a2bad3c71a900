"""A scaling study file (JSON, or YAML where PyYAML imports): what to run and what to sweep, checked
key by key, and its expansion into points (the cartesian product of the sweep axes, in file order).

    {"format": "epic-study-v1", "name": "cpu-weak", "command": "bench-moe",
     "args": {"preset": "qwen3-30b-a3b", "layers": 1, "iterations": 3},
     "sweep": {"ranks": [1, 2, 4], "tokens_per_rank": [32, 128]}}

Every error is a StudyError whose message names the file, the key and the fix.
"""

import dataclasses
import difflib
import itertools
import json
import math
import os
import re

FORMAT = "epic-study-v1"
COMMANDS = ("bench-moe", "bench-decode", "run")
REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

# The flags run_study.py sets itself on every point (each point's output file).
RESERVED_FLAGS = {"json", "csv", "report-out"}


class StudyError(ValueError):
    """A study file that cannot be run: the message says where and how to fix it."""


@dataclasses.dataclass(frozen=True)
class Axis:
    """A named sweep axis: its value type and the epic flag it becomes (None: a launcher setting)."""
    kind: str  # "int>=1", "int>=0", "str", "bool"
    flag: object  # None, a flag name, or {command: flag name}
    help: str


AXES = {
    "ranks": Axis("int>=1", None, "MPI ranks (one per GPU on a GPU machine)"),
    "nodes": Axis("int>=1", None, "nodes the ranks are spread over (ranks must divide evenly)"),
    "ranks_per_node": Axis("int>=1", None, "ranks (GPUs) per node; nodes = ranks / ranks_per_node"),
    "tokens_per_rank": Axis("int>=0", {"bench-moe": "tokens-per-worker"}, "tokens each rank routes (weak scaling)"),
    "total_tokens": Axis("int>=1", {"bench-moe": "tokens-per-worker"},
                         "tokens of the whole job, split evenly over the ranks (strong scaling)"),
    "batch": Axis("int>=1", {"bench-decode": "batch"}, "sequences each rank decodes"),
    "slots": Axis("int>=1", "slots", "expert slots per rank per layer (spare slots hold replicas)"),
    "replica_slots": Axis("int>=0", "slots",
                          "spare slots per rank for replicas: slots = ceil(experts / ranks) + this"),
    "backend": Axis("str", "backend", "cpu, cuda or auto"),
    "precision": Axis("str", "precision", "fp32 or bf16"),
    "threads": Axis("int>=0", "threads", "CPU threads per rank (0: cores / ranks)"),
    "ep_transport": Axis("str", "ep-transport", "nccl, host or auto"),
    "ep_mode": Axis("str", "ep-mode", "normal or low-latency"),
    "ep_overlap": Axis("bool", "ep-overlap", "two-batch overlap of the exchange with compute"),
    "ep_dispatch": Axis("str", "ep-dispatch", "flat or hierarchical (needs an epic that has --ep-dispatch)"),
    "residency": Axis("str", "residency", "a named residency state (needs an epic that has --residency)"),
    "load_profile": Axis("str", "load-profile", "a load profile JSON (epic run --load-profile-out)"),
    "seed": Axis("int>=0", "seed", "seed of the random weights and tokens"),
}

# Axes that are not epic flags of their own: they belong in "sweep", never in "args".
LAUNCH_AXES = ("ranks", "nodes", "ranks_per_node", "tokens_per_rank", "total_tokens", "replica_slots")

TOP_LEVEL = {
    "format": "always \"epic-study-v1\"",
    "name": "a short name: letters, digits, '.', '_', '-'",
    "description": "free text",
    "command": "one of " + ", ".join(COMMANDS),
    "args": "epic flags every point gets, e.g. {\"preset\": \"tiny\", \"iterations\": 3}",
    "sweep": "the axes to sweep, each a non-empty list, e.g. {\"ranks\": [1, 2, 4]}",
    "exclude": "points to leave out: a list of partial points, e.g. [{\"ranks\": 1, \"ep_overlap\": true}]",
    "scaling": "weak, strong or none (default: strong with total_tokens, weak with tokens_per_rank or batch)",
    "repeats": "how many times each point runs (default 1)",
    "repeat_order": "together (a point's repeats back to back, the default) or interleaved (round after round over "
                    "all points: slow drifts of a shared machine spread over every point)",
    "timeout_s": "seconds one point may take before it is ended and recorded as failed (default 600)",
    "epic_binary": "the epic executable (default: build/epic; run_study.py --epic overrides)",
    "launcher": "local mpirun settings: {\"mpirun_args\": [...], \"oversubscribe\": true|false, \"env\": {...}}",
    "slurm": "sbatch settings: {\"time\": \"00:20:00\", \"partition\": ..., \"cpus_per_task\": 1, "
             "\"gpus_per_task\": 0, \"sbatch_args\": [...], \"poll_s\": 5}",
}
LAUNCHER_KEYS = {"mpirun_args": list, "oversubscribe": bool, "env": dict}
SLURM_KEYS = {"time": str, "partition": str, "cpus_per_task": int, "gpus_per_task": int, "sbatch_args": list,
              "poll_s": (int, float)}


@dataclasses.dataclass
class Study:
    path: str
    name: str
    command: str
    args: dict
    sweep: dict  # axis -> list of values, in file order
    exclude: list  # partial points left out of the product
    scaling: str
    repeats: int
    repeat_order: str
    timeout_s: float
    epic_binary: object
    launcher: dict
    slurm: dict
    description: str = ""
    raw: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Point:
    index: int
    repeat: int
    params: dict  # axis -> value as swept
    ranks: int
    nodes: int
    ranks_per_node: int
    epic_args: list  # epic subcommand and flags, without the output flag run_study adds
    point_id: str


def _where(path, key):
    return f"{path}: {key}"


def _suggest(name, known):
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _type_name(value):
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "an object", type(None): "null"}.get(type(value), type(value).__name__)


def _check_value(path, key, kind, value):
    """A sweep or flag value of the axis kind, or StudyError naming the key."""
    if kind.startswith("int"):
        minimum = int(kind[-1])
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise StudyError(f"{_where(path, key)} must hold integers >= {minimum}, got {json.dumps(value)} "
                             f"({_type_name(value)})")
    elif kind == "str":
        if not isinstance(value, str) or not value:
            raise StudyError(f"{_where(path, key)} must hold non-empty strings, got {json.dumps(value)}")
    elif kind == "bool":
        if not isinstance(value, bool):
            raise StudyError(f"{_where(path, key)} must hold true or false, got {json.dumps(value)}")
    return value


def _flag_value_ok(value):
    scalar = (str, int, float, bool)
    if isinstance(value, scalar):
        return True
    return isinstance(value, list) and value and all(isinstance(v, scalar) and not isinstance(v, bool)
                                                        for v in value)


def flag_name(key):
    """An args key or raw sweep key as epic spells the flag: 'tokens_per_worker' -> 'tokens-per-worker'."""
    return key.lstrip("-").replace("_", "-")


def read_study_text(path):
    """The study as a dict: JSON by default, YAML for .yaml/.yml where PyYAML imports."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise StudyError(f"{path}: cannot read the study file ({e.strerror})") from None
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml  # PyYAML (Debian: python3-yaml); optional
        except ImportError:
            raise StudyError(f"{path}: YAML study files need PyYAML (apt-get install python3-yaml); "
                             "or write the study as JSON") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise StudyError(f"{path}: not valid YAML ({e})") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise StudyError(f"{path}: not valid JSON at line {e.lineno} column {e.colno} ({e.msg})") from None
    if not isinstance(data, dict):
        raise StudyError(f"{path}: a study is an object with keys {', '.join(TOP_LEVEL)}; got {_type_name(data)}")
    return data


def parse_study(data, path="<study>"):
    """A Study from a dict, every key and value checked."""
    for key in data:
        if key not in TOP_LEVEL:
            raise StudyError(f"{path}: unknown key '{key}' at the top level{_suggest(key, TOP_LEVEL)}; "
                             f"known keys: {', '.join(TOP_LEVEL)}")
    if "format" in data and data["format"] != FORMAT:
        raise StudyError(f"{_where(path, 'format')} must be \"{FORMAT}\", got {json.dumps(data['format'])}")
    for required in ("name", "command", "sweep"):
        if required not in data:
            raise StudyError(f"{path}: missing key '{required}': {TOP_LEVEL[required]}")
    name = data["name"]
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9._-]{1,80}", name):
        raise StudyError(f"{_where(path, 'name')} must be 1-80 letters, digits, '.', '_' or '-', got {json.dumps(name)}")
    command = data["command"]
    if command not in COMMANDS:
        raise StudyError(f"{_where(path, 'command')} must be one of {', '.join(COMMANDS)}, got {json.dumps(command)}"
                         f"{_suggest(str(command), COMMANDS)}")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise StudyError(f"{_where(path, 'description')} must be a string")

    args = data.get("args", {})
    if not isinstance(args, dict):
        raise StudyError(f"{_where(path, 'args')} must be an object of epic flags, e.g. {{\"preset\": \"tiny\"}}; "
                         f"got {_type_name(args)}")
    for key, value in args.items():
        if flag_name(key) in RESERVED_FLAGS:
            raise StudyError(f"{_where(path, 'args.' + key)}: run_study.py sets --{flag_name(key)} itself "
                             "(each point's output file); remove it")
        if key.replace("-", "_") in LAUNCH_AXES:
            raise StudyError(f"{_where(path, 'args.' + key)}: '{key}' is a sweep axis; put it in \"sweep\" as a "
                             f"list (\"{key.replace('-', '_')}\": [{json.dumps(value)}])")
        if not _flag_value_ok(value):
            raise StudyError(f"{_where(path, 'args.' + key)} must be a string, number, boolean or a non-empty list "
                             f"of strings or numbers; got {json.dumps(value)}")

    sweep = data["sweep"]
    if not isinstance(sweep, dict):
        raise StudyError(f"{_where(path, 'sweep')} must be an object of axes, e.g. {{\"ranks\": [1, 2, 4]}}; "
                         f"got {_type_name(sweep)}")
    if not sweep:
        raise StudyError(f"{_where(path, 'sweep')} is empty: name at least one axis, e.g. \"sweep\": "
                         "{\"ranks\": [1, 2, 4]}")
    for key, values in sweep.items():
        if not key.startswith("--") and key not in AXES:
            raise StudyError(f"{_where(path, 'sweep.' + key)}: unknown axis{_suggest(key, AXES)}; axes: "
                             f"{', '.join(AXES)}, or any epic flag spelled with its dashes (\"--seed\")")
        if not isinstance(values, list):
            raise StudyError(f"{_where(path, 'sweep.' + key)} must be a list of values, e.g. [{json.dumps(values)}]; "
                             f"got {_type_name(values)}")
        if not values:
            raise StudyError(f"{_where(path, 'sweep.' + key)} is an empty list: give at least one value "
                             "(or remove the axis)")
        if len(set(json.dumps(v) for v in values)) != len(values):
            raise StudyError(f"{_where(path, 'sweep.' + key)} lists a value twice: {json.dumps(values)}")
        for value in values:
            if key in AXES:
                _check_value(path, "sweep." + key, AXES[key].kind, value)
            elif not _flag_value_ok(value):
                raise StudyError(f"{_where(path, 'sweep.' + key)} values must be strings, numbers or booleans")
        if key in AXES and isinstance(AXES[key].flag, dict) and command not in AXES[key].flag:
            users = ", ".join(AXES[key].flag)
            raise StudyError(f"{_where(path, 'sweep.' + key)}: this axis applies to {users}, not {command}")
        if key.startswith("--") and flag_name(key) in RESERVED_FLAGS:
            raise StudyError(f"{_where(path, 'sweep.' + key)}: run_study.py sets {key} itself; remove it")
    if "nodes" in sweep and "ranks_per_node" in sweep:
        raise StudyError(f"{path}: sweep has both 'nodes' and 'ranks_per_node'; keep one (the other follows "
                         "from ranks)")
    if "tokens_per_rank" in sweep and "total_tokens" in sweep:
        raise StudyError(f"{path}: sweep has both 'tokens_per_rank' (weak scaling) and 'total_tokens' (strong "
                         "scaling); one study is one or the other: split it in two")
    if "slots" in sweep and "replica_slots" in sweep:
        raise StudyError(f"{path}: sweep has both 'slots' and 'replica_slots'; keep one")

    exclude = data.get("exclude", [])
    if not isinstance(exclude, list) or not all(isinstance(e, dict) and e for e in exclude):
        raise StudyError(f"{_where(path, 'exclude')} must be a list of non-empty objects (partial points), e.g. "
                         "[{\"ranks\": 1, \"ep_overlap\": true}]")
    for number, entry in enumerate(exclude):
        for key, value in entry.items():
            if key not in sweep:
                raise StudyError(f"{_where(path, f'exclude[{number}].{key}')}: not a sweep axis of this study "
                                 f"({', '.join(sweep)})")
            if value not in sweep[key]:
                raise StudyError(f"{_where(path, f'exclude[{number}].{key}')}: {json.dumps(value)} is not one of "
                                 f"sweep.{key}'s values {json.dumps(sweep[key])}")

    default_scaling = ("strong" if "total_tokens" in sweep else
                       "weak" if ("tokens_per_rank" in sweep or "batch" in sweep) else "none")
    scaling = data.get("scaling", default_scaling)
    if scaling not in ("weak", "strong", "none"):
        raise StudyError(f"{_where(path, 'scaling')} must be weak, strong or none, got {json.dumps(scaling)}")
    repeats = data.get("repeats", 1)
    if isinstance(repeats, bool) or not isinstance(repeats, int) or not 1 <= repeats <= 100:
        raise StudyError(f"{_where(path, 'repeats')} must be an integer from 1 to 100, got {json.dumps(repeats)}")
    repeat_order = data.get("repeat_order", "together")
    if repeat_order not in ("together", "interleaved"):
        raise StudyError(f"{_where(path, 'repeat_order')} must be together or interleaved, got {json.dumps(repeat_order)}")
    timeout_s = data.get("timeout_s", 600)
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not 0 < timeout_s <= 7 * 86400:
        raise StudyError(f"{_where(path, 'timeout_s')} must be a number of seconds in (0, 604800], "
                         f"got {json.dumps(timeout_s)}")
    epic_binary = data.get("epic_binary")
    if epic_binary is not None and (not isinstance(epic_binary, str) or not epic_binary):
        raise StudyError(f"{_where(path, 'epic_binary')} must be a path string")
    launcher = _check_section(path, "launcher", data.get("launcher", {}), LAUNCHER_KEYS)
    slurm = _check_section(path, "slurm", data.get("slurm", {}), SLURM_KEYS)
    if "time" in slurm and not re.fullmatch(r"(\d+-)?\d{1,2}(:\d{2}){1,2}|\d+", slurm["time"]):
        raise StudyError(f"{_where(path, 'slurm.time')} must be a Slurm time such as \"00:20:00\", "
                         f"got {json.dumps(slurm['time'])}")
    return Study(path=path, name=name, command=command, args=args, sweep=sweep, exclude=exclude, scaling=scaling,
                 repeats=repeats, repeat_order=repeat_order,
                 timeout_s=float(timeout_s), epic_binary=epic_binary, launcher=launcher, slurm=slurm,
                 description=description, raw=data)


def _check_section(path, section, value, schema):
    if not isinstance(value, dict):
        raise StudyError(f"{_where(path, section)} must be an object; keys: {', '.join(schema)}")
    for key, item in value.items():
        if key not in schema:
            raise StudyError(f"{_where(path, section + '.' + key)}: unknown key{_suggest(key, schema)}; "
                             f"known: {', '.join(schema)}")
        wanted = schema[key]
        wanted_types = wanted if isinstance(wanted, tuple) else (wanted,)
        if isinstance(item, bool) and bool not in wanted_types or not isinstance(item, wanted_types):
            names = " or ".join(_type_name(t()) for t in wanted_types)
            raise StudyError(f"{_where(path, section + '.' + key)} must be {names}, got {json.dumps(item)}")
        if wanted is list and not all(isinstance(v, str) for v in item):
            raise StudyError(f"{_where(path, section + '.' + key)} must be a list of strings")
        if wanted is dict and not all(isinstance(v, str) for v in item.values()):
            raise StudyError(f"{_where(path, section + '.' + key)} values must be strings")
    return value


def load_study(path):
    return parse_study(read_study_text(path), path)


def preset_experts(study):
    """Experts per MoE layer of the study's model (for replica_slots): from args.preset or args.model."""
    args = {flag_name(k): v for k, v in study.args.items()}
    if "preset" in args or study.command == "bench-moe":
        preset = str(args.get("preset", "qwen3-30b-a3b"))
        candidates = [os.path.join(REPO_ROOT, preset), os.path.join(REPO_ROOT, "configs", "presets", preset + ".json")]
        config_key = "config"
    elif "model" in args:
        candidates = [os.path.join(REPO_ROOT, str(args["model"]), "config.json")]
        config_key = None
    elif "random-weights" in args:
        preset = str(args["random-weights"])
        candidates = [os.path.join(REPO_ROOT, preset), os.path.join(REPO_ROOT, "configs", "presets", preset + ".json")]
        config_key = "config"
    else:
        raise StudyError(f"{study.path}: replica_slots needs the model's expert count: give args.preset, "
                         "args.model or args.random-weights")
    for candidate in candidates:
        if os.path.isfile(candidate):
            with open(candidate, encoding="utf-8") as f:
                config = json.load(f)
            if config_key:
                config = config.get(config_key, {})
            experts = config.get("num_experts", config.get("num_local_experts"))
            if isinstance(experts, int) and experts > 0:
                return experts
            raise StudyError(f"{candidate}: no num_experts in the config (needed by replica_slots)")
    raise StudyError(f"{study.path}: replica_slots: cannot find the model config (looked at {', '.join(candidates)})")


def _short(axis):
    return {"ranks": "r", "nodes": "n", "ranks_per_node": "rpn", "tokens_per_rank": "t", "total_tokens": "T",
            "batch": "b", "slots": "s", "replica_slots": "rs", "threads": "th"}.get(axis, flag_name(axis))


def _format_flag(flag, value):
    """epic arguments for one flag: booleans as --flag / --no-flag, lists comma-joined."""
    if isinstance(value, bool):
        return [f"--{flag}"] if value else [f"--no-{flag}"]
    if isinstance(value, list):
        value = ",".join(str(v) for v in value)
    return [f"--{flag}", str(value)]


def expand(study):
    """Every point of the study: the product of the sweep axes in file order (the last varies fastest),
    each repeated study.repeats times. StudyError where a point cannot exist (ranks not divisible by nodes,
    total_tokens not divisible by ranks)."""
    axes = list(study.sweep)
    experts = preset_experts(study) if "replica_slots" in study.sweep else None
    points = []
    for index, values in enumerate(itertools.product(*(study.sweep[a] for a in axes))):
        params = dict(zip(axes, values))
        if any(all(params[k] == v for k, v in entry.items()) for entry in study.exclude):
            continue
        ranks = params.get("ranks", 1)
        if "nodes" in params:
            nodes = params["nodes"]
            if ranks % nodes:
                raise StudyError(f"{study.path}: point {params}: {ranks} ranks do not spread evenly over {nodes} nodes; "
                                 "give ranks that are multiples of nodes")
        elif "ranks_per_node" in params:
            if ranks % params["ranks_per_node"] and ranks > params["ranks_per_node"]:
                raise StudyError(f"{study.path}: point {params}: {ranks} ranks are not whole nodes of "
                                 f"{params['ranks_per_node']}")
            nodes = max(1, ranks // params["ranks_per_node"])
        else:
            nodes = 1
        ranks_per_node = ranks // nodes
        flags = {}
        for key, value in study.args.items():
            flags[flag_name(key)] = value
        for axis, value in params.items():
            if axis.startswith("--"):
                flags[flag_name(axis)] = value
                continue
            spec = AXES[axis].flag
            if spec is None:
                continue
            flag = spec[study.command] if isinstance(spec, dict) else spec
            if axis == "total_tokens":
                if value % ranks:
                    raise StudyError(f"{study.path}: point {params}: total_tokens {value} does not split evenly "
                                     f"over {ranks} ranks; pick totals divisible by every rank count")
                value = value // ranks
            elif axis == "replica_slots":
                value = math.ceil(experts / ranks) + value
            flags[flag] = value
        epic_args = [study.command]
        for flag, value in flags.items():
            epic_args += _format_flag(flag, value)
        label = "-".join(f"{_short(a)}{str(v).replace('/', '_')}" for a, v in params.items())
        label = re.sub(r"[^A-Za-z0-9._-]", "_", label)[:100]
        for repeat in range(study.repeats):
            suffix = f"-rep{repeat}" if study.repeats > 1 else ""
            points.append(Point(index=index, repeat=repeat, params=params, ranks=ranks, nodes=nodes,
                                ranks_per_node=ranks_per_node, epic_args=epic_args,
                                point_id=f"p{index:03d}-{label}{suffix}"))
    if study.repeat_order == "interleaved":
        points.sort(key=lambda p: p.repeat)  # stable: round after round, each in the sweep's order
    return points


def used_flags(points):
    """The epic flags the points use (to check against `epic COMMAND --help`)."""
    flags = set()
    for point in points:
        for arg in point.epic_args[1:]:
            if arg.startswith("--"):
                flags.add(arg[2:])
    return flags


def flags_of_axes(study):
    """flag -> the study key that asks for it (for error messages)."""
    origin = {}
    for key in study.args:
        origin[flag_name(key)] = f"args.{key}"
    for axis in study.sweep:
        if axis.startswith("--"):
            origin[flag_name(axis)] = f"sweep.{axis}"
        elif AXES[axis].flag is not None:
            spec = AXES[axis].flag
            origin[spec[study.command] if isinstance(spec, dict) else spec] = f"sweep.{axis}"
    return origin
