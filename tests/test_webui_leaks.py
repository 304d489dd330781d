"""`stablesr ui` does not leak: files only from its own folder, results per session, limits before decoding.

Each test serves a tiny-model app on 127.0.0.1 and talks raw HTTP to it (`RawApi`, and `http.client` where a path
must reach the server exactly as written). The memory side (a flood of 200 requests) is in ``test_webui.py``.
"""

from __future__ import annotations

import base64
import http.client
import os
import re
import secrets
import shutil
import struct
import zlib
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
from PIL import Image, ImageFile

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import test_webui  # noqa: E402
from test_webui import MAX_UPLOAD, RawApi, _need_gradio, _serve, file_path_of  # noqa: E402

from stablesr import webui  # noqa: E402

photos, ui_pipe = test_webui.photos, test_webui.ui_pipe  # the module's fixtures (a photo folder, the tiny pipeline)

pytestmark = [pytest.mark.filterwarnings("ignore:'future.no_silent_downcasting' is deprecated"),
              pytest.mark.filterwarnings("ignore:The copy keyword is deprecated")]
TOKEN = re.compile(r"[A-Za-z0-9_-]{32}")  # a session folder's name: 24 random bytes, URL-safe base64


def _raw(port: int, method: str, path: str) -> tuple[int, bytes]:
    """One request with ``path`` sent exactly as written (no client-side normalisation of ``..`` or escapes)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _port(url: str) -> int:
    return int(url.rstrip("/").rsplit(":", 1)[1])


def _data_url(path: Path) -> dict:
    """An image sent inline, as an API client may: a FileData with a base64 data: URL and no server path."""
    encoded = base64.b64encode(path.read_bytes()).decode()
    return {"url": f"data:image/png;base64,{encoded}", "orig_name": path.name, "meta": {"_type": "gradio.FileData"}}


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` RGB pixels, with almost no pixel data (a few hundred bytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


# ------------------------------------------------------------------------------------------------- files served
def test_file_routes_serve_only_the_apps_own_folder(request, photos, tmp_path, monkeypatch):
    """Every file route of Gradio 6 answers only for the app's own folder: /etc/passwd, files of other Gradio apps in
    the shared upload folder, the examples cache under the working directory and remote URLs all get nothing."""
    _need_gradio()
    ui_pipe = request.getfixturevalue("ui_pipe")
    from gradio.utils import get_upload_folder

    demo = webui.build_app(ui_pipe, max_upload_pixels=MAX_UPLOAD, default_steps=1, default_upscale=2)
    url = _serve(demo)
    port, root = _port(url), demo.stablesr_tmpdir
    secret = f"secret-{secrets.token_hex(8)}"
    shared = Path(get_upload_folder()) / f"another-app-{secrets.token_hex(4)}"  # Gradio's folder, not ours
    shared.mkdir(parents=True)
    (shared / "notes.txt").write_text(secret)
    monkeypatch.chdir(tmp_path)  # Gradio also serves .gradio/cached_examples under the working directory
    examples = tmp_path / ".gradio" / "cached_examples" / "0"
    examples.mkdir(parents=True)
    (examples / "notes.txt").write_text(secret)
    (tmp_path / "notes.txt").write_text(secret)
    api = RawApi(url)
    try:
        # Control: the app's own upload is served (from its own folder).
        own = api.upload(photos / "cat.png")
        assert Path(own).parent.parent == root
        status, body = _raw(port, "GET", "/gradio_api/file=" + quote(own))
        assert status == 200 and body[:8] == b"\x89PNG\r\n\x1a\n"

        targets = ["/etc/passwd", "/proc/self/environ", str(shared / "notes.txt"), str(examples / "notes.txt"),
                   ".gradio/cached_examples/0/notes.txt", str(tmp_path / "notes.txt"), "notes.txt",
                   f"{root}/../{shared.name}/notes.txt", f"{root}/sessions/../../../../../etc/passwd",
                   "../../../../../../../../etc/passwd"]
        paths = []
        for target in targets:
            paths += [f"/gradio_api/file={target}", f"/gradio_api/file={quote(target, safe='')}",
                      f"/gradio_api/file/{target.lstrip('/')}", f"/file={target}", f"/file/{target.lstrip('/')}"]
        up = "..%2f" * 10
        paths += [
            "/gradio_api/file=file:///etc/passwd",
            f"/gradio_api/file=http://127.0.0.1:{port}/gradio_api/file=/etc/passwd",
            f"/gradio_api/proxy=http://127.0.0.1:{port}/gradio_api/file=/etc/passwd",
            "/static/../../../../../../../../../../etc/passwd", f"/static/{up}etc%2fpasswd",
            f"/assets/{up}etc%2fpasswd", f"/svelte/{up}etc%2fpasswd",
            f"/gradio_api/custom_component/x/client/{up}/etc%2fpasswd",
            f"/gradio_api/file={root}", f"/gradio_api/file={root}/sessions",  # folders are never listed
            "/gradio_api/runs", "/monitoring", "/monitoring/summary",
        ]
        served = []
        for method in ("GET", "HEAD"):
            for path in paths:
                status, body = _raw(port, method, path)
                if status in (200, 206) or secret.encode() in body or b"root:" in body:
                    served.append((method, path, status, body[:60]))
        assert not served, served
    finally:
        api.close()
        demo.close()
        shutil.rmtree(shared, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------- sessions
def test_a_session_cannot_reach_another_sessions_results(request, photos, tmp_path):
    """Two browser sessions (two session hashes): each result lies in its own folder with an unguessable name; the
    other session can neither list, guess nor feed it back as an input; a dropped session's URLs stop working; and the
    cache keeps at most ``max_sessions`` sessions."""
    _need_gradio()
    ui_pipe = request.getfixturevalue("ui_pipe")
    demo = webui.build_app(ui_pipe, max_upload_pixels=MAX_UPLOAD, max_sessions=2, default_steps=1, default_upscale=2)
    stats = demo.stablesr_stats
    url = _serve(demo)
    port, root = _port(url), demo.stablesr_tmpdir
    Image.open(photos / "cat.png").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(tmp_path / "cat_b.png")
    api = RawApi(url)

    def fetch(path: str) -> int:
        return _raw(port, "GET", "/gradio_api/file=" + quote(path))[0]

    def gone(path: str) -> bool:
        return fetch(path) in (403, 404)

    def restore(image: str, session_hash: str) -> tuple[str, str]:
        status, out = api.call("restore", api.restore_args(image), session_hash)
        assert status == "ok", out
        before, after = (file_path_of(x) for x in out[0])
        assert file_path_of(out[1]) == after  # the download is the result itself
        return before, after

    try:
        a, b, c = (secrets.token_hex(8) for _ in range(3))
        upload_a, upload_b = api.upload(photos / "cat.png"), api.upload(tmp_path / "cat_b.png")
        before_a, after_a = restore(upload_a, a)
        before_b, after_b = restore(upload_b, b)

        folder_a, folder_b = Path(after_a).parent, Path(after_b).parent
        assert folder_a != folder_b and Path(before_a).parent == folder_a and Path(before_b).parent == folder_b
        for folder in (folder_a, folder_b):
            assert folder.parent == root / "sessions" and TOKEN.fullmatch(folder.name), folder
        assert fetch(after_a) == 200 and fetch(after_b) == 200  # a result URL works for whoever holds it

        # What session B can craft from what it knows (its own URLs, the folder layout): nothing of A's.
        crafted = [str(root / "sessions"), str(root), str(folder_b / Path(after_a).name),
                   str(folder_b / Path(before_a).name), str(root / Path(after_a).name),
                   str(root / "sessions" / folder_b.name[:-1]) + "A" + "/" + Path(after_a).name]
        assert [p for p in crafted if fetch(p) == 200] == []
        # ... nor feed A's result (or its before image) back in as an input.
        for stolen in (after_a, before_a):
            status, message = api.call("restore", api.restore_args(stolen), b)
            assert status == "error" and "not an upload" in message, (status, message)

        # A restores again: its previous result folder, and every URL in it, is gone.
        before_a2, after_a2 = restore(upload_a, a)
        assert gone(after_a) and gone(before_a) and not folder_a.exists()
        assert fetch(after_a2) == 200

        # A third session: the cache keeps 2, so the least recently used (B) is dropped, files and URLs too.
        restore(upload_a, c)
        assert len(demo.stablesr_sessions) == 2
        assert gone(after_b) and not folder_b.exists() and fetch(after_a2) == 200
        runs = stats.snapshot()
        status, out = api.call("redecode", [0.9, "wavelet"], b)  # B's page moves the fidelity slider
        assert status == "ok" and "no longer cached" in out[-2] and "Restore" in out[-2], out
        assert stats.snapshot()["sampling_runs"] == runs["sampling_runs"]
        assert stats.snapshot()["decode_runs"] == runs["decode_runs"]
        status, out = api.call("redecode", [0.9, "wavelet"], a)  # A is still cached: decodes, in A's folder
        assert status == "ok" and Path(file_path_of(out[1])).parent == Path(after_a2).parent
    finally:
        api.close()
        demo.close()
        shutil.rmtree(root, ignore_errors=True)


# ------------------------------------------------------------------------------------------------------ limits
def test_byte_and_pixel_limits_are_checked_before_decoding(request, photos, tmp_path, monkeypatch):
    """Oversized files and decompression bombs (headers claiming huge sizes, few bytes) are refused with the limit
    named, by upload or inline as a data: URL, and no image above the pixel limit is ever decoded."""
    _need_gradio()
    ui_pipe = request.getfixturevalue("ui_pipe")
    demo = webui.build_app(ui_pipe, max_upload_pixels=MAX_UPLOAD, max_file_size="64kb", default_steps=1,
                           default_upscale=2)
    stats = demo.stablesr_stats
    url = _serve(demo)
    root = demo.stablesr_tmpdir
    bomb = tmp_path / "bomb.png"
    Image.new("1", (12000, 12000)).save(bomb)  # 144 MP (432 MB as RGB) in ~18 KB of zeros
    claims = tmp_path / "claims.png"
    claims.write_bytes(_png_claiming(100_000, 100_000))  # beyond even Pillow's own bomb limit
    noisy = tmp_path / "noisy.png"  # 180x180 = 32,400 pixels (allowed) but ~97 KB (> 64 KiB)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (180, 180, 3), dtype=np.uint8)).save(noisy)
    big = tmp_path / "big.png"  # > the request body cap: refused before the body is read
    big.write_bytes(noisy.read_bytes() + b"\0" * 600_000)
    assert bomb.stat().st_size < 64 * 1024 and claims.stat().st_size < 1024 and noisy.stat().st_size > 64 * 1024

    decoded = []  # sizes of the images the server decodes (it runs in this process)
    load = ImageFile.ImageFile.load

    def spy(self):
        decoded.append(self.size)
        return load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    api = RawApi(url)
    try:
        pixel_limit = r"at most 40,000 pixels \(0\.04 MP\).*--max-upload-pixels 144000000"
        cases = [
            (api.upload(bomb), pixel_limit),  # uploaded: only the header is read
            (_data_url(bomb), pixel_limit),  # inline: Gradio alone would decode it fully before any handler
            (api.upload(claims), r"far too large"),
            (_data_url(claims), r"far too large"),
            (_data_url(noisy), r"at most 64 KiB \(65,536 bytes\).*--max-file-size 96kb"),
        ]
        # A file over the byte limit already in the app's folder (e.g. uploaded under a larger limit earlier).
        stale = root / secrets.token_hex(32) / "noisy.png"
        stale.parent.mkdir()
        shutil.copy(noisy, stale)
        cases.append((str(stale), r"at most 64 KiB"))
        for image, expected in cases:
            status, message = api.call("restore", api.restore_args(image), timeout=60)
            assert status == "error" and re.search(expected, message, re.S), (str(image)[:80], status, message)

        # Uploads over the byte limit: Gradio's upload route refuses them (the app passes its limit on), and request
        # bodies larger than any allowed upload are refused before they are read.
        with open(noisy, "rb") as fh:
            r = api.http.post(url + "gradio_api/upload", files={"files": ("noisy.png", fh, "image/png")})
        assert r.status_code == 413, (r.status_code, r.text)
        assert not [p for p in root.rglob("noisy.png") if p != stale]
        r = api.join("restore", api.restore_args(_data_url(big)), secrets.token_hex(8))
        assert r.status_code == 413, (r.status_code, r.text)

        too_big = [size for size in decoded if size[0] * size[1] > MAX_UPLOAD]
        assert not too_big, f"decoded images above the pixel limit: {too_big}"
        assert stats.sampling_runs == 0 and stats.rejected >= len(cases)
        # Still serving normal requests.
        status, out = api.call("restore", api.restore_args(api.upload(photos / "cat.png")))
        assert status == "ok", out
    finally:
        api.close()
        demo.close()
        shutil.rmtree(root, ignore_errors=True)
