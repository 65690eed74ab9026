"""``python -m bench <question> [options]``: dispatch to the module that answers the question.

Each question module has ``add_arguments(parser)`` and ``run(args, result)``. Only the chosen
module is imported (a broken or slow import elsewhere does not stop the others); this entry point
builds its parser, sets the torch thread count, and hands it a :class:`bench.harness.Result` that
the module fills and this entry point finishes (wall time, JSON).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# question -> (module, one line on what it measures)
QUESTIONS = {
    "swap": ("bench.swap", "task-switch cost against the alternatives; cold load; exactness"),
    "storage": ("bench.storage", "bytes per changed weight: file sizes, reference format, memory"),
    "http": ("bench.http_load", "HTTP vs in-process, throughput by requests in flight, many tasks"),
    "catalog": ("bench.catalog", "catalog list/filter latency with many registered adapters"),
    "determinism": ("bench.determinism", "throughput cost of the deterministic (padded) mode"),
    "mixed": ("bench.mixed", "mixed-task batches: correction cost, against grouped swaps and PEFT"),
    "accuracy": (
        "bench.accuracy",
        "what CMKD and RST buy: seeds, paired differences, CIs (the study)",
    ),
    "rst_layers": ("bench.rst_layers", "where a sparse adapter's changed weights sit, per layer"),
    "rst_overhead": ("bench.rst_overhead", "training-step time of RST against plain fine-tuning"),
    "zeroshot": (
        "bench.zeroshot",
        "the default base's WordNet text side: embedding variants, scale",
    ),
    "base_flood": ("bench.base_flood", "prediction latency under a flood of GET /base calls"),
    "plots": ("bench.plots", "PNG plots and Markdown tables from result files"),
}


def build_parser(question: str | None) -> argparse.ArgumentParser:
    """The top-level parser, with the full options of ``question`` only (the others listed)."""
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=(__doc__ or "").split("\n\n")[0]
    )
    sub = parser.add_subparsers(dest="question", required=True, metavar="QUESTION")
    for name, (path, help_) in QUESTIONS.items():
        if name == question:
            module = importlib.import_module(path)
            p = sub.add_parser(
                name,
                help=help_,
                description=module.__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter,
            )
            module.add_arguments(p)
        else:
            sub.add_parser(name, help=help_, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    question = next((a for a in argv if a in QUESTIONS), None)
    args = build_parser(question).parse_args(argv)
    module = importlib.import_module(QUESTIONS[args.question][0])
    if not hasattr(args, "out"):  # a tool, not a measurement (plots): no result file
        return int(module.run(args, None) or 0)
    import torch

    from bench.harness import Result

    torch.set_num_threads(args.threads)
    result = Result(args.question, args)
    module.run(args, result)
    result.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
