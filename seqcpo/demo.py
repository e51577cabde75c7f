"""``make demo``: train CPO on the embedded default, reload the result with plain transformers, generate.

    python -m seqcpo.demo [--config configs/demo.yaml] [--key value ...]
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", default="configs/demo.yaml")
    args, extra = p.parse_known_args(argv)
    t0 = time.time()
    from seqcpo.cli import main as cli_main

    rc = cli_main(["train", "--config", args.config, *extra])
    if rc:
        return rc

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from seqcpo.data import load_splits
    from seqcpo.training.config import load_config, parse_overrides

    cfg = load_config(args.config, parse_overrides(extra))
    final = os.path.join(cfg.output_dir, "final")
    # plain transformers, no seqcpo code in the loading path
    model = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(final)
    test = load_splits(cfg.data_config(), tok).test[:2]
    print("\nGreedy continuations from the trained checkpoint (test split):")
    for ex in test:
        ids = torch.tensor([ex.prefix_ids])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, do_sample=False,
                             pad_token_id=tok.pad_token_id)
        gen = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        print(f"\n  prefix:    {ex.meta['prompt']!r}\n  model:     {gen!r}\n  gold:      {ex.meta['reference'][:200]!r}")
    print(f"\nDemo done in {time.time() - t0:.0f} s. Everything is under {os.path.abspath(cfg.output_dir)}:")
    print(f"  final checkpoint  {os.path.abspath(final)}")
    print(f"  resolved config   {os.path.abspath(os.path.join(cfg.output_dir, 'seqcpo_config.yaml'))}")
    print(f"  training log      {os.path.abspath(os.path.join(cfg.output_dir, 'log_history.json'))}")
    print("  converted model   " + os.path.join(os.path.expanduser(os.environ.get('SEQCPO_CACHE', '~/.cache/seqcpo')), "models"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
