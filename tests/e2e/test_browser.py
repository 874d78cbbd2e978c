"""A real browser: Debian's Chromium, driven by Playwright through its executable path, clicks
through Data → Tune → Ask → Inspect → Compare and checks what the page shows. Screenshots go to
$PETSTUDIO_SCREENSHOTS (default tests/e2e/screenshots). Without Chromium the test is skipped,
unless PETSTUDIO_REQUIRE_BROWSER=1 (as in .ci/run), where it fails."""
import os
import time
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("PETSTUDIO_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
SCREENSHOTS = Path(os.environ.get("PETSTUDIO_SCREENSHOTS", Path(__file__).parent / "screenshots"))


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).is_file():
        message = f"no Chromium at {CHROMIUM}: install Debian's chromium package (apt-get install -y chromium)"
        if os.environ.get("PETSTUDIO_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield browser
        browser.close()


def _shot(page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def _tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def _wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.25)


def test_click_through_the_app(app_server, browser):
    url, sessions = app_server
    before = set(sessions.iterdir()) if sessions.exists() else set()
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(120_000)
    page.goto(url)

    # Data: the default sample set (the offline world's novel colours).
    page.get_by_role("button", name="Load sample set").click()
    page.get_by_text("64 images, 128 captions").wait_for()
    assert page.get_by_text("Validation:").first.is_visible()
    assert page.locator("[data-testid='gallery'] img, .gallery img, button img").count() >= 12
    _shot(page, "1-data")

    # Tune: Aurora on the offline model with the defaults, 16 shots.
    _tab(page, "Tune")
    assert page.get_by_text("The bundled offline model").is_visible()
    page.get_by_role("button", name="Start tuning").click()
    card = page.locator("h3", has_text="1 · aurora · offline")
    card.wait_for()
    page.get_by_text("done in").wait_for()
    body = page.locator("body").inner_text()
    assert "text→image R@1" in body and "zero-shot" in body and "trainable of" in body
    assert page.locator(".js-plotly-plot").count() >= 1   # the loss curve
    _shot(page, "2-tune")

    # Ask: frozen and tuned side by side.
    _tab(page, "Ask")
    page.get_by_label("Describe what to find").fill("a small pink circle")
    page.get_by_role("button", name="Search").click()
    frozen, tuned = page.locator("#frozen-hits"), page.locator("#tuned-hits")
    _wait_until(lambda: frozen.locator("img").count() == 5 and tuned.locator("img").count() == 5, 120,
                "five results in both galleries")
    captions = page.locator("body").inner_text()
    assert captions.count("novel-colours-") >= 10   # "score · file" under each of the ten results
    _shot(page, "3-ask")

    # Inspect: budget, gates, the training curves.
    _tab(page, "Inspect")
    page.get_by_role("button", name="Inspect", exact=True).click()
    _wait_until(lambda: page.locator(".js-plotly-plot").count() >= 5, 120, "the Inspect plots")
    body = page.locator("body").inner_text()
    assert "Trainable" in body and "Aurora: mode vectors" in body
    _shot(page, "4-inspect")

    # Compare: this session's run in the table.
    _tab(page, "Compare")
    page.get_by_role("button", name="Refresh").click()
    table = page.locator("#runs-table")
    _wait_until(lambda: "1 · aurora · offline" in table.inner_text(), 60, "the run in the table")
    assert "text→image R@1" in table.inner_text() and "file KiB" in table.inner_text()
    _shot(page, "5-compare")

    mine = set(sessions.iterdir()) - before
    assert len(mine) == 1 and (next(iter(mine)) / "runs").is_dir()
    page.close()   # the session ends: its folder is removed
    _wait_until(lambda: not next(iter(mine)).exists(), 30, "the session folder to be removed")


def test_a_report_opens_with_no_network_and_shows_its_figures(browser, shapes, tmp_path):
    from core.report import write_report
    from core.sweep import parse_methods, sweep

    result = sweep("openclip:PETStudio-Tiny", shapes, parse_methods("lora,vlpet:granularity=middleX"), [0, 1],
                   tmp_path / "sweep", shots=4, epochs=1)
    report = write_report(result.out, tmp_path / "report.html")
    context = browser.new_context()
    context.set_offline(True)
    requested = []
    context.route("**/*", lambda route: (requested.append(route.request.url),
                                         route.continue_() if route.request.url.startswith("file:") else route.abort()))
    page = context.new_page()
    page.goto(report.as_uri())
    expected = 1 + 3 * len(result.methods)   # the comparison, then each method's budget, gates and curve
    _wait_until(lambda: page.locator(".js-plotly-plot .main-svg").count() >= expected, 60, "the report's figures")
    assert page.locator(".js-plotly-plot").count() == expected
    assert page.get_by_text("Methods compared").first.is_visible()
    assert all(url.startswith("file:") for url in requested), requested
    _shot(page, "report")
    context.close()
