"""The web app in a real headless browser, at desktop (1280x900) and phone (390x844) sizes, checked
for what a person sees: the caption appears on upload with its evidence and is scrolled into view,
problems are text in view, nothing sits off-screen, no table cell runs into the next, no label is cut."""

import contextlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from playwright.sync_api import expect, sync_playwright

from captioner.model.options import DecodeOptions

from .app_server import running_app
from .shapes import shape_image

CHROMIUM = Path("/usr/bin/chromium")
# Offline and quiet: no component updates, no sync, and every host except the app unresolvable.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-quic",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
]  # a test camera
REVIEW_SCREENSHOT = Path("/tmp/app_screenshot.png")
ALL_IMAGES_SHOWN = "[...document.querySelectorAll('img')].every(i => i.complete && i.naturalWidth > 0)"
SIZES = {"desktop": (1280, 900), "phone": (390, 844)}
CARD = """# Shapes model

## Data

Ten thousand drawn shapes, one per photo.

## Scores (held-out shapes)

| decoding | BLEU-4 | METEOR | CIDEr |
|---|---|---|---|
| **beam 3 (default)** | 71.20 | 40.10 | **123.45** |

![the attention of every word](attention.png)
"""

# In the viewport, with a size: what a person looking at the screen can see.
IN_VIEW = """e => { const r = e.getBoundingClientRect();
  return r.width > 0 && r.height > 0 && r.top >= -1 && r.left >= -1
         && r.bottom <= innerHeight + 1 && r.right <= innerWidth + 1; }"""
# Each listed element that is shown: [its text, left, right, text cut (wider than its box)?].
BOXES = """selector => [...document.querySelectorAll(selector)].filter(e => e.offsetWidth > 0).map(e => {
  const r = e.getBoundingClientRect();
  return [e.innerText, r.left, r.right, e.scrollWidth > e.clientWidth + 1]; })"""
# The alternatives table, row by row: [text, cell left, cell right, text left, text right] per cell.
CELLS = """() => [...document.querySelectorAll('#alternatives [role=row]')].map(row =>
  [...row.querySelectorAll('[role=gridcell]')].map(cell => {
    const c = cell.getBoundingClientRect(), range = document.createRange();
    range.selectNodeContents(cell.querySelector('span') || cell);
    const t = range.getBoundingClientRect();
    return [cell.innerText.trim(), c.left, c.right, t.left, t.right]; })).filter(r => r.length)"""

# The app serves its page first and loads the model beside it: the first caption can take a while
# on a busy machine. Assertions wait up to this long (they end as soon as they hold).
expect.set_options(timeout=90_000)

pytestmark = [
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"needs Debian's chromium at {CHROMIUM}"),
    pytest.mark.slow,
]


@pytest.fixture(scope="module")
def server_log(tmp_path_factory):
    return tmp_path_factory.mktemp("app") / "server.log"


@pytest.fixture(scope="module")
def app_url(shapes_checkpoint, tmp_path_factory, server_log):
    """The app on the shapes model, with a model card (and the image it shows)."""
    model = shutil.copytree(shapes_checkpoint, tmp_path_factory.mktemp("carded") / "model")
    (model / "MODEL_CARD.md").write_text(CARD)
    shape_image("red", "circle", "left").save(model / "attention.png")
    with running_app(model, log_path=server_log) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def open_page(browser, url, size):
    page = browser.new_page(viewport=dict(zip(("width", "height"), SIZES[size], strict=True)))
    page.set_default_timeout(60_000)  # a busy CPU box can be slow; the waits end as soon as it is done
    page.goto(url)
    return page


@pytest.fixture
def page(browser, app_url):
    page = open_page(browser, app_url, "desktop")
    yield page
    page.close()


@pytest.fixture(params=list(SIZES))
def sized_page(request, browser, app_url):
    page = open_page(browser, app_url, request.param)
    yield page
    page.close()


def upload(page, path):
    page.locator("#input-image input[type=file]").set_input_files(path)


def record_caption_requests(page) -> list[str]:
    """The photos the page asks the server to caption, in order: every queued event whose first
    input is a photo (clearing the photo sends none; the word views send the last result)."""
    photos: list[str] = []

    def record(request):
        if "/queue/join" in request.url:
            first = (json.loads(request.post_data or "{}").get("data") or [None])[0]
            if isinstance(first, dict) and first.get("path"):
                photos.append(first.get("orig_name") or first["path"])

    page.on("request", record)
    return photos


