"""arrag serve end to end in a real headless Chromium: start the server, type a prompt, generate with DAiD, click a
patch of the provenance map, see its source, take a screenshot.

Needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them); skipped without them. Selenium is
pointed at them, so it never downloads a browser of its own. ``ARRAG_SCREENSHOT=docs/serve.png`` runs it on the
built-in model over a small world database instead of the tiny backend and keeps the screenshot there (the
README's picture).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from arrag.backends import load_backend
from arrag.build import build_database

pytest.importorskip("gradio", reason="arrag serve needs gradio: pip install 'arrag[serve]'")
webdriver = pytest.importorskip("selenium.webdriver", reason="the browser test needs selenium")
from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
SCREENSHOT = os.environ.get("ARRAG_SCREENSHOT")
STARTUP_S, GENERATE_S = 120, 300  # bounds on the server's start and on one generation

pytestmark = pytest.mark.skipif(
    not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()),
    reason="needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)",
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory, image_folder):
    """(backend, database, prompt): the tiny backend over the blob images, or for the README's screenshot the
    built-in model over 300 world scenes."""
    out = tmp_path_factory.mktemp("browser") / "db"
    if SCREENSHOT:
        build_database(load_backend("builtin"), ["world:300"], out)
        return "builtin", out, "a green 3"
    build_database(load_backend("tiny:0"), [image_folder], out)
    return "tiny:0", out, "a red 7"


def start_server(backend: str, database: Path, port: int, folder: Path) -> subprocess.Popen:
    """``arrag serve`` on ``port`` with no cached world databases; its output goes to ``folder / "serve.log"``."""
    command = [sys.executable, "-m", "arrag", "serve", "--backend", backend, "--db", str(database), "--port", str(port)]
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    env.setdefault("OMP_NUM_THREADS", "1")  # one thread: a busy test machine slows a threaded model down many times
    with open(folder / "serve.log", "wb") as log:
        return subprocess.Popen([*command, "--cache", str(folder / "cache")], env=env, stdout=log, stderr=log)


def wait_until_up(server: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"arrag serve exited with {server.returncode}: {log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as page:
                if page.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"arrag serve did not answer on {url} within {STARTUP_S} s")


def chromium() -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1600,1250"):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)


def set_field(driver: webdriver.Chrome, element_id: str, value: str) -> None:
    field = driver.find_element(By.CSS_SELECTOR, f"#{element_id} input, #{element_id} textarea")
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(Keys.DELETE)
    field.send_keys(value)
    field.send_keys(Keys.TAB)  # Gradio reads a number when it loses focus


def status(driver: webdriver.Chrome) -> str:
    return driver.find_element(By.CSS_SELECTOR, "#message textarea").get_attribute("value") or ""


def test_generate_click_a_patch_and_see_its_source(served, tmp_path):
    backend, database, prompt = served
    port, began = free_port(), time.perf_counter()
    server = start_server(backend, database, port, tmp_path)
    driver = None
    try:
        wait_until_up(server, f"http://127.0.0.1:{port}/", tmp_path / "serve.log")
        driver = chromium()
        driver.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(driver, GENERATE_S)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#prompts textarea"))
        set_field(driver, "prompts", prompt)
        driver.find_element(By.CSS_SELECTOR, "#method [data-testid='DAiD-radio-label']").click()

        set_field(driver, "weight", "2")  # a bad λ: one line in the page, nothing generated
        driver.find_element(By.ID, "generate").click()
        wait.until(lambda d: status(d).startswith("error:"))
        assert (
            status(driver) == "error: retrieval weight λ must be in [0, 1] (0 = model only, 1 = retrieval only), got 2"
        )

        set_field(driver, "weight", "0.5")
        driver.find_element(By.ID, "generate").click()
        wait.until(lambda d: "per column" in status(d))
        for gallery in ("base", "retrieval"):
            assert len(driver.find_elements(By.CSS_SELECTOR, f"#{gallery} img")) == 2
        chart = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#provenance img"))
        assert chart.size["width"] > 100

        # click cells from the middle of the map until one whose token has a source; selenium offsets are
        # from the element's centre
        patch = ""
        for dx, dy in [(0, 0), (40, 0), (0, 40), (-40, 0), (40, 40), (-40, 40), (80, 80), (-80, 80)]:
            ActionChains(driver).move_to_element_with_offset(chart, dx, dy).click().perform()
            try:
                WebDriverWait(driver, 10).until(lambda d: "patch (row" in d.find_element(By.ID, "patch").text)
                WebDriverWait(driver, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#source img"))
            except TimeoutException:
                continue
            patch = driver.find_element(By.ID, "patch").text
            break
        assert "source: database image" in patch and "squared distance" in patch, patch
        time.sleep(1)  # let the thumbnail paint before the screenshot
        shot = tmp_path / "serve.png"
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        if SCREENSHOT:
            shutil.copyfile(shot, SCREENSHOT)
        print(f"browser test: {time.perf_counter() - began:.1f} s end to end ({backend})")
    finally:
        if driver is not None:
            driver.quit()
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=15)
