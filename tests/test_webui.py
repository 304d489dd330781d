"""`stablesr ui` (stablesr/webui.py): a real browser drives the Gradio app, and a load test hammers its queue.

The browser test needs Debian's ``chromium`` (``apt-get install chromium chromium-driver``) and Playwright's Python
package (``pip install playwright``; no browser download: the system chromium is launched). Without them the test
skips with the reason, unless ``STABLESR_REQUIRE_BROWSER=1`` (set by ``.ci/run``), in which case it fails. Screenshots
go to ``$STABLESR_TEST_ARTIFACTS`` (default ``tests/artifacts/``).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import gc
import io
import json
import os
import re
import secrets
import shutil
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from skimage import data

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from stablesr import webui  # noqa: E402  (gradio is imported lazily, so this works without it)
from stablesr.cli import CLIError  # noqa: E402
from stablesr.cli import ui as cli_ui  # noqa: E402
from stablesr.image_processor import working_canvas  # noqa: E402

CHROMIUM = os.environ.get("STABLESR_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
REQUIRE_BROWSER = os.environ.get("STABLESR_REQUIRE_BROWSER") == "1"
ARTIFACTS = Path(os.environ.get("STABLESR_TEST_ARTIFACTS") or Path(__file__).parent / "artifacts")
MAX_UPLOAD = 200 * 200  # small, so the browser test can show the "too large" error with a small file
TIMINGS: dict[str, float] = {}
# Gradio 6's queue uses pandas options that pandas 3 deprecates: not ours to fix.
pytestmark = [pytest.mark.filterwarnings("ignore:'future.no_silent_downcasting' is deprecated"),
              pytest.mark.filterwarnings("ignore:The copy keyword is deprecated")]


def _missing(reason: str):
    if REQUIRE_BROWSER:
        pytest.fail(f"{reason} (STABLESR_REQUIRE_BROWSER=1: the web UI tests must run)")
    pytest.skip(reason)


def _need_gradio():
    try:
        import gradio  # noqa: F401
        import gradio_client  # noqa: F401
    except ImportError as err:
        _missing(f"gradio / gradio_client not installed ({err}); pip install -e '.[ui,test]'")


def _need_browser():
    _need_gradio()
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _missing("playwright not installed; pip install playwright (no browser download needed)")
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        _missing(f"chromium not found at {CHROMIUM}; apt-get install chromium chromium-driver "
                 "(or set STABLESR_CHROMIUM)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_bytes() -> int:
    """Resident memory of this process (the server runs in-process, in threads)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        import psutil

        return psutil.Process().memory_info().rss


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    d = tmp_path_factory.mktemp("ui_photos")
    Image.fromarray(data.chelsea()[40:104, 140:236]).save(d / "cat.png")  # 96x64 crop of a real photo
    Image.fromarray(data.chelsea()[:256, 100:356]).save(d / "too_big.png")  # 256x256 > MAX_UPLOAD
    return d


@pytest.fixture(scope="module")
def ui_pipe(small_pipeline_dir):
    from stablesr.loading import load_pipeline

    return load_pipeline(str(small_pipeline_dir), device="cpu")


def _serve(demo):
    port = _free_port()
    webui.launch_app(demo, host="127.0.0.1", port=port, prevent_thread_lock=True, quiet=True)
    return f"http://127.0.0.1:{port}/"


