"""DICOM in and out (vbseg.io.dicom): series geometry and values, SUV, RTSTRUCT and SEG round trips,
bad input, and the command line.

Synthetic series are written here with pydicom from arrays with known geometry; the expected
voxel positions are computed in the tests from the tags written (Image Position / Orientation,
Pixel Spacing), not from the library's affine, so a row/column swap or an axis flip in the
reader or writer shows. The real sarcoma series in ../shared/data/dicom (see its README) are
checked against the NIfTI files of the same cases; those tests skip when the folder is absent.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pydicom
import pytest
from matplotlib.path import Path as PolygonPath
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

import vbseg
from tests.test_cli import main_cli
from vbseg.cli import main
from vbseg.errors import InputError
from vbseg.io.dicom import (
    list_series,
    load_dicom_volume,
    open_series,
    read_probability_seg,
    read_rtstruct_masks,
    rtstruct_roi_names,
    write_probability_seg,
    write_rtstruct,
)
from vbseg.io.dicom.outputs import (
    check_dicom_outputs,
    contour_record,
    contours_on_series,
    outside_warning,
    probability_on_series,
)
from vbseg.io.dicom.rtstruct import ContourPlacementWarning
from vbseg.io.dicom.series import check_series_requested, series_held
from vbseg.io.image import Volume
from vbseg.io.volume import load_volume
from vbseg.metrics import dice

SOP_CLASS = {"CT": "1.2.840.10008.5.1.4.1.1.2", "PT": "1.2.840.10008.5.1.4.1.1.128",
             "MR": "1.2.840.10008.5.1.4.1.1.4"}
SHAPE = (24, 17, 10)  # (Columns, Rows, slices): non-square on purpose
SPACING = (1.5, 2.0, 3.0)  # column spacing (along a row), row spacing, slice step (mm)


def _rotation(axis_angles) -> np.ndarray:
    total = np.eye(3)
    for axis, degrees in axis_angles:
        c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
        i, j = [a for a in range(3) if a != axis]
        turn = np.eye(3)
        turn[i, i], turn[i, j], turn[j, i], turn[j, j] = c, -s, s, c
        total = turn @ total
    return total


# name -> (direction along a row, direction down a column), in patient LPS
ORIENTATIONS = {
    "lps_axial": (np.array([1.0, 0, 0]), np.array([0, 1.0, 0])),
    "ras_axial": (np.array([-1.0, 0, 0]), np.array([0, -1.0, 0])),  # rows run to the right, anterior
    "oblique": tuple(_rotation([(2, 25.0), (0, -35.0)])[:, :2].T),
}


def _text(value: float) -> str:
    return f"{value:.6f}"


def write_series(folder: Path, values: np.ndarray, *, orientation="lps_axial", modality="CT",
                 slopes=None, series_uid=None, frame_uid=None, study_uid=None, number=1,
                 description="synthetic", origin=(-20.0, 35.0, -400.0), header=None) -> dict:
    """Write ``values`` (I, J, K) as a single-frame series, one file per slice, files named so
    that name order is not slice order. Returns the tags written: IPP per slice, r, c."""
    folder.mkdir(parents=True, exist_ok=True)
    along_row, along_column = (np.round(v, 6) for v in ORIENTATIONS[orientation])
    normal = np.cross(along_row, along_column)
    study_uid, frame_uid = study_uid or generate_uid(), frame_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    positions, uids = [], []
    for k in range(values.shape[2]):
        position = np.round(np.asarray(origin) + k * SPACING[2] * normal, 6)
        slope = 1.0 if slopes is None else slopes[k]
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = SOP_CLASS[modality]
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
        ds.Modality, ds.PatientName, ds.PatientID = modality, "Phantom^Synthetic", "P1"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.SeriesNumber, ds.SeriesDescription, ds.InstanceNumber = number, description, k + 1
        ds.ImagePositionPatient = [_text(v) for v in position]
        ds.ImageOrientationPatient = [_text(v) for v in (*along_row, *along_column)]
        ds.PixelSpacing = [_text(SPACING[1]), _text(SPACING[0])]  # (between rows, between columns)
        ds.SliceThickness = _text(SPACING[2])
        ds.Rows, ds.Columns = values.shape[1], values.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        if modality != "MR":
            ds.RescaleSlope, ds.RescaleIntercept = _text(slope), "0"
        ds.PixelData = np.rint(values[:, :, k].T / slope).astype(np.int16).tobytes()
        if header is not None:
            header(ds, k)
        ds.save_as(folder / f"im{(7 * k) % values.shape[2]:03d}_{number}.dcm", enforce_file_format=True)
        positions.append(position)
        uids.append(ds.SOPInstanceUID)
    return {"positions": np.asarray(positions), "along_row": along_row, "along_column": along_column,
            "sop_uids": uids, "series_uid": series_uid, "frame_uid": frame_uid}


def voxel_lps(tags: dict, i, j, k) -> np.ndarray:
    """Patient LPS position of voxel (i, j, k) straight from the written tags."""
    return (tags["positions"][k] + np.multiply.outer(i, SPACING[0] * tags["along_row"])
            + np.multiply.outer(j, SPACING[1] * tags["along_column"]))


def l_shape() -> np.ndarray:
    """An asymmetric mask (an L in every plane of 6 slices, >= 10 voxels across)."""
    mask = np.zeros(SHAPE, bool)
    mask[4:20, 3:7, 2:8] = True
    mask[4:9, 3:15, 2:8] = True
    mask[14:17, 10:13, 4:6] = True  # an island
    mask[6:8, 4:6, 3:5] = False  # and a hole
    return mask


def centre_of_mass(mask: np.ndarray) -> np.ndarray:
    return np.argwhere(mask).mean(axis=0)


# --- series geometry and values ------------------------------------------------------------


@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_synthetic_series_geometry_values_and_row_column_order(tmp_path, orientation):
    """The affine maps voxel (i, j, k) to the RAS+ position of column i, row j of the k-th
    slice along the normal, for axis-aligned (both senses) and oblique series; values follow
    the per-slice slope; data[i, j, k] is pixel (row j, column i)."""
    rng = np.random.default_rng(0)
    values = rng.integers(-500, 1500, SHAPE).astype(np.float64)
    slopes = [0.5 + 0.25 * k for k in range(SHAPE[2])]
    values = np.rint(values / np.asarray(slopes)) * np.asarray(slopes)
    tags = write_series(tmp_path / "ct", values, orientation=orientation, slopes=slopes)
    volume = load_dicom_volume(tmp_path / "ct")
    assert volume.shape == SHAPE and volume.modality == "ct"
    np.testing.assert_allclose(volume.data, values, atol=1e-4)
    ii, jj, kk = np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij")
    expected_ras = voxel_lps(tags, ii, jj, kk) * np.array([-1.0, -1.0, 1.0])
    index = np.stack([ii, jj, kk, np.ones_like(ii)], axis=-1).astype(float)
    actual_ras = (index @ volume.affine.T)[..., :3]
    assert np.abs(actual_ras - expected_ras).max() < 1e-3


def test_slices_sorted_along_the_normal_not_by_file_name(tmp_path):
    values = np.zeros(SHAPE)
    values[:, :, :] = np.arange(SHAPE[2])  # slice k holds k
    write_series(tmp_path / "s", values)
    volume = load_dicom_volume(tmp_path / "s")
    assert [float(volume.data[0, 0, k]) for k in range(SHAPE[2])] == list(range(SHAPE[2]))


# --- SUV -----------------------------------------------------------------------------------

DOSE_BQ, WEIGHT_KG, HALF_LIFE_S = 370e6, 70.0, 6586.2  # F-18


def _pet_header(units="BQML", decay="START", series_time="110000", acquisition_time="110000",
                weight=WEIGHT_KG, philips_factor=None):
    def header(ds, k):
        ds.Units, ds.DecayCorrection, ds.SUVType = units, decay, "BW"
        ds.CorrectedImage = ["ATTN", "DECY", "SCAT"]
        ds.SeriesDate = ds.AcquisitionDate = ds.StudyDate = "20240305"
        ds.SeriesTime, ds.AcquisitionTime = series_time, acquisition_time
        if weight is not None:
            ds.PatientWeight = _text(weight)
        drug = Dataset()
        drug.RadionuclideTotalDose = _text(DOSE_BQ)
        drug.RadionuclideHalfLife = _text(HALF_LIFE_S)
        drug.RadiopharmaceuticalStartTime = "100000"  # one hour before 11:00
        ds.RadiopharmaceuticalInformationSequence = [drug]
        if philips_factor is not None:
            block = ds.private_block(0x7053, "Philips PET Private Group", create=True)
            block.add_new(0x00, "DS", _text(philips_factor))
    return header


def _pet_activity() -> np.ndarray:
    """Activity concentration in Bq/mL: 5 kBq/mL background, a 20 kBq/mL block."""
    activity = np.full(SHAPE, 5000.0)
    activity[5:12, 4:9, 3:7] = 20000.0
    return activity


@pytest.mark.parametrize("decay, series_time, decay_time_s", [
    ("START", "110000", 3600.0),  # series time = scan start
    ("START", "123000", 3600.0),  # series made later (post-processing): earliest acquisition time
    ("ADMIN", "110000", 0.0),  # already decay corrected to the injection
])
def test_pet_bqml_to_suv_body_weight(tmp_path, decay, series_time, decay_time_s):
    """SUVbw = A W / (D 2^(-dt/T_half)) (QIBA). With D = 370 MBq, W = 70 kg, dt = 60 min and
    T_half = 6586.2 s: 70000 / (370e6 x 2^(-3600/6586.2)) = 70000 / (370e6 x 0.684633) =
    2.7634e-4 per Bq/mL; with dt = 0 (ADMIN) 1.8919e-4. Per-slice slopes quantise the
    activity by < 0.02 %, so the SUV must match within 0.5 %."""
    activity = _pet_activity()
    slopes = [1.0 + 0.25 * k for k in range(SHAPE[2])]
    write_series(tmp_path / "pet", activity, modality="PT", slopes=slopes,
                 header=_pet_header(decay=decay, series_time=series_time))
    volume = load_dicom_volume(tmp_path / "pet")
    factor = WEIGHT_KG * 1000.0 / (DOSE_BQ * 2.0 ** (-decay_time_s / HALF_LIFE_S))
    assert factor == pytest.approx(2.7634e-4 if decay == "START" else 1.8919e-4, rel=1e-4)
    np.testing.assert_allclose(volume.data, activity * factor, rtol=5e-3)
    record = volume.source["values"]
    assert record["units"] == "BQML" and record["factor"] == pytest.approx(factor, rel=1e-9)
    assert record["decay_time_s"] == pytest.approx(decay_time_s)
    if series_time == "123000":
        assert "Acquisition" in record["decay_time_reference"]


def test_pet_gml_is_kept_and_cnts_needs_the_philips_factor(tmp_path):
    suv = _pet_activity() / 5000.0
    write_series(tmp_path / "gml", suv, modality="PT", slopes=[1e-3] * SHAPE[2],
                 header=_pet_header(units="GML"))
    gml = load_dicom_volume(tmp_path / "gml")
    np.testing.assert_allclose(gml.data, suv, atol=1e-3)
    assert gml.source["values"]["factor"] == 1.0
    counts = _pet_activity()
    write_series(tmp_path / "philips", counts, modality="PT",
                 header=_pet_header(units="CNTS", philips_factor=2.5e-4))
    np.testing.assert_allclose(load_dicom_volume(tmp_path / "philips").data, counts * 2.5e-4, rtol=1e-5)
    write_series(tmp_path / "cnts", counts, modality="PT", header=_pet_header(units="CNTS"))
    with pytest.raises(InputError, match=r"cnts: .*CNTS.*7053,1000"):
        load_dicom_volume(tmp_path / "cnts")
    write_series(tmp_path / "noweight", counts, modality="PT", header=_pet_header(weight=None))
    with pytest.raises(InputError, match=r"noweight: .*weight.*PatientWeight"):
        load_dicom_volume(tmp_path / "noweight")


# --- bad input -----------------------------------------------------------------------------


def test_bad_folders_are_one_line_input_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "notes.dcm").write_text("not DICOM")
    cases = {"missing": "not found", "empty": "holds no files", "text": "holds no DICOM files"}
    for name, problem in cases.items():
        with pytest.raises(InputError) as error:
            load_volume(tmp_path / name, "ct")
        message = str(error.value)
        assert message.startswith(f"{tmp_path / name}: ") and problem in message, message
        assert "\n" not in message
    values = np.ones(SHAPE)
    values[0, 0, 0] = 2
    write_series(tmp_path / "gap", values)
    (tmp_path / "gap" / f"im{(7 * 4) % SHAPE[2]:03d}_1.dcm").unlink()  # slice 4 of 10
    with pytest.raises(InputError, match=r"gap: slices are not evenly spaced: 6.000 mm"):
        load_volume(tmp_path / "gap", "ct")
    first = write_series(tmp_path / "mixed", values, number=1)
    write_series(tmp_path / "mixed", values, number=2, orientation="oblique",
                 series_uid=first["series_uid"])
    with pytest.raises(InputError, match="mixed: slices differ in orientation"):
        load_volume(tmp_path / "mixed", "ct")
    write_series(tmp_path / "ct", values)
    with pytest.raises(InputError, match="ct: the DICOM header says Modality CT, not pet"):
        load_volume(tmp_path / "ct", "pet")
    with pytest.raises(InputError, match="is not a folder"):
        load_dicom_volume(tmp_path / "text" / "notes.dcm")
    one_slice = sorted((tmp_path / "ct").iterdir())[0]
    with pytest.raises(InputError, match=f"{one_slice}: is a single DICOM file; give the folder"):
        load_volume(one_slice, "ct")


def test_two_series_in_one_folder_are_listed_and_series_uid_picks_one(tmp_path):
    values = np.ones(SHAPE)
    values[1, 2, 3] = 5
    first = write_series(tmp_path / "both", values, number=3, description="CT soft tissue")
    second = write_series(tmp_path / "both", values[:, :, :6] * 2, number=4, description="CT lung")
    with pytest.raises(InputError) as error:
        load_volume(tmp_path / "both", "ct")
    message = str(error.value)
    for tags, text in ((first, "series 3 'CT soft tissue'"), (second, "series 4 'CT lung'")):
        assert text in message and tags["series_uid"] in message
    assert "--series" in message
    assert len(list_series(tmp_path / "both")) == 2
    picked = load_volume(tmp_path / "both", "ct", series_uid=second["series_uid"])
    assert picked.shape == (SHAPE[0], SHAPE[1], 6) and picked.data.max() == 10


def test_a_series_uid_no_input_holds_is_refused_before_any_work(tmp_path, capsys):
    """A folder with one series is read whatever --series says (the UIDs may be for other
    folders), so a UID that no DICOM input holds is refused: one line naming --series, the
    UID and what the folders hold, exit 2, nothing written. A UID for the --rtstruct reference
    alone is accepted there."""
    values = np.ones(SHAPE)
    values[1, 2, 3] = 5
    tags = write_series(tmp_path / "ct", values, description="CT soft tissue")
    with pytest.raises(InputError) as error:
        check_series_requested([tmp_path / "ct"], ["1.2.3.4", tags["series_uid"]])
    message = str(error.value)
    assert message.startswith("--series: 1.2.3.4: no such series") and tags["series_uid"] in message
    check_series_requested([tmp_path / "ct"], tags["series_uid"])  # held: no error
    reference = write_series(tmp_path / "reference", values, number=7, frame_uid=tags["frame_uid"])
    assert series_held([tmp_path / "ct"], reference["series_uid"]) == set()
    check_dicom_outputs([str(tmp_path / "ct")], tmp_path / "out",
                        rtstruct_reference=str(tmp_path / "reference"), series_uid=reference["series_uid"])
    out = tmp_path / "out"
    assert main(["segment", str(tmp_path / "ct"), "--series", "1.2.3.4", "--box", "2:20,2:15,2:8",
                 "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("vbseg: error: --series: 1.2.3.4: no such series") and error.count("\n") == 1
    assert not out.exists()
    # convert: a missing RTSTRUCT is named first; with one, the unknown UID (its own option name)
    assert main(["convert", str(tmp_path / "x.dcm"), str(tmp_path / "ct"), "--series-uid", "9.9",
                 "--out", str(out)]) == 2
    assert f"{tmp_path / 'x.dcm'}" in capsys.readouterr().err and not out.exists()
    mask = np.zeros(SHAPE, bool)
    mask[3:9, 3:9, 2:6] = True
    write_rtstruct(tmp_path / "rs.dcm", open_series(tmp_path / "ct"), [("lesion", mask)])
    assert main(["convert", str(tmp_path / "rs.dcm"), str(tmp_path / "ct"), "--series-uid", "9.9",
                 "--out", str(out)]) == 2
    assert "--series-uid: 9.9: no such series" in capsys.readouterr().err and not out.exists()
    # a mistyped folder is named as such, not as a series the inputs lack
    assert main(["segment", str(tmp_path / "cct"), "--series", "1.2.3.4", "--out", str(out)]) == 2
    assert f"{tmp_path / 'cct'}: file not found" in capsys.readouterr().err and not out.exists()


def _grid_posterior(probability, affine):
    """What the DICOM export reads of a posterior: its probability and its grid."""
    grid = Volume(np.asarray(probability, np.float32), affine, "pet", "pet.nii.gz")
    return SimpleNamespace(probability=grid.data, reference=grid, summary={"model": "potts"})


def _grid(shape, spacing, origin, path="ct"):
    affine = np.diag(list(spacing) + [1.0])
    affine[:3, 3] = origin
    return SimpleNamespace(shape=shape, affine=affine, path=path, frame_of_reference_uid=None,
                           first={"SeriesInstanceUID": "1.2"})


def test_contours_exported_onto_other_grids_keep_their_volumes_and_what_is_outside_is_recorded():
    """A 4 mm map of three nested blocks (P = 0.95 / 0.5 / 0.2; 8, 16 and 24 mm). Onto an
    aligned 1 mm grid that covers only part of it (nearest), each contour is exactly the part
    of it inside that grid's field of view, which contour_record gives. Onto a grid finer in
    plane and with 6 mm slices (each voxel in when at least half of it is, 1 x 1 x 3 samples)
    a block's volume is off by at most one slice's worth (a 16 mm block spans 2 2/3 slices) and
    the contours stay nested. The warning fires above OUTSIDE_REFERENCE_LIMIT and names the
    worst level; the same grid leaves the contours as they are."""
    probability = np.zeros((10, 10, 10))
    probability[2:8, 2:8, 2:8] = 0.2
    probability[3:7, 3:7, 3:7] = 0.5
    probability[4:6, 4:6, 4:6] = 0.95
    posterior = _grid_posterior(probability, np.diag([4.0, 4.0, 4.0, 1.0]))
    fine = _grid((40, 40, 24), (1.0, 1.0, 1.0), (-1.5, -1.5, 14.5))  # coarse z 4-9 only
    masks, how = contours_on_series(posterior, fine, (10, 50, 90))
    assert how.startswith("nearest") and list(masks) == [10.0, 50.0, 90.0]
    rows = contour_record(posterior, fine, masks)
    for row, level in zip(rows, (0.1, 0.5, 0.9)):
        contour = probability >= level
        assert row["contour_ml"] == pytest.approx(contour.sum() * 0.064)
        assert row["outside_ml"] == pytest.approx(contour[:, :, :4].sum() * 0.064)
        assert row["drawn_ml"] == pytest.approx(row["contour_ml"] - row["outside_ml"])
    warnings = outside_warning(rows, fine, "contours_rtstruct.dcm")
    assert [w["code"] for w in warnings] == ["contour-outside-reference"]
    assert "33% of the 10 % contour" in warnings[0]["message"]  # 2 of the 6 slabs of the 0.2 block
    mixed = _grid((40, 40, 8), (1.0, 1.0, 6.0), (-1.5, -1.5, -1.0))  # covers it all
    masks, how = contours_on_series(posterior, mixed, (10, 50, 90))
    assert how.startswith("each voxel in a contour when at least half of it is") and "1x1x3 samples" in how
    rows = contour_record(posterior, mixed, masks)
    for row, side_mm in zip(rows, (24.0, 16.0, 8.0)):
        assert row["outside_ml"] == 0
        assert abs(row["drawn_ml"] - row["contour_ml"]) <= side_mm**2 * 6.0 / 1000 + 1e-9
    assert rows[0]["drawn_ml"] == pytest.approx(rows[0]["contour_ml"])  # 24 mm: whole slices
    assert np.all(masks[90.0] <= masks[50.0]) and np.all(masks[50.0] <= masks[10.0]) and masks[90.0].any()
    assert outside_warning(rows, mixed, "x.dcm") == []
    same = _grid((10, 10, 10), (4.0, 4.0, 4.0), (0.0, 0.0, 0.0), "pet")
    masks, how = contours_on_series(posterior, same, (50,))
    assert how is None and np.array_equal(masks[50.0], probability >= 0.5)
    on_same, resampled = probability_on_series(posterior, same)
    assert not resampled and np.array_equal(on_same, posterior.probability)


# --- RTSTRUCT and SEG ----------------------------------------------------------------------


@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_mask_rtstruct_mask_round_trip_keeps_shape_and_place(tmp_path, orientation):
    """mask -> RTSTRUCT -> mask: Dice >= 0.97 (it is exact) and the same centre of mass; and the
    contour points, placed by the written tags alone (independent point-in-polygon), enclose
    exactly the mask's voxel centres on the slice each contour references."""
    tags = write_series(tmp_path / "ct", np.zeros(SHAPE) + np.arange(SHAPE[0])[:, None, None],
                        orientation=orientation)
    series = open_series(tmp_path / "ct")
    mask = l_shape()
    write_rtstruct(tmp_path / "rs.dcm", series, [("L shape", mask), ("empty", np.zeros(SHAPE, bool))])
    assert rtstruct_roi_names(tmp_path / "rs.dcm") == ["L shape", "empty"]
    back = read_rtstruct_masks(tmp_path / "rs.dcm", series)
    assert dice(back["L shape"], mask) >= 0.97 and not back["empty"].any()
    np.testing.assert_allclose(centre_of_mass(back["L shape"]), centre_of_mass(mask), atol=0.05)

    structure = pydicom.dcmread(tmp_path / "rs.dcm")
    slice_of = {uid: k for k, uid in enumerate(tags["sop_uids"])}
    rebuilt = np.zeros(SHAPE, bool)
    centres = np.stack(np.meshgrid(np.arange(SHAPE[0]), np.arange(SHAPE[1]), indexing="ij"), -1)
    for contour in structure.ROIContourSequence[0].ContourSequence:
        points = np.asarray(contour.ContourData, float).reshape(-1, 3)
        k = slice_of[contour.ContourImageSequence[0].ReferencedSOPInstanceUID]
        offset = points - tags["positions"][k]
        normal = np.cross(tags["along_row"], tags["along_column"])
        assert np.abs(offset @ normal).max() < 1e-3  # in the plane of the slice it references
        uv = np.column_stack([offset @ tags["along_row"] / SPACING[0],
                              offset @ tags["along_column"] / SPACING[1]])
        inside = PolygonPath(uv).contains_points(centres.reshape(-1, 2)).reshape(SHAPE[:2])
        rebuilt[:, :, k] ^= inside
    assert np.array_equal(rebuilt, mask)


