"""``unilora demo``: the main jobs end to end on real models and real text, offline
(the work itself is in :mod:`unilora_rs.demo`)."""

from __future__ import annotations

import argparse

from ..demo.options import DEMOS, DemoArgs
from ..demo.workdir import record_written
from ..extras import require
from ..flags import add_flags, given_flags
from ..train_options import FinetuneArgs


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "demo",
        help="fine-tune, evaluate, merge and export a real model on real data (classifier, llm)",
        description=(
            "classifier (the default): trains a Uni-LoRA adapter of all-MiniLM-L6-v2 on "
            "3,000 real movie-review sentences, evaluates on 2,000 held-out ones against "
            "the frozen model with a trained head, merges the adapter with the Rust merge, "
            "exports ONNX and checks that every form predicts the same labels. "
            "llm: instruction-tunes SmolLM2-135M-Instruct to answer whether a review is "
            "positive or negative, judges it by its generated answers before and after, "
            "exports a llama.cpp LoRA GGUF and runs it in llama.cpp on the same prompts. "
            "Offline: models and data come from installed packages."
        ),
    )
    p.add_argument("which", nargs="?", choices=DEMOS, default="classifier", help="which demo")
    add_flags(p, DemoArgs, "demo")
    add_flags(p, FinetuneArgs, "demo")
    p.set_defaults(run=run)


#: The training task of each demo.
_TASKS = {"classifier": "classification", "llm": "sft"}


def run(args: argparse.Namespace) -> int:
    demo = DemoArgs(**given_flags(args, DemoArgs, "demo")).for_demo(args.which)
    training = given_flags(args, FinetuneArgs, "demo")
    # every option is checked before the demo touches its folder
    FinetuneArgs(**{"task": _TASKS[args.which], **training}).check()
    assert demo.out is not None
    # every package, model and data the demo uses, checked before it starts
    if args.which == "llm":
        require("unilora demo llm")
    else:
        require("unilora demo" if demo.onnx else "unilora demo --no-onnx")
    try:
        if args.which == "llm":
            from ..demo import llm

            return llm.run(demo, training)
        from ..demo import classifier

        return classifier.run(demo, training)
    finally:
        record_written(demo.out)
