"""Every benchmark script runs end to end with tiny settings (a smoke test, as NumPyro's
test_examples does for its examples): it must produce its JSON and markdown outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks import (
    bench_beta,
    bench_calibration,
    bench_cluster,
    bench_cohort,
    bench_dicom_export,
    bench_envelope,
    bench_gp,
    bench_locate,
    bench_locate_switch,
    bench_multiscale,
    bench_nema,
    bench_potts,
    bench_pv,
    bench_pv_psf_elbo,
    gtv_contrast,
    restart_agreement,
)
from vbseg.calibration.conformal import split_coverage_band, volume_scores


def test_bench_potts_smoke(tmp_path):
    record = bench_potts.main(["--sizes", "16", "--repeats", "1", "--numpy-iterations", "2",
                               "--gibbs-sweeps", "2", "--out", str(tmp_path)])
    row = record["rows"][0]
    assert row["n"] == 16 and row["vb_iterations"] > 0 and row["numpy_over_jax"] > 0
    saved = json.loads((tmp_path / "bench_potts.json").read_text())
    assert saved["rows"][0]["voxels"] == 16**3
    assert "| 16^3 |" in (tmp_path / "bench_potts.md").read_text()


def test_bench_multiscale_smoke(tmp_path):
    record = bench_multiscale.main(["--quick", "--sizes", "24", "--out", str(tmp_path)])
    (row,) = record["rows"]
    assert row["coarse_iterations"] is not None and 0.0 <= row["dice_between"] <= 1.0
    assert "| 24^3 |" in (tmp_path / "bench_multiscale.md").read_text()


def test_gtv_contrast_on_the_sarcomas(tmp_path, shared_data):
    record = gtv_contrast.main(["--index", str(shared_data / "cases.json"), "--out", str(tmp_path)])
    rows = record["rows"]
    assert {r["modality"] for r in rows} == {"pet", "ct", "mr"}
    # every GTV is hotter than the rest of its PET crop; the table is per case and modality
    assert all(r["gtv_median"] > r["outside_median"] for r in rows if r["modality"] == "pet")
    assert len(rows) == 3 * len({r["case"] for r in rows})
    assert "| sts001 | ct |" in (tmp_path / "gtv_contrast.md").read_text()


def test_bench_gp_smoke(tmp_path):
    record = bench_gp.main(["--quick", "--out", str(tmp_path)])
    assert {(r["n"], r["structure"]) for r in record["speed"]} == {(8, "fft"), (8, "kronecker")}
    for row in record["speed"]:
        assert row["s_per_step"] > 0 and row["converge_steps"] > 0
    assert record["dense"][0]["dense_over_fft"] > 0
    assert set(record["summary"]) == {"gp_label", "potts"}
    for row in record["summary"].values():
        assert row["draws"] == 1 and row["dice50_mean"] > 0.5
    saved = json.loads((tmp_path / "bench_gp.json").read_text())
    assert saved["benchmark"] == "bench_gp"
    assert "| 8^3 | fft |" in (tmp_path / "bench_gp.md").read_text()

def test_bench_beta_smoke(tmp_path):
    record = bench_beta.main(["--n", "10", "--fields", "2", "--sweeps", "60", "--path-sweeps", "20",
                              "--classes", "2", "--betas", "0.2", "--out", str(tmp_path)])
    row = record["rows"][0]
    assert row["classes"] == 2 and row["true_beta"] == 0.2 and row["fields"] == 2
    for key in ("complete_pl", "complete_ti", "hidden_pl", "hidden_ti"):
        assert np.isfinite(row[key]["bias"])
    assert "| 2 | 0.20 |" in (tmp_path / "bench_beta.md").read_text()


def test_bench_calibration_smoke(tmp_path):
    record = bench_calibration.main(["--diameters", "22", "--contrasts", "4", "--cvs", "0.1",
                                     "--seeds", "1", "--methods", "nopsf_fixed,nopsf_gibbs",
                                     "--gibbs-every", "1", "--out", str(tmp_path)])
    summary = record["summary"]
    assert set(summary) == {"nopsf_fixed", "nopsf_gibbs"}
    for row in summary.values():
        assert row["draws"] == 1 and 0.0 <= row["coverage"] <= 1.0 and row["dice50_mean"] > 0.5
    assert (tmp_path / "calibration_reliability.png").stat().st_size > 0
    assert "| nopsf_gibbs |" in (tmp_path / "bench_calibration.md").read_text()


def test_bench_pv_smoke(tmp_path):
    """One non-native phantom draw (13 mm, 4:1, Poisson, the true PSF) through both methods."""
    assert bench_pv.main(["--diameters", "13", "--contrasts", "4", "--seeds", "1",
                          "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "bench_pv.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["psf_fixed", "pv_potts"]
    assert rows[0]["noise"] == "poisson" and rows[0]["psf_given_mm"] == 6.0
    assert abs(rows[0]["fraction_ml"] / rows[0]["true_ml"] - 1) < 0.02  # supersampled truth
    assert "| 13 mm 4:1 | pv_potts | 1 |" in (tmp_path / "bench_pv.md").read_text()
    # --extend keeps the stored draws and fits only what is missing: here nothing
    assert bench_pv.main(["--diameters", "13", "--contrasts", "4", "--seeds", "1",
                          "--out", str(tmp_path), "--extend"]) == 0
    assert json.loads((tmp_path / "bench_pv.json").read_text())["rows"] == rows


def test_bench_pv_psf_elbo_peak_is_the_parabola_vertex():
    """The vertex of a parabola sampled on the grid is found exactly between grid points; at an
    end of the grid the grid's argmax is kept; two tied maxima give the point half-way."""
    grid = np.arange(4.0, 8.01, 0.5)
    assert bench_pv_psf_elbo.parabola_peak(grid, -3.0 * (grid - 6.2) ** 2) == pytest.approx(6.2)
    assert bench_pv_psf_elbo.parabola_peak(grid, grid) == 8.0
    tied = np.isin(grid, (4.5, 5.0)).astype(float)
    assert bench_pv_psf_elbo.parabola_peak(grid, tied) == pytest.approx(4.75)


