"""Headless Chromium driven over the DevTools protocol on a pipe (--remote-debugging-pipe: JSON messages ended by
NUL on file descriptors 3 and 4), with the standard library only: no driver, no network.

    python tests/browser.py PAGE.html SHOT.png     # look at a page as the test does, and keep a screenshot

look(page) opens a file:// page and -> what a person would see: every audio element (its source, duration and
error), every image (natural width), the number of rows of each table, the console's errors and every URL the
page fetched."""
import base64
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time

CHROMIUM = ("chromium", "chromium-browser", "google-chrome")
# what the machine's closed network needs: no background connections, no component updates
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--mute-audio",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-extensions",
         "--remote-debugging-pipe")

# waits for every audio element's metadata (or its error), at most 20 s, then describes the page
DESCRIBE = """(async () => {
  const audios = [...document.querySelectorAll('audio')];
  const ready = a => a.readyState >= 1 || a.error ? null : new Promise(done => {
    a.addEventListener('loadedmetadata', done); a.addEventListener('error', done); });
  await Promise.race([Promise.all(audios.map(ready)), new Promise(done => setTimeout(done, 20000))]);
  return {
    title: document.title,
    audios: audios.map(a => ({src: a.currentSrc || a.src, duration: a.duration, error: a.error ? a.error.code : null})),
    images: [...document.images].map(i => ({src: i.currentSrc || i.src, width: i.naturalWidth})),
    tables: [...document.querySelectorAll('table')].map(t => t.rows.length),
    text: document.body.innerText,
  };
})()"""


def find_chromium():
    return next((shutil.which(c) for c in CHROMIUM if shutil.which(c)), None)


class Browser:
    def __init__(self, executable=None, timeout=60):
        self.timeout, self.next_id, self.events, self.buffer = timeout, 0, [], b""
        self.profile = tempfile.mkdtemp(prefix="chromium-")
        to_browser, self.write_fd = os.pipe()
        self.read_fd, from_browser = os.pipe()
        # the child gets the pipes as descriptors 3 (it reads) and 4 (it writes)
        self.process = subprocess.Popen(
            [executable or find_chromium(), *FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
            pass_fds=(3, 4), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=lambda: (os.dup2(to_browser, 3), os.dup2(from_browser, 4)))
        os.close(to_browser)
        os.close(from_browser)

    def send(self, method, params=None, session=None):
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self.write_fd, json.dumps(message).encode() + b"\0")
        while True:
            reply = self.receive()
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def receive(self, timeout=None):
        deadline = time.monotonic() + (timeout or self.timeout)
        while b"\0" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.read_fd], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer")
            chunk = os.read(self.read_fd, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed the pipe (it exited)")
            self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)

    def wait_for(self, method, timeout=None):
        for k, event in enumerate(self.events):
            if event.get("method") == method:
                return self.events.pop(k)
        while True:
            event = self.receive(timeout)
            if event.get("method") == method:
                return event
            self.events.append(event)

    def close(self):
        try:
            self.send("Browser.close")
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self.write_fd)
        os.close(self.read_fd)
        shutil.rmtree(self.profile, ignore_errors=True)


def look(page, screenshot=None, width=1400, executable=None):
    """Open `page` (a file path) in a new headless Chromium -> a dict: title, audios, images, tables (rows per
    table), text, errors (console errors, exceptions, failed loads), requests (every URL fetched)."""
    browser = Browser(executable)
    try:
        target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            browser.send(f"{domain}.enable", session=session)
        browser.send("Emulation.setDeviceMetricsOverride",
                     {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": False}, session)
        browser.send("Page.navigate", {"url": "file://" + os.path.abspath(page)}, session)
        browser.wait_for("Page.loadEventFired")
        seen = browser.send("Runtime.evaluate", {"expression": DESCRIBE, "awaitPromise": True,
                                                 "returnByValue": True}, session)
        if "exceptionDetails" in seen:
            raise RuntimeError(f"the page's description failed: {seen['exceptionDetails']}")
        seen = seen["result"]["value"]
        if screenshot:
            height = browser.send("Page.getLayoutMetrics", session=session)["cssContentSize"]["height"]
            browser.send("Emulation.setDeviceMetricsOverride",
                         {"width": width, "height": int(min(height, 6000)), "deviceScaleFactor": 1, "mobile": False},
                         session)
            jpeg = str(screenshot).lower().endswith((".jpg", ".jpeg"))  # smaller, for pictures kept in notes/
            shot = browser.send("Page.captureScreenshot", {"format": "jpeg", "quality": 80} if jpeg else
                                {"format": "png"}, session)
            with open(screenshot, "wb") as f:
                f.write(base64.b64decode(shot["data"]))
        try:  # whatever else arrived: late console messages, requests
            while True:
                browser.events.append(browser.receive(timeout=0.5))
        except TimeoutError:
            pass
    finally:
        browser.close()
    events = browser.events
    seen["errors"] = (
        [e["params"]["entry"]["text"] + " " + e["params"]["entry"].get("url", "") for e in events
         if e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error"] +
        [json.dumps(e["params"]["args"]) for e in events
         if e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] in ("error", "assert")] +
        [e["params"]["exceptionDetails"].get("text", "") for e in events if e.get("method") == "Runtime.exceptionThrown"] +
        [f"{e['params']['errorText']} {e['params']['requestId']}" for e in events
         if e.get("method") == "Network.loadingFailed" and not e["params"].get("canceled")])
    seen["requests"] = [e["params"]["request"]["url"] for e in events if e.get("method") == "Network.requestWillBeSent"]
    return seen


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    result = look(sys.argv[1], sys.argv[2])
    print(json.dumps({k: v for k, v in result.items() if k != "text"}, indent=1))