def test_rtstruct_references_checked_and_stale_slice_references_warn(tmp_path):
    write_series(tmp_path / "a", np.zeros(SHAPE) + 1, study_uid="1.2.3.4")
    series = open_series(tmp_path / "a")
    mask = l_shape()
    write_rtstruct(tmp_path / "rs.dcm", series, [("L", mask)])
    # stale per-slice references (a cropped series): placed by position, with a warning
    stale = pydicom.dcmread(tmp_path / "rs.dcm")
    for contour in stale.ROIContourSequence[0].ContourSequence:
        contour.ContourImageSequence[0].ReferencedSOPInstanceUID = generate_uid()
    stale.save_as(tmp_path / "stale.dcm")
    with pytest.warns(ContourPlacementWarning, match="placed on the nearest slice by position"):
        assert np.array_equal(read_rtstruct_masks(tmp_path / "stale.dcm", series)["L"], mask)
    # another series in the same frame of reference: refused
    other = pydicom.dcmread(tmp_path / "rs.dcm")
    other.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0] \
        .RTReferencedSeriesSequence[0].SeriesInstanceUID = generate_uid()
    other.save_as(tmp_path / "other_series.dcm")
    with pytest.raises(InputError, match=r"other_series.dcm: RTSTRUCT references series"):
        read_rtstruct_masks(tmp_path / "other_series.dcm", series)
    # images in another frame of reference: refused
    write_series(tmp_path / "b", np.zeros(SHAPE) + 1)
    with pytest.raises(InputError, match=r"rs.dcm: ROI 'L' is in frame of reference"):
        read_rtstruct_masks(tmp_path / "rs.dcm", open_series(tmp_path / "b"))
    with pytest.raises(InputError, match="no ROI named 'GTV'"):
        read_rtstruct_masks(tmp_path / "rs.dcm", series, ["GTV"])
    with pytest.raises(InputError, match="is not an RTSTRUCT"):
        read_rtstruct_masks(next((tmp_path / "a").iterdir()), series)


