"""Experiment configs: parsing and sweep expansion, every bad-config error as one line, a sweep
killed mid-run that resumes without redoing finished runs, and the shipped configs."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from vbseg.errors import InputError
from vbseg.experiment.config import load_experiment

ROOT = Path(__file__).resolve().parents[2]

TINY = """
[experiment]
name = "tiny"

[phantoms]
diameters_mm = [22, 30]
contrast = 4.0
cv = [0.1]
seeds = {seeds}

[model]
beta = {beta}
volume_draws = 200
{extra}
"""


def _write(tmp_path, text, name="cfg.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_sweep_expansion_product_and_zip(tmp_path):
    product = load_experiment(_write(tmp_path, TINY.format(seeds=2, beta="[0.5, 1.5]", extra="")))
    assert len(product.runs) == 2 * 2 * 2  # diameters x seeds x betas
    assert {r.variant["beta"] for r in product.runs} == {0.5, 1.5}
    assert len({r.run_id for r in product.runs}) == len(product.runs)
    zipped = load_experiment(_write(tmp_path, TINY.format(
        seeds=1, beta="[0.5, 1.5]", extra="neighbourhood = [6, 26]\n[sweep]\nmode = \"zip\"")))
    assert sorted((r.variant["beta"], r.variant["neighbourhood"]) for r in zipped.runs) == [
        (0.5, 6), (0.5, 6), (1.5, 26), (1.5, 26)]
    # the run id depends on case and variant only: the same config gives the same ids
    again = load_experiment(_write(tmp_path, TINY.format(seeds=2, beta="[0.5, 1.5]", extra=""), "b.toml"))
    assert [r.run_id for r in again.runs] == [r.run_id for r in product.runs]


P = "[phantoms]\ndiameters_mm = 22\n"
BAD = [
    ("unknown section", "[modle]\nbeta = 1.0\n" + P, "[modle]: unknown section"),
    ("unknown model key", P + "[model]\nbetta = 1.0", "[model] betta: unknown key"),
    ("wrong type", P + "[model]\nclasses = \"three\"", "[model] classes: expected int"),
    ("bad beta word", P + "[model]\nbeta = \"learn\"", "[model] beta: expected a number or 'auto'"),
    ("bad option value", P + "[model]\nneighbourhood = 18", "--neighbourhood: must be 6 or 26"),
    ("bad combination", P + "[model]\ncovariance = \"full\"", "full needs two or more images"),
    ("tumour class out of range", P + "[model]\ntumour_class = 2", "--tumour-class: must be in 0..1"),
    ("zip lengths", P + "[model]\nbeta = [1, 2]\nclasses = [2, 3, 4]\n[sweep]\nmode = \"zip\"",
     "different lengths"),
    ("bad mode", P + "[sweep]\nmode = \"grid\"", "[sweep] mode: must be one of"),
    ("no cases", "[model]\nbeta = 1.0", "names no cases"),
    ("missing diameters", "[phantoms]\ncontrast = 4.0", "[phantoms] diameters_mm: required"),
    ("bad seeds", P + "seeds = 0", "[phantoms] seeds: must be >= 1"),
    ("missing index", "[real]\nindex = \"nowhere/cases.json\"", "not found"),
    ("not TOML", "[phantoms\ndiameters_mm = 22", "is not valid TOML"),
    ("empty list", "[phantoms]\ndiameters_mm = []", "an empty list"),
    ("spacing not a list", P + "spacing_mm = 2.0", "[phantoms] spacing_mm: expected a list of 3 numbers"),
    ("spacing of two", P + "spacing_mm = [2.0, 2.0]", "[phantoms] spacing_mm: expected a list of 3 numbers"),
    ("spacing zero", P + "spacing_mm = [2.0, 0, 2.0]", "[phantoms] spacing_mm: each voxel size must be"),
    ("spacing word", P + "spacing_mm = [2.0, \"x\", 2.0]", "[phantoms] spacing_mm: expected float"),
    ("spacing inf", P + "spacing_mm = [2.0, inf, 2.0]", "[phantoms] spacing_mm: each voxel size must be"),
    ("noise fwhm negative", P + "noise_fwhm_mm = [0, -1.0]", "[phantoms] noise_fwhm_mm: must be finite"),
    ("noise fwhm word", P + "noise_fwhm_mm = \"wide\"", "[phantoms] noise_fwhm_mm: expected float"),
    ("noise fwhm poisson", P + "noise = \"poisson\"\nnoise_fwhm_mm = 3.0",
     "[phantoms] noise_fwhm_mm: correlates Gaussian noise only"),
    ("voi margin zero", P + "voi_margin_mm = 0", "[phantoms] voi_margin_mm: must be a finite number > 0"),
    ("voi margin list", P + "voi_margin_mm = [10, 15]", "[phantoms] voi_margin_mm: expected float"),
    ("wall negative", P + "wall_mm = -1.0", "[phantoms] wall_mm: must be a finite number >= 0"),
    ("wall list", P + "wall_mm = [1.0, 1.5]", "[phantoms] wall_mm: expected float"),
    ("missing prior", P + "[model]\nprior = \"nowhere.json\"", "[model] prior: "),
    ("missing checkpoint", P + "[model]\nname = \"deep-potts\"\ncheckpoint = \"net.eqx\"",
     "[model] checkpoint: "),
]


@pytest.mark.parametrize("name,text,problem", BAD, ids=[b[0] for b in BAD])
def test_every_bad_config_names_the_file_and_the_key(tmp_path, name, text, problem):
    path = _write(tmp_path, text)
    with pytest.raises(InputError) as caught:
        load_experiment(path)
    message = str(caught.value)
    assert message.startswith(str(path)) and problem in message and "\n" not in message


def test_phantom_grid_noise_kernel_and_voi(tmp_path):
    """[phantoms] spacing_mm puts every phantom on that grid, noise_fwhm_mm is an axis and
    voi_margin_mm fits each sphere in a spherical VOI of its radius + the margin; all three
    show in the case names, and a config without them keeps its names."""
    from vbseg.experiment.task import _case_inputs

    path = _write(tmp_path, "[phantoms]\ndiameters_mm = 10\nnoise_fwhm_mm = [0, 3.5]\n"
                            "spacing_mm = [2.5, 2.0, 3]\nvoi_margin_mm = 6\n")
    runs = load_experiment(path).runs
    assert [r.case["name"] for r in runs] == [
        f"phantom_diameters10_nfwhm{f}_sp2.5x2x3_voi6_s0" for f in ("0", "3.5")]
    assert [r.case["spec"]["noise_fwhm_mm"] for r in runs] == [0.0, 3.5]
    images, _, truth, _, true_ml, spacing, roi = _case_inputs(runs[1], tmp_path / "out")
    assert spacing == pytest.approx((2.5, 2.0, 3.0)) and true_ml == pytest.approx(0.5236, abs=1e-4)
    import nibabel as nib

    voi = np.asarray(nib.load(roi).dataobj).astype(bool)
    assert voi.shape == truth.shape == nib.load(images[0]).shape and truth.any()
    assert np.all(voi[truth]) and 0 < voi.sum() < voi.size  # the sphere inside, a ball not the grid
    ball_ml = voi.sum() * 2.5 * 2.0 * 3.0 / 1000
    assert ball_ml == pytest.approx(4 / 3 * np.pi * 11**3 / 1000, rel=0.1)  # radius 5 + 6 mm
    plain = load_experiment(_write(tmp_path, "[phantoms]\ndiameters_mm = 10\n", "plain.toml")).runs
    assert [r.case["name"] for r in plain] == ["phantom_diameters10_s0"]
    assert _case_inputs(plain[0], tmp_path / "out")[-1] is None  # no VOI: the whole grid
    assert _case_inputs(plain[0], tmp_path / "out")[5] == pytest.approx((4.0, 4.0, 3.0))


def test_bad_config_through_the_cli_is_one_line(tmp_path):
    path = _write(tmp_path, BAD[1][1])
    result = subprocess.run([sys.executable, "-m", "vbseg.cli", "experiment", str(path), "--out",
                             str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "betta: unknown key" in lines[0]
    assert not (tmp_path / "out").exists()


def test_unknown_real_case(tmp_path, shared_data):
    path = _write(tmp_path, f"[real]\nindex = \"{shared_data / 'cases.json'}\"\ncases = [\"sts999\"]")
    with pytest.raises(InputError, match="'sts999' is not in"):
        load_experiment(path)


def _rows(out: Path) -> list[dict]:
    with open(out / "results.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_killed_sweep_resumes_without_redoing_finished_runs(tmp_path):
    """Start a 4-run sweep, kill it (SIGKILL) as soon as the first run has finished, run it
    again: the finished run is not redone (its result.json is untouched), the rest complete,
    and the table has every run with its metrics."""
    config = _write(tmp_path, TINY.format(seeds=2, beta="1.0", extra=""))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "vbseg.cli", "experiment", str(config), "--out", str(out)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.time() + 400
    first = None
    while time.time() < deadline and first is None:
        done = list(out.glob("runs/*/result.json"))
        first = done[0] if done else None
        time.sleep(0.2)
    assert first is not None, "no run finished"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    finished_before = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/result.json")}
    assert 1 <= len(finished_before) < 4
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"{len(finished_before)} already finished" in result.stdout
    for path, mtime in finished_before.items():
        assert path.stat().st_mtime_ns == mtime
    rows = _rows(out)
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows)
    for row in rows:
        assert 0.7 <= float(row["dice50"]) <= 1.0 and float(row["hd95_mm"]) >= 0
        assert float(row["vol_lower_ml"]) <= float(row["vol_mean_ml"]) <= float(row["vol_upper_ml"])
        assert row["covered"] in ("True", "False") and float(row["ece"]) < 0.05
    record = json.loads(next(iter(finished_before)).read_text())
    assert record["status"] == "ok" and record["case_spec"]["kind"] == "phantom"
    assert "4 runs, 4 ok, 0 failed" in (out / "results.md").read_text()


def test_a_failing_run_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch):
    from vbseg.experiment import task as experiment_task
    from vbseg.experiment.runner import run_experiment

    config = load_experiment(_write(tmp_path, TINY.format(seeds=1, beta="1.0", extra="")))
    original = experiment_task._case_inputs

    def flaky(run, folder):
        if run.case["spec"]["diameters_mm"] == 30.0:
            raise InputError("phantom", "simulated failure")
        return original(run, folder)

    monkeypatch.setattr(experiment_task, "_case_inputs", flaky)
    summary = run_experiment(config, tmp_path / "out", progress=False)
    assert summary["failed"] == 1 and summary["runs"] == 2
    rows = _rows(tmp_path / "out")
    assert sorted(r["status"] for r in rows) == ["failed", "ok"]
    failed = next(r for r in rows if r["status"] == "failed")
    assert "simulated failure" in failed["error"]
    assert "simulated failure" in (tmp_path / "out" / "results.md").read_text()


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "experiments").glob("*.toml")
                                         if not p.name.startswith("train_")))
def test_shipped_configs_parse(name, shared_data_optional):
    """Every experiment config loads (the train_*.toml configs are vbseg train's, checked in
    tests/deep/test_deep.py)."""
    path = ROOT / "experiments" / name
    if "[real]" in path.read_text() and shared_data_optional is None:
        pytest.skip("real cases need ../shared/data")
    experiment = load_experiment(path)
    assert len(experiment.runs) >= 2


def test_parallel_jobs_give_the_same_table(tmp_path):
    """--jobs 2 (spawned processes) fills the same rows as a serial run of the same config."""
    from vbseg.experiment.runner import run_experiment

    config = load_experiment(_write(tmp_path, TINY.format(seeds=1, beta="1.0", extra="")))
    serial = run_experiment(config, tmp_path / "serial", progress=False)
    parallel = run_experiment(config, tmp_path / "parallel", jobs=2, progress=False)
    assert serial["failed"] == parallel["failed"] == 0
    one, two = _rows(tmp_path / "serial"), _rows(tmp_path / "parallel")
    for a, b in zip(one, two):
        assert a["case"] == b["case"] and a["dice50"] == b["dice50"] and a["vol_mean_ml"] == b["vol_mean_ml"]


def test_a_score_added_later_is_filled_in_from_the_saved_map(tmp_path):
    """A finished run whose record lacks surface Dice at 5 mm (scored before it was added) gets
    it, identical to a fresh scoring, when the sweep is run again; a run whose saved map no
    longer reproduces its Dice50 is left without it (the map is not the one scored), and so is
    one whose map cannot be read."""
    import nibabel as nib

    from vbseg.experiment.runner import run_experiment

    config = load_experiment(_write(tmp_path, TINY.format(seeds=1, beta="1.0", extra="")))
    out = tmp_path / "out"
    assert run_experiment(config, out, progress=False)["failed"] == 0
    paths = sorted(out.glob("runs/*/result.json"))
    fresh = {p: json.loads(p.read_text()) for p in paths}
    assert all(0 <= r["sdice_2mm"] <= r["sdice_5mm"] <= 1 for r in fresh.values())
    for path, record in fresh.items():
        path.write_text(json.dumps({k: v for k, v in record.items() if k != "sdice_5mm"}))
    tampered = paths[1].parent / "outputs" / "prob.nii.gz"
    image = nib.load(tampered)
    nib.save(nib.Nifti1Image(np.zeros(image.shape, np.float32), image.affine), tampered)
    summary = run_experiment(config, out, progress=False)
    assert summary["skipped"] == 2 and summary["failed"] == 0
    assert json.loads(paths[0].read_text()) == fresh[paths[0]]
    assert "sdice_5mm" not in json.loads(paths[1].read_text())
    rows = {r["case"]: r for r in _rows(out)}
    assert float(rows[fresh[paths[0]]["case"]]["sdice_5mm"]) == pytest.approx(fresh[paths[0]]["sdice_5mm"])
    assert rows[fresh[paths[1]]["case"]]["sdice_5mm"] == ""
    # a damaged map (half written) leaves its run as it was and the sweep goes on
    tampered.write_bytes(tampered.read_bytes()[:100])
    assert run_experiment(config, out, progress=False)["skipped"] == 2
    assert "sdice_5mm" not in json.loads(paths[1].read_text())


def test_file_settings_resolve_against_the_config_folder(tmp_path):
    """prior/checkpoint paths are relative to the config; "sarcoma" names the packaged prior."""
    packaged = load_experiment(_write(tmp_path, P + "[model]\nprior = \"sarcoma\""))
    assert {r.variant["prior"] for r in packaged.runs} == {"sarcoma"}
    (tmp_path / "nets").mkdir()
    (tmp_path / "nets" / "net.eqx").write_bytes(b"")
    config = _write(tmp_path, P + "[model]\nname = \"deep-potts\"\ncheckpoint = \"nets/net.eqx\"")
    runs = load_experiment(config).runs
    assert {r.variant["checkpoint"] for r in runs} == {str((tmp_path / "nets" / "net.eqx").resolve())}


def test_leave_one_out_prior_experiment(tmp_path):
    """[model] prior = "leave-one-out": each real case gets the prior learned from the others
    (its training cases exclude it), the shared per-case fits are cached once, and a re-run
    finds every run finished; phantoms or too few cases are one-line config errors."""
    from vbseg.cohort.population import leave_one_out_prior
    from vbseg.experiment.runner import run_experiment
    from vbseg.phantoms import make_cohort

    index = make_cohort(tmp_path / "cohort", 4, seed=0, shape=(16, 16, 10))
    text = (f"[real]\nindex = \"{index}\"\ncases = [\"syn00\", \"syn01\", \"syn02\", \"syn03\"]\n"
            "modalities = [\"pet\", \"ct\", \"mr\"]\n[model]\nprior = \"leave-one-out\"\n")
    config = load_experiment(_write(tmp_path, text))
    assert [r.case["cohort"] for r in config.runs] == [["syn00", "syn01", "syn02", "syn03"]] * 4
    summary = run_experiment(config, tmp_path / "out", progress=False)
    assert summary["failed"] == 0 and summary["runs"] == 4
    rows = _rows(tmp_path / "out")
    assert all(float(r["dice50"]) > 0.9 for r in rows), [r["dice50"] for r in rows]
    cached = sorted(p.name for p in (tmp_path / "out" / "priors").rglob("*.pkl"))
    assert len(cached) == 8  # a constrained fit and a calibration entry per case
    prior = leave_one_out_prior(index, ["pet", "ct", "mr"], ["syn00", "syn01", "syn02", "syn03"],
                                "syn02", tmp_path / "out" / "priors")
    assert prior.cases == ["syn00", "syn01", "syn03"] and prior.volume_calibration["n"] == 3
    assert run_experiment(config, tmp_path / "out", progress=False)["skipped"] == 4
    with pytest.raises(InputError, match="needs real"):
        load_experiment(_write(tmp_path, P + "[model]\nprior = \"leave-one-out\"\n", "phantom.toml"))
    few = text.replace("\"syn02\", \"syn03\"", "\"syn02\"")
    with pytest.raises(InputError, match="needs >= 3"):
        load_experiment(_write(tmp_path, few, "few.toml"))


def test_leave_one_out_cache_is_keyed_by_code_and_inputs(tmp_path, monkeypatch):
    """The cached per-case fits are found again only by the same code and the same input
    files: a changed vbseg source (its digest) or a touched label gives another folder."""
    import os

    from vbseg.cohort import population
    from vbseg.io.cases import read_cases
    from vbseg.phantoms import make_cohort

    index = make_cohort(tmp_path / "cohort", 3, seed=0, shape=(16, 16, 10))
    names = ["syn00", "syn01", "syn02"]
    cases = read_cases(index, ["pet"], names)

    def folder():
        return population.cache_folder(tmp_path / "cache", index, ["pet"], names, cases, 2, 3)

    first = folder()
    assert folder() == first  # deterministic
    stat = os.stat(cases[1].label)
    os.utime(cases[1].label, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    touched = folder()
    assert touched != first
    monkeypatch.setattr(population, "source_digest", lambda: "other code")
    assert folder() not in (first, touched)
