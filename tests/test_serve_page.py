"""The page at `/` in a real headless browser (Debian's `chromium`, driven over the
DevTools protocol): type a prompt, press Send, watch the text stream in; open the run
view and find the loss curve drawn. Skipped only when no chromium binary is installed
(`apt-get install chromium`; .ci/run installs it)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.request

import pytest

pytest.importorskip("starlette")
websockets_sync = pytest.importorskip("websockets.sync.client")

from gptlab.generate import complete  # noqa: E402
from gptlab.runs import open_run  # noqa: E402
from gptlab.serve import ServerThread, build  # noqa: E402

BROWSER = next(
    (shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)),
    None,
)
pytestmark = pytest.mark.skipif(
    BROWSER is None, reason="no chromium binary (apt-get install chromium)"
)


class Page:
    """One browser tab, spoken to over the DevTools protocol."""

    def __init__(self, ws):
        self.ws, self.next_id = ws, 0

    def send(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:  # skip the events the browser sends on its own
            msg = json.loads(self.ws.recv(timeout=30))
            if msg.get("id") == self.next_id:
                assert "error" not in msg, msg
                return msg["result"]

    def eval(self, expression: str):
        """The value of a JS expression; a promise is awaited (that is how tests wait)."""
        result = self.send(
            "Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True
        )
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    def wait_for(self, condition: str, value: str = "true"):
        """Resolve once `condition` holds in the page (checked every 20 ms), with `value`."""
        return self.eval(
            f"new Promise(done => {{ const t = setInterval(() => {{ if ({condition}) "
            f"{{ clearInterval(t); done({value}); }} }}, 20); }})"
        )


@pytest.fixture
def browser(tmp_path):
    proc = subprocess.Popen(
        [BROWSER, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--remote-debugging-port=0", f"--user-data-dir={tmp_path / 'profile'}", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        for line in proc.stderr:  # chromium says where its DevTools listen
            m = re.search(r"ws://127\.0\.0\.1:(\d+)/", line)
            if m:
                break
        else:
            pytest.fail("chromium did not start its DevTools endpoint")
        with urllib.request.urlopen(f"http://127.0.0.1:{m.group(1)}/json/list", timeout=30) as r:
            target = next(t for t in json.load(r) if t["type"] == "page")
        with websockets_sync.connect(target["webSocketDebuggerUrl"], max_size=None) as ws:
            yield Page(ws)
    finally:
        proc.kill()
        proc.wait()


def test_playground_streams_and_run_view_plots(browser, tiny_run):
    run = open_run(tiny_run, "cpu")
    app, engine = build(run, max_batch=2)
    try:
        with ServerThread(app) as srv:
            page = browser
            page.send("Page.enable")
            page.send("Page.navigate", url=srv.url + "/")
            page.wait_for("document.readyState === 'complete' && typeof $ === 'function'")
            # count the updates of the output, to see the text arrive in pieces
            page.eval(
                "window.updates = 0; new MutationObserver(() => window.updates++)"
                ".observe($('out-text'), {childList: true, characterData: true, subtree: true})"
            )
            page.eval(
                "$('temperature').value = '0'; $('max-tokens').value = '12'; $('prompt').focus()"
            )
            page.send("Input.insertText", text="Every effort")
            page.eval("$('send').click()")
            status = page.wait_for(
                "$('status').textContent.startsWith('done')", "$('status').textContent"
            )
            text = page.eval("$('out-text').textContent")
            assert status == "done (length)"
            assert (
                text == complete(run.model, run.tokenizer, ["Every effort"], 12, temperature=0.0)[0]
            )
            assert page.eval("window.updates") > 1

            page.eval("location.hash = 'run'")
            d = page.wait_for(
                "document.querySelector('#plot-loss path.line0')",
                "document.querySelector('#plot-loss path.line0').getAttribute('d')",
            )
            assert d.count("L") >= 1  # a line through the logged steps
            assert page.eval("document.querySelector('#plot-loss path.line1') !== null")  # val
            assert "context_length" in page.eval("$('config').textContent")
            assert page.eval("$('samples').children.length") >= 1
    finally:
        engine.close()
