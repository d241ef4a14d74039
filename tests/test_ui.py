"""The page (/ui, issue 17 section 2) in a real browser: Debian's headless Chromium driven by
Playwright, against a real daemon behind an API key with scripted card models. The page asks for
the key once, shows the models and their states, a load shows its progress bar moving, a chat
streams the model's known answer, and stop ends an answer part-way (the daemon records it as
aborted). With AXM1_UI_SCREENSHOTS set, a screenshot of each step goes into that folder."""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import httpx
import pytest

from ax_emulator.scripted import reply_text
from harness.daemon import running_daemon
from harness.models import scripted_model

playwright_api = pytest.importorskip("playwright.sync_api")

KEY = "ui-test-key"
SLOW_LOADER = "slow-loader"  # takes 4 s to load, so that its progress bar is seen moving
CHATTY = "chatty"  # a long answer at 10 tokens/s, so that stop lands part-way
WORDS = 6


def chromium() -> str:
    for name in ("chromium-headless-shell", "chromium"):
        found = shutil.which(name) or (Path("/usr/lib/chromium") / name if (Path("/usr/lib/chromium") / name).exists() else None)
        if found:
            return str(found)
    pytest.fail("Chromium is not installed: ./run test installs Debian's chromium-headless-shell")


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    root = tmp_path_factory.mktemp("ui")
    entries = [
        scripted_model(root, SLOW_LOADER, reply_words=WORDS, tokens_per_second=100,
                       extra_flags=("--emu_init_seconds 4",), fields={"run_on_startup": "false"}),
        scripted_model(root, CHATTY, reply_words=200, tokens_per_second=10, fields={"run_on_startup": "true"}),
    ]
    with running_daemon(root, entries, "--api-keys", KEY) as d:
        d.api_key = KEY
        d.wait_state(CHATTY, "ready")
        yield d


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def page(browser, daemon):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert errors == [], f"the page's script failed: {errors}"


def shot(page, name: str) -> None:
    folder = os.environ.get("AXM1_UI_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(folder) / f"{name}.png"), full_page=True)


def open_page(page, daemon) -> None:
    page.goto(f"{daemon.url}/ui/")
    dialog = page.get_by_role("dialog")
    dialog.wait_for()
    page.get_by_role("textbox", name="Key").fill(KEY)
    page.get_by_role("button", name="Use this key").click()
    page.locator(f'[data-model="{CHATTY}"]').wait_for()


def card(page, model: str):
    return page.locator(f'[data-model="{model}"]')


def test_the_page_needs_no_key_but_its_data_does(daemon) -> None:
    with httpx.Client(base_url=daemon.url) as client:
        page = client.get("/ui/")
        assert page.status_code == 200 and "<title>axm1-llm</title>" in page.text
        assert client.get("/ui/app.js").status_code == 200
        assert client.get("/api/status").status_code == 401
        assert client.get("/ui/../api/status").status_code in (401, 404)


def test_models_and_their_states(page, daemon) -> None:
    open_page(page, daemon)
    chatty, loader = card(page, CHATTY), card(page, SLOW_LOADER)
    playwright_api.expect(chatty.locator(".state")).to_have_text("ready")
    playwright_api.expect(loader.locator(".state")).to_have_text("stopped")
    playwright_api.expect(loader.get_by_role("button", name=f"Load {SLOW_LOADER}", exact=True)).to_be_enabled()
    playwright_api.expect(chatty.get_by_role("button", name=f"Load {CHATTY}", exact=True)).to_be_disabled()
    playwright_api.expect(page.locator("#connection")).to_have_text("live")
    shot(page, "1-ready")


def test_a_load_shows_a_moving_progress_bar(page, daemon) -> None:
    open_page(page, daemon)
    loader = card(page, SLOW_LOADER)
    loader.get_by_role("button", name=f"Load {SLOW_LOADER}", exact=True).click()
    bar = loader.locator("progress")
    bar.wait_for(state="visible", timeout=10_000)
    values: list[float] = []
    deadline = time.monotonic() + 20
    shot_taken = False
    while time.monotonic() < deadline and loader.locator(".state").inner_text() != "ready":
        value = bar.evaluate("b => b.hasAttribute('value') ? b.value : null")
        if value is not None and (not values or value != values[-1]):
            values.append(value)
            if value > 0 and not shot_taken:
                shot(page, "2-loading")
                shot_taken = True
        time.sleep(0.05)
    assert loader.locator(".state").inner_text() == "ready"
    assert len(values) >= 2 and values == sorted(values) and values[-1] > values[0], values
    playwright_api.expect(loader.locator(".progress")).to_be_hidden()
    with daemon.client() as client:
        assert client.post(f"/api/models/{SLOW_LOADER}/unload").status_code == 200


def test_a_chat_streams_the_answer(page, daemon) -> None:
    open_page(page, daemon)
    page.get_by_label("Model", exact=True).select_option(SLOW_LOADER)
    page.get_by_label("System prompt", exact=True).fill("Answer briefly.")
    page.get_by_label("Message", exact=True).fill("hello from the page")
    page.get_by_role("button", name="Send").click()
    answer = page.locator(".message-assistant .content").last
    expected = reply_text("hello from the page", WORDS, False)
    playwright_api.expect(answer).to_have_text(expected, timeout=30_000)
    playwright_api.expect(page.locator("#chat-status")).to_contain_text("tokens/s")
    # The answer's speed reaches the model's chart through the event stream.
    playwright_api.expect(card(page, SLOW_LOADER).locator(".speed-text")).to_contain_text("last")
    shot(page, "3-chat")
    # A second turn carries the first: the scripted model answers the new line.
    page.get_by_label("Message", exact=True).fill("and again")
    page.get_by_label("Message", exact=True).press("Enter")
    playwright_api.expect(page.locator(".message-assistant .content").last).to_have_text(
        reply_text("and again", WORDS, False), timeout=30_000)


def test_stop_ends_an_answer_part_way(page, daemon) -> None:
    open_page(page, daemon)
    page.get_by_label("Model", exact=True).select_option(CHATTY)
    page.get_by_label("Message", exact=True).fill("tell me a long story")
    page.get_by_role("button", name="Send").click()
    answer = page.locator(".message-assistant .content").last
    playwright_api.expect(page.locator("#chat-status")).to_have_text("answering…", timeout=30_000)
    page.wait_for_timeout(500)
    page.get_by_role("button", name="Stop").click()
    playwright_api.expect(page.locator("#chat-status")).to_have_text("stopped")
    shot(page, "4-stopped")
    partial = answer.inner_text()
    full = reply_text("tell me a long story", 200, False)
    assert partial and full.startswith(partial) and len(partial) < len(full) / 2
    # The daemon ended the generation: the model is free again well before the full answer's 20 s.
    daemon.wait_state(CHATTY, "ready", timeout=10)
    playwright_api.expect(page.get_by_role("button", name="Send")).to_be_enabled()
