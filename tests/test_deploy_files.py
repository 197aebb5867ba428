"""Offline checks of the deployment files: docker-compose.yml, deploy/Dockerfile, .dockerignore,
.env.example, deploy/ray-cluster.yaml and deploy/kuberay/*.yaml.

Nothing here starts Docker, a cluster or touches the network. Each file is checked against the
schema its real consumer uses (the compose-spec JSON schema, Ray's cluster-config schema, the
KubeRay CRDs and Kubernetes' own schemas, vendored under tests/data/schemas/), then for what a
schema cannot say: ports bound to loopback, health checks and start order, no secret in a
committed file, every variable documented, one image with one Ray version everywhere, commands
that agree between compose, `ray up` and KubeRay. Every check is a function that returns the
problems it found, and the tests feed it broken copies too, so a check that can no longer fail
is itself a failing test.

    .venv/bin/python -m pytest -q tests/test_deploy_files.py
"""

from __future__ import annotations

import copy
import json
import posixpath
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any
from collections.abc import Callable

import jsonschema
import pytest
import yaml

import dlrl  # noqa: F401  (sets RAY_AUTH_MODE before anything imports ray)

REPO = Path(__file__).resolve().parents[1]
SCHEMAS = Path(__file__).resolve().parent / "data" / "schemas"
COMPOSE_FILE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / ".env.example"
DOCKERFILE = REPO / "deploy" / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
RAY_CLUSTER = REPO / "deploy" / "ray-cluster.yaml"
KUBERAY = REPO / "deploy" / "kuberay"

SERVICES = {"redis", "ray-head", "ray-worker", "api"}
DLRL_SERVICES = ("ray-head", "ray-worker", "api")  # the services that run the dlrl image
RAY_SERVICES = ("ray-head", "ray-worker", "api")  # every process that talks to the Ray cluster
SECRET_NAME = re.compile(r"TOKEN|PASSWORD|PASSWD|SECRET|CREDENTIAL|PRIVATE|API_KEY", re.I)


# --- compose interpolation (shared with tests/test_compose_smoke.py) ------------------------

_INTERPOLATION = re.compile(
    r"\$(?:(?P<escaped>\$)"
    r"|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<named>[A-Za-z_][A-Za-z0-9_]*)"
    r"|(?P<invalid>))"
)


def interpolate_string(text: str, env: dict[str, str]) -> str:
    """Compose's variable substitution in one string (compose-spec "Interpolation").

    `$$` is a literal `$`; `${VAR}` / `$VAR`; `${VAR:-default}` (unset or empty) and
    `${VAR-default}` (unset); `${VAR:?message}` / `${VAR?message}` fail; `${VAR:+alt}` /
    `${VAR+alt}` substitute `alt` when set. Nested substitutions are not used in this repository
    and are refused rather than half-handled.
    """

    def replace(m: re.Match) -> str:
        if m["escaped"]:
            return "$"
        if m["invalid"] is not None:
            raise ValueError(f"invalid interpolation format in {text!r}")
        name = m["braced"] or m["named"]
        op, arg = m["op"], m["arg"] or ""
        if "$" in arg:
            raise ValueError(f"nested interpolation in {text!r} is not supported")
        value = env.get(name)
        unset_or_empty = not value
        if op in (":-", "-"):
            return arg if (unset_or_empty if op == ":-" else value is None) else value
        if op in (":?", "?"):
            if unset_or_empty if op == ":?" else value is None:
                raise ValueError(f"required variable {name} is missing a value: {arg}")
            return value
        if op in (":+", "+"):
            return "" if (unset_or_empty if op == ":+" else value is None) else arg
        return value or ""

    return _INTERPOLATION.sub(replace, text)


def interpolate(node: Any, env: dict[str, str]) -> Any:
    """`interpolate_string` over every string value of a loaded YAML tree (keys stay as they are)."""
    if isinstance(node, str):
        return interpolate_string(node, env)
    if isinstance(node, dict):
        return {k: interpolate(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate(v, env) for v in node]
    return node


def referenced_variables(node: Any) -> set[str]:
    """Names of the variables a YAML tree interpolates (`$$` escapes are container-side)."""
    found: set[str] = set()
    if isinstance(node, str):
        for m in _INTERPOLATION.finditer(node):
            if not m["escaped"] and (m["braced"] or m["named"]):
                found.add(m["braced"] or m["named"])
    elif isinstance(node, dict):
        for v in node.values():
            found |= referenced_variables(v)
    elif isinstance(node, list):
        for v in node:
            found |= referenced_variables(v)
    return found


def env_example() -> dict[str, str]:
    """KEY=value lines of .env.example (comments and blank lines skipped); duplicates are errors."""
    entries: dict[str, str] = {}
    for number, line in enumerate(ENV_EXAMPLE.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ValueError(f".env.example:{number}: not KEY=value: {line!r}")
        if key in entries:
            raise ValueError(f".env.example:{number}: {key} twice")
        entries[key] = value
    return entries


def example_env(secrets: dict[str, str] | None = None) -> dict[str, str]:
    """The values `docker compose` would see with .env copied from .env.example and its empty
    secrets filled in (by `secrets`, else with a placeholder)."""
    env = env_example()
    for key, value in env.items():
        if not value:
            env[key] = (secrets or {}).get(key, f"placeholder-{key.lower()}")
    return env


def raw_compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def load_compose(env: dict[str, str] | None = None) -> dict:
    """docker-compose.yml as compose sees it: YAML anchors merged, variables interpolated."""
    return interpolate(raw_compose(), example_env() if env is None else env)


def command_argv(command: str | list[str]) -> list[str]:
    """A compose `command` as the argument vector the container runs."""
    return shlex.split(command) if isinstance(command, str) else list(command)


def service_secret_paths(service: dict) -> dict[str, str]:
    """Secret name -> the file it appears as inside the container (/run/secrets/<target>)."""
    paths = {}
    for entry in service.get("secrets", []):
        if isinstance(entry, str):
            paths[entry] = f"/run/secrets/{entry}"
        else:
            target = entry.get("target", entry["source"])
            paths[entry["source"]] = target if target.startswith("/") else f"/run/secrets/{target}"
    return paths


def published_ports(service: dict) -> list[dict]:
    """Published ports in long syntax (host_ip, published, target) whichever syntax was written."""
    out = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            out.append({"host_ip": port.get("host_ip", ""), "published": str(port.get("published", "")),
                        "target": str(port["target"])})
            continue
        spec = str(port).split("/")[0]
        parts = spec.rsplit(":", 2)
        if len(parts) == 3:
            host_ip, published, target = parts
        elif len(parts) == 2:
            host_ip, (published, target) = "", parts
        else:
            host_ip, published, target = "", "", parts[0]
        out.append({"host_ip": host_ip.strip("[]"), "published": published, "target": target})
    return out


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


# --- compose checks ---------------------------------------------------------------------------


def compose_schema_errors(doc: dict) -> list[str]:
    schema = json.loads((SCHEMAS / "compose-spec.json").read_text())
    validator = jsonschema.Draft7Validator(schema)
    return [f"{'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
            for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.path)))]


