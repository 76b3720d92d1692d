"""PET values in SUV body weight from the DICOM header.

Convention: the QIBA vendor-neutral pseudo-code for SUV calculation (RSNA QIBA / QIDW,
"Standardized Uptake Value (SUV)", qibawiki.rsna.org), which is the FDG-PET procedure of
Boellaard et al., EJNMMI 2015;42:328 (EANM guideline 2.0) written against DICOM attributes
(PS3.3 C.8.9.1 PET Series, C.8.9.2 PET Isotope). By Units (0054,1001):

* ``BQML`` (activity concentration A in Bq/mL), with Corrected Image (0028,0051) holding
  ATTN and DECY:

      SUVbw = A x W / (D x 2^(-dt / T_half))

  W the patient weight in g (Patient's Weight (0010,1030) x 1000), D the injected activity in
  Bq (Radionuclide Total Dose (0018,1074), not corrected for residue in the syringe), T_half
  Radionuclide Half Life (0018,1075) in s, and dt, in s, from the injection
  (Radiopharmaceutical Start DateTime (0018,1078), else Series Date + Radiopharmaceutical
  Start Time (0018,1072)) to the time the image is decay corrected to:

  - Decay Correction (0054,1102) ``START``: the scan start. As in the QIBA code this is
    Series Date/Time (0008,0021/0031) when it is not after the earliest Acquisition
    Date/Time (0008,0022/0032) of the series; otherwise the series was made later
    (post-processing) and QIBA reads a GE private scan time; vbseg uses the earliest
    Acquisition Date/Time instead, and records which.
  - ``ADMIN``: the image is already decay corrected to the injection, so dt = 0.
  - ``NONE`` (or anything else): refused, since each bed position would need its own decay
    factor.

* ``GML`` (g/mL): the values are already SUVbw and are kept (factor 1). Converting again would
  scale them by W/D ~ 2e-4.
* ``CNTS``: Philips writes counts with a private SUV scale factor, SUV Factor (7053,1000) of the
  "Philips PET Private Group"; SUVbw = (stored x slope + intercept) x that factor. Without it
  the series is refused.

The result is one multiplicative factor for the rescaled values of every slice (the per-slice
Rescale Slope is applied before, in :mod:`vbseg.io.dicom.series`) and a record of the conversion
for summary.json.
"""

from __future__ import annotations

import datetime

from vbseg.errors import InputError
from vbseg.io.dicom._deps import quietly, require

QIBA_CONVENTION = ("QIBA vendor-neutral SUV pseudo-code (qibawiki.rsna.org, Standardized Uptake "
                   "Value); Boellaard et al. EJNMMI 2015 (EANM FDG PET/CT guideline 2.0)")
PHILIPS_CREATOR = "Philips PET Private Group"


def _datetime(date, time) -> datetime.datetime | None:
    """DA + TM strings as a naive datetime (None when either is absent)."""
    valuerep = require("pydicom.valuerep", "DICOM")
    if not date or not time:
        return None
    return datetime.datetime.combine(valuerep.DA(str(date)), valuerep.TM(str(time))).replace(tzinfo=None)


def _positive(item, key: str, subject: str, what: str) -> float:
    value = item.get(key)
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not number > 0:
        raise InputError(subject, f"PET in Bq/mL needs {what} ({key}) for SUV, but it is "
                                  f"{'missing' if value in (None, '') else repr(value)}")
    return number


def _injection_time(drug, first, subject: str) -> datetime.datetime:
    valuerep = require("pydicom.valuerep", subject)
    start = drug.get("RadiopharmaceuticalStartDateTime")
    if start:
        return valuerep.DT(str(start)).replace(tzinfo=None)
    time = drug.get("RadiopharmaceuticalStartTime")
    date = first.get("SeriesDate") or first.get("AcquisitionDate") or first.get("StudyDate")
    injected = _datetime(date, time)
    if injected is None:
        raise InputError(subject, "PET in Bq/mL needs the injection time (RadiopharmaceuticalStart"
                                  "DateTime or RadiopharmaceuticalStartTime) for SUV")
    return injected


def _scan_start(series, subject: str) -> tuple[datetime.datetime, str]:
    """The decay-correction reference of DecayCorrection START (module docstring)."""
    first = series.first
    series_time = _datetime(first.get("SeriesDate"), first.get("SeriesTime"))
    acquisitions = [t for t in (_datetime(h.get("AcquisitionDate") or h.get("SeriesDate"),
                                          h.get("AcquisitionTime")) for h in series.headers) if t]
    earliest = min(acquisitions) if acquisitions else None
    if series_time is not None and (earliest is None or series_time <= earliest):
        return series_time, "SeriesDate/SeriesTime"
    if earliest is not None:
        return earliest, ("earliest AcquisitionDate/AcquisitionTime (SeriesTime is later: a "
                          "post-processed series)")
    raise InputError(subject, "PET in Bq/mL needs SeriesDate/SeriesTime or AcquisitionTime for the "
                              "decay correction of SUV")


