"""Population priors (vbseg.cohort.model, vbseg.cohort.empirical_bayes, vbseg.cohort.population):
recovery of known hyperparameters from a synthetic cohort, the weak single-case prior, the
CASES.json and modality checks, JSON round trip, and the CLI wiring."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import vbseg
from vbseg.cli import main
from vbseg.cohort.empirical_bayes import WEAK_SPREAD_SD
from vbseg.cohort.model import PopulationPrior, load_prior
from vbseg.cohort.population import fit_population_prior, load_training_case, tumour_probability
from vbseg.errors import InputError
from vbseg.io.cases import read_cases
from vbseg.metrics import dice
from vbseg.phantoms import COHORT_MEANS, COHORT_NOISE_SD, COHORT_SPREAD_SD, make_cohort

MODALITIES = ["pet", "ct", "mr"]
NUM_CASES = 10


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cohort")
    index = make_cohort(folder, NUM_CASES, seed=1)
    training = [load_training_case(c) for c in read_cases(index, MODALITIES)]
    return index, training


@pytest.fixture(scope="module")
def population(cohort):
    _, training = cohort
    return fit_population_prior(training, MODALITIES, num_tumour=2, num_background=2, calibrate=False)


def test_population_fit_recovers_known_hyperparameters(population):
    # classes in population order: rim (hotter), core, fat (lower CT), muscle = COHORT_MEANS rows.
    # Population means: the mean of 10 draws has sd 0.2 / sqrt(10) = 0.063; allow 3.5 sd.
    assert np.max(np.abs(population.mean - COHORT_MEANS)) < 3.5 * COHORT_SPREAD_SD / np.sqrt(NUM_CASES)
    # between-patient sd: a 10-case estimate (x sqrt(1 + 1/n)) within a factor of 2
    ratio = np.sqrt(population.spread_var) / COHORT_SPREAD_SD
    assert np.all((ratio > 0.5) & (ratio < 2.0)), ratio
    # within-patient noise: pooled over ~4800 voxels a case, within 10 %
    np.testing.assert_allclose(np.sqrt(population.noise_var), COHORT_NOISE_SD, rtol=0.1)
    assert population.cases == [f"syn{i:02d}" for i in range(NUM_CASES)]
    assert 0.0 < population.beta <= 3.0


def test_prior_contours_a_new_case(cohort, population):
    _, training = cohort
    case = training[0]
    probability, record = tumour_probability(population, case.features, case.observed, case.roi,
                                             case.spacing)
    assert dice(probability >= 0.5, case.tumour) > 0.95 and record["converged"]


def test_interaction_matrix_prior_contours_a_held_out_case_and_round_trips(tmp_path, cohort):
    from vbseg.potts.beta import interaction_contrasts

    _, training = cohort
    prior = fit_population_prior(training[1:], MODALITIES, num_tumour=2, num_background=2,
                                 calibrate=False, interaction=True)
    J = prior.interaction
    assert J.shape == (4, 4)
    np.testing.assert_allclose(J, J.T)
    # classes rim, core, fat, muscle: the core sits inside the rim and never touches fat or
    # muscle, which the rim does: a core-fat neighbour pair must be less compatible than a
    # rim-fat one (gauge-free contrasts, vbseg.potts.beta.interaction_contrasts)
    C = interaction_contrasts(J)
    rim, core, fat, muscle = range(4)
    assert C[core, fat] < C[rim, fat] and C[core, muscle] < C[rim, muscle], C
    case = training[0]  # not among the prior's training cases
    probability, record = tumour_probability(prior, case.features, case.observed, case.roi, case.spacing)
    assert dice(probability >= 0.5, case.tumour) > 0.95 and record["converged"]
    path = tmp_path / "prior.json"
    prior.save(path)
    np.testing.assert_array_equal(load_prior(path).interaction, J)
    record = json.loads(path.read_text())
    record["interaction"][0][1] += 1.0
    path.write_text(json.dumps(record))
    with pytest.raises(InputError, match="symmetric"):
        load_prior(path)


def test_single_training_case_gives_a_weak_prior_and_the_per_scan_fit(cohort):
    index, training = cohort
    weak = fit_population_prior(training[:1], MODALITIES, num_tumour=2, num_background=2)
    np.testing.assert_allclose(weak.spread_var, WEAK_SPREAD_SD**2)
    assert weak.volume_calibration is None  # fewer than three cases: no volume calibration
    prior = weak.normal_gamma_prior()
    assert np.all(np.asarray(prior.kappa) <= 0.01)  # worth at most 1 % of one voxel
    # the new case's class means come from its own data, not from the training case
    case = training[1]
    _, record = tumour_probability(weak, case.features, case.observed, case.roi, case.spacing)
    own = np.asarray(json.loads(index.read_text())[1]["class_means_features"])
    fitted = np.asarray(record["class_means_features"])
    assert np.max(np.abs(fitted - own)) < 0.1
    # and its contour agrees with the unsupervised model's (K = 4, tumour = hottest class)
    images = [str(index.parent / f"syn01_{m}.nii.gz") for m in MODALITIES]
    unsupervised = vbseg.segment(images, modalities=MODALITIES, num_classes=4)
    with_prior = vbseg.segment(images, modalities=MODALITIES, prior=weak)
    hottest = dice(unsupervised.probability >= 0.5, case.tumour)
    assert dice(with_prior.probability >= 0.5, case.tumour) >= hottest - 0.05


def test_modality_mismatch_is_one_line(cohort, population):
    index, _ = cohort
    with pytest.raises(InputError, match="learned on pet\\+ct\\+mr") as error:
        vbseg.segment([str(index.parent / "syn00_pet.nii.gz")], modalities=["pet"], prior=population)
    assert "\n" not in str(error.value)
    images = [str(index.parent / f"syn00_{m}.nii.gz") for m in ("pet", "mr", "ct")]
    with pytest.raises(InputError, match="in that order"):
        vbseg.segment(images, modalities=["pet", "mr", "ct"], prior=population)


def _index_with(tmp_path, cohort, edit):
    index, _ = cohort
    entries = json.loads(index.read_text())[:1]
    for name in ("pet", "ct", "mr"):
        for suffix in ("", "_label"):
            shutil.copy(index.parent / f"syn00_{name}{suffix}.nii.gz", tmp_path)
    edit(entries[0])
    path = tmp_path / "cases.json"
    path.write_text(json.dumps(entries))
    return path


def test_bad_cases_json_is_one_line_naming_the_file(tmp_path, cohort):
    missing = _index_with(tmp_path, cohort, lambda e: e["modalities"]["ct"].update(image="gone.nii.gz"))
    with pytest.raises(InputError, match="gone.nii.gz: file not found"):
        read_cases(missing, MODALITIES)
    unknown = _index_with(tmp_path, cohort, lambda e: e["modalities"].update(xray=e["modalities"]["ct"]))
    with pytest.raises(InputError, match="cases.json: case 'syn00': unknown modality 'xray'"):
        read_cases(unknown, MODALITIES)
    with pytest.raises(InputError, match="no_such.json: cases index not found"):
        read_cases(tmp_path / "no_such.json", MODALITIES)
    with pytest.raises(InputError, match="--modalities: unknown modality 'spect'"):
        read_cases(missing, ["pet", "spect"])
    # a label on a grid of none of the images (a cropped copy)
    import nibabel as nib

    label = nib.load(tmp_path / "syn00_pet_label.nii.gz")
    nib.save(nib.Nifti1Image(np.asarray(label.dataobj)[:10], label.affine), tmp_path / "small.nii.gz")
    wrong = _index_with(tmp_path, cohort, lambda e: e["modalities"]["pet"].update(label="small.nii.gz"))
    with pytest.raises(InputError, match="small.nii.gz: case syn00: label grid .* matches none") as error:
        read_cases(wrong, MODALITIES)
    assert "\n" not in str(error.value)
    # the single-image entry shape is read too
    single = _index_with(tmp_path, cohort, lambda e: (e.pop("modalities"), e.update(
        modality="CT", image="syn00_ct.nii.gz", label="syn00_ct_label.nii.gz")))
    assert read_cases(single, ["ct"])[0].modalities == ("ct",)


def test_prior_json_round_trip(tmp_path, population):
    path = tmp_path / "prior.json"
    population.save(path)
    loaded = load_prior(path)
    for field in ("mean", "spread_var", "noise_var", "proportions"):
        np.testing.assert_array_equal(getattr(loaded, field), getattr(population, field))
    assert loaded.to_dict() == population.to_dict()
    assert loaded.widened(4.0).spread_scale == 4.0 * population.spread_scale
    path.write_text("{}")
    with pytest.raises(InputError, match="prior.json: not a valid population prior"):
        load_prior(path)


def test_packaged_sarcoma_prior_loads():
    from vbseg.cohort.population import resolve_prior

    prior = resolve_prior("sarcoma")
    assert isinstance(prior, PopulationPrior) and prior.modalities == MODALITIES
    assert len(prior.cases) == 21 and "CC BY 3.0" in prior.attribution


def test_packaged_sarcoma_prior_matches_its_recorded_command():
    """The packaged prior records the command that made it; its training list and settings
    hash to the recorded digest, and the command names the same modalities and classes."""
    import shlex

    from vbseg.cohort.model import training_digest
    from vbseg.cohort.population import resolve_prior

    prior = resolve_prior("sarcoma")
    words = shlex.split(prior.command)
    assert words[:2] == ["vbseg", "fit-prior"] and words[words.index("--modalities") + 1] == "pet,ct,mr"
    assert "--cases" not in words  # every patient case of the index with these modalities
    num_background = len(prior.class_names) - prior.num_tumour
    assert prior.training_digest == training_digest(prior.cases, prior.modalities, prior.num_tumour,
                                                    num_background, prior.interaction is not None,
                                                    prior.volume_calibration is not None,
                                                    sorted(prior.method_calibrations))
    learned = {words[i + 1] for i, word in enumerate(words) if word == "--calibrate-method"}
    assert learned == set(prior.method_calibrations)  # the methods' volume errors, as the command
    assert prior.num_tumour == 2 and num_background == 4  # fit-prior's defaults, as the command


def test_cli_fit_prior_and_segment_with_it(tmp_path, cohort, capsys):
    index, _ = cohort
    out = tmp_path / "prior.json"
    assert main(["fit-prior", str(index), "--modalities", "pet,ct,mr", "--out", str(out),
                 "--cases", "syn00,syn01,syn02", "--background-classes", "2"]) == 0
    prior = load_prior(out)
    assert prior.cases == ["syn00", "syn01", "syn02"] and prior.volume_calibration["n"] == 3
    images = [str(index.parent / f"syn03_{m}.nii.gz") for m in MODALITIES]
    assert main(["segment", *images, "--modality", "pet,ct,mr", "--prior", str(out),
                 "--out", str(tmp_path / "seg")]) == 0
    summary = json.loads((tmp_path / "seg" / "summary.json").read_text())
    assert summary["model"] == "potts+population_prior" and summary["volume_ml"]["upper"] > 0
    capsys.readouterr()
    assert main(["segment", images[0], "--modality", "pet", "--prior", str(out),
                 "--out", str(tmp_path / "seg2")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_packaged_sarcoma_prior_holds_every_shared_sarcoma(shared_data):
    """Its recorded command (no --cases) takes every patient case of the index with PET, CT and
    MR: the packaged prior's case list is that list."""
    from vbseg.cohort.population import resolve_prior
    from vbseg.io.cases import read_cases

    names = [case.name for case in read_cases(shared_data / "cases.json", MODALITIES, check_files=False)]
    assert sorted(resolve_prior("sarcoma").cases) == sorted(names)
