"""The job API's admission policy: the one place that decides what a submitted job may ask for.

A request body is untrusted input, yet a `JobSpec` names code to import (a task factory), weights
and modeling code to load (a model path, `trust_remote_code`), files to read (task options),
addresses to dial (a Redis queue, a Ray cluster) and how much work to do. `dlrl train` on the
command line may do all of that (its user is the operator); a job submitted over HTTP may do only
what `admit` lets through, and `admit` is called on every submission before anything is stored or
started. Its rules (services/README.md lists them too):

- the spec already passed `JobSpec` (strict types, no inf/NaN, hard `le=` bounds);
- the fields that size a job must be given: an empty body never starts a default-size job;
- task names come from the registry (`dlrl.tasks.TASKS`) or the operator's `tasks` list; an
  import path ("module:factory") is refused unless listed. Options must be the factory's own
  keyword arguments, with small JSON values; an option naming a file must lie in `data_root`;
  a code task's `memory_mb` (one cap for all processes of a run) is at most this host's memory;
- `eval.protocol` (a protocol file) lies in `data_root` or the shipped deploy/eval/, and so do
  the eval data file it pins and any file its task options name;
- models are `builtin:<name>`, a folder inside one of `model_roots`, or a hub id in `models`;
  an adapter folder's base model obeys the same rule, and so does its base if that is an adapter
  again, to the end of the chain. Jobs load no remote code unless the operator allows it:
  `trust_remote_code=true` in a spec is refused (the default is false);
- every path is resolved once (`resolve`): the rules judge the resolved path and the admitted spec
  carries it, so the job opens what was checked; a path that cannot be resolved is a refusal;
- `queue.redis_url` and `runtime.ray_address` are the server's: a spec that sets them is refused
  (the job gets the server's Redis in its environment and joins the server's Ray cluster);
- every size field is at most the server's limit (`limits`, stricter than JobSpec's bounds).

The per-job wall-clock limit (`max_job_seconds`) is enforced by the launcher, the active-job
limit by the job store (atomically, with the new record), the rates by the routes.
"""

from __future__ import annotations

import inspect
import json
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from dlrl.config import JobSpec
from dlrl.sandbox import host_memory_mb
from dlrl.tasks import TASKS

SHIPPED_PROTOCOLS = Path(__file__).resolve().parents[2] / "deploy" / "eval"
"""The protocol files the package ships (deploy/eval/*.toml, their data in deploy/eval/data/)."""
BUILTIN_PREFIX = "builtin:"  # dlrl.models.loading's (not imported: it pulls in torch)

DEFAULT_LIMITS: dict[str, float] = {
    "train.steps": 10_000, "train.warmup_steps": 10_000, "train.n_mc": 64, "train.mc_chunk": 64,
    "train.micro_batch": 1024, "train.updates_per_batch": 16,
    "rollout.prompts_per_step": 256, "rollout.group_size": 64, "rollout.gen_length": 2048,
    "rollout.block_length": 2048, "rollout.steps": 2048, "rollout.batch_size": 1024, "rollout.num_workers": 8,
    "eval.every": 10_000, "eval.steps": 2048,
    "task.train_size": 1_000_000, "task.eval_size": 5_000,
    "model.lora.r": 1024,
    "queue.capacity": 10_000, "queue.maxlen": 1_000_000,
    "weights.bucket_mb": 4096,
    "runtime.num_cpus": 64, "runtime.threads": 64, "runtime.checkpoint_every": 10_000,
    "runtime.max_staleness": 8, "runtime.max_restarts": 10,
    "runtime.learner_ranks": 8, "runtime.learner_gpus": 8, "runtime.worker_gpus": 8,
}
"""Server-side upper bound of each size field (dotted path → max). A settings file may lower or
raise one; JobSpec's own `le=` bounds still hold."""

REQUIRED_FIELDS = ("model.path", "task.name", "train.steps", "rollout.prompts_per_step", "rollout.group_size",
                   "rollout.gen_length", "rollout.steps")
"""Fields a submission must give: they decide what runs and how big it is."""

