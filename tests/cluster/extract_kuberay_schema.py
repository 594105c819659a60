"""Regenerate ``kuberay_schema.json`` from the KubeRay CRDs (run by hand when KubeRay moves).

    python tests/cluster/extract_kuberay_schema.py KUBERAY_CHECKOUT TAG

Reads ``ray-operator/config/crd/bases/ray.io_{rayclusters,rayjobs}.yaml`` at git tag ``TAG`` of a
KubeRay checkout and writes the ``v1`` OpenAPI schemas of ``spec`` as one compact JSON Schema:
descriptions dropped; every object with ``properties`` closed (``additionalProperties: false``,
what ``kubectl apply --validate=strict`` does with an unknown field) unless the CRD keeps unknown
fields; ``int-or-string`` as ``anyOf``; repeated subtrees (the pod template appears in every
group) stored once under ``$defs``.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

KEEP = {"type", "properties", "required", "items", "enum", "additionalProperties", "format",
        "minimum", "maximum", "nullable", "pattern", "minItems", "maxItems"}  # fmt: skip


def _convert(node: Any) -> Any:
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key not in KEEP:
            continue
        if key == "properties":
            out[key] = {k: _convert(v) for k, v in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = _convert(value)
        else:
            out[key] = value
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    if "properties" in out and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def _children(node: dict[str, Any]) -> list[tuple[dict[str, Any], str]]:
    """``(container, key)`` of each sub-schema of a schema node (properties, items, maps)."""
    subs = [(node["properties"], k) for k in node.get("properties", {})]
    subs += [(node, k) for k in ("items", "additionalProperties") if isinstance(node.get(k), dict)]
    return subs


def _count(node: dict[str, Any], seen: dict[str, int]) -> None:
    for container, key in _children(node):
        _count(container[key], seen)
    text = json.dumps(node, sort_keys=True)
    seen[text] = seen.get(text, 0) + 1


def _dedupe(node: dict[str, Any], defs: dict[str, Any], seen: dict[str, int]) -> dict[str, Any]:
    """Replace every repeated sub-schema larger than 2 kB by a ``$ref`` into ``defs``."""
    text = json.dumps(node, sort_keys=True)
    if len(text) >= 2000 and seen.get(text, 0) >= 2:
        name = hashlib.sha256(text.encode()).hexdigest()[:12]
        defs[name] = node
        return {"$ref": f"#/$defs/{name}"}
    for container, key in _children(node):
        container[key] = _dedupe(container[key], defs, seen)
    return node


def main(checkout: str, tag: str) -> None:
    kinds = {}
    for kind, plural in (("RayCluster", "rayclusters"), ("RayJob", "rayjobs")):
        path = f"{tag}:ray-operator/config/crd/bases/ray.io_{plural}.yaml"
        crd = yaml.safe_load(subprocess.check_output(["git", "-C", checkout, "show", path]))
        version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
        kinds[kind] = _convert(version["schema"]["openAPIV3Schema"]["properties"]["spec"])
    # Top-down: the largest repeated sub-schemas become definitions (named by their content's
    # hash, so each is stored once), then the repeats inside the definitions, until none is left.
    defs: dict[str, Any] = {}
    while True:
        seen: dict[str, int] = {}
        for schema in [*kinds.values(), *defs.values()]:
            _count(schema, seen)
        before = len(defs)
        kinds = {kind: _dedupe(schema, defs, seen) for kind, schema in kinds.items()}
        for name in list(defs):
            for container, key in _children(defs[name]):
                container[key] = _dedupe(container[key], defs, seen)
        if len(defs) == before:
            break
    out = {
        "source": f"KubeRay {tag}, ray-operator/config/crd/bases (apiVersion ray.io/v1), spec only",
        "kinds": kinds,
        "$defs": defs,
    }
    target = Path(__file__).with_name("kuberay_schema.json")
    target.write_text(json.dumps(out, sort_keys=True, separators=(",", ":")) + "\n")
    print(f"wrote {target} ({target.stat().st_size} bytes)")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
