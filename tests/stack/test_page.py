"""The results page at ``GET /``, in a real headless Chromium (Debian's ``chromium`` and
``chromedriver``, driven by selenium) against the real stack: it loads without console errors and
with its security headers; a URL and an uploaded file are detected and the box is drawn in the
colour the page gives the class; the server's error, a network failure and a non-JSON answer each
get their message.

The browser talks to 127.0.0.1 only: the stack and the test's image server (every other host name
fails to resolve, and Chromium's background services are off)."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
import requests

from testkit.checkpoints import CLASS_A, CLASS_B
from testkit.images import encode, scene

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")

pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="Debian's 'chromium' and 'chromium-driver' are not installed (scripts/test installs them)",
)

WIDTH, HEIGHT = 320, 240  # the test image; the forced checkpoint's one box is all of it
PNG = encode(scene(WIDTH, HEIGHT, seed=11), "PNG")
DETECT_TIMEOUT = 120  # seconds: one CPU detection with masks, on a shared machine

CHROMIUM_ARGS = (
    "--headless=new",
    "--no-sandbox",  # the tests run as root in a container
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-default-apps",
    "--disable-extensions",
    "--disable-sync",
    "--no-first-run",
    "--no-default-browser-check",
    "--no-proxy-server",
    "--force-device-scale-factor=1",  # screenshot pixels are CSS pixels
    "--window-size=1280,1000",
    # only loopback: any other host name fails to resolve
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
)


@pytest.fixture(scope="module", autouse=True)
def routes(image_server):
    image_server.add("/page/scene.png", PNG, "image/png")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    folder = tmp_path_factory.mktemp("chromium")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (*CHROMIUM_ARGS, f"--user-data-dir={folder / 'profile'}"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(CHROMEDRIVER, log_output=str(folder / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def page(browser, stack):
    """The page freshly loaded, its class filter filled from ``GET /v1/model``; console drained."""
    console_errors(browser)  # what earlier pages logged
    browser.get(stack.http + "/")
    wait(browser, lambda d: d.find_element("id", "classes").is_enabled(), 30)
    return browser


def wait(driver, condition, timeout: float = DETECT_TIMEOUT):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(condition)


def console_errors(driver) -> list[str]:
    """The console's errors since the last call (reading the log empties it)."""
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def wait_for_answer(driver) -> str:
    """Waits until the JSON panel shows a detection; its text."""
    wait(
        driver,
        lambda d: (
            '"instances"' in d.find_element("id", "json").text or d.find_element("id", "error").is_displayed()
        ),
    )
    error = driver.find_element("id", "error")
    assert not error.is_displayed(), error.text
    return driver.find_element("id", "json").text


def wait_for_error(driver) -> str:
    wait(driver, lambda d: d.find_element("id", "error").is_displayed())
    return driver.find_element("id", "error").text


def canvas_pixel(driver, x: int, y: int) -> tuple[int, int, int, int]:
    """RGBA of the overlay canvas at image pixel (x, y)."""
    return tuple(
        driver.execute_script(
            "const canvas = document.getElementById('overlay');"
            "return Array.from(canvas.getContext('2d').getImageData(arguments[0], arguments[1], 1, 1).data);",
            x,
            y,
        )
    )


def class_colour(driver) -> tuple[int, int, int]:
    """The colour the page gives the first instance's class (its swatch in the list)."""
    swatch = driver.find_element("css selector", "#instances li .swatch")
    match = re.fullmatch(
        r"rgba?\((\d+), (\d+), (\d+)(?:, [\d.]+)?\)", swatch.value_of_css_property("background-color")
    )
    assert match, swatch.value_of_css_property("background-color")
    return tuple(int(value) for value in match.groups())


def close(actual, expected, tolerance: int = 3) -> bool:
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=True))


