"""The viewer page in headless Chromium (Debian's chromium + chromedriver, driven by selenium).

Skips only where chromium, chromedriver or selenium is absent (CI installs chromium with apt-get).
Set RF_SERVE_SCREENSHOT=path to keep the screenshot (docs/serve-viewer.png was made so).
"""

from __future__ import annotations

import os
import shutil
import time

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
    pytest.skip(
        "chromium and chromedriver are not installed (apt-get install chromium chromium-driver)",
        allow_module_level=True,
    )
webdriver = pytest.importorskip("selenium.webdriver")
pytest.importorskip("starlette")
pytest.importorskip("onnxruntime")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402
from websockets.sync.client import connect  # noqa: E402

from rf_runtime.serve.app import ServeApp, ServerThread  # noqa: E402
from rf_runtime.serve.config import ServeConfig  # noqa: E402
from rf_runtime.serve.engine import LocalEngine  # noqa: E402

WAIT = 60  # seconds any one wait in the page may take on a loaded machine


@pytest.fixture(scope="module")
def streamer():
    from rf_runtime.streamer import Streamer

    return Streamer.load()


@pytest.fixture
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=640,1000",
        # WebRTC on loopback, where the test server offers its media: host candidates on 127.0.0.1,
        # given as addresses (not mDNS names)
        "--allow-loopback-in-peer-connection",
        "--disable-features=WebRtcHideLocalIpsWithMdns",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(WAIT)
    yield driver
    driver.quit()


def viewer(driver, key):
    return driver.execute_script(f"return window.rfViewer.{key}")


def wait_for(driver, condition, what):
    WebDriverWait(driver, WAIT, poll_frequency=0.1).until(lambda d: condition(d), message=what)


def canvas_mean(driver) -> float:
    return driver.execute_script("""
        const c = document.getElementById('screen');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let s = 0; for (let i = 0; i < d.length; i += 4) s += d[i] + d[i + 1] + d[i + 2];
        return s / (d.length / 4 * 3);""")


def test_page_streams_switches_prompt_and_stops(browser, streamer, tmp_path):
    with ServerThread(
        ServeApp(LocalEngine(streamer, workers=2, jpeg_quality=85), ServeConfig(max_sessions=2))
    ) as s:
        browser.get(s.url + "/")
        wait_for(browser, lambda d: "64x64" in d.find_element(By.ID, "model").text, "model info shown")
        assert viewer(browser, "state") == "idle"
        assert canvas_mean(browser) == 0  # nothing drawn yet
        prompt = browser.find_element(By.ID, "prompt")
        prompt.clear()
        prompt.send_keys("a red circle bouncing")
        browser.find_element(By.ID, "start").click()
        wait_for(browser, lambda d: viewer(d, "framesDrawn") >= 6, "frames drawn")
        assert viewer(browser, "state") == "streaming"
        assert browser.find_element(By.ID, "status").text == "streaming"
        assert (
            canvas_mean(browser) > 1
        )  # the model's frames (an orange-red object on black) are on the canvas
        assert browser.find_element(By.ID, "start").get_attribute("disabled") is not None
        drawn = viewer(browser, "framesDrawn")
        wait_for(browser, lambda d: viewer(d, "framesDrawn") >= drawn + 3, "frames keep arriving")

        nxt = browser.find_element(By.ID, "next-prompt")
        nxt.clear()
        nxt.send_keys("a blue square sliding")
        browser.find_element(By.ID, "switch-button").click()
        wait_for(browser, lambda d: len(viewer(d, "promptChanges")) == 1, "prompt_changed event")
        change = viewer(browser, "promptChanges")[0]
        assert change["prompt"] == "a blue square sliding" and change["chunk"] >= 1
        assert browser.find_element(By.ID, "current-prompt").text == "a blue square sliding"
        after = viewer(browser, "framesDrawn")
        wait_for(browser, lambda d: viewer(d, "framesDrawn") >= after + 6, "frames after the switch")
        assert float(browser.find_element(By.ID, "fps").text) > 0
        assert browser.find_element(By.ID, "chunk-latency").text.endswith(" ms")
        assert browser.find_element(By.ID, "dropped").text == "0"

        shot = os.environ.get("RF_SERVE_SCREENSHOT") or str(tmp_path / "viewer.png")
        assert browser.save_screenshot(shot)
        assert os.path.getsize(shot) > 10_000

        browser.find_element(By.ID, "stop").click()
        wait_for(browser, lambda d: viewer(d, "state") == "ended", "ended after stop")
        assert "stopped" in browser.find_element(By.ID, "status").text
        assert viewer(browser, "errors") == []


