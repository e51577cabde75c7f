"""The PSS baseline's terms of a training step (docs/method.md, "Baselines"), for :class:`SeqCPOTrainer`."""

from __future__ import annotations

from seqcpo.pss import pss_loss, pss_mix_probability


def pss_terms(trainer, model, examples, epochs, training: bool, n_tokens: int):
    """``(summed gold-token NLL with mixed-in model tokens, None, metric sums)``; each example's mixing drawn
    from its own generator (seqcpo.seeding)."""
    cfg = trainer.cfg
    ids = [str(e.meta["id"]) for e in examples]
    nll, frac = pss_loss(
        model, examples, p_model=pss_mix_probability(trainer.state.global_step, cfg.pss_p_gold, cfg.pss_warmup_steps),
        passes=cfg.pss_passes, generator=trainer.example_rngs(ids, training, "pss", epochs),
        pad_token_id=trainer.pad_token_id, reduction="sum",
    )
    return nll, None, {"pss/mix_fraction": (round(frac * n_tokens), n_tokens)}