def compose_problems(doc: dict) -> list[str]:
    """What the compose schema cannot say about an interpolated compose file."""
    problems: list[str] = []
    services = doc.get("services", {})
    if set(services) != SERVICES:
        problems.append(f"services are {sorted(services)}, expected {sorted(SERVICES)}")
    for name, svc in services.items():
        hc = svc.get("healthcheck")
        if not hc or hc.get("disable") or not hc.get("test") or hc["test"] in ("NONE", ["NONE"]):
            problems.append(f"{name}: no healthcheck")
        for port in published_ports(svc):
            if port["host_ip"] != "127.0.0.1":
                problems.append(f"{name}: port {port['target']} is published on "
                                f"{port['host_ip'] or 'every interface'}, not 127.0.0.1")
        depends = svc.get("depends_on", {})
        if isinstance(depends, list):
            problems.append(f"{name}: depends_on without conditions (start order ignores health)")
            depends = {}
        for dep, cond in depends.items():
            if cond.get("condition") != "service_healthy":
                problems.append(f"{name}: depends_on {dep} is not condition: service_healthy")
            elif not services.get(dep, {}).get("healthcheck"):
                problems.append(f"{name}: waits for {dep} to be healthy but {dep} has no healthcheck")
        if "container_name" in svc:
            problems.append(f"{name}: container_name prevents --scale")
    expected_deps = {"ray-head": {"redis"}, "ray-worker": {"ray-head"}, "api": {"redis", "ray-head"}}
    for name, deps in expected_deps.items():
        have = set(services.get(name, {}).get("depends_on", {}) or ())
        if not deps <= have:
            problems.append(f"{name}: must wait for {sorted(deps - have)}")

    images = set()
    for name in DLRL_SERVICES:
        svc = services.get(name, {})
        build = svc.get("build")
        if not isinstance(build, dict) or build.get("dockerfile") != "deploy/Dockerfile" \
                or build.get("context") not in (".", "./"):
            problems.append(f"{name}: not built from deploy/Dockerfile with the repository as context")
        images.add(svc.get("image"))
    if len(images) != 1:
        problems.append(f"the dlrl services run different images: {sorted(map(str, images))}")

    worker = services.get("ray-worker", {})
    if worker.get("ports"):
        problems.append("ray-worker: publishes ports, so a second replica could not start (--scale)")
    devices = (worker.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", []))
    if not any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices):
        problems.append("ray-worker: no NVIDIA GPU reservation (deploy.resources.reservations.devices)")

    # One named volume for run directories, mounted at the same place by everything that
    # reads or writes runs (the driver on the head, the learner on a worker, the API).
    mounts: dict[str, set[str]] = {}
    for name in DLRL_SERVICES:
        for vol in services.get(name, {}).get("volumes", []):
            source, _, target = (vol.partition(":") if isinstance(vol, str)
                                 else (vol.get("source", ""), ":", vol.get("target", "")))
            target = target.split(":")[0]
            if source in (doc.get("volumes") or {}):
                mounts.setdefault(f"{source}:{target}", set()).add(name)
    if not any(users == set(DLRL_SERVICES) for users in mounts.values()):
        problems.append(f"no named volume is mounted at one path in all of {DLRL_SERVICES}: {mounts}")

    redis = services.get("redis", {})
    redis_cmd = " ".join(command_argv(redis.get("command", [])))
    for flag in ("--appendonly yes", "--requirepass"):
        if flag not in redis_cmd:
            problems.append(f"redis: command lacks {flag}")
    redis_test = " ".join(command_argv(redis.get("healthcheck", {}).get("test", [])))
    if "redis-cli" not in redis_test or "ping" not in redis_test or "REDIS_PASSWORD" not in redis_test:
        problems.append("redis: healthcheck is not `redis-cli ping` with the password")

    head = command_argv(services.get("ray-head", {}).get("command", []))
    if head[:4] != ["ray", "start", "--head", "--block"] or _flag(head, "--port") != "6385" \
            or _flag(head, "--dashboard-host") != "0.0.0.0":
        problems.append(f"ray-head: command is not `ray start --head --block --port 6385 "
                        f"--dashboard-host 0.0.0.0 ...`: {head}")
    wcmd = command_argv(worker.get("command", []))
    if wcmd[:2] != ["ray", "start"] or _flag(wcmd, "--address") != "ray-head:6385" or "--block" not in wcmd:
        problems.append(f"ray-worker: command is not `ray start --address ray-head:6385 --block`: {wcmd}")
    api = services.get("api", {})
    acmd = command_argv(api.get("command", []))
    if acmd[:2] != ["dlrl", "serve"] or _flag(acmd, "--host") != "0.0.0.0" or _flag(acmd, "--port") != "8000":
        problems.append(f"api: command is not `dlrl serve --host 0.0.0.0 --port 8000`: {acmd}")
    api_env = environment(api)
    if api_env.get("DLRL_RAY_ADDRESS") != "http://ray-head:8265":
        problems.append("api: DLRL_RAY_ADDRESS is not http://ray-head:8265")
    if not api_env.get("DLRL_REDIS_URL", "").startswith("redis://:"):
        problems.append("api: DLRL_REDIS_URL does not carry the Redis password")
    token_file = api_env.get("DLRL_API_TOKEN_FILE")
    if token_file and token_file not in service_secret_paths(api).values():
        problems.append(f"api: DLRL_API_TOKEN_FILE={token_file} is not a secret mounted in the container")
    if not token_file and not api_env.get("DLRL_API_TOKEN"):
        problems.append("api: no API token (DLRL_API_TOKEN or DLRL_API_TOKEN_FILE)")
    if api_env.get("DLRL_API_TOKEN_OPEN") or "--open" in acmd:
        problems.append("api: runs without a token")

    # Ray token auth: every process that talks to the cluster uses one token.
    token_sources = set()
    for name in RAY_SERVICES:
        svc = services.get(name, {})
        env = environment(svc)
        if env.get("RAY_AUTH_MODE") != "token":
            problems.append(f"{name}: RAY_AUTH_MODE is not token")
        path = env.get("RAY_AUTH_TOKEN_PATH")
        secrets = {p: s for s, p in service_secret_paths(svc).items()}
        if path in secrets:
            token_sources.add(("secret", secrets[path]))
        elif env.get("RAY_AUTH_TOKEN"):
            token_sources.add(("env", env["RAY_AUTH_TOKEN"]))
        else:
            problems.append(f"{name}: no Ray auth token (RAY_AUTH_TOKEN_PATH to a secret, or RAY_AUTH_TOKEN)")
    if len(token_sources) > 1:
        problems.append(f"the Ray services do not share one token: {sorted(token_sources)}")
    for kind, source in token_sources:
        if kind == "secret" and not (doc.get("secrets") or {}).get(source, {}).get("environment"):
            problems.append(f"secret {source} does not come from a variable of .env")
    return problems