SERVER_FIELDS = {"queue.redis_url": "the job gets the API's Redis from the server",
                 "runtime.ray_address": "the job runs on the API's Ray cluster"}
"""Fields only the server sets; a spec value (other than null) is refused."""

_BUILTIN = re.compile(r"builtin:[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")
_IMPORT_PATH = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")
_MODULE_PATTERN = re.compile(r"[A-Za-z0-9_.|]{1,512}")
"""LoRA targets over the API: names, "." and "|" only, so a regex target cannot backtrack
catastrophically (no quantifiers or groups)."""
_PATH_OPTION = re.compile(r"path|file|dir|root|folder", re.IGNORECASE)
"""Task option keys that name files (found anywhere in the key): their values must lie in the data root."""
MAX_OPTION_NUMBER = 1_000_000
MAX_OPTION_STRING = 4096
MAX_OPTION_ITEMS = 256
SPLITS = ("train", "test")
MAX_ADAPTER_DEPTH = 8
"""Adapters a model path may stack (an adapter whose base is an adapter ...) before the base model."""


class Unresolvable(ValueError):
    """A path that cannot be resolved; the message says why without naming any server path."""


def resolve(path: str | Path) -> Path:
    """`path` made absolute with every symlink and `..` resolved, once: admission checks this path,
    and the admitted spec carries it, so the job opens exactly what was checked. Any failure (a
    symlink loop, /proc/<pid>/cwd of another user's process, a name too long, a NUL) is
    Unresolvable, which admission turns into a 422."""
    try:
        return Path(path).expanduser().resolve()
    except RuntimeError:
        raise Unresolvable("cannot be resolved: a symlink loop") from None
    except OSError as exc:
        raise Unresolvable(f"cannot be resolved: {exc.strerror or 'not accessible'}") from None
    except ValueError:
        raise Unresolvable("cannot be resolved: not a valid path") from None


def within(real: Path, root: Path) -> bool:
    """Whether the resolved `real` is the resolved `root` or below it (no file system access)."""
    return real == root or root in real.parents


def _roots(folders: Any) -> list[Path]:
    """The operator's folders, resolved (one that cannot be resolved allows nothing)."""
    out = []
    for folder in folders:
        try:
            out.append(resolve(folder))
        except Unresolvable:
            continue
    return out


class AdmissionRefused(ValueError):
    """The spec asks for something the API does not allow; `errors` lists (field path, reason)."""

    def __init__(self, errors: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{p}: {r}" for p, r in errors))
        self.errors = errors


@dataclass(frozen=True)
class AdmissionPolicy:
    """The operator's choices (`[admission]` in the settings file, or `dlrl serve` flags)."""

    tasks: tuple[str, ...] = ()
    """Task names allowed besides the registry's, e.g. an import path "mypkg.tasks:factory" the
    operator vetted (the job may then import exactly these)."""
    models: tuple[str, ...] = ()
    """Hub ids that may be loaded ("org/name", or "org/*" for an organisation's models)."""
    model_roots: tuple[str, ...] = ()
    """Folders whose checkpoints may be loaded (a model path must resolve inside one)."""
    data_root: str | None = None
    """The folder task data files must lie in (None: options naming files are refused)."""
    allow_trust_remote_code: bool = False
    """Let specs set model.trust_remote_code=true (runs modeling code shipped with the weights)."""
    max_job_seconds: float | None = 24 * 3600.0
    """Wall-clock limit of one job: past it the job is stopped (None: no limit)."""
    limits: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_LIMITS))
    """Server-side upper bounds of size fields (see DEFAULT_LIMITS)."""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AdmissionPolicy":
        """From the settings file's [admission] table (or flags): unknown keys and limits are errors."""
        known = {f.name for f in fields(cls)}
        if unknown := sorted(set(data) - known):
            raise ValueError(f"unknown admission settings {unknown} (known: {sorted(known)})")
        values = dict(data)
        for key in ("tasks", "models", "model_roots"):
            if key in values:
                values[key] = tuple(str(v) for v in values[key])
        if "limits" in values:
            if unknown := sorted(set(values["limits"]) - set(DEFAULT_LIMITS)):
                raise ValueError(f"unknown limits {unknown} (known: {sorted(DEFAULT_LIMITS)})")
            values["limits"] = {**DEFAULT_LIMITS, **values["limits"]}
        if values.get("max_job_seconds") is not None and not values["max_job_seconds"] > 0:
            raise ValueError("max_job_seconds must be positive (or unset for no limit)")
        return cls(**values)

    @property
    def import_paths(self) -> tuple[str, ...]:
        """The operator-listed task names that are import paths (what a job may import)."""
        return tuple(t for t in self.tasks if ":" in t)


