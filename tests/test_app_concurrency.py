"""One user's long request does not hold up the server: infer requests run in worker threads, not on the event loop
(MONAI Label's own route runs them inline, so every other request waited for the whole of it)."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import running_server


@pytest.fixture(scope="module")
def big_ct_server(tmp_path_factory):
    work = tmp_path_factory.mktemp("raps3d_concurrency")
    studies = work / "studies"
    studies.mkdir()
    # A whole-body-sized CT (512 x 512 x 600): opening it, segmenting and writing its label take a second or more.
    volume = np.full((600, 512, 512), -1000, np.int16)
    yy, xx = np.ogrid[:512, :512]
    volume[:, ((yy - 256) / 200.0) ** 2 + ((xx - 256) / 230.0) ** 2 < 1] = 40
    volume[200:400, ((yy - 230) / 60.0) ** 2 + ((xx - 300) / 80.0) ** 2 < 1] = 120
    image = sitk.GetImageFromArray(volume)
    image.SetSpacing((0.8, 0.8, 1.0))
    sitk.WriteImage(image, str(studies / "whole_body.nii.gz"), True)
    with running_server(work, studies, work / "no-checkpoint-here.pt") as srv:
        yield srv


def test_the_server_answers_while_a_long_infer_request_runs(big_ct_server):
    srv = big_ct_server
    reply, finished, info_status, info_done = srv.info_while(
        lambda: srv.infer("whole_body", {"foreground": [[300, 230, 300]]}), "Infer Request")
    assert info_status == 200 and reply.status_code == 200, srv.log_tail()
    assert info_done < finished, "/info waited for the infer request to finish"