def _flag(argv: list[str], flag: str) -> str | None:
    """The value of `--flag value` or `--flag=value` in an argument vector."""
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


_URL_PASSWORD = re.compile(r"://[^/@\s:]*:(?P<password>[^@\s]+)@")
_VARIABLE_ONLY = re.compile(r"^(\$\{[A-Za-z_][A-Za-z0-9_]*(:?[-?][^}]*)?\}|\$\$?[A-Za-z_][A-Za-z0-9_]*|\"\$\$?[A-Za-z_]\w*\")$")


def plaintext_secret_problems(raw: dict) -> list[str]:
    """Secrets written into the (raw, uninterpolated) compose file instead of taken from .env."""
    problems = []

    def value_ok(value: str) -> bool:
        return bool(referenced_variables(value)) or value.startswith("/run/secrets/") \
            or "$$" in value or value in ("", "token", "disabled")

    for name, svc in (raw.get("services") or {}).items():
        for key, value in environment(svc).items():
            if SECRET_NAME.search(key) and not value_ok(value):
                problems.append(f"{name}: {key} has a literal value")
        argvs = [command_argv(svc.get("command", [])), command_argv(svc.get("healthcheck", {}).get("test", [])),
                 list(environment(svc).values())]
        for argv in argvs:
            for s in argv:
                for m in _URL_PASSWORD.finditer(s):
                    if not referenced_variables(m["password"]) and "$$" not in m["password"]:
                        problems.append(f"{name}: a URL carries a literal password: {s}")
            # Words across the whole vector: `--requirepass` and its value may be two items or
            # two words of one `sh -c` string.
            words = [w for s in argv for w in s.split()]
            for flag in ("--requirepass", "-a", "--pass", "--password"):
                for i, w in enumerate(words[:-1]):
                    if w == flag and not _VARIABLE_ONLY.match(words[i + 1]):
                        problems.append(f"{name}: {flag} is given a literal: {' '.join(argv)}")
    for name, secret in (raw.get("secrets") or {}).items():
        if "file" in secret and not secret.get("file", "").startswith(("./secrets/", "${")):
            problems.append(f"secret {name}: file {secret['file']} is not outside the repository's files")
    return problems


def env_example_problems(raw: dict) -> list[str]:
    """Every variable compose reads is documented in .env.example, and no secret has a value there."""
    problems = []
    documented = env_example()
    used = referenced_variables(raw)
    used |= {s["environment"] for s in (raw.get("secrets") or {}).values() if "environment" in s}
    for var in sorted(used - set(documented)):
        problems.append(f"{var} is used by docker-compose.yml but missing from .env.example")
    for key, value in documented.items():
        if SECRET_NAME.search(key) and value:
            problems.append(f".env.example gives the secret {key} a value")
    return problems


# --- Dockerfile --------------------------------------------------------------------------------


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, backslash continuations joined."""
    out, pending = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # a comment line inside a continued instruction
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        op, _, args = full.partition(" ")
        out.append((op.upper(), args.strip()))
    return out


def dockerfile_args(instructions: list[tuple[str, str]]) -> dict[str, str]:
    args = {}
    for op, rest in instructions:
        if op == "ARG" and "=" in rest:
            key, value = rest.split("=", 1)
            args[key] = value
    return args


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore keeps `path` (relative, posix) out of the build context.

    The last matching pattern wins and `!` re-includes, as in Docker; a pattern also excludes
    everything under a matching folder.
    """
    excluded = False
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        regex = _glob_regex(pat.strip("/"))
        if any(re.fullmatch(regex, p) for p in prefixes):
            excluded = not negate
    return excluded


