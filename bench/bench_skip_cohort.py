"""Benchmark re-running ``napari-gpfm embed`` over a finished cohort with a ViT-L checkpoint.

Issue 14: a finished slide must be skipped without building the model or hashing the weights
again; goal: a re-run over a finished cohort of 10 slides takes < 5 s in total.

Set-up, in a temporary folder deleted at the end:

1. a ViT-L/14 checkpoint of the GPFM card's architecture (``timm.create_model(
   "vit_large_patch14_dinov2", img_size=224, init_values=1e-5, num_classes=0)``, 303 M
   parameters, random values) in GPFM's release layout (``backbone.`` prefix, blocks in 4
   FSDP chunks, ``mask_token``) as ``GPFM.safetensors``: 1.2 GB in fp32 like the real
   ``GPFM.pth`` (``--dtype fp16``: 0.6 GB). It is streamed to disk tensor by tensor (hashed as
   it is written), and checked to be what the ``gpfm`` converter turns into exactly the model's
   keys and shapes, without building the model. ``$GPFM_WEIGHTS`` points the card at it.
2. ``--slides`` copies of the bundled sample slide, each made a distinct file (bytes appended
   after the TIFF data, which readers ignore) since a store records its slide's fingerprint;
3. for each, a FINISHED store under exactly the recipe ``embed`` looks for (the one
   :func:`napari_gpfm.jobs.embed.find_store_for` builds: card, weights sha256, the card's
   tiling, default tissue parameters) holding random features of the slide's patch grid,
   written with ``StoreWriter``; no ViT-L is run.

Then ``napari-gpfm embed <slides> --out DIR --model gpfm`` runs in subprocesses with an empty
digest cache (``$NAPARI_GPFM_CACHE_DIR``):

- a guarded run first (the same CLI through ``python -c``, with building any encoder replaced
  by an error): proves the model is never built (it would fail with exit code 2), so a wrong
  recipe cannot start embedding with ViT-L;
- the first timed run (its own empty cache: the weights are hashed once, from the page cache
  since the file was just written; a cold disk adds its read time);
- ``--repeats`` timed re-runs (the digest comes from the cache: no weights are read).

Each run must exit 0 and print ``skipped`` for every slide (a store found before the model is
built) and never show the ``loading model`` stage. Baselines measured in the same run: hashing
the checkpoint once in-process (what every re-run cost before the persistent digest cache);
what a process pays in imports before any slide (``python -c "import ..."``: the skip path's
modules, then with timm, then with the dispatcher's napari/Qt sub-command too); and the skip of
the whole cohort in-process once those imports are done (``napari_gpfm.jobs._cli.main`` timed
in a process that imported everything first). Prints a table and the README line. Example::

    python bench/bench_skip_cohort.py                     # 10 slides, fp32 checkpoint
    python bench/bench_skip_cohort.py --dtype fp16 --repeats 5
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ARCH = dict(img_size=224, init_values=1e-5, num_classes=0)
BLOCK_CHUNKS = 4  # DINOv2's FSDP chunking in GPFM's release file
DTYPES = {"fp32": (np.float32, "F32"), "fp16": (np.float16, "F16")}


# -- the checkpoint ------------------------------------------------------------------------------
def vit_l_shapes() -> dict[str, tuple[int, ...]]:
    """The timm state dict's names and shapes (built on the meta device: no memory, no init)."""
    import timm
    import torch

    with torch.device("meta"):
        model = timm.create_model("vit_large_patch14_dinov2", pretrained=False, **ARCH)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def release_key(key: str, depth: int) -> str:
    """timm key -> GPFM release key: ``backbone.`` prefix, ``blocks.<chunk>.<i>.`` (global i)."""
    parts = key.split(".")
    if parts[0] == "blocks":
        i = int(parts[1])
        chunk = i // (depth // BLOCK_CHUNKS)
        key = ".".join(["blocks", str(chunk), str(i), *parts[2:]])
    return "backbone." + key


