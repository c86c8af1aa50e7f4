"""The console's create form <-> common.job_request.JobRequest: the form's text fields read into the same
request the REST API validates, and a stored job read back into a request ("same recipe, new seed",
"reproduce"). The form adds no rules of its own: a bad value is the API's own 422, shown beside its field."""
from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from starlette.datastructures import FormData

from common.job_request import JobRequest, RequestError

RESOLUTIONS = ("256x256", "512x512", "768x768", "1024x1024", "1152x896", "896x1152", "1344x768", "768x1344",
               "1536x1536", "2048x2048")
ELEMENT_ROWS = 4  # caption elements the form offers (blank rows are left out)
OUTPUT_FORMATS = ("png", "webp", "jpeg")
PRIORITIES = ("normal", "high", "low")
MAGIC_MODES = ("OFF", "AUTO", "ON")


def _text(form: FormData, name: str) -> str:
    value = form.get(name)
    return value.strip() if isinstance(value, str) else ""


def _whole(form: FormData, name: str) -> int | None:
    value = _text(form, name)
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise RequestError(name, f"{name} must be a whole number") from None


def _number(form: FormData, name: str) -> float | None:
    value = _text(form, name)
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        raise RequestError(name, f"{name} must be a number") from None


def form_values(form: FormData) -> dict[str, str]:
    """What the user typed, to show the form again beside an error."""
    return {k: v for k, v in form.items() if isinstance(v, str) and k != "csrf_token"}


def _caption(form: FormData) -> dict[str, Any]:
    elements = []
    for i in range(ELEMENT_ROWS):
        kind, text, desc = _text(form, f"el{i}_type"), _text(form, f"el{i}_text"), _text(form, f"el{i}_desc")
        if not text and not desc:
            continue
        if kind == "text":
            elements.append({"type": "text", "text": text, **({"desc": desc} if desc else {})})
        else:
            elements.append({"type": "obj", "desc": desc or text})
    return {"high_level_description": _text(form, "description"),
            "compositional_deconstruction": {"background": _text(form, "background"), "elements": elements}}


def request_from_form(form: FormData) -> JobRequest:
    """The JobRequest the form describes; RequestError naming the field when a value is not one."""
    body: dict[str, Any] = {"preset": _text(form, "preset") or None, "resolution": _text(form, "resolution") or None,
                            "seed": _whole(form, "seed"), "num_images": _whole(form, "num_images") or 1,
                            "output_format": _text(form, "output_format") or "png",
                            "priority": _text(form, "priority") or "normal"}
    if _text(form, "mode") == "caption":
        body["caption"] = _caption(form)
    else:
        body["prompt"] = _text(form, "prompt") or None
        if (magic := _text(form, "magic_prompt")) and magic != "OFF":
            body["magic_prompt"] = magic
    if adapter := _text(form, "adapter"):
        body["loras"] = [{"name": adapter, "scale": _number(form, "adapter_scale") or 1.0}]
    if body.get("prompt") is None and "caption" not in body:
        raise RequestError("prompt", "write a prompt (or switch to the caption builder)")
    try:
        return JobRequest.model_validate({k: v for k, v in body.items() if v is not None})
    except ValidationError as exc:
        first = exc.errors()[0]
        raise RequestError(".".join(str(p) for p in first["loc"]) or "body", first["msg"]) from None


def request_from_job(params: dict[str, Any], *, new_seed: bool, priority: str) -> JobRequest:
    """The request that makes this job again: the same recipe (prompt or caption, preset, size, steps,
    guidance, adapters by name, remix input) with its seed, or with a new one the server picks."""
    body: dict[str, Any] = {k: params[k] for k in ("caption", "preset", "width", "height", "steps",
                                                   "guidance_scale", "num_images", "output_format", "output_quality",
                                                   "strength") if params.get(k) is not None}
    if "caption" not in body:  # a magic prompt's job stores the caption it rendered: that, not the prompt, again
        body["prompt"] = params["prompt"]
    if not new_seed:
        body["seed"] = params["seed"]
    if params.get("loras"):
        body["loras"] = [{"name": lora["name"], "scale": lora["scale"]} for lora in params["loras"]]
    if image := params.get("image"):
        body["image"] = _image_reference(image)
    body["priority"] = priority
    return JobRequest.model_validate(body)


def _image_reference(image: dict[str, Any]) -> str | dict[str, Any]:
    """A remix input as a new request names it: an upload (kept under the tenant's `inputs/` by content) by its
    sha256, an earlier image by its job and index (its key is `.../<job id>/<index>.<ext>`)."""
    key = image["key"]
    if "/inputs/" in f"/{key}":
        return f"upload:{image['sha256']}"
    job_id, name = key.rsplit("/", 2)[-2:]
    return {"job_id": job_id, "index": int(name.split(".", 1)[0])}
