"""Magic prompt through real workers.

- The tiny model's own enhancer (a random head, tests/worker/pipeline/test_magic_prompt.py): its answers are not
  captions, so `AUTO` keeps the text prompt (stored as such) and `ON` fails with a clear error.
- An OpenAI-compatible endpoint (`LETTERPRESS_MAGIC_PROMPT__ENDPOINT`), here a local HTTP server standing in for a
  vLLM server (it answers the chat with a fixed caption per prompt; the tiny model cannot write one): the caption
  is stored on the job and in the recipe, the stored caption alone reproduces the image, the enhancer is not asked
  twice for the same request, an invalid first answer is retried once.
"""
from __future__ import annotations

import http.server
import io
import json
import threading
import time
import uuid
from datetime import datetime

import httpx
import pytest
from PIL import Image

from common.image_files import read_recipe
from tests.worker.conftest import make_own_stack

JOB = {"width": 256, "height": 256, "preset": "V4_TURBO_12", "steps": 2, "seed": 11}
CAPTION = {"high_level_description": "A flat poster that says MAGIC.",
           "compositional_deconstruction": {"background": "Plain deep blue.",
                                            "elements": [{"type": "text", "text": "MAGIC", "desc": "White letters."}]}}


def pixels(data: bytes) -> bytes:
    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB").tobytes()


class ChatServer:
    """Answers POST /v1/chat/completions: the caption for a prompt containing MAGIC, text that is not a caption for
    one containing FAIL, and for one containing RETRY, first not a caption, then the caption."""

    def __init__(self):
        self.asked: list[str] = []
        self.asked_at: list[float] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                user = body["messages"][-1]["content"]
                server.asked.append(user)
                server.asked_at.append(time.time())
                if "FAIL" in user or ("RETRY" in user and sum("RETRY" in a for a in server.asked) == 1):
                    content = "Sure! Here is a caption: a poster"
                else:
                    content = json.dumps(CAPTION)
                data = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"


@pytest.fixture(scope="module")
def chat():
    server = ChatServer()
    yield server
    server.httpd.shutdown()


@pytest.fixture(scope="module")
def stack(services, stack_env, tmp_path_factory, chat):
    stack = make_own_stack(services, stack_env, tmp_path_factory, bucket=f"magic-{uuid.uuid4().hex[:6]}",
                           LETTERPRESS_MAGIC_PROMPT__ENDPOINT=chat.url,
                           LETTERPRESS_MAGIC_PROMPT__MODEL="ideogram4-enhancer")
    stack.start_worker({"LETTERPRESS_WORKER__CPU_THREADS": "1"})
    yield stack
    stack.procs.stop_all()
    stack.engine.dispose()
    stack.redis.stop()
    stack.pg.stop()


def test_the_tiny_models_own_enhancer_auto_keeps_the_prompt_and_on_fails(client, worker):
    auto = client.wait(client.submit({**JOB, "prompt": "a cat on a mat", "magic_prompt": "AUTO"}).json()["id"])
    assert auto["status"] == "succeeded", auto
    assert "caption" not in auto["request"] and auto["request"]["prompt"] == "a cat on a mat"
    recipe = read_recipe(httpx.get(auto["images"][0]["url"]).content)
    assert recipe["magic_prompt"] == {"mode": "AUTO", "prompt": "a cat on a mat", "enhanced": False}
    on = client.wait(client.submit({**JOB, "prompt": "a dog", "magic_prompt": True}).json()["id"])
    assert on["status"] == "failed" and "no valid caption" in on["error"]["message"], on
    assert on["error"]["exception"] == "MagicPromptFailed"


def test_an_endpoint_caption_is_stored_reproduces_and_is_not_asked_twice(stack, chat):
    client = stack.client()
    body = {**JOB, "prompt": "a poster that says MAGIC", "magic_prompt": "ON"}
    done = client.wait(client.submit(body).json()["id"])
    assert done["status"] == "succeeded", done
    assert done["request"]["caption"] == CAPTION and done["request"]["prompt"] == body["prompt"]
    image = httpx.get(done["images"][0]["url"]).content
    recipe = read_recipe(image)
    assert recipe["caption"] == CAPTION and recipe["magic_prompt"]["enhanced"] is True
    asked = len(chat.asked)
    assert asked == 1 and "a poster that says MAGIC" in chat.asked[0] and "1:1" in chat.asked[0]

    # the stored caption alone reproduces the image, no enhancer involved (the same pixels; the file's recipe
    # differs by its magic_prompt entry)
    plain = {k: v for k, v in body.items() if k not in ("prompt", "magic_prompt")}
    again = client.wait(client.submit({**plain, "caption": CAPTION, "cache": False}).json()["id"])
    assert pixels(httpx.get(again["images"][0]["url"]).content) == pixels(image)
    # the same magic request again: the worker's cache answers, the endpoint is not asked
    repeat = client.wait(client.submit({**body, "cache": False}).json()["id"])
    assert repeat["status"] == "succeeded" and repeat["images"][0]["sha256"] == done["images"][0]["sha256"]
    assert len(chat.asked) == asked


def test_an_endpoint_answer_that_is_not_a_caption_is_retried_once_then_fails_or_falls_back(stack, chat):
    client = stack.client()
    retried = client.wait(client.submit({**JOB, "prompt": "RETRY me", "magic_prompt": "ON"}).json()["id"])
    assert retried["status"] == "succeeded" and retried["request"]["caption"] == CAPTION, retried
    assert sum("RETRY" in a for a in chat.asked) == 2
    failed = client.wait(client.submit({**JOB, "prompt": "FAIL me", "magic_prompt": "ON"}).json()["id"])
    assert failed["status"] == "failed" and "no valid caption" in failed["error"]["message"]
    kept = client.wait(client.submit({**JOB, "prompt": "FAIL me too", "magic_prompt": "AUTO"}).json()["id"])
    assert kept["status"] == "succeeded" and "caption" not in kept["request"]


def test_one_enhancer_call_also_answers_the_queued_jobs_magic_prompts(stack, chat):
    """Three magic-prompt jobs wait while no worker runs; the first job's enhancer call answers all three (the
    others' captions are stored while they are still queued), so no later job asks again."""
    client = stack.client()
    stack.stop_workers()
    stack.workers.clear()
    before = len(chat.asked)
    ids = [client.submit({**JOB, "prompt": f"a poster that says MAGIC number {i}", "magic_prompt": "ON"}).json()["id"]
           for i in range(3)]
    stack.start_worker({"LETTERPRESS_WORKER__CPU_THREADS": "1"})
    done = [client.wait(i) for i in ids]
    assert [d["status"] for d in done] == ["succeeded"] * 3, done
    assert all(d["request"]["caption"] == CAPTION for d in done)
    asked = chat.asked_at[before:]
    assert len(asked) == 3  # each prompt once
    starts = sorted(datetime.fromisoformat(d["started_at"]).timestamp() for d in done)
    assert max(asked) < starts[1]  # all three were asked before the second job started: one call