def write_checkpoint(path: Path, shapes: dict[str, tuple[int, ...]], dtype: str,
                     seed: int = 0) -> str:  # fmt: skip
    """Stream a safetensors file of random N(0, 0.02) tensors; returns its sha256."""
    np_dtype, st_dtype = DTYPES[dtype]
    depth = 1 + max(int(k.split(".")[1]) for k in shapes if k.startswith("blocks."))
    tensors = {release_key(k, depth): s for k, s in shapes.items()}
    tensors["backbone.mask_token"] = (1, shapes["cls_token"][-1])  # dropped by the converter
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    itemsize = np.dtype(np_dtype).itemsize
    for name, shape in tensors.items():
        n = int(np.prod(shape)) * itemsize
        header[name] = {"dtype": st_dtype, "shape": list(shape),
                        "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    rng = np.random.default_rng(seed)
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for chunk in (len(head).to_bytes(8, "little"), head):
            f.write(chunk)
            digest.update(chunk)
        for shape in tensors.values():
            data = (rng.standard_normal(int(np.prod(shape)), dtype=np.float32) * 0.02)
            raw = data.astype(np.dtype(np_dtype).newbyteorder("<")).tobytes()
            f.write(raw)
            digest.update(raw)
    return digest.hexdigest()


def check_checkpoint(path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """The ``gpfm`` converter turns the file's keys into exactly the model's keys and shapes."""
    from safetensors import safe_open

    from napari_gpfm.encoders.checkpoint import convert_checkpoint, detect_layout

    with safe_open(str(path), framework="np") as f:
        found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    assert detect_layout(found) == "gpfm", detect_layout(found)
    converted = convert_checkpoint(found, "gpfm", path=path)
    assert converted == shapes, set(converted) ^ set(shapes)


# -- slides and stores ---------------------------------------------------------------------------
def make_slides(folder: Path, n: int) -> list[Path]:
    from napari_gpfm._resources import sample_slide_path

    folder.mkdir()
    src = sample_slide_path()
    out = []
    for i in range(n):
        p = folder / f"case-{i:02d}.svs"
        shutil.copyfile(src, p)
        with open(p, "ab") as f:  # after the TIFF data: readers ignore it, the fingerprint not
            f.write(f"napari-gpfm bench copy {i}\n".encode() * (i + 1))
        out.append(p)
    return out


def write_finished_stores(slides: list[Path], out: Path, digest: str) -> int:
    """A finished store per slide under the recipe `find_store_for` builds; returns patches."""
    from napari_gpfm.embeddings import StoreWriter, recipe_store_path
    from napari_gpfm.embeddings.run import default_spec, make_recipe
    from napari_gpfm.encoders import get_card
    from napari_gpfm.slide import open_slide, slide_fingerprint
    from napari_gpfm.tiles import TissueParams, detect_tissue, make_grid

    card = get_card("gpfm")
    assert card.status().found and Path(card.status().path) == Path(os.environ["GPFM_WEIGHTS"])
    spec = default_spec(SimpleNamespace(card=card))  # the CLI's tiling without options
    tissue_params = TissueParams()
    rng = np.random.default_rng(1)
    fingerprints, total = set(), 0
    for path in slides:
        slide = open_slide(path)
        try:
            recipe = make_recipe(SimpleNamespace(card=card, weights_sha256=digest), slide, spec,
                                 tissue_params)  # fmt: skip
            grid = make_grid(slide, spec, detect_tissue(slide, tissue_params),
                             encoder_input=card.input.size)  # fmt: skip
            fp = slide_fingerprint(slide)
            fingerprints.add(fp.to_json())
            w = StoreWriter.create(
                recipe_store_path(out, recipe, slide.name), recipe=recipe, coords=grid.coords,
                embed_dim=card.embed_dim, slide_name=slide.name,
                level0_width=grid.level0_width, level0_height=grid.level0_height,
                tissue_fraction=grid.tissue_fraction, slide_fingerprint=fp,
            )  # fmt: skip
            w.write(rng.standard_normal((len(grid), card.embed_dim), dtype=np.float32))
            w.finish()
            total += len(grid)
        finally:
            slide.close()
    assert len(fingerprints) == len(slides), "the slide copies are not distinct files"
    return total


# -- runs ----------------------------------------------------------------------------------------
GUARD = textwrap.dedent("""
    import sys
    import napari_gpfm.encoders as encoders
    import napari_gpfm.jobs.embed as job

    def refuse(*args, **kwargs):
        raise RuntimeError("BENCH GUARD: the model was about to be built")

    job._encoder = refuse
    encoders.load_encoder = refuse
    from napari_gpfm.cli import main
    sys.exit(main(sys.argv[1:]))
""")


#: The skip itself, imports done first: ``napari_gpfm.jobs._cli.main`` timed in-process.
WORK = textwrap.dedent("""
    import contextlib, io, sys, time
    import h5py, timm, torch
    import napari_gpfm.embeddings.run, napari_gpfm.jobs._cli as cli
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()) as out:
        rc = cli.main(sys.argv[2:])
    print(f"{time.perf_counter() - t0} {rc} {out.getvalue().count('skipped')}")
""")

#: What a process pays before any slide: (label, modules imported).
IMPORTS = [
    ("interpreter + the skip path's imports (`napari_gpfm.jobs._cli`, torch, h5py)",
     "napari_gpfm.jobs._cli, torch, h5py"),
    ("… + timm (`recipe.current_versions` imports it for its version)",
     "napari_gpfm.jobs._cli, torch, h5py, timm"),
    ("… + `napari_gpfm._qt._cli` (the `napari-gpfm` dispatcher registers it: napari, Qt)",
     "napari_gpfm.jobs._cli, torch, h5py, timm, napari_gpfm._qt._cli"),
]  # fmt: skip


def cli_command() -> list[str]:
    script = Path(sys.executable).parent / "napari-gpfm"
    return [str(script)] if script.exists() else [sys.executable, "-m", "napari_gpfm.cli"]


GNU_TIME = shutil.which("time", path="/usr/bin:/bin")


def run(cmd: list[str], env: dict[str, str], logs: Path) -> dict:
    """Run ``cmd``; wall time, exit code, stdout, stderr and the peak RSS of the process (from
    GNU ``time``, whose own small process forks it: this process's ``RUSAGE_CHILDREN`` would
    count this process's memory at fork time; ``nan`` without GNU time)."""
    logs.mkdir(parents=True, exist_ok=True)
    out_path, err_path, rss_path = logs / "stdout.txt", logs / "stderr.txt", logs / "rss.txt"
    wrapper = [GNU_TIME, "-f", "%M", "-o", str(rss_path)] if GNU_TIME else []
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        t0 = time.perf_counter()
        rc = subprocess.run([*wrapper, *cmd], stdout=out, stderr=err, env=env, cwd=REPO).returncode
        wall = time.perf_counter() - t0
    try:
        rss_mb = int(rss_path.read_text().split()[-1]) / 1024
    except (OSError, ValueError, IndexError):
        rss_mb = float("nan")
    return {"wall_s": wall, "rc": rc, "maxrss_mb": rss_mb, "stdout": out_path.read_text(),
            "stderr": err_path.read_text()}  # fmt: skip


def check_skipped(res: dict, n: int, what: str) -> None:
    lines = res["stdout"].splitlines()
    skipped = [ln for ln in lines if ln.startswith("skipped")]
    problems = []
    if res["rc"] != 0:
        problems.append(f"exit code {res['rc']}")
    if len(skipped) != n:
        problems.append(f"{len(skipped)} of {n} slides skipped")
    if "loading model" in res["stderr"] or "BENCH GUARD" in res["stderr"]:
        problems.append("the model was built (or about to be)")
    if problems:
        raise SystemExit(f"{what}: " + "; ".join(problems) + f"\n--- stdout\n{res['stdout']}"
                         f"\n--- stderr (tail)\n{res['stderr'][-3000:]}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slides", type=int, default=10)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--repeats", type=int, default=3, help="timed re-runs with the cache")
    ap.add_argument("--tmp", type=Path, default=None, help="where the temporary folder goes")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-skip-cohort-", dir=args.tmp) as tmp_name:
        tmp = Path(tmp_name)
        ckpt = tmp / "GPFM.safetensors"
        models_dir = tmp / "no-user-models"
        models_dir.mkdir()
        env = {k: v for k, v in os.environ.items()
               if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}  # fmt: skip
        env.update(GPFM_WEIGHTS=str(ckpt), NAPARI_GPFM_MODELS_DIR=str(models_dir))
        os.environ.update(GPFM_WEIGHTS=str(ckpt), NAPARI_GPFM_MODELS_DIR=str(models_dir),
                          NAPARI_GPFM_CACHE_DIR=str(tmp / "cache-setup"))  # fmt: skip

        t0 = time.perf_counter()
        shapes = vit_l_shapes()
        digest = write_checkpoint(ckpt, shapes, args.dtype)
        check_checkpoint(ckpt, shapes)
        t_ckpt = time.perf_counter() - t0
        size_gb = ckpt.stat().st_size / 1e9
        n_params = sum(int(np.prod(s)) for s in shapes.values())
        print(f"checkpoint: {n_params / 1e6:.0f} M parameters, {args.dtype}, {size_gb:.2f} GB, "
              f"written and checked in {t_ckpt:.1f} s")  # fmt: skip

        from napari_gpfm.encoders.checkpoint import sha256_file

        t0 = time.perf_counter()
        assert sha256_file(ckpt) == digest
        t_hash = time.perf_counter() - t0

        slides = make_slides(tmp / "slides", args.slides)
        out = tmp / "features"
        t0 = time.perf_counter()
        patches = write_finished_stores(slides, out, digest)
        print(f"{len(slides)} slides, {patches} patches in finished stores "
              f"(written in {time.perf_counter() - t0:.1f} s)")  # fmt: skip

        argv = ["embed", *map(str, slides), "--out", str(out), "--model", "gpfm"]
        floors = [run([sys.executable, "-c", f"import {mods}"], env, tmp / f"logs-import-{i}")
                  for i, (_, mods) in enumerate(IMPORTS)]  # fmt: skip
        for res, (label, _) in zip(floors, IMPORTS):
            assert res["rc"] == 0, (label, res["stderr"][-2000:])
        guarded = run([sys.executable, "-c", GUARD, *argv],
                      {**env, "NAPARI_GPFM_CACHE_DIR": str(tmp / "cache-guard")},
                      tmp / "logs-guard")  # fmt: skip
        check_skipped(guarded, len(slides), "guarded run")
        print(f"guarded run: {len(slides)} skipped, no model built ({guarded['wall_s']:.1f} s)")

        env_runs = {**env, "NAPARI_GPFM_CACHE_DIR": str(tmp / "cache")}
        first = run([*cli_command(), *argv], env_runs, tmp / "logs-first")
        check_skipped(first, len(slides), "first run")
        again = []
        for i in range(args.repeats):
            res = run([*cli_command(), *argv], env_runs, tmp / f"logs-again-{i}")
            check_skipped(res, len(slides), f"re-run {i + 1}")
            again.append(res)
        work = run([sys.executable, "-c", WORK, *argv], env_runs, tmp / "logs-work")
        work_s, work_rc, work_skipped = work["stdout"].split()
        assert (work_rc, work_skipped) == ("0", str(len(slides))), work
        work_s = float(work_s)
        cache = json.loads((tmp / "cache" / "weights-digests.json").read_text())
        assert [e["sha256"] for e in cache["entries"].values()] == [digest], cache
        disk_mb = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file()) / 1e6
        self_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    t_again = statistics.median(r["wall_s"] for r in again)
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}; {len(slides)} slides, checkpoint "
          f"{size_gb:.2f} GB ({args.dtype})\n")  # fmt: skip
    print("| | wall time | peak RSS |")
    print("|---|---:|---:|")
    for res, (label, _) in zip(floors, IMPORTS):
        print(f"| {label} | {res['wall_s']:.2f} s | {res['maxrss_mb']:.0f} MB |")
    print(f"| hashing the checkpoint once, in-process (page cache warm) | {t_hash:.2f} s | |")
    print(f"| skipping the {len(slides)} slides in-process, imports done "
          f"(`jobs._cli.main`, digest cached) | {work_s:.2f} s | |")
    print(f"| `napari-gpfm embed`, first run (empty digest cache: hashes the weights once) | "
          f"{first['wall_s']:.2f} s | {first['maxrss_mb']:.0f} MB |")
    each = ", ".join(f"{r['wall_s']:.2f}" for r in again)
    print(f"| `napari-gpfm embed`, re-run (digest cached; median of {len(again)}: {each}) | "
          f"{t_again:.2f} s | {max(r['maxrss_mb'] for r in again):.0f} MB |")
    floor = floors[0]["wall_s"]
    print(f"\nre-run / first run: {t_again / first['wall_s']:.2f}; the weights digest is "
          f"{first['wall_s'] - t_again:+.2f} s of the first run; imports are "
          f"{floors[-1]['wall_s']:.2f} s of the re-run ({floors[-1]['wall_s'] / t_again:.0%}), "
          f"the {len(slides)} skips {work_s:.2f} s ({work_s / len(slides) * 1e3:.0f} ms per "
          f"slide); without timm and napari/Qt imported the re-run would be about "
          f"{floor + work_s:.1f} s. Every run printed 'skipped' {len(slides)} times and never "
          "built the model (the guarded run refuses to)")  # fmt: skip
    print(f"temporary disk: {disk_mb:,.0f} MB (deleted); this process peaked at "
          f"{self_rss:,.0f} MB RSS")  # fmt: skip
    verdict = "met" if t_again < 5 else "NOT met"
    print(f"\nREADME: re-running embed on a finished cohort of {len(slides)} slides (ViT-L "
          f"checkpoint present): {first['wall_s']:.1f} s first run (hashes the weights once), "
          f"{t_again:.1f} s after; goal < 5 s ({verdict})")  # fmt: skip


if __name__ == "__main__":
    main()