def test_probability_seg_round_trip_within_8_bit_quantisation(tmp_path):
    write_series(tmp_path / "ct", np.zeros(SHAPE) + 1, orientation="oblique")
    series = open_series(tmp_path / "ct")
    rng = np.random.default_rng(1)
    probability = rng.random(SHAPE) * (rng.random(SHAPE) < 0.5)
    probability[:, :, 0] = 0.0  # an empty slice: its frame is omitted and reads back as 0
    probability[3, 4, 5], probability[5, 3, 4] = 1.0, 0.5  # asymmetric, exact values
    write_probability_seg(tmp_path / "seg.dcm", series, probability)
    seg = pydicom.dcmread(tmp_path / "seg.dcm")
    assert seg.SegmentationType == "FRACTIONAL" and seg.SegmentationFractionalType == "PROBABILITY"
    assert seg.MaximumFractionalValue == 255
    back = read_probability_seg(tmp_path / "seg.dcm", series)
    assert back.shape == SHAPE
    assert np.abs(back - probability).max() <= 0.5 / 255 + 1e-6  # round(255 p) / 255
    assert back[3, 4, 5] == 1.0 and back[5, 3, 4] == pytest.approx(128 / 255)


# --- real DICOM (../shared/data/dicom) -----------------------------------------------------


