"""The console's form and "again" buttons as JobRequests (api/console/job_form.py): pure, no stack."""
from __future__ import annotations

import uuid

import pytest
from starlette.datastructures import FormData

from api.console.job_form import request_from_form, request_from_job
from common.job_request import ImageRef, RequestError

PARAMS = {"prompt": "a poster", "prompt_text": "a poster", "preset": "V4_TURBO_12", "width": 256, "height": 320,
          "steps": 12, "seed": 77, "seed_generated": False, "num_images": 2, "guidance_scale": None}


def test_again_keeps_the_recipe_and_the_seed_only_for_reproduce():
    same = request_from_job(PARAMS, new_seed=False, priority="high")
    assert (same.prompt, same.preset, same.width, same.height, same.steps, same.num_images, same.seed,
            same.priority) == ("a poster", "V4_TURBO_12", 256, 320, 12, 2, 77, "high")
    assert request_from_job(PARAMS, new_seed=True, priority="normal").seed is None


def test_again_of_a_magic_prompt_job_renders_its_stored_caption_not_the_prompt_again():
    caption = {"high_level_description": "a poster", "compositional_deconstruction": {"background": "red",
                                                                                     "elements": []}}
    params = {**PARAMS, "caption": caption, "magic_prompt": {"mode": "ON", "prompt": "a poster", "enhanced": True}}
    again = request_from_job(params, new_seed=False, priority="normal")
    assert again.prompt is None and again.caption.model_dump(exclude_none=True) == caption
    assert again.magic_prompt is False  # the caption is what was rendered: no second enhancement


def test_again_names_adapters_and_remix_inputs_as_a_request_does():
    job_id = uuid.uuid4()
    loras = [{"name": "brand", "sha256": "a" * 64, "scale": 0.8}]
    upload = {"sha256": "b" * 64, "key": f"images/{uuid.uuid4()}/inputs/{'b' * 64}"}
    earlier = {"sha256": "c" * 64, "key": f"images/{uuid.uuid4()}/{job_id}/3.webp"}
    first = request_from_job({**PARAMS, "loras": loras, "image": upload, "strength": 0.6}, new_seed=False,
                             priority="normal")
    assert [(lora.name, lora.scale) for lora in first.loras] == [("brand", 0.8)]
    assert first.image == f"upload:{'b' * 64}" and first.strength == 0.6
    second = request_from_job({**PARAMS, "image": earlier, "strength": 0.6}, new_seed=False, priority="normal")
    assert second.image == ImageRef(job_id=job_id, index=3)


def test_the_form_reads_into_a_request_and_its_mistakes_name_their_field():
    form = FormData([("mode", "caption"), ("description", "a bakery sign"), ("background", "brick"),
                     ("el0_type", "text"), ("el0_text", "FRESH"), ("el1_type", "obj"), ("el1_desc", "bread"),
                     ("el2_type", "obj"), ("resolution", "512x512"), ("num_images", "2"), ("seed", "9")])
    request = request_from_form(form)
    assert request.caption.compositional_deconstruction.elements[0].text == "FRESH"
    assert len(request.caption.compositional_deconstruction.elements) == 2  # the blank third row is left out
    assert (request.resolution, request.num_images, request.seed) == ("512x512", 2, 9)
    for fields, field in (([("prompt", "x"), ("seed", "nine")], "seed"), ([("prompt", "  ")], "prompt"),
                          ([("prompt", "x"), ("num_images", "99")], "num_images"),
                          ([("prompt", "x"), ("priority", "urgent")], "priority")):
        with pytest.raises(RequestError) as caught:
            request_from_form(FormData(fields))
        assert caught.value.field == field, (fields, caught.value)
