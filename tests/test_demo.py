"""`splitleak demo` in real browsers against the real processes: Debian's Chromium driven by Playwright, and Firefox.

The page must show scored reconstructions as they happen, follow a change of split point while everything runs, say
where an attack is not available, and say so when a process dies. Faces mode names who the attacker takes each face
for, or says why it cannot. Screenshots are kept in artifacts/ (git-ignored) for a person to look at.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import EXPORTED_SPLITS

CHROMIUM = Path("/usr/bin/chromium")
FIREFOX = shutil.which("firefox-esr") or shutil.which("firefox")
VIEWPORT = {"width": 1400, "height": 1000}
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
# As the Makefile's CI starts it: no GPU, no sandbox (root in a container), and nothing that calls home.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = pytest.mark.slow
needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs Chromium at /usr/bin/chromium (apt-get install chromium)"
)


def reconstructions(page) -> int:
    return int(page.eval_on_selector("#live", "e => e.dataset.reconstructions"))


def wait_for_reconstructions(page, at_least: int, timeout_s: float = 60) -> None:
    page.wait_for_function(
        f"Number(document.querySelector('#live').dataset.reconstructions) >= {at_least}", timeout=timeout_s * 1000
    )


def start_demo(*options: str) -> tuple[subprocess.Popen, str]:
    """`splitleak demo --port 0 OPTIONS`, and the address it prints once it serves the page."""
    cmd = [sys.executable, "-m", "splitleak.cli", "demo", "--port", "0", *options]
    demo = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    for line in demo.stdout:
        if match := re.search(r"http://[\d.]+:\d+/", line):
            return demo, match.group(0)
    pytest.fail(f"the demo did not print its address (exit {demo.wait()})")


def open_browser(p, profile: Path):
    """Debian's Chromium with a fresh profile (never a browser Playwright downloads)."""
    return p.chromium.launch_persistent_context(
        profile, executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, viewport=VIEWPORT
    )


def open_page(p, tmp_path: Path) -> tuple:
    """(browser, a new page in it, the list the page's JavaScript errors go to)."""
    browser = open_browser(p, tmp_path / "profile")
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    return browser, page, errors


@needs_chromium
def test_the_demo_page_shows_scored_reconstructions_follows_the_split_and_says_when_a_process_dies(
    attacked_model_dir, tmp_path
):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    started = time.perf_counter()
    demo, url = start_demo("--models", str(attacked_model_dir), "--dataset", "embedded")
    try:
        with sync_playwright() as p:
            browser, page, errors = open_page(p, tmp_path)
            page.goto(url)
            wait_for_reconstructions(page, 1)
            first_reconstruction_s = time.perf_counter() - started
            wait_for_reconstructions(page, 20)
            assert page.eval_on_selector("#live", "e => e.dataset.split") == EXPORTED_SPLITS[0]
            scores = page.inner_text(".attack[data-attack=decoder] .scores")
            assert re.fullmatch(r"PSNR \d+\.\d dB · SSIM -?\d\.\d{3}", scores), scores
            assert page.inner_text("#prediction") not in ("", "–")

            page.select_option("#split", EXPORTED_SPLITS[1])
            page.wait_for_function(f"document.querySelector('#live').dataset.split === '{EXPORTED_SPLITS[1]}'")
            switched = reconstructions(page)
            wait_for_reconstructions(page, switched + 10)
            assert page.eval_on_selector("#live", "e => e.dataset.split") == EXPORTED_SPLITS[1]
            assert "32×16×16" in page.inner_text("#activation-caption")
            scores = page.inner_text(".attack[data-attack=decoder] .scores")
            assert re.fullmatch(r"PSNR \d+\.\d dB · SSIM -?\d\.\d{3}", scores), scores
            page.screenshot(path=ARTIFACTS / "demo.png", full_page=True)
            shown_per_s = measure_page_rate(page)

            page.select_option("#split", "layer3")  # no decoder was trained for it
            page.wait_for_function("document.querySelector('#live').dataset.split === 'layer3'")
            scores = page.inner_text(".attack[data-attack=decoder] .scores")
            assert scores.startswith("decoder is not available at layer3: no decoder was trained"), scores
            assert "no attack trained" in page.inner_text("#split option[value=layer3]")

            page.select_option("#device", "armv7")  # the slowest profile: its head takes tens of times this host's
            rows = "[...document.querySelectorAll('#stage-table tr')]"  # a swatch, the stage, its last time, its median
            slow = ".some(r => r.cells[1].textContent === 'head' && +r.cells[2].textContent > 2)"
            page.wait_for_function(rows + slow)

            status = json.loads(urllib.request.urlopen(url + "status", timeout=10).read())
            os.kill(status["processes"]["cloud"]["pid"], signal.SIGKILL)
            page.wait_for_selector("#banner", state="visible", timeout=15_000)
            message = page.inner_text("#banner")
            assert "The cloud process" in message and "killed by SIGKILL" in message, message
            page.wait_for_function("document.querySelector('#live').classList.contains('stopped')")
            page.screenshot(path=ARTIFACTS / "demo-cloud-killed.png", full_page=True)
            assert errors == []
            browser.close()
    finally:
        demo.send_signal(signal.SIGINT)  # as Ctrl-C in its terminal
        code = demo.wait(timeout=60)
    assert code == 0
    for role in ("proxy", "device"):
        with pytest.raises(ProcessLookupError):
            os.kill(status["processes"][role]["pid"], 0)
    (ARTIFACTS / "demo-timing.json").write_text(
        json.dumps({"first_reconstruction_s": first_reconstruction_s, "page_frames_per_s": shown_per_s}) + "\n"
    )