@pytest.fixture(scope="module")
def dicom_data(shared_data_optional) -> Path:
    folder = shared_data_optional / "dicom" if shared_data_optional is not None else None
    if folder is None or not (folder / "sts001" / "pet").is_dir():
        pytest.skip("real DICOM series not found at ../shared/data/dicom (see its README)")
    return folder


def _corners(shape):
    return np.array([[i, j, k, 1.0] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1)
                     for k in (0, shape[2] - 1)])


@pytest.mark.parametrize("case", ["sts001", "sts003"])
@pytest.mark.parametrize("modality", ["pet", "ct"])
def test_real_series_match_the_nifti_of_the_same_case(dicom_data, case, modality):
    volume = load_volume(dicom_data / case / modality, modality)
    nifti = nib.load(dicom_data.parent / f"{case}_{modality}.nii.gz")
    assert volume.shape == nifti.shape
    corners = _corners(volume.shape)
    assert np.abs(corners @ volume.affine.T - corners @ nifti.affine.T)[:, :3].max() < 0.5
    reference = np.asarray(nifti.dataobj, np.float32)
    if modality == "pet":
        # Units GML: already SUV, not converted again (that would scale by ~2e-4)
        assert volume.source["values"]["units"] == "GML"
        assert volume.source["values"]["factor"] == 1.0
        np.testing.assert_allclose(volume.data, reference, rtol=0.01, atol=1e-4)
    else:
        assert np.array_equal(volume.data, reference)


