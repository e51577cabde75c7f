"""The ``seqcpo`` command line.

    seqcpo train --config configs/demo.yaml [--key value ...]      train (MLE, CPO, ranked CPO, DPO, PSS)
    seqcpo negatives --config FILE.yaml --out DIR [--key value ...] fixed negatives + reference log-probs
    seqcpo generate ...                                            continuations under decoding configs
    seqcpo eval ...                                                win rate, MAUVE, ROUGE-L, report
    seqcpo ensemble --from A --to B --alphas 0,0.5,1 --out DIR     weight-space ensembles
    seqcpo reproduce GRID.yaml                                     a grid of arms: train, generate, evaluate

Every ``--key value`` after the known options overrides a field of the YAML config (docs/CONFIG.md), read
by the one config loader (:mod:`seqcpo.config_loader`): by the field's type, floats finite, ranges checked.
Errors in configs, flags and data end the command with one line naming the file, field or flag; Ctrl-C ends it
with one line saying how to resume (exit status 130).
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import logging
import os
import re
import signal
import sys
import threading


def _config(args, extra: list[str]):
    from seqcpo.training.config import load_config, parse_overrides

    return load_config(args.config, parse_overrides(extra))


def cmd_train(args, extra) -> int:
    from seqcpo.training.config import parse_overrides
    from seqcpo.training.run import train

    if args.dry_run:  # resolve config, model shape, data and first batch; print the plan (seqcpo.training.dry_run)
        from seqcpo.training.config import parse_overrides
        from seqcpo.training.dry_run import dry_run

        print(dry_run(args.config, parse_overrides(extra)))
        return 0
    cfg = _config(args, extra)
    out = train(cfg, output_dir_option="--output_dir" if "output_dir" in parse_overrides(extra) else "output_dir")
    out.pop("trainer", None)
    if int(os.environ.get("RANK", "0")) == 0:
        print("\nseqcpo train finished:")
        for k in ("output_dir", "final_checkpoint", "config", "log_history", "steps", "train_loss", "seconds"):
            note = " (as recorded when it finished: nothing was trained now)" if out.get("already_finished") else ""
            print(f"  {k:18s} {out[k]}" + (note if k == "seconds" else ""))
        print(f"  {'examples':18s} {out['examples']}")
        print(f"\nReload with plain transformers: AutoModelForCausalLM.from_pretrained({out['final_checkpoint']!r})")
    return 0


def _check_flags(values: dict, types: dict) -> dict:
    """Flags of a subcommand read by the one config loader: ``{"--flag": raw}`` and ``{"--flag": (type,
    rule)}`` -> ``{"--flag": value}``; ConfigError naming the flag (floats finite, ranges kept)."""
    from seqcpo.config_loader import ConfigError, check_value, coerce

    out = {}
    for flag, raw in values.items():
        tp, rule = types[flag]
        value = coerce(flag.lstrip("-").replace("-", "_"), raw, tp, flag)
        for v in value if isinstance(value, list) else [value]:
            why = check_value(v, rule) if rule else None
            if why:
                raise ConfigError(f"{flag} {raw}: {why}")
        out[flag] = value
    return out


def cmd_negatives(args, extra) -> int:
    from seqcpo.config_loader import check_output_dir
    from seqcpo.training.run import make_negatives, next_train_command

    args.shard_size = _check_flags({"--shard-size": args.shard_size}, {"--shard-size": (int, ">=1")})["--shard-size"]
    check_output_dir(args.out, "--out")
    cfg = _negatives_config(args, extra)
    out = make_negatives(cfg, args.out, shard_size=args.shard_size)
    print(json.dumps(out, indent=2))
    print(f"Train on them with: {next_train_command(args.config, extra, args.out)}")
    return 0


def _negatives_config(args, extra: list[str]):
    """The training config the negatives are made for. ``reference: precomputed`` is the config that will train on
    them (with ``--negatives_path``): here it is read as ``auto``, since the negatives' reference is always the
    starting model, and ``precomputed`` alone is refused without a folder of negatives."""
    import yaml

    from seqcpo.training.config import load_config, parse_overrides

    overrides = parse_overrides(extra)
    given = overrides.get("reference")
    if given is None and args.config:
        try:
            with open(args.config, encoding="utf-8") as fh:
                raw = yaml.safe_load(fh)
            given = raw.get("reference") if isinstance(raw, dict) else None
        except (OSError, yaml.YAMLError):
            given = None  # load_config says what is wrong with the file
    if given == "precomputed":
        overrides = {**overrides, "reference": "auto"}
    return load_config(args.config, overrides)


def cmd_ensemble(args, extra) -> int:
    from seqcpo.ensemble import interpolate_checkpoints

    from seqcpo.config_loader import check_output_dir

    alphas = _check_flags({"--alphas": ",".join(args.alphas)}, {"--alphas": (list[float], None)})["--alphas"]
    check_output_dir(args.out, "--out")
    with _sigterm_raises():  # a killed run removes its temp folder (hundreds of MB) like a Ctrl-C'd one
        paths = interpolate_checkpoints(args.from_, args.to, alphas, args.out)
    for a, p in zip(alphas, paths):
        print(f"alpha={a:g}\t{p}")
    return 0


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that cleanups (``finally``, ``except BaseException``) run."""


