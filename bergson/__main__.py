"""The ``bergson`` command line.

    bergson build OUT [--model M] [--dataset D] [options]     build a gradient index
    bergson OUT [--model M] [--dataset D] [options]           the same (short form)
    bergson query INDEX --prompt P [--completion C]           top training examples for one query
    bergson score INDEX --queries FILE --output OUT           scores for many queries, to disk
    bergson trackstar OUT --queries FILE [build options]      build, statistics, mixing and scoring

Heavy imports (transformers, datasets) happen only once a command runs, so ``--help`` is fast.
"""

from __future__ import annotations

import argparse
import sys

COMMANDS = ("build", "query", "score", "trackstar")


def make_parser() -> argparse.ArgumentParser:
    from .config import BuildConfig, QueryConfig, ScoreConfig, TrackstarConfig, parser_for

    parser = argparse.ArgumentParser(
        prog="bergson",
        description="Trace what a model learned back to its training data: per-example projected gradients "
        "(TrackStar). `bergson OUT` is short for `bergson build OUT`.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    build = sub.add_parser(
        "build",
        help="write the projected, normalized gradient of every training example to an index directory",
        description="Write the projected, normalized gradient of every example of a dataset to OUTPUT "
        "(safetensors shards + manifest.json). Without --model/--dataset, runs on the embedded default.",
    )
    parser_for(BuildConfig, build)
    query = sub.add_parser(
        "query", help="print the training examples that most drove a completion",
        description="Score one query (prompt + completion) against every row of INDEX and print the top ones.",
    )
    parser_for(QueryConfig, query)
    score = sub.add_parser(
        "score", help="score many queries against an index and write the scores",
        description="Score every query of a file against INDEX; write top-k (or all-pairs) scores as safetensors.",
    )
    parser_for(ScoreConfig, score)
    track = sub.add_parser(
        "trackstar", help="build an index, fit statistics on the queries, and score them, end to end",
        description="TrackStar end to end: build (or resume) the index in OUTPUT, mix query and training "
        "autocorrelations, score every query, and write OUTPUT/scores.safetensors.",
    )
    parser_for(TrackstarConfig, track)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in COMMANDS and not argv[0].startswith("-"):
        argv.insert(0, "build")  # short form: bergson OUT ...
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from . import config, distributed
    from .storage import IndexFormatError

    started = False
    try:
        started = distributed.init_from_env()  # under torchrun: one process group for the run
        if args.command == "build":
            from .build import build

            _, summary = build(config.from_args(config.BuildConfig, args))
            if distributed.current().is_main:
                print(summary)
        else:
            from . import commands

            cls = {"query": config.QueryConfig, "score": config.ScoreConfig, "trackstar": config.TrackstarConfig}
            getattr(commands, args.command)(config.from_args(cls[args.command], args))
        return 0
    except (ValueError, IndexFormatError) as e:
        print(f"bergson: error: {e}", file=sys.stderr)
        return 2
    except distributed.DistributedError as e:
        print(f"bergson: error: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:
        if "backend" in str(e) or "Triton" in str(e):
            print(f"bergson: error: {e}", file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:
        print("\nbergson: interrupted; the shards written so far are kept: rerun with --resume", file=sys.stderr)
        return 130
    except OSError as e:
        print(f"bergson: error: {e}; the shards written so far are kept: rerun with --resume", file=sys.stderr)
        return 1
    finally:
        if started:
            distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
