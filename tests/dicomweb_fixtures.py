"""A real DICOMweb server for the viewer tests: Orthanc with its DICOMweb plugin, started by the tests themselves.

``orthanc`` (session): an Orthanc of its own (own configuration, storage folder in a temporary directory, a free
loopback HTTP port, no DICOM port, HTTP basic authentication), loaded with test series:

- ``phantom``: ``sample-data/dicom/phantom_01`` (uncompressed, from the repository: always there);
- ``j2k``: the real JPEG 2000 CT series ``totalsegmentator/example_ct_dicom`` from the data folder. Its anonymised
  files have empty Study/Series/SOP Instance UIDs (a PACS refuses them): the SOP Instance and Class UIDs are taken
  from the file meta header, the study and series UIDs derived from the data set's name; pixel data untouched;
- ``ts:<name>``: one 3-slice series per file of ``dicom/transfer_syntaxes`` (one CT slice in many transfer
  syntaxes): the slice's encoded pixel data as stored, repeated at three positions 2.5 mm apart, new UIDs;
- ``phantom_missing_slice``: the phantom series without one slice (new UIDs), an uneven stack;
- ``multiframe_jpeg``: the 2-frame enhanced CT JPEG file of ``dicom/transfer_syntaxes`` (fragmented, no basic
  offset table, positions only in its functional groups), as it is;
- ``gantry_tilt``: ``dicom/gantry_tilt_ge`` as it is (18.5 degree tilt, uneven gaps).

Data-folder series are left out, and the tests that need them skip, when the data folder is absent.
``dicomweb_server`` (session): the MONAI Label server with the Raps-3D app over ``<orthanc>/dicom-web``.
Both are stopped at the end of the session (their whole process groups).
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import shutil
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import stop_process_group, wait_until_answering

ORTHANC_START_TIMEOUT = 60  # seconds
ORTHANC_USER, ORTHANC_PASSWORD = "raps3d", "test-only-password"
# Where Debian (and most builds) put the DICOMweb plugin; RAPS3D_ORTHANC_DICOMWEB_PLUGIN (and RAPS3D_ORTHANC for the
# executable) override.
DICOMWEB_PLUGIN_GLOBS = ["/usr/share/orthanc/plugins/libOrthancDicomWeb.so*", "/usr/lib/orthanc/libOrthancDicomWeb.so*",
                         "/usr/local/share/orthanc/plugins/libOrthancDicomWeb.so*",
                         "/usr/lib/*/orthanc/libOrthancDicomWeb.so*"]
SETUP_HINT = "scripts/setup-system.sh installs the Debian packages orthanc, orthanc-dicomweb"

TS_FOLDER = "dicom/transfer_syntaxes"
J2K_FOLDER = "totalsegmentator/example_ct_dicom"
GANTRY_FOLDER = "dicom/gantry_tilt_ge"
MULTIFRAME_FILE = "dicom/transfer_syntaxes/CT0012.fragmented_no_bot_jpeg_baseline.51.dcm"
MISSING_SLICE = 10  # index of the slice left out of ``phantom_missing_slice``
TS_SLICES = 3
TS_SLICE_GAP = 2.5  # mm


def orthanc_parts() -> tuple[str, str] | None:
    """(Orthanc executable, DICOMweb plugin) when both are installed."""
    # Debian puts Orthanc in /usr/sbin, which is not on every user's PATH.
    binary = (os.environ.get("RAPS3D_ORTHANC") or shutil.which("Orthanc")
              or shutil.which("Orthanc", path=os.pathsep.join(["/usr/sbin", "/usr/local/sbin"])))
    plugin = os.environ.get("RAPS3D_ORTHANC_DICOMWEB_PLUGIN")
    if not plugin:
        found = [p for pattern in DICOMWEB_PLUGIN_GLOBS for p in sorted(glob.glob(pattern))]
        plugin = found[0] if found else None
    if binary and plugin and os.path.isfile(plugin):
        return binary, plugin
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class SeriesOnServer:
    name: str
    series_uid: str
    study_uid: str
    files: int
    transfer_syntax: str
    source: Path
    lossless: bool = True
    meta: dict = field(default_factory=dict)


class Orthanc:
    """A running Orthanc: its REST API (``url``) and DICOMweb root (``dicomweb``)."""

    def __init__(self, url: str, log: Path, auth: tuple[str, str] | None):
        self.url = url
        self.dicomweb = f"{url}/dicom-web"
        self.log = log
        self.auth = auth
        self.series: dict[str, SeriesOnServer] = {}

    def request(self, method: str, path: str, **kwargs):
        import requests

        kwargs.setdefault("timeout", 60)
        return requests.request(method, f"{self.url}{path}", auth=self.auth, **kwargs)

    def get_json(self, path: str, **kwargs):
        r = self.request("GET", path, **kwargs)
        assert r.status_code == 200, f"GET {path}: {r.status_code} {r.text[:300]}"
        return r.json()

    def upload(self, content: bytes) -> dict:
        r = self.request("POST", "/instances", data=content, headers={"Content-Type": "application/dicom"})
        assert r.status_code == 200, f"Orthanc refused an instance: {r.status_code} {r.text[:300]}"
        return r.json()

    def find(self, level: str, query: dict) -> list[str]:
        """Orthanc ids of the studies/series/instances matching a DICOM tag query."""
        return self.request("POST", "/tools/find", json={"Level": level, "Query": query}).json()

    def series_id(self, series_uid: str) -> str | None:
        found = self.find("Series", {"SeriesInstanceUID": series_uid})
        return found[0] if found else None

    def instance_file(self, instance_id: str) -> bytes:
        r = self.request("GET", f"/instances/{instance_id}/file")
        assert r.status_code == 200
        return r.content

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


@contextlib.contextmanager
def running_orthanc(work: Path, auth: tuple[str, str] | None = (ORTHANC_USER, ORTHANC_PASSWORD)):
    """An Orthanc of the test's own on a free loopback port, storage under ``work``; stopped on exit."""
    import requests

    parts = orthanc_parts()
    if parts is None:
        pytest.skip(f"Orthanc with the DICOMweb plugin is not installed ({SETUP_HINT})")
    binary, plugin = parts
    port = free_port()
    storage = work / "orthanc-storage"
    storage.mkdir(parents=True, exist_ok=True)
    config = {
        "Name": "raps3d-tests",
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "HttpPort": port,
        "RemoteAccessAllowed": False,  # loopback only
        "DicomServerEnabled": False,  # no DICOM port
        "AuthenticationEnabled": auth is not None,
        "RegisteredUsers": {auth[0]: auth[1]} if auth else {},
        "Plugins": [plugin],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
        "StableAge": 1,
        "SaveJobs": False,
    }
    config_file = work / "orthanc.json"
    config_file.write_text(json.dumps(config, indent=2))
    log = work / "orthanc.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([binary, str(config_file)], cwd=work, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    server = Orthanc(f"http://127.0.0.1:{port}", log, auth)
    try:
        wait_until_answering(process, f"{server.url}/system", ORTHANC_START_TIMEOUT, "Orthanc", server.log_tail,
                             auth=auth)
        plugins = requests.get(f"{server.url}/plugins", auth=auth, timeout=10).json()
        assert "dicom-web" in plugins, f"the DICOMweb plugin did not load:\n{server.log_tail()}"
        yield server
    finally:
        stop_process_group(process)


