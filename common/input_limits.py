"""What a caller's data may hold before it goes near Postgres, checked at validation so a bad value is a 422 that
names its field, never a database error: no NUL characters (Postgres `text` and `jsonb` refuse them), finite
numbers only (JSON has no NaN or Infinity, `jsonb` refuses them), and a bounded nesting depth for free-form JSON
(deep nesting makes recursive code fail)."""
from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import AfterValidator

MAX_JSON_DEPTH = 32


def no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain NUL (\\u0000) characters")
    return value


def storable_json(value: Any, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """`value` when it is plain JSON Postgres can store; else ValueError saying where (`a.b[2]`) and why."""
    stack: list[tuple[Any, str, int]] = [(value, "", 1)]
    while stack:  # iterative: a hostile depth cannot exhaust the interpreter's stack here
        node, path, depth = stack.pop()
        if depth > max_depth:
            raise ValueError(f"nests deeper than {max_depth} levels at {path or 'the top'}")
        if isinstance(node, dict):
            for key, child in node.items():
                if not isinstance(key, str) or "\x00" in key:
                    raise ValueError(f"has a key that is not plain text at {path or 'the top'}")
                stack.append((child, f"{path}.{key}" if path else key, depth + 1))
        elif isinstance(node, list):
            stack.extend((child, f"{path}[{i}]", depth + 1) for i, child in enumerate(node))
        elif isinstance(node, str):
            if "\x00" in node:
                raise ValueError(f"contains a NUL (\\u0000) character at {path or 'the top'}")
        elif isinstance(node, float) and not math.isfinite(node):
            raise ValueError(f"holds a non-finite number ({node}) at {path or 'the top'}")
        elif node is not None and not isinstance(node, (bool, int, float)):
            raise ValueError(f"holds a value that is not JSON at {path or 'the top'}")
    return value


PlainText = Annotated[str, AfterValidator(no_nul)]
StorableJson = Annotated[dict[str, Any], AfterValidator(storable_json)]
