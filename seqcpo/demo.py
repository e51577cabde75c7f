"""``make demo``: train CPO on the embedded default, reload the result with plain transformers, and print, for two
test prefixes, the untrained model's greedy continuation beside the trained one's and the gold.

    python -m seqcpo.demo [--config configs/demo.yaml] [--key value ...]

Extra ``--key value`` overrides may also come from the environment variable ``SEQCPO_DEMO_ARGS`` (read before
the command line's, so the command line wins); ``make docs-check`` uses it to run ``make demo`` at small sizes.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

NUM_SHOWN = 2
MAX_NEW_TOKENS = 40


def _continue(model, tok, prefix_ids: list[int]) -> str:
    import torch

    ids = torch.tensor([prefix_ids])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                         pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def show_continuations(cfg, final: str) -> None:
    """Greedy continuations of the first test prefixes: the starting model's, the trained checkpoint's, the gold."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from seqcpo.data import load_splits
    from seqcpo.models import load_model

    # the trained checkpoint through plain transformers, no seqcpo code in the loading path
    trained = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(final)
    untrained = load_model(cfg.model_name_or_path, dtype="float32", trust_remote_code=cfg.trust_remote_code).eval()
    test = load_splits(cfg.data_config(), tok).test[:NUM_SHOWN]
    print(f"\nGreedy continuations ({MAX_NEW_TOKENS} new tokens) of {len(test)} test prefixes:")
    for ex in test:
        print(f"\n  prefix:     {ex.meta['prompt']!r}"
              f"\n  untrained:  {_continue(untrained, tok, ex.prefix_ids)!r}"
              f"\n  trained:    {_continue(trained, tok, ex.prefix_ids)!r}"
              f"\n  gold:       {ex.meta['reference'][:200]!r}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/demo.yaml")
    args, extra = p.parse_known_args(argv)
    extra = shlex.split(os.environ.get("SEQCPO_DEMO_ARGS", "")) + extra
    t0 = time.time()
    from seqcpo.cli import main as cli_main

    rc = cli_main(["train", "--config", args.config, *extra])
    if rc:
        return rc

    from seqcpo.training.config import load_config, parse_overrides

    cfg = load_config(args.config, parse_overrides(extra))
    final = os.path.join(cfg.output_dir, "final")
    show_continuations(cfg, final)
    print(f"\nDemo done in {time.time() - t0:.0f} s. Everything is under {os.path.abspath(cfg.output_dir)}:")
    print(f"  final checkpoint  {os.path.abspath(final)}")
    print(f"  resolved config   {os.path.abspath(os.path.join(cfg.output_dir, 'seqcpo_config.yaml'))}")
    print(f"  training log      {os.path.abspath(os.path.join(cfg.output_dir, 'log_history.json'))}")
    cache = os.path.expanduser(os.environ.get("SEQCPO_CACHE", "~/.cache/seqcpo"))
    print(f"  converted model   {os.path.join(cache, 'models')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
