"""The web playground in a real headless browser (Debian's chromium, driven by Playwright; nothing is
downloaded) against the real server on the real SmolLM2 with the demo experts, an API key and an admin
key set: chat with an expert and with "auto" (streamed answers, the routing decision), compare two
models, register an expert by uploading its two files, chat with it, retire it, and watch the live view
follow the traffic. Screenshots of each page go to test-artifacts/playground/ (LORAPLEX_ARTIFACTS)."""
import os
import shutil
from pathlib import Path

import httpx
import pytest

from tests.support.harness import ServerProcess, wait_until
from tests.support import in_process

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "training" / "demo"
ARTIFACTS = Path(os.environ.get("LORAPLEX_ARTIFACTS", REPO / "test-artifacts")) / "playground"
API_KEY, ADMIN_KEY = "user-key-1", "admin-key-1"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
TIMEOUT_MS = 120_000


@pytest.fixture(scope="module")
def site(tmp_path_factory, cache_dir):
    workdir = tmp_path_factory.mktemp("playground")
    settings = {"max_batch_size": 4, "context_window": 512, "default_max_tokens": 48,
                "adapters": {name: {"path": str(DEMO / name / "adapter")} for name in ("pirate", "json-answer")}}
    env = {"LORAPLEX_CACHE": cache_dir, "LORAPLEX_API_KEY": API_KEY, "LORAPLEX_ADMIN_KEY": ADMIN_KEY}
    server = ServerProcess(workdir, settings, env=env).start()
    assert wait_until(lambda: server.health()["router"] == "ready", 120)
    yield server
    assert server.stop() == 0, server.log()


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.fail("the playground tests need a real browser: apt-get install chromium (.ci/run does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking"])
        yield browser
        browser.close()


def open_page(browser, site, width=1280, height=800):
    context = browser.new_context(viewport={"width": width, "height": height})
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    page.errors = []
    page.on("pageerror", lambda error: page.errors.append(str(error)))
    page.goto(site.base_url + "/")
    return page


@pytest.fixture
def page(browser, site):
    page = open_page(browser, site)
    yield page
    errors = page.errors
    page.context.close()
    assert not errors, errors  # no script error in the page, whatever the test did


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def enter_keys(page, admin: bool = False) -> None:
    page.get_by_label("API key").fill(API_KEY)
    page.get_by_label("API key").dispatch_event("change")
    if admin:
        page.get_by_label("Admin key").fill(ADMIN_KEY)
        page.get_by_label("Admin key").dispatch_event("change")


def chat(page, model: str, prompt: str, column: str = "#column-a") -> dict:
    """Send `prompt` to `model` through the page; the finished turn's text and meta line."""
    page.select_option("#model", model)
    page.get_by_label("Message").fill(prompt)
    page.get_by_label("Message").press("Enter")
    turn = page.locator(f"{column} .turn").last
    turn.locator(".meta .finish").wait_for()
    return {"text": turn.locator(".answer-text").inner_text(), "expert": turn.locator(".meta .expert").inner_text(),
            "source": turn.locator(".meta .source").inner_text(), "turn": turn}


def test_the_page_asks_for_the_key_shows_the_api_errors_and_keeps_keys_out_of_urls_and_storage(page):
    status = page.locator("#status")
    status.wait_for()
    assert "Models: 401: Missing or wrong API key" in status.inner_text()  # the API's own words
    enter_keys(page)
    page.locator("#model option[value='pirate']").wait_for(state="attached")
    options = page.locator("#model option").evaluate_all("options => options.map(o => o.value)")
    assert {"pirate", "json-answer", "auto"} <= set(options)
    kept = page.evaluate("JSON.stringify(localStorage) + JSON.stringify(sessionStorage) + document.cookie")
    assert API_KEY not in kept and API_KEY not in page.url
    shot(page, "keys")


def test_chat_streams_an_expert_answer_and_auto_shows_the_routing_decision(page):
    enter_keys(page)
    page.locator("#model option[value='pirate']").wait_for(state="attached")
    page.get_by_label("Temperature").fill("0")
    # every rendering of the answer while it streams: several growing lengths, not one final paste
    page.evaluate("""() => { window.lengths = [];
        new MutationObserver(() => { for (const t of document.querySelectorAll('#column-a .answer-text'))
            window.lengths.push(t.textContent.length); })
        .observe(document.querySelector('#column-a'), {subtree: true, childList: true, characterData: true}); }""")
    answer = chat(page, "pirate", "Tell me about the weather today.")
    assert answer["expert"] == "pirate" and answer["source"] == "model"
    assert answer["text"].strip()
    assert len(set(page.evaluate("window.lengths"))) >= 3, "the answer did not stream"
    assert answer["turn"].locator(".meta .ttft").inner_text().endswith(" ms")
    assert answer["turn"].locator(".meta .rate").inner_text().endswith(" tokens/s")
    routed = chat(page, "auto", "Ahoy matey, talk like a pirate captain and tell me about your ship.")
    assert routed["expert"] == "pirate" and routed["source"] == "classifier"
    assert routed["turn"].locator(".meta .score").inner_text() != "–"
    ranking = routed["turn"].locator("details.ranking")
    ranking.locator("summary").click()
    assert "decision: pirate via classifier" in ranking.locator(".decision").inner_text()
    assert ranking.locator("li").first.inner_text().startswith("pirate: score ")
    shot(page, "chat")


