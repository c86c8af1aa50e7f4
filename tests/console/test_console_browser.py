"""The web console in a real browser (headless Chromium) against the real stack: API process, Postgres, Redis,
S3 (moto server) and a Celery worker running the tiny Ideogram 4 on the CPU."""
from __future__ import annotations

import io
import json
import re
import time
import uuid
from datetime import timedelta
import zipfile

import httpx
import pytest
from PIL import Image
from playwright.sync_api import expect

from tests.console.conftest import ARTIFACTS
from tests.support import ApiClient, make_tenant

pytestmark = pytest.mark.slow
SMALL = {"width": 256, "height": 256, "preset": "V4_TURBO_12"}


@pytest.fixture
def console(browser, api_url, tenant):
    """A signed-in page of a fresh tenant (1280x800)."""
    context = browser.new_context(viewport={"width": 1280, "height": 800}, base_url=api_url)
    page = context.new_page()
    sign_in(page, tenant.key)
    yield page
    context.close()


def sign_in(page, key: str) -> None:
    page.goto("/ui/login")
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(re.compile(r"/ui/gallery"))


def test_sign_in_sets_a_strict_http_only_session_and_a_wrong_key_is_refused(browser, api_url, tenant, screenshot):
    context = browser.new_context(base_url=api_url)
    page = context.new_page()
    response = page.goto("/ui/jobs/" + str(uuid.uuid4()))  # a signed-out visit goes to the sign-in form
    assert re.search(r"/ui/login\?next=", page.url) and response.status == 200
    assert "default-src 'none'" in response.headers["content-security-policy"]
    screenshot(page, "sign-in")
    page.get_by_label("API key").fill("lp_not-a-key")
    page.get_by_role("button", name="Sign in").click()
    assert page.get_by_role("alert").inner_text() == "That API key does not work here."
    page.get_by_label("API key").fill(tenant.key)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(re.compile(r"/ui/jobs/"))  # back where the visit began (a not-found page: no such job)
    assert page.get_by_role("heading", name="Not found").is_visible()
    cookie = next(c for c in context.cookies() if c["name"] == "lp_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/ui"
    assert tenant.key not in json.dumps(context.cookies())
    # signing out ends the session on the server: the old cookie no longer opens a page
    page.goto("/ui/gallery")
    page.get_by_role("button", name="Sign out").click()
    page.wait_for_url(re.compile(r"/ui/login"))
    stale = httpx.get(f"{api_url}/ui/gallery", cookies={"lp_session": cookie["value"]}, follow_redirects=False)
    assert stale.status_code == 303 and stale.headers["location"].startswith("/ui/login")
    context.close()


def test_submit_from_the_form_and_watch_the_image_arrive(console, worker, screenshot):
    page = console
    page.goto("/ui/create")
    screenshot(page, "create")
    page.get_by_label("Prompt", exact=True).fill("a letterpress poster that says HELLO")
    page.get_by_label("Preset").select_option("V4_TURBO_12")
    page.get_by_label("Size").select_option("256x256")
    page.get_by_label("Seed (empty: random)").fill("77")
    page.get_by_role("button", name="Generate").click()
    page.wait_for_url(re.compile(r"/ui/jobs/[0-9a-f-]{36}$"))
    job_id = page.url.rsplit("/", 1)[1]
    # the live stream updates the page (status text changes without a reload), then the page shows the image
    expect(page.locator("#job-status")).not_to_have_text("queued", timeout=120_000)
    image = page.locator("#job-images img")
    image.wait_for(timeout=120_000)
    assert page.locator("#job-status").inner_text() == "succeeded"
    assert page.locator("#job-steps").inner_text() == "12/12"
    expect(image).to_have_js_property("complete", True)
    assert image.evaluate("img => img.naturalWidth") > 0  # the thumbnail decoded
    full = page.request.get(f"/ui/jobs/{job_id}/images/0")
    with Image.open(io.BytesIO(full.body())) as im:
        assert im.size == (256, 256)
    assert '"seed": 77' in page.locator(".recipe pre").text_content()
    screenshot(page, "job")
    # "same recipe, new seed": a new job with every field but the seed
    page.get_by_role("button", name="Same recipe, new seed").click()
    page.wait_for_url(re.compile(r"/ui/jobs/[0-9a-f-]{36}$"))
    assert page.url.rsplit("/", 1)[1] != job_id
    recipe = json.loads(page.locator(".recipe pre").text_content())
    assert recipe["prompt"] == "a letterpress poster that says HELLO" and recipe["seed"] != 77
    assert (recipe["width"], recipe["preset"]) == (256, "V4_TURBO_12")


def test_a_bad_value_is_shown_beside_its_field_and_the_form_keeps_what_was_typed(console):
    page = console
    page.goto("/ui/create")
    page.get_by_label("Prompt", exact=True).fill("keep me")
    page.get_by_label("Seed (empty: random)").fill("not a number")
    page.get_by_role("button", name="Generate").click()
    alert = page.get_by_role("alert")
    assert "seed" in alert.inner_text() and "whole number" in alert.inner_text()
    assert page.get_by_label("Seed (empty: random)").get_attribute("aria-invalid") == "true"
    assert page.get_by_label("Prompt", exact=True).input_value() == "keep me"


def test_caption_builder_submits_a_structured_caption(console, api_url, tenant):
    page = console
    page.goto("/ui/create")
    page.get_by_label("the caption builder").check()
    assert not page.get_by_label("Prompt", exact=True).is_visible()  # the builder replaces the prompt box
    page.get_by_label("High-level description").fill("a bakery sign")
    page.get_by_label("Background").fill("warm brick wall")
    page.locator("#el0_type").select_option("text")
    page.locator("#el0_text").fill("FRESH BREAD")
    page.locator("#el1_desc").fill("a loaf of bread")
    page.get_by_label("Size").select_option("256x256")
    page.get_by_role("button", name="Generate").click()
    page.wait_for_url(re.compile(r"/ui/jobs/[0-9a-f-]{36}$"))
    job = ApiClient(api_url, tenant.key).get(page.url.rsplit("/", 1)[1])
    assert job["request"]["caption"] == {
        "high_level_description": "a bakery sign",
        "compositional_deconstruction": {"background": "warm brick wall", "elements": [
            {"type": "text", "text": "FRESH BREAD"}, {"type": "obj", "desc": "a loaf of bread"}]}}


def test_a_prompt_with_markup_renders_as_text(console, api_url, tenant):
    page = console
    prompt = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2"> "quoted" & more'
    job = ApiClient(api_url, tenant.key).submit({"prompt": prompt, **SMALL}).json()
    page.goto(f"/ui/jobs/{job['id']}")
    assert page.locator("p.prompt").inner_text() == prompt
    assert page.evaluate("window.__pwned") is None
    assert page.locator("p.prompt script, p.prompt img").count() == 0
    page.goto(f"/ui/gallery?q={httpx.QueryParams({'q': 'window.__pwned'})['q']}")
    assert page.locator(".tile").count() == 1 and page.evaluate("window.__pwned") is None


def test_another_tenants_job_batch_and_image_are_not_found(console, api_url):
    other = make_tenant()
    job = ApiClient(api_url, other.key).submit({"prompt": "not yours", **SMALL}).json()
    batch = httpx.post(f"{api_url}/v1/batches", headers={"Authorization": f"Bearer {other.key}"},
                       json={"items": [{"prompt": "not yours either", "custom_id": "x", **SMALL}]}).json()
    page = console
    for path in (f"/ui/jobs/{job['id']}", f"/ui/batches/{batch['id']}", f"/ui/jobs/{job['id']}/images/0",
                 f"/ui/jobs/{job['id']}/thumbs/0", f"/ui/batches/{batch['id']}/manifest",
                 f"/ui/batches/{batch['id']}/images.zip", f"/ui/jobs/{job['id']}/events"):
        response = page.goto(path)
        assert response.status == 404, path
        assert page.get_by_role("heading", name="Not found").is_visible(), path
    assert "not yours" not in page.content()
    for path in (f"/ui/jobs/{job['id']}/cancel", f"/ui/batches/{batch['id']}/cancel"):
        page.goto("/ui/gallery")  # a page with the session's token, posted by hand to another tenant's ids
        token = page.locator("input[name=csrf_token]").first.get_attribute("value")
        assert page.request.post(path, form={"csrf_token": token}).status == 404, path
    assert ApiClient(api_url, other.key).get(job["id"])["status"] != "canceled"


def test_a_form_post_without_the_csrf_token_or_from_another_origin_is_refused(console, api_url, tenant):
    page = console
    job = ApiClient(api_url, tenant.key).submit({"prompt": "keep running", **SMALL, "steps": 200}).json()
    cancel = f"/ui/jobs/{job['id']}/cancel"
    assert page.request.post(cancel, form={}).status == 403
    assert page.request.post(cancel, form={"csrf_token": "forged"}).status == 403
    page.goto("/ui/gallery")
    token = page.locator("input[name=csrf_token]").first.get_attribute("value")
    assert page.request.post(cancel, form={"csrf_token": token},
                             headers={"Origin": "https://evil.example"}).status == 403
    assert ApiClient(api_url, tenant.key).get(job["id"])["status"] in ("queued", "running")
    ApiClient(api_url, tenant.key).http.post(f"/v1/jobs/{job['id']}/cancel")


def test_cancel_a_job_from_its_page(console, worker, api_url, tenant, screenshot):
    page = console
    job = ApiClient(api_url, tenant.key).submit({"prompt": "a long one", **SMALL, "steps": 200}).json()
    page.goto(f"/ui/jobs/{job['id']}")
    # the stack makes previews (every 2 steps): the page shows the worker's sketch while the job runs
    expect(page.locator("#job-preview")).to_have_attribute("src", re.compile(r"^data:image/jpeg;base64,"),
                                                          timeout=60_000)
    assert page.locator("#job-preview").is_visible()
    screenshot(page, "job-running")
    page.get_by_role("button", name="Cancel").click()
    expect(page.locator("#job-status")).to_have_text("canceled", timeout=60_000)
    assert ApiClient(api_url, tenant.key).get(job["id"])["status"] == "canceled"
    assert page.get_by_role("button", name="Cancel").count() == 0
    screenshot(page, "job-canceled")


def _seed_gallery(tenant_id: uuid.UUID, count: int) -> list[str]:
    """`count` finished jobs with one small PNG each in the stack's S3, as a worker would have left them."""
    from sqlalchemy import func, select

    from common import thumbnails
    from common.db import session_scope
    from common.image_files import sha256_hex
    from common.job_states import new_job_values
    from common.job_request import JobRequest, to_params
    from common.models import Job, JobImage
    from common.settings import get_settings
    from common.storage import image_key, open_storage

    settings = get_settings()
    storage = open_storage(settings.storage)
    ids = []
    with session_scope() as session:
        start = session.scalar(select(func.now()))
        for i in range(count):
            params = to_params(JobRequest(prompt=f"seeded poster {i:03d}", **SMALL, seed=i), settings.api)
            job = Job(tenant_id=tenant_id, **{**new_job_values(params=params), "status": "succeeded",
                                              "attempts": 1, "progress_step": 12, "progress_total": 12,
                                              "created_at": start + timedelta(milliseconds=i)})
            session.add(job)
            session.flush()
            out = io.BytesIO()
            image = Image.new("RGB", (256, 256), ((i * 37) % 256, (i * 91) % 256, 160))
            image.save(out, format="PNG")
            data = out.getvalue()
            key = image_key(storage.prefix, tenant_id, job.id, 0)
            storage.put(key, data)
            thumbnails.store_for(storage, key, image, settings.console.thumbnail_px)  # as the worker does
            session.add(JobImage(job_id=job.id, index=0, seed=i, key=key, sha256=sha256_hex(data), width=256,
                                 height=256, size_bytes=len(data)))
            ids.append(str(job.id))
    return ids


FIRST_SCREEN = """() => [...document.querySelectorAll('.tile img')]
    .filter(img => img.getBoundingClientRect().top < window.innerHeight)
    .every(img => img.complete && img.naturalWidth > 0)"""


def first_screen_shown(page, started: float, timeout_s: float = 30) -> float:
    """Seconds from `started` until every thumbnail in the first screen is decoded (polled every 20 ms)."""
    while not page.evaluate(FIRST_SCREEN):
        assert time.monotonic() - started < timeout_s, "the gallery's first screen never finished loading"
        time.sleep(0.02)
    return time.monotonic() - started


def test_gallery_filters_and_scrolls_through_200_images(browser, api_url, screenshot):
    tenant = make_tenant()
    _seed_gallery(tenant.id, 200)
    context = browser.new_context(viewport={"width": 1280, "height": 800}, base_url=api_url)
    page = context.new_page()
    sign_in(page, tenant.key)
    started = time.monotonic()
    page.goto("/ui/gallery")
    first_screen_s = first_screen_shown(page, started)  # a fresh browser: every thumbnail read from storage
    assert page.locator(".tile").count() == 48
    assert "seeded poster 199" in page.locator(".tile .caption").first.inner_text()  # newest first
    screenshot(page, "gallery", full_page=False)
    # infinite scroll: reaching the end of the grid fetches the next pages until all 200 are shown
    for _ in range(10):
        if page.locator(".tile").count() == 200:
            break
        page.locator("a.more").scroll_into_view_if_needed()
        expect(page.locator(".tile")).not_to_have_count(page.locator(".tile").count())
    assert page.locator(".tile").count() == 200 and page.locator("a.more").count() == 0
    # the second view: the browser's cache too
    started = time.monotonic()
    page.goto("/ui/gallery")
    warm_first_screen_s = first_screen_shown(page, started)
    # filters: text in the prompt, status, and a preset nothing used
    page.get_by_label("Prompt contains").fill("poster 07")
    page.get_by_role("button", name="Filter").click()
    page.wait_for_url(re.compile(r"q=poster"))
    captions = page.locator(".tile .caption").all_inner_texts()
    assert sorted(captions) == [f"seeded poster {i:03d}" for i in range(70, 80)]
    page.goto("/ui/gallery?status=failed")
    assert page.locator(".tile").count() == 0 and page.get_by_text("No images match").is_visible()
    page.goto("/ui/gallery?preset=V4_QUALITY_48")
    assert page.locator(".tile").count() == 0
    response = page.goto("/ui/gallery?since=not-a-date")
    assert response.status == 422 and "since must be a date" in page.get_by_role("alert").inner_text()
    timings = {"first_screen_s": round(first_screen_s, 3), "first_screen_again_s": round(warm_first_screen_s, 3)}
    (ARTIFACTS / "gallery-timings.json").write_text(json.dumps(timings))
    print("gallery first screen:", timings)
    context.close()


def test_batch_upload_shows_line_errors_then_runs_to_completed(console, worker, screenshot, tmp_path):
    page = console
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"custom_id": "a", "prompt": "fine", **SMALL}) + "\n"
                   + json.dumps({"custom_id": "b", "prompt": "", **SMALL}) + "\n" + "{not json\n")
    page.goto("/ui/batches")
    page.get_by_label("JSONL file (one request per line)").set_input_files(str(bad))
    page.get_by_role("button", name="Upload and run").click()
    errors = page.locator("table.line-errors tbody tr")
    errors.first.wait_for()
    rows = [r.split("\t") for r in errors.all_inner_texts()]
    assert [r[0] for r in rows] == ["2", "3"] and rows[0][1] == "prompt"
    assert page.get_by_text("No batches yet.").is_visible()  # the refused upload left no batch behind
    screenshot(page, "batch-errors")
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"prompt": f"good line {i}", "custom_id": f"c{i}", **SMALL, "seed": i}) + "\n"
                            for i in range(3)))
    page.get_by_label("JSONL file (one request per line)").set_input_files(str(good))
    page.get_by_role("button", name="Upload and run").click()
    page.wait_for_url(re.compile(r"/ui/batches/[0-9a-f-]{36}$"))
    expect(page.locator("#batch-status")).to_have_text("completed", timeout=180_000)
    assert page.locator("#count-succeeded").inner_text() == "3"
    assert re.fullmatch(r"[0-9.]+ items / min", page.locator("#batch-rate").inner_text())
    assert re.fullmatch(r"[0-9.]+ s", page.locator("#batch-took").inner_text())
    screenshot(page, "batch")
    archive = page.request.get(page.url + "/images.zip")
    names = sorted(zipfile.ZipFile(io.BytesIO(archive.body())).namelist())
    assert names == ["c0-0.png", "c1-0.png", "c2-0.png", "manifest.jsonl"]