def test_page_streams_over_webrtc(browser, streamer):
    """The same page with the WebRTC transport: the video track drawn on the canvas, the prompt switch
    and the stop on the data channel."""
    pytest.importorskip("aiortc")
    from selenium.webdriver.support.ui import Select

    with ServerThread(
        ServeApp(LocalEngine(streamer, workers=2, jpeg_quality=85), ServeConfig(max_sessions=2))
    ) as s:
        browser.get(s.url + "/")
        option = 'document.querySelector("#transport option[value=webrtc]")'
        wait_for(browser, lambda d: d.execute_script(f"return !{option}.disabled"), "WebRTC offered")
        Select(browser.find_element(By.ID, "transport")).select_by_value("webrtc")
        browser.find_element(By.ID, "start").click()
        wait_for(browser, lambda d: viewer(d, "framesDrawn") >= 6, "video frames drawn")
        assert viewer(browser, "state") == "streaming"
        assert canvas_mean(browser) > 1  # the decoded video (an object on black) is on the canvas
        assert s.serve_app.active == 1 and len(s.serve_app.sessions) == 1

        nxt = browser.find_element(By.ID, "next-prompt")
        nxt.clear()
        nxt.send_keys("a blue square moving left")
        browser.find_element(By.ID, "switch-button").click()
        wait_for(browser, lambda d: len(viewer(d, "promptChanges")) == 1, "prompt_changed on the channel")
        assert viewer(browser, "promptChanges")[0]["prompt"] == "a blue square moving left"
        after = viewer(browser, "framesDrawn")
        wait_for(browser, lambda d: viewer(d, "framesDrawn") >= after + 6, "frames after the switch")

        browser.find_element(By.ID, "stop").click()
        wait_for(browser, lambda d: viewer(d, "state") == "ended", "ended after stop")
        assert viewer(browser, "errors") == []
        browser.get("about:blank")  # the page goes and closes its peer connection: the session is freed
        deadline = time.monotonic() + 10  # at once, not after ICE's consent time-out (~30 s)
        while s.serve_app.active:
            assert time.monotonic() < deadline, "the WebRTC session was not freed"
            time.sleep(0.05)


def test_page_shows_server_full(browser, streamer):
    with ServerThread(
        ServeApp(LocalEngine(streamer, workers=1, jpeg_quality=85), ServeConfig(max_sessions=1))
    ) as s:
        with connect(s.ws_url):  # holds the only slot
            deadline = time.monotonic() + 10
            while s.serve_app.active != 1:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            browser.get(s.url + "/")
            browser.find_element(By.ID, "start").click()
            wait_for(browser, lambda d: viewer(d, "state") == "full", "server full state")
            status = browser.find_element(By.ID, "status")
            assert "server full" in status.text and "state-full" in status.get_attribute("class")
            assert viewer(browser, "framesDrawn") == 0


def test_page_needs_the_token_and_works_with_it(browser, streamer):
    with ServerThread(
        ServeApp(LocalEngine(streamer, workers=1, jpeg_quality=85), ServeConfig(token="letmein"))
    ) as s:
        browser.get(s.url + "/")
        assert "unauthorized" in browser.find_element(By.TAG_NAME, "body").text
        browser.get(s.url + "/?token=letmein")  # sets the cookie the script and the WebSocket then carry
        browser.find_element(By.ID, "start").click()
        wait_for(browser, lambda d: viewer(d, "framesDrawn") >= 3, "frames with the token")