@pytest.mark.parametrize("case", ["sts001", "sts003"])
def test_real_rtstruct_gtv_on_the_pet_grid_matches_the_nifti_label(dicom_data, case):
    series = open_series(dicom_data / case / "pet")
    with pytest.warns(ContourPlacementWarning, match="stale"):
        masks = read_rtstruct_masks(dicom_data / case / "rtstruct" / "RS_PET.dcm", series)
    label = np.asarray(nib.load(dicom_data.parent / f"{case}_pet_label.nii.gz").dataobj) > 0
    assert dice(masks["GTV_Mass_PET"], label) >= 0.95


def test_real_pet_in_bqml_converts_back_to_the_suv(dicom_data, tmp_path):
    """sts003 rewritten as Bq/mL with the decayed-dose factor of its own header (README: 3.2630e-4,
    injection 10:21:00 to series start 11:21:48 = 3648 s): the reader gives the SUV back."""
    factor = 80.0 * 1000 / (359884960 * 2.0 ** (-3648 / 6588.0))
    for file in sorted((dicom_data / "sts003" / "pet").iterdir()):
        ds = pydicom.dcmread(file)
        ds.Units, ds.DecayCorrection = "BQML", "START"
        ds.RescaleSlope = f"{float(ds.RescaleSlope) / factor:.10g}"
        ds.save_as(tmp_path / file.name)
    volume = load_volume(tmp_path, "pet")
    assert volume.source["values"]["decay_time_s"] == pytest.approx(3648.0)
    assert volume.source["values"]["factor"] == pytest.approx(3.2630e-4, rel=1e-4)
    nifti = np.asarray(nib.load(dicom_data.parent / "sts003_pet.nii.gz").dataobj, np.float32)
    np.testing.assert_allclose(volume.data, nifti, rtol=0.01, atol=1e-4)