def test_webhooks_page_reveals_the_secret_on_click(console, api_url, tenant, screenshot):
    page = console
    page.goto("/ui/webhooks")
    assert page.locator("#webhook-secret").count() == 0
    page.get_by_role("button", name="Reveal the secret").click()
    secret = page.locator("#webhook-secret").inner_text()
    expected = httpx.get(f"{api_url}/v1/webhooks/secret", headers={"Authorization": f"Bearer {tenant.key}"}).json()
    assert secret == expected["secret"] and secret.startswith("whsec_")
    screenshot(page, "webhooks")


def test_pages_are_labelled_and_fit_a_phone(console, screenshot):
    page = console
    for path in ("/ui/create", "/ui/gallery", "/ui/batches", "/ui/webhooks"):
        page.goto(path)
        unlabelled = page.evaluate("""() => [...document.querySelectorAll('input, select, textarea')]
            .filter(e => e.type !== 'hidden' && !(e.labels && e.labels.length) && !e.getAttribute('aria-label'))
            .map(e => e.name)""")
        assert unlabelled == [], (path, unlabelled)
    page.set_viewport_size({"width": 390, "height": 844})
    for path in ("/ui/create", "/ui/gallery"):
        page.goto(path)
        assert page.evaluate("document.documentElement.scrollWidth") <= 390, path  # no sideways scrolling
        screenshot(page, "phone-" + path.rsplit("/", 1)[1])
    # keyboard: the first Tab reaches the skip link, which moves focus to the page's content
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.className") == "skip"