def test_bench_pv_psf_elbo_smoke(tmp_path, monkeypatch):
    """One draw, three FWHMs: the level problem is captured from pv-potts itself (so the study
    follows the method) and each rho gets one ELBO per FWHM."""
    monkeypatch.setattr(bench_pv_psf_elbo, "GRID", (5.5, 6.0, 6.5))
    assert bench_pv_psf_elbo.main(["--diameters", "13", "--seeds", "1", "--givens", "6",
                                   "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "bench_pv_psf_elbo.json").read_text())["rows"]
    assert [r["rho"] for r in rows] == list(bench_pv_psf_elbo.RHOS)
    assert all(len(r["elbo"]) == 3 and np.all(np.isfinite(r["elbo"])) for r in rows)
    grid = bench_pv_psf_elbo.GRID
    for r in rows:  # the peak is the parabola's through the best grid point and its neighbours
        assert r["argmax_mm"] == grid[int(np.argmax(r["elbo"]))]
        assert r["peak_mm"] == pytest.approx(bench_pv_psf_elbo.parabola_peak(grid, r["elbo"]))
    assert "| 1 | 6 | 1 |" in (tmp_path / "bench_pv_psf_elbo.md").read_text()


def test_bench_dicom_export_on_sts001(tmp_path, shared_data):
    """The export study end to end: every grid, offset and level; onto CT-like grids the
    exported contours keep the PET contours' volumes within 1 %."""
    assert bench_dicom_export.main(["--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "bench_dicom_export.json").read_text())["rows"]
    grids, offsets, levels = (len(bench_dicom_export.GRIDS), len(bench_dicom_export.OFFSETS_MM),
                              len(bench_dicom_export.LEVELS))
    assert len(rows) == grids * offsets * levels
    for row in rows:
        if row["grid"].startswith("CT 0.98 x 0.98 x 3.27"):
            assert row["exported_ml"] == pytest.approx(row["contour_ml"], rel=0.01)


def test_bench_envelope_chooses_the_best_training_radius_the_smaller_on_ties():
    radius, means = bench_envelope.choose_radius({"a": [0.5, 0.7, 0.7, 0.6, 0.7],
                                                  "b": [0.3, 0.5, 0.5, 0.5, 0.4]})
    assert radius == bench_envelope.RADII_MM[1] and means[1] == means[2] == pytest.approx(0.6)


def test_bench_cohort_smoke(tmp_path):
    from vbseg.phantoms import make_cohort

    index = make_cohort(tmp_path / "cohort", 3, seed=0, shape=(16, 16, 10))
    common = ["--index", str(index), "--cases", "syn00,syn01,syn02", "--quick", "--baselines", "suv2.5",
              "--out", str(tmp_path)]
    first = bench_cohort.main(common + ["--modalities", "pet,ct,mr"])
    assert first["modality_sets"] == [["pet", "ct", "mr"]]
    # --append keeps the fused set (not run again) and adds PET alone to the same report
    record = bench_cohort.main(common + ["--modalities", "pet,ct,mr;pet", "--append"])
    assert record["modality_sets"] == [["pet", "ct", "mr"], ["pet"]]
    for before, after in zip(first["records"], record["records"]):
        for name, scores in before["methods"].items():
            assert after["methods"][name] == scores
    assert [r["case"] for r in record["records"]] == ["syn00", "syn01"]
    # appending with other held-out cases would mix reports: refused in one line
    with pytest.raises(SystemExit, match="other settings"):
        bench_cohort.main([a if a != "syn00,syn01,syn02" else "syn00,syn01" for a in common]
                          + ["--modalities", "pet", "--append"])
    assert set(record["records"][0]["methods"]) == {"prior pet+ct+mr", "prior pet+ct+mr, interaction J",
                                                    "prior pet", "suv2.5"}
    for name in ("prior pet+ct+mr", "prior pet+ct+mr, interaction J", "prior pet"):
        summary = record["summary"][name]
        assert summary["dice50"]["mean"] > 0.9 and "dice50_minus_reference" in summary
    table = (tmp_path / "bench_cohort.md").read_text()
    assert "| prior pet+ct+mr |" in table and "| prior pet |" in table


def test_bench_nema_smoke(tmp_path, shared_data):
    if bench_nema.load_nema(shared_data) is None:
        pytest.skip(f"the NEMA scan nema1 is not in {shared_data}")
    assert bench_nema.main(["--shared", str(shared_data), "--spheres", "17",
                            "--methods", "nopsf_vb,threshold40,psf_noise", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "bench_nema.json").read_text())
    rows = record["rows"]
    assert [r["method"] for r in rows] == ["nopsf_vb", "threshold40", "psf_noise"]
    # the background's neighbour correlations (0.09-0.18 on 2.1-2.8 mm voxels): a 2.0-2.6 mm kernel
    assert 1.8 < record["noise_fwhm_mm"] < 2.8 and rows[2]["dice50"] > 0.8
    # the truth-fraction volume of the 17 mm sphere is its physical volume (2.572 mL) within 1 %
    assert rows[0]["true_ml"] == pytest.approx(rows[0]["physical_ml"], rel=0.01)
    assert rows[0]["lower_ml"] <= rows[0]["mean_ml"] <= rows[0]["upper_ml"] and rows[0]["z"] is not None
    assert rows[1]["z"] is None and rows[0]["dice50"] > 0.8
    assert "| 17 mm |" in (tmp_path / "bench_nema.md").read_text()


def test_bench_nema_conformal_smoke(tmp_path, shared_data):
    """--calibration: the psf_vb fit of one sphere gains the conformal 90 % / 95 % intervals of
    the committed matched calibration (benchmarks/results/nema_matched_calibration.json)."""
    calibration = bench_nema.RESULTS / "nema_matched_calibration.json"
    if bench_nema.load_nema(shared_data) is None or not calibration.is_file():
        pytest.skip("the NEMA scan nema1 or the matched calibration is absent")
    assert bench_nema.main(["--shared", str(shared_data), "--spheres", "17", "--methods", "psf_vb",
                            "--calibration", str(calibration), "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "bench_nema_conformal.json").read_text())
    (row,) = record["rows"]
    for key in ("conformal90", "conformal95"):
        interval = row[key]
        assert interval["lower_ml"] <= row["lower_ml"] and interval["upper_ml"] >= row["upper_ml"]
        assert interval["width_rel"] > 0 and interval["n"] >= 19
    assert row["conformal95"]["upper_ml"] >= row["conformal90"]["upper_ml"]
    assert record["calibration"]["voi_margin_mm"] == [bench_nema.VOI_MARGIN_MM]
    # the scan's background noise the matched config was set from (COV about 0.35, nearly white)
    noise = record["image_noise"]
    assert 0.3 < noise["background_cov"] < 0.45 and abs(noise["correlation"]["axis0_lag1"]) < 0.3
    assert sum(s["n"] for s in record["calibration"]["strata"].values()) == record["calibration"]["n"]
    table = (tmp_path / "bench_nema_conformal.md").read_text()
    assert "| 17 mm |" in table and "Clopper-Pearson" in table


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    """`python -m benchmarks.run --quick` once for the report and figure smoke tests."""
    from benchmarks import run

    out = tmp_path_factory.mktemp("report")
    run.main(["--quick", "--jobs", "1", "--out", str(out)])
    return out


def test_benchmark_report_quick(quick_report, shared_data_optional):
    report = (quick_report / "report.md").read_text()
    assert "| potts | 1 |" in report and "| otsu | 1 |" in report  # the phantom methods table
    assert "pooled ECE (fraction)" in report and "## Speed" in report
    records = json.loads((quick_report / "experiments" / "quick_phantoms" / "records.json").read_text())
    assert {r["model"] for r in records} == {"potts", "otsu"}
    for record in records:
        sums = record["reliability_fraction"]
        assert sum(sums["counts"]) == record["fit_voxels"] and "traceback" not in record
    if shared_data_optional is None:
        assert "skipped quick_real" in report
    else:
        assert "### quick_real" in report and "| threshold40 | 1 |" in report


def test_paper_figures_quick(quick_report, tmp_path, shared_data_optional):
    from paper_figures import make_all

    status = make_all.main(["--quick", "--results", str(quick_report), "--out", str(tmp_path)])
    names = ["reliability", "volume_intervals", "dice_vs_size", "time_vs_voxels"]
    if shared_data_optional is not None:
        names.append("contours_real")
    assert status == (0 if shared_data_optional is not None else 1)
    for name in names:
        for suffix in ("png", "pdf"):
            assert (tmp_path / f"{name}.{suffix}").stat().st_size > 1000


def test_bench_fusion_default_summary_pairs_cases_and_splits_avid_from_faint():
    """The report's arithmetic on made-up records: paired differences by case against the
    reference, the avid/faint split, the warning counts and the 'Dice < 0.3 where the
    reference reaches 0.5' list."""
    from benchmarks.bench_fusion_default import markdown_table, summarise

    def record(case, name, dice, warnings=()):
        return {"status": "ok", "case": f"{case}_pet+ct", "settings": ({"name": name} if name != "potts"
                                                                      else {"fusion": "pet"}),
                "case_spec": {"modalities": ["pet", "ct"]}, "dice50": dice, "hd95_mm": 10.0,
                "sdice_2mm": 0.5, "sdice_5mm": 0.75, "vol_mean_ml": 110.0, "vol_true_ml": 100.0,
                "vol_lower_ml": 90.0, "vol_upper_ml": 130.0, "covered": True, "interval_score": 40.0,
                "warnings": list(warnings)}

    records = [record("a", "suv2.5", 0.6), record("b", "suv2.5", 0.2), record("c", "suv2.5", 0.7),
               record("a", "potts", 0.8, ["no-contour"]), record("b", "potts", 0.4),
               record("c", "potts", 0.1, ["no-contour", "classes-overlap"])]
    summary = summarise(records, {"a": True, "b": False, "c": True}, "suv2.5")
    potts = summary["potts K=2 PET+CT fusion=pet"]
    assert potts["all"]["dice_minus_reference"]["mean"] == pytest.approx((0.2 + 0.2 - 0.6) / 3)
    assert potts["avid"]["cases"] == ["a", "c"] and potts["faint"]["cases"] == ["b"]
    assert potts["avid"]["dice50"]["mean"] == pytest.approx(0.45)
    assert potts["all"]["below_0_3_where_reference_0_5"] == ["c"]
    assert potts["all"]["warnings"] == {"no-contour": 2, "classes-overlap": 1}
    assert potts["all"]["volume_error_pct"] == pytest.approx(10.0) and potts["all"]["width_ml"] == 40.0
    assert potts["all"]["sdice_5mm"] == 0.75 and potts["all"]["interval_score_ml"] == 40.0
    assert potts["all"]["sdice_minus_reference"]["sdice_5mm"]["mean"] == 0.0
    table = markdown_table(summary, "suv2.5")
    assert ("| potts K=2 PET+CT fusion=pet | faint (1) | 0.40 [0.40, 0.40] | +0.20 [+0.20, +0.20] | 10.0 | "
            "0.50 / 0.75 | 10 | 1/1 | 40 | 40 |") in table


def test_bench_psf_sarcoma_names_methods_by_fwhm_and_pairs_them_with_the_default():
    """bench_psf_sarcoma reuses bench_fusion_default's summary with its own method names: runs
    without a PSF term are the reference, each FWHM a method, paired by case."""
    from benchmarks.bench_fusion_default import markdown_table, summarise
    from benchmarks.bench_psf_sarcoma import REFERENCE, method_name

    def record(case, fwhm, dice):
        return {"status": "ok", "case": case, "settings": {"psf_fwhm_mm": fwhm}, "dice50": dice,
                "hd95_mm": 10.0, "sdice_2mm": 0.5, "vol_mean_ml": 110.0, "vol_true_ml": 100.0,
                "vol_lower_ml": 90.0, "vol_upper_ml": 130.0, "covered": False, "interval_score": 60.0,
                "warnings": []}

    records = [record("a", 0, 0.7), record("b", 0, 0.5), record("a", 6.0, 0.4), record("b", 6.0, 0.6)]
    assert [method_name(r) for r in records[1:3]] == [REFERENCE, "--psf-fwhm 6"]
    summary = summarise(records, {"a": True, "b": False}, REFERENCE, name_of=method_name)
    assert summary["--psf-fwhm 6"]["all"]["dice_minus_reference"]["mean"] == pytest.approx(-0.1)
    assert summary["--psf-fwhm 6"]["all"]["below_0_3_where_reference_0_5"] == []
    table = markdown_table(summary, REFERENCE, "default")
    assert "minus default (paired)" in table and "| --psf-fwhm 6 | faint (1) | 0.60" in table
    # runs scored before surface Dice at 5 mm was added show it as nan, not as a number
    assert "| 0.50 / nan | 10 | 0/1 | 40 | 60 |" in table


def test_bench_conformal_split_study_on_exchangeable_scores():
    """The random-split study on made-up calibration records with continuous exchangeable
    scores: its mean coverage matches the exact k/(n+1) within Monte Carlo error; a case whose
    model interval covers counts as covered by the model; the FNR study stays under its bound."""
    from benchmarks.bench_conformal import split_study

    rng = np.random.default_rng(4)
    lambdas = np.linspace(0.0, 1.0, 11)
    cases = []
    for i in range(60):
        true = float(np.exp(rng.normal(2.0, 0.5)))
        lower, upper = true * np.exp(rng.normal(0.1, 0.2)), true * np.exp(rng.normal(0.2, 0.2))
        lower, upper = min(lower, upper), max(lower, upper)
        score = max(np.log(lower) - np.log(true), np.log(true) - np.log(upper))
        cases.append({"volume_score": score, "lower_ml": lower, "upper_ml": upper, "true_ml": true,
                      "floor_ml": 0.01, "fnr": list(np.clip(0.5 - lambdas + rng.uniform(0, 0.1), 0, 1)),
                      "stretch": list(1.0 + 2.0 * lambdas), "fnr_margin": [0.5, 0.2, 0.0, 0.0],
                      "stretch_margin": [1.0, 1.5, 2.0, 50.0],
                      "margin_mm": float(rng.uniform(0, 5)), "case": {"spec": {"diameters_mm": 10 + i % 2}}})
    families = {"threshold": lambdas, "margin": [0.0, 1.0, 2.0, np.inf]}
    study = split_study(cases, families, n_cal=29, splits=400)
    row = study["conformal_90"]
    assert row["exact"] == pytest.approx(27 / 30)
    assert abs(row["covered_mean"] - row["exact"]) < 4 * row["covered_sd_over_splits"] / np.sqrt(400) + 0.01
    assert study["model_95"]["covered"] == pytest.approx(np.mean([c["volume_score"] <= 0 for c in cases]))
    risk = study["risk_control"]["threshold"]["0.1"]
    assert risk["mean_fnr"] <= 0.1 + 2 * risk["mean_fnr_mc_se"] + 0.01
    # FNR(lambda) = 0.5 - lambda + u, u ~ U(0, 0.1): the test cases' mean reaches 0.1 from lambda
    # 0.45 on, so the oracle on this grid is 0.5; the calibrated lambda-hat needs 0.481 (n = 29),
    # so both contours have the stretch 1 + 2 x 0.5 = 2
    assert risk["oracle_parameter_median"] == pytest.approx(0.5, abs=0.01)
    assert risk["parameter_median"] == pytest.approx(0.5, abs=0.01)
    assert risk["stretch_ratio"] == pytest.approx(1.0, abs=0.02) and risk["whole_map_share"] == 0.0
    # alpha 0.05: at 0.5 the adjusted risk is 29/30 E[u] + 1/30 ~ 0.08 > 0.05, at 0.6 every FNR is
    # 0 (u < 0.1): lambda-hat 0.6 in every split, no case misses a voxel, the stretch is 2.2
    tight = study["risk_control"]["threshold"]["0.05"]
    assert tight["parameter_median"] == pytest.approx(0.6) and tight["mean_fnr"] == 0.0
    assert tight["fnr_cases"] == {"zero": 1.0, "median": 0.0, "q90": 0.0, "max": 0.0}
    assert tight["stretch_mean"] == pytest.approx(2.2) and tight["oracle_stretch_mean"] <= 2.2 + 1e-9
    # the dilation family, FNR 0.5, 0.2, 0, 0 at 0, 1, 2 mm and the whole map for every case: the
    # adjusted risk at 1 mm is 29/30 x 0.2 + 1/30 > 0.1, at 2 mm 1/30 <= 0.05: 2 mm, as the oracle
    for alpha in ("0.1", "0.05"):
        dilation = study["risk_control"]["margin"][alpha]
        assert dilation["parameter_median"] == 2.0 and dilation["oracle_parameter_median"] == 2.0
        assert dilation["mean_fnr"] == 0.0 and dilation["stretch_mean"] == 2.0
        assert dilation["stretch_ratio"] == 1.0
    assert set(row["covered_by_diameter"]) == {"10", "11"}


def test_bench_cluster_smoke(tmp_path):
    record = bench_cluster.main(["--quick", "--out", str(tmp_path)])
    assert [row["mode"] for row in record["rows"]] == ["--jobs 1", "--cluster local:1"]
    assert all(row["failed"] == 0 and row["runs"] == 2 for row in record["rows"])
    assert record["overhead"][0]["start_s"] > 0 and record["on_paper"]["wall_h"] > 0
    assert "--cluster local:1" in (tmp_path / "bench_cluster.md").read_text()


def test_bench_conformal_mondrian_study_on_exchangeable_scores():
    """Two volume strata of made-up cases with continuous scores (exchangeable within each):
    every stratum's tie-broken count lies in its exact 99 % band, the widths are reported for
    the target spheres only, and a strata choice that leaves a stratum too small is refused."""
    from benchmarks.bench_conformal import mondrian_study
    from vbseg.calibration.calibration_file import strata_spec

    rng = np.random.default_rng(5)
    cases = []
    for i in range(60):
        large = i % 2 == 1
        true = 10.0 if large else 1.0
        score = float(rng.normal(0.0, 0.05 if large else 0.5))
        model = true * np.exp(score)  # a zero-width model interval that misses by the score
        cases.append({"volume_score": score, "lower_ml": model, "upper_ml": model, "true_ml": true,
                      "floor_ml": 0.01, "mean_ml": true, "contrast_to_noise": 12.0,
                      "case": {"spec": {"diameters_mm": 28.0 if large else 10.0, "contrast": 4.0}}})
    study = mondrian_study(cases, strata_spec("volume", "2"), splits=200)
    row = study["conformal_90"]
    assert set(row["strata"]) == {"volume <2 mL", "volume >=2 mL"}
    assert all(s["in_band"] and s["n_cal"] == 19 and s["n_test"] == 11 for s in row["strata"].values())
    assert 0 < row["target_median_width_rel"] < 0.3  # only the 28 mm spheres, calibrated on their own
    small = mondrian_study(cases[:30], strata_spec("volume", "2"), splits=10)
    assert set(small["refused"]) == {"volume <2 mL", "volume >=2 mL"}


def test_bench_conformal_stratified_coverage_against_exact_answers():
    """stratified_coverage on made-up scores: 19 calibration cases scoring 0.01..0.19 (one stratum)
    give the 90 % quantile 0.18 (rank ceil(20 * 0.9) = 18) and the 95 % one 0.19 (rank 19); test
    cases scoring 0.17, 0.185 and 0.2 are covered 1 and 2 times; each width / V is e^q - e^-q
    for a zero-width model interval at V; the Clopper-Pearson bounds of 0/10 and 10/10 are
    1 - 0.025^(1/10) and 0.025^(1/10) (tolerance 1e-9)."""
    from benchmarks.bench_conformal import clopper_pearson, stratified_coverage
    from vbseg.calibration.calibration_file import strata_spec, stratify

    def case(score, fwhm, diameter=17.0):
        return {"name": f"c{score}", "volume_score": score, "lower_ml": 1.0, "upper_ml": 1.0, "true_ml": 1.0,
                "floor_ml": 0.001, "mean_ml": 1.0, "fnr": [1.0, 0.0], "stretch": [0.5, 3.0],
                "fnr_margin": [0.5, 0.0, 0.0], "stretch_margin": [1.0, 1.4, 9.0], "margin_mm": 1.0,
                "case": {"spec": {"diameters_mm": diameter, "contrast": 4.0, "psf_fwhm_mm": fwhm}}}

    cases = [case(i / 100, 4.0) for i in range(1, 20)]
    grids = {"lambda_grid": [0.0, 1.0], "risk_margin_grid_mm": [0.0, 3.0]}
    calibration = stratify({**grids, "cases": cases}, strata_spec(), "test")
    tests = [case(0.17, 5.0), case(0.185, 5.0), case(0.2, 7.0, diameter=10.0)]
    result = stratified_coverage(calibration, tests, risk=True)
    # every FNR curve is (1, 0) on the grid (0, 1): with 19 cases the adjusted risk is 19/20 + 1/20
    # = 1 at lambda 0 and 1/20 = 0.05 at lambda 1, so lambda-hat is 1 at both alphas, as is the oracle
    # the dilation curve (0.5, 0, 0) at 0 mm, 3 mm and the whole map: 19/20 x 0.5 + 1/20 = 0.525 at
    # 0 mm, 1/20 at 3 mm: the 3 mm dilation at both alphas, as the oracle
    for alpha in ("0.1", "0.05"):
        risk = result["risk_control"]["threshold"][alpha]
        assert risk["parameter_median"] == 1.0 and risk["oracle_parameter_median"] == 1.0
        assert risk["mean_fnr"] == 0.0 and risk["stretch_mean"] == 3.0 and risk["stretch_ratio"] == 1.0
        assert risk["whole_map_share"] == 1.0
        dilation = result["risk_control"]["margin"][alpha]
        assert dilation["parameter_median"] == 3.0 and dilation["whole_map_share"] == 0.0
        assert dilation["stretch_mean"] == pytest.approx(1.4, abs=1e-12) and dilation["stretch_ratio"] == 1.0
    assert result["n"] == 3 and result["model_95"]["covered"] == 0
    for level, q, covered, by_fwhm in ((90, 0.18, 1, {"5": 0.5, "7": 0.0}),
                                       (95, 0.19, 2, {"5": 1.0, "7": 0.0})):
        row = result[f"conformal_{level}"]
        assert row["covered"] == covered and row["coverage_by_fwhm"] == by_fwhm
        assert row["exact"] == pytest.approx((18 if level == 90 else 19) / 20, abs=1e-12)
        assert row["median_width_rel"] == pytest.approx(np.exp(q) - np.exp(-q), abs=1e-9)
        assert row["target_n"] == 2  # the 17 mm spheres at 4:1, not the 10 mm one
        assert row["ci95"] == pytest.approx(clopper_pearson(covered, 3), abs=1e-12)
        assert row["coverage_by_contrast"] == {"4": [covered, 3]} and "coverage_by_cv" not in row
        band = list(split_coverage_band(19, 3, 1 - level / 100, 1))
        assert row["strata"] == {"all": {"n_cal": 19, "n_test": 3, "covered": covered, "band": band,
                                         "in_band": band[0] <= covered <= band[1]}}
    assert clopper_pearson(0, 10) == pytest.approx([0.0, 1 - 0.025 ** 0.1], abs=1e-9)
    assert clopper_pearson(10, 10) == pytest.approx([0.025 ** 0.1, 1.0], abs=1e-9)


def test_bench_conformal_shift_smoke(tmp_path, monkeypatch):
    """--shift on made-up fitted cases (the fits replaced): each set scored against the packaged
    pet-phantom-psf; a set that is never covered is reported broken at both levels with its
    count per diameter, one always covered holds; the test configs load as the intended shifts
    and the --psf configs are written exactly as the committed ones."""
    from benchmarks import bench_conformal
    from vbseg.experiment.config import load_experiment

    def case(score, diameter, mean_ml):
        return {"name": f"c{diameter}", "volume_score": score, "lower_ml": 1.0, "upper_ml": 1.0,
                "true_ml": 1.0, "floor_ml": 0.048, "mean_ml": mean_ml, "fnr": [1.0, 0.0], "margin_mm": 1.0,
                "case": {"spec": {"diameters_mm": diameter, "contrast": 4.0, "psf_fwhm_mm": 6.0}}}

    made_up = {"shift_none": [case(-1.0, 10.0, 0.5), case(-1.0, 22.0, 5.0)] * 5,
               "shift_cv035": [case(5.0, 10.0, 0.5), case(5.0, 22.0, 5.0)] * 5}
    monkeypatch.setattr(bench_conformal, "psf_test_cases", lambda out, name, *args: made_up[name])
    assert bench_conformal.main(["--shift", "none", "cv035", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "bench_conformal_psf_shift_noise.json").read_text())
    assert list(record["tests"]) == ["none", "cv035"]
    for name, covered in (("none", 10), ("cv035", 0)):
        for level in (90, 95):
            row = record["tests"][name]["result"][f"conformal_{level}"]
            assert row["covered"] == covered and row["coverage_by_diameter"] == {"10": [covered // 2, 5],
                                                                                   "22": [covered // 2, 5]}
    table = (tmp_path / "bench_conformal_psf_shift_noise.md").read_text()
    assert "| cv035 | CV 0.35 | 10 | 0.000 | 0.000 (0.000-0.308) | broken |" in table
    assert "| none | conformal 95% | 5/5 | 5/5 |" in table
    assert table.count("| 0 / 0 |") == 1 and "| 0 / 10 |" in table  # the misses: true V below the interval
    assert "python -m benchmarks.bench_conformal --shift" in table
    for name, (_, cv, extra) in bench_conformal.SHIFT_TESTS.items():
        config = tmp_path / f"{name}.toml"
        config.write_text(bench_conformal.PSF_TEST_CONFIG.format(
            name=name, option="--shift", cv=cv, fwhms=bench_conformal.SHIFT_FWHMS,
            seeds=bench_conformal.SHIFT_SEEDS, extra=extra))
        runs = load_experiment(config).runs
        assert len(runs) == 54 * len(bench_conformal.SHIFT_SEEDS) and runs[0].case["spec"]["cv"] == float(cv)
    assert runs[0].case["spec"]["spacing_mm"] == [2.083, 2.083, 2.78]
    assert runs[0].case["spec"]["noise"] == "poisson"
    results = bench_conformal.Path(bench_conformal.__file__).parent / "results"
    for name, (fwhms, seeds) in bench_conformal.PSF_TESTS.items():
        assert bench_conformal.PSF_TEST_CONFIG.format(name=name, option="--psf", cv="0.10", fwhms=fwhms,
                                                      seeds=seeds, extra="") == \
            (results / f"bench_conformal_psf_{name}.toml").read_text()


def test_bench_conformal_sarcoma_fold_study():
    """Made-up scores on made-up folds: each held-out case is scored with the quantile of the
    other folds' cases (the largest when n <= 17 at 90 %), and 95 % is refused for n < 19."""
    from benchmarks.bench_conformal_sarcoma import fold_study, summarise

    names = [f"c{i:02d}" for i in range(20)]
    folds = {"folds": [names[i::5] for i in range(5)],
             "cases": {name: {"avid": i % 3 != 0} for i, name in enumerate(names)}}
    cases = [{"name": name, "volume_score": 0.01 * i, "lower_ml": 10.0, "upper_ml": 10.0,
              "true_ml": 10.0 * np.exp(0.01 * i), "floor_ml": 0.01} for i, name in enumerate(names)]
    study = fold_study(cases, folds)
    refused = study["refused"]["95"]
    assert len(refused) == 5 and "16 cases cannot calibrate level 0.95" in refused[0]
    rows = {row["case"]: row for row in study["rows"]}
    assert len(rows) == 20 and {row["n_cal"] for row in rows.values()} == {16}
    # fold 4 holds c04, c09, c14, c19: its quantile is the largest other score, 0.18
    assert rows["c19"]["quantile"] == pytest.approx(0.18) and not rows["c19"]["covered"]
    assert rows["c04"]["quantile"] == pytest.approx(0.18) and rows["c04"]["covered"]
    assert rows["c15"]["quantile"] == pytest.approx(0.19) and rows["c15"]["covered"]
    summary = summarise(cases, study, folds)
    widths = [row["width_ml"] for row in rows.values()]
    assert summary["conformal_90"]["all"] == {"covered": 19, "cases": 20,
                                             "mean_width_ml": pytest.approx(np.mean(widths)),
                                             "median_width_ml": pytest.approx(np.median(widths))}
    assert summary["model_95"]["all"]["covered"] == 1  # only the zero score lies inside


def test_bench_locate_switch_chooses_inside_the_training_folds(tmp_path, capsys):
    """The nested selection on made-up cases: the switch helps fold 1's case c, so fold 0
    (trained on fold 1) switches, which costs its case a; it hurts a, so fold 1 (trained on
    fold 0) does not switch, which costs c. Each fold's choice sees only the other fold.
    Without the cached runs of bench_locate and bench_envelope the script says so and writes
    nothing."""
    def case(stat, locate, prior):
        return {"stat": None if stat is None else {"mean": stat, "median": stat},
                "base": locate, "fallback": prior}

    cases = {"a": case(1.0, 0.7, 0.1), "b": case(5.0, 0.8, 0.5),   # fold 0
             "c": case(1.2, 0.0, 0.7), "d": case(None, 0.4, 0.0)}  # fold 1
    chosen, per_fold = bench_locate_switch.nested(cases, {"folds": [["a", "b"], ["c", "d"]]})
    assert per_fold[0]["rule"] != "no switch" and chosen["a"][0] == 0.1 and chosen["b"][0] == 0.8
    assert per_fold[1]["rule"] == "no switch" and chosen["c"][0] == 0.0
    assert chosen["d"][0] == 0.4  # no located region: locate-potts's abstention stands
    assert bench_locate_switch.main(["--out", str(tmp_path)]) == 0
    assert "not found" in capsys.readouterr().out and not any(tmp_path.iterdir())


def made_up_cases(rng, n: int) -> list[dict]:
    """``n`` made-up calibration records: model intervals of random centre and log-width, true
    volumes from one continuous law (scores exchangeable and distinct)."""
    cases = []
    for i in range(n):
        centre, width = rng.uniform(10.0, 500.0), rng.uniform(0.005, 2.0)
        lower, upper = centre * np.exp(-width / 2), centre * np.exp(width / 2)
        true = centre * np.exp(rng.normal(0.0, 0.7))
        cases.append({"name": f"c{i:02d}", "lower_ml": lower, "upper_ml": upper, "true_ml": true,
                      "floor_ml": 0.001, "volume_score": float(volume_scores(lower, upper, true, 0.001))})
    return cases


def test_bench_conformal_sarcoma_scores_invert_exactly():
    """For each score (log-miss, normalised) and any quantile q, the conformal interval covers
    the true volume exactly when the case's score is <= q (up to 1e-9 in q)."""
    from benchmarks.bench_conformal_sarcoma import SCORES

    rng = np.random.default_rng(5)
    for score, (value, interval) in SCORES.items():
        for case in made_up_cases(rng, 200):
            s = value(case)
            for q in (s - 1e-6, s + 1e-6, abs(s) + rng.uniform(0, 2)):
                lower, upper = interval(case, q)
                assert (lower <= case["true_ml"] <= upper) == (s <= q), (score, s, q)


def test_bench_conformal_sarcoma_leave_one_out_covers_exactly_the_rank():
    """With n distinct scores, each case against the quantile of the other n - 1 is covered iff
    its rank among all n is <= ceil(n (1 - alpha)): exactly that many, for either score."""
    from benchmarks.bench_conformal_sarcoma import leave_one_out_study

    rng = np.random.default_rng(6)
    cases = made_up_cases(rng, 21)
    folds = {"folds": [[c["name"] for c in cases[i::5]] for i in range(5)],
             "cases": {c["name"]: {"avid": i % 3 != 0} for i, c in enumerate(cases)}}
    for score in ("log-miss", "normalised"):
        rows = leave_one_out_study(cases, folds, score)["rows"]
        for level, k in (("90", 19), ("95", 20)):  # ceil(21 x 0.9), ceil(21 x 0.95)
            assert sum(r["covered"] for r in rows if r["level"] == level) == k
            assert {r["n_cal"] for r in rows if r["level"] == level} == {20}


def test_bench_conformal_sarcoma_fold_study_on_exchangeable_scores():
    """i.i.d. continuous scores in 5 folds of 4: each held-out case is covered with probability
    exactly k/(n + 1) = 16/17 at 90 % (n = 16 other-fold scores, k = 16), so the expected count is
    20 x 16/17; the mean over 400 repeats lies within 4 standard errors of it."""
    from benchmarks.bench_conformal_sarcoma import fold_study

    rng = np.random.default_rng(7)
    counts = []
    for _ in range(400):
        cases = made_up_cases(rng, 20)
        folds = {"folds": [[c["name"] for c in cases[i::5]] for i in range(5)],
                 "cases": {c["name"]: {"avid": True} for c in cases}}
        rows = fold_study(cases, folds, "normalised")["rows"]
        counts.append(sum(r["covered"] for r in rows if r["level"] == "90"))
    expected = 20 * 16 / 17
    assert abs(np.mean(counts) - expected) < 4 * np.std(counts) / np.sqrt(len(counts))


def test_bench_conformal_test_phantoms_are_the_calibration_design_at_other_seeds(tmp_path):
    from benchmarks.bench_conformal import CONFIG, default_test_config
    from vbseg.experiment.config import load_experiment

    config = tmp_path / "test.toml"
    config.write_text(default_test_config())
    test, calibration = load_experiment(config), load_experiment(CONFIG)
    assert len(test.runs) >= 1000 and len(calibration.runs) >= 500
    specs = {json.dumps(run.case["spec"], sort_keys=True) for run in calibration.runs}
    assert {json.dumps(run.case["spec"], sort_keys=True) for run in test.runs} == specs
    assert not {run.case["seed"] for run in test.runs} & {run.case["seed"] for run in calibration.runs}
    assert test.runs[0].variant == calibration.runs[0].variant


def test_bench_conformal_sarcoma_risk_fold_study():
    """Made-up FNR curves on made-up folds (20 cases, 7 faint): the dilation family's curve is
    (0.2, 0, 0) for avid and (0.5, 0.05, 0) for faint cases over 0 mm, 2 mm and the whole map.
    Each fold's 16 calibration cases hold f <= 7 faint ones: at 2 mm the adjusted risk
    (0.05 f + 1) / 17 <= 0.1, at 0 mm it is above, so every fold takes 2 mm and the held-out
    faint cases miss 5 %. The threshold curve (1, 0) takes lambda 1 (stretch 50); alpha 0.05
    needs 19 cases and is refused in every fold."""
    from benchmarks.bench_conformal_sarcoma import risk_fold_study

    names = [f"c{i:02d}" for i in range(20)]
    folds = {"folds": [names[i::5] for i in range(5)],
             "cases": {name: {"avid": i % 3 != 0} for i, name in enumerate(names)}}
    cases = [{"name": name, "fnr": [1.0, 0.0], "stretch": [1.0, 50.0],
              "fnr_margin": [0.2, 0.0, 0.0] if folds["cases"][name]["avid"] else [0.5, 0.05, 0.0],
              "stretch_margin": [1.0, 1.5, 40.0]} for name in names]
    study = risk_fold_study({"cases": cases, "lambda_grid": [0.0, 1.0], "risk_margin_grid_mm": [0.0, 2.0]},
                            folds)
    dilation = study["margin/90"]
    assert {row["parameter"] for row in dilation["rows"]} == {2.0} and len(dilation["rows"]) == 20
    assert dilation["summary"]["avid"]["mean_fnr"] == 0.0
    assert dilation["summary"]["faint"]["mean_fnr"] == pytest.approx(0.05)
    assert dilation["summary"]["all"]["mean_fnr"] == pytest.approx(0.05 * 7 / 20)
    assert dilation["summary"]["all"]["median_stretch"] == 1.5
    threshold = study["threshold/90"]
    assert {row["parameter"] for row in threshold["rows"]} == {1.0}
    assert threshold["summary"]["all"] == {"cases": 20, "mean_fnr": 0.0, "median_stretch": 50.0}
    for key in ("threshold/95", "margin/95"):
        assert not study[key]["rows"] and len(study[key]["refused"]) == 5


def test_bench_training_data_variants_change_only_where_patches_come_from():
    """Each ablation variant is the packaged PET recipe with only its data settings changed, and
    valid: 'synthetic' reads no case, 'real' has no synthetic patch in any step, 'mixed' half
    real in every step; the packaged recipe (no overrides) reuses bench_locate's networks."""
    import dataclasses

    from benchmarks.bench_locate import TRAIN_CONFIGS, network_path
    from benchmarks.bench_training_data import TAG, VARIANTS
    from vbseg.deep.training import load_settings, real_training_cases
    from vbseg.deep.training_config import check_settings

    recipe = load_settings(TRAIN_CONFIGS[TAG])
    assert VARIANTS[""][1] == {}
    for variant, (_, overrides) in VARIANTS.items():
        settings = dataclasses.replace(recipe, **overrides)
        check_settings(settings)
        changed = {f.name for f in dataclasses.fields(settings)
                   if getattr(settings, f.name) != getattr(recipe, f.name)}
        assert changed <= {"cases", "finetune_steps", "real_fraction"}, variant
        real_per_batch = round(settings.real_fraction * settings.batch_size)
        if variant == "synthetic":
            assert real_training_cases(settings) == []
        elif variant == "real":
            assert settings.finetune_steps == settings.steps and real_per_batch == settings.batch_size
        elif variant == "mixed":
            assert settings.finetune_steps == settings.steps and real_per_batch == settings.batch_size // 2
    folder = Path("networks")
    assert network_path(folder, 2, TAG) == folder / "pet_fold2.eqx"
    assert network_path(folder, 2, TAG, "real") == folder / "real_pet_fold2.eqx"


def test_a_fold_network_never_sees_its_held_out_cases(tmp_path, shared_data):
    """bench_locate's fold networks are trained through fold_network, which drops the fold's
    held-out cases and records the cases it did see: here with two cases of fold 0 and two of
    other folds offered (two steps, a tiny network), the checkpoint's recorded list holds the
    other folds' two only, and a cached checkpoint that saw a held-out case is not reused."""
    folds = bench_locate.load_folds(bench_locate.FOLDS)["folds"]
    held_out = folds[0]
    offered = (held_out[0], held_out[1], folds[1][0], folds[2][0])
    tiny = dict(train_cases=offered, steps=2, finetune_steps=1, batch_size=2, patch_shape=(16, 16, 16),
                channels=(4, 4, 4), scan_steps=1, log_every=1)
    path, seconds = bench_locate.fold_network(tmp_path, 0, held_out, "pet", **tiny)
    seen = bench_locate.load_checkpoint(path).meta["real_cases"]
    assert seconds is not None and sorted(seen) == sorted([folds[1][0], folds[2][0]])
    assert not set(seen) & set(held_out)
    # the cached network is reused for its own fold, and retrained for a fold it saw a case of
    assert bench_locate.fold_network(tmp_path, 0, held_out, "pet", **tiny)[1] is None
    _, again = bench_locate.fold_network(tmp_path, 0, [folds[1][0]], "pet", **tiny)
    assert again is not None


def test_restart_agreement_smoke(tmp_path, shared_data):
    assert restart_agreement.main(["--index", str(shared_data / "cases.json"), "--cases", "sts002",
                                   "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "restart_agreement.json").read_text())["rows"]
    assert [(r["case"], r["classes"]) for r in rows] == [("sts002", 2), ("sts002", 3)]
    assert all(1 <= r["agreeing"] <= r["restarts"] for r in rows)
    assert "| sts002 | 2 |" in (tmp_path / "restart_agreement.md").read_text()


def test_bench_pv_copies_a_noise_methods_twin_on_white_noise_draws_only():
    """On a Poisson (even-seed) draw a --noise-fwhm method is its twin's fit: the stored row is
    copied under its name; on a correlated (odd-seed) draw, or without a stored twin, nothing."""
    stored = [{"method": "pv_potts", "diameter_mm": 13.0, "contrast": 4.0, "seed": seed, "mean_ml": 1.2}
              for seed in (0, 1)]
    (copy,) = bench_pv.twin_rows(stored, 13.0, 4.0, 0, ["pv_noise", "pv_psf_sd_noise"])
    assert copy == dict(stored[0], method="pv_noise", copied_from="pv_potts")
    assert bench_pv.twin_rows(stored, 13.0, 4.0, 1, ["pv_noise"]) == []
    assert bench_pv.twin_rows(stored, 17.0, 4.0, 0, ["pv_noise"]) == []