@contextlib.contextmanager
def events_held_back(page):
    """Hold the page's queued events until the block ends: a busy server's delay, made certain."""
    held: list = []
    holding = [True]
    page.route("**/queue/join*", lambda route: held.append(route) if holding else route.continue_())
    yield
    holding.clear()
    for route in held:
        route.continue_()


def in_view(page, selector):
    return page.locator(selector).first.evaluate(IN_VIEW)


def assert_nothing_off_screen_or_cut(page, selector):
    width = page.evaluate("innerWidth")
    for text, left, right, cut in page.evaluate(BOXES, selector):
        assert left >= -1 and right <= width + 1, f"{selector} {text!r} off-screen: {left:.0f}-{right:.0f}"
        assert not cut, f"{selector} {text!r} is cut"


def test_an_upload_is_captioned_without_a_click_and_shown_in_view(sized_page, tmp_path):
    page = sized_page
    path = tmp_path / "red_circle_left.png"
    shape_image("red", "circle", "left").save(path)
    captioned = record_caption_requests(page)
    upload(page, path)  # no click: the caption follows the upload
    expect(page.locator("#caption textarea")).to_have_value("a red circle on the left")
    expect(page.locator("#attention-gallery .thumbnail-item")).to_have_count(6)
    page.wait_for_function(f"({IN_VIEW})(document.querySelector('#caption'))")  # scrolled to it
    assert page.evaluate("document.documentElement.scrollWidth <= innerWidth"), "the page scrolls sideways"

    rows = page.evaluate(CELLS)
    assert len(rows) == DecodeOptions().per_image  # the n-best list of the default decoding
    assert rows[0][1][0] == "a red circle on the left"
    for row in rows:
        for (text, left, right, text_left, text_right), following in zip(row, row[1:] + [None], strict=True):
            assert left - 0.5 <= text_left and text_right <= right + 0.5, f"{text!r} leaves its cell"
            assert following is None or right <= following[1] + 0.5, f"{text!r} overlaps the next cell"
            assert right <= page.evaluate("innerWidth") + 1, f"{text!r} off-screen"
    for selector in (
        "#attention-gallery .thumbnail-item",
        "#attention-gallery .caption-label",
        "[data-testid=block-label]",
        "#word-overlay label",
        "#evidence p",
        "#word-evidence p",
    ):
        assert_nothing_off_screen_or_cut(page, selector)
    expect(page.locator("#word-overlay")).to_contain_text("Word 1 of 6: “a” · image gate β = 0.")
    expect(page.locator("#evidence")).to_contain_text("What the encoder saw in the photo (ImageNet):")
    expect(page.locator("#word-evidence")).to_contain_text("Evidence: “a”: not an object word")
    assert captioned == [path.name]  # one upload, one caption

    page.locator("#input-image").scroll_into_view_if_needed()
    page.locator("input[aria-label='number input for Beam size']").fill("1")
    page.locator("input[aria-label='number input for Beam size']").press("Enter")
    page.locator("#caption-button").click()  # "Caption": again, with the new settings
    expect(page.locator("#alternatives [role=row]:has([role=gridcell])")).to_have_count(1)
    page.wait_for_function(ALL_IMAGES_SHOWN)
    shot = tmp_path / "app.png"
    page.screenshot(path=shot, full_page=True)
    name = "app_screenshot.png" if page.viewport_size["width"] > 600 else "app_screenshot_phone.png"
    shutil.copy(shot, REVIEW_SCREENSHOT.with_name(name))