# -- test series ----------------------------------------------------------------------------------------------------
def _encode(ds) -> bytes:
    out = io.BytesIO()
    ds.save_as(out, write_like_original=True)
    return out.getvalue()


def _uid(*parts: str) -> str:
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=["raps3d-tests", *parts])


def upload_folder(orthanc: Orthanc, name: str, folder: Path, fill_uids: bool = False) -> SeriesOnServer:
    """Uploads every DICOM file of a folder (one series). ``fill_uids``: give anonymised files whose UIDs were
    blanked the UIDs a PACS requires (SOP UIDs from the file meta header, study/series UIDs derived from ``name``)."""
    import pydicom

    study_uid, series_uid = _uid(name, "study"), _uid(name, "series")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != "LICENSE")
    uids, syntaxes = set(), set()
    for path in files:
        ds = pydicom.dcmread(path)
        if fill_uids:
            ds.SOPInstanceUID = ds.get("SOPInstanceUID") or ds.file_meta.MediaStorageSOPInstanceUID
            ds.SOPClassUID = ds.get("SOPClassUID") or ds.file_meta.MediaStorageSOPClassUID
            ds.StudyInstanceUID = ds.get("StudyInstanceUID") or study_uid
            ds.SeriesInstanceUID = ds.get("SeriesInstanceUID") or series_uid
            orthanc.upload(_encode(ds))
        else:
            orthanc.upload(path.read_bytes())
        uids.add((str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)))
        syntaxes.add(str(ds.file_meta.TransferSyntaxUID))
    assert len(uids) == 1, f"{folder} holds more than one series: {uids}"
    (study, series), = uids
    return SeriesOnServer(name, series, study, len(files), ",".join(sorted(syntaxes)), folder)


