"""`splitleak demo` in a real browser: Debian's Chromium, driven by Playwright, against the real processes.

The page must show scored reconstructions as they happen, follow a change of split point while everything runs, and
say so when a process dies. Screenshots are kept in artifacts/ (git-ignored) for a person to look at.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import EXPORTED_SPLITS, needs_shared

CHROMIUM = Path("/usr/bin/chromium")
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

pytestmark = [
    needs_shared,
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Chromium at /usr/bin/chromium (apt-get install chromium)"),
]


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


def test_the_demo_page_shows_scored_reconstructions_follows_the_split_and_says_when_a_process_dies(
    attacked_model_dir, tmp_path
):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    started = time.perf_counter()
    demo, url = start_demo("--models", str(attacked_model_dir), "--dataset", "embedded")
    try:
        with sync_playwright() as p:
            browser = open_browser(p, tmp_path / "profile")
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
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


def test_faces_mode_shows_whom_the_attacker_takes_each_reconstructed_face_for(tiny_faces_model_dir, tmp_path):
    from playwright.sync_api import sync_playwright

    demo, url = start_demo("--faces", "--models", str(tiny_faces_model_dir))
    try:
        with sync_playwright() as p:
            browser = open_browser(p, tmp_path / "profile")
            page = browser.new_page()
            page.goto(url)
            wait_for_reconstructions(page, 10)
            assert "frames from att_faces" in page.inner_text("#model")
            assert re.search(r"· person s\d+$", page.inner_text("#frame-caption"))
            guess = page.inner_text(".attack[data-attack=decoder] .who span")
            assert re.fullmatch(r"attacker's guess: person s\d+ · (right|wrong)", guess), guess
            page.screenshot(path=ARTIFACTS / "demo-faces.png", full_page=True)
            browser.close()
    finally:
        demo.send_signal(signal.SIGINT)
        assert demo.wait(timeout=60) == 0
