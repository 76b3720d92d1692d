"""What every benchmark script shares: the machine record and writing its JSON + markdown."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import jax

from vbseg.io.volume import write_text_atomic

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    """CPU count, platform and JAX backend, recorded next to every timing."""
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "jax": jax.__version__,
            "backend": jax.default_backend()}


def write_results(out, name: str, record: dict, markdown: str) -> None:
    """``out/name.json`` (the full record) and ``out/name.md`` (the report), both atomically."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / f"{name}.json", json.dumps(record, indent=1, default=float) + "\n")
    write_text_atomic(out / f"{name}.md", markdown)


def write_report(out, name: str, record: dict, doc: str, table: str, note: str = "") -> None:
    """:func:`write_results` with the markdown every benchmark writes: a title, the first
    paragraph of the script's docstring, the table, an optional note and the machine."""
    write_results(out, name, record, f"# {name}\n\n" + doc.split("\n\n")[0] + "\n\n" + table
                  + f"\n{note}Machine: {record['machine']}\n")