def measure_page_rate(page, seconds: float = 3.0) -> float:
    """Frames the page drew per second, as the page itself counts them."""
    before = reconstructions(page)
    time.sleep(seconds)
    return (reconstructions(page) - before) / seconds


@needs_chromium
def test_faces_mode_shows_whom_the_attacker_takes_each_reconstructed_face_for(tmp_path):
    from playwright.sync_api import sync_playwright

    demo, url = start_demo("--faces")  # the shipped faces model, out of the box
    try:
        with sync_playwright() as p:
            browser, page, errors = open_page(p, tmp_path)
            page.goto(url)
            wait_for_reconstructions(page, 10)
            assert page.inner_text("#model") == "resnet20-att_faces · frames from att_faces"
            assert re.search(r"· person s\d+$", page.inner_text("#frame-caption"))
            scores = page.inner_text(".attack[data-attack=decoder] .scores")
            assert re.fullmatch(r"PSNR \d+\.\d dB · SSIM -?\d\.\d{3}", scores), scores
            guess = page.inner_text(".attack[data-attack=decoder] .who span")
            assert re.fullmatch(r"attacker's guess: person s\d+ · (right|wrong)", guess), guess
            assert page.is_hidden("#identity-note")
            page.screenshot(path=ARTIFACTS / "demo-faces.png", full_page=True)
            assert errors == []
            browser.close()
    finally:
        demo.send_signal(signal.SIGINT)
        assert demo.wait(timeout=60) == 0


@needs_chromium
def test_with_mutual_tls_the_page_says_the_proxy_sees_ciphertext_and_shows_the_curious_cloud_s_reconstructions(
    tmp_path,
):
    from playwright.sync_api import sync_playwright

    demo, url = start_demo("--faces", "--dataset", "embedded-faces", "--tls", str(tmp_path / "certs"))
    try:
        with sync_playwright() as p:
            browser, page, errors = open_page(p, tmp_path)
            page.goto(url)
            wait_for_reconstructions(page, 5)  # fed by the cloud: the proxy has only ciphertext
            wire = page.inner_text("#wire")
            assert wire.startswith("Mutual TLS between device and cloud: the attacker's proxy holds no key"), wire
            assert "The reconstructions below are the curious cloud's" in wire
            assert page.inner_text("#activation-title") == "Activation the cloud received"
            scores = page.inner_text(".attack[data-attack=decoder] .scores")
            assert re.fullmatch(r"PSNR \d+\.\d dB · SSIM -?\d\.\d{3}", scores), scores
            page.screenshot(path=ARTIFACTS / "demo-tls.png", full_page=True)
            assert errors == []
            browser.close()
    finally:
        demo.send_signal(signal.SIGINT)
        assert demo.wait(timeout=60) == 0
    assert (tmp_path / "certs" / "ca.pem").exists()


@needs_chromium
def test_faces_mode_on_scikit_images_faces_says_why_it_names_no_one(tmp_path):
    from playwright.sync_api import sync_playwright

    demo, url = start_demo("--faces", "--dataset", "embedded-faces")  # what --faces streams without att_faces
    try:
        with sync_playwright() as p:
            browser, page, _ = open_page(p, tmp_path)
            page.goto(url)
            wait_for_reconstructions(page, 10)
            note = page.inner_text("#identity-note")
            assert note.startswith("Identity not available: the frames come from embedded-faces"), note
            assert "(not a face / face)" in note and "att_faces" in note
            assert page.is_hidden(".attack[data-attack=decoder] .who")
            assert "not available" in page.inner_text(".attack[data-attack=decoder] .who-note")
            assert page.inner_text("#truth") == ""  # its labels are not the model's people
            page.screenshot(path=ARTIFACTS / "demo-faces-embedded.png", full_page=True)
            browser.close()
    finally:
        demo.send_signal(signal.SIGINT)
        assert demo.wait(timeout=60) == 0