def test_a_pasted_photo_and_a_webcam_snapshot_are_captioned_too(browser, app_url, tmp_path):
    path = tmp_path / "blue_square_right.png"
    shape_image("blue", "square", "right").save(path)
    context = browser.new_context(
        viewport={"width": 1280, "height": 900}, permissions=["clipboard-read", "clipboard-write", "camera"]
    )
    page = context.new_page()
    page.set_default_timeout(60_000)
    console: list[str] = []
    page.on("console", lambda message: console.append(message.text[:300]))
    page.on("pageerror", lambda error: console.append(f"uncaught: {error}"[:300]))
    try:
        page.goto(app_url)
        page.bring_to_front()  # the clipboard is read by the focused page only
        expect(page.locator("#examples .gallery-item").first).to_be_visible()  # the page is up
        page.evaluate(
            """async bytes => { const blob = new Blob([new Uint8Array(bytes)], {type: "image/png"});
                         await navigator.clipboard.write([new ClipboardItem({"image/png": blob})]); }""",
            list(path.read_bytes()),
        )
        captioned = record_caption_requests(page)
        # The paste button first clears the photo (an input event of its own), then reads the
        # clipboard. Its clearing is held back, as a busy server would be, until the pasted photo
        # has arrived: the photo must still be captioned, once.
        with events_held_back(page):
            page.get_by_role("button", name="Paste from clipboard").click()
            expect(page.locator("#input-image img"), f"console: {console}").to_be_visible()
        expect(page.locator("#caption textarea"), f"console: {console}, sent: {captioned}").to_have_value(
            "a blue square on the right"
        )
        expect(page.locator("#word-overlay")).to_contain_text("Word 1 of 6")  # the result is drawn
        assert captioned == ["clipboard.png"]

        page.reload()
        page.get_by_role("button", name="Capture from camera").click()
        page.get_by_text("Click to Access Webcam").click()
        page.wait_for_function("document.querySelector('#input-image video')?.readyState >= 2")  # frames
        page.locator("#input-image button[aria-label='capture photo']").click()
        # Chromium's test pattern: the shapes model may well say nothing, but it has captioned
        expect(page.locator("#caption-details")).to_contain_text(re.compile(r"\d+ words"))
        assert page.locator("#status").inner_text().strip() == ""
        assert captioned == ["clipboard.png", "image.png"]  # the snapshot, once
    finally:
        context.close()


def test_step_through_the_words(page, tmp_path):
    path = tmp_path / "red_circle_left.png"
    shape_image("red", "circle", "left").save(path)
    upload(page, path)
    expect(page.locator("#caption textarea")).to_have_value("a red circle on the left")
    expect(page.locator("#alternatives")).to_contain_text("a red circle on the right")
    thumbnails = page.locator("#attention-gallery .thumbnail-item")
    expect(thumbnails).to_have_count(6)
    highlighted = page.locator("#word-caption .token.highlighted")
    expect(highlighted).to_have_text("a")

    thumbnails.nth(2).click()
    expect(highlighted).to_have_text("circle")
    expect(page.locator("#word-evidence")).to_contain_text("“circle”")  # beside its overlay
    expect(page.locator("#word-slider input[type=number]")).to_have_value("3")
    expect(page.locator("#word-overlay")).to_contain_text("Word 3 of 6")
    expect(page.locator("#word-overlay")).to_contain_text("“circle” · image gate β = 0.")
    expect(thumbnails.nth(2)).to_contain_text("circle · β 0.")
    page.locator("#word-caption .token", has_text="left").click()
    expect(highlighted).to_have_text("left")
    expect(page.locator("#word-slider input[type=number]")).to_have_value("6")


def test_example_photo_captions_on_click(page, tmp_path):
    captioned = record_caption_requests(page)
    page.locator("#examples .gallery-item").first.click()
    caption = page.locator("#caption textarea")
    expect(caption).not_to_have_value("")
    words = caption.input_value().split()
    expect(page.locator("#attention-gallery .thumbnail-item")).to_have_count(len(words))
    expect(page.locator("#word-overlay")).to_contain_text(f"Word 1 of {len(words)}")
    assert len(captioned) == 1  # the example's own event; the photo's input event does not fire too
    page.wait_for_function(ALL_IMAGES_SHOWN)
    page.screenshot(path=tmp_path / "example.png", full_page=True)
    shutil.copy(tmp_path / "example.png", REVIEW_SCREENSHOT.with_name("app_screenshot_photo.png"))


def test_problems_are_text_in_view_not_a_red_pill(sized_page, tmp_path):
    """No photo, a file that is no image, a region without a box: a sentence where the user looks."""
    page = sized_page
    page.locator("#caption-button").click()
    status = page.locator("#status")
    expect(status).to_have_text(re.compile("Upload an image first"))
    page.wait_for_function(f"({IN_VIEW})(document.querySelector('#status'))")  # scrolled to it

    fake = tmp_path / "holiday.png"
    fake.write_bytes(np.random.default_rng(0).bytes(5000))
    upload(page, fake)
    expect(status).to_have_text(re.compile("holiday.png: not a recognised image file"))
    page.wait_for_function(f"({IN_VIEW})(document.querySelector('#status'))")

    page.locator("#region").get_by_text("Caption a region").click()
    page.locator("#region-button").click()
    region_status = page.locator("#region-status")
    expect(region_status).to_have_text(re.compile("Draw a box on the image first"))
    page.wait_for_function(f"({IN_VIEW})(document.querySelector('#region-status'))")
    assert page.get_by_text("Error", exact=True).count() == 0  # no bare "Error" pill anywhere

    text = tmp_path / "notes.txt"
    text.write_text("not an image\n")
    page.reload()
    upload(page, text)
    expect(page.get_by_text("Invalid file type: notes.txt")).to_be_visible()


