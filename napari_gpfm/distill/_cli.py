"""``napari-gpfm distill --config FILE [key=value ...]`` (also under ``torchrun``).

``register(subparsers)`` adds the sub-command; ``python -m napari_gpfm.distill`` runs it alone,
which is the form ``torchrun --nproc-per-node N -m napari_gpfm.distill ...`` uses.
"""

from __future__ import annotations

import argparse
import logging
import sys

from napari_gpfm.errors import NapariGpfmError, error_line

HELP = "train a student with GPFM unified knowledge distillation"


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``distill`` sub-command to the ``napari-gpfm`` parser."""
    parser = subparsers.add_parser("distill", help=HELP, description=HELP)
    parser.add_argument(
        "--config", default=None,
        help="experiment YAML (overrides of configs/default.yaml) or a bundled experiment name",
    )
    parser.add_argument(
        "--init", default=None, metavar="MODEL_OR_FILE",
        help="start the student (and its teacher) from a registry model (e.g. gpfm: also sets "
             "student.arch/kwargs/layerscale_init) or a weights file (GPFM release, timm or "
             "Hugging Face layout); same as student.init=...",
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="key.sub=value",
        help="config overrides applied last, values parsed as YAML (e.g. train.steps=100)",
    )
    parser.set_defaults(func=run)
    return parser


def config_overrides(overrides: list[str], init: str | None) -> list[str]:
    """``--init``'s ``key=value`` pairs (:func:`~napari_gpfm.distill.config.init_overrides`),
    then the command line's own overrides (which win)."""
    if init is None:
        return list(overrides)
    from .config import init_dotlist

    return init_dotlist(init) + list(overrides)


def run(args: argparse.Namespace) -> int:
    """Merge the config, train, and print where the student went; returns the exit code.

    Bad input (a config value, a missing expert's weights, an unreadable checkpoint, an
    ``OSError``) is one ``error:`` line and exit code 2, also under ``python -m`` / ``torchrun``;
    what the run decides on its own (e.g. resuming by scanning when ``LATEST`` is damaged), what
    ``--init`` loaded (tensors, missing and unexpected keys) and the collapse guard's warning are
    printed as ``note: ...`` on stderr when they happen; the progress bar shows the loss and the
    teacher's image-dependent information (``info``, nats).
    """
    from .config import load_config
    from .distributed import shutdown
    from .train import NonFiniteLossError, run_distillation

    logger = logging.getLogger("napari_gpfm.distill")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("note: %(message)s"))
    handler.setLevel(logging.WARNING)
    logger.addHandler(handler)
    try:
        init = getattr(args, "init", None)  # callers may build the Namespace themselves
        cfg = load_config(args.config, config_overrides(args.overrides, init))
        result = run_distillation(cfg)
    except (NapariGpfmError, OSError, NonFiniteLossError) as exc:
        print(error_line(exc), file=sys.stderr)
        return 2
    finally:
        logger.removeHandler(handler)
        shutdown()
    if result.card_path is not None:
        print(f"exported student card {result.card_path} and weights {result.weights_path}")
    elif not result.finished:
        print(f"stopped at step {result.next_step}/{result.total_steps}; checkpoint "
              f"{result.checkpoint} (run again to resume)")
    return 0