def check_drawing(driver, answer_text: str) -> None:
    """The box (the whole image) is outlined in the class's colour, the mask filled translucent."""
    assert f'"label": "{CLASS_A}"' in answer_text
    items = driver.find_elements("css selector", "#instances li")
    assert [item.text.split()[0] for item in items] == [CLASS_A]
    canvas = driver.find_element("id", "overlay")
    assert (canvas.get_property("width"), canvas.get_property("height")) == (WIDTH, HEIGHT)
    colour = class_colour(driver)
    # the 3-px outline lies just inside the box's edges; the label sits in the top-left corner
    for x, y in ((1, HEIGHT // 2), (WIDTH - 2, HEIGHT // 2), (WIDTH - 60, 1), (WIDTH // 2, HEIGHT - 2)):
        assert close(canvas_pixel(driver, x, y), (*colour, 255)), (x, y)
    assert '"polygons"' in answer_text  # the page asks for masks by default
    red, green, blue, alpha = canvas_pixel(driver, WIDTH // 2, HEIGHT // 2)
    assert 0.3 * 255 < alpha < 0.5 * 255 and close((red, green, blue), colour, 6)
    # what the user sees: the image under the canvas, and the outline on top of it
    picture = driver.find_element("id", "picture")
    assert picture.is_displayed() and picture.get_property("naturalWidth") == WIDTH
    on_screen = screenshot_pixel(driver, "overlay", 1, HEIGHT // 2)
    assert close(on_screen, colour, 8), (on_screen, colour)


def screenshot_pixel(driver, element_id: str, x: int, y: int) -> tuple[int, int, int]:
    import io

    from PIL import Image

    shot = Image.open(io.BytesIO(driver.find_element("id", element_id).screenshot_as_png)).convert("RGB")
    return shot.getpixel((x, y))


def save_screenshot(driver, tmp_path: Path) -> None:
    path = tmp_path / "page.png"
    assert driver.save_screenshot(str(path))
    if os.environ.get("PAGE_SCREENSHOT"):
        shutil.copyfile(path, os.environ["PAGE_SCREENSHOT"])


def test_page_and_static_files_have_their_headers(stack):
    for path, content_type in (
        ("/", "text/html"),
        ("/static/app.js", "text/javascript"),
        ("/static/style.css", "text/css"),
    ):
        response = requests.get(stack.http + path, timeout=10)
        assert response.status_code == 200, path
        assert response.headers["Content-Type"].startswith(content_type), path
        assert "script-src 'self'" in response.headers["Content-Security-Policy"], path
        assert response.headers["X-Content-Type-Options"] == "nosniff", path
        assert response.headers["Cache-Control"] == "no-cache", path
    outside = requests.get(stack.http + "/static/..%2fpage.py", timeout=10)  # %2f: requests keeps it
    assert outside.status_code == 404 and outside.json()["error"]["code"] == "not_found"


def test_page_loads_without_console_errors(page):
    assert page.title == "Instance detector"
    options = [
        option.get_property("value") for option in page.find_elements("css selector", "#classes option")
    ]
    assert CLASS_A in options
    assert page.find_element("id", "threshold").get_property("value") == "0.75"
    assert console_errors(page) == []


def test_url_is_detected_and_drawn(page, image_server, tmp_path):
    page.find_element("id", "url").send_keys(image_server.url("/page/scene.png"))
    page.find_element("id", "detect").click()
    answer = wait_for_answer(page)
    check_drawing(page, answer)
    assert "1 instance in a 320×240 image" in page.find_element("id", "status").text
    save_screenshot(page, tmp_path)
    # the browser loaded the picture itself, without telling the image's host where the page is
    loads = [
        r for r in image_server.requests_for("/page/scene.png") if "Chrome" in r.headers.get("User-Agent", "")
    ]
    assert loads and all(r.headers.get("Referer") is None for r in loads)
    assert console_errors(page) == []
    page.find_element("id", "masks").click()  # masks off: redrawn at once, the outline stays
    assert canvas_pixel(page, WIDTH // 2, HEIGHT // 2)[3] == 0
    assert close(canvas_pixel(page, 1, HEIGHT // 2), (*class_colour(page), 255))


def test_boxes_are_drawn_when_the_browser_cannot_load_the_picture(page, image_server):
    page.execute_cdp_cmd("Network.enable", {})
    page.execute_cdp_cmd("Network.setBlockedURLs", {"urls": ["*/page/scene.png"]})  # the browser only
    try:
        page.find_element("id", "url").send_keys(image_server.url("/page/scene.png"))
        page.find_element("id", "detect").click()
        wait_for_answer(page)
        wait(page, lambda d: d.find_element("id", "note").is_displayed(), 30)
    finally:
        page.execute_cdp_cmd("Network.setBlockedURLs", {"urls": []})
    assert "could not load this image" in page.find_element("id", "note").text
    assert not page.find_element("id", "picture").is_displayed()
    assert close(canvas_pixel(page, 1, HEIGHT // 2), (*class_colour(page), 255))


def test_class_filter_is_sent(page, image_server):
    from selenium.webdriver.support.ui import Select

    Select(page.find_element("id", "classes")).select_by_value(CLASS_B)
    page.find_element("id", "url").send_keys(image_server.url("/page/scene.png"))
    page.find_element("id", "detect").click()
    assert '"instances": []' in wait_for_answer(page)
    assert "Nothing above the threshold" in page.find_element("id", "status").text
    assert canvas_pixel(page, 1, HEIGHT // 2)[3] == 0


def test_uploaded_file_is_detected_and_drawn(page, tmp_path):
    path = tmp_path / "scene.png"
    path.write_bytes(PNG)
    page.find_element("id", "file").send_keys(str(path))  # choosing a file sends it at once
    answer = wait_for_answer(page)
    check_drawing(page, answer)
    assert page.find_element("id", "picture").get_property("src").startswith("blob:")
    assert console_errors(page) == []


def test_server_error_is_shown_with_its_code(page, stack):
    expected = requests.post(stack.http + "/v1/detect", json={"url": "ftp://x"}, timeout=30).json()["error"]
    page.find_element("id", "url").send_keys("ftp://x")
    page.find_element("id", "detect").click()
    shown = wait_for_error(page)
    assert expected["code"] == "invalid_request"
    assert expected["message"] in shown and "invalid_request" in shown and "400" in shown
    assert f'"code": "{expected["code"]}"' in page.find_element("id", "json").text
    assert not page.find_element("id", "overlay").is_displayed()


def test_network_failure_is_shown(page, image_server):
    page.execute_cdp_cmd("Network.enable", {})
    page.execute_cdp_cmd(
        "Network.emulateNetworkConditions",
        {"offline": True, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1},
    )
    try:
        page.find_element("id", "url").send_keys(image_server.url("/page/scene.png"))
        page.find_element("id", "detect").click()
        assert "Could not reach the service" in wait_for_error(page)
    finally:
        page.execute_cdp_cmd(
            "Network.emulateNetworkConditions",
            {"offline": False, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1},
        )


def test_non_json_answer_is_shown(page, image_server):
    # the stack always answers JSON: a proxy's error page is what this guards against, so the
    # page's fetch is given one
    page.execute_script(
        "window.fetch = async () => new Response('<html><body>Bad gateway</body></html>',"
        " {status: 502, statusText: 'Bad Gateway', headers: {'Content-Type': 'text/html'}});"
    )
    page.find_element("id", "url").send_keys(image_server.url("/page/scene.png"))
    page.find_element("id", "detect").click()
    assert "HTTP 502 Bad Gateway with something that is not JSON" in wait_for_error(page)
    assert "Bad gateway" in page.find_element("id", "json").text
