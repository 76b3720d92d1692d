"""PET read-outs (vbseg.readouts) against exact answers; the overview figure's contents."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vbseg.io.volume import Volume
from vbseg.posterior import DisplayImage, Posterior
from vbseg.readouts import contour_readouts, sphere_kernel, suv_peak, suvmean_draws

SPACING = np.array([4.0, 4.0, 4.0])
VOXEL_ML = 0.064


def test_sphere_kernel_counts_voxel_centres_within_6_2_mm():
    """At 4 mm: the centre, 6 faces (4 mm) and 12 edges (5.66 mm); corners (6.93 mm) are out.
    At 2 x 2 x 4 mm: 29 centres with i^2 + j^2 <= 9 in the central plane, 21 with
    i^2 + j^2 <= 5 in each plane at +-4 mm: 71."""
    kernel = sphere_kernel(SPACING)
    assert kernel.shape == (3, 3, 3) and np.count_nonzero(kernel) == 19
    assert kernel.sum() == pytest.approx(1.0) and kernel[0, 0, 0] == 0
    anisotropic = sphere_kernel([2.0, 2.0, 4.0])
    assert anisotropic.shape == (7, 7, 3) and np.count_nonzero(anisotropic) == 71


def test_uniform_block_reads_its_own_uptake():
    image = np.zeros((16, 16, 16), np.float32)
    image[4:12, 4:12, 4:12] = 5.0
    contour = image > 0
    record = contour_readouts(image, contour, SPACING, VOXEL_ML)
    for key in ("suvmax", "suvpeak", "suvmean"):
        assert record[key] == pytest.approx(5.0)
    assert record["voxels"] == 512
    assert record["mtv_ml"] == pytest.approx(512 * VOXEL_ML)
    assert record["tlg"] == pytest.approx(record["suvmean"] * record["mtv_ml"])


def test_suvpeak_of_a_hot_voxel_with_known_neighbours():
    """Hot voxel 10, its 6 face neighbours 2, the rest 0, at 4 mm: the sphere on the hot voxel
    holds 10 + 6 x 2 over 19 voxels = 22/19; on a face neighbour it holds 10 + 2 + 4 x 2 = 20
    over 19 (the four other face neighbours are its edge neighbours), lower."""
    image = np.zeros((9, 9, 9), np.float32)
    image[4, 4, 4] = 10.0
    for axis in range(3):
        for step in (-1, 1):
            index = [4, 4, 4]
            index[axis] += step
            image[tuple(index)] = 2.0
    contour = image > 0
    assert suv_peak(image, contour, SPACING) == pytest.approx(22.0 / 19.0)
    record = contour_readouts(image, contour, SPACING, VOXEL_ML)
    assert record["suvmax"] == pytest.approx(10.0)
    assert record["suvmean"] == pytest.approx(22.0 / 7.0)
    # the peak sphere may reach outside the contour: centred on the hot voxel alone
    assert suv_peak(image, image == 10.0, SPACING) == pytest.approx(22.0 / 19.0)
    # the image edge: sphere voxels outside the image are left out of the mean
    corner = np.zeros((4, 4, 4), np.float32)
    corner[0, 0, 0] = 8.0
    assert suv_peak(corner, corner > 0, SPACING) == pytest.approx(8.0 / 7.0)  # centre, 3 faces, 3 edges


def test_empty_contour_and_suvmean_draws():
    record = contour_readouts(np.ones((4, 4, 4)), np.zeros((4, 4, 4), bool), SPACING, VOXEL_ML)
    assert record["suvmax"] is None and record["mtv_ml"] == 0.0 and record["tlg"] == 0.0
    np.testing.assert_allclose(suvmean_draws([2.0, 0.0, 4.0], [6.0, 0.0, 10.0]), [3.0, 2.5])


def _posterior(reference_mask=None, images=()):
    """Two blobs: a 4x4x4 lesion of SUV 6 (P = 0.95) and one voxel of SUV 9 (P = 0.6)."""
    image = np.ones((12, 12, 12), np.float32)
    probability = np.zeros(image.shape, np.float32)
    image[3:7, 3:7, 3:7] = 6.0
    probability[3:7, 3:7, 3:7] = 0.95
    image[10, 10, 10], probability[10, 10, 10] = 9.0, 0.6
    volume = np.array([4.096, 4.16, 0.0, 4.096])
    tlg = np.array([24.576, 25.2, 0.0, 24.576])
    return Posterior(probability=probability, reference=Volume(image, np.diag([4.0, 4.0, 4.0, 1.0]), "pet"),
                     voi=np.ones(image.shape, bool), volume_draws_ml=volume, volume_method="test",
                     tlg_draws=tlg, summary={"model": "potts"}, images=images,
                     reference_mask=reference_mask, reference_mask_path=None)


def test_posterior_pet_readouts_per_level_and_posterior():
    readouts = _posterior().pet_readouts((50, 90))
    at50, at90 = readouts["levels"]["50"], readouts["levels"]["90"]
    assert at50["voxels"] == 65 and at50["regions"] == 2 and at50["suvmax"] == pytest.approx(9.0)
    assert at50["mtv_ml"] == pytest.approx(65 * VOXEL_ML)
    assert at50["tlg"] == pytest.approx(at50["suvmean"] * at50["mtv_ml"])
    lesion = at50["largest_region"]
    assert lesion["voxels"] == 64
    assert lesion["suvmax"] == pytest.approx(6.0) and lesion["suvmean"] == pytest.approx(6.0)
    assert at90["voxels"] == 64 and at90["regions"] == 1
    posterior = readouts["posterior"]
    assert posterior["suvmean"]["mean"] == pytest.approx(np.mean([6.0, 25.2 / 4.16, 6.0]))
    assert posterior["mtv_ml"]["mean"] == pytest.approx(np.mean([4.096, 4.16, 0.0, 4.096]))
    assert readouts["units"]["tlg"] == "SUV mL" and "6.2 mm" in readouts["suvpeak_definition"]
    ct = Posterior(**{**_posterior().__dict__, "reference": Volume(np.ones((12, 12, 12), np.float32),
                                                                    np.eye(4), "ct")})
    assert ct.pet_readouts() == {}


def test_overview_has_a_panel_per_image_colour_bars_legend_and_title():
    truth = np.zeros((12, 12, 12), bool)
    truth[3:8, 3:7, 3:7] = True
    ct_crop = np.full((8, 8, 8), 40.0, np.float32)
    ct_crop[0] = np.nan  # not observed
    pet = _posterior().reference.data
    images = (DisplayImage("pet.nii.gz", "pet", pet),
              DisplayImage("ct.nii.gz", "ct", ct_crop, (slice(2, 10),) * 3))
    posterior = _posterior(reference_mask=truth, images=images)
    record = {"pet_readouts": posterior.pet_readouts(), "reference_mask": posterior.reference_comparison()}
    assert record["reference_mask"]["dice_50"] == pytest.approx(2 * 64 / (65 + 80))

    from vbseg.overview import draw_overview

    figure = draw_overview(posterior, (10, 50, 90), title="case 7", record=record)
    bars = [ax for ax in figure.axes if ax.get_label() == "<colorbar>"]
    panels = [ax for ax in figure.axes if ax not in bars]
    assert len(panels) == 9  # (PET, CT, P(tumour)) x (axial, coronal, sagittal)
    assert sorted(bar.get_xlabel() for bar in bars) == ["HU", "P(tumour)", "SUV"]
    assert [text.get_text() for text in figure.legends[0].get_texts()] == [
        "P(tumour) >= 10%", "P(tumour) >= 50%", "P(tumour) >= 90%", "reference (Dice 50%: 0.883)"]
    title = figure._suptitle.get_text()
    assert "case 7" in title and "potts" in title and "mL" in title and "Dice" in title
    assert "largest of the 2 regions" in title
    pet_bar = next(bar for bar in bars if bar.get_xlabel() == "SUV")
    assert pet_bar._colorbar.mappable.get_clim() == pytest.approx((0.0, 6.0))  # 0 to the lesion's max
    import matplotlib.pyplot as plt

    plt.close(figure)


def test_segment_records_readouts_and_reference_dice(tmp_path):
    import vbseg
    from vbseg.metrics import dice

    phantom = vbseg.make_phantom(vbseg.PhantomSpec(diameters_mm=(16.0,), spacing_mm=(4.0, 4.0, 4.0)),
                                 seed=0)
    paths = phantom.save(tmp_path / "in")
    posterior = vbseg.segment([paths["pet"], paths["ct"]], tmp_path / "out", modalities=["pet", "ct"],
                              reference_mask=paths["truth"], volume_draws=100)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert set(summary["pet_readouts"]["levels"]) == {"10", "50", "90"}
    assert summary["reference_mask"]["dice_50"] == pytest.approx(
        dice(posterior.contour(0.5), phantom.truth))
    assert [image.name for image in posterior.images] == ["pet.nii.gz", "ct.nii.gz"]
