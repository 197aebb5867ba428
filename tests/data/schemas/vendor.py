"""Regenerate the vendored schemas in this folder from their upstream files (see README.md).

The deployment tests validate docker-compose.yml and deploy/kuberay/ offline, so the schemas live
here. This script is the whole transformation from the upstream files, so an update is a re-run:

    python tests/data/schemas/vendor.py \
        --compose-spec compose-spec/schema/compose-spec.json \
        --kuberay-crds kuberay/ray-operator/config/crd/bases \
        --kubernetes kubernetes_validate/kubernetes-json-schema/v1.33.0-local-strict

- compose-spec.json is copied byte for byte.
- KubeRay: the `v1` openAPIV3Schema of each CRD, unchanged, written as JSON.
- Kubernetes: each kind's strict schema with the definitions it reaches copied into its own
  `$defs` (the upstream files point into a shared 1.4 MB _definitions.json).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
KUBERAY_CRDS = {"raycluster": "ray.io_rayclusters.yaml", "rayjob": "ray.io_rayjobs.yaml"}
KUBERNETES_KINDS = ["configmap-v1", "service-v1", "persistentvolumeclaim-v1", "objectmeta-meta-v1"]
# The kind files point into _definitions.json, whose own entries point within it.
DEFS_PREFIXES = ("/api/_definitions.json#/$defs/", "#/$defs/")


def crd_schema(crd_file: Path, version: str = "v1") -> dict:
    """The openAPIV3Schema of one version of a CustomResourceDefinition."""
    crd = yaml.safe_load(crd_file.read_text())
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            return v["schema"]["openAPIV3Schema"]
    raise KeyError(f"{crd_file}: no version {version}")


def standalone(root: dict, definitions: dict) -> dict:
    """`root` with every definition it reaches (transitively) under its own `$defs`."""
    needed: dict[str, dict] = {}

    def rewrite(node):
        if isinstance(node, dict):
            out = {}
            for key, value in node.items():
                if key == "$ref" and isinstance(value, str) and value.startswith(DEFS_PREFIXES):
                    name = value.split("#/$defs/", 1)[1]
                    if name not in needed:
                        needed[name] = {}  # reserve before recursing: definitions are cyclic
                        needed[name] = rewrite(definitions[name])
                    out[key] = "#/$defs/" + name
                else:
                    out[key] = rewrite(value)
            return out
        if isinstance(node, list):
            return [rewrite(item) for item in node]
        return node

    schema = rewrite(root)
    schema["$defs"] = dict(sorted(needed.items()))
    return schema


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compose-spec", type=Path, required=True)
    parser.add_argument("--kuberay-crds", type=Path, required=True)
    parser.add_argument("--kuberay-version", default="v1.7.0")
    parser.add_argument("--kubernetes", type=Path, required=True)
    parser.add_argument("--kubernetes-version", default="v1.33.0")
    args = parser.parse_args()

    shutil.copyfile(args.compose_spec, HERE / "compose-spec.json")

    out = HERE / f"kuberay-{args.kuberay_version}"
    out.mkdir(exist_ok=True)
    for name, filename in KUBERAY_CRDS.items():
        schema = crd_schema(args.kuberay_crds / filename)
        (out / f"{name}-v1.json").write_text(json.dumps(schema, separators=(",", ":")) + "\n")

    out = HERE / f"kubernetes-{args.kubernetes_version}"
    out.mkdir(exist_ok=True)
    definitions = json.loads((args.kubernetes / "_definitions.json").read_text())["$defs"]
    for kind in KUBERNETES_KINDS:
        root = json.loads((args.kubernetes / f"{kind}.json").read_text())
        schema = standalone(root, definitions)
        (out / f"{kind}.json").write_text(json.dumps(schema, separators=(",", ":")) + "\n")


if __name__ == "__main__":
    main()