def admit(spec: JobSpec, policy: AdmissionPolicy) -> JobSpec:
    """The spec the job will run, or AdmissionRefused listing every rule it breaks.

    The returned spec differs from the submitted one only where the server decides: file options
    become absolute paths inside the data root, and built-in models load without remote code."""
    errors: list[tuple[str, str]] = []
    _required(spec, errors)
    for path, why in SERVER_FIELDS.items():
        if _get(spec, path) is not None:
            errors.append((path, f"set by the server, not the spec: {why}; leave it out"))
    _limits(spec, policy, errors)
    options = _task(spec, policy, errors)
    protocol = _eval_protocol(spec, policy, errors)
    model = _model(spec, policy, errors)
    if errors:
        raise AdmissionRefused(errors)
    task = spec.task.model_copy(update={"options": options})
    evaluation = spec.eval.model_copy(update={"protocol": protocol})
    return spec.model_copy(update={"task": task, "model": model, "eval": evaluation})


def _get(spec: JobSpec, path: str) -> Any:
    node: Any = spec
    for part in path.split("."):
        if node is None:
            return None
        node = getattr(node, part)
    return node


def _required(spec: JobSpec, errors: list[tuple[str, str]]) -> None:
    for path in REQUIRED_FIELDS:
        section, _, name = path.partition(".")
        if section not in spec.model_fields_set or name not in getattr(spec, section).model_fields_set:
            errors.append((path, "required over the API: what runs, and how big, is never a server default"))


def _limits(spec: JobSpec, policy: AdmissionPolicy, errors: list[tuple[str, str]]) -> None:
    for path, limit in policy.limits.items():
        value = _get(spec, path)
        if isinstance(value, (int, float)) and value > limit:  # None and "auto" (train.mc_chunk) have no size
            shown = int(limit) if float(limit).is_integer() else limit
            errors.append((path, f"{value} exceeds the API's limit of {shown}"))


def _task(spec: JobSpec, policy: AdmissionPolicy, errors: list[tuple[str, str]]) -> dict[str, Any]:
    name, options = spec.task.name, dict(spec.task.options)
    if name not in TASKS and name not in policy.tasks:
        kind = "an import path" if ":" in name else "not a registered task"
        errors.append(("task.name", f"{name!r} is {kind}: the API runs registered tasks only "
                                    f"({', '.join(sorted(TASKS))}) or those the operator lists"))
        return options
    if name in TASKS:  # the operator's import paths are not imported here: their options are theirs
        params = inspect.signature(TASKS[name]).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        for key in options:
            if key not in params and not takes_any:
                errors.append((f"task.options.{key}", f"not an option of task {name!r} "
                                                      f"(options: {', '.join(sorted(params))})"))
    for key, value in options.items():
        where = f"task.options.{key}"
        if (reason := _small_json(value)) is not None:
            errors.append((where, reason))
        elif key == "memory_mb" and isinstance(value, (int, float)) and value > host_memory_mb():
            errors.append((where, (f"{value} MiB exceeds this host's memory ({host_memory_mb()} MiB): "
                                   "all processes of a code run share that one cap")))
        elif _PATH_OPTION.search(key):
            checked = _data_path(value, policy, where, errors)
            if checked is not None:
                options[key] = checked
    return options


