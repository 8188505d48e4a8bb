"""Shared by the job tests: driving a generator, a tiny PathoTune backbone card, rectangle
annotations in level-0 px, and where the 32 labelled H&E tiles live."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from level0_shapes import rect

from napari_gpfm.jobs import Progress

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "sample_data" / "CMU-1-Small-Region.svs"
# shared/ sits beside the repository (see ../shared/data/SOURCES.md)
TILES = REPO.parent / "shared" / "data" / "tiles" / "crc-he" / "CRC-VAL-HE-7K"


def drive(gen, on_record: Any = None) -> tuple[list[Progress], Any]:
    """(every record, the return value) of a job generator; ``on_record(record)`` sees each."""
    records = []
    while True:
        try:
            records.append(next(gen))
        except StopIteration as stop:
            return records, stop.value
        if on_record is not None:
            on_record(records[-1])


def assert_progress(records: list, job: str, first: str = "started") -> None:
    """Only Progress records of ``job``, sane counts, ``first`` first and a done last."""
    assert records and all(type(r) is Progress for r in records), [type(r) for r in records]
    assert {r.job for r in records} == {job}
    assert records[0].status == first and records[-1].status == "done"
    for r in records:
        assert r.status in ("started", "running", "done", "skipped", "note"), r
        assert r.done >= 0 and r.total >= 0 and isinstance(r.stage, str) and r.stage
        if r.total:
            assert r.done <= r.total, r


def annotation(cls: str, x0: float, y0: float, x1: float, y1: float):
    from napari_gpfm.annotations.geojson import Annotation

    return Annotation(polygons=[[rect(x0, y0, x1, y1)]], class_name=cls)
