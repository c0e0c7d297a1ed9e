"""A client reaches only the datastore (image ids and label tags cannot name files elsewhere on the server), and a
label saved there is one training can read, and an image added there one requests can segment."""

from __future__ import annotations

import json
import shutil

import pytest
import requests

from conftest import BAD_IMAGES, SAMPLE_IMAGES

IMAGE = "phantom_03"
CLICK = [80, 64, 24]


@pytest.fixture(scope="module")
def outside_ct(server):
    """A real CT on the server's disk, beside the datastore but not in it."""
    folder = server.log.parent / "outside"
    folder.mkdir(exist_ok=True)
    path = folder / "secret_ct.nii.gz"
    shutil.copy(SAMPLE_IMAGES / f"{IMAGE}.nii.gz", path)
    return path


def test_infer_refuses_paths_as_images(server, outside_ct):
    work = server.log.parent  # the server's working folder
    for image in (str(outside_ct), "outside/secret_ct.nii.gz", str(server.image_path(IMAGE)),
                  f"studies/{IMAGE}.nii.gz", str(work / "no_such_file.nii.gz"), "/etc"):
        r = server.infer(image, {"foreground": [CLICK]})
        assert r.status_code == 404, (image, r.text)
        # The same answer whether or not the path exists: nothing is learnt of the server's files.
        assert r.json()["detail"] == f"image {image!r} is not in the datastore"
    assert server.infer(IMAGE, {"foreground": [CLICK]}).status_code == 200


def test_params_cannot_replace_the_image(server, outside_ct):
    r = server.infer(IMAGE, {"foreground": [CLICK], "image": str(outside_ct)})
    assert r.status_code == 400, r.text
    assert r.json()["detail"] == "the image goes in the request's 'image' (or as an uploaded file), not in params"
    ct = (SAMPLE_IMAGES / f"{IMAGE}.nii.gz").read_bytes()
    files = {"file": ("upload.nii.gz", ct, "application/octet-stream")}
    r = server.infer("", {"foreground": [CLICK], "image": str(outside_ct)}, files=files)
    assert r.status_code == 400, r.text
    assert server.infer(IMAGE, {"foreground": [CLICK], "image": IMAGE}).status_code == 200  # the same image: fine