def test_cli_segment_writes_rtstruct_and_seg_and_convert_writes_the_label(dicom_data, tmp_path):
    """One small segmentation of the real sts001 PET (in-process, 24 x 24 x 32 box around the
    GTV): contours_rtstruct.dcm read back equals the contour_<L>.nii.gz masks, prob_seg.dcm the
    probability map within 1/510; then ``vbseg convert`` gives the NIfTI label back."""
    pet = dicom_data / "sts001" / "pet"
    out = tmp_path / "seg"
    status = main(["segment", str(pet), "--out", str(out), "--box", "8:32,8:32,10:42",
                   "--rtstruct", str(pet), "--dicom-seg", "--volume-draws", "200"])
    assert status == 0
    series = open_series(pet)
    contours = read_rtstruct_masks(out / "contours_rtstruct.dcm", series)
    assert sorted(contours) == ["vbseg p>=0.1", "vbseg p>=0.5", "vbseg p>=0.9"]
    for level in (10, 50, 90):
        nifti_mask = np.asarray(nib.load(out / f"contour_{level}.nii.gz").dataobj) > 0
        assert nifti_mask.any() and np.array_equal(contours[f"vbseg p>={level / 100:g}"], nifti_mask)
    probability = np.asarray(nib.load(out / "prob.nii.gz").dataobj)
    seg = read_probability_seg(out / "prob_seg.dcm", series)
    assert np.abs(seg - probability).max() <= 0.5 / 255 + 1e-6

    converted = tmp_path / "converted"
    with pytest.warns(ContourPlacementWarning):
        status = main(["convert", str(dicom_data / "sts001" / "rtstruct" / "RS_PET.dcm"), str(pet),
                       "--out", str(converted)])
    assert status == 0
    label = np.asarray(nib.load(dicom_data.parent / "sts001_pet_label.nii.gz").dataobj) > 0
    mask = nib.load(converted / "mask_GTV_Mass_PET.nii.gz")
    assert np.array_equal(np.asarray(mask.dataobj) > 0, label)
    assert np.allclose(mask.affine, nib.load(dicom_data.parent / "sts001_pet_label.nii.gz").affine,
                       atol=1e-3)
    image = np.asarray(nib.load(converted / "image.nii.gz").dataobj)
    np.testing.assert_allclose(image, np.asarray(nib.load(dicom_data.parent / "sts001_pet.nii.gz")
                                                 .dataobj), atol=1e-4)


