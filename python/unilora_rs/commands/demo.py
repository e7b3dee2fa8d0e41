"""``unilora demo``: the main job end to end on a real model and real text, offline
(the work itself is in :mod:`unilora_rs.demo`)."""

from __future__ import annotations

import argparse

from ..demo.options import ClassifierDemoArgs
from ..flags import add_flags, given_flags
from ..train_options import FinetuneArgs


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "demo",
        help="fine-tune, evaluate, merge and export all-MiniLM-L6-v2 on real sentiment data",
        description=(
            "Trains a Uni-LoRA adapter on 3,000 real movie-review sentences, evaluates on "
            "2,000 held-out ones against the frozen model with a trained head, merges the "
            "adapter with the Rust merge, exports ONNX and checks that every form predicts "
            "the same labels. Offline: model and data come from installed packages."
        ),
    )
    add_flags(p, ClassifierDemoArgs, "demo")
    add_flags(p, FinetuneArgs, "demo")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..demo import classifier

    demo = ClassifierDemoArgs(**given_flags(args, ClassifierDemoArgs, "demo"))
    return classifier.run(demo, given_flags(args, FinetuneArgs, "demo"))
