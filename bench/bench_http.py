"""Latency of Raps-3D as a viewer sees it: HTTP requests to the real MONAI Label server, on a 512 x 512 x 300 CT.

Each request is timed at the client, as OHIF sends it (``output=image``, raw uint8 NRRD, ``Accept-Encoding: gzip``
as a browser sends it; ``--encoding identity`` for a client that takes no encoding), from sending the request to
holding the whole decoded label. Cases, median and range over repeats:

- first click on an image never opened before (reads the file, two encoder passes);
- a new object on an image already open (a different organ clicked: zoom-out features shared, zoom-in encoded);
- an edit inside the object's region (decoder only);

beside the raw transfer time of a same-size uint8 file from the same server over loopback, measured in the same
run, which an unencoded reply pays whatever the model does, and the bytes a reply puts on the wire (with the time
they would take on a 100 Mbit/s link). The CT is a real abdominal CT from the data folder
(``RAPS3D_DATA``, default ``../shared/data``) resampled to 512 x 512 x 300 (0.75 x 0.75 x 1.12 mm), written as
.nii.gz to a temporary folder; clicks go to organs of its reference segmentation.

    python bench/bench_http.py [--repeats 5] [--threads 2] [--encoding gzip] [--model model/raps3d_lite.pt]

Without the checkpoint the server runs its untrained fallback of the same ('lite') size: timings only.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
APP_DIR = ROOT / "apps" / "raps3d"
DATA_ROOT = Path(os.environ.get("RAPS3D_DATA", ROOT.parent / "shared" / "data"))
SOURCE_CT = "totalsegmentator/example_ct.nii.gz"
SOURCE_SEG = "totalsegmentator/example_seg_fast_force_split.nii.gz"
ORGANS = {"liver": 5, "spleen": 1, "right_kidney": 2, "left_kidney": 3, "aorta": 52}
SIZE = (512, 512, 300)  # (i, j, k)
SPACING = (0.75, 0.75, 1.12)

TARGETS = {  # seconds: (fixed part, plus the transfer time?)
    "first click, never-opened image": (5.0, False),
    "new object, opened image": (1.0, True),
    "edit inside the ROI": (0.15, True),
}


def resample(image: sitk.Image, interpolator, default: float) -> sitk.Image:
    """The same patient on a 512 x 512 x 300 grid centred on the source image."""
    centre = image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()])
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    half = direction @ (np.asarray(SPACING) * (np.asarray(SIZE) - 1) / 2)
    origin = np.asarray(centre) - half
    return sitk.Resample(image, SIZE, sitk.Transform(), interpolator, origin.tolist(), SPACING,
                         image.GetDirection(), default, image.GetPixelID())


def make_ct(folder: Path, copies: int) -> tuple[list[str], dict]:
    """Image ids of ``copies`` identical large CT files (each is a never-opened image to the server) and one click
    [i, j, k] per organ, placed deep inside it."""
    from scipy import ndimage

    source = DATA_ROOT / SOURCE_CT
    if not source.exists():
        sys.exit(f"real CT not found at {source} (set RAPS3D_DATA to the data folder)")
    ct = resample(sitk.Cast(sitk.ReadImage(str(source)), sitk.sitkInt16), sitk.sitkLinear, -1024)
    seg = sitk.GetArrayFromImage(resample(sitk.ReadImage(str(DATA_ROOT / SOURCE_SEG)), sitk.sitkNearestNeighbor, 0))
    clicks = {}
    for name, value in ORGANS.items():
        mask = seg[::4, ::4, ::4] == value  # (k, j, i) on a coarse grid: enough to find a deep point
        if mask.any():
            depth = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1, 1:-1]  # the volume's edge is outside
            k, j, i = np.unravel_index(int(np.argmax(depth)), depth.shape)
            clicks[name] = [int(i) * 4, int(j) * 4, int(k) * 4]
    first = folder / "large_ct_0.nii.gz"
    sitk.WriteImage(ct, str(first), useCompression=True)
    ids = ["large_ct_0"]
    for n in range(1, copies):
        os.link(first, folder / f"large_ct_{n}.nii.gz")  # another name: another image to the server
        ids.append(f"large_ct_{n}")
    probe = sitk.Image(list(SIZE), sitk.sitkUInt8)  # the transfer probe: a label-sized file, all zeros
    sitk.WriteImage(probe, str(folder / "transfer_probe.nrrd"), useCompression=False)
    return ids, clicks


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(studies: Path, work: Path, model: str, threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAPS3D_", "MONAI_LABEL_"))}
    env.update({"MONAI_LABEL_AUTO_UPDATE_SCORING": "false", "MONAI_LABEL_SESSION_PATH": str(work / "sessions")})
    cmd = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(APP_DIR), "--studies",
           str(studies), "--host", "127.0.0.1", "--port", str(port), "--conf", "model_path", model,
           # a site's fine-tuned model, if the app has one, would be served instead of the one measured
           "--conf", "trained_model_path", str(work / "no_fine_tuned_model.pt"),
           "--conf", "torch_threads", str(threads), "--conf", "result_dir", str(work)]
    log = open(work / "server.log", "wb")
    process = subprocess.Popen(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"server exited:\n{(work / 'server.log').read_text()[-3000:]}")
        try:
            if requests.get(f"{url}/info/", timeout=5).ok:
                return process, url
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    os.killpg(process.pid, signal.SIGTERM)
    sys.exit("server did not start")


OHIF = {"result_extension": ".nrrd", "result_dtype": "uint8", "result_compress": False}
ENCODING = {"accept": "gzip"}  # the client's Accept-Encoding (--encoding)
WIRE_BYTES: list[int] = []  # of each label reply


def click(url: str, image: str, params: dict, output: str = "image") -> tuple[float, requests.Response]:
    start = time.perf_counter()
    r = requests.post(f"{url}/infer/raps3d", params={"image": image, "output": output},
                      data={"params": json.dumps({**params, **OHIF})}, headers={"Accept-Encoding": ENCODING["accept"]},
                      timeout=600, stream=True)
    wire = r.raw.read(decode_content=False)
    content = gzip.decompress(wire) if r.headers.get("content-encoding") == "gzip" else wire
    elapsed = time.perf_counter() - start
    r._content = content  # as requests would hold it, decoded
    if r.status_code != 200:
        sys.exit(f"{r.status_code}: {content[:500]}")
    if output == "image":
        if len(content) < np.prod(SIZE):
            sys.exit(f"short reply: {len(content)} bytes")
        WIRE_BYTES.append(len(wire))
    return elapsed, r


def edit_of(url: str, image: str, params: dict, first: list) -> dict:
    """The object's prompts plus a click inside its zoom-in region (read from a repeat of the same prompts)."""
    reply = click(url, image, params, output="json")[1].json()
    assert reply["cache"] == "repeat", reply["cache"]
    i0, i1, j0, j1, k0, k1 = reply["roi"]
    inside = [min(max(c + 3, lo), hi) for c, lo, hi in zip(first, (i0, j0, k0), (i1, j1, k1))]
    return {**params, "foreground": [first, inside]}