@pytest.mark.parametrize("params,detail", [
    ("{not json", "params is not valid JSON"),
    ("[1, 2]", "params must be a JSON object"),
])
def test_params_that_are_not_a_json_object_are_400(server, params, detail):
    r = requests.post(f"{server.url}/infer/raps3d", params={"image": IMAGE}, data={"params": params}, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["detail"].startswith(detail)


def test_an_inferred_label_is_saved_only_under_a_plain_tag(server):
    escape = server.log.parent / "escaped"
    r = server.infer(IMAGE, {"foreground": [CLICK], "save_label": True, "label_tag": "../../escaped"})
    assert r.status_code == 400, r.text
    assert r.json()["detail"] == "label_tag must be a plain name (no '/', '\\' or '..'), got '../../escaped'"
    assert not escape.exists()
    assert not (server.studies / "labels" / "../../escaped").exists()


def test_save_label_is_a_yes_or_no_and_the_text_false_saves_nothing(server):
    """MONAI Label tests ``save_label`` as it comes, so the text "false" saved the result over the tag's label."""
    folder = server.studies / "labels" / "kept_unsaved"
    r = server.infer(IMAGE, {"foreground": [CLICK], "save_label": "false", "label_tag": "kept_unsaved"})
    assert r.status_code == 200, r.text
    assert not folder.exists()
    r = server.infer(IMAGE, {"foreground": [CLICK], "save_label": "later", "label_tag": "kept_unsaved"})
    assert r.status_code == 400, r.text
    assert r.json()["detail"] == "save_label must be true or false, got 'later'"
    assert not folder.exists()


def test_an_inferred_label_saved_under_a_tag_is_the_reply_on_the_images_grid(server):
    import numpy as np
    import SimpleITK as sitk

    params = {"foreground": [CLICK], "client_id": "saves-labels", "result_extension": ".nrrd"}
    r = server.infer_ok(IMAGE, {**params, "save_label": True, "label_tag": "interactive"}, output="image")
    reply, _ = server.nrrd_label(r.content)
    try:
        saved = sitk.ReadImage(str(next((server.studies / "labels" / "interactive").glob(f"{IMAGE}.*"))))
        image = sitk.ReadImage(str(server.image_path(IMAGE)))
        assert saved.GetSize() == image.GetSize()
        for a, b in ((saved.GetOrigin(), image.GetOrigin()), (saved.GetSpacing(), image.GetSpacing()),
                     (saved.GetDirection(), image.GetDirection())):
            assert np.allclose(a, b, rtol=0, atol=1e-6), (a, b)
        voxels = sitk.GetArrayFromImage(saved).transpose(2, 1, 0)  # [i, j, k], as the reply
        assert voxels.any() and np.array_equal(voxels > 0, reply > 0)
        # Saved again as another file type: the earlier file goes (MONAI Label kept both, and brought the earlier
        # one back once the label was removed).
        server.infer_ok(IMAGE, {**params, "result_extension": ".nii.gz", "save_label": True,
                                "label_tag": "interactive", "foreground": [CLICK, [84, 60, 24]]})
        files = sorted(p.name for p in (server.studies / "labels" / "interactive").glob(f"{IMAGE}.*"))
        assert files == [f"{IMAGE}.nii.gz"], files
    finally:
        gone = requests.delete(f"{server.url}/datastore/label", params={"id": IMAGE, "tag": "interactive"}, timeout=60)
        assert gone.status_code == 200, gone.text
        assert labels_when_settled(server, IMAGE, "interactive", timeout=0) == {}  # at once: a tag made since start


def labels_when_settled(server, image_id: str, removed_tag: str, timeout: float = 30.0) -> dict:
    """The image's labels in the index once it shows ``removed_tag`` gone (it follows the file's removal)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        objects = requests.get(f"{server.url}/datastore/", params={"output": "all"}, timeout=60).json()["objects"]
        labels = objects[image_id]["labels"]
        if removed_tag not in labels or time.monotonic() > deadline:
            return labels
        time.sleep(0.2)


@pytest.mark.parametrize("query,detail", [
    ({"image": IMAGE, "tag": "../../escaped"}, "the label tag must be a plain name"),
    ({"image": IMAGE, "tag": "final/../../../escaped"}, "the label tag must be a plain name"),
    ({"image": IMAGE, "tag": ".."}, "the label tag must be a plain name"),
    ({"image": "../escaped", "tag": "final"}, "the image id must be a plain name"),
    ({"image": IMAGE, "tag": " final"}, "the label tag must not start or end with a space, got ' final'"),
    ({"image": IMAGE, "tag": "t" * 300}, "the label tag must be at most 200 bytes long, got 300"),
])
def test_a_label_upload_stays_inside_the_datastore(server, query, detail):
    scratch = server.log.parent / "tmp"
    before = set(scratch.iterdir())
    files = {"label": ("escaped", b"ssh-ed25519 AAAA not a label", "application/octet-stream")}
    r = requests.put(f"{server.url}/datastore/label", params=query, files=files, data={"params": "{}"}, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["detail"].startswith(detail)
    work = server.log.parent
    assert not list(work.glob("escaped*")) and not list(work.parent.glob("escaped*"))
    assert set(scratch.iterdir()) == before
    datastore = requests.get(f"{server.url}/datastore/", params={"output": "all"}, timeout=60).json()
    assert not datastore["objects"][IMAGE]["labels"], "nothing was recorded for the image"


def test_a_label_for_an_unknown_image_is_404_and_leaves_no_upload(server):
    scratch = server.log.parent / "tmp"
    before = set(scratch.iterdir())
    files = {"label": ("label.nii.gz", (SAMPLE_IMAGES / f"{IMAGE}.nii.gz").read_bytes(), "application/octet-stream")}
    r = requests.put(f"{server.url}/datastore/label", params={"image": "no_such_image", "tag": "final"},
                     files=files, data={"params": "{}"}, timeout=60)
    assert r.status_code == 404, r.text
    assert r.json()["detail"] == "image 'no_such_image' is not in the datastore"
    assert set(scratch.iterdir()) == before


@pytest.mark.parametrize("route", ["/datastore/", "/datastore/image"])
def test_an_image_upload_stays_inside_the_datastore(server, route):
    ct = (SAMPLE_IMAGES / f"{IMAGE}.nii.gz").read_bytes()
    listing = f"{server.url}/datastore/"
    # An id given, or (without one) the id MONAI Label takes from the uploaded file's name.
    for query, filename, image_id in [({"image": "../escaped"}, "upload.nii.gz", "../escaped"),
                                      ({"image": "/tmp/escaped"}, "upload.nii.gz", "/tmp/escaped"),
                                      ({"image": "a\\..\\..\\escaped"}, "upload.nii.gz", "a\\..\\..\\escaped"),
                                      ({}, "x/..", ".."),
                                      ({}, ".", "."),
                                      ({}, "a\\b.nii.gz", "a\\b")]:
        files = {"file": (filename, ct, "application/octet-stream")}
        r = requests.put(f"{server.url}{route}", params=query, files=files, data={"params": "{}"}, timeout=60)
        assert r.status_code == 400, (query, filename, r.text)
        assert r.json()["detail"].endswith(f"must be a plain name (no '/', '\\' or '..'), got {image_id!r}")
        assert image_id not in requests.get(listing, params={"output": "all"}, timeout=60).json()["objects"]
    # Too long for a file name (the system's limit is 255 bytes): a 400, not the file system's error as a 500.
    files = {"file": ("upload.nii.gz", ct, "application/octet-stream")}
    r = requests.put(f"{server.url}{route}", params={"image": "é" * 150}, files=files, data={"params": "{}"},
                     timeout=60)
    assert r.status_code == 400 and r.json()["detail"].endswith("must be at most 200 bytes long, got 300"), r.text
    work = server.log.parent
    assert not list(work.glob("escaped*")) and not list(server.studies.glob("*escaped*"))
    assert not list(work.glob("*.nii.gz")), "nothing was written beside the datastore"


def test_an_image_that_no_request_could_segment_is_422_and_not_added(server):
    listing = f"{server.url}/datastore/"
    scratch = server.log.parent / "tmp"
    before = set(scratch.iterdir())
    for bad, fragment in [("corrupt", "cannot read 'corrupt.nii.gz' as an image"), ("rgb", "3 values per voxel"),
                          ("nan", "NaN or infinite"), ("oneslice", "single slice"),
                          ("mr", "'mr.nii.gz' does not look like CT in Hounsfield units")]:
        content = (server.studies / BAD_IMAGES[bad]).read_bytes()
        r = requests.put(f"{server.url}/datastore/image", params={"image": f"upload_{bad}"},
                         files={"file": (BAD_IMAGES[bad], content, "application/octet-stream")},
                         data={"params": "{}"}, timeout=60)
        assert r.status_code == 422, (bad, r.text)
        assert r.json()["detail"].startswith("the image cannot be added: ") and fragment in r.json()["detail"]
        assert f"upload_{bad}" not in requests.get(listing, params={"output": "all"}, timeout=60).json()["objects"]
    assert set(scratch.iterdir()) == before
    # A CT is added, under the id given.
    ct = (SAMPLE_IMAGES / f"{IMAGE}.nii.gz").read_bytes()
    r = requests.put(f"{server.url}/datastore/image", params={"image": "upload_ct"},
                     files={"file": ("ct.nii.gz", ct, "application/octet-stream")}, data={"params": "{}"}, timeout=60)
    assert r.status_code == 200 and r.json() == {"image": "upload_ct"}, r.text
    try:
        assert (server.studies / "upload_ct.nii.gz").read_bytes() == ct
    finally:
        assert requests.delete(listing, params={"id": "upload_ct"}, timeout=60).status_code == 200


@pytest.mark.parametrize("route,query", [
    ("/datastore/image", {"id": ".."}),
    ("/datastore/", {"id": "../studies"}),
    ("/datastore/label", {"id": IMAGE, "tag": "../.."}),
    ("/datastore/label", {"id": "..", "tag": "final"}),
])
def test_removals_name_only_the_datastores_images_and_tags(server, route, query):
    r = requests.delete(f"{server.url}{route}", params=query, timeout=60)
    assert r.status_code == 400, r.text
    assert "must be a plain name" in r.json()["detail"]
    assert server.image_path(IMAGE).exists()


def test_malformed_params_of_an_upload_are_400(server):
    files = {"label": ("label.nii.gz", b"x", "application/octet-stream")}
    r = requests.put(f"{server.url}/datastore/label", params={"image": IMAGE, "tag": "final"}, files=files,
                     data={"params": "{not json"}, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["detail"].startswith("params is not valid JSON")


def test_batch_infer_takes_only_the_datastores_images(server, outside_ct):
    r = requests.post(f"{server.url}/batch/infer/raps3d", params={"run_sync": "true"},
                      json={"images": [str(outside_ct), IMAGE], "foreground": [CLICK]}, timeout=300)
    assert r.status_code == 404, r.text[:500]
    assert r.json()["detail"] == f"not in the datastore: {[str(outside_ct)]!r}"
    r = requests.post(f"{server.url}/batch/infer/raps3d", params={"run_sync": "true"},
                      json={"images": {str(outside_ct): 0}, "foreground": [CLICK]}, timeout=300)
    assert r.status_code == 400, r.text[:500]
    assert r.json()["detail"] == "images must be 'all', 'labeled', 'unlabeled' or a list of image ids"
    import numpy as np
    import SimpleITK as sitk

    # Without a GPU too (MONAI Label spread the images over an empty list of GPUs: a division by zero).
    r = requests.post(f"{server.url}/batch/infer/raps3d", params={"run_sync": "true"},
                      json={"images": [IMAGE], "foreground": [CLICK], "label_tag": "batch"}, timeout=300)
    assert r.status_code == 200, r.text[:500]
    try:
        saved = next((server.studies / "labels" / "batch").glob(f"{IMAGE}.*"))
        saved = sitk.GetArrayFromImage(sitk.ReadImage(str(saved)))
        reply = server.infer_ok(IMAGE, {"foreground": [CLICK], "client_id": "batch-reference",
                                        "result_extension": ".nrrd"}, output="image")
        reference, _ = server.nrrd_label(reply.content)  # [i, j, k]
        assert reference.any() and saved.shape == (48, 128, 160)
        assert np.array_equal(saved.transpose(2, 1, 0) > 0, reference > 0)
    finally:
        assert requests.delete(f"{server.url}/datastore/label", params={"id": IMAGE, "tag": "batch"},
                               timeout=60).status_code == 200


def session_of(server, content: bytes, filename: str, uncompress: bool = False):
    return requests.put(f"{server.url}/session/", params={"uncompress": str(uncompress).lower()},
                        files={"files": (filename, content, "application/octet-stream")}, timeout=120)


def test_a_session_image_is_segmented_whatever_name_the_viewer_gives_it(server):
    # 3D Slicer uploads the volume it holds and sends its own name for it, which may hold a "/".
    r = session_of(server, (SAMPLE_IMAGES / f"{IMAGE}.nii.gz").read_bytes(), "volume.nii.gz")
    assert r.status_code == 200, r.text
    session_id = r.json()["session_id"]
    query = {"image": "3: CT ABD/PELVIS", "session_id": session_id, "output": "json"}
    r = requests.post(f"{server.url}/infer/raps3d", params=query,
                      data={"params": json.dumps({"foreground": [CLICK], "client_id": "slicer-session"})}, timeout=300)
    assert r.status_code == 200, r.text
    # A session that does not exist does not open the path either.
    query = {"image": str(server.image_path(IMAGE)), "session_id": "no-such-session", "output": "json"}
    r = requests.post(f"{server.url}/infer/raps3d", params=query,
                      data={"params": json.dumps({"foreground": [CLICK]})}, timeout=300)
    assert r.status_code == 404, r.text


def tar_bytes(members: list[tuple[str, bytes]], link: tuple[str, str] | None = None) -> bytes:
    import io
    import tarfile

    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as archive:
        for name, content in members:
            info = tarfile.TarInfo(name)
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))
        if link:
            info = tarfile.TarInfo(link[0])
            info.type, info.linkname = tarfile.SYMTYPE, link[1]
            archive.addfile(info)
    return out.getvalue()


def test_an_archive_that_would_unpack_outside_its_folder_is_refused(server):
    work = server.log.parent
    target = work / "escaped_by_session.txt"
    depth = "../" * len(work.parts)
    for archive, member in [(tar_bytes([(f"{depth}{str(target).lstrip('/')}", b"x")]), "../"),
                            (tar_bytes([(str(target), b"x")]), str(target)),
                            (tar_bytes([], link=("ct.nii.gz", "/etc/hostname")), "ct.nii.gz")]:
        r = session_of(server, archive, "series.tar.gz", uncompress=True)
        assert r.status_code == 400, r.text
        assert "would be unpacked outside its folder" in r.json()["detail"] and member in r.json()["detail"]
        assert not target.exists()
    ct = (SAMPLE_IMAGES / f"{IMAGE}.nii.gz").read_bytes()
    r = session_of(server, tar_bytes([("series/ct.nii.gz", ct)]), "series.tar.gz", uncompress=True)
    assert r.status_code == 200, r.text


def test_uncompress_takes_only_an_archive(server):
    """MONAI Label unpacks a single upload by its name's type: anything else was a bare 500 that left the upload and
    two folders in the temporary folder."""
    scratch = server.log.parent / "tmp"
    before = set(scratch.iterdir())
    ct = (SAMPLE_IMAGES / f"{IMAGE}.nii.gz").read_bytes()
    for content, name, detail in [
        (ct, "ct.nii.gz", "uncompress=true takes an archive (.tar, .tar.bz2, .tar.gz, .tar.xz, .tbz2, .tgz, .txz, "
                          ".zip); 'ct.nii.gz' is not named as one (the suffix in lower case)"),
        (ct, "SERIES.ZIP", "uncompress=true takes an archive (.tar, .tar.bz2, .tar.gz, .tar.xz, .tbz2, .tgz, .txz, "
                           ".zip); 'SERIES.ZIP' is not named as one (the suffix in lower case)"),
        (ct, "series.zip", "'series.zip' cannot be read as a zip archive"),
        (b"not a tar", "series.tar.gz", "'series.tar.gz' cannot be read as a gztar archive")]:
        r = session_of(server, content, name, uncompress=True)
        assert r.status_code == 400, r.text
        assert r.json()["detail"] == detail
    # Nothing new (an earlier request's folder may be removed meanwhile, after its reply).
    assert set(scratch.iterdir()) <= before


def test_a_session_upload_whose_name_names_a_folder_is_400(server):
    ct = (SAMPLE_IMAGES / f"{IMAGE}.nii.gz").read_bytes()
    for name in ("..", "series/..", "."):
        r = session_of(server, ct, name)
        assert r.status_code == 400, r.text
        assert r.json()["detail"] == f"the file name {name!r} names a folder, not a file"


def label_bytes(array, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)) -> bytes:
    import tempfile

    import numpy as np
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.asarray(array, np.uint8))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    with tempfile.TemporaryDirectory() as folder:
        sitk.WriteImage(image, f"{folder}/label.nii.gz")
        with open(f"{folder}/label.nii.gz", "rb") as f:
            return f.read()


def test_a_label_that_training_could_not_read_is_422_and_not_saved(server):
    import numpy as np
    import SimpleITK as sitk

    ct = sitk.ReadImage(str(server.image_path(IMAGE)))
    far = [o + 10000.0 for o in ct.GetOrigin()]
    cases = [
        (b"not a label", "my_seg.nii.gz", "the label cannot be saved: cannot read 'my_seg.nii.gz' as a label map"),
        (b"ssh-ed25519 AAAA", "authorized_keys",
         "the label cannot be saved: cannot read 'authorized_keys' as a label map"),
        (label_bytes(np.ones((1, 8, 8))[0]), "flat.nii.gz", "is not a 3D label map"),
        (label_bytes(np.ones((4, 8, 8)), origin=far), "far.nii.gz", "lies outside its image"),
        # The CT itself, sent as its label by mistake: thousands of HU values, negative ones among them.
        (server.image_path(IMAGE).read_bytes(), "ct.nii.gz",
         "the label cannot be saved: the label 'ct.nii.gz' holds negative values (down to "),
    ]
    scratch = server.log.parent / "tmp"
    before = set(scratch.iterdir())
    for content, filename, detail in cases:
        r = requests.put(f"{server.url}/datastore/label", params={"image": IMAGE, "tag": "final"},
                         files={"label": (filename, content, "application/octet-stream")}, data={"params": "{}"},
                         timeout=60)
        assert r.status_code == 422, r.text
        assert detail in r.json()["detail"], r.json()
    assert set(scratch.iterdir()) == before
    datastore = requests.get(f"{server.url}/datastore/", params={"output": "all"}, timeout=60).json()
    assert not datastore["objects"][IMAGE]["labels"], "nothing was recorded for the image"


@pytest.mark.parametrize("route", ["/infer/wsi/raps3d", "/infer/wsi_v2/raps3d"])
def test_whole_slide_routes_are_refused(server, route, outside_ct):
    # MONAI Label's whole-slide routes merge their params into the request and open any path: not for a CT model.
    scratch = server.log.parent / "tmp"
    before = set(scratch.iterdir())
    requests_sent = [requests.post(f"{server.url}{route}", timeout=60)]  # no image at all (MONAI Label: 500)
    if route.endswith("wsi_v2/raps3d"):
        ct = outside_ct.read_bytes()
        requests_sent.append(requests.post(f"{server.url}{route}", params={"image": str(outside_ct)},
                                           data={"wsi": json.dumps({"params": {"foreground": [CLICK]}})},
                                           files={"file": ("ct.nii.gz", ct, "application/octet-stream")},
                                           timeout=60))
    else:
        requests_sent.append(requests.post(f"{server.url}{route}", params={"image": str(outside_ct)},
                                           json={"params": {"foreground": [CLICK]}}, timeout=60))
    for r in requests_sent:
        assert r.status_code == 400, r.text
        assert r.json()["detail"] == ("Raps-3D segments CT volumes; whole-slide inference is not offered: use POST "
                                      "/infer/raps3d")
    assert set(scratch.iterdir()) == before  # an uploaded file is not kept


def test_an_image_id_keeps_its_image_and_its_labels(server):
    """Uploading an image again under its id (a viewer that uploads before it segments) keeps it and its labels;
    another image under that id is 409: MONAI Label would keep the first one's labels, which would then count as the
    second one's."""
    import SimpleITK as sitk

    listing = f"{server.url}/datastore/"
    ct = (SAMPLE_IMAGES / f"{IMAGE}.nii.gz").read_bytes()

    def upload(content, filename="ct.nii.gz"):
        return requests.put(f"{server.url}/datastore/image", params={"image": "kept_ct"}, data={"params": "{}"},
                            files={"file": (filename, content, "application/octet-stream")}, timeout=60)

    def labels():
        objects = requests.get(listing, params={"output": "all"}, timeout=60).json()["objects"]
        return objects["kept_ct"]["labels"]

    assert upload(ct).status_code == 200
    try:
        size = sitk.ReadImage(str(SAMPLE_IMAGES / f"{IMAGE}.nii.gz")).GetSize()
        grid = sitk.ReadImage(str(SAMPLE_IMAGES / f"{IMAGE}.nii.gz"))
        label = sitk.Image(size, sitk.sitkUInt8)
        label.CopyInformation(grid)
        label[10:20, 10:20, 5:9] = 1
        for suffix in (".nii.gz", ".nrrd"):  # the same label saved twice, as two file types
            path = server.log.parent / f"label{suffix}"
            sitk.WriteImage(label, str(path))
            r = requests.put(f"{server.url}/datastore/label", params={"image": "kept_ct", "tag": "final"},
                             files={"label": (path.name, path.read_bytes(), "application/octet-stream")},
                             data={"params": "{}"}, timeout=60)
            assert r.status_code == 200, r.text
        assert sorted(p.name for p in (server.studies / "labels" / "final").glob("kept_ct.*")) == ["kept_ct.nrrd"]

        again = upload(ct)
        assert again.status_code == 200 and again.json() == {"image": "kept_ct"}
        assert "final" in labels()
        other = upload((SAMPLE_IMAGES / "phantom_02.nii.gz").read_bytes())
        assert other.status_code == 409, other.text
        assert other.json()["detail"].startswith("the datastore already holds another image with the id 'kept_ct'")
        assert (server.studies / "kept_ct.nii.gz").read_bytes() == ct and "final" in labels()

        assert requests.delete(f"{server.url}/datastore/label", params={"id": "kept_ct", "tag": "final"},
                               timeout=60).status_code == 200
        assert "final" not in labels_when_settled(server, "kept_ct", "final")  # no earlier file type comes back
        assert not list((server.studies / "labels" / "final").glob("kept_ct.*"))
    finally:
        assert requests.delete(listing, params={"id": "kept_ct"}, timeout=60).status_code == 200


def test_image_and_label_info_updates_are_checked(server):
    """MONAI Label answered 500 for these, and let a client write the records that decide the next image to hand
    out (a malformed one stopped active learning for everyone)."""
    url = f"{server.url}/datastore"
    for route, query, info, status, detail in [
        ("/image/info", {"image": IMAGE}, "{bad", 400, "info is not valid JSON"),
        ("/image/info", {"image": IMAGE}, "[1, 2]", 400, "info must be a JSON object"),
        ("/image/info", {"image": IMAGE}, '{"strategy": "oops"}', 400,
         "info keys ['strategy'] are written by the server only"),
        ("/image/info", {"image": IMAGE}, '{"raps3d_uncertainty": 1e308}', 400,
         "info keys ['raps3d_uncertainty'] are written by the server only"),
        ("/image/info", {"image": "no_such_image"}, "{}", 404, "image 'no_such_image' is not in the datastore"),
        ("/label/info", {"label": "no_such_image", "tag": "final"}, "{}", 404,
         "image 'no_such_image' is not in the datastore"),
        ("/label/info", {"label": IMAGE, "tag": "never_saved"}, "{}", 404,
         f"image '{IMAGE}' has no label tagged 'never_saved'"),
    ]:
        r = requests.put(f"{url}{route}", params=query, data={"info": info}, timeout=60)
        assert r.status_code == status and r.json()["detail"].startswith(detail), (route, info, r.text)
    r = requests.put(f"{url}/image/info", params={"image": IMAGE}, data={"info": '{"reviewed_by": "dr x"}'},
                     timeout=60)
    assert r.status_code == 200, r.text
    info = requests.get(f"{url}/image/info", params={"image": IMAGE}, timeout=60).json()
    assert info["reviewed_by"] == "dr x"
