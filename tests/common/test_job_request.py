"""common.job_request: what a caller may ask for (JobRequest), its normalization into stored params (to_params)
and the per-image seeds. Every refusal names the field it is about."""
from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from common.captions import Caption
from common.job_request import MAX_SEED, JobRequest, RequestError, image_seeds, to_params
from common.presets import PRESETS
from common.settings import ApiSettings, ModelSettings

API = ApiSettings()
CAPTION = {"high_level_description": "a vintage travel poster",
           "compositional_deconstruction": {"background": "a blue sky",
                                            "elements": [{"type": "text", "text": "VISIT THE ALPS"}]}}


def fields_of(exc: ValidationError) -> set[str]:
    return {".".join(str(p) for p in e["loc"]) for e in exc.errors()}


def refused(**body) -> ValidationError:
    with pytest.raises(ValidationError) as caught:
        JobRequest(**body)
    return caught.value


def params_error(**body) -> RequestError:
    with pytest.raises(RequestError) as caught:
        to_params(JobRequest(**body), API)
    return caught.value


# ------------------------------------------------------------------------------------ prompt xor caption

def test_prompt_or_caption_exactly_one():
    assert JobRequest(prompt="a cat").prompt == "a cat"
    assert JobRequest(caption=CAPTION).caption.high_level_description == "a vintage travel poster"
    for body in ({}, {"prompt": "a cat", "caption": CAPTION}):
        message = str(refused(**body))
        assert "`prompt`" in message and "`caption`" in message


def test_blank_or_empty_prompt_is_refused_naming_prompt():
    assert fields_of(refused(prompt="   ")) == {"prompt"}
    assert fields_of(refused(prompt="")) == {"prompt"}
    assert fields_of(refused(prompt="x" * 8001)) == {"prompt"}


def test_unknown_fields_and_bad_caption_are_refused_by_name():
    assert "colour" in fields_of(refused(prompt="a cat", colour="red"))
    bad = {**CAPTION, "compositional_deconstruction": {"background": "sky", "elements": [{"type": "obj"}]}}
    assert any(f.startswith("caption.compositional_deconstruction.elements.0") for f in fields_of(refused(caption=bad)))


def test_conflicting_choices_are_refused():
    assert "not both" in str(refused(prompt="a", preset="V4_TURBO_12", rendering_speed="TURBO"))
    assert "not both" in str(refused(prompt="a", resolution="512x512", width=512))


def test_magic_prompt_needs_an_enhancer_and_a_text_prompt(tmp_path):
    without = ModelSettings(id=str(tmp_path))  # a model directory whose model_index.json names no enhancer head
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "Ideogram4Pipeline",
                                                          "prompt_enhancer_head": [None, None]}))
    for mode in (True, "ON", "AUTO"):
        with pytest.raises(RequestError, match="not available") as e:
            to_params(JobRequest(prompt="a", magic_prompt=mode), API, model=without)
        assert e.value.field == "magic_prompt"
    assert "magic_prompt" not in to_params(JobRequest(prompt="a", magic_prompt="OFF"), API, model=without)
    head = tmp_path / "with"
    head.mkdir()
    (head / "model_index.json").write_text(json.dumps({"prompt_enhancer_head": ["diffusers",
                                                                                "Ideogram4PromptEnhancerHead"]}))
    with_head = ModelSettings(id=str(head))
    assert to_params(JobRequest(prompt="a", magic_prompt=True), API, model=with_head)["magic_prompt"] == "ON"
    assert to_params(JobRequest(prompt="a", magic_prompt="AUTO"), API, model=with_head)["magic_prompt"] == "AUTO"
    with pytest.raises(RequestError, match="rewrites a text prompt"):
        to_params(JobRequest(caption=CAPTION, magic_prompt=True), API, model=with_head)


# ------------------------------------------------------------------------------------- strict numbers

@pytest.mark.parametrize("field, value", [
    ("width", "256"), ("height", 256.0), ("seed", True), ("seed", "7"), ("steps", 2.5), ("num_images", "2"),
    ("num_images", False), ("guidance_scale", "4.5"), ("guidance_scale", True), ("magic_prompt", "false"),
    ("magic_prompt", 0), ("magic_prompt", "on"),
])
def test_numbers_and_flags_are_strict_json_types(field, value):
    """As the OpenAPI document says: a JSON integer, a JSON number for guidance_scale, a boolean for magic_prompt.
    Lax parsing took `"seed": true` as seed 1 and `"width": "256"` as 256. Batch lines validate the same way."""
    body = {"prompt": "a", field: value}
    assert fields_of(refused(**body)) == {field}
    with pytest.raises(ValidationError):
        JobRequest.model_validate_json(json.dumps(body))