def upload_as_new_series(orthanc: Orthanc, name: str, folder: Path, drop: tuple[int, ...] = (),
                         blank: tuple[str, ...] = ()) -> SeriesOnServer:
    """The files of a folder (sorted by name) as a new series of a new study (new UIDs), without the files at the
    indices ``drop``, and with the attributes ``blank`` emptied (as some anonymisers leave them)."""
    import pydicom

    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix == ".dcm")
    kept = [p for i, p in enumerate(files) if i not in drop]
    study_uid, series_uid = _uid(name, "study"), _uid(name, "series")
    for i, path in enumerate(kept):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = _uid(name, "instance", str(i))
        ds.SeriesDescription = f"{ds.get('SeriesDescription', '')} ({name})".strip()
        for keyword in blank:
            setattr(ds, keyword, "")
        orthanc.upload(_encode(ds))
    return SeriesOnServer(name, series_uid, str(ds.StudyInstanceUID), len(kept), str(ds.file_meta.TransferSyntaxUID),
                      folder)


def upload_file(orthanc: Orthanc, name: str, path: Path) -> SeriesOnServer:
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    orthanc.upload(path.read_bytes())
    return SeriesOnServer(name, str(ds.SeriesInstanceUID), str(ds.StudyInstanceUID), 1,
                      str(ds.file_meta.TransferSyntaxUID), path)


def upload_slice_as_series(orthanc: Orthanc, name: str, path: Path) -> SeriesOnServer:
    """One encoded CT slice as a 3-slice series (pixel data as stored, positions TS_SLICE_GAP apart, new UIDs)."""
    import numpy as np
    import pydicom

    source = pydicom.dcmread(path)
    syntax = source.file_meta.TransferSyntaxUID
    study_uid, series_uid = _uid(TS_FOLDER, "study"), _uid(name, "series")
    orientation = [float(v) for v in source.ImageOrientationPatient]
    normal = np.cross(orientation[:3], orientation[3:])
    origin = np.array([float(v) for v in source.ImagePositionPatient])
    for k in range(TS_SLICES):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = _uid(name, "instance", str(k))
        ds.SeriesDescription = f"transfer syntax {name}"
        ds.SeriesNumber, ds.InstanceNumber = 900, k + 1
        ds.ImagePositionPatient = [f"{v:.6f}" for v in origin + k * TS_SLICE_GAP * normal]
        ds.SliceLocation = f"{float(origin @ normal) + k * TS_SLICE_GAP:.6f}"
        orthanc.upload(_encode(ds))
    return SeriesOnServer(name, series_uid, study_uid, TS_SLICES, str(syntax), path,
                      lossless=not syntax.is_compressed or syntax in LOSSLESS_COMPRESSED)


