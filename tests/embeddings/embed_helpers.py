"""Helpers for the embeddings tests: a tiny model card, failing encoders, store surgery."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tiny_models import tiny_card

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "sample_data" / "CMU-1-Small-Region.svs"
TINY = "tiny-test"

TINY_CARD = tiny_card(TINY, 224)


def write_card_dir(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tiny-test.yaml").write_text(TINY_CARD)
    return directory


class FailingEncoder:
    """Wraps an encoder; ``embed`` raises after ``fail_after`` successful batches."""

    def __init__(self, inner: Any, fail_after: int) -> None:
        self.inner = inner
        self.fail_after = fail_after
        self.calls = 0
        self.card = inner.card
        self.model = inner.model
        self.weights_sha256 = inner.weights_sha256
        self.embed_dim = inner.embed_dim

    def preprocess(self, x: Any) -> Any:
        return self.inner.preprocess(x)

    def embed(self, x: Any) -> Any:
        if self.calls >= self.fail_after:
            raise RuntimeError("injected failure (simulated crash)")
        self.calls += 1
        return self.inner.embed(x)


def strip_integrity(f: Any) -> None:
    """Make an open (``"a"``) store look written before checksums existed (no metadata digest,
    no coords or features checksums): how older stores are read."""
    for key in ("gpfm_meta_sha256", "gpfm_checksum", "gpfm_coords_checksum", "gpfm_n_nonfinite"):
        if key in f.attrs:
            del f.attrs[key]
    if "gpfm_checksums" in f:
        del f["gpfm_checksums"]


class NaNEncoder(FailingEncoder):
    """Wraps an encoder; ``embed`` gives NaN in the first ``rows`` rows of every batch."""

    def __init__(self, inner: Any, rows: int = 1) -> None:
        super().__init__(inner, fail_after=10**9)
        self.rows = rows

    def embed(self, x: Any) -> Any:
        out = self.inner.embed(x).clone()
        out[: self.rows] = float("nan")
        return out


def flip_byte(path: Path, dataset: str, byte: int) -> None:
    """Flip one bit of byte ``byte`` of ``dataset``'s raw data in the file (bit rot)."""
    import h5py

    with h5py.File(path, "r") as f:
        offset = f[dataset].id.get_offset()
    assert offset is not None, f"{dataset} is not contiguous"
    with open(path, "r+b") as fh:
        fh.seek(offset + byte)
        b = fh.read(1)
        fh.seek(offset + byte)
        fh.write(bytes([b[0] ^ 0x10]))