def test_json_numbers_of_the_right_type_pass():
    body = {"prompt": "a", "width": 256, "height": 512, "seed": 0, "steps": 4, "num_images": 2,
            "guidance_scale": 4, "magic_prompt": False}
    for req in (JobRequest.model_validate(body), JobRequest.model_validate_json(json.dumps(body))):
        assert (req.width, req.height, req.seed, req.steps, req.num_images) == (256, 512, 0, 4, 2)
        assert req.guidance_scale == 4.0 and isinstance(req.guidance_scale, float)  # an integer is a number
    assert JobRequest(prompt="a", guidance_scale=3.5).guidance_scale == 3.5


# ------------------------------------------------------------------------------------------- sizes

@pytest.mark.parametrize("field, value", [("width", 8), ("height", 8193), ("width", -16)])
def test_sides_outside_the_schema_bounds_name_their_field(field, value):
    assert fields_of(refused(prompt="a", **{field: value})) == {field}


@pytest.mark.parametrize("field, value, words", [
    ("width", 520, "multiple of 16"),
    ("height", 1000, "multiple of 16"),
    ("width", 240, "between 256 and 2048"),   # a multiple of 16, below the server's min_side
    ("height", 2064, "between 256 and 2048"),  # above max_height
])
def test_sides_breaking_server_limits_name_their_field(field, value, words):
    err = params_error(prompt="a", **{field: value})
    assert err.field == field
    assert words in str(err) and str(value) in str(err)


def test_resolution_string():
    params = to_params(JobRequest(prompt="a", resolution="512x768"), API)
    assert (params["width"], params["height"]) == (512, 768)
    for bad in ("512*512", "512x", "x512", "512x512px", "-512x512"):
        assert fields_of(refused(prompt="a", resolution=bad)) == {"resolution"}
    for bad in ("520x512", "512x4096", "0x512"):
        assert params_error(prompt="a", resolution=bad).field == "resolution"


def test_default_size_is_1024_square_and_limits_follow_settings():
    params = to_params(JobRequest(prompt="a"), API)
    assert (params["width"], params["height"]) == (1024, 1024)
    small = ApiSettings(min_side=16, max_width=64, max_height=64)
    assert to_params(JobRequest(prompt="a", width=16, height=64), small)["width"] == 16
    with pytest.raises(RequestError) as caught:
        to_params(JobRequest(prompt="a", width=80, height=64), small)
    assert caught.value.field == "width"


# ------------------------------------------------------------------------------- presets and steps

@pytest.mark.parametrize("speed, preset", [("TURBO", "V4_TURBO_12"), ("DEFAULT", "V4_DEFAULT_20"),
                                           ("QUALITY", "V4_QUALITY_48")])
def test_rendering_speed_maps_to_its_preset(speed, preset):
    params = to_params(JobRequest(prompt="a", rendering_speed=speed), API)
    p = PRESETS[preset]
    assert params["preset"] == preset
    assert (params["steps"], params["mu"], params["std"]) == (p.steps, p.mu, p.std)
    assert params["guidance_schedule"] == list(p.guidance_schedule())
    assert len(params["guidance_schedule"]) == p.steps


def test_rendering_speed_and_preset_values_are_checked():
    assert fields_of(refused(prompt="a", rendering_speed="LUDICROUS")) == {"rendering_speed"}
    assert fields_of(refused(prompt="a", preset="V3_TURBO")) == {"preset"}


def test_no_preset_uses_the_server_default():
    assert to_params(JobRequest(prompt="a"), API)["preset"] == "V4_DEFAULT_20"
    assert to_params(JobRequest(prompt="a"), ApiSettings(default_preset="V4_FAST_16"))["preset"] == "V4_FAST_16"


