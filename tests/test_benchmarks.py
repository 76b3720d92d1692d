"""Every benchmark script runs end to end with tiny settings (a smoke test, as NumPyro's
test_examples does for its examples): it must produce its JSON and markdown outputs."""

from __future__ import annotations

import json

from benchmarks import bench_potts


def test_bench_potts_smoke(tmp_path):
    record = bench_potts.main(["--sizes", "16", "--repeats", "1", "--numpy-iterations", "2",
                               "--gibbs-sweeps", "2", "--out", str(tmp_path)])
    row = record["rows"][0]
    assert row["n"] == 16 and row["vb_iterations"] > 0 and row["numpy_over_jax"] > 0
    saved = json.loads((tmp_path / "bench_potts.json").read_text())
    assert saved["rows"][0]["voxels"] == 16**3
    assert "| 16^3 |" in (tmp_path / "bench_potts.md").read_text()