def _glob_regex(pattern: str) -> str:
    """A .dockerignore glob as a regex: `*` and `?` stay inside one path segment, `**` spans any."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return out


def dockerignore_patterns() -> list[str]:
    return [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
            if line.strip() and not line.strip().startswith("#")]


def dockerfile_problems(text: str) -> list[str]:
    problems = []
    instructions = dockerfile_instructions(text)
    args = dockerfile_args(instructions)
    froms = [rest for op, rest in instructions if op == "FROM"]
    if len(froms) != 1:
        problems.append(f"expected one FROM, found {len(froms)}")
    base = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m[1], m[0]), froms[0] if froms else "")
    if not re.match(r"nvidia/cuda:[\w.-]*runtime", base):
        problems.append(f"base image {base!r} is not an nvidia/cuda runtime image")
    runs = [rest for op, rest in instructions if op == "RUN"]
    joined = "\n".join(runs)
    if "python3.11" not in joined:
        problems.append("Python 3.11 is not installed")
    torch_at = next((i for i, r in enumerate(runs) if re.search(r"pip install [\"']?torch==", r)), None)
    project_at = next((i for i, r in enumerate(runs) if re.search(r"pip install\b[^\n]*\s\.(\s|$)", r)), None)
    if torch_at is None:
        problems.append("torch is not installed with a pinned version")
    if project_at is None:
        problems.append("the project (.) is not installed")
    if torch_at is not None and project_at is not None:
        if torch_at > project_at:
            problems.append("torch is installed after the project (it must be pinned first)")
        if "-c " not in runs[project_at] or "torch==" not in runs[torch_at]:
            problems.append("the project install does not use the torch constraint")
    users = [rest for op, rest in instructions if op == "USER"]
    if not users or users[-1].split(":")[0] in ("root", "0"):
        problems.append("the image does not end as a non-root USER")
    for op, rest in instructions:
        if op in ("ENV", "ARG"):
            for key in re.findall(r"(\w+)=", rest) or [rest.split()[0]]:
                if SECRET_NAME.search(key):
                    problems.append(f"{op} {key}: secrets do not belong in the image")
    patterns = dockerignore_patterns()
    for op, rest in instructions:
        if op == "COPY" and "--from" not in rest:
            *sources, _dest = shlex.split(rest)
            for src in sources:
                if not (REPO / src).exists():
                    problems.append(f"COPY {src}: no such path in the repository")
                elif dockerignore_excludes(src.rstrip("/"), patterns):
                    problems.append(f"COPY {src}: excluded by .dockerignore")
    for private in (".env", ".venv", ".git", "runs"):
        if not dockerignore_excludes(private, patterns):
            problems.append(f".dockerignore lets {private} into the build context")
    return problems + shipped_protocol_problems(instructions)


def shipped_protocol_problems(instructions: list[tuple[str, str]]) -> list[str]:
    """The image must carry deploy/eval/ (the shipped eval protocols and their pinned data) where
    the installed packages look for it: beside them, at <checkout>/deploy/eval/ (dlrl.config.CHECKOUT,
    services.api.admission.SHIPPED_PROTOCOLS). So: the project installed editable (--no-deps, the
    source install) from a folder, and deploy/eval/ copied into that folder. The image once left
    deploy/eval/ out, and `eval.protocol = "deploy/eval/..."` failed in it."""
    workdir, eval_at, install = "/", None, None
    for op, rest in instructions:
        if op == "WORKDIR":
            workdir = posixpath.normpath(posixpath.join(workdir, rest))
        elif op == "COPY" and "--from" not in rest:
            *sources, dest = shlex.split(rest)
            target = posixpath.normpath(posixpath.join(workdir, dest))
            for src in (x.rstrip("/") or "." for x in sources):
                found = {"deploy/eval": target, "deploy": target + "/eval", ".": target + "/deploy/eval"}.get(src)
                eval_at = found or eval_at
        elif op == "RUN" and re.search(r"pip install\b[^\n]*--no-deps[^\n]*\s\.(\s|$)", rest):
            install = (workdir, bool(re.search(r"\s(-e|--editable)\s+\.(\s|$)", rest)))
    if eval_at is None:
        return ["deploy/eval (the shipped eval protocols) is not copied into the image"]
    if install is None or not install[1]:
        return ["the project is not installed editable (pip install --no-deps -e .): its packages would "
                "look for deploy/eval/ in site-packages"]
    if eval_at != posixpath.join(install[0], "deploy/eval"):
        return [f"deploy/eval is copied to {eval_at}, but the packages installed from {install[0]} look in "
                f"{posixpath.join(install[0], 'deploy/eval')}"]
    return []


# --- Kubernetes / KubeRay ------------------------------------------------------------------------


def closed(schema: Any) -> Any:
    """A CRD schema with unknown fields forbidden, as `kubectl apply --validate=strict` does.

    Objects that list `properties` and do not opt out with x-kubernetes-preserve-unknown-fields
    get `additionalProperties: false`.
    """
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out \
            and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def _load_schema(path: Path) -> dict:
    return json.loads(path.read_text())


def kubernetes_validators() -> dict[tuple[str, str], Callable[[dict], list[str]]]:
    """(apiVersion, kind) -> a function returning the schema errors of one manifest."""
    k8s = SCHEMAS / "kubernetes-v1.33.0"
    kuberay = SCHEMAS / "kuberay-v1.7.0"
    meta = jsonschema.Draft202012Validator(_load_schema(k8s / "objectmeta-meta-v1.json"))

    def strict(schema: dict) -> Callable[[dict], list[str]]:
        validator = jsonschema.Draft202012Validator(schema)
        return lambda doc: [f"{'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
                            for e in validator.iter_errors(doc)]

    def crd(schema: dict) -> Callable[[dict], list[str]]:
        body = strict(closed(schema))
        return lambda doc: body(doc) + [f"metadata/{'/'.join(map(str, e.absolute_path))}: {e.message}"
                                        for e in meta.iter_errors(doc.get("metadata", {}))]

    return {
        ("v1", "ConfigMap"): strict(_load_schema(k8s / "configmap-v1.json")),
        ("v1", "Service"): strict(_load_schema(k8s / "service-v1.json")),
        ("v1", "PersistentVolumeClaim"): strict(_load_schema(k8s / "persistentvolumeclaim-v1.json")),
        ("ray.io/v1", "RayCluster"): crd(_load_schema(kuberay / "raycluster-v1.json")),
        ("ray.io/v1", "RayJob"): crd(_load_schema(kuberay / "rayjob-v1.json")),
    }


def kuberay_documents() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(KUBERAY.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((path.name, doc))
    return docs


def kubernetes_schema_problems(docs: list[tuple[str, dict]]) -> list[str]:
    validators = kubernetes_validators()
    problems = []
    for filename, doc in docs:
        key = (doc.get("apiVersion"), doc.get("kind"))
        name = doc.get("metadata", {}).get("name")
        where = f"{filename}: {key[1]} {name}"
        if key not in validators:
            problems.append(f"{where}: no vendored schema for {key}")
            continue
        problems += [f"{where}: {err}" for err in validators[key](doc)]
        if not name or not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", name):
            problems.append(f"{where}: metadata.name is not a DNS-1123 label")
    return problems


def _cluster_specs(docs: list[tuple[str, dict]]) -> list[tuple[str, dict]]:
    """(where, RayClusterSpec) of every RayCluster and of every RayJob's own cluster."""
    specs = []
    for filename, doc in docs:
        if doc.get("kind") == "RayCluster":
            specs.append((f"{filename}: RayCluster {doc['metadata']['name']}", doc["spec"]))
        elif doc.get("kind") == "RayJob" and "rayClusterSpec" in doc["spec"]:
            specs.append((f"{filename}: RayJob {doc['metadata']['name']}", doc["spec"]["rayClusterSpec"]))
    return specs