def test_pet_contours_exported_onto_the_planning_ct_are_recorded_and_keep_their_volumes(dicom_data, tmp_path):
    """sts003's PET segmented and exported onto its CT, whose crop does not hold all of the
    PET's: --series naming the CT (the --rtstruct reference) alone is accepted; summary.json's
    dicom_exports says how the contours were resampled and, per level, what the RTSTRUCT holds,
    which is what reading it back gives and within 5 % of the contour's part inside the CT;
    contour-outside-reference is in summary.json and on stderr. Through the API, a UID that no
    image holds is refused after loading and leaves no output folder."""
    pet, ct = dicom_data / "sts003" / "pet", dicom_data / "sts003" / "ct"
    ct_uid = list_series(ct)[0].series_instance_uid
    out = tmp_path / "on_ct"
    result = main_cli("segment", pet, "--rtstruct", ct, "--series", ct_uid, "--out", out)
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    record = summary["dicom_exports"][0]
    assert record["file"] == "contours_rtstruct.dcm" and record["resampling"].startswith("nearest")
    assert record["series_instance_uid"] == ct_uid
    assert "contour-outside-reference" in [w["code"] for w in summary["warnings"]]
    assert "contour-outside-reference" in result.stderr
    series = open_series(ct)
    series_voxel_ml = abs(np.linalg.det(series.affine[:3, :3])) / 1000
    read_back = read_rtstruct_masks(out / "contours_rtstruct.dcm", series)
    for row in record["contours"]:
        drawn = read_back[f"vbseg p>={row['level_percent'] / 100:g}"].sum() * series_voxel_ml
        assert drawn == pytest.approx(row["drawn_ml"], rel=0.02)
        assert row["outside_ml"] > 0.01 * row["contour_ml"]
        assert row["drawn_ml"] == pytest.approx(row["contour_ml"] - row["outside_ml"], rel=0.05)
    with pytest.raises(InputError, match="--series: 1.2.3.4: no such series"):
        vbseg.segment([pet], tmp_path / "api", series_uid="1.2.3.4")
    assert not (tmp_path / "api").exists()


def test_cli_dicom_errors_are_one_line(tmp_path, capsys):
    values = np.ones(SHAPE)
    values[1, 1, 1] = 3
    write_series(tmp_path / "both", values, number=1)
    write_series(tmp_path / "both", values, number=2)
    assert main(["segment", str(tmp_path / "both"), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"vbseg: error: {tmp_path / 'both'}: holds 2 image series")
    assert error.count("\n") == 1
    nifti = tmp_path / "x.nii.gz"
    assert main(["segment", str(nifti), "--out", str(tmp_path / "out"), "--dicom-seg"]) == 2
    assert "--dicom-seg: needs a DICOM series" in capsys.readouterr().err


def test_missing_pydicom_is_reported_with_the_install_command(tmp_path, monkeypatch):
    import vbseg.io.dicom._deps as deps

    real = deps.importlib.import_module

    def without_pydicom(name, *args):
        if name.split(".")[0] == "pydicom":
            raise ImportError(name)
        return real(name, *args)

    monkeypatch.setattr(deps.importlib, "import_module", without_pydicom)
    (tmp_path / "s").mkdir()
    with pytest.raises(InputError, match=r"pip install 'vbseg\[dicom\]'"):
        load_volume(tmp_path / "s", "pet")
