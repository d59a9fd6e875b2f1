"""Request-body schemas of the compatible APIs for the OpenAPI document (the routes parse
bodies themselves, to answer in their provider's error shape)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


def _inline(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            return _inline(defs[ref.removeprefix("#/$defs/")], defs)
        return {k: _inline(v, defs) for k, v in node.items() if k != "$defs"}
    if isinstance(node, list):
        return [_inline(v, defs) for v in node]
    return node


def json_body(model: type[BaseModel], *, array: bool = False) -> dict[str, Any]:
    """`openapi_extra` declaring a JSON request body of `model` (or an array of them), its
    nested models written inline so the schema stands alone."""
    schema = model.model_json_schema()
    inlined = _inline(schema, schema.get("$defs", {}))
    if array:
        inlined = {"type": "array", "items": inlined}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": inlined}}}}


def form_body(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` declaring a multipart/form-data (or urlencoded) request body."""
    schema = model.model_json_schema()
    inlined = _inline(schema, schema.get("$defs", {}))
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {"schema": inlined},
                "application/x-www-form-urlencoded": {"schema": inlined},
            },
        }
    }
