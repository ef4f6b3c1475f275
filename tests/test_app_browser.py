"""unigen app in a real browser: Debian's headless Chromium, driven by Selenium through Debian's chromedriver
(nothing is downloaded), against the app over the shipped Shapes checkpoint. It types a prompt, presses
Generate, sees the images, asks about an uploaded image in the chat, and keeps screenshots of both in the test's
tmp folder (docs/app_screenshots.py takes the README's pictures, on fresh pages without error toasts)."""

import shutil

import pytest

from unigen.app import start
from unigen.generation.pipeline import UniGenPipeline
from unigen.recipes import recipe_path
from unigen.shapes import ShapeSpec, caption, render

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="needs Debian's Chromium and ChromeDriver (apt-get install chromium chromium-driver; .ci/run installs them)")

PROMPT = "a large red circle at the top left"
TRIANGLE = ShapeSpec("blue", "triangle", "small", "bottom right")
REQUEST_S = 60  # a generous upper bound on a loaded 2-core machine; each wait normally takes a second or two


@pytest.fixture(scope="module")
def app_url():
    running = start(UniGenPipeline.from_pretrained(recipe_path("checkpoints/shapes-small")), "checkpoints/shapes-small",
                    port=0)
    yield running.url
    running.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # as root in a container with no network: no sandbox, no GPU, no background calls out
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1100,1000", f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SE_OFFLINE", "true")  # Selenium Manager must not look for drivers on the network
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def test_generate_and_chat_in_the_browser(app_url, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, REQUEST_S)
    browser.get(app_url)
    prompt = wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "#prompt textarea")))

    prompt.send_keys(PROMPT)
    browser.find_element(By.ID, "generate-button").click()
    loaded = ("return [...document.querySelectorAll('#gallery img')]"
              ".filter(i => i.complete && i.naturalWidth > 0).length")
    wait.until(lambda d: d.execute_script(loaded) >= 4)
    wait.until(ec.text_to_be_present_in_element((By.ID, "downloads"), "unigen_seed0"))
    browser.save_screenshot(str(tmp_path / "generate.png"))

    # a bad input is a message on the page, and the page keeps working
    prompt.send_keys(Keys.CONTROL, "a")
    prompt.send_keys(Keys.DELETE)
    browser.find_element(By.ID, "generate-button").click()
    wait.until(ec.text_to_be_present_in_element((By.TAG_NAME, "body"), "Enter a prompt"))

    image = tmp_path / "triangle.png"
    render(TRIANGLE, seed=[5, 5]).pil().save(image)
    browser.find_element(By.XPATH, "//button[@role='tab'][contains(., 'Understand')]").click()
    upload = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#chat-input input[type=file]")))
    upload.send_keys(str(image))
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#chat-input img")))  # the upload's thumbnail
    box = browser.find_element(By.CSS_SELECTOR, "#chat-input textarea")
    box.send_keys("Describe the image.")
    box.send_keys(Keys.ENTER)
    wait.until(ec.text_to_be_present_in_element((By.ID, "chatbot"), caption(TRIANGLE)))
    browser.save_screenshot(str(tmp_path / "chat.png"))