def _small_json(value: Any, depth: int = 0) -> str | None:
    """Why an option value is not a small JSON value (None if it is)."""
    if depth > 3:
        return "nested too deeply (at most 3 levels)"
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or abs(value) > MAX_OPTION_NUMBER:
            return f"numbers in task options must be finite and at most {MAX_OPTION_NUMBER:,} in size"
        return None
    if isinstance(value, str):
        return None if len(value) <= MAX_OPTION_STRING else f"strings are at most {MAX_OPTION_STRING} characters"
    if isinstance(value, (list, tuple, dict)):
        if len(value) > MAX_OPTION_ITEMS:
            return f"at most {MAX_OPTION_ITEMS} items"
        items = value.values() if isinstance(value, dict) else value
        if isinstance(value, dict) and not all(isinstance(k, str) for k in value):
            return "object keys must be strings"
        return next((r for r in (_small_json(v, depth + 1) for v in items) if r is not None), None)
    return f"not a JSON value ({type(value).__name__})"


def _data_path(value: Any, policy: AdmissionPolicy, where: str, errors: list[tuple[str, str]]) -> str | None:
    """The file option as a resolved absolute path inside the data root (a "{split}" kept), or None
    after an error. Relative paths are relative to the data root."""
    if not isinstance(value, str) or not value:
        errors.append((where, "a file option must be a non-empty string"))
        return None
    if policy.data_root is None:
        errors.append((where, "names a file, and this API has no data root (the operator sets data_root)"))
        return None
    roots = _roots([policy.data_root])
    if not roots:
        errors.append((where, "the API's data root cannot be resolved (the operator fixes data_root)"))
        return None
    root = roots[0]
    raw = Path(value).expanduser()
    full = raw if raw.is_absolute() else root / raw
    try:
        # Every file the task may open must be inside, whatever "{split}" becomes.
        candidates = [resolve(str(full).replace("{split}", s)) for s in SPLITS] + [resolve(full)]
        stored = resolve(full) if "{split}" not in full.name else resolve(full.parent) / full.name
    except Unresolvable as exc:
        errors.append((where, f"{value!r} {exc}"))
        return None
    if not all(within(c, root) for c in candidates):
        errors.append((where, f"{value!r} is outside the API's data root"))
        return None
    return str(stored)


def _eval_protocol(spec: JobSpec, policy: AdmissionPolicy, errors: list[tuple[str, str]]) -> str | None:
    """The protocol file, resolved, that the job will read (None: none). It must be a shipped
    protocol or lie in the data root, and the files it makes the job read must too. The API
    validates specs without reading files (dlrl.config.FILE_CHECKS), so the file is read here, only
    once its location is allowed, and checked against the job's task."""
    if spec.eval.protocol is None:
        return None
    # lazy: it pulls in the task registry
    from dlrl.eval_protocol import EvalProtocol, ProtocolError

    roots = _roots([SHIPPED_PROTOCOLS] + ([policy.data_root] if policy.data_root else []))
    shown = "deploy/eval/" + (" or the API's data root" if policy.data_root else " (this API has no data root)")
    given = spec.eval.protocol
    try:
        path = resolve(given)
    except Unresolvable as exc:
        errors.append(("eval.protocol", f"{given!r} {exc}"))
        return None
    if not any(within(path, r) for r in roots):
        errors.append(("eval.protocol", f"{given!r} is not a protocol file in {shown}"))
        return None
    try:
        protocol = EvalProtocol.from_toml(path)
        data = protocol.data_path()
    except ProtocolError as exc:
        errors.append(("eval.protocol", str(exc).replace(str(path), repr(given))))
        return None
    except (OSError, RuntimeError, ValueError):
        errors.append(("eval.protocol", f"{given!r}: its data.path cannot be resolved"))
        return None
    if protocol.task.name != spec.task.name:
        errors.append(("eval.protocol", f"written for task {protocol.task.name!r}, the job trains "
                                        f"task {spec.task.name!r}"))
    if data is not None and not any(within(data, r) for r in roots):
        errors.append(("eval.protocol", f"its data.path {protocol.data.path!r} is outside {shown}"))
    for key, value in protocol.task.options.items():
        if _PATH_OPTION.search(key):
            _data_path(value, policy, f"eval.protocol: task.options.{key}", errors)
    return str(path)


