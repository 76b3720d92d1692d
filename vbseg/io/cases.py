"""Delineated cases from a CASES.json index (the format of ../shared/data/cases.json).

The index is a list of entries, each in one of two shapes:

* ``{"case": NAME, "modalities": {"pet"|"ct"|"mr": {"image": FILE, "label": FILE}, ...}}``,
  each modality's label on that modality's own grid;
* ``{"case": NAME, "modality": "CT", "image": FILE, "label": FILE}`` (one image).

File names are relative to the index's folder; a file may be of any format
:func:`vbseg.io.volume.read_image_file` reads (NIfTI, NRRD, MetaImage, MGH, Analyze), and
every image and label of the index is read through :mod:`vbseg.io.volume`. The reference
delineation of a case is the label of its first (output) modality, which must lie on that
image's grid. Every problem is
an :class:`~vbseg.errors.InputError` naming the file (or option) in one line. Case names are
unique. ``vbseg segment --batch`` reads the same index (:mod:`vbseg.experiment.batch`), labels optional.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vbseg.errors import InputError
from vbseg.io.image import AFFINE_ATOL_MM, MODALITIES
from vbseg.io.volume import read_image_grid


@dataclass(frozen=True)
class DelineatedCase:
    """One case: images in the requested modality order and the first modality's label."""

    name: str
    images: tuple
    modalities: tuple
    label: str
    kind: str = "patient"
    licence: str = ""  # the entry's "licence" text (attribution duties of derived artefacts)


def entry_modalities(index: str, entry: dict, *, need_label: bool = True) -> dict:
    """{modality: {"image", "label"}} for either entry shape, modality names lower-case; without
    ``need_label`` an entry may leave its labels out."""
    name = entry.get("case")
    if "modalities" in entry:
        table = entry["modalities"]
        if not isinstance(table, dict):
            raise InputError(index, f"case {name!r}: 'modalities' must be an object")
    elif "modality" in entry:
        table = {entry["modality"]: {"image": entry.get("image"), "label": entry.get("label")}}
    else:
        raise InputError(index, f"case {name!r}: needs 'modalities' or 'modality'/'image'/'label'")
    result = {}
    for modality, files in table.items():
        key = str(modality).lower()
        if key not in MODALITIES:
            raise InputError(index, f"case {name!r}: unknown modality {modality!r} "
                                    f"(one of {', '.join(MODALITIES)})")
        if not isinstance(files, dict) or not files.get("image") or (need_label and not files.get("label")):
            raise InputError(index, f"case {name!r}, {key}: needs 'image' and 'label' file names"
                             if need_label else f"case {name!r}, {key}: needs an 'image' file name")
        result[key] = files
    return result


def _same_grid(a, b) -> bool:
    return a[0] == b[0] and np.allclose(a[1], b[1], atol=AFFINE_ATOL_MM)


def check_case_files(case: DelineatedCase, all_images: dict) -> None:
    """Every file exists and reads; the label lies on the first image's grid (else the error
    says which image's grid, if any, it matches)."""
    grids = {path: read_image_grid(path) for path in case.images}
    label_grid = read_image_grid(case.label)
    if _same_grid(label_grid, grids[case.images[0]]):
        return
    others = {m: p for m, p in all_images.items() if p != case.images[0]}
    matching = [m for m, p in others.items() if _same_grid(label_grid, read_image_grid(p))]
    if matching:
        raise InputError(case.label, f"case {case.name}: label is on the {matching[0]} grid, not on "
                                     f"the grid of the first modality ({case.modalities[0]})")
    raise InputError(case.label, f"case {case.name}: label grid (shape {label_grid[0]}) matches none "
                                 "of the case's images")


def case_files(cases) -> list[str]:
    """Every file the cases are read from: their images and reference labels."""
    return [path for case in cases for path in (*case.images, case.label)]


def read_index(index) -> dict[str, dict]:
    """The entries of the CASES.json ``index`` by case name, in its order; InputError naming
    the index when it is missing, not JSON, not a list, or has an entry without a 'case' name
    or a name twice."""
    index = os.fspath(index)
    try:
        entries = json.loads(Path(index).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(index, "cases index not found") from None
    except (OSError, ValueError) as error:
        raise InputError(index, f"cannot read as JSON ({str(error).splitlines()[0]})") from None
    if not isinstance(entries, list):
        raise InputError(index, "must be a JSON list of case entries")
    by_name = {}
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("case"), str):
            raise InputError(index, "every entry needs a 'case' name")
        if entry["case"] in by_name:
            raise InputError(index, f"case {entry['case']!r} is named twice")
        by_name[entry["case"]] = entry
    return by_name


def read_cases(index, modalities, names=None, *, check_files: bool = True) -> list[DelineatedCase]:
    """The cases of ``index`` that have all of ``modalities`` (in that order).

    Args:
        index: path of CASES.json.
        modalities: e.g. ["pet", "ct", "mr"]; the first modality's label is the reference.
        names: case names to take (each must exist and have the modalities); None: every
            entry of kind "patient" (phantoms in arbitrary units are left out) that has them.
    """
    index = os.fspath(index)
    modalities = [str(m).lower() for m in modalities]
    if not modalities:
        raise InputError("--modalities", "needs at least one modality")
    for modality in modalities:
        if modality not in MODALITIES:
            raise InputError("--modalities",
                             f"unknown modality {modality!r} (one of {', '.join(MODALITIES)})")
    by_name = read_index(index)
    folder = Path(index).parent
    wanted = list(names) if names is not None else [
        name for name, entry in by_name.items()
        if entry.get("kind", "patient") == "patient"
        and all(m in entry_modalities(index, entry) for m in modalities)]
    cases = []
    for name in wanted:
        if name not in by_name:
            raise InputError(index, f"no case named {name!r}")
        entry = by_name[name]
        table = entry_modalities(index, entry)
        missing = [m for m in modalities if m not in table]
        if missing:
            raise InputError(index, f"case {name!r} has no {', '.join(missing)} image")
        all_images = {m: str(folder / files["image"]) for m, files in table.items()}
        case = DelineatedCase(name, tuple(all_images[m] for m in modalities), tuple(modalities),
                              str(folder / table[modalities[0]]["label"]), entry.get("kind", "patient"),
                              str(entry.get("licence", "")))
        if check_files:
            check_case_files(case, all_images)
        cases.append(case)
    if not cases:
        raise InputError(index, f"no case has all of {', '.join(modalities)}")
    return cases