def _containers(pod_template: dict) -> list[dict]:
    return pod_template.get("spec", {}).get("containers", [])


def kuberay_problems(docs: list[tuple[str, dict]], ray_version: str, image_tag: str) -> list[str]:
    """What the CRD schemas cannot say: auth, versions, GPUs, volumes and the job spec."""
    problems = []
    by_kind: dict[str, dict[str, dict]] = {}
    for _, doc in docs:
        by_kind.setdefault(doc["kind"], {})[doc["metadata"]["name"]] = doc
    if "Secret" in by_kind:
        problems.append("a Secret manifest is committed; create it with kubectl (deploy/README.md)")
    for kind in ("RayCluster", "RayJob", "ConfigMap", "PersistentVolumeClaim", "Service"):
        if kind not in by_kind:
            problems.append(f"no {kind} in deploy/kuberay/")
    pvcs = by_kind.get("PersistentVolumeClaim", {})
    for name, pvc in pvcs.items():
        if "ReadWriteMany" not in pvc["spec"].get("accessModes", []):
            problems.append(f"PersistentVolumeClaim {name}: head and workers share it, it must be ReadWriteMany")

    for where, spec in _cluster_specs(docs):
        auth = spec.get("authOptions", {})
        if auth.get("mode", "token") != "token" or not auth.get("secretName"):
            problems.append(f"{where}: Ray token auth is not on with a named Secret (authOptions)")
        if spec.get("rayVersion") != ray_version:
            problems.append(f"{where}: rayVersion {spec.get('rayVersion')} is not the image's Ray {ray_version}")
        head = spec["headGroupSpec"]
        groups = [("head", head)] + [(g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]
        for group, g in groups:
            for c in _containers(g["template"]):
                if not c.get("image", "").endswith(":" + image_tag):
                    problems.append(f"{where}: {group} image {c.get('image')} is not tagged {image_tag}")
                mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
                claim = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName")
                         for v in g["template"]["spec"].get("volumes", [])}
                if claim.get(mounts.get("/workspace/runs")) not in pvcs:
                    problems.append(f"{where}: {group} does not mount a shared PVC at /workspace/runs")
            sec = g["template"]["spec"].get("securityContext", {})
            if not sec.get("runAsNonRoot"):
                problems.append(f"{where}: {group} pods may run as root")
        if head.get("rayStartParams", {}).get("dashboard-host") != "0.0.0.0":
            problems.append(f"{where}: the dashboard does not listen on the pod network")
        if not any(p.get("containerPort") == 8265 for c in _containers(head["template"]) for p in c.get("ports", [])):
            problems.append(f"{where}: head does not expose the dashboard port 8265")
        gpus = [c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
                for g in spec.get("workerGroupSpecs", []) for c in _containers(g["template"])]
        if not gpus or not all(gpus):
            problems.append(f"{where}: a worker group does not request nvidia.com/gpu")

    clusters = by_kind.get("RayCluster", {})
    for name, svc in by_kind.get("Service", {}).items():
        sel = svc["spec"].get("selector", {})
        if sel.get("ray.io/cluster") not in clusters or sel.get("ray.io/node-type") != "head":
            problems.append(f"Service {name}: does not select the head pod of a RayCluster here")
        if svc["spec"].get("type", "ClusterIP") != "ClusterIP":
            problems.append(f"Service {name}: exposes the dashboard beyond the cluster")

    configmaps = by_kind.get("ConfigMap", {})
    for name, job in by_kind.get("RayJob", {}).items():
        problems += rayjob_spec_problems(name, job, configmaps)
    return problems