def _model(spec: JobSpec, policy: AdmissionPolicy, errors: list[tuple[str, str]]) -> Any:
    """The model section the job runs: a local model.path is replaced by the folder it resolves to."""
    model = spec.model
    try:
        path = _model_path(model.path, policy)
    except Unresolvable as exc:
        errors.append(("model.path", str(exc)))
        path = model.path
    if model.trust_remote_code and not policy.allow_trust_remote_code:
        errors.append(("model.trust_remote_code", "remote code is not allowed over the API (the operator "
                                                  "enables it with allow_trust_remote_code)"))
    targets = model.lora.target_modules if model.lora is not None else None
    names = [targets] if isinstance(targets, str) else targets or []
    for i, target in enumerate(names):
        if target != "all-linear" and not _MODULE_PATTERN.fullmatch(target):
            where = "model.lora.target_modules" + ("" if isinstance(targets, str) else f".{i}")
            errors.append((where, "module names may hold letters, digits, '_', '.' and '|' only over the API"))
    return model.model_copy(update={"path": path})


def _is_local(path: str) -> bool:
    return path.startswith(("/", ".", "~")) or "\\" in path


def _model_path(path: str, policy: AdmissionPolicy) -> str:
    """`path` as the job will load it (a local folder resolved), or Unresolvable saying why it may
    not be loaded. An adapter folder names its base model in adapter_config.json, and that base
    may be an adapter again: the chain is followed to its end (at most MAX_ADAPTER_DEPTH adapters,
    no folder twice), and every model on it obeys the same rule."""
    first = _model_hop(path, policy, None)
    seen: list[Path] = []
    current, name = first, path
    while current is not None:
        if current in seen:
            raise Unresolvable(f"{path!r}: its adapter chain comes back to {name!r} (a loop)")
        seen.append(current)
        if len(seen) > MAX_ADAPTER_DEPTH:
            raise Unresolvable(f"{path!r}: more than {MAX_ADAPTER_DEPTH} adapters stacked on each other")
        adapter = current / "adapter_config.json"
        try:
            if not adapter.is_file():
                break
            base = json.loads(adapter.read_text()).get("base_model_name_or_path")
        except (OSError, ValueError, AttributeError):
            raise Unresolvable(f"{name!r}: its adapter_config.json is unreadable") from None
        if not isinstance(base, str) or not base:
            raise Unresolvable(f"{name!r}: its adapter_config.json names no base model")
        current, name = _model_hop(base, policy, name), base
    return str(first) if first is not None else path


def _model_hop(path: str, policy: AdmissionPolicy, adapter_of: str | None) -> Path | None:
    """One model of a chain: None for a built-in or hub model that may be loaded, the resolved
    folder for a local one inside a model root; Unresolvable otherwise."""
    what = f"base model {path!r} of adapter {adapter_of!r}" if adapter_of else repr(path)
    if path.startswith(BUILTIN_PREFIX):
        if _BUILTIN.fullmatch(path):
            return None
        raise Unresolvable(f"{what}: a built-in name is letters, digits, '_' and '-'")
    if _is_local(path):
        if not Path(path).expanduser().is_absolute():
            raise Unresolvable(f"{what} is not inside a model folder the operator approved (give an absolute path)")
        try:
            folder = resolve(path)
        except Unresolvable as exc:
            raise Unresolvable(f"{what} {exc}") from None
        roots = _roots(policy.model_roots)
        if not any(within(folder, r) for r in roots):
            raise Unresolvable(f"{what} is not inside a model folder the operator approved"
                               + ("" if policy.model_roots else " (this API approves none)"))
        return folder
    if not _HUB_ID.fullmatch(path) or ".." in path:
        raise Unresolvable(f"{what} is neither builtin:<name>, an absolute folder path nor a hub id 'org/name'")
    org = path.split("/", 1)[0]
    if path in policy.models or f"{org}/*" in policy.models:
        return None
    raise Unresolvable(f"hub model {what} is not on the operator's list"
                       + ("" if policy.models else " (this API lists none)"))
