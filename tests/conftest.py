"""Shared fixtures: the real MONAI Label server running the Raps-3D app, and the real CT folder.

The server is started once per test session, as users start it (``monailabel start_server``), on a free loopback
port, over a temporary studies folder: the sample phantoms, real CT from the data folder when it is present, and a
few files that are not CT volumes (for the error tests). It runs an untrained model (no checkpoint at the path it
is given: the app's fallback), so results are reproducible and do not depend on training progress; tests check
geometry, protocol and state, not accuracy.

Real CT comes from one place: the ``RAPS3D_DATA`` environment variable, by default ``../shared/data`` beside the
project. Tests that need it skip, saying so, when it is absent.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
APP_DIR = ROOT / "apps" / "raps3d"
SAMPLE_IMAGES = ROOT / "sample-data" / "images"
DATA_ROOT = Path(os.environ.get("RAPS3D_DATA", ROOT.parent / "shared" / "data"))

# Real CT served by the test server (image id -> file under DATA_ROOT), when the data folder is present.
REAL_CT = {
    "example_ct": "totalsegmentator/example_ct.nii.gz",  # 3 mm, flipped x/y direction, int32
    "openkbp_pt_201": "openkbp/validation/pt_201_ct.nii.gz",  # 5.4 x 5.4 x 3 mm, flipped z direction
}
# Files that are not segmentable CT volumes, served too (image id -> file name).
BAD_IMAGES = {"corrupt": "corrupt.nii.gz", "flat2d": "flat2d.png", "rgb": "rgb.png", "nan": "nan.nrrd",
              "oneslice": "oneslice.nii.gz", "mr": "mr.nii.gz"}

SERVER_START_TIMEOUT = 240  # seconds; a cold start on a busy 2-core machine can be slow
TORCH_THREADS = "1"  # CI machines are small: one thread keeps the server from fighting the tests for cores

def real_ct_path(image_id: str) -> Path:
    path = DATA_ROOT / REAL_CT[image_id]
    if not path.exists():
        pytest.skip(f"real CT {REAL_CT[image_id]} not found under {DATA_ROOT} (set RAPS3D_DATA to the data folder)")
    return path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_bad_images(folder: Path) -> None:
    import SimpleITK as sitk

    rng = np.random.default_rng(0)
    (folder / BAD_IMAGES["corrupt"]).write_bytes(b"\x1f\x8b\x08\x00 not a NIfTI file at all " * 20)
    sitk.WriteImage(sitk.GetImageFromArray(rng.integers(0, 255, (64, 64), dtype=np.uint8)),
                    str(folder / BAD_IMAGES["flat2d"]))
    sitk.WriteImage(sitk.GetImageFromArray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), isVector=True),
                    str(folder / BAD_IMAGES["rgb"]))
    with_nan = np.zeros((12, 24, 24), np.float32)
    with_nan[3, 4, 5] = np.nan
    sitk.WriteImage(sitk.GetImageFromArray(with_nan), str(folder / BAD_IMAGES["nan"]))
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((1, 32, 32), np.int16)), str(folder / BAD_IMAGES["oneslice"]))
    sitk.WriteImage(sitk.GetImageFromArray(rng.integers(0, 900, (16, 32, 32)).astype(np.int16)),
                    str(folder / BAD_IMAGES["mr"]))


class Server:
    """A running MONAI Label server and a few helpers to talk to it."""

    def __init__(self, url: str, studies: Path | str, log: Path):
        self.url = url
        self.studies = studies
        self.log = log

    def image_path(self, image_id: str) -> Path:
        return next(self.studies.glob(image_id + ".*"))

    def infer(self, image: str, params: dict, output: str | None = "json", files=None, model: str = "raps3d"):
        import requests

        query = {"image": image} if image else {}
        if output:
            query["output"] = output
        return requests.post(f"{self.url}/infer/{model}", params=query, data={"params": json.dumps(params)},
                             files=files, timeout=300)

    def infer_ok(self, image: str, params: dict, output: str | None = "json"):
        r = self.infer(image, params, output)
        assert r.status_code == 200, f"{r.status_code}: {r.text[:500]}"
        return r

    # -- reading replies ------------------------------------------------------------------------------------------
    @staticmethod
    def nrrd_label(content: bytes):
        """(voxels indexed [i, j, k], header) of an NRRD reply, parsed by pynrrd."""
        import io

        import nrrd

        stream = io.BytesIO(content)
        header = nrrd.read_header(stream)
        return nrrd.read_data(header, stream, index_order="F"), header

    @staticmethod
    def image_from_bytes(content: bytes, suffix: str, folder: Path):
        """A reply label file read by SimpleITK (as 3D Slicer reads it)."""
        import tempfile

        import SimpleITK as sitk

        fd, name = tempfile.mkstemp(suffix=suffix, dir=folder)
        with os.fdopen(fd, "wb") as f:
            f.write(content)
        try:
            return sitk.ReadImage(name)
        finally:
            os.unlink(name)

    @staticmethod
    def multipart(response) -> tuple[dict, bytes, str]:
        """MONAI Label's default reply: (params, label file bytes, label file name)."""
        from requests_toolbelt.multipart import decoder

        params, content, filename = None, b"", ""
        for part in decoder.MultipartDecoder(response.content, response.headers["content-type"]).parts:
            disposition = part.headers[b"Content-Disposition"].decode()
            if 'name="params"' in disposition:
                params = json.loads(part.content)
            elif 'name="image"' in disposition:
                content = part.content
                filename = disposition.split("filename=")[1].strip('"')
        return params, content, filename

    def wait_for_log(self, text: str, timeout: float = 60.0) -> None:
        """Until the server's log holds ``text`` (MONAI Label logs a request as it starts on it)."""
        deadline = time.monotonic() + timeout
        while text not in self.log.read_text(errors="replace"):
            if time.monotonic() > deadline:
                tail = self.log.read_text(errors="replace")[-3000:]
                pytest.fail(f"the server's log did not show {text!r} within {timeout:g} s; its end:\n{tail}")
            time.sleep(0.01)

    def info_while(self, request, started: str) -> tuple:
        """Runs ``request()`` in a thread and, once the log shows ``started``, asks for ``/info/``: (the request's
        result, when it finished, /info's status code, when /info answered), times from ``time.monotonic``."""
        import threading

        import requests

        done = {}

        def run():
            result = request()
            done.update(result=result, at=time.monotonic())

        worker = threading.Thread(target=run)
        worker.start()
        self.wait_for_log(started)
        r = requests.get(f"{self.url}/info/", timeout=120)
        info_at = time.monotonic()
        worker.join(timeout=300)
        return done.get("result"), done.get("at"), r.status_code, info_at

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def stop_process_group(process: subprocess.Popen) -> None:
    """Stop a server started with ``start_new_session=True`` and everything it started (its process group only)."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def wait_until_answering(process: subprocess.Popen, url: str, timeout: float, name: str, log_tail, auth=None) -> None:
    """Wait for ``url`` to answer 200; fail the test with the server's log if it exits or stays silent."""
    import requests

    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            pytest.fail(f"{name} exited with code {process.returncode}:\n{log_tail()}")
        try:
            if requests.get(url, auth=auth, timeout=5).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"{name} did not answer within {timeout} s:\n{log_tail()}")
        time.sleep(0.2)