def rayjob_spec_problems(name: str, job: dict, configmaps: dict[str, dict]) -> list[str]:
    """The RayJob runs `dlrl train <spec>` on a spec mounted from a ConfigMap here, that spec is
    deploy/jobs/<file> verbatim, and it validates (with the entrypoint's --set overrides)."""
    from services.cli import load_spec

    argv = shlex.split(job["spec"].get("entrypoint", ""))
    if argv[:2] != ["dlrl", "train"] or len(argv) < 3:
        return [f"RayJob {name}: entrypoint is not `dlrl train <spec>`: {argv}"]
    spec_path = Path(argv[2])
    overrides = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--set"]
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]
    volumes = {v["name"]: v for v in head["spec"].get("volumes", [])}
    for container in _containers(head):
        for mount in container.get("volumeMounts", []):
            if spec_path.parent != Path(mount["mountPath"]):
                continue
            cm_name = volumes[mount["name"]].get("configMap", {}).get("name")
            cm = configmaps.get(cm_name)
            if cm is None:
                return [f"RayJob {name}: {spec_path} comes from ConfigMap {cm_name}, not in deploy/kuberay/"]
            text = cm.get("data", {}).get(spec_path.name)
            if text is None:
                return [f"RayJob {name}: ConfigMap {cm_name} has no key {spec_path.name}"]
            source = REPO / "deploy" / "jobs" / spec_path.name
            if not source.exists() or source.read_text() != text:
                return [f"RayJob {name}: ConfigMap {cm_name} is not deploy/jobs/{spec_path.name} verbatim"]
            load_spec(str(source), overrides)  # raises on an invalid spec or override
            return []
    return [f"RayJob {name}: {spec_path} is not on a volume mounted in the head container"]


# --- the tests ---------------------------------------------------------------------------------


def project_version() -> str:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def test_interpolation_follows_the_compose_spec():
    env = {"SET": "v", "EMPTY": ""}
    cases = {
        "$$SET": "$SET", "${SET}": "v", "$SET/x": "v/x", "${UNSET}": "", "${EMPTY:-d}": "d",
        "${EMPTY-d}": "", "${UNSET-d}": "d", "${SET:+alt}": "alt", "${EMPTY:+alt}": "",
        "${EMPTY+alt}": "alt", "a$${SET}b": "a${SET}b",
    }
    for text, expected in cases.items():
        assert interpolate_string(text, env) == expected, text
    for bad in ("${UNSET:?needed}", "${EMPTY:?needed}", "${UNSET?needed}", "cost $5", "${A:-${B}}"):
        with pytest.raises(ValueError):
            interpolate_string(bad, env)
    assert interpolate_string("${EMPTY?needed}", env) == ""


def test_compose_matches_the_compose_spec_schema():
    doc = load_compose()
    assert compose_schema_errors(doc) == []
    # The schema is closed: a misspelt key or a wrong enum is an error, as in `docker compose config`.
    broken = copy.deepcopy(doc)
    broken["services"]["api"]["healthcheck"]["retires"] = 3
    broken["services"]["ray-worker"]["depends_on"]["ray-head"]["condition"] = "service_healty"
    errors = compose_schema_errors(broken)
    assert any("retires" in e for e in errors) and any("service_healty" in e for e in errors), errors


def test_compose_refuses_to_start_without_the_redis_password():
    env = example_env()
    env["REDIS_PASSWORD"] = ""
    with pytest.raises(ValueError, match="REDIS_PASSWORD"):
        load_compose(env)


def test_compose_semantics():
    assert compose_problems(load_compose()) == []


@pytest.mark.parametrize("mutation, expected", [
    (lambda d: d["services"]["api"].update(ports=["8000:8000"]), "every interface"),
    (lambda d: d["services"]["ray-head"].update(ports=["0.0.0.0:8265:8265"]), "0.0.0.0"),
    (lambda d: d["services"]["ray-worker"].pop("healthcheck"), "ray-worker: no healthcheck"),
    (lambda d: d["services"]["api"].update(depends_on=["redis", "ray-head"]), "without conditions"),
    (lambda d: d["services"]["ray-worker"]["depends_on"]["ray-head"].update(condition="service_started"),
     "not condition: service_healthy"),
    (lambda d: d["services"]["ray-worker"].update(container_name="worker"), "--scale"),
    (lambda d: d["services"]["ray-worker"].update(ports=["127.0.0.1:52365:52365"]), "--scale"),
    (lambda d: d["services"]["ray-worker"].pop("deploy"), "GPU reservation"),
    (lambda d: d["services"]["api"]["build"].update(dockerfile="Dockerfile"), "deploy/Dockerfile"),
    (lambda d: d["services"]["api"].update(volumes=[]), "named volume"),
    (lambda d: d["services"]["redis"].update(command=["redis-server"]), "--appendonly"),
    (lambda d: d["services"]["ray-worker"]["environment"].pop("RAY_AUTH_MODE"), "RAY_AUTH_MODE"),
    (lambda d: d["services"]["api"]["environment"].update(RAY_AUTH_TOKEN_PATH="/elsewhere"), "Ray auth token"),
    (lambda d: d["services"]["api"]["environment"].update(DLRL_RAY_ADDRESS="http://localhost:8265"),
     "DLRL_RAY_ADDRESS"),
    (lambda d: d["services"]["ray-head"].update(command=["ray", "start", "--head"]), "ray-head: command"),
])
def test_compose_checks_catch_broken_files(mutation, expected):
    doc = load_compose()
    mutation(doc)
    problems = compose_problems(doc)
    assert any(expected in p for p in problems), problems


