"""web/ in a real browser (headless Chromium, driven by Playwright): the page's JavaScript sampler
gives exactly deploy.py's OnnxSampler tokens from the same numpy draws, refuses bad arguments with
the same messages, draws decoded images step by step and channel by channel, and says in one line
what is wrong when the graphs are missing, of another model or broken, or WebAssembly is absent.

Skipped, with one line naming what is missing, without Playwright, a Chromium, ONNX Runtime Web
(npm ci --prefix web) or the page's graphs; .ci/run installs them.
"""
import functools
import importlib.util
import json
import os
import shutil
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from conftest import ROOT

import deploy

pytestmark = pytest.mark.slow

WEB = ROOT / "web"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# the page's sampler, with numpy's draws replayed (settings in deploy.py's names)
SAMPLE = """async ([labels, settings, draws]) => {
  const s = settings, camel = {numIter: s.num_iter, cfg: s.cfg, temperature: s.temperature,
    cfgMode: s.cfg_mode, positionOrder: s.position_order};
  try {
    const tokens = await tokenbridge.model.sampleTokens(labels,
      {...camel, random: tokenbridge.replayRandom(draws)});
    return Array.from(tokens);
  } catch (e) { return e.message; }
}"""


def missing():
    """What the browser test needs and this machine lacks, or None."""
    if importlib.util.find_spec("playwright") is None:
        return "Playwright (pip install playwright)"
    if CHROMIUM is None:
        return "a Chromium browser (apt-get install chromium)"
    if not (WEB / "node_modules" / "onnxruntime-web").is_dir():
        return "ONNX Runtime Web (npm ci --prefix web)"
    return None


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A local server over a folder holding the page (web/) beside graph folders that are wrong
    in one way each; yields its address."""
    if missing():
        pytest.skip(f"the browser test needs {missing()}")
    root = tmp_path_factory.mktemp("site")
    os.symlink(WEB, root / "web")
    for name in ("format2", "no-vae", "broken"):
        shutil.copytree(WEB / "model", root / name)
    (root / "bare").mkdir()                                  # the page without ONNX Runtime Web
    for name in ("index.html", "tokenbridge.js", "model"):
        os.symlink(WEB / name, root / "bare" / name)
    meta = json.loads((WEB / "model" / deploy.META_FILE).read_text())
    (root / "format2" / deploy.META_FILE).write_text(json.dumps({**meta, "format": 2}))
    (root / "no-vae" / deploy.META_FILE).write_text(json.dumps({**meta, "vae": None}))
    graph = root / "broken" / deploy.HEAD_FILE
    graph.write_bytes(graph.read_bytes()[:1000])
    handler = functools.partial(QuietHandler, directory=str(root))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


class QuietHandler(SimpleHTTPRequestHandler):
    extensions_map = {**SimpleHTTPRequestHandler.extensions_map, ".mjs": "text/javascript",
                      ".wasm": "application/wasm"}

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def browser(site):
    from playwright.sync_api import sync_playwright
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


def open_page(browser, site, query="", init_script=None, page_path="web/index.html"):
    """The page after loading, with its status line."""
    page = browser.new_page(viewport={"width": 1100, "height": 1000})
    if init_script:
        page.add_init_script(init_script)
    page.goto(f"{site}/{page_path}{query}")
    page.wait_for_function("!document.getElementById('status').textContent.startsWith('load')",
                           timeout=60_000)
    return page, page.text_content("#status")


@pytest.fixture(scope="module")
def page(browser, site):
    page, status = open_page(browser, site)
    assert status.startswith("ready"), status
    return page


@pytest.fixture(scope="module")
def sampler():
    return deploy.OnnxSampler(str(WEB / "model"), "cpu", threads=1)


def numpy_draws(seed, B, N, C, num_iter, position_order):
    """What OnnxSampler.sample_tokens draws from default_rng(seed), in its order: the
    permutations, then per step the channel uniforms and, in confidence order, the Gumbel
    uniforms."""
    rng = np.random.default_rng(seed)
    draws = [rng.permutation(N).tolist() for _ in range(B)] if position_order == "random" else []
    for _ in range(num_iter):
        draws.append(rng.random((B, N, C)).astype(np.float32).ravel().tolist())
        if position_order == "confidence":
            draws.append(rng.random((B, N)).astype(np.float32).ravel().tolist())
    return draws


SETTINGS = [dict(num_iter=4, cfg=3.0, temperature=0.7, cfg_mode="features",
                 position_order="random"),
            dict(num_iter=16, cfg=1.0, temperature=1.0, cfg_mode="features",
                 position_order="random"),
            dict(num_iter=5, cfg=2.0, temperature=0.9, cfg_mode="logits",
                 position_order="confidence")]


@pytest.mark.parametrize("settings", SETTINGS, ids=["guided", "unguided", "logits-confidence"])
def test_the_page_samples_onnx_samplers_tokens(page, sampler, settings):
    labels, seed = [3, 7, 0], 5
    want = sampler.sample_tokens(labels, seed=seed, **settings)
    B, N, C = want.shape
    draws = numpy_draws(seed, B, N, C, settings["num_iter"], settings["position_order"])
    got = page.evaluate(SAMPLE, [labels, settings, draws])
    assert not isinstance(got, str), got
    np.testing.assert_array_equal(np.array(got).reshape(B, N, C), want)


# (not -1.0: JavaScript writes it -1, Python -1.0; a number has no int/float kind there)
@pytest.mark.parametrize("bad", [dict(num_iter=0), dict(num_iter=2.5), dict(cfg=-1.5),
                                 dict(temperature=-0.5), dict(cfg_mode="both"),
                                 dict(position_order="raster")])
def test_the_page_refuses_bad_arguments_as_deploy_does(page, sampler, bad):
    settings = {**SETTINGS[0], **bad}
    with pytest.raises(ValueError) as refused:
        sampler.sample_tokens([3], seed=0, **settings)
    assert page.evaluate(SAMPLE, [[3], settings, []]) == str(refused.value)


def test_sample_draws_every_step_and_every_channel(page, sampler, tmp_path):
    page.select_option("#label", "7")
    page.fill("#steps", "4")
    page.click("#button")
    page.wait_for_function("document.getElementById('status').textContent.includes('sampled')",
                           timeout=120_000)
    steps, channels = page.locator("#positions canvas"), page.locator("#channels canvas")
    assert steps.count() == 4 and channels.count() == sampler.C
    # the last step's image is a drawn digit: bright strokes on a dark background
    spread = page.evaluate("""() => {
      const canvas = [...document.querySelectorAll('#positions canvas')].pop();
      const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
      let lo = 255, hi = 0;
      for (let i = 0; i < data.length; i += 4) {
        lo = Math.min(lo, data[i]);
        hi = Math.max(hi, data[i]);
      }
      return hi - lo; }""")
    assert spread > 100, spread
    page.screenshot(path=tmp_path / "page.png", full_page=True)
    if os.environ.get("TOKENBRIDGE_WEB_SCREENSHOT"):  # how docs/web.png is made
        shutil.copy(tmp_path / "page.png", os.environ["TOKENBRIDGE_WEB_SCREENSHOT"])


@pytest.mark.parametrize("page_path, query, init_script, says", [
    ("web/index.html", "?model=../nowhere/", None, "no ../nowhere/tokenbridge.json"),
    ("web/index.html", "?model=../format2/", None, "export format 2"),
    ("web/index.html", "?model=../no-vae/", None, "without a VAE decoder"),
    ("web/index.html", "?model=../broken/", None, "head_step.onnx cannot be loaded"),
    ("web/index.html", "", "delete window.WebAssembly", "runs no WebAssembly"),
    ("bare/index.html", "", None, "ONNX Runtime Web is missing"),
])
def test_bad_input_is_one_line_on_the_page(browser, site, page_path, query, init_script, says):
    page, status = open_page(browser, site, query, init_script, page_path)
    assert status.startswith("error: ") and says in status and "\n" not in status, status
    page.close()
