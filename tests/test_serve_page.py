"""The page at `/` in a real headless browser (Debian's `chromium`, driven over the
DevTools protocol), checked in the DOM and in the picture a person sees (screenshots
decoded with Pillow):

- a base run: the playground streams a completion; the run view draws each chart with
  axes, tick labels and no filled region (an unfilled axis path once drew a black triangle
  over every chart), and a legend naming train and validation on the loss chart;
- a chat-finetuned run: the chat view streams two replies, each equal to greedy decoding
  of the whole conversation rendered by the run's template; Stop ends a stream and keeps
  what came; New chat clears the history.

Skipped only when no chromium binary is installed (`apt-get install chromium`; .ci/run
installs it). Each test saves its screenshots in its tmp_path (screen-*.png).
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image  # a dependency of matplotlib, so of gptlab

pytest.importorskip("starlette")
websockets_sync = pytest.importorskip("websockets.sync.client")

import test_serve_chat  # noqa: E402
from test_serve_chat import MESSAGES, greedy  # noqa: E402

from gptlab.data import chat  # noqa: E402
from gptlab.infer.engine import Engine, Sampling  # noqa: E402
from gptlab.infer.serve import ServerThread, build  # noqa: E402
from gptlab.interop.runs import open_run  # noqa: E402

BROWSER = next(
    (shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)),
    None,
)
pytestmark = pytest.mark.skipif(
    BROWSER is None, reason="no chromium binary (apt-get install chromium)"
)
chat_run = test_serve_chat.run  # the fixture: a tiny chat-templated run whose first reply ends
VIEWPORT = (1280, 1400)  # CSS pixels at scale 1: one screen pixel per CSS pixel
CHARTS = ("plot-loss", "plot-lr", "plot-speed")


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

    def open(self, url: str) -> None:
        """Load `url` at a fixed size and scale, and wait until its script has run."""
        width, height = VIEWPORT
        self.send(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )
        self.send("Page.enable")
        self.send("Page.navigate", url=url)
        self.wait_for("document.readyState === 'complete' && typeof $ === 'function'")

    def screenshot(self, path: Path) -> Image.Image:
        """What the tab shows now, as RGB pixels (also written to `path`)."""
        # two animation frames: the last DOM change is laid out and painted first
        self.eval("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
        png = base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"])
        path.write_bytes(png)
        image = Image.open(io.BytesIO(png)).convert("RGB")
        assert image.size == VIEWPORT, image.size
        return image

    def box(self, selector: str, index: int = 0) -> tuple[int, int, int, int]:
        """The `index`-th element's (left, top, right, bottom) in screen pixels."""
        r = self.eval(
            f"(() => {{ const r = document.querySelectorAll({json.dumps(selector)})[{index}]"
            ".getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; })()"
        )
        return tuple(round(v) for v in r)

    def colour(self, selector: str, prop: str) -> tuple[int, int, int]:
        """A computed colour property (stroke, fill, background-color) as (r, g, b)."""
        text = self.eval(
            f"getComputedStyle(document.querySelector({json.dumps(selector)}))[{json.dumps(prop)}]"
        )
        return tuple(int(v) for v in re.findall(r"\d+", text)[:3])