def _philips_suv_factor(first) -> float | None:
    try:
        block = first.private_block(0x7053, PHILIPS_CREATOR)
        value = block[0x00].value
    except (KeyError, ValueError):
        return None
    if isinstance(value, bytes):  # implicit VR without a private dictionary: the DS text
        value = value.decode("ascii", "ignore").strip("\x00 ")
    try:
        factor = float(value[0] if isinstance(value, (list, tuple)) else value)
    except (TypeError, ValueError):
        return None
    return factor if factor > 0 else None


@quietly
def pet_suv_factor(series) -> tuple[float, dict]:
    """The factor f with SUVbw = f x (stored x slope + intercept), and how it was obtained.

    Args:
        series: a :class:`vbseg.io.dicom.series.DicomSeries` of Modality PT.
    Returns:
        (f, record): record has ``units`` (as in the file), ``suv_type``, ``conversion`` (the
        formula applied), ``factor`` and, for Bq/mL, the weight, dose, half-life, the two
        times, ``decay_time_s``, the reference used and ``convention`` (QIBA).
    Raises:
        InputError naming the folder: mixed units, unknown units, missing weight / dose /
        half-life / times, decay correction other than START or ADMIN, CNTS without the
        Philips factor.
    """
    subject = series.path
    first = series.first
    units = {str(h.get("Units", "")).upper() for h in series.headers}
    if len(units) != 1:
        raise InputError(subject, f"PET slices differ in Units: {sorted(units)}")
    unit = units.pop()
    suv_type = str(first.get("SUVType", "") or "")
    record = {"units": unit, "suv_type": suv_type or None, "convention": QIBA_CONVENTION}
    if unit == "GML":
        record.update(conversion="none: Units GML, the values are already SUV (g/mL)", factor=1.0)
        if suv_type and suv_type.upper() != "BW":
            record["note"] = f"SUVType {suv_type}: the values are SUV{suv_type.lower()}, not SUVbw"
        return 1.0, record
    if unit == "CNTS":
        factor = _philips_suv_factor(first)
        if factor is None:
            raise InputError(subject, "PET in counts (Units CNTS) without the Philips SUV scale "
                                      "factor (7053,1000): cannot convert to SUV; export the "
                                      "series in Bq/mL or SUV")
        record.update(conversion="SUVbw = counts x Philips SUV Factor (7053,1000)", factor=factor)
        return factor, record
    if unit != "BQML":
        raise InputError(subject, f"PET Units {unit or '(missing)'} cannot be converted to SUV "
                                  f"(vbseg reads BQML, GML, or CNTS with the Philips SUV factor)")
    corrected = {str(c).upper() for c in (first.get("CorrectedImage") or [])}
    if not {"ATTN", "DECY"} <= corrected:
        raise InputError(subject, f"PET in Bq/mL must be attenuation and decay corrected for SUV "
                                  f"(CorrectedImage holds {sorted(corrected) or 'nothing'})")
    decay_correction = str(first.get("DecayCorrection", "")).upper()
    if decay_correction not in ("START", "ADMIN"):
        raise InputError(subject, f"DecayCorrection {decay_correction or '(missing)'}: SUV needs "
                                  f"images decay corrected to the scan start (START) or injection "
                                  f"(ADMIN)")
    drugs = first.get("RadiopharmaceuticalInformationSequence") or []
    if not drugs:
        raise InputError(subject, "PET in Bq/mL needs the RadiopharmaceuticalInformationSequence "
                                  "(dose, half-life, injection time) for SUV")
    drug = drugs[0]
    weight_kg = _positive(first, "PatientWeight", subject, "the patient weight")
    dose_bq = _positive(drug, "RadionuclideTotalDose", subject, "the injected dose")
    half_life_s = _positive(drug, "RadionuclideHalfLife", subject, "the half-life")
    if decay_correction == "ADMIN":
        decay_time_s, reference, injected, scanned = 0.0, "injection (DecayCorrection ADMIN)", None, None
    else:
        injected = _injection_time(drug, first, subject)
        scanned, reference = _scan_start(series, subject)
        decay_time_s = (scanned - injected).total_seconds()
        if decay_time_s < 0:
            raise InputError(subject, f"the injection ({injected.isoformat()}) is after the scan "
                                      f"start ({scanned.isoformat()}); check the dates and times")
    decayed_dose_bq = dose_bq * 2.0 ** (-decay_time_s / half_life_s)
    factor = weight_kg * 1000.0 / decayed_dose_bq
    record.update(
        conversion="SUVbw = A[Bq/mL] x weight[g] / (dose[Bq] x 2^(-dt/T_half))",
        factor=factor,
        weight_kg=weight_kg,
        injected_dose_bq=dose_bq,
        half_life_s=half_life_s,
        decay_correction=decay_correction,
        injection_time=injected.isoformat() if injected else None,
        reference_time=scanned.isoformat() if scanned else None,
        decay_time_reference=reference,
        decay_time_s=decay_time_s,
        decayed_dose_bq=decayed_dose_bq,
    )
    return factor, record