# Compressed transfer syntaxes that are lossless (the others are lossy: compared with a tolerance).
LOSSLESS_COMPRESSED = {"1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80",
                       "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.5"}


def transfer_syntax_files(data_root: Path) -> dict[str, Path]:
    """Test name -> single-slice CT file of ``dicom/transfer_syntaxes`` (one per encoding)."""
    folder = data_root / TS_FOLDER
    if not folder.is_dir():
        return {}
    import pydicom

    files = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.name in ("LICENSE", "CTImage.dcm") or path.name.startswith("no-pixel"):
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:
            continue
        if ds.get("Modality") != "CT" or ds.get("ImagePositionPatient") is None or ds.get("Rows") is None:
            continue  # e.g. the 2-frame file without geometry, tested on its own
        name = path.name.replace("CTImage.dcm_", "").replace("TransferSyntax", "").split("_1.2.840")[0]
        files[name.removesuffix(".dcm")] = path
    return files


def upload_test_series(orthanc: Orthanc, repo_root: Path, data_root: Path) -> dict[str, SeriesOnServer]:
    phantom = repo_root / "sample-data" / "dicom" / "phantom_01"
    series = {"phantom": upload_folder(orthanc, "phantom", phantom),
              "phantom_missing_slice": upload_as_new_series(orthanc, "phantom_missing_slice", phantom,
                                                            drop=(MISSING_SLICE,)),
              # never labelled by any test (others label "phantom"): unlabelled whatever ran before
              "phantom_unlabelled": upload_as_new_series(orthanc, "phantom_unlabelled", phantom),
              "phantom_blank_frame": upload_as_new_series(orthanc, "phantom_blank_frame", phantom,
                                                          blank=("FrameOfReferenceUID",))}
    if (data_root / J2K_FOLDER).is_dir():
        series["j2k"] = upload_folder(orthanc, "j2k", data_root / J2K_FOLDER, fill_uids=True)
    for name, path in transfer_syntax_files(data_root).items():
        series[f"ts:{name}"] = upload_slice_as_series(orthanc, name, path)
    if (data_root / MULTIFRAME_FILE).is_file():
        series["multiframe_jpeg"] = upload_file(orthanc, "multiframe_jpeg", data_root / MULTIFRAME_FILE)
    if (data_root / GANTRY_FOLDER).is_dir():
        series["gantry_tilt"] = upload_folder(orthanc, "gantry_tilt", data_root / GANTRY_FOLDER)
    return series


def need_series(orthanc: Orthanc, name: str, data_root: Path) -> SeriesOnServer:
    if name not in orthanc.series:
        pytest.skip(f"test series {name!r} needs the data folder {data_root} (set RAPS3D_DATA)")
    return orthanc.series[name]


# -- fixtures -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def orthanc(tmp_path_factory) -> Orthanc:
    from conftest import DATA_ROOT, ROOT

    work = tmp_path_factory.mktemp("orthanc")
    with running_orthanc(work) as server:
        server.series = upload_test_series(server, ROOT, DATA_ROOT)
        yield server


@pytest.fixture(scope="session")
def dicomweb_server(orthanc, tmp_path_factory):
    """The Raps-3D MONAI Label server over the test Orthanc's DICOMweb root, with its credentials."""
    from conftest import running_server

    work = tmp_path_factory.mktemp("raps3d_dicomweb")
    env = {
        "MONAI_LABEL_DICOMWEB_USERNAME": orthanc.auth[0],
        "MONAI_LABEL_DICOMWEB_PASSWORD": orthanc.auth[1],
        "MONAI_LABEL_DICOMWEB_CACHE_PATH": str(work / "dicomweb-cache"),
    }
    with running_server(work, orthanc.dicomweb, work / "no-checkpoint-here.pt", extra_env=env) as srv:
        srv.orthanc = orthanc
        srv.cache = work / "dicomweb-cache"
        yield srv
