"""The web app in a real headless browser: upload, caption, step through the words, bad uploads."""

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from playwright.sync_api import expect, sync_playwright

from .app_server import running_app
from .shapes import shape_image

CHROMIUM = Path("/usr/bin/chromium")
# Offline and quiet: no component updates, no sync, and every host except the app unresolvable.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-quic",
                 "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"]
REVIEW_SCREENSHOT = Path("/tmp/app_screenshot.png")
ALL_IMAGES_SHOWN = "[...document.querySelectorAll('img')].every(i => i.complete && i.naturalWidth > 0)"

# The app serves its page first and loads the model behind it: the first caption can take a while
# on a busy machine. Assertions wait up to this long (they end as soon as they hold).
expect.set_options(timeout=90_000)

pytestmark = [pytest.mark.skipif(not CHROMIUM.exists(), reason=f"needs Debian's chromium at {CHROMIUM}"),
              pytest.mark.slow]


@pytest.fixture(scope="module")
def app_url(shapes_checkpoint):
    with running_app(shapes_checkpoint) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, app_url):
    page = browser.new_page(viewport={"width": 1400, "height": 1700})  # all of it: lazy images load
    page.set_default_timeout(60_000)  # a busy CPU box can be slow; the waits end as soon as it is done
    page.goto(app_url)
    yield page
    page.close()


def test_upload_caption_and_step_through_the_words(page, tmp_path):
    path = tmp_path / "red_circle_left.png"
    shape_image("red", "circle", "left").save(path)
    page.locator("#input-image input[type=file]").set_input_files(path)
    expect(page.locator("#input-image img")).to_be_visible()  # the preview: the upload is done
    page.locator("#caption-button").click()

    expect(page.locator("#caption textarea")).to_have_value("a red circle on the left")
    expect(page.locator("#alternatives")).to_contain_text("a red circle on the right")
    thumbnails = page.locator("#attention-gallery .thumbnail-item")
    expect(thumbnails).to_have_count(6)
    highlighted = page.locator("#word-caption .token.highlighted")
    expect(highlighted).to_have_text("a")

    thumbnails.nth(2).click()
    expect(highlighted).to_have_text("circle")
    expect(page.locator("#word-slider input[type=number]")).to_have_value("3")
    expect(page.locator("#word-overlay")).to_contain_text("Word 3 of 6")
    expect(page.locator("#word-overlay")).to_contain_text("“circle” · image gate β = 0.")
    expect(thumbnails.nth(2)).to_contain_text("circle · β 0.")
    page.locator("#word-caption .token", has_text="left").click()
    expect(highlighted).to_have_text("left")
    expect(page.locator("#word-slider input[type=number]")).to_have_value("6")

    page.wait_for_function(ALL_IMAGES_SHOWN)
    page.screenshot(path=tmp_path / "app.png", full_page=True)
    shutil.copy(tmp_path / "app.png", REVIEW_SCREENSHOT)


def test_example_photo_captions_on_click(page, tmp_path):
    page.locator("#examples .gallery-item").first.click()
    caption = page.locator("#caption textarea")
    expect(caption).not_to_have_value("")
    words = caption.input_value().split()
    expect(page.locator("#attention-gallery .thumbnail-item")).to_have_count(len(words))
    expect(page.locator("#word-overlay")).to_contain_text(f"Word 1 of {len(words)}")
    page.wait_for_function(ALL_IMAGES_SHOWN)
    page.screenshot(path=tmp_path / "example.png", full_page=True)
    shutil.copy(tmp_path / "example.png", REVIEW_SCREENSHOT.with_name("app_screenshot_photo.png"))


def test_bad_uploads_show_an_error(page, tmp_path):
    fake = tmp_path / "holiday.png"
    fake.write_bytes(np.random.default_rng(0).bytes(5000))
    page.locator("#input-image input[type=file]").set_input_files(fake)
    expect(page.locator("#input-image img")).to_be_attached()
    page.locator("#caption-button").click()
    expect(page.get_by_text("holiday.png: not a recognised image file")).to_be_visible()

    text = tmp_path / "notes.txt"
    text.write_text("not an image\n")
    page.reload()
    page.locator("#input-image input[type=file]").set_input_files(text)
    expect(page.get_by_text("Invalid file type: notes.txt")).to_be_visible()


def test_on_a_phone_the_alternatives_keep_their_numbers_on_one_line(browser, app_url, tmp_path):
    """At 375 px wide the caption column wraps; the score and p columns never break mid-number."""
    page = browser.new_page(viewport={"width": 375, "height": 2400})
    page.set_default_timeout(60_000)
    try:
        page.goto(app_url)
        path = tmp_path / "blue_square_right.png"
        shape_image("blue", "square", "right").save(path)
        page.locator("#input-image input[type=file]").set_input_files(path)
        expect(page.locator("#input-image img")).to_be_visible()
        page.locator("#caption-button").click()
        expect(page.locator("#caption textarea")).to_have_value("a blue square on the right")
        expect(page.locator("#alternatives [data-testid='cell-2-3']")).to_be_visible()
        for row in range(3):
            for column in (2, 3):  # score and p
                span = page.locator(f"#alternatives [data-testid='cell-{row}-{column}'] span")
                text = span.inner_text().strip()
                height, font = span.evaluate(
                    "e => [e.getBoundingClientRect().height, parseFloat(getComputedStyle(e).fontSize)]")
                assert text and height < 2 * font, (row, column, text, height)  # one line
                clipped = span.evaluate("e => e.closest('[role=gridcell]').scrollWidth"
                                        " > e.closest('[role=gridcell]').clientWidth + 1")
                assert not clipped, (row, column, text)
        page.screenshot(path=tmp_path / "phone.png", full_page=True)
        shutil.copy(tmp_path / "phone.png", REVIEW_SCREENSHOT.with_name("app_screenshot_phone.png"))
    finally:
        page.close()


def test_draw_a_box_and_caption_that_region(page, tmp_path):
    """Two shapes; a box dragged around the left one makes the caption name it, and every
    overlay outlines the box."""
    from .test_focus import two_shapes

    path = tmp_path / "two_shapes.png"
    two_shapes(("red", "circle"), ("blue", "square")).save(path)
    page.locator("#input-image input[type=file]").set_input_files(path)
    expect(page.locator("#input-image img")).to_be_visible()
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

    expect(page.locator("#caption textarea")).to_have_value(re.compile("red circle"))
    box_text = page.locator("#focus-box textarea, #focus-box input").first.input_value()
    x0, y0, x1, y1 = map(float, box_text.split(","))
    assert x0 < 20 and x1 < 120 and 40 < y0 < 70 and 150 < y1 < 180, (x0, y0, x1, y1)  # 224 px image
    words = page.locator("#caption textarea").input_value().split()
    expect(page.locator("#attention-gallery .thumbnail-item")).to_have_count(len(words))
    expect(page.locator("#word-overlay")).to_contain_text(f"Word 1 of {len(words)}")
    page.wait_for_function(ALL_IMAGES_SHOWN)
    page.screenshot(path=tmp_path / "region.png", full_page=True)
    shutil.copy(tmp_path / "region.png", REVIEW_SCREENSHOT.with_name("app_screenshot_region.png"))
