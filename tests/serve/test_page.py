"""The web page at /, in a real headless Chromium against a real server: what it shows is what the API
gives a client for the same messages, the base and the character decode in one batch, and the API key,
Stop and Reset work."""
import json
import os
import shutil
import urllib.request

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.browser]

QUESTION = "第5个问题：今天海上风大吗？"


@pytest.fixture(scope="module")
def browser():
    """Debian's chromium, driven by Playwright (which downloads no browser of its own here). make test-slow
    installs it and sets ROLETUNE_BROWSER, so there a missing browser fails rather than skips."""
    path = os.environ.get("ROLETUNE_BROWSER") or shutil.which("chromium")
    if path is None:
        pytest.skip("no Chromium: make test-slow installs Debian's chromium")
    assert os.access(path, os.X_OK), f"ROLETUNE_BROWSER={path} is not a program"
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=path, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        yield launched
        launched.close()


@pytest.fixture
def page(browser):
    context = browser.new_context()
    opened = context.new_page()
    errors = []
    opened.on("pageerror", lambda error: errors.append(str(error)))
    yield opened
    context.close()
    assert not errors, errors  # no uncaught JavaScript error


def health(url) -> dict:
    with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
        return json.loads(response.read())


def ask(page, text):
    from playwright.sync_api import expect

    page.fill("#message", text)
    page.press("#message", "Enter")
    for pane in ("#character-pane", "#base-pane"):
        if page.locator(pane).is_visible():
            expect(page.locator(f"{pane} .turn.assistant").last).to_have_attribute("data-state", "done",
                                                                                timeout=60_000)


def replies(page, pane) -> list[str]:
    return page.locator(f"#{pane}-pane .turn.assistant").all_text_contents()


def api_reply(url, model, messages, key="unused") -> str:
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
    return client.chat.completions.create(model=model, messages=messages, temperature=0,
                                          max_tokens=24).choices[0].message.content


def test_the_page_shows_what_the_api_gives_both_panes_decoding_together(page, server, trained_run, tiny_model):
    from playwright.sync_api import expect

    page.goto(server)
    expect(page.locator("#character")).to_have_value(trained_run.name)
    assert page.locator("#character option").all_text_contents() == [trained_run.name, "keeper"]
    system = page.input_value("#system")
    assert system and "守灯人" in system  # the run's persona, visible and editable
    page.fill("#temperature", "0")
    page.fill("#max_tokens", "24")
    before = health(server)
    ask(page, QUESTION)
    after = health(server)
    assert (after["requests"] - before["requests"], after["batches"] - before["batches"]) == (2, 1)
    messages = [{"role": "system", "content": system}, {"role": "user", "content": QUESTION}]
    tuned, base = replies(page, "character"), replies(page, "base")
    assert tuned == [api_reply(server, trained_run.name, messages)] and "灯塔照常亮着" in tuned[0]
    assert base == [api_reply(server, tiny_model.name, messages)] and base != tuned

    # A second turn carries each pane's own conversation, under the edited system prompt.
    page.fill("#system", "你是一位说书人。")
    ask(page, "第6个问题：今天海上风大吗？")
    for pane, model, said in (("character", trained_run.name, tuned[0]), ("base", tiny_model.name, base[0])):
        history = [{"role": "system", "content": "你是一位说书人。"}, {"role": "user", "content": QUESTION},
                   {"role": "assistant", "content": said}, {"role": "user", "content": "第6个问题：今天海上风大吗？"}]
        assert replies(page, pane)[1] == api_reply(server, model, history)

    page.click("#reset")
    assert page.locator(".turn").count() == 0 and page.input_value("#system") == system
    page.select_option("#character", "keeper")
    page.uncheck("#with-base")
    ask(page, QUESTION)
    assert replies(page, "character") == [api_reply(server, "keeper", messages)]
    assert not page.locator("#base-pane").is_visible() and page.locator("#base-pane .turn").count() == 0


def test_stop_ends_a_reply_and_the_server_goes_on(page, server):
    from playwright.sync_api import expect

    page.goto(server)
    page.fill("#temperature", "0")
    page.fill("#max_tokens", "2000")  # the base, random weights, would ramble to the end
    page.fill("#message", "讲个很长的故事。")
    page.press("#message", "Enter")
    expect(page.locator("#base-pane .turn.assistant")).not_to_have_text("", timeout=60_000)
    page.click("#stop")
    expect(page.locator("#base-pane .turn.assistant")).to_have_attribute("data-state", "stopped")
    expect(page.locator("#send")).to_be_enabled()
    page.fill("#max_tokens", "8")
    ask(page, QUESTION)
    assert page.locator("#base-pane .turn.assistant").last.get_attribute("data-finish") == "length"


def test_with_an_api_key_the_page_asks_for_it_and_sends_it(page, key_server, trained_run):
    from playwright.sync_api import expect

    page.goto(key_server.url)
    expect(page.locator("#key-form")).to_be_visible()
    page.fill("#key", "wrong")
    page.click("#key-form button")
    expect(page.locator("#key-error")).to_have_text("that key was refused")
    page.fill("#key", key_server.key)
    page.click("#key-form button")
    expect(page.locator("#key-form")).to_be_hidden()
    expect(page.locator("#character")).to_have_value(trained_run.name)
    page.fill("#temperature", "0")
    page.fill("#max_tokens", "24")
    ask(page, QUESTION)
    system = page.input_value("#system")
    assert replies(page, "character") == [api_reply(key_server.url, trained_run.name,
                                                    [{"role": "system", "content": system},
                                                     {"role": "user", "content": QUESTION}], key=key_server.key)]
