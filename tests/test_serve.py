"""``cleardit serve``: the page in a real browser (headless Chromium driven by selenium), five requests
at once through gradio_client, and the request handling on the tiny model.

The browser and load tests run one real server process (``python -m cleardit serve``) with the shipped
mini model on a free loopback port; the server and the browser are stopped in ``finally`` blocks, so
a failing test leaves neither behind. Set CLEARDIT_SCREENSHOT=docs/images/serve.png to have the
browser test write its screenshot of the page there (written atomically; not done otherwise).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from cleardit.atomic import atomic_write_bytes
from cleardit.commands.generate import add_generate_parser
from cleardit.mini.pipeline import build_mini_pipeline, save_mini_pipeline
from cleardit.serve.cli import startup_line
from cleardit.serve.model import load_model
from cleardit.serve.request import PageRequest, page_message, run_request

PROMPT = "a large red circle at the top left on a plain white background"
STEPS = 4  # enough for a recognisable image; the mini model's 128 px step takes a fraction of a second
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
WAIT = 90  # seconds for a page update: generous, the 2 cores are shared with other test runs


# -- the server process --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


class ServeProcess:
    """``python -m cleardit serve`` with the mini model on a free loopback port, its output in a log."""

    def __init__(self, folder: Path):
        self.output = folder / "images"
        self.log_path = folder / "serve.log"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self, timeout: float = 180) -> None:
        command = [sys.executable, "-m", "cleardit", "serve", "--port", str(self.port)]
        command += ["--device", "cpu", "--output", str(self.output)]
        env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while "cleardit serve: open http://" not in self.log():
            if self.process.poll() is not None:
                pytest.fail(f"cleardit serve exited with {self.process.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                pytest.fail(f"cleardit serve did not start within {timeout} s:\n{self.log()}")
            time.sleep(0.2)

    def stop(self) -> int | None:
        """SIGTERM (a clean stop), then SIGKILL if it hangs; the exit code (None if never started)."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=20)
        return self.process.returncode


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = ServeProcess(tmp_path_factory.mktemp("serve"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def running_server(server):
    """The module's server, started again if an earlier test stopped it."""
    if server.process.poll() is not None:
        server.start()
    return server


# -- the browser -----------------------------------------------------------------------------------


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    for program in (CHROMIUM, CHROMEDRIVER):
        if not Path(program).exists():
            pytest.fail(
                f"{program} is missing: apt-get install chromium chromium-driver (.ci/run installs them)"
            )
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # root in a container, no screen, and a closed network: no sandbox, no GPU, no background calls
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--window-size=1400,1250", f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver, condition, what: str, timeout: float = WAIT):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.2).until(lambda d: condition(d))
    except TimeoutException:
        body = driver.find_element("tag name", "body").text
        pytest.fail(f"waited {timeout} s for {what}; the page says:\n{body[-3000:]}")


def element(driver, css: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, css)


def text_of(driver, css: str) -> str:
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    try:
        return element(driver, css).text
    except (NoSuchElementException, StaleElementReferenceException):
        return ""


def shown(driver, css: str) -> bool:
    """Whether an element is on the page and visible (gradio leaves hidden components out of the DOM)."""
    return any(e.is_displayed() for e in driver.find_elements("css selector", css))


def image_source(driver, elem_id: str) -> str | None:
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    try:
        return element(driver, f"#{elem_id} img").get_attribute("src")
    except (NoSuchElementException, StaleElementReferenceException):
        return None


def type_into(driver, css: str, value) -> None:
    from selenium.webdriver.common.keys import Keys

    box = element(driver, css)
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.BACKSPACE)
    box.send_keys(str(value))


def generate_and_wait(driver, expect: str) -> str:
    """Press Generate; wait until the statistics box shows a new result containing ``expect``."""
    before = text_of(driver, "#stats")
    element(driver, "#generate").click()
    return wait_for(
        driver,
        lambda d: (t := text_of(d, "#stats")) != before and expect in t and t,
        f"a result with {expect!r}",
    )


# -- the queue (before the browser test, which ends by stopping the server) --------------------


def test_five_requests_at_once_finish_in_queue_order(running_server):
    """Five clients each send one request before the first is done; all finish, in the order queued."""
    from gradio_client import Client
    from gradio_client.utils import Status

    server = running_server
    clients = [Client(server.url, verbose=False, download_files=True) for _ in range(5)]
    jobs, ranks = [], []
    for seed, client in enumerate(clients):
        job = client.submit(PROMPT, 128, 128, 4, 4, seed, False, 0.3, "", False, api_name="/generate")
        deadline = time.monotonic() + WAIT
        while job.status().code in (Status.STARTING, Status.JOINING_QUEUE):  # queued before the next
            assert time.monotonic() < deadline, "a request was never queued"
            time.sleep(0.02)
        ranks.append(job.status().rank)
        jobs.append(job)
    outputs = [job.result(timeout=WAIT) for job in jobs]  # raises if any request failed

    assert max(r or 0 for r in ranks) >= 1, f"no request ever waited in the queue: ranks {ranks}"
    numbers, seeds = [], []
    for message, update, *_ in outputs:
        assert message == ""
        image = update["value"]  # the page sends the image with its label
        numbers.append(int(Path(image).name[:5]))  # generate numbers the files in the order it makes them
        with Image.open(image) as png:
            seeds.append(int(png.text["seed"]))
    assert seeds == [0, 1, 2, 3, 4]
    assert numbers == sorted(numbers) and len(set(numbers)) == 5, f"made in the order {numbers}"
    assert "Traceback" not in server.log()


def test_page_in_a_browser(running_server, browser):
    """Generate at 128 px, compare with full attention, refuse a bad size, then stop the server."""
    server, driver = running_server, browser
    driver.get(server.url)
    wait_for(driver, lambda d: text_of(d, "#generate"), "the page")
    type_into(driver, "#prompt textarea", PROMPT)
    type_into(driver, "#steps input", STEPS)
    type_into(driver, "#radius input", 4)
    assert element(driver, "#width input").get_attribute("value") == "128"  # the mini model's base size

    # one image, with its timing
    stats = generate_and_wait(driver, "s per step")
    assert "CLEAR r=4" in stats and f"({STEPS} steps)" in stats and "of attention per step" in stats
    first = wait_for(driver, lambda d: image_source(d, "image-main"), "the image")
    assert not shown(driver, "#image-full")

    # compare: CLEAR and full attention side by side, with speedup and image metrics
    element(driver, "#compare input").click()
    stats = generate_and_wait(driver, "speedup")
    assert "full attention" in stats and "PSNR" in stats and "MS-SSIM" in stats
    wait_for(driver, lambda d: (s := image_source(d, "image-main")) and s != first, "the new CLEAR image")
    wait_for(driver, lambda d: image_source(d, "image-full"), "the full-attention image")
    assert shown(driver, "#image-full")

    # the gallery lists the session's three images; each download is the PNG with its parameters
    wait_for(driver, lambda d: len(d.find_elements("css selector", "#gallery img")) >= 3, "the gallery")
    if os.environ.get("CLEARDIT_SCREENSHOT"):  # the docs' picture of the page
        driver.execute_script("window.scrollTo(0, 0)")
        atomic_write_bytes(os.environ["CLEARDIT_SCREENSHOT"], driver.get_screenshot_as_png())
    element(driver, "#gallery .thumbnail-item").click()  # the newest: compare's full-attention image
    wait_for(driver, lambda d: PROMPT in text_of(d, "#parameters"), "the selected image's parameters")
    links = [a.get_attribute("href") for a in driver.find_elements("css selector", "#downloads a")]
    assert len(links) == 3
    with urllib.request.urlopen(links[0], timeout=30) as response:
        png = Image.open(io.BytesIO(response.read()))
        assert png.format == "PNG" and png.text["prompt"] == PROMPT
        assert json.loads(png.text["parameters"])["attention"] == "full"  # newest first: compare's full
    # everything the page loaded came from the server itself (no fonts or scripts from the web)
    loaded = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert loaded and all(url.startswith(server.url) for url in loaded), loaded

    # a bad size: a message next to the button, the last result stays, the server keeps serving
    shown_before = image_source(driver, "image-main")
    type_into(driver, "#width input", 130)
    element(driver, "#generate").click()
    message = wait_for(
        driver, lambda d: "Not generated" in (t := text_of(d, "#message")) and t, "the message"
    )
    assert "width 130 is not a multiple of 8" in message and "nearest valid sizes: 128 or 136" in message
    assert image_source(driver, "image-main") == shown_before and shown(driver, "#image-full")
    assert len(driver.find_elements("css selector", "#downloads a")) == 3
    assert "Traceback" not in driver.find_element("tag name", "body").text
    assert server.process.poll() is None

    assert server.stop() == 0, server.log()
    assert "cleardit serve: stopped" in server.log() and not port_open(server.port)


# -- the request handling, on the tiny model (no server) -------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "tiny"
    save_mini_pipeline(build_mini_pipeline("tiny"), folder, "tiny")
    return folder, load_model(str(folder), device="cpu")


def test_request_matches_cleardit_generate(tiny, tmp_path):
    """The page's PNGs carry what `cleardit generate` writes for the same settings; progress per step."""
    folder, model = tiny
    steps = []
    request = PageRequest(
        prompt=PROMPT, width=64.0, height=64.0, radius=2.0, steps=2.0, seed=3.0, compare=True
    )
    result = run_request(
        model, request, tmp_path / "page", on_step=lambda done, total: steps.append((done, total))
    )
    assert steps == [(1, 4), (2, 4), (3, 4), (4, 4)]  # CLEAR then full attention, 2 steps each
    assert [e.parameters["attention"] for e in result.entries] == ["full", "clear"]
    for line in (
        "**CLEAR r=2**",
        "s per image",
        "s per step (2 steps)",
        "**full attention**",
        "speedup",
        "PSNR",
    ):
        assert line in result.stats

    parser = argparse.ArgumentParser()
    add_generate_parser(parser.add_subparsers())
    argv = ["generate", "--model", str(folder), "--prompt", PROMPT, "--height", "64", "--width", "64"]
    args = parser.parse_args(
        argv + ["--radius", "2", "--steps", "2", "--seed", "3", "--output", str(tmp_path / "cli")]
    )
    assert args.func(args) == 0
    with Image.open(next((tmp_path / "cli").glob("*.png"))) as png:
        assert json.loads(png.text["parameters"]) == result.entries[-1].parameters
    with Image.open(result.image) as png:
        assert json.loads(png.text["parameters"]) == result.entries[-1].parameters


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"width": 70.0}, "width 70 is not a multiple of 16"),
        ({"radius": -1.0}, "radius must be a whole number >= 0"),
        ({"radius": 2.5}, "radius must be a whole number, got 2.5"),
        ({"clear_weights": "/no/such/clear_local_8.safetensors"}, "clear weights /no/such/clear_local_8"),
        ({"prompt": "  "}, "the prompt is empty"),
        ({"radius": 0.0, "compare": True}, "compare compares CLEAR with full attention"),
        ({"steps": 0.0}, "steps must be a positive whole number"),
    ],
)
def test_bad_requests_name_the_value_and_the_fix(tiny, tmp_path, changes, message):
    _, model = tiny
    request = PageRequest(**{"prompt": PROMPT, "steps": 1.0, "radius": 2.0, **changes})
    with pytest.raises((ValueError, TypeError, FileNotFoundError)) as caught:
        run_request(model, request, tmp_path)
    assert message in page_message(str(caught.value))
    assert not list(tmp_path.iterdir())  # refused before anything was written


def test_missing_model_is_refused_before_serving(tmp_path, capsys):
    from cleardit.cli import main

    assert main(["serve", "--model", str(tmp_path / "no-model"), "--output", str(tmp_path / "out")]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_a_video_model_is_refused_before_loading(tmp_path, capsys):
    from cleardit.cli import main
    from tests.tiny_wan import save_tiny_wan_pipeline

    folder = save_tiny_wan_pipeline(tmp_path / "wan")
    assert main(["serve", "--model", str(folder), "--output", str(tmp_path / "out")]) == 2
    assert "holds a video model; cleardit serve makes images" in capsys.readouterr().err


def test_startup_line_says_who_can_reach_the_page():
    assert "this machine only" in startup_line("127.0.0.1", 7860)
    line = startup_line("0.0.0.0", 8000)
    assert "http://0.0.0.0:8000" in line and "--host 0.0.0.0" in line and "other machines" in line