def transfer(url: str) -> float:
    start = time.perf_counter()
    r = requests.get(f"{url}/datastore/image", params={"image": "transfer_probe"}, timeout=600)
    elapsed = time.perf_counter() - start
    assert r.ok and len(r.content) >= np.prod(SIZE), r.status_code
    return elapsed


def stats(values: list[float]) -> str:
    return f"{statistics.median(values):7.3f} s  ({min(values):.3f}-{max(values):.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--encoding", default="gzip", help="the client's Accept-Encoding (identity: none)")
    parser.add_argument("--model", default=str(ROOT / "model" / "raps3d_lite.pt"))
    args = parser.parse_args()
    ENCODING["accept"] = args.encoding

    with tempfile.TemporaryDirectory(prefix="raps3d_bench_") as tmp:
        work = Path(tmp)
        studies = work / "studies"
        studies.mkdir()
        print(f"writing a {SIZE[0]}x{SIZE[1]}x{SIZE[2]} CT from {SOURCE_CT} ...", flush=True)
        images, clicks = make_ct(studies, args.repeats)
        organs = list(clicks)
        process, url = start_server(studies, work, args.model, args.threads)
        try:
            info = requests.get(f"{url}/info/", timeout=30).json()["models"]["raps3d"]
            times = {case: [] for case in TARGETS}
            transfers = []
            for n, image in enumerate(images):
                transfers.append(transfer(url))
                organ = organs[n % len(organs)]
                t, _ = click(url, image, {"foreground": [clicks[organ]], "label": organ, "client_id": f"first-{n}"})
                times["first click, never-opened image"].append(t)
            base = images[0]
            for n in range(args.repeats):
                organ = organs[n % len(organs)]
                params = {"foreground": [clicks[organ]], "label": organ, "client_id": f"user-{n}"}
                t, _ = click(url, base, params)
                times["new object, opened image"].append(t)
                t, _ = click(url, base, edit_of(url, base, params, clicks[organ]))
                times["edit inside the ROI"].append(t)
                transfers.append(transfer(url))
            # Where the server spends its time (reply params of output=json), for one more new object and edit.
            params = {"foreground": [clicks[organs[0]]], "label": "breakdown", "client_id": "breakdown"}
            new_object = click(url, base, params, "json")[1].json()
            edit = click(url, base, edit_of(url, base, params, clicks[organs[0]]), "json")[1].json()
        finally:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=30)

    transfer_median = statistics.median(transfers)
    trained = "trained checkpoint" if info.get("model_trained") else "UNTRAINED fallback (timings only)"
    print(f"\nRaps-3D over HTTP (MONAI Label, output=image, raw uint8 NRRD, Accept-Encoding: {args.encoding}), "
          f"{SIZE[0]}x{SIZE[1]}x{SIZE[2]} CT, 'lite' model ({trained}), {args.threads} torch threads, "
          f"{args.repeats} repeats")
    print(f"{'case':34s} {'median (min-max)':28s} {'target':22s} met")
    for case, values in times.items():
        fixed, plus_transfer = TARGETS[case]
        limit = fixed + (transfer_median if plus_transfer else 0.0)
        target = f"<= {fixed:g} s" + (f" + transfer = {limit:.2f} s" if plus_transfer else "")
        print(f"{case:34s} {stats(values):28s} {target:22s} {'yes' if statistics.median(values) <= limit else 'NO'}")
    print(f"{'raw transfer, same-size uint8 file':34s} {stats(transfers):28s}")
    wire = statistics.median(WIRE_BYTES)
    print(f"{'label reply on the wire':34s} {wire / 1e6:7.3f} MB (median; {wire * 8 / 1e8:.2f} s at 100 Mbit/s)")
    for name, reply in (("new object", new_object), ("edit", edit)):
        print(f"server side, {name}: cache {reply['cache']}, cache_hit {reply['cache_hit']}, timings (s) "
              f"{reply['timings']}")


if __name__ == "__main__":
    main()
