"""Headless Chromium through Selenium and Debian's chromium-driver (apt-get install chromium chromium-driver).

    python tests/browser.py PAGE.html SHOT.png     # look at a page as the test does, and keep a screenshot

look(page) opens a file:// page and -> what a person would see: every audio element (its source, duration and
error), every image (natural width), the number of rows of each table, the console's errors and every URL the
page fetched. The console comes from chromedriver's browser log, the fetched URLs from its performance log
(Chromium's network events)."""
import base64
import json
import os
import shutil
import sys
import time

CHROMIUM = ("chromium", "chromium-browser", "google-chrome")
# what the machine's closed network needs: no background connections, no component updates
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--mute-audio",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-extensions")

# waits for every audio element's metadata (or its error), at most 20 s, then describes the page
DESCRIBE = """const done = arguments[arguments.length - 1];
const audios = [...document.querySelectorAll('audio')];
const ready = a => a.readyState >= 1 || a.error ? null : new Promise(loaded => {
  a.addEventListener('loadedmetadata', loaded); a.addEventListener('error', loaded); });
Promise.race([Promise.all(audios.map(ready)), new Promise(later => setTimeout(later, 20000))]).then(() => done({
  title: document.title,
  audios: audios.map(a => ({src: a.currentSrc || a.src, duration: a.duration, error: a.error ? a.error.code : null})),
  images: [...document.images].map(i => ({src: i.currentSrc || i.src, width: i.naturalWidth})),
  tables: [...document.querySelectorAll('table')].map(t => t.rows.length),
  text: document.body.innerText,
}));"""


def find_chromium():
    """The browser, when its driver is there too (Debian packages them apart), else None."""
    browser = next((shutil.which(c) for c in CHROMIUM if shutil.which(c)), None)
    return browser if browser and shutil.which("chromedriver") else None


def open_chromium(executable=None):
    from selenium import webdriver  # here, so that a machine without selenium collects test_page.py and skips
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = executable or find_chromium()
    for flag in FLAGS:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    # the driver named, so that Selenium Manager never looks for one on the network
    return webdriver.Chrome(options=options, service=Service(executable_path=shutil.which("chromedriver")))


def network_events(driver):
    """Chromium's Network.* events since the last call, from the performance log."""
    events = (json.loads(entry["message"])["message"] for entry in driver.get_log("performance"))
    return [e for e in events if e["method"].startswith("Network.")]


def screenshot_to(driver, path, width):
    """The whole page (at most 6000 pixels high) as PNG, or JPEG for a path ending .jpg (smaller, for notes/)."""
    height = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]["height"]
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": width, "height": int(min(height, 6000)), "deviceScaleFactor": 1, "mobile": False})
    jpeg = str(path).lower().endswith((".jpg", ".jpeg"))
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "jpeg", "quality": 80} if jpeg else
                                  {"format": "png"})
    with open(path, "wb") as f:
        f.write(base64.b64decode(shot["data"]))


def look(page, screenshot=None, width=1400, executable=None):
    """Open `page` (a file path) in a new headless Chromium -> a dict: title, audios, images, tables (rows per
    table), text, errors (console errors, exceptions, failed loads), requests (every URL fetched)."""
    driver = open_chromium(executable)
    try:
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                               {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": False})
        driver.set_script_timeout(60)
        driver.get("file://" + os.path.abspath(page))  # returns after the load event
        seen = driver.execute_async_script(DESCRIBE)
        if screenshot:
            screenshot_to(driver, screenshot, width)
        time.sleep(0.5)  # whatever else arrives: late console messages, requests
        console = driver.get_log("browser")
        network = network_events(driver)
    finally:
        driver.quit()
    seen["errors"] = ([f"{e['message']} ({e['source']})" for e in console if e["level"] == "SEVERE"] +
                      [f"{e['params']['errorText']} {e['params']['requestId']}" for e in network
                       if e["method"] == "Network.loadingFailed" and not e["params"].get("canceled")])
    seen["requests"] = [e["params"]["request"]["url"] for e in network if e["method"] == "Network.requestWillBeSent"]
    return seen


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    if not os.path.isfile(sys.argv[1]):
        print(f"error: no page at {sys.argv[1]}: give an HTML file", file=sys.stderr)
        sys.exit(2)
    result = look(sys.argv[1], sys.argv[2])
    print(json.dumps({k: v for k, v in result.items() if k != "text"}, indent=1))