class FirefoxPage:
    """One tab of a headless Firefox, driven over WebDriver BiDi (the W3C protocol Firefox itself serves).

    Playwright drives only its own patched Firefox build, which is never downloaded here, so this speaks the
    protocol directly to Debian's `firefox-esr`: a WebSocket at ws://127.0.0.1:PORT/session and a handful of
    commands. With --remote-debugging-port, Firefox applies its recommended automation preferences (no updates,
    no telemetry, no first-run pages) to the fresh profile."""

    def __init__(self, ws) -> None:
        self.ws, self.ids, self.pending, self.errors = ws, itertools.count(1), {}, []
        self.reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        async for message in self.ws:
            m = json.loads(message.data)
            if m.get("id") in self.pending:
                self.pending.pop(m["id"]).set_result(m)
            elif m.get("method") == "log.entryAdded" and m["params"]["type"] == "javascript":
                self.errors.append(m["params"]["text"])  # an uncaught error in the page

    async def send(self, method: str, **params) -> dict:
        key = next(self.ids)
        self.pending[key] = reply = asyncio.get_running_loop().create_future()
        await self.ws.send_json({"id": key, "method": method, "params": params})
        m = await asyncio.wait_for(reply, 60)
        if m["type"] == "error":
            raise RuntimeError(f"{method}: {m['error']}: {m['message']}")
        return m["result"]

    async def open(self, url: str) -> None:
        await self.send("session.new", capabilities={})
        await self.send("session.subscribe", events=["log.entryAdded"])
        self.context = (await self.send("browsingContext.getTree"))["contexts"][0]["context"]
        await self.send("browsingContext.setViewport", context=self.context, viewport=VIEWPORT)
        await self.send("browsingContext.navigate", context=self.context, url=url, wait="complete")

    async def evaluate(self, expression: str):
        target = {"context": self.context}
        result = await self.send("script.evaluate", expression=expression, target=target, awaitPromise=True)
        if result["type"] == "exception":
            raise RuntimeError(f"{expression}: {result['exceptionDetails']['text']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while not await self.evaluate(expression):
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {timeout_s} s for {expression}")
            await asyncio.sleep(0.2)

    async def screenshot(self, path: Path) -> None:
        shot = await self.send("browsingContext.captureScreenshot", context=self.context, origin="document")
        path.write_bytes(base64.b64decode(shot["data"]))


def start_firefox(profile: Path) -> tuple[subprocess.Popen, int]:
    with socket.socket() as s:  # a free port for Firefox to listen on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    profile.mkdir()
    cmd = [FIREFOX, "--headless", "--no-remote", "--profile", str(profile), "--remote-debugging-port", str(port)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), port


async def drive_firefox(url: str, port: int) -> list[str]:
    """The page in Firefox: scored reconstructions arrive, a change of split point takes effect; returns its errors."""
    import aiohttp

    async with aiohttp.ClientSession() as http:
        for _ in range(150):  # Firefox takes a few seconds to start listening
            try:
                ws = await http.ws_connect(f"ws://127.0.0.1:{port}/session")
                break
            except aiohttp.ClientError:
                await asyncio.sleep(0.2)
        else:
            pytest.fail(f"Firefox did not serve WebDriver BiDi on port {port}")
        page = FirefoxPage(ws)
        await page.open(url)
        reconstructions = "Number(document.querySelector('#live').dataset.reconstructions)"
        await page.wait_for(f"{reconstructions} >= 20")
        scores = await page.evaluate("document.querySelector('.attack[data-attack=decoder] .scores').innerText")
        assert re.fullmatch(r"PSNR \d+\.\d dB · SSIM -?\d\.\d{3}", scores), scores
        await page.evaluate(
            "const s = document.querySelector('#split'); s.value = 'layer2'; s.dispatchEvent(new Event('change'))"
        )
        await page.wait_for("document.querySelector('#live').dataset.split === 'layer2'")
        switched = await page.evaluate(reconstructions)
        await page.wait_for(f"{reconstructions} >= {switched + 10}")
        assert "32×16×16" in await page.evaluate("document.querySelector('#activation-caption').innerText")
        await page.screenshot(ARTIFACTS / "demo-firefox.png")
        await page.send("session.end")
        page.reader.cancel()
        return page.errors


@pytest.mark.skipif(FIREFOX is None, reason="needs Firefox (apt-get install firefox-esr)")
def test_the_demo_page_works_in_firefox(tmp_path):
    ARTIFACTS.mkdir(exist_ok=True)
    demo, url = start_demo("--dataset", "embedded")  # the shipped model and its decoders: no data root needed
    firefox, port = start_firefox(tmp_path / "profile")
    try:
        errors = asyncio.run(drive_firefox(url, port))
    finally:
        firefox.terminate()
        firefox.wait(timeout=30)
        demo.send_signal(signal.SIGINT)
        code = demo.wait(timeout=60)
    assert errors == []
    assert code == 0
