"""The playground page in a real browser: Debian's headless Chromium, driven by Selenium through
Debian's chromedriver, loads the page from the live server, asks for a negative review and watches the
text stream in. `make test` installs chromium and chromium-driver where they are missing."""
import os
import shutil
import tempfile
import time

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')")
    if not (CHROMIUM and CHROMEDRIVER):
        (pytest.fail if os.environ.get("CI") == "true" else pytest.skip)("chromium and chromedriver are not installed (apt-get install chromium chromium-driver; "
                    "`make test` does this; under CI=true this fails instead of skipping)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="mingpt-chromium-")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait_for(condition, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
    return value


@pytest.fixture
def keyed_server(serve_ckpt):
    from conftest import LiveServer
    server = LiveServer(serve_ckpt, "--api_key", "page-key")
    yield server
    server.stop()


def test_the_page_streams_a_negative_review(browser, keyed_server, monkeypatch):
    """With a server that needs a key: the page says so, takes the key in its field, then streams the
    reviews, each token's log-probability on hover."""
    from selenium.webdriver.common.by import By
    from mingpt.serve.engine import Choice
    step = Choice.step

    def slow_step(self, token, logprob=None):  # the tiny model writes 60 tokens in milliseconds: a human-speed one
        time.sleep(0.01)
        return step(self, token, logprob)

    monkeypatch.setattr(Choice, "step", slow_step)
    browser.get(keyed_server.url + "/")
    wait_for(lambda: "API key" in browser.find_element(By.ID, "card").text)
    key = browser.find_element(By.ID, "api-key")
    key.send_keys("page-key")
    browser.execute_script("document.getElementById('api-key').dispatchEvent(new Event('change'));")
    card = wait_for(lambda: "layers" in browser.find_element(By.ID, "card").text and browser.find_element(By.ID, "card").text)
    browser.find_element(By.ID, "sentiment-neg").click()
    prompt = browser.find_element(By.ID, "prompt")
    prompt.clear()
    prompt.send_keys("难看")
    count = browser.find_element(By.ID, "count")
    count.clear()
    count.send_keys("2")
    max_tokens = browser.find_element(By.ID, "max-tokens")
    max_tokens.clear()
    max_tokens.send_keys("60")
    browser.execute_script("""
        window.seen = [];  // every distinct text the first review shows, as it changes
        new MutationObserver(() => {
          const t = document.querySelector('#reviews .review .text');
          if (t && window.seen[window.seen.length - 1] !== t.textContent) window.seen.push(t.textContent);
        }).observe(document.getElementById('reviews'), {subtree: true, childList: true, characterData: true});""")
    browser.find_element(By.ID, "go").click()
    wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#reviews .review")
             and not browser.find_elements(By.CSS_SELECTOR, "#reviews .review.writing"))
    reviews = browser.find_elements(By.CSS_SELECTOR, "#reviews .review")
    texts = [review.text for review in reviews]
    seen = browser.execute_script("return window.seen;")
    print(f"\nmodel card line: {card}\nthe page showed: {texts}\nthe first review grew through "
          f"{len(seen)} texts: {seen[:3]} … {seen[-1:]}")
    assert len(reviews) == 2
    assert all(text.startswith("negative") and "难看" in text for text in texts)
    assert len(seen) >= 3 and all(a == b[:len(a)] for a, b in zip(seen, seen[1:]))  # it grew piece by piece
    assert browser.find_element(By.ID, "status").text == ""
    tokens = browser.find_elements(By.CSS_SELECTOR, "#reviews .review .text .tok")
    assert tokens and all("log-probability" in t.get_attribute("title") for t in tokens)
    assert "".join(t.text for t in tokens[:3]) in texts[0]
