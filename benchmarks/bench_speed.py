"""How does run time grow with the number of voxels, per model and per baseline?

Each method segments the same synthetic PET phantom (one 22 mm sphere, 4:1, CV 10 %, 6 mm PSF,
4 x 4 x 3 mm voxels) on cubic grids of n^3 voxels, through ``vbseg.segment`` exactly as a user
calls it, ``--repeats`` times per size. Reported per (method, size): the median fit time
(``timings_s.run`` of summary.json: the fit and the volume draws, not file input/output or the
figure) and, apart from it, the JAX compile time of the first call at that size (zero for the
NumPy/scikit-image baselines; k-means is jitted as a whole and its compile falls in its first
call's run time); and each method's run time as a ratio to the hidden Potts VB fit (no PSF) and to
Otsu, measured in the same run on the same machine.

Regenerate (about 10 minutes on 2 cores at the defaults):
    python -m benchmarks.bench_speed
Writes benchmarks/results/bench_speed.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import vbseg
from benchmarks.common import RESULTS, machine, write_report
from vbseg.baselines.classic import BASELINES
from vbseg.io.volume import save_nifti

# name -> segment() keywords
METHODS = {"potts": dict(model="potts"), "potts_psf": dict(model="potts", psf_fwhm_mm=6.0)}
METHODS.update({name: dict(model=name) for name in BASELINES})


def time_method(pet_path: Path, folder: Path, settings: dict, repeats: int) -> dict:
    compile_s, run_s = [], []
    for repeat in range(repeats):
        posterior = vbseg.segment([str(pet_path)], folder, seed=repeat, overwrite=True, **settings)
        compile_s.append(posterior.summary["timings_s"]["compile"])
        run_s.append(posterior.summary["timings_s"]["run"])
    # the first call at a grid shape compiles; later ones reuse it (compile ~0), so the compile
    # time reported is the first call's, the run time the median over all calls
    return {"compile_s": compile_s[0], "run_s": statistics.median(run_s), "run_s_all": run_s}


def bench_size(n: int, methods, repeats: int, work: Path) -> list[dict]:
    phantom = vbseg.make_phantom(vbseg.PhantomSpec(diameters_mm=(22.0,), shape=(n, n, n)), seed=0)
    pet_path = save_nifti(work / f"pet_{n}.nii.gz", phantom.pet.data, phantom.pet.affine)
    rows = []
    for name in methods:
        started = time.perf_counter()
        timing = time_method(pet_path, work / f"{name}_{n}", METHODS[name], repeats)
        rows.append({"method": name, "n": n, "voxels": n**3, **timing,
                     "wall_s": time.perf_counter() - started})
        print(f"{n}^3 {name}: compile {timing['compile_s']:.2f} s, run {timing['run_s']:.3f} s",
              flush=True)
    reference = {r["method"]: r["run_s"] for r in rows}
    for row in rows:
        for other in ("potts", "otsu"):
            row[f"over_{other}"] = (row["run_s"] / reference[other] if other in reference
                                    else float("nan"))
    return rows


def markdown(rows, methods, sizes) -> str:
    lines = ["Median fit time in seconds (compile in brackets, where JAX compiles), and the ratio "
             "to the Potts VB fit at the same size.", "",
             "| method | " + " | ".join(f"{n}^3" for n in sizes) + " |",
             "|---|" + "---|" * len(sizes)]
    for name in methods:
        cells = []
        for n in sizes:
            row = next(r for r in rows if r["method"] == name and r["n"] == n)
            compile_text = f" ({row['compile_s']:.1f})" if row["compile_s"] > 0 else ""
            cells.append(f"{row['run_s']:.3f}{compile_text}, x{row['over_potts']:.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="32,48,64,96")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    sizes = [int(n) for n in args.sizes.split(",")]
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"--methods: unknown {unknown}; choose from {sorted(METHODS)}")
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for n in sizes:
            rows += bench_size(n, methods, args.repeats, Path(work))
    record = {"benchmark": "bench_speed", "rows": rows, "repeats": args.repeats,
              "machine": machine(),
              "command": "python -m benchmarks.bench_speed " + " ".join(argv or [])}
    table = markdown(rows, methods, sizes)
    write_report(args.out, "bench_speed", record, __doc__, table, f"Repeats: {args.repeats}. ")
    print(table)
    return record


if __name__ == "__main__":
    main()