def test_about_the_model_is_a_short_summary_with_a_link_to_the_card(sized_page):
    page = sized_page
    page.get_by_text("About the model").click()
    about = page.locator("#about")
    expect(about).to_contain_text("BLEU-4 71.20 · METEOR 40.10 · CIDEr 123.45")
    expect(about).to_contain_text("Ten thousand drawn shapes")
    text = about.inner_text()
    assert "{" not in text and "/tmp" not in text and "synthetic shapes (tests)" not in text
    assert about.evaluate("e => e.getBoundingClientRect().height") < 700
    assert_nothing_off_screen_or_cut(page, "#about p, #about a")
    assert not page.get_by_role("link", name="Home").is_visible()  # no bar of pages

    with page.context.expect_page() as opened:  # in a new tab: the app keeps its caption
        page.get_by_role("link", name="Read the full model card").click()
    card = opened.value
    expect(card.locator("#model-card")).to_contain_text("Ten thousand drawn shapes, one per photo.")
    card.wait_for_function(ALL_IMAGES_SHOWN)
    assert card.locator("#model-card img").evaluate("i => i.naturalWidth") == 224
    assert_nothing_off_screen_or_cut(card, "#model-card p")
    card.close()


def test_draw_a_box_and_caption_that_region(page, tmp_path):
    """Two shapes; a box dragged around the left one makes the caption name it, and every
    overlay outlines the box."""
    from .test_focus import two_shapes

    path = tmp_path / "two_shapes.png"
    two_shapes(("red", "circle"), ("blue", "square")).save(path)
    upload(page, path)
    expect(page.locator("#caption textarea")).not_to_have_value("")  # the whole photo first
    page.locator("#region").get_by_text("Caption a region").click()
    canvas = page.locator("#region-picker canvas")
    expect(canvas).to_be_visible()
    page.wait_for_timeout(500)  # the picker draws the image
    box = canvas.bounding_box()
    side = box["height"]  # the square image fits the canvas height, centred
    left = box["x"] + (box["width"] - side) / 2
    page.mouse.move(left + 0.02 * side, box["y"] + 0.25 * side)
    page.mouse.down()
    page.mouse.move(left + 0.48 * side, box["y"] + 0.75 * side, steps=12)
    page.mouse.up()
    page.locator("#region-button").click()

    expect(page.locator("#focus-box textarea, #focus-box input").first).not_to_have_value("")
    expect(page.locator("#caption textarea")).to_have_value(re.compile("red circle"))
    box_text = page.locator("#focus-box textarea, #focus-box input").first.input_value()
    x0, y0, x1, y1 = map(float, box_text.split(","))
    assert x0 < 20 and x1 < 120 and 40 < y0 < 70 and 150 < y1 < 180, (x0, y0, x1, y1)  # 224 px image
    words = page.locator("#caption textarea").input_value().split()
    expect(page.locator("#attention-gallery .thumbnail-item")).to_have_count(len(words))
    expect(page.locator("#word-overlay")).to_contain_text(f"Word 1 of {len(words)}")
    assert page.locator("#region-status").inner_text().strip() == ""
    expect(page.locator("#evidence")).to_contain_text("What the encoder saw in the box")
    page.wait_for_function(ALL_IMAGES_SHOWN)
    page.screenshot(path=tmp_path / "region.png", full_page=True)
    shutil.copy(tmp_path / "region.png", REVIEW_SCREENSHOT.with_name("app_screenshot_region.png"))


def test_the_server_log_is_quiet(server_log):
    """After every test above (page loads, bad uploads): no tracebacks, no line per page asset."""
    log = server_log.read_text(errors="replace")
    assert "Traceback" not in log, log[-3000:]
    assert "environment=client" not in log and "file_name=" not in log, log[-3000:]