class RawApi:
    """The app's HTTP API without gradio_client: upload, join the queue, read the event stream (all bounded in time).

    Each call names its ``session_hash``: one hash is one browser session.
    """

    def __init__(self, url: str):
        import httpx

        self.url = url
        self.http = httpx.Client(timeout=30)
        config = self.http.get(url + "config").json()
        self.fns = {d["api_name"]: (d["id"], d["targets"][0][0], len(d["inputs"])) for d in config["dependencies"]}

    def upload(self, path) -> str:
        with open(path, "rb") as fh:
            r = self.http.post(self.url + "gradio_api/upload", files={"files": (Path(path).name, fh, "image/png")})
        r.raise_for_status()
        return r.json()[0]

    def restore_args(self, image, upscale=2, steps=1, fidelity=0.5, seed=7):
        """The inputs of /restore; ``image`` is a server path or a FileData dict (e.g. with a data: URL)."""
        if isinstance(image, str):
            image = {"path": image, "meta": {"_type": "gradio.FileData"}, "orig_name": Path(image).name}
        return [image, upscale, steps, "ddim", "wavelet", fidelity, seed, 0, 0.5]

    def join(self, api_name: str, args: list, session_hash: str):
        fn_index, trigger, n_inputs = self.fns[api_name]
        data = list(args) + [None] * (n_inputs - len(args))  # the session gr.State: the server keeps its own
        return self.http.post(self.url + "gradio_api/queue/join", json={
            "data": data, "fn_index": fn_index, "trigger_id": trigger, "session_hash": session_hash,
            "event_data": None})

    def result(self, session_hash: str, timeout: float = 120) -> tuple[str, Any]:
        """("ok", outputs) or ("error", message) of the session's event, read from its event stream."""
        deadline = time.monotonic() + timeout
        with self.http.stream("GET", self.url + "gradio_api/queue/data", params={"session_hash": session_hash},
                              timeout=timeout) as stream:
            for line in stream.iter_lines():
                if time.monotonic() > deadline:
                    break
                if not line.startswith("data:"):
                    continue
                msg = json.loads(line[5:])
                if msg.get("msg") == "process_completed":
                    if msg.get("success"):
                        return "ok", msg["output"]["data"]
                    return "error", str(msg["output"].get("error"))
        return "timeout", None

    def call(self, api_name: str, args: list, session_hash: str | None = None, timeout: float = 120):
        session_hash = session_hash or secrets.token_hex(8)
        r = self.join(api_name, args, session_hash)
        if r.status_code != 200:
            return "refused", f"{r.status_code} {r.text}"
        return self.result(session_hash, timeout)

    def close(self):
        self.http.close()


def file_path_of(output) -> str:
    """The server path of a file output (FileData dict) of the API."""
    return output["path"]


# ------------------------------------------------------------------------------------------------- no browser
def test_limits_name_the_limit_and_the_fix():
    with pytest.raises(ValueError, match=r"300×200 = 60,000 pixels.*at most 40,000 pixels.*--max-upload-pixels 60000"):
        webui.check_upload_size(300, 200, 40_000)
    webui.check_upload_size(200, 200, 40_000)

    class Pipe:  # the web UI takes the canvas arithmetic from the pipeline
        native_size = 128

        def working_canvas(self, height, width, upscale):
            return working_canvas((height, width), upscale, self.native_size, 64)

    with pytest.raises(ValueError, match=r"×4 gives 400×400.*Lower the upscale to ×3.16 or less.*--max-output-pixels 160000"):
        webui.check_output_size(Pipe(), 100, 100, 4, 100_000)
    with pytest.raises(ValueError, match=r"sampled on a 256×128 canvas.*--max-output-pixels 32768"):
        webui.check_output_size(Pipe(), 100, 50, 1, 20_000)  # short side scaled to the native 128 px
    assert webui.check_output_size(Pipe(), 1000, 2, 1, 100_000) == (1000, 2)  # thin: padded, a 1024x64 canvas
    assert webui.check_output_size(Pipe(), 100, 50, 2, 100_000) == (200, 100)