def test_compare_mode_sends_one_prompt_to_two_models_side_by_side(page):
    enter_keys(page)
    page.locator("#model option[value='json-answer']").wait_for(state="attached")
    assert not page.locator("#model-b-label").is_visible() and not page.locator("#column-b").is_visible()
    page.get_by_label("Compare").check()
    assert page.locator("#model-b-label").is_visible()
    page.select_option("#model-b", page.locator("#model-b option").first.get_attribute("value"))  # the base
    page.get_by_label("Temperature").fill("0")
    left = chat(page, "json-answer", "What is the capital of Italy?")
    right = page.locator("#column-b .turn").last
    right.locator(".meta .finish").wait_for()
    assert left["expert"] == "json-answer" and left["text"].lstrip().startswith("{")
    assert right.locator(".meta .expert").inner_text() == page.locator("#model-b").input_value()
    assert right.locator(".answer-text").inner_text().strip() != left["text"].strip()
    shot(page, "compare")


def test_register_by_upload_chat_with_it_and_retire_it(page):
    enter_keys(page, admin=True)
    page.get_by_role("tab", name="Experts").click()
    row = page.locator("#experts-table tr[data-expert='pirate']")
    row.wait_for()
    assert row.locator("td").nth(1).inner_text() in ("device", "cpu", "disk")
    page.get_by_label("Name").fill("terse-upload")
    page.get_by_label("Description").fill("Answers in one short sentence.")
    page.get_by_label("Examples for the router, one per line").fill("Summarise this in one sentence.\nBe brief.")
    page.get_by_label("adapter_config.json").set_input_files(str(DEMO / "terse" / "adapter" / "adapter_config.json"))
    page.get_by_label("adapter_model.safetensors").set_input_files(
        str(DEMO / "terse" / "adapter" / "adapter_model.safetensors"))
    page.get_by_role("button", name="Register").click()
    page.locator("#experts-table tr[data-expert='terse-upload']").wait_for()
    assert "Registered terse-upload." in page.locator("#status").inner_text()
    shot(page, "experts")
    page.get_by_role("tab", name="Chat").click()
    page.locator("#model option[value='terse-upload']").wait_for(state="attached")
    answer = chat(page, "terse-upload", "Explain how rain forms.")
    assert answer["expert"] == "terse-upload" and answer["text"].strip()
    page.get_by_role("tab", name="Experts").click()
    page.get_by_role("button", name="Retire terse-upload").click()
    page.locator("#experts-table tr[data-expert='terse-upload']").wait_for(state="detached")
    page.locator("#model option[value='terse-upload']").wait_for(state="detached")
    headers = {"Authorization": f"Bearer {API_KEY}"}
    gone = httpx.post(page.url.rstrip("/") + "/v1/chat/completions", headers=headers, timeout=30,
                      json={"model": "terse-upload", "messages": [{"role": "user", "content": "hi"}]})
    assert gone.status_code == 404


def test_the_live_view_follows_the_traffic(page, site):
    enter_keys(page, admin=True)
    page.get_by_role("tab", name="Live").click()
    requests = page.locator("#stat-requests")
    assert wait_until(lambda: requests.inner_text() != "–", 10)
    before = float(requests.inner_text())
    for _ in range(2):
        reply = httpx.post(site.base_url + "/v1/chat/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                           timeout=60, json={"model": "json-answer", "max_tokens": 16,
                                             "messages": [{"role": "user", "content": "Name a colour."}]})
        assert reply.status_code == 200
    assert wait_until(lambda: float(requests.inner_text()) >= before + 2, 10)
    page.locator("#traffic li[data-expert='json-answer']").wait_for()
    assert page.locator("#stat-ttft").inner_text().endswith(" ms")
    assert " of " in page.locator("#stat-adapter-memory").inner_text()  # slots in use, of the pool
    assert page.locator("#chart-throughput polyline").get_attribute("points").count(",") >= 2
    shot(page, "live")


def test_keyboard_and_phone_width(browser, site):
    page = open_page(browser, site, width=390, height=844)
    try:
        page.locator("#tab-chat").focus()
        page.keyboard.press("ArrowRight")
        assert page.locator("#panel-experts").is_visible() and not page.locator("#panel-chat").is_visible()
        assert page.evaluate("document.activeElement.id") == "tab-experts"
        page.keyboard.press("ArrowRight")
        assert page.locator("#panel-live").is_visible()
        page.keyboard.press("Home")
        assert page.locator("#panel-chat").is_visible()
        # every control has a label; nothing is wider than the phone's screen
        unlabelled = page.evaluate("""() => [...document.querySelectorAll('input, select, textarea')]
            .filter(e => !e.labels || e.labels.length === 0).map(e => e.id)""")
        assert unlabelled == []
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        shot(page, "phone")
        assert not page.errors, page.errors
    finally:
        page.context.close()


def test_ui_off_is_404_and_the_page_is_served_with_a_strict_policy(tiny_folder, tmp_path):
    with in_process(tiny_folder, tmp_path / "on", router=False) as (state, client):
        page = client.get("/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert "default-src 'self'" in page.headers["content-security-policy"]
        assert client.get("/ui/app.js").status_code == 200
    with in_process(tiny_folder, tmp_path / "off", router=False, ui=False) as (state, client):
        assert client.get("/").status_code == 404 and client.get("/ui/app.js").status_code == 404
