"""The web page of scripts/serve_openai_api.py in a real browser: headless Chromium, driven through the
DevTools protocol over ``--remote-debugging-pipe`` (NUL-terminated JSON on file descriptors 3 and 4), so no
Python package beyond the standard library is needed. Skipped where no Chromium is installed.

The test loads the page, opens the compare view, types a question, clicks Compare and waits: every model
(the base and each adapter set) gets one column, each streamed in several pieces, each equal to that
model's reply from the API.
"""
import fcntl
import json
import os
import select
import shutil
import subprocess
import time

import pytest

from conftest import IDENTITY_ANSWER

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
pytestmark = [pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (Debian: apt-get install chromium)"),
              pytest.mark.slow]   # a headless browser on the trained smoke server

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-extensions",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
         "--no-default-browser-check", "--remote-debugging-pipe"]


def high_fd(fd: int) -> int:
    """A copy of fd numbered 10 or more (the original is closed): moving the pipe ends onto fds 3 and 4
    must not overwrite one of them before it is copied."""
    high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return high


class Browser:
    """A headless Chromium and one page in it, spoken to over the DevTools pipe."""

    def __init__(self, profile):
        to_chrome_r, self.w = map(high_fd, os.pipe())     # Chromium reads commands on fd 3
        self.r, from_chrome_w = map(high_fd, os.pipe())   # and writes replies and events on fd 4

        def child_fds():  # in the child, between fork and exec: the pipe ends become fds 3 and 4
            os.dup2(to_chrome_r, 3)
            os.dup2(from_chrome_w, 4)

        # close_fds=False keeps fds 3 and 4; every other fd Python opened is non-inheritable anyway
        self.proc = subprocess.Popen([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                     preexec_fn=child_fds, close_fds=False,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self.buf = b""
        self.last_id = 0
        self.session = None
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    def send(self, method, timeout=30, **params):
        """One command; events that arrive before its answer are skipped."""
        self.last_id += 1
        msg = {"id": self.last_id, "method": method, "params": params}
        if self.session:
            msg["sessionId"] = self.session
        data = json.dumps(msg).encode() + b"\0"
        while data:
            data = data[os.write(self.w, data):]
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" not in self.buf:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([self.r], [], [], left)[0]:
                    raise TimeoutError(f"Chromium did not answer {method} within {timeout} s")
                chunk = os.read(self.r, 1 << 16)
                if not chunk:
                    raise RuntimeError(f"Chromium exited (status {self.proc.poll()})")
                self.buf += chunk
            raw, _, self.buf = self.buf.partition(b"\0")
            reply = json.loads(raw)
            if reply.get("id") == self.last_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def eval(self, expression, timeout=30):
        """Run JavaScript in the page (a promise is awaited) and return its JSON-able value."""
        r = self.send("Runtime.evaluate", timeout=timeout, expression=expression, awaitPromise=True,
                      returnByValue=True)
        if "exceptionDetails" in r:
            raise AssertionError(f"page error: {r['exceptionDetails'].get('exception', r['exceptionDetails'])}")
        return r["result"].get("value")

    def close(self):
        try:
            self.session = None
            self.send("Browser.close", timeout=5)
        except (OSError, RuntimeError, TimeoutError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self.w)
        os.close(self.r)


WAIT_READY = """new Promise((resolve, reject) => {
  const t0 = Date.now();
  (function poll() {
    if (document.readyState === "complete" && document.body && document.body.dataset.ready === "1") resolve(true);
    else if (Date.now() - t0 > 15000) reject(new Error("the page never listed the models"));
    else setTimeout(poll, 50);
  })();
})"""

RUN_COMPARE = """(async () => {
  document.getElementById("compare").click();
  const t0 = Date.now();
  while (document.body.dataset.compare !== "done") {
    if (Date.now() - t0 > 20000) throw new Error("compare did not finish");
    await new Promise((r) => setTimeout(r, 50));
  }
  return [...document.querySelectorAll("#columns .col")].map((c) => ({
    model: c.dataset.model, state: c.dataset.state, chunks: Number(c.dataset.chunks),
    text: c.querySelector(".text").textContent }));
})()"""


def test_compare_view_streams_one_answer_per_model(api_server, tmp_path):
    import urllib.request

    server, url, _ = api_server
    models = [m["id"] for m in json.load(urllib.request.urlopen(url + "/v1/models"))["data"]]
    expected = {}
    for model in models:  # the API's own replies, for the settings the page will use
        body = json.dumps({"model": model, "temperature": 0, "max_tokens": 16,
                           "messages": [{"role": "user", "content": "你是谁？"}]}).encode()
        req = urllib.request.Request(url + "/v1/chat/completions", body, {"Content-Type": "application/json"})
        expected[model] = json.load(urllib.request.urlopen(req))["choices"][0]["message"]["content"]
    browser = Browser(tmp_path / "profile")
    try:
        browser.send("Page.navigate", url=url + "/")
        browser.eval(WAIT_READY, timeout=20)
        browser.eval('document.getElementById("tab-compare").click();'
                     'document.getElementById("temperature").value = "0";'
                     'document.getElementById("max-tokens").value = "16";'
                     'document.getElementById("compare-input").focus()')
        assert browser.eval('getComputedStyle(document.getElementById("compare-view")).display') != "none"
        browser.send("Input.insertText", text="你是谁？")   # typed as a user would
        columns = browser.eval(RUN_COMPARE, timeout=30)
    finally:
        browser.close()
    assert [c["model"] for c in columns] == models and len(models) == 4
    for c in columns:
        assert c["state"] == "done" and c["chunks"] >= 2, c     # streamed, in several pieces
        assert c["text"] == expected[c["model"]], c
    assert columns[1]["text"] == IDENTITY_ANSWER and IDENTITY_ANSWER not in columns[0]["text"]