def test_byte_limit_reads_like_gradio_and_names_the_fix():
    assert [webui.parse_file_size(v) for v in ("50mb", "500kb", "64 KB", "1gb", "10", 4096, None)] == [
        50 * 2**20, 500 * 2**10, 64 * 2**10, 2**30, 10, 4096, None]
    for bad in ("", "mb", "5xb", "-1mb", 0):
        with pytest.raises(ValueError, match="max_file_size must be a positive"):
            webui.parse_file_size(bad)
    webui.check_file_bytes(65_536, 65_536)
    webui.check_file_bytes(10**12, None)
    expected = r"97.7 KiB \(100,000 bytes\).*at most 64 KiB \(65,536 bytes\).*--max-file-size 98kb"
    with pytest.raises(ValueError, match=expected):
        webui.check_file_bytes(100_000, 65_536)


def test_ui_parser_and_missing_gradio_hint(monkeypatch, capsys):
    parser = argparse.ArgumentParser(prog="stablesr")
    cli_ui.add_ui_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["ui"])
    assert (args.host, args.port, args.share, args.concurrency) == ("127.0.0.1", 7860, False, 1)
    assert args.max_upload_pixels == webui.DEFAULT_MAX_UPLOAD_PIXELS and args.func is cli_ui.cmd_ui
    assert (args.max_sessions, args.max_file_size) == (webui.DEFAULT_MAX_SESSIONS, webui.DEFAULT_MAX_FILE_SIZE)
    args = parser.parse_args(["ui", "--model", "m", "--port", "8000", "--share", "--max-upload-pixels", "1000",
                              "--concurrency", "2", "--device", "cpu", "--dtype", "bf16"])
    assert (args.model, args.port, args.share, args.max_upload_pixels, args.concurrency) == ("m", 8000, True, 1000, 2)
    args.max_file_size = "lots"
    with pytest.raises(CLIError, match=r"--max-file-size: .*such as 50mb"):
        cli_ui.cmd_ui(args)  # refused before loading any model
    args.max_file_size = webui.DEFAULT_MAX_FILE_SIZE

    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` now raises ImportError
    with pytest.raises(CLIError, match=r"pip install 'stablesr\[ui\]'"):
        cli_ui.cmd_ui(args)  # before loading any model
    with pytest.raises(ImportError, match=r"stablesr\[ui\]"):
        webui.build_app(object())


def test_every_scheduler_choice_samples_with_a_generator(ui_pipe):
    """Every dropdown choice is built once per pipeline from its original config and samples through the pipeline
    with a generator (the pipeline passes ``generator=`` only to schedulers whose ``step`` takes it, e.g. not UniPC)."""
    import numpy as np
    import torch

    original = ui_pipe.scheduler
    lq = Image.fromarray(data.chelsea()[:32, :32])
    try:
        for _, name in webui.SCHEDULER_CHOICES:
            scheduler = webui._scheduler(ui_pipe, name)
            assert scheduler is webui._scheduler(ui_pipe, name), "built once per pipeline"
            assert scheduler.config.beta_schedule == "scaled_linear" and scheduler.config.num_train_timesteps == 1000
            ui_pipe.scheduler = scheduler
            out = ui_pipe(lq, upscale=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                          output_type="np").images
            assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all(), name
    finally:
        ui_pipe.scheduler = original


def test_cli_registers_ui(monkeypatch, capsys):
    from stablesr import cli

    monkeypatch.setitem(sys.modules, "gradio", None)
    assert cli.main(["ui", "--model", "does-not-matter"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'stablesr[ui]'" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------------- browser
def test_browser_restore_then_fidelity_redecodes_without_sampling(request, photos):
    _need_browser()  # before building the model, so a skip is immediate
    ui_pipe = request.getfixturevalue("ui_pipe")
    from playwright.sync_api import sync_playwright

    demo = webui.build_app(ui_pipe, max_upload_pixels=MAX_UPLOAD, concurrency_limit=1, max_queue=8,
                           default_steps=2, default_upscale=2)
    stats = demo.stablesr_stats
    url = _serve(demo)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.set_default_timeout(90_000)
                page.goto(url, wait_until="domcontentloaded")
                page.locator("#restore-btn").wait_for()

                # Upload a real photo; the upload handler reports its size.
                page.locator("#input-image input[type=file]").set_input_files(str(photos / "cat.png"))
                page.locator("#status", has_text="Uploaded 96×64").wait_for()

                # Watch the page for the sampling progress text (gr.Progress driven by the pipeline callback).
                page.evaluate(r"""() => {
                    window.__progress = [];
                    new MutationObserver(ms => { for (const m of ms) {
                        const el = m.target.nodeType === 1 ? m.target : m.target.parentElement;
                        const box = el && (el.closest('.progress-text, .meta-text, .eta-bar, .wrap') || el.parentElement);
                        const t = box ? box.textContent.replace(/\s+/g, ' ') : '';
                        if (t.includes('Sampling')) window.__progress.push(t.slice(0, 200));
                    } }).observe(document.body, {subtree: true, childList: true, characterData: true});
                }""")
                assert stats.sampling_runs == 0
                t0 = time.perf_counter()
                page.locator("#restore-btn").click()
                page.locator("#status", has_text="Done").wait_for()
                after = _after_image(page, "0.50")
                TIMINGS["browser_restore_s"] = time.perf_counter() - t0
                runs = stats.snapshot()
                assert runs["sampling_runs"] == 1 and runs["decode_runs"] == 1, runs
                progress = page.evaluate("window.__progress")
                assert any(re.search(r"\d/2 steps.*Sampling \(ddpm\)", t) for t in progress), progress[:5]
                first = _fetch_image(page, after)
                assert first.size == (192, 128)

                # The download is the PNG of the result.
                href = page.locator("#download a[href]").first.get_attribute("href")
                downloaded = _fetch_image(page, href)
                assert downloaded.format == "PNG" and downloaded.size == (192, 128)

                # Drag the fidelity slider to the right end: decodes again, never samples again.
                slider = page.locator("#fidelity input[type=range]")
                box = slider.bounding_box()
                y = box["y"] + box["height"] / 2
                page.mouse.move(box["x"] + box["width"] * 0.5, y)
                page.mouse.down()
                page.mouse.move(box["x"] + box["width"] + 20, y, steps=6)
                t1 = time.perf_counter()
                page.mouse.up()
                value = float(page.locator("#fidelity input[type=number]").input_value())
                assert value == 1.0, value
                page.locator("#status", has_text="Re-decoded at fidelity 1.00").wait_for()
                after2 = _after_image(page, "1.00")
                TIMINGS["browser_redecode_s"] = time.perf_counter() - t1
                second = _fetch_image(page, after2)
                runs2 = stats.snapshot()
                assert runs2["sampling_runs"] == runs["sampling_runs"], "moving the fidelity slider sampled again"
                assert runs2["decode_runs"] > runs["decode_runs"]
                import numpy as np

                diff = np.abs(np.asarray(first.convert("RGB"), np.int16) - np.asarray(second.convert("RGB"), np.int16))
                assert second.size == first.size and diff.mean() > 0.5, f"displayed image unchanged ({diff.mean()})"
                TIMINGS["decodes_for_one_drag"] = runs2["decode_runs"] - runs["decode_runs"]
                TIMINGS["server_sampling_s"] = runs2["last_sampling_s"]
                TIMINGS["server_decode_s"] = runs2["last_decode_s"]
                TIMINGS["mean_abs_diff_w0.5_vs_w1"] = float(diff.mean())
                page.screenshot(path=str(ARTIFACTS / "webui_restore.png"), full_page=True)

                # An upload above the server's pixel limit: a clear error in the page, naming the limit and the fix.
                page.locator("#input-image input[type=file]").set_input_files(str(photos / "too_big.png"))
                toast = page.get_by_text("at most 40,000 pixels").first
                toast.wait_for()
                assert "--max-upload-pixels 65536" in page.locator("body").inner_text()
                page.evaluate("window.scrollTo(0, 0)")
                page.wait_for_timeout(1000)  # let the toast finish fading in
                page.screenshot(path=str(ARTIFACTS / "webui_upload_error.png"))
                assert stats.sampling_runs == 1
            finally:
                browser.close()
    finally:
        demo.close()
    print("web UI timings:", {k: round(v, 3) for k, v in TIMINGS.items()})


def _after_image(page, weight: str) -> str:
    """src of the displayed result image decoded at fidelity `weight` (its file name carries the weight)."""
    page.wait_for_function(
        """w => [...document.querySelectorAll('#result img')].some(
               i => i.src.includes('_w' + w + '_') && i.complete && i.naturalWidth > 0)""",
        arg=weight,
    )
    return page.evaluate("w => [...document.querySelectorAll('#result img')].find(i => i.src.includes('_w' + w + '_')).src",
                         weight)


def _fetch_image(page, src: str) -> Image.Image:
    response = page.request.get(src)
    assert response.ok, (src, response.status)
    img = Image.open(io.BytesIO(response.body()))
    img.load()
    return img


# ------------------------------------------------------------------------------------------------- load
def test_api_errors_name_the_limit(request, photos):
    """Bad requests through the API get clean errors that name the limit, before any sampling."""
    _need_gradio()
    ui_pipe = request.getfixturevalue("ui_pipe")
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    demo = webui.build_app(ui_pipe, max_upload_pixels=MAX_UPLOAD, default_steps=1, default_upscale=2)
    stats = demo.stablesr_stats
    url = _serve(demo)
    args = (handle_file(str(photos / "cat.png")), 2, 1, "ddim", "wavelet", 0.5, 7, 0, 0.5)
    try:
        c = Client(url, verbose=False, download_files=False, analytics_enabled=False)
        with pytest.raises(AppError, match=r"greater than maximum value 4"):  # Gradio checks slider ranges
            c.predict(args[0], 8, *args[2:], api_name="/restore")
        with pytest.raises(AppError, match=r"at most 40,000 pixels.*--max-upload-pixels 65536"):
            c.predict(handle_file(str(photos / "too_big.png")), *args[1:], api_name="/restore")
        assert stats.sampling_runs == 0 and stats.rejected == 1  # (the slider-range check is Gradio's own)
        assert c.predict(*args, api_name="/restore")
        assert stats.sampling_runs == 1
    finally:
        demo.close()
        shutil.rmtree(demo.stablesr_tmpdir, ignore_errors=True)


FLOOD = 200  # requests fired at once
FLOOD_WORKERS = 32  # threads sending them (each refused request frees its thread at once)
FLOOD_TIMEOUT_S = 240  # for the whole flood
RSS_BOUND = 300 * 2**20  # the server's growth in resident memory during and after the flood


def test_flood_200_requests_refuses_excess_and_memory_stays_bounded(request, photos):
    """200 restore requests at once, each from its own session, against a queue of 4 and a cache of 2 sessions.

    The excess is refused at once ("queue full", HTTP 503) and costs nothing; accepted requests sample exactly once
    each; afterwards at most ``max_sessions`` sessions keep latents and PNGs; the server's RSS grows by less than
    ``RSS_BOUND`` (300 MiB) at its peak and after, and it still serves.
    """
    _need_gradio()
    ui_pipe = request.getfixturevalue("ui_pipe")
    max_queue, max_sessions = 4, 2
    demo = webui.build_app(ui_pipe, max_upload_pixels=MAX_UPLOAD, concurrency_limit=1, max_queue=max_queue,
                           max_sessions=max_sessions, default_steps=1, default_upscale=2)
    stats = demo.stablesr_stats
    api = RawApi(_serve(demo))
    try:
        args = api.restore_args(api.upload(photos / "cat.png"))
        assert api.call("restore", args)[0] == "ok"  # warm-up, so the baseline includes what first use loads
        gc.collect()
        baseline = _rss_bytes()
        peak = [baseline]
        stop = threading.Event()

        def sample_rss():
            while not stop.is_set():
                peak[0] = max(peak[0], _rss_bytes())
                time.sleep(0.05)

        sampler = threading.Thread(target=sample_rss, daemon=True)
        sampler.start()
        runs_before = stats.sampling_runs
        barrier = threading.Barrier(FLOOD_WORKERS)

        def one(i: int):
            if i < FLOOD_WORKERS:
                barrier.wait(timeout=60)  # the first wave leaves together
            session_hash = secrets.token_hex(8)
            r = api.join("restore", args, session_hash)
            if r.status_code != 200:
                return "refused", r.status_code, r.text
            status, detail = api.result(session_hash, timeout=FLOOD_TIMEOUT_S)
            return status, 200, detail

        t0 = time.perf_counter()
        with cf.ThreadPoolExecutor(FLOOD_WORKERS) as pool:
            futures = [pool.submit(one, i) for i in range(FLOOD)]
            done, pending = cf.wait(futures, timeout=FLOOD_TIMEOUT_S)
            for f in pending:
                f.cancel()
        elapsed = time.perf_counter() - t0
        stop.set()
        sampler.join(5)
        assert not pending, f"{len(pending)} requests neither completed nor were refused within {FLOOD_TIMEOUT_S} s"
        results = [f.result() for f in done]
        ok = [r for r in results if r[0] == "ok"]
        refused = [r for r in results if r[0] == "refused"]
        other = [r for r in results if r[0] not in ("ok", "refused")]
        gc.collect()
        after = _rss_bytes()
        cached = len(demo.stablesr_sessions)
        pngs = list((demo.stablesr_tmpdir / "sessions").rglob("*.png"))
        TIMINGS.update(flood_accepted=len(ok), flood_refused=len(refused), flood_s=elapsed,
                       flood_rss_baseline_mib=baseline / 2**20, flood_rss_peak_growth_mib=(peak[0] - baseline) / 2**20,
                       flood_rss_after_growth_mib=(after - baseline) / 2**20)
        print(f"flood: {len(ok)} accepted and completed, {len(refused)} refused, {len(other)} other in "
              f"{elapsed:.1f} s; "
              f"RSS baseline {baseline / 2**20:.0f} MiB, peak +{(peak[0] - baseline) / 2**20:.1f} MiB, after "
              f"+{(after - baseline) / 2**20:.1f} MiB; sampling runs {stats.sampling_runs - runs_before}; "
              f"{cached} sessions cached, {len(pngs)} PNGs kept")
        assert not other, other[:3]
        assert len(ok) + len(refused) == FLOOD
        assert len(ok) > max_sessions and len(refused) > FLOOD // 2, "the queue of 4 must refuse most of a flood"
        assert all(code == 503 and "queue is full" in text.lower() for _, code, text in refused), refused[:2]
        assert stats.sampling_runs - runs_before == len(ok), "every accepted request sampled exactly once"
        # Bounded: only the latest sessions keep latents and PNGs (two PNGs each), however many came.
        assert cached <= max_sessions and len(pngs) <= 2 * max_sessions, (cached, len(pngs))
        ours = demo.stablesr_tmpdir / "sessions"
        alive = [o for o in gc.get_objects() if type(o) is webui._Session and o.folder.parent == ours]
        assert sum(o.cached for o in alive) <= max_sessions, "dropped sessions must not keep their latents"
        assert peak[0] - baseline < RSS_BOUND, f"peak RSS grew by {(peak[0] - baseline) / 2**20:.0f} MiB (bound 300)"
        assert after - baseline < RSS_BOUND
        # The app still serves after the flood.
        assert api.call("restore", args)[0] == "ok"
    finally:
        api.close()
        demo.close()
        shutil.rmtree(demo.stablesr_tmpdir, ignore_errors=True)