def test_no_plaintext_secrets_in_compose():
    raw = raw_compose()
    assert plaintext_secret_problems(raw) == []
    leaky = copy.deepcopy(raw)
    leaky["services"]["api"]["environment"]["DLRL_API_TOKEN"] = "s3cr3t-token"
    leaky["services"]["ray-head"]["environment"]["DLRL_REDIS_URL"] = "redis://:hunter2@redis:6379/0"
    leaky["services"]["redis"]["command"] = ["redis-server", "--requirepass", "hunter2"]
    problems = plaintext_secret_problems(leaky)
    assert len(problems) == 3, problems


def test_every_compose_variable_is_in_env_example_without_secret_values():
    raw = raw_compose()
    assert env_example_problems(raw) == []
    assert {"DLRL_API_TOKEN", "REDIS_PASSWORD", "RAY_AUTH_TOKEN"} <= set(env_example())
    raw["services"]["api"]["environment"]["DLRL_NEW_SETTING"] = "${DLRL_UNDOCUMENTED}"
    assert any("DLRL_UNDOCUMENTED" in p for p in env_example_problems(raw))


def test_dockerfile():
    assert dockerfile_problems(DOCKERFILE.read_text()) == []
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    workdirs = [rest for op, rest in instructions if op == "WORKDIR"]
    compose = load_compose()
    mounts = {v.split(":")[0]: v.split(":")[1] for n in DLRL_SERVICES for v in compose["services"][n]["volumes"]}
    # The shared run volume is the `runs` folder of the working directory: relative out_dir
    # "runs" (the JobSpec default) lands on it in every service.
    assert mounts["dlrl-runs"] == workdirs[-1] + "/runs"
    # A fresh named volume takes the owner of the image folder it is mounted on: every mount
    # point must be created (and handed to the unprivileged user) by the image.
    env: dict[str, str] = {}
    for op, rest in instructions:
        if op == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                env[key] = value
    created = " ".join(re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m[1], m[0]), rest).replace('"', "")
                       for op, rest in instructions if op == "RUN" and "mkdir" in rest and "chown" in rest)
    for volume, target in mounts.items():
        assert target in created.split(), f"{volume}: mount point {target} is not created by the image"
    exposed = {p for op, rest in instructions if op == "EXPOSE" for p in rest.split()}
    for name in DLRL_SERVICES:
        assert set(map(str, compose["services"][name].get("expose", []))) <= exposed, name


@pytest.mark.parametrize("edit, expected", [
    (lambda t: t.replace("USER dlrl", "USER root"), "non-root USER"),
    (lambda t: t.replace("ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04",
                         "ARG CUDA_IMAGE=python:3.11-slim"), "nvidia/cuda"),
    (lambda t: t.replace('-c /opt/dlrl/constraints.txt . \\\n && pip uninstall', '. \\\n && pip uninstall'),
     "torch constraint"),
    (lambda t: t.replace("COPY services ./services", "COPY services ./services\nCOPY bench ./bench"),
     "excluded by .dockerignore"),
    (lambda t: t.replace("ARG DLRL_UID=1000", "ARG DLRL_UID=1000\nENV DLRL_API_TOKEN=abc"), "secrets"),
    # the image before issue 21: no deploy/eval/, installed into site-packages
    (lambda t: t.replace("COPY deploy/eval ./deploy/eval\n", ""), "deploy/eval (the shipped eval protocols) is not"),
    (lambda t: t.replace("constraints.txt -e . \\", "constraints.txt . \\"), "not installed editable"),
    (lambda t: t.replace("COPY deploy/eval ./deploy/eval", "COPY deploy/eval /opt/dlrl/eval"), "look in /opt/dlrl/src"),
])
def test_dockerfile_checks_catch_broken_files(edit, expected):
    text = DOCKERFILE.read_text()
    edited = edit(text)
    assert edited != text, "the edit no longer applies to deploy/Dockerfile"
    problems = dockerfile_problems(edited)
    assert any(expected in p for p in problems), problems


def test_dockerignore_matching():
    patterns = [".env", ".env.*", "!.env.example", "**/__pycache__", "runs", "*.egg-info"]
    assert dockerignore_excludes(".env", patterns)
    assert dockerignore_excludes(".env.local", patterns)
    assert not dockerignore_excludes(".env.example", patterns)
    assert dockerignore_excludes("dlrl/models/__pycache__/x.pyc", patterns)
    assert dockerignore_excludes("runs/job/metrics.jsonl", patterns)
    assert dockerignore_excludes("dlrl.egg-info", patterns)
    assert not dockerignore_excludes("dlrl/assets/tiny-sudoku/model.safetensors", patterns)
    assert not dockerignore_excludes("services", patterns)


def test_dockerignore_keeps_wheels_out():
    """A wheel lying in the checkout (one once did, at 10 MB) never reaches the image."""
    patterns = dockerignore_patterns()
    assert dockerignore_excludes("ruff-0.17.6-py3-none-any.whl", patterns)
    assert dockerignore_excludes("deploy/wheels/torch-2.13.0-cp312-linux_x86_64.whl", patterns)


def test_one_ray_version_everywhere():
    import ray

    args = dockerfile_args(dockerfile_instructions(DOCKERFILE.read_text()))
    assert args["RAY_VERSION"] == ray.__version__
    for where, spec in _cluster_specs(kuberay_documents()):
        assert spec["rayVersion"] == ray.__version__, where


def test_image_tags_follow_the_project_version():
    version = project_version()
    assert load_compose()["services"]["api"]["image"].endswith(":" + version)
    assert yaml.safe_load(RAY_CLUSTER.read_text())["docker"]["image"].endswith(":" + version)


def test_ray_cluster_yaml_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(RAY_CLUSTER.read_text())
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.Draft7Validator(schema).validate(config)
    # What `ray up` does before it calls the cloud: fill in the provider defaults, then validate.
    validate_config(prepare_config(copy.deepcopy(config)))
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu-worker"]["node_confg"] = {}
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))


