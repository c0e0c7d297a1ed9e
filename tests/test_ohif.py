"""OHIF, the viewer bundled with MONAI Label, served by the Raps-3D server over the test DICOMweb server.

- The app's ``/ohif/`` route serves nested files (MONAI Label's own answers index.html for them).
- A real headless Chromium (Debian's ``chromium``, software WebGL), driven over the Chrome DevTools Protocol, opens
  the phantom study in OHIF's MONAI Label mode, types the server's address into the MONAI Label panel and connects,
  opens Point Prompts, selects the raps3d model and the liver label, clicks on the liver where OHIF draws it, runs
  inference, and checks the point OHIF sent, the overlay on screen and OHIF's labelmap against the server's label.
  The bundled panel has no save button: the test saves OHIF's labelmap with the panel's own client
  (``save_label``, as ``label.bin``) and checks the DICOM SEG that reaches the PACS.
- The JPEG 2000 study displays through the app's DICOMweb proxy route, with the same voxels as the app reads.

Screenshots and the browser console go to ``$RAPS3D_ARTIFACTS`` (default ``<repo>/artifacts/``).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import requests

from conftest import ROOT

ARTIFACTS = Path(os.environ.get("RAPS3D_ARTIFACTS", ROOT / "artifacts"))
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                  "--window-size=1600,1000", "--remote-debugging-port=0", "--remote-allow-origins=*"]
# OHIF draws with WebGL; with the GPU disabled, Chromium's software WebGL (SwiftShader) must be allowed explicitly.
WEBGL_FLAGS = ["--use-angle=swiftshader", "--enable-unsafe-swiftshader"]


def _ohif_dir() -> Path:
    import monailabel.endpoints

    return Path(monailabel.endpoints.__file__).resolve().parent / "static" / "ohif"


# -- the /ohif/ route -----------------------------------------------------------------------------------------------
def test_ohif_route_serves_nested_files_and_single_page_routes(dicomweb_server):
    folder = _ohif_dir()
    index = (folder / "index.html").read_bytes()
    nested = sorted((folder / "assets").glob("*.png"))[0]
    url = f"{dicomweb_server.url}/ohif"

    r = requests.get(f"{url}/assets/{nested.name}", timeout=30)
    assert r.status_code == 200 and r.content == nested.read_bytes() and r.headers["content-type"] == "image/png"
    r = requests.get(f"{url}/app-config.js", timeout=30)
    assert r.status_code == 200 and r.content == (folder / "app-config.js").read_bytes()
    assert "javascript" in r.headers["content-type"]
    wasm = sorted(folder.glob("*.wasm"))[0]
    r = requests.get(f"{url}/{wasm.name}", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"] == "application/wasm"
    for route in ("/", "/monai-label", "/viewer"):  # OHIF's own routes: the single-page app
        r = requests.get(f"{url}{route}", params={"StudyInstanceUIDs": "1.2.3"}, timeout=30)
        assert r.status_code == 200 and r.content == index
    assert requests.get(f"{url}/assets/no-such-file.png", timeout=30).status_code == 404
    assert requests.get(f"{url}/%2e%2e/%2e%2e/config.py", timeout=30).status_code == 404
    for name in ("%00", "app-config.js%00", "index.html%00.png"):  # was a 500 (a null byte in a file name)
        assert requests.get(f"{url}/{name}", timeout=30).status_code == 404, name


# -- Chromium over the DevTools protocol ----------------------------------------------------------------------------
class Chromium:
    """A headless Chromium of the test's own (empty profile), one page, driven over the DevTools protocol."""

    def __init__(self, binary: str, profile: Path):
        self.profile = profile
        self.log = profile.parent / "chromium.log"
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen([binary, *CHROMIUM_FLAGS, *WEBGL_FLAGS, f"--user-data-dir={profile}",
                                             "about:blank"], stdout=out, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        self.events: list[dict] = []
        self.console: list[str] = []
        self._id = 0
        self.ws = None
        try:
            self._connect()
        except BaseException:
            self.close()
            raise

    def _connect(self, timeout: float = 60) -> None:
        import websocket

        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while not port_file.exists() or not port_file.read_text().strip():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Chromium did not start:\n{self.log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        while True:
            pages = [t for t in requests.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
                     if t["type"] == "page"]
            if pages:
                break
            if time.monotonic() > deadline:
                raise RuntimeError("Chromium opened no page")
            time.sleep(0.1)
        self.ws = websocket.create_connection(pages[0]["webSocketDebuggerUrl"], timeout=60, suppress_origin=True)
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.send(f"{domain}.enable")

    def send(self, method: str, params: dict | None = None, timeout: float = 60) -> dict:
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params or {}}))
        deadline = time.monotonic() + timeout
        while True:
            self.ws.settimeout(max(0.1, deadline - time.monotonic()))
            message = json.loads(self.ws.recv())
            if message.get("id") == self._id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self._event(message)

    def _event(self, message: dict) -> None:
        method = message.get("method", "")
        params = message.get("params", {})
        if method == "Runtime.consoleAPICalled":
            texts = [str(a.get("value", a.get("description", ""))) for a in params.get("args", [])]
            self.console.append(f"{params.get('type')}: {' '.join(texts)[:500]}")
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            text = details.get("exception", {}).get("description", details.get("text"))
            self.console.append(f"exception: {text}"[:800])
        elif method == "Log.entryAdded":
            entry = params.get("entry", {})
            self.console.append(f"log {entry.get('level')}: {entry.get('text', '')[:300]} {entry.get('url', '')}")
        elif method in ("Network.responseReceived", "Network.loadingFailed", "Network.requestWillBeSent"):
            self.events.append(message)

    def pump(self, seconds: float) -> None:
        """Reads events for a while (console messages, network replies)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.ws.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                self._event(json.loads(self.ws.recv()))
            except Exception:  # websocket timeout: nothing more for now
                return

    def evaluate(self, expression: str, await_promise: bool = False):
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": await_promise})
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:200]}: {result['exceptionDetails'].get('text')} "
                               f"{result['exceptionDetails'].get('exception', {}).get('description', '')}")
        return result.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; console:\n" + "\n".join(self.console[-40:]))
            self.pump(0.5)

    def navigate(self, url: str) -> None:
        self.send("Page.navigate", {"url": url})

    def click(self, x: float, y: float) -> None:
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", {"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1})

    def screenshot(self, path: Path) -> Path:
        data = self.send("Page.captureScreenshot", {"format": "png"})["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        try:
            if self.ws is not None:
                try:
                    self.ws.send(json.dumps({"id": 0, "method": "Browser.close"}))
                except Exception:
                    pass
                self.ws.close()
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        finally:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait(timeout=10)


@pytest.fixture
def chromium(tmp_path):
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if not binary:
        pytest.skip("Chromium is not installed (run scripts/setup-system.sh)")
    pytest.importorskip("websocket", reason="the websocket-client package drives Chromium")
    profile = Path(tempfile.mkdtemp(prefix="chromium-profile-", dir=tmp_path))
    browser = Chromium(binary, profile)
    try:
        yield browser
    finally:
        browser.close()


# The MONAI Label panel (a React component of the bundled OHIF): its services, client and state, as the page has them.
PANEL_JS = """(() => {
  const el = document.querySelector('.monaiLabelPanel');
  if (!el) return null;
  let f = el[Object.keys(el).find(k => k.startsWith('__reactFiber$'))];
  while (f && !(f.stateNode && f.stateNode.updateView)) f = f.return;
  return f ? f.stateNode : null;
})()"""
SERVICES_JS = f"{PANEL_JS}.props.servicesManager.services"
LABELMAP_JS = f"{SERVICES_JS}.segmentationService.getLabelmapVolume('1').voxelManager.getCompleteScalarDataArray()"


def _element_center(browser: Chromium, selector_js: str) -> tuple[float, float]:
    rect = browser.evaluate(f"(() => {{ const r = ({selector_js}).getBoundingClientRect(); "
                            "return [r.left + r.width / 2, r.top + r.height / 2, r.width, r.height]; })()")
    assert rect[2] > 0 and rect[3] > 0, f"{selector_js} is not visible"
    return rect[0], rect[1]


def _click_element(browser: Chromium, selector_js: str) -> None:
    browser.click(*_element_center(browser, selector_js))


def _colored_pixels(png: Path, box: list[float]) -> int:
    """Pixels inside ``box`` (left, top, width, height, CSS px = screenshot px) that are not gray: the CT is drawn
    in gray levels, a segmentation overlay in color."""
    import numpy as np
    import SimpleITK as sitk

    rgb = sitk.GetArrayFromImage(sitk.ReadImage(str(png)))[..., :3].astype(int)
    left, top, width, height = (int(round(v)) for v in box)
    region = rgb[top:top + height, left:left + width]
    return int((np.ptp(region, axis=-1) > 40).sum())


def _gray_pixels(png: Path, box: list[float]) -> int:
    """Pixels inside ``box`` drawn in a visible gray level (the CT image, window/level applied)."""
    import numpy as np
    import SimpleITK as sitk

    rgb = sitk.GetArrayFromImage(sitk.ReadImage(str(png)))[..., :3].astype(int)
    left, top, width, height = (int(round(v)) for v in box)
    region = rgb[top:top + height, left:left + width]
    return int(((np.ptp(region, axis=-1) < 8) & (region.mean(axis=-1) > 40)).sum())


def _post_data(browser: Chromium, url_part: str) -> str:
    for event in browser.events:
        if event["method"] == "Network.requestWillBeSent" and url_part in event["params"]["request"]["url"]:
            request = event["params"]["request"]
            if request.get("postData"):
                return request["postData"]
            return browser.send("Network.getRequestPostData", {"requestId": event["params"]["requestId"]})["postData"]
    raise AssertionError(f"no request to {url_part}")


def _response(browser: Chromium, url_part: str) -> dict | None:
    for event in browser.events:
        if event["method"] == "Network.responseReceived" and url_part in event["params"]["response"]["url"]:
            return event["params"]["response"]
    return None


def _response_status(browser: Chromium, url_part: str) -> int | None:
    response = _response(browser, url_part)
    return response["status"] if response is not None else None


def test_ohif_opens_the_study_and_segments_with_raps3d(dicomweb_server, orthanc, chromium):
    import io

    import numpy as np
    import pydicom
    import pydicom_seg
    import SimpleITK as sitk

    phantom = orthanc.series["phantom"]
    reference = sitk.ReadImage(str(ROOT / "sample-data" / "reference" / "phantom_01_seg.nii.gz"))
    liver = sitk.GetArrayFromImage(reference) == 1  # (k, j, i)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        # 1. The study opens in OHIF's MONAI Label mode: images come through the server's DICOMweb proxy.
        chromium.navigate(f"{dicomweb_server.url}/ohif/monai-label?StudyInstanceUIDs={phantom.study_uid}")
        chromium.wait_for("!!document.querySelector('[data-viewport-uid=\"mpr-axial\"] canvas') && "
                          "!!document.querySelector('.monaiLabelPanel')", 120, "the viewer and the MONAI Label panel")
        chromium.wait_for(f"{SERVICES_JS}.cornerstoneViewportService.getCornerstoneViewport('mpr-axial')"
                          ".getImageData() != null", 120, "the axial image")
        shown = chromium.evaluate(f"{PANEL_JS}.getActiveViewportInfo().displaySet.SeriesInstanceUID")
        assert shown == phantom.series_uid
        chromium.evaluate("[...document.querySelectorAll('button')].find(b => b.textContent.includes('Confirm and "
                          "Hide'))?.click()")
        chromium.pump(1)
        chromium.screenshot(ARTIFACTS / "ohif_1_study.png")

        # 2. Connect the panel to this server (its address field, then its connect button) and pick the model.
        _click_element(chromium, "document.getElementById('monailabelServerURL')")
        chromium.evaluate("document.getElementById('monailabelServerURL').select()")
        chromium.send("Input.insertText", {"text": f"{dicomweb_server.url}/"})  # typed over the default address
        _click_element(chromium, "document.querySelector('.settingsTable button')")
        chromium.wait_for("[...document.querySelectorAll('label.tab-label')].some(l => l.textContent === "
                          "'Point Prompts')", 60, "the panel's tabs (connected)")
        _click_element(chromium, "[...document.querySelectorAll('label.tab-label')].find(l => l.textContent === "
                                 "'Point Prompts')")
        chromium.pump(1)
        tab = "[...document.querySelectorAll('.tab')].find(t => t.querySelector('input[value=pointprompts]'))"
        options = chromium.evaluate(f"[...{tab}.querySelectorAll('select option')].map(o => o.value)")
        assert "raps3d" in options
        chromium.evaluate(f"(() => {{ const s = {tab}.querySelector('select'); s.value = 'raps3d'; "
                          "s.dispatchEvent(new Event('change', {bubbles: true})); })()")
        _click_element(chromium, f"[...{tab}.querySelectorAll('tr.clickable-row')].find(r => "
                                  "r.textContent.trim() === 'liver')")
        chromium.pump(1)
        assert chromium.evaluate(f"{PANEL_JS}.actions.pointprompts.current.state.currentLabel") == "liver"
        assert chromium.evaluate(f"{PANEL_JS}.actions.pointprompts.current.state.currentModel") == "raps3d"

        # 3. A point on the liver of the slice on screen, placed with the mouse where OHIF draws that voxel.
        viewport = f"{SERVICES_JS}.cornerstoneViewportService.getCornerstoneViewport('mpr-axial')"
        focal_z = chromium.evaluate(f"{viewport}.getCamera().focalPoint[2]")
        origin, spacing = np.array(reference.GetOrigin()), np.array(reference.GetSpacing())
        k = int(round((focal_z - origin[2]) / spacing[2]))
        inside = sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(
            sitk.GetImageFromArray(liver[k].astype(np.uint8)), insideIsPositive=True, useImageSpacing=False))
        j, i = np.unravel_index(np.argmax(inside), inside.shape)  # the liver voxel deepest inside, on slice k
        world = (origin + spacing * np.array([i, j, k])).tolist()
        canvas_xy = chromium.evaluate(f"{viewport}.worldToCanvas({json.dumps(world)})")
        rect = chromium.evaluate(f"(() => {{ const r = {viewport}.canvas.getBoundingClientRect(); "
                                 "return [r.left, r.top, r.width, r.height]; })()")
        chromium.click(rect[0] + canvas_xy[0], rect[1] + canvas_xy[1])
        chromium.pump(1)
        before = _colored_pixels(chromium.screenshot(ARTIFACTS / "ohif_2_point.png"), rect)

        # 4. Run: OHIF sends the point (as voxel [i, j, k] of the series) and paints the reply on the study.
        _click_element(chromium, f"{tab}.querySelector('.modelSelector button')")
        chromium.wait_for("(() => { try { return " + LABELMAP_JS + ".some(v => v > 0); } catch (e) "
                          "{ return false; } })()", 120, "the segmentation on the study")
        chromium.pump(2)
        after_png = chromium.screenshot(ARTIFACTS / "ohif_3_segmented.png")
        assert _response_status(chromium, "/infer/raps3d") == 200
        # The whole-volume raw NRRD came gzip-encoded on the wire, and OHIF read it (the labelmap is checked below).
        headers = {k.lower(): v for k, v in _response(chromium, "/infer/raps3d")["headers"].items()}
        assert headers.get("content-encoding") == "gzip", headers
        sent = json.loads(_post_data(chromium, "/infer/raps3d").split('name="params"', 1)[1].split("\r\n\r\n", 1)[1]
                          .split("\r\n--", 1)[0])
        assert sent["result_extension"] == ".nrrd" and sent["background"] == []
        assert len(sent["foreground"]) == 1
        point = sent["foreground"][0]
        assert np.abs(np.array(point) - [i, j, k]).max() <= 1, f"OHIF sent {point} for voxel {[i, j, k]}"
        assert liver[point[2], point[1], point[0]], "the point OHIF sent is not on the liver"
        assert _colored_pixels(after_png, rect) > before + 200  # the overlay is drawn

        # What OHIF holds is the server's label, voxel for voxel, in the series' order (i fastest, then j, k).
        labelmap = np.array(chromium.evaluate(f"Array.from({LABELMAP_JS})"), dtype=np.uint8)
        segment = chromium.evaluate(f"{PANEL_JS}.state.info.initialSegs")
        liver_index = next(int(v["segmentIndex"]) for v in segment.values() if v["label"] == "liver")
        size = reference.GetSize()
        ohif_mask = labelmap.reshape(size[::-1]) == liver_index  # (k, j, i)
        r = dicomweb_server.infer(phantom.series_uid, {**sent}, output="image")  # the same request: a repeat
        assert r.status_code == 200
        server_label, _ = dicomweb_server.nrrd_label(r.content)  # [i, j, k]
        np.testing.assert_array_equal(ohif_mask, server_label.transpose(2, 1, 0) == 1)
        assert set(np.unique(labelmap)) <= {0, liver_index}

        # 5. Save: the panel's own client sends OHIF's labelmap (label.bin) as the final label; the server writes
        # a DICOM SEG of it to the PACS.
        segs_before = set(orthanc.find("Series", {"Modality": "SEG"}))
        saved = chromium.evaluate(
            f"(async () => {{ const p = {PANEL_JS}; const data = new Uint8Array({LABELMAP_JS}); "
            f"const r = await p.client().save_label('{phantom.series_uid}', new Blob([data]), "
            "{label_info: [{name: 'liver', idx: " + str(liver_index) + "}]}); return [r.status, r.data]; })()",
            await_promise=True)
        assert saved[0] == 200, saved
        new = [s for s in orthanc.find("Series", {"Modality": "SEG"}) if s not in segs_before]
        assert len(new) == 1
        instance = orthanc.get_json(f"/series/{new[0]}/instances")[0]
        seg = pydicom.dcmread(io.BytesIO(orthanc.instance_file(instance["ID"])))
        assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == phantom.series_uid
        assert seg.SegmentSequence[0].SegmentLabel == "liver"
        decoded = pydicom_seg.MultiClassReader().read(seg).image
        on_grid = sitk.Resample(decoded, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(on_grid) > 0, ohif_mask)
    finally:
        chromium.screenshot(ARTIFACTS / "ohif_last.png")
        (ARTIFACTS / "ohif_console.log").write_text("\n".join(chromium.console))


SLICE_MEANS_JS = """(() => {
  const vp = %s.cornerstoneViewportService.getCornerstoneViewport('mpr-axial');
  const data = vp.getImageData();
  if (!data || !data.voxelManager) return null;
  const [x, y, z] = data.dimensions;
  const values = data.voxelManager.getCompleteScalarDataArray();
  const means = [];
  for (let k = 0; k < z; k++) {
    let sum = 0;
    for (let n = k * x * y; n < (k + 1) * x * y; n++) sum += values[n];
    means.push(sum / (x * y));
  }
  return {dimensions: [x, y, z], means: means};
})()""" % SERVICES_JS


def test_ohif_shows_a_jpeg2000_study_through_the_proxy(dicomweb_server, orthanc, chromium, tmp_path):
    import SimpleITK as sitk

    from conftest import DATA_ROOT
    from dicomweb_fixtures import need_series

    j2k = need_series(orthanc, "j2k", DATA_ROOT)
    r = requests.get(f"{dicomweb_server.url}/datastore/image", params={"image": j2k.series_uid}, timeout=120)
    served = sitk.GetArrayFromImage(dicomweb_server.image_from_bytes(r.content, ".nii.gz", tmp_path))
    expected = served.reshape(served.shape[0], -1).mean(axis=1).tolist()  # per-slice means (HU), k = 0, 1, ...
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        chromium.navigate(f"{dicomweb_server.url}/ohif/monai-label?StudyInstanceUIDs={j2k.study_uid}")
        chromium.wait_for("!!document.querySelector('[data-viewport-uid=\"mpr-axial\"] canvas') && "
                          "!!document.querySelector('.monaiLabelPanel')", 120, "the viewer")
        # Frames are asked for as stored (transfer-syntax=*): JPEG 2000, decoded in the browser. OHIF's volume
        # becomes the app's volume: same size, same slice order, same values (per-slice means, HU). While it
        # streams, slices not loaded yet are empty or copies of their neighbours.
        volume = chromium.wait_for(
            f"(() => {{ const v = {SLICE_MEANS_JS}; const e = {json.dumps(expected)}; "
            "return v && v.means.length === e.length && v.means.every((m, k) => Math.abs(m - e[k]) < 0.01) ? v : "
            "null; })()", 120, "OHIF's volume to equal the series as the app reads it")
        assert volume["dimensions"] == list(served.shape[::-1])
        chromium.pump(2)  # the last network events
        frames = [e for e in chromium.events if e["method"] == "Network.responseReceived"
                  and "/frames/" in e["params"]["response"]["url"]]
        assert frames and all(e["params"]["response"]["status"] == 200 for e in frames)
        assert len({e["params"]["response"]["url"] for e in frames}) == j2k.files
        accept = {e["params"]["request"]["headers"].get("Accept") for e in chromium.events
                  if e["method"] == "Network.requestWillBeSent" and "/frames/" in e["params"]["request"]["url"]}
        assert all('transfer-syntax="*"' in a for a in accept)
        chromium.evaluate("[...document.querySelectorAll('button')].find(b => b.textContent.includes('Confirm and "
                          "Hide'))?.click()")
        chromium.pump(1)
        viewport = f"{SERVICES_JS}.cornerstoneViewportService.getCornerstoneViewport('mpr-axial')"
        rect = chromium.evaluate(f"(() => {{ const r = {viewport}.canvas.getBoundingClientRect(); "
                                 "return [r.left, r.top, r.width, r.height]; })()")
        png = chromium.screenshot(ARTIFACTS / "ohif_jpeg2000_study.png")
        assert _gray_pixels(png, rect) > 10000  # the CT is drawn (not a black viewport)
    finally:
        chromium.screenshot(ARTIFACTS / "ohif_jpeg2000_last.png")
