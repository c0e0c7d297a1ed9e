"""3D Slicer's protocol: the server driven by MONAI Label's own Python client (``monailabel.client``), as the Slicer
MONAI Label module drives it: info, next sample, infer with foreground/background/roi/label and a multipart reply
(label file + params with ``label_names``), save_label. Over the DICOMweb server, so a saved ``final`` label goes to
the PACS as DICOM SEG."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelClientException

from conftest import DATA_ROOT, ROOT
from dicomweb_fixtures import need_series


@pytest.fixture
def client(dicomweb_server, tmp_path):
    return MONAILabelClient(dicomweb_server.url, tmpdir=str(tmp_path), client_id="slicer-test")


def test_slicer_session_roi_clicks_and_final_label(client, dicomweb_server, orthanc):
    info = client.info()
    assert info["models"]["raps3d"]["type"] == "deepgrow" and info["models"]["raps3d"]["dimension"] == 3
    assert "liver" in info["labels"]
    sample = client.next_sample("first", {})
    assert sample["id"] in {s.series_uid for s in orthanc.series.values()}

    phantom = orthanc.series["phantom"].series_uid
    twin = sitk.ReadImage(str(ROOT / "sample-data" / "images" / "phantom_01.nii.gz"))
    # An ROI box as Slicer maps it from RAS corners (i pair reversed), then corrective clicks; every request sends
    # all clicks so far, as the module does.
    roi = [100, 50, 40, 90, 20, 28]
    first_file, first = client.infer("raps3d", phantom, {"roi": roi, "foreground": [], "background": [],
                                                         "label": "liver"})
    assert first["label_names"] == {"liver": 1} and first["client_id"] == "slicer-test"
    assert first["box"]["source"] == "roi_middle_slice" and first["box"]["slice"] == 24
    assert first["cache"] == "new_object"
    fg = [[75, 65, 24]]
    second_file, second = client.infer("raps3d", phantom, {"roi": roi, "foreground": fg, "background": [],
                                                           "label": "liver"})
    assert second["cache"] == "edit" and second["prompts"] == {"foreground": 1, "background": 0}
    bg = [[95, 85, 24]]
    third_file, third = client.infer("raps3d", phantom, {"roi": roi, "foreground": fg, "background": bg,
                                                         "label": "liver"})
    assert third["cache"] == "edit" and third["prompts"] == {"foreground": 1, "background": 1}

    label = sitk.ReadImage(third_file)  # the reply file as Slicer loads it (ITK reader)
    assert third_file.endswith(".nii.gz")
    assert label.GetSize() == twin.GetSize()
    np.testing.assert_allclose(label.GetSpacing(), twin.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(label.GetOrigin(), twin.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(label.GetDirection(), twin.GetDirection(), atol=1e-6)
    voxels = sitk.GetArrayFromImage(label)
    assert set(np.unique(voxels)) <= {0, 1}
    i0, i1, j0, j1, k0, k1 = third["roi"]
    outside = voxels.copy()
    outside[k0:k1 + 1, j0:j1 + 1, i0:i1 + 1] = 0
    assert not outside.any()  # the reply's roi bounds the mask

    # Submit: Slicer saves the label with its segment names; the datastore writes a DICOM SEG to the PACS.
    before = set(orthanc.find("Series", {"Modality": "SEG"}))
    saved = client.save_label(phantom, third_file, tag="final",
                              params={"label_info": [{"name": "liver", "idx": 1}]})
    assert saved["image"] == phantom
    new = [s for s in orthanc.find("Series", {"Modality": "SEG"}) if s not in before]
    assert len(new) == 1
    seg_tags = orthanc.get_json(f"/series/{new[0]}/instances")[0]
    import io

    import pydicom
    import pydicom_seg

    seg = pydicom.dcmread(io.BytesIO(orthanc.instance_file(seg_tags["ID"])))
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == phantom
    assert seg.SegmentSequence[0].SegmentLabel == "liver"
    frames = pydicom_seg.MultiClassReader().read(seg).image
    on_grid = sitk.Resample(frames, label, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(on_grid), voxels)
    # MONAI Label keeps the label too, listed for the image with the SEG's series UID.
    listing = client.datastore()
    final = listing["objects"][phantom]["labels"]["final"]
    assert final["info"]["SeriesInstanceUID"] == seg.SeriesInstanceUID


def test_slicer_sees_the_reason_when_a_series_is_refused(client, orthanc):
    tilted = need_series(orthanc, "gantry_tilt", DATA_ROOT)
    with pytest.raises(MONAILabelClientException) as caught:
        client.infer("raps3d", tilted.series_uid, {"foreground": [[256, 256, 10]], "background": [],
                                                   "label": "liver"})
    message = caught.value.msg
    assert "Status: 422" in message and "gantry-tilted" in json.loads(message.split("Response: ", 1)[1])["detail"]
