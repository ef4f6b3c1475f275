"""Retake docs/app.png and docs/app-chat.png: the app over the shipped Shapes checkpoint in Debian's headless
Chromium (``apt-get install chromium chromium-driver``; Selenium from ``unigen[dev]``), nothing downloaded.

    python docs/app_screenshots.py [--out docs]

app.png: four images generated on the Generate tab. app-chat.png: a two-turn chat on the Understand tab, an
image uploaded with each question and the model's own answers. The page is fresh for each shot, so no message
of an earlier request (an error toast) stands over it; the script stops if one shows. It prints each answer
beside the caption the image was drawn from: look at both PNGs before committing them.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from PIL import Image

from unigen.app import start
from unigen.generation.pipeline import UniGenPipeline
from unigen.recipes import recipe_path
from unigen.shapes import ShapeSpec, caption, render

PROMPT = "a large red circle at the top left"
CHAT = [ShapeSpec("blue", "triangle", "small", "bottom right"), ShapeSpec("yellow", "circle", "small", "top right")]
QUESTION = "Describe the image."
WAIT_S = 120  # an upper bound on one request on a loaded 2-core machine; each normally takes a second or two
COLORS = 64  # a palette PNG stays small in the repository
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1100,1000")
ANSWERS = "return [...document.querySelectorAll('#chatbot .bot-row')].map(m => m.innerText.trim())"


def chromium(profile: Path):
    """Headless Chromium through Debian's chromedriver; Selenium Manager told not to look on the network."""
    import os

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    if binary is None or driver is None:
        sys.exit("error: needs Chromium and its driver: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    os.environ["SE_OFFLINE"] = "true"
    return webdriver.Chrome(service=Service(driver), options=options)


def shoot(browser, path: Path) -> None:
    from selenium.webdriver.common.by import By

    toasts = [t.text for t in browser.find_elements(By.CSS_SELECTOR, ".toast-body") if t.is_displayed()]
    if toasts:
        sys.exit(f"error: a message stands over the page, not saved: {toasts}")
    raw = path.with_suffix(".raw.png")
    browser.save_screenshot(str(raw))
    Image.open(raw).convert("RGB").quantize(COLORS).save(path, optimize=True)
    raw.unlink()
    print(f"wrote {path}")


def generate_tab(browser, url: str, out: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, WAIT_S)
    browser.get(url)
    wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "#prompt textarea"))).send_keys(PROMPT)
    browser.find_element(By.ID, "generate-button").click()
    loaded = "return [...document.querySelectorAll('#gallery img')].filter(i => i.complete && i.naturalWidth).length"
    wait.until(lambda d: d.execute_script(loaded) >= 4)
    wait.until(ec.text_to_be_present_in_element((By.ID, "downloads"), "unigen_seed0"))
    shoot(browser, out / "app.png")


def chat_tab(browser, url: str, out: Path, scratch: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, WAIT_S)
    browser.get(url)
    wait.until(ec.element_to_be_clickable((By.XPATH, "//button[@role='tab'][contains(., 'Understand')]"))).click()
    for turn, spec in enumerate(CHAT, 1):
        image = scratch / f"turn{turn}.png"
        render(spec, seed=[5, turn]).pil().save(image)
        upload = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#chat-input input[type=file]")))
        browser.execute_script("arguments[0].value = ''", upload)  # ChromeDriver adds to the files already chosen
        upload.send_keys(str(image))
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#chat-input img")))  # the upload's thumbnail
        box = browser.find_element(By.CSS_SELECTOR, "#chat-input textarea")
        box.send_keys(QUESTION)
        box.send_keys(Keys.ENTER)
        wait.until(lambda d, n=turn: len([a for a in d.execute_script(ANSWERS) if a]) >= n)
        wait.until(lambda d: not d.find_elements(By.CSS_SELECTOR, "#chatbot .pending, #chat-input img"))
        print(f"turn {turn}: answered {browser.execute_script(ANSWERS)[-1]!r}; drawn from {caption(spec)!r}")
    shoot(browser, out / "app-chat.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent, help="folder for the PNGs (docs/)")
    args = parser.parse_args()
    running = start(UniGenPipeline.from_pretrained(recipe_path("checkpoints/shapes-small")),
                    "checkpoints/shapes-small", port=0)
    with tempfile.TemporaryDirectory() as scratch:
        browser = chromium(Path(scratch) / "profile")
        try:
            generate_tab(browser, running.url, args.out)
            chat_tab(browser, running.url, args.out, Path(scratch))
        finally:
            browser.quit()
            running.close()


if __name__ == "__main__":
    main()