@contextlib.contextmanager
def _sigterm_raises():
    """Within the block, SIGTERM raises :class:`Terminated` (its default action ends the process at once, leaving
    temp files behind). Only the CLI installs it: a library must not take over a process's signals."""
    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread only
        yield
        return

    def handler(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def cmd_reproduce(args, extra) -> int:
    from seqcpo.grid import run_grid

    out = run_grid(args.grid, only=args.only, dry_run=args.dry_run, weights=args.weights)
    print(out)
    return 0


class _TrainHelp(argparse.Action):
    """``seqcpo train --help``: the fields of the config, grouped (data, seqcpo, transformers), read from
    ``SeqCPOConfig`` itself (imported only when asked: it pulls in transformers)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        import dataclasses

        from transformers import TrainingArguments

        from seqcpo.config_loader import add_field_flags
        from seqcpo.data import DataConfig
        from seqcpo.training.config import SeqCPOConfig

        data = {f.name for f in dataclasses.fields(DataConfig)}
        hf = {f.name for f in dataclasses.fields(TrainingArguments)}
        own = [f.name for f in dataclasses.fields(SeqCPOConfig) if f.init and f.name not in data | hf]
        add_field_flags(parser.add_argument_group("data (DataConfig)"), SeqCPOConfig, fields=data)
        add_field_flags(parser.add_argument_group("model, objective, negatives, reference, speed"), SeqCPOConfig,
                        fields=set(own))
        parser.add_argument_group(
            "transformers TrainingArguments (--field value; meanings in the transformers docs)",
            ", ".join(sorted(f.name for f in dataclasses.fields(TrainingArguments) if f.init)))
        parser.print_help()
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    from seqcpo.config_loader import FlagParser

    p = FlagParser(prog="seqcpo", description="Sequence-level training with Contrastive Preference Optimization")
    p.add_argument("--version", action="version", version=f"seqcpo {__import__('seqcpo').__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model (config YAML + --field value overrides)", add_help=False,
                       usage="seqcpo train [-h] [--config FILE.yaml] [--field value ...]",
                       description="Train with a YAML config; every field of docs/CONFIG.md can also be given as "
                       "--field value (--field_name and --field-name alike; flags win over the file).")
    t.add_argument("-h", "--help", action=_TrainHelp, help="list every config field, grouped, and exit")
    t.add_argument("--config", metavar="FILE.yaml", help="YAML config (fields: docs/CONFIG.md)")
    t.add_argument("--dry-run", action="store_true", help="print the plan and a memory estimate; train nothing")
    t.set_defaults(func=cmd_train, takes_overrides=True)

    n = sub.add_parser("negatives", help="make fixed negatives with reference log-probs (resumable)",
                       description="Fixed negatives and reference log-probs for a training config; every config "
                       "field (docs/CONFIG.md) can be given as --field value.")
    n.add_argument("--config", metavar="FILE.yaml", help="YAML config (the same one training will use)")
    n.add_argument("--out", required=True, metavar="DIR", help="folder to write (an interrupted run resumes into it)")
    n.add_argument("--shard-size", default="256", metavar="N",
                   help="examples per shard file (task document: the anchor windows of N rows; >= 1; default 256)")
    n.set_defaults(func=cmd_negatives, takes_overrides=True)

    e = sub.add_parser("ensemble", help="weight-space interpolation (1-alpha)*A + alpha*B of two checkpoints")
    e.add_argument("--from", dest="from_", required=True, metavar="DIR",
                   help="checkpoint A (alpha = 0), e.g. the MLE model")
    e.add_argument("--to", required=True, metavar="DIR", help="checkpoint B (alpha = 1), e.g. the CPO model")
    e.add_argument("--alphas", nargs="+", default=["0,0.25,0.5,0.75,1"], metavar="X",
                   help="alphas, comma- or space-separated; values outside [0, 1] extrapolate (--alphas -0.5,1.5 or "
                        "--alphas=-0.5,1.5; default 0,0.25,0.5,0.75,1)")
    e.add_argument("--out", required=True, metavar="DIR", help="folder for the alpha-* checkpoints")
    e.set_defaults(func=cmd_ensemble, takes_overrides=False)

    r = sub.add_parser("reproduce", help="run a grid of arms (train, generate, evaluate); resumes")
    r.add_argument("grid", help="grid YAML (see configs/)")
    r.add_argument("--only", nargs="*", metavar="ARM", help="run only these arms")
    r.add_argument("--dry-run", action="store_true", help="print the plan without running it")
    r.add_argument("--weights", action="store_true",
                   help="also make the weights of the trained arms named in --only (all without it; a seeds: arm's "
                        "name is its first seed) where only their committed outputs are (a fresh clone): two "
                        "workers can prepare an ensemble's two endpoints at once")
    r.set_defaults(func=cmd_reproduce, takes_overrides=False)

    try:
        from seqcpo.evaluation.cli import register
    except ImportError as err:  # evaluation extras missing: say how to get them
        for name in ("generate", "eval"):
            s = sub.add_parser(name, help=f"(needs the evaluation extras: pip install seqcpo[eval]; {err})")
            s.set_defaults(func=lambda a, x, _e=err: sys.exit(f"seqcpo: evaluation needs: pip install seqcpo[eval] ({_e})"))
    else:
        register(sub)
    return p


_NUMBERS = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?(,[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?)*,?")


def _glue_alphas(argv: list[str]) -> list[str]:
    """``ensemble --alphas -0.5,1.5`` -> ``--alphas=-0.5,1.5``: argparse reads a value with a leading minus as a
    flag ("expected at least one argument"); the number lists after ``--alphas`` are glued to it as one value."""
    if not argv or argv[0] != "ensemble" or "--alphas" not in argv:
        return argv
    i = argv.index("--alphas")
    j = i + 1
    while j < len(argv) and _NUMBERS.fullmatch(argv[j]):
        j += 1
    if not any(v.startswith("-") for v in argv[i + 1:j]):
        return argv  # argparse reads these as they are
    return [*argv[:i], "--alphas=" + ",".join(argv[i + 1:j]), *argv[j:]]


def _parse(argv: list[str]):
    """(args, extra) of the command line; SystemExit(2) after one error line for a bad flag."""
    parser = build_parser()
    args, extra = parser.parse_known_args(_glue_alphas(argv))
    if extra and not getattr(args, "takes_overrides", False):
        sub = _subparser(parser, args.command)
        flags = [o for a in sub._actions for o in a.option_strings if o.startswith("--")] if sub else []
        hints = []
        for word in extra:
            name = word.split("=", 1)[0]
            close = difflib.get_close_matches(name.replace("_", "-"), flags, n=1, cutoff=0.75)
            if name.startswith("-") and close:
                hints.append(f"{name}: did you mean {close[0]}?")
        hint = f" ({'; '.join(hints)})" if hints else ""
        (sub or parser).error(f"unrecognized arguments: {' '.join(extra)}{hint}")
    return args, extra


def _subparser(parser, command: str):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices.get(command)
    return None


# What to do after an interrupted command: every command leaves whole files behind, most resume where they stopped.
_AFTER_INTERRUPT = {
    "train": "rerun the same command with --resume_from_checkpoint true to resume from the newest complete checkpoint",
    "ensemble": "no partial alpha-* folder is left; rerun the same command",
}


def main(argv: list[str] | None = None) -> int:
    """The ``seqcpo`` entry point. Exit status: 0 done, 2 bad input (flag, config, data: one line
    ``seqcpo: error: ...``), 3 a run that cannot go on, 130 Ctrl-C, 143 SIGTERM (``ensemble``)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args, extra = _parse(argv)
    except SystemExit as e:  # --help, --version (0) or a bad flag (2, its line already printed)
        return e.code if isinstance(e.code, int) else 2
    from seqcpo.data import DataError
    from seqcpo.ensemble import EnsembleError
    from seqcpo.models import DamagedWeightsError
    from seqcpo.training.checkpoints import TrainingStopped
    from seqcpo.training.config import ConfigError

    try:
        rc = args.func(args, extra) if getattr(args, "takes_overrides", None) is not None else args.func(args)
    except (ConfigError, DataError, EnsembleError, DamagedWeightsError) as e:
        print(f"seqcpo: error: {e}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Terminated) as e:  # the user stopped it: no traceback, say how to go on
        if os.environ.get("SEQCPO_DEBUG"):
            raise
        how = _AFTER_INTERRUPT.get(args.command, "rerun the same command to resume")
        what = "interrupted" if isinstance(e, KeyboardInterrupt) else "terminated (SIGTERM)"
        print(f"\nseqcpo {args.command}: {what}; {how}", file=sys.stderr)
        return 130 if isinstance(e, KeyboardInterrupt) else 128 + signal.SIGTERM
    except TrainingStopped as e:  # a run that cannot go on (non-finite loss, checkpoint write): not bad input
        print(f"seqcpo: error: {e}", file=sys.stderr)
        return 3
    except SystemExit as e:  # a command's own one-line refusal ("seqcpo: error: --out ...")
        if e.code is None or isinstance(e.code, int):
            raise
        text = str(e.code)
        print(text if text.startswith("seqcpo") else f"seqcpo: error: {text}", file=sys.stderr)
        return 2
    except (ValueError, OSError, ImportError) as e:
        # bad input found deeper in (a model folder, a batch too small for its negatives, a bad negatives
        # folder): one line, unless SEQCPO_DEBUG asks for the traceback
        if os.environ.get("SEQCPO_DEBUG"):
            raise
        print(f"seqcpo: error: {e}\n(set SEQCPO_DEBUG=1 for the traceback)", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