def test_ray_cluster_yaml_starts_ray_like_compose():
    config = yaml.safe_load(RAY_CLUSTER.read_text())
    compose = load_compose()

    def flags(argv: list[str]) -> dict[str, str | None]:
        out: dict[str, str | None] = {}
        i = 0
        while i < len(argv):
            arg = argv[i]
            if "=" in arg:
                key, value = arg.split("=", 1)
                out[key] = value
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                out[arg], i = argv[i + 1], i + 1
            else:
                out[arg] = None
            i += 1
        return out

    def start_command(commands: list[str]) -> list[str]:
        starts = [shlex.split(c) for c in commands if "ray start" in c]
        assert len(starts) == 1, commands
        return starts[0][2:]

    head_up = flags(start_command(config["head_start_ray_commands"]))
    head_compose = flags(command_argv(compose["services"]["ray-head"]["command"])[2:])
    # `ray up` commands must return (no --block) and add the autoscaler's config.
    head_up.pop("--autoscaling-config")
    head_compose.pop("--block")
    assert head_up == head_compose

    worker_up = flags(start_command(config["worker_start_ray_commands"]))
    worker_compose = flags(command_argv(compose["services"]["ray-worker"]["command"])[2:])
    worker_compose.pop("--block")
    assert worker_up.pop("--address") == "$RAY_HEAD_IP:6385"
    assert worker_compose.pop("--address") == "ray-head:6385"
    assert worker_up == worker_compose

    assert "--env=RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    assert config["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    assert any(o.endswith(":/workspace/runs") for o in config["docker"]["run_options"])


def test_vendored_schemas_are_self_contained():
    """Every local $ref of a vendored schema resolves inside its own file (vendor.py's job)."""
    for path in SCHEMAS.rglob("*.json"):
        schema = _load_schema(path)
        refs: list[str] = []

        def walk(node: Any) -> None:
            if isinstance(node, dict):
                if isinstance(node.get("$ref"), str):
                    refs.append(node["$ref"])
                for v in node.values():
                    walk(v)
            elif isinstance(node, list):
                for v in node:
                    walk(v)

        walk(schema)
        for ref in refs:
            assert ref.startswith("#/"), f"{path.name}: external $ref {ref}"
            node = schema
            for part in ref[2:].split("/"):
                node = node[part.replace("~1", "/").replace("~0", "~")]


def test_kuberay_manifests_match_kubernetes_schemas():
    docs = kuberay_documents()
    assert kubernetes_schema_problems(docs) == []


@pytest.mark.parametrize("edit, expected", [
    (lambda d: d["spec"]["headGroupSpec"].update(rayStartParam={}), "rayStartParam"),
    (lambda d: d["spec"]["workerGroupSpecs"][0].update(replicas="one"), "replicas"),
    (lambda d: d["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"][0].update(
        containerPort="eighty"), "eighty"),
    (lambda d: d["metadata"].update(labels={"app": 3}), "metadata/labels/app"),
    (lambda d: d.update(kind="RayClustr"), "no vendored schema"),
])
def test_kubernetes_schema_checks_catch_broken_manifests(edit, expected):
    docs = kuberay_documents()
    index = next(i for i, (_, d) in enumerate(docs) if d["kind"] == "RayCluster")
    filename, doc = docs[index]
    doc = copy.deepcopy(doc)
    edit(doc)
    problems = kubernetes_schema_problems([(filename, doc)])
    assert any(expected in p for p in problems), problems


def test_kuberay_semantics():
    import ray

    docs = kuberay_documents()
    assert kuberay_problems(docs, ray.__version__, project_version()) == []


@pytest.mark.parametrize("kind, edit, expected", [
    ("RayCluster", lambda d: d["spec"].pop("authOptions"), "token auth"),
    ("RayCluster", lambda d: d["spec"].update(rayVersion="2.9.0"), "rayVersion"),
    ("RayCluster", lambda d: d["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]
     ["limits"].pop("nvidia.com/gpu"), "nvidia.com/gpu"),
    ("RayJob", lambda d: d["spec"].update(entrypoint="python train.py"), "dlrl train"),
    ("RayJob", lambda d: d["spec"].update(entrypoint="dlrl train /etc/dlrl/jobs/other.toml"), "no key other.toml"),
    ("RayJob", lambda d: d["spec"].update(entrypoint="dlrl train /opt/spec.toml"), "not on a volume"),
    ("ConfigMap", lambda d: d["data"].update({"llada-gsm8k.toml": d["data"]["llada-gsm8k.toml"] + "# edit\n"}),
     "verbatim"),
    ("Service", lambda d: d["spec"].update(type="LoadBalancer"), "beyond the cluster"),
    ("PersistentVolumeClaim", lambda d: d["spec"].update(accessModes=["ReadWriteOnce"]), "ReadWriteMany"),
])
def test_kuberay_checks_catch_broken_manifests(kind, edit, expected):
    import ray

    docs = copy.deepcopy(kuberay_documents())
    doc = next(d for _, d in docs if d["kind"] == kind)
    edit(doc)
    problems = kuberay_problems(docs, ray.__version__, project_version())
    assert any(expected in p for p in problems), problems


def test_rayjob_spec_override_is_validated():
    from pydantic import ValidationError

    docs = copy.deepcopy(kuberay_documents())
    job = next(d for _, d in docs if d["kind"] == "RayJob")
    configmaps = {d["metadata"]["name"]: d for _, d in docs if d["kind"] == "ConfigMap"}
    job["spec"]["entrypoint"] += " --set train.n_mc=0"
    with pytest.raises(ValidationError):
        rayjob_spec_problems("x", job, configmaps)