@contextlib.contextmanager
def running_server(work: Path, studies: Path | str, model_path: Path, extra_env: dict[str, str] | None = None):
    """``monailabel start_server`` with the Raps-3D app over ``studies`` (a folder or a DICOMweb URL), stopped (with
    its process group) on exit. ``extra_env``: more environment variables for the server (e.g. MONAI Label settings).
    A training run publishes to ``work/model/raps3d_finetuned.pt``.
    """
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAPS3D_", "MONAI_LABEL_"))}
    env.update({
        "MONAI_LABEL_AUTO_UPDATE_SCORING": "false",  # scoring runs when a test asks for it, not at start
        "MONAI_LABEL_SESSION_PATH": str(work / "sessions"),
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": TORCH_THREADS,
        "TMPDIR": str(work / "tmp"),  # what the server leaves in its temporary folder can be checked
    })
    (work / "tmp").mkdir(exist_ok=True)
    env.update(extra_env or {})
    cmd = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(APP_DIR), "--studies", str(studies),
           "--host", "127.0.0.1", "--port", str(port),
           "--conf", "model_path", str(model_path),
           "--conf", "trained_model_path", str(work / "model" / "raps3d_finetuned.pt"),
           "--conf", "torch_threads", TORCH_THREADS,
           "--conf", "result_dir", str(work)]
    log = work / "server.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(cmd, cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    srv = Server(f"http://127.0.0.1:{port}", studies, log)
    try:
        wait_until_answering(process, f"{srv.url}/info/", SERVER_START_TIMEOUT, "the MONAI Label server",
                             srv.log_tail)
        yield srv
    finally:
        # The server runs in its own process group (with any train/scoring subprocess): stop that group only.
        stop_process_group(process)


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> Server:
    work = tmp_path_factory.mktemp("raps3d_server")
    studies = work / "studies"
    studies.mkdir()
    for image in sorted(SAMPLE_IMAGES.glob("*.nii.gz")):
        shutil.copy(image, studies / image.name)
    for image_id, relative in REAL_CT.items():
        if (DATA_ROOT / relative).exists():
            shutil.copy(DATA_ROOT / relative, studies / f"{image_id}.nii.gz")
    _write_bad_images(studies)
    with running_server(work, studies, work / "no-checkpoint-here.pt") as srv:
        yield srv


# Session fixtures of the viewer tests (a test Orthanc with DICOMweb, the server over it), shared by their modules.
from dicomweb_fixtures import dicomweb_server, orthanc  # noqa: E402,F401
