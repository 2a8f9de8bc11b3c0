"""Check a Kubernetes object against a CRD's OpenAPI v3 schema: every key known, every value typed.

The API server prunes fields a structural schema does not know, silently: a misspelt field in a
manifest is simply dropped. So an unknown key is an error here, as are wrong types, values outside
an enum, quantity strings that do not parse and missing required fields. This is the subset of
OpenAPI v3 that CRDs use (type, properties, additionalProperties, items, enum, required, pattern,
int-or-string, preserve-unknown-fields); CEL rules (x-kubernetes-validations) are not evaluated.
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures"


def rayjob_schema() -> dict:
    with gzip.open(FIXTURES / "kuberay-v1.6.0-rayjob-schema.json.gz") as handle:
        return json.load(handle)["openAPIV3Schema"]


def _type_ok(value, kind: str) -> bool:
    if kind == "object":
        return isinstance(value, dict)
    if kind == "array":
        return isinstance(value, list)
    if kind == "string":
        return isinstance(value, str)
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "boolean":
        return isinstance(value, bool)
    raise ValueError(f"schema type {kind!r} not handled")


def problems(value, schema: dict, path: str = "") -> list[str]:
    """Every way `value` breaks `schema`, as 'path: reason' lines (empty: it conforms)."""
    found: list[str] = []
    where = path or "."
    if schema.get("x-kubernetes-int-or-string"):
        if not (isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))):
            found.append(f"{where}: {value!r} is neither an integer nor a string")
        elif isinstance(value, str) and "pattern" in schema and not re.search(schema["pattern"], value):
            found.append(f"{where}: {value!r} does not match {schema['pattern']}")
        return found
    if "anyOf" in schema:
        options = [problems(value, option, path) for option in schema["anyOf"]]
        return [] if any(not o for o in options) else [f"{where}: {value!r} matches none of anyOf"]
    kind = schema.get("type")
    if kind is None:
        return found
    if not _type_ok(value, kind):
        return [f"{where}: expected {kind}, got {type(value).__name__} {value!r}"]
    if "enum" in schema and value not in schema["enum"]:
        found.append(f"{where}: {value!r} is not one of {schema['enum']}")
    if kind == "string" and "pattern" in schema and not re.search(schema["pattern"], value):
        found.append(f"{where}: {value!r} does not match {schema['pattern']}")
    if kind == "array":
        for index, item in enumerate(value):
            found += problems(item, schema.get("items", {}), f"{path}[{index}]")
    if kind == "object":
        for name in schema.get("required", []):
            if name not in value:
                found.append(f"{where}: required field {name!r} is missing")
        properties = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            child = f"{path}.{key}"
            if properties is not None and key in properties:
                found += problems(item, properties[key], child)
            elif isinstance(extra, dict):
                found += problems(item, extra, child)
            elif extra is True or schema.get("x-kubernetes-preserve-unknown-fields"):
                continue
            else:
                found.append(f"{child}: unknown field (the API server would drop it)")
    return found


def rayjob_problems(document: dict) -> list[str]:
    """A RayJob document against the vendored schema; its metadata (ObjectMeta) only by name."""
    schema = rayjob_schema()
    body = {k: v for k, v in document.items() if k != "metadata"}
    found = problems(body, {**schema, "required": [r for r in schema.get("required", []) if r != "metadata"]})
    name = (document.get("metadata") or {}).get("name")
    if not (isinstance(name, str) and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 63):
        found.append(f".metadata.name: {name!r} is not a DNS label")
    return found