@pytest.fixture
def browser(tmp_path):
    proc = subprocess.Popen(
        [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--remote-debugging-port=0", f"--user-data-dir={tmp_path / 'profile'}",
         "about:blank"],
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


# ------------------------------------------------------------------ pixels


def pixels(image: Image.Image, box: tuple[int, int, int, int]) -> np.ndarray:
    """The pixels inside `box` (left, top, right, bottom), as an (N, 3) array of RGB."""
    return np.asarray(image.crop(box), dtype=np.int32).reshape(-1, 3)


def share(pix: np.ndarray, test) -> float:
    """The fraction of the pixels for which `test` (pixels -> booleans) holds."""
    return float(test(pix).mean())


def near(colour: tuple[int, int, int], tolerance: int = 40):
    """A test: is a pixel within `tolerance` of `colour` in every channel (anti-aliased
    edges of a line blend with the white behind them, its middle keeps the colour)."""
    return lambda pix: (np.abs(pix - np.array(colour)) <= tolerance).all(axis=1)


def dark(pix: np.ndarray) -> np.ndarray:
    return pix.sum(axis=1) < 3 * 80


def inked(pix: np.ndarray) -> np.ndarray:
    """Anything clearly off a white or near-white background: text, lines, marks."""
    return pix.min(axis=1) < 200


def check_chart(page: Page, image: Image.Image, svg: str, series: int, where: Path) -> None:
    """One chart as drawn: no area filled dark, both axes visible as lines in the axis
    colour, tick labels beside them, and each of `series` lines in its own colour."""
    left, top, right, bottom = page.box(svg)
    assert right <= VIEWPORT[0] and bottom <= VIEWPORT[1], f"{svg} off screen"
    pix = pixels(image, (left, top, right, bottom))
    # the black triangle covered a third of the chart; text and lines are a few percent
    assert share(pix, dark) < 0.03, f"{svg}: a dark filled region ({where})"
    axis = page.colour(f"{svg} .x-axis", "stroke")
    assert page.colour(f"{svg} .y-axis", "stroke") == axis
    x0, y0, x1, _ = page.box(f"{svg} .x-axis")
    xa, ya, _, yb = page.box(f"{svg} .y-axis")
    # each axis is a line of axis-coloured pixels along its whole length, not a smudge (a
    # line's box is rounded to whole pixels, so the row or column next to it may be the one)
    rows = [pixels(image, (x0 + 1, y, x1 - 1, y + 1)) for y in (y0 - 1, y0, y0 + 1)]
    assert max(share(r, near(axis, 12)) for r in rows) > 0.9, f"{svg}: no x axis ({where})"
    columns = [pixels(image, (x, ya + 1, x + 1, yb - 1)) for x in (xa - 1, xa, xa + 1)]
    assert max(share(c, near(axis, 12)) for c in columns) > 0.9, f"{svg}: no y axis ({where})"
    # tick labels: in the DOM, and as ink left of the y axis and below the x axis
    assert page.eval(f"document.querySelectorAll('{svg} text.tick-y').length") >= 3
    assert page.eval(f"document.querySelectorAll('{svg} text.tick-x').length") >= 2
    assert share(pixels(image, (left, top, xa - 6, bottom)), inked) > 0.01
    assert share(pixels(image, (left, y0 + 6, right, bottom)), inked) > 0.01
    for i in range(series):
        stroke = page.colour(f"{svg} .line{i}", "stroke")
        assert stroke != axis
        drawn = share(pix, near(stroke))
        assert drawn > 0.002, f"{svg}: series {i} not visible ({where})"


def check_no_dark_block(image: Image.Image, box: tuple[int, int, int, int], where: Path) -> None:
    assert share(pixels(image, box), dark) < 0.1, f"a dark block in {box} ({where})"


# ------------------------------------------------------------------ a base run


def test_playground_streams_and_run_view_plots(browser, tiny_run, tmp_path):
    run = open_run(tiny_run, "cpu")
    app, engine = build(run, max_batch=2)
    try:
        with ServerThread(app) as srv:
            page = browser
            page.open(srv.url + "/")
            # a base run opens on the playground, with no chat to offer
            page.wait_for("!$('view-play').hidden")
            assert page.eval("$('tab-chat').hidden") is True
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
            engine = Engine(run.model, run.tokenizer)
            assert text == engine.complete(["Every effort"], Sampling(12, temperature=0.0))[0]
            assert page.eval("window.updates") > 1
            shot = tmp_path / "screen-playground.png"
            image = page.screenshot(shot)
            out = page.box("#output")
            assert share(pixels(image, out), inked) > 0.01, f"no text in the output ({shot})"
            check_no_dark_block(image, out, shot)

            page.eval("location.hash = 'run'")
            d = page.wait_for(
                "document.querySelector('#plot-loss path.line0')",
                "document.querySelector('#plot-loss path.line0').getAttribute('d')",
            )
            assert d.count("L") >= 1  # a line through the logged steps
            assert page.eval("document.querySelector('#plot-loss path.line1') !== null")  # val
            legend = page.eval("document.querySelector('#plot-loss .legend').textContent")
            assert "train" in legend and "validation" in legend
            assert "context_length" in page.eval("$('config').textContent")
            assert page.eval("$('samples').children.length") >= 1
            shot = tmp_path / "screen-run.png"
            image = page.screenshot(shot)
            for svg, series in zip(CHARTS, (2, 1, 1), strict=True):
                check_chart(page, image, "#" + svg, series, shot)
    finally:
        engine.close()


# ------------------------------------------------------------------ a chat-finetuned run

INSTRUMENT = """
// every chat request's body in window.sent; with window.stall, a reply that sends one piece
// and then nothing until it is aborted, as a slow model would: Stop then comes mid-stream
window.realFetch = window.fetch;
window.sent = [];
window.stall = false;
window.fetch = (url, options) => {
  if (url !== '/v1/chat/completions') return realFetch(url, options);
  sent.push(JSON.parse(options.body));
  if (!stall) return realFetch(url, options);
  const piece = (delta) => 'data: ' + JSON.stringify(
    {choices: [{index: 0, delta: delta, finish_reason: null}]}) + '\\n\\n';
  const body = new ReadableStream({start(c) {
    c.enqueue(new TextEncoder().encode(piece({role: 'assistant', content: ''}) +
                                       piece({content: 'Half a'})));
    options.signal.addEventListener('abort', () =>
      c.error(new DOMException('the user pressed Stop', 'AbortError')));
  }});
  return Promise.resolve(new Response(body, {headers: {'Content-Type': 'text/event-stream'}}));
};
// the replies' texts, and how many times a reply's text changed (pieces arriving)
window.replies = () =>
  [...document.querySelectorAll('.turn.assistant .content')].map(e => e.textContent);
window.updates = 0;
new MutationObserver((records) => {
  for (const r of records) {
    const node = r.target.nodeType === 1 ? r.target : r.target.parentElement;
    if (node && node.matches('.turn.assistant .content')) updates++;
  }
}).observe($('chat-log'), {childList: true, characterData: true, subtree: true});
"""


def say(page: Page, text: str) -> str:
    """Type `text` into the chat box, send it, and wait for the reply to end: the chat
    status then. window.updates counts the changes of the reply's text."""
    page.eval("window.updates = 0; $('chat-input').focus()")
    page.send("Input.insertText", text=text)
    page.eval("$('chat-send').click()")
    return page.wait_for(
        "!$('chat-send').disabled && !$('chat-status').textContent.endsWith('…')",
        "$('chat-status').textContent",
    )


def test_chat_view_streams_each_turn_over_the_whole_history(browser, chat_run, tmp_path):
    tok = chat_run.tokenizer
    stop = {chat.DEFAULT.end_id(tok), 50256}

    def greedy_reply(messages: list[dict]) -> str:
        ids, _ = chat.render(chat.DEFAULT, tok, messages, add_generation_prompt=True)
        return tok.decode(greedy(chat_run.model, ids, 40, stop)[0])

    app, engine = build(chat_run, max_batch=2)
    try:
        with ServerThread(app) as srv:
            page = browser
            page.open(srv.url + "/")
            # a run with a chat template opens on its chat
            page.wait_for("!$('view-chat').hidden")
            assert page.eval("$('tab-chat').hidden") is False
            assert page.eval("document.title").endswith("gptlab chat")
            page.eval(INSTRUMENT)
            page.eval(
                "$('chat-temperature').value = '0'; $('chat-max-tokens').value = '40';"
                "$('system-box').open = true; $('system').focus()"
            )
            page.send("Input.insertText", text=MESSAGES[0]["content"])

            history = [MESSAGES[0]]
            for question in (MESSAGES[1]["content"], "And again?"):
                status = say(page, question)
                assert status.startswith("done ("), status
                assert page.eval("updates") > 1  # the reply came in pieces
                history.append({"role": "user", "content": question})
                sent = page.eval("sent[sent.length - 1]")
                assert sent["messages"] == history and sent["stream"] is True
                reply = page.eval("replies()")[-1]
                assert reply == greedy_reply(history)
                history.append({"role": "assistant", "content": reply})
            first, second = page.eval("replies()")
            assert first and second  # the tiny model says something in both turns
            assert "<|end|>" not in first + second
            users = page.eval(
                "[...document.querySelectorAll('.turn.user .content')].map(e => e.textContent)"
            )
            assert users == [MESSAGES[1]["content"], "And again?"]

            shot = tmp_path / "screen-chat.png"
            image = page.screenshot(shot)
            log = page.box("#chat-log")
            check_no_dark_block(image, log, shot)
            # the two speakers' turns are drawn apart: each on its own background, with text
            user_bg = page.colour(".turn.user .content", "background-color")
            bot_bg = page.colour(".turn.assistant .content", "background-color")
            assert user_bg != bot_bg
            for role, bg in (("user", user_bg), ("assistant", bot_bg)):
                for i in range(2):
                    left, top, right, bottom = page.box(f".turn.{role} .content", i)
                    assert log[0] <= left and right <= log[2] and log[1] <= top and bottom <= log[3]
                    turn = pixels(image, (left + 1, top + 1, right - 1, bottom - 1))
                    assert share(turn, near(bg, 3)) > 0.5, f"{role} {i}: background ({shot})"
                    assert share(turn, dark) > 0.01, f"{role} {i}: no text ({shot})"
            # the user's turns on the right, the model's on the left
            assert page.box(".turn.user .content")[0] > page.box(".turn.assistant .content")[0]

            # Stop, mid-stream: what came stays, as the reply the next turn follows
            page.eval("stall = true; $('chat-input').focus()")
            page.send("Input.insertText", text="Tell me more.")
            page.eval("$('chat-send').click()")
            page.wait_for("replies().length === 3 && replies()[2] === 'Half a'")
            assert page.eval("$('chat-status').textContent") == "replying…"
            page.eval("$('chat-stop').click()")
            assert page.wait_for("$('chat-status').textContent === 'stopped'")
            assert page.eval("$('chat-stop').disabled && !$('chat-send').disabled")
            assert page.eval("document.querySelector('.turn.streaming')") is None
            assert page.eval("replies()")[-1] == "Half a"
            page.eval("stall = false")
            history += [
                {"role": "user", "content": "Tell me more."},
                {"role": "assistant", "content": "Half a"},
            ]
            assert say(page, "Go on.").startswith("done (")
            assert page.eval("sent[sent.length - 1].messages") == [
                *history,
                {"role": "user", "content": "Go on."},
            ]

            # New chat: an empty log, and the next turn sends only the system message and itself
            page.eval("$('chat-new').click()")
            assert page.eval("$('chat-log').children.length") == 0
            assert say(page, MESSAGES[1]["content"]).startswith("done (")
            assert page.eval("sent[sent.length - 1].messages") == MESSAGES
            assert page.eval("replies()") == [greedy_reply(MESSAGES)]

            # a turn the server refuses (longer than the context) is taken back, to edit
            status = say(page, "word " * 200)
            assert status.startswith("error: the conversation no longer fits"), status
            assert "New chat" in status
            assert page.eval("$('chat-log').children.length") == 2
            assert page.eval("$('chat-input').value") == "word " * 200
            assert page.eval("sent[sent.length - 1].messages") == [
                *MESSAGES,
                {"role": "assistant", "content": greedy_reply(MESSAGES)},
                {"role": "user", "content": "word " * 200},
            ]
    finally:
        engine.close()
