"""Server-rendered pages: one Jinja2 environment with autoescaping on for every template, so every user string
(prompts, metadata, file names, error messages) renders as text, never as markup."""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse
from jinja2 import Environment, FileSystemLoader, StrictUndefined

TEMPLATES = Path(__file__).parent / "templates"
STATIC = Path(__file__).parent / "static"

_env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=True, undefined=StrictUndefined,
                   trim_blocks=True, lstrip_blocks=True)
_env.filters["pretty_json"] = lambda value: json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False,
                                                       default=str)
_env.filters["when"] = lambda value: value.strftime("%Y-%m-%d %H:%M:%S UTC") if isinstance(value, datetime) else "—"


def render(request: Request, template: str, *, status: int = 200, **context: Any) -> HTMLResponse:
    """The page, with what every page shows: the signed-in user (or None) and its CSRF token for forms."""
    user = getattr(request.state, "console_user", None)
    html = _env.get_template(template).render(request=request, user=user, csrf=user.csrf if user else "",
                                              nav=template.split(".")[0], **context)
    return HTMLResponse(html, status_code=status)


def render_fragment(template: str, **context: Any) -> str:
    """A piece of a page (the gallery's next tiles), for the page's script to append."""
    return _env.get_template(template).render(**context)
