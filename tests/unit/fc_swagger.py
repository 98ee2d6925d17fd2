"""Validate Firecracker API requests and responses against the v1.16.1 swagger
(``tests/data/firecracker-v1.16.1.yaml``), in the manner of Firecracker's own
``tests/framework/swagger_validator.py``: Swagger 2.0 ``$ref``s are resolved into plain JSON
schemas (Draft 4), objects without ``additionalProperties`` get ``false`` (the bodies deny
unknown fields), ``null`` values are dropped first (the swagger has no nullable), and PATCH
bodies are validated without their ``required`` lists (Firecracker's PATCH bodies are partial).

    validate_request("PUT", "/drives/rootfs", {...})          # raises ValidationError
    validate_response("GET", "/machine-config", 200, {...})
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft4Validator, ValidationError

SPEC_PATH = Path(__file__).resolve().parent.parent / "data" / "firecracker-v1.16.1.yaml"


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``Off``/``On``/``Yes``/``No`` as booleans, which would turn the
    logger's ``Off`` level into ``false``; only ``true``/``false`` are booleans here."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(
    r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


@functools.cache
def spec() -> dict:
    with open(SPEC_PATH, encoding="utf-8") as f:
        return yaml.load(f, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


def _drop_none(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _drop_none(v) for k, v in data.items() if v is not None}
    if isinstance(data, list):
        return [_drop_none(v) for v in data if v is not None]
    return data


def _resolve(schema: dict, definitions: dict) -> dict:
    """``schema`` with every ``$ref`` replaced by its definition, recursively."""
    if "$ref" in schema:
        name = schema["$ref"].removeprefix("#/definitions/")
        return _resolve(definitions[name], definitions)
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {k: _resolve(v, definitions) for k, v in out["properties"].items()}
    if isinstance(out.get("items"), dict):
        out["items"] = _resolve(out["items"], definitions)
    if out.get("type") == "object" or "properties" in out:
        out.setdefault("additionalProperties", False)
    return out


@functools.cache
def _validators() -> dict[tuple, Draft4Validator]:
    definitions = spec()["definitions"]
    found: dict[tuple, Draft4Validator] = {}
    for path, methods in spec()["paths"].items():
        for method, op in methods.items():
            method = method.upper()
            for param in op.get("parameters", []):
                if param.get("in") == "body" and "schema" in param:
                    schema = _resolve(param["schema"], definitions)
                    if method == "PATCH":
                        schema["required"] = []
                    found[("request", method, path)] = Draft4Validator(schema)
            for status, resp in op.get("responses", {}).items():
                if str(status) in ("200", "204") and resp and "schema" in resp:
                    found[("response", method, path, str(status))] = Draft4Validator(
                        _resolve(resp["schema"], definitions))
    return found


def template_of(path: str) -> str:
    """The swagger path that ``path`` instantiates (``/drives/rootfs`` -> ``/drives/{drive_id}``),
    or ``path`` itself when none does."""
    paths = spec()["paths"]
    if path in paths:
        return path
    parts = path.split("/")
    for candidate in paths:
        cparts = candidate.split("/")
        if len(cparts) == len(parts) and all(
                (c.startswith("{") and c.endswith("}")) or c == p
                for c, p in zip(cparts, parts, strict=True)):
            return candidate
    return path


def operation_exists(method: str, path: str) -> bool:
    """True when the swagger has ``method`` on the path template of ``path``."""
    return method.lower() in spec()["paths"].get(template_of(path), {})


def validate_request(method: str, path: str, body: Any) -> None:
    """Raise ValidationError unless ``body`` is a valid request body for ``method path``."""
    key = ("request", method.upper(), template_of(path))
    validator = _validators().get(key)
    if validator is None:
        raise ValidationError(f"{key} has no request body in the schema")
    validator.validate(_drop_none(body))


def validate_response(method: str, path: str, status: int, body: Any) -> None:
    """Raise ValidationError unless a ``status`` answer with ``body`` conforms: 200/204 to the
    operation's schema (204 without a body), an error to the ``Error`` definition."""
    template = template_of(path)
    if status == 204:
        if body is not None:
            raise ValidationError(f"204 from {method} {path} has a body: {body!r}")
        responses = spec()["paths"][template][method.lower()]["responses"]
        if 204 not in responses and "204" not in responses:
            raise ValidationError(f"{method} {template} does not answer 204")
        return
    if status >= 400:
        Draft4Validator(_resolve({"$ref": "#/definitions/Error"},
                                 spec()["definitions"])).validate(body)
        if not isinstance(body, dict) or not isinstance(body.get("fault_message"), str):
            raise ValidationError(f"error without a fault_message: {body!r}")
        return
    key = ("response", method.upper(), template, str(status))
    validator = _validators().get(key)
    if validator is None:
        raise ValidationError(f"{key} is not in the schema")
    validator.validate(_drop_none(body))