def test_steps_override_keeps_polish_steps_and_guidance_scale_flattens_the_schedule():
    params = to_params(JobRequest(prompt="a", preset="V4_QUALITY_48", steps=5), API)
    assert params["steps"] == 5 and params["guidance_schedule"] == [7.0, 7.0, 3.0, 3.0, 3.0]
    flat = to_params(JobRequest(prompt="a", preset="V4_TURBO_12", guidance_scale=4.5), API)
    assert flat["guidance_schedule"] == [4.5] * 12 and flat["guidance_scale"] == 4.5
    assert fields_of(refused(prompt="a", steps=0)) == {"steps"}
    assert fields_of(refused(prompt="a", steps=201)) == {"steps"}
    assert fields_of(refused(prompt="a", guidance_scale=31)) == {"guidance_scale"}


# ------------------------------------------------------------------------------ num_images, seed, metadata

def test_num_images_bounds():
    assert to_params(JobRequest(prompt="a", num_images=8), API)["num_images"] == 8
    assert JobRequest(prompt="a").num_images == 1
    for n in (0, 9):
        assert fields_of(refused(prompt="a", num_images=n)) == {"num_images"}


def test_seed_bounds_and_server_chosen_seed():
    assert fields_of(refused(prompt="a", seed=-1)) == {"seed"}
    assert fields_of(refused(prompt="a", seed=MAX_SEED + 1)) == {"seed"}
    given = to_params(JobRequest(prompt="a", seed=MAX_SEED), API)
    assert (given["seed"], given["seed_generated"]) == (MAX_SEED, False)
    chosen = [to_params(JobRequest(prompt="a"), API) for _ in range(5)]
    assert all(p["seed_generated"] and 0 <= p["seed"] <= MAX_SEED for p in chosen)
    assert len({p["seed"] for p in chosen}) > 1  # random, not a constant


def test_metadata_size_limit_counts_utf8_bytes_not_escapes():
    to_params(JobRequest(prompt="a", metadata={"k": "\u00e9" * 1000}), API)  # 2,009 bytes: fits in 4,096
    assert params_error(prompt="a", metadata={"k": "\u00e9" * 2100}).field == "metadata"  # 4,209 bytes


def test_metadata_size_limit_names_metadata():
    limit = API.max_metadata_bytes
    fits = {"k": "x" * (limit - len(json.dumps({"k": ""})))}
    assert len(json.dumps(fits)) == limit
    to_params(JobRequest(prompt="a", metadata=fits), API)
    err = params_error(prompt="a", metadata={"k": "x" * limit})
    assert err.field == "metadata" and str(limit) in str(err)


# ---------------------------------------------------------------------------------------- to_params

def test_to_params_of_a_prompt():
    params = to_params(JobRequest(prompt="a red fox", preset="V4_TURBO_12", width=512, height=256, seed=3,
                                  num_images=2), API)
    assert params == {"preset": "V4_TURBO_12", "width": 512, "height": 256, "steps": 12, "mu": 0.5, "std": 1.75,
                      "guidance_schedule": [7.0] * 11 + [3.0], "guidance_scale": None, "seed": 3,
                      "seed_generated": False, "num_images": 2, "prompt": "a red fox", "prompt_text": "a red fox"}
    json.dumps(params)  # stored as JSONB: plain values only


def test_to_params_of_a_caption_serializes_it_as_the_prompt_text():
    params = to_params(JobRequest(caption=CAPTION, seed=1), API)
    assert "prompt" not in params
    assert params["caption"] == {"high_level_description": "a vintage travel poster",
                                 "compositional_deconstruction": {"background": "a blue sky",
                                                                  "elements": [{"type": "text",
                                                                                "text": "VISIT THE ALPS"}]}}
    assert params["prompt_text"] == Caption(**CAPTION).to_prompt_text()
    assert json.loads(params["prompt_text"]) == params["caption"]
    assert " " not in params["prompt_text"].replace("a vintage travel poster", "").replace("a blue sky", "") \
        .replace("VISIT THE ALPS", "")  # compact JSON


# -------------------------------------------------------------------------------------------- seeds

def test_image_seeds_count_up_from_the_seed_and_wrap():
    assert image_seeds({"seed": 10, "num_images": 3}) == [10, 11, 12]
    assert image_seeds({"seed": 10, "num_images": 1}) == [10]
    assert image_seeds({"seed": MAX_SEED - 1, "num_images": 3}) == [MAX_SEED - 1, MAX_SEED, 0]
    params = to_params(JobRequest(prompt="a", seed=7, num_images=4), API)
    assert image_seeds(params) == [7, 8, 9, 10]
