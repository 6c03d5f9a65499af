"""``crow`` command line: a thin dispatcher over the importable API. A user mistake is one line on stderr
(``--debug``: the traceback). Exit codes: 0 ok, 1 internal error, 2 bad input, 3 training diverged (NaN/inf loss),
130 interrupted (SIGTERM too; resumable with ``--resume``)."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import signal
import sys
import threading
import warnings
from typing import NoReturn

from ..errors import CrowError, Interrupted, TrainingDiverged

# verb -> module in crow.cli that defines add_arguments(parser) and run(args)
VERBS = {
    "demo": "Watch a backdoor go into a real LLM and come out with CROW (offline, CPU).",
    "attack": "Poison instruction data with a trigger and target (BackdoorLLM attacks); train a victim.",
    "purify": "Remove a backdoor: train on clean samples (CROW, unlearn, baselines); write an adapter or model.",
    "eval": "Measure attack success rate, false-trigger rate and clean perplexity.",
    "scan": "Is this model backdoored, and what does it say when triggered? (BAIT; no trigger knowledge).",
    "guard": "Fit a per-prompt trigger detector on clean prompts (LCF, ONION, target); score and flag prompts.",
    "profile": "Per-layer consistency of a model on clean vs triggered prompts (plot + JSON).",
    "bench": "Run a models x tasks x attacks x defenses benchmark, resumable, with a paper-style table.",
    "data": "Download the BackdoorLLM data `crow bench` uses (`crow data fetch backdoorllm --out DIR`), hash-checked.",
    "env": "Print versions of crow and its dependencies (for bug reports).",
}


class Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line naming the verb and pointing to --help."""

    def error(self, message: str):
        raise CrowError(f"{message} (see `{self.prog} --help`)")


def build_parser() -> Parser:
    parser = Parser(prog="crow", description="crow: detect, remove and measure backdoors in LLMs.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=Parser)
    sub.required = True
    for verb, help_text in VERBS.items():
        module = importlib.import_module(f".{verb}_cmd", __package__)
        p = sub.add_parser(verb, help=help_text, description=help_text)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks and debug logs")
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def setup_logging(debug: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, format="crow: %(message)s",
                        stream=sys.stderr, force=True)
    for noisy in ("transformers", "peft", "accelerate", "datasets", "huggingface_hub", "urllib3", "filelock",
                  "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if debug else logging.ERROR)
    if not debug:
        warnings.filterwarnings("ignore")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        import transformers
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Turn SIGTERM into KeyboardInterrupt while a verb runs, so the ``finally`` blocks that remove staged outputs run
    (``crow purify`` installs its own handler during training)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # raises KeyboardInterrupt
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    prog = "crow"
    try:
        args = build_parser().parse_args(argv)
        prog = f"crow {args.verb}"
        setup_logging(debug)
        with sigterm_as_interrupt():
            return int(args._run(args) or 0)
    except SystemExit as e:  # --help, or a verb's explicit exit
        return int(e.code or 0) if isinstance(e.code, int) else 0
    except (CrowError, TrainingDiverged, Interrupted) as e:
        if debug:
            raise
        print(f"{prog}: error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug in crow or a library: one line unless --debug
        if debug:
            raise
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        print(f"{prog}: internal error: {type(e).__name__}: {first} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1


def exit_process(code: int) -> NoReturn:
    """End this process with ``code``: ``sys.exit``, or in a torch.distributed run flush and ``os._exit``, since the
    process group's destructors at teardown can abort a rank and ``destroy_process_group`` can deadlock."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)
    sys.exit(code)


def cli() -> NoReturn:
    """The ``crow`` command: :func:`main`, then the exit."""
    exit_process(main())


if __name__ == "__main__":
    cli()
