"""2. finetune: one end-to-end training step, nothing frozen.

- mmfuse: `MMFuseModule.training_step` driven by mmfuse's own Trainer (`build_trainer` + a step limit): manual
  optimisation, equal weighting, grad clipping (1.0), fused AdamW, cosine schedule, logging, as `train()` runs it.
- minimal, same recipe: the same `MultiTaskModel` in a hand-written loop with mmfuse's recipe: forward,
  cross-entropy, backward, grad clipping (1.0), `AdamW(fused=True)`. mmfuse vs this is the framework's overhead.
- minimal, as users write it: the same loop with no clipping, and the fused AdamW kernel as mmfuse uses
  (`AdamW(fused=True)`), so that mmfuse vs this compares the libraries, not one optimiser flag.
- notebook: the common notebook loop: plain torchvision + Hugging Face modules, text padded to 128, Adam.

All sides get the same pre-collated batches (mmfuse's collator; the notebook's text re-tokenised to 128), so
the step is compared, not the data pipeline. Informational side: mmfuse end to end with its own `make_loader`
(length bucketing, 2 worker processes that share the same 2 cores) feeding the Trainer.
"""

from __future__ import annotations

from common import (
    BATCH,
    Result,
    Settings,
    Target,
    apply_trainer_flags,
    build_reference,
    collate_batches,
    fmt,
    fresh_copy,
    interleave,
    lightning_runner,
    list_loader,
    loop_runner,
    minimal_step,
    mmfuse_module,
    model_config,
    notebook_model,
    notebook_step,
    pad_to_max,
    reference,
    round_ratios,
    side_row,
    tokens_per_batch,
    train_records,
)

WITHIN = 0.05


def run(s: Settings) -> Result:
    from mmfuse.builders import loader_options
    from mmfuse.config import parse_config
    from mmfuse.train.data import Features, make_loader

    rounds, warmup, steps = s.rounds(4), s.steps(2, 1), s.steps(5, 2)
    n = warmup + steps
    cfg = parse_config(model_config(False, device=s.device))
    ref = build_reference(freeze=False)
    records = train_records(n * BATCH)
    dyn = collate_batches(ref, records, n)
    pad = pad_to_max(dyn, records, ref.encoders["text"].tokenizer)
    apply_trainer_flags(cfg, s.workdir)

    mm_model, e2e_model = fresh_copy(ref), fresh_copy(ref)
    e2e_records = train_records(4 * n * BATCH)

    def e2e_loader(k: int) -> object:
        return make_loader(e2e_model, e2e_records, "train", Features(), loader_options(cfg))

    def batches(k: int) -> object:
        return list_loader(dyn[:k])

    runners = {
        "mmfuse": lightning_runner(lambda: mmfuse_module(mm_model, cfg), cfg, batches, s.workdir / "mm", s.device),
        "minimal": loop_runner(
            minimal_step(fresh_copy(ref).to(s.device), dyn, s.device, clip=1.0, fused=True), s.device
        ),
        "plain": loop_runner(minimal_step(fresh_copy(ref).to(s.device), dyn, s.device, fused=True), s.device),
        "notebook": loop_runner(notebook_step(notebook_model(ref).to(s.device), pad, s.device, False), s.device),
        "mmfuse e2e": lightning_runner(
            lambda: mmfuse_module(e2e_model, cfg), cfg, e2e_loader, s.workdir / "e2e", s.device
        ),
    }
    m = interleave(runners, BATCH, rounds, warmup, steps)
    mm, mini, plain, nb = m["mmfuse"], m["minimal"], m["plain"], m["notebook"]
    vs_min = mm.per_second / mini.per_second
    vs_plain = mm.per_second / plain.per_second
    vs_nb = mm.per_second / nb.per_second
    t_dyn, t_pad = f"T={tokens_per_batch(dyn):.1f}", f"T={tokens_per_batch(pad):.0f}"
    res = Result("finetune")
    res.rows = [
        side_row(
            "mmfuse: MMFuseModule.training_step via its Trainer (defaults: grad clip 1.0, fused AdamW)",
            mm,
            t_dyn,
            f"{fmt(vs_min)}x same recipe, {fmt(vs_plain)}x plain, {fmt(vs_nb)}x notebook",
        ),
        side_row("minimal loop, same recipe: same MultiTaskModel, clip 1.0, AdamW(fused=True)", mini, t_dyn),
        side_row(
            "minimal loop as users write it: same MultiTaskModel, dynamic padding, AdamW(fused=True), no clip",
            plain,
            t_dyn,
        ),
        side_row("notebook loop, pad 128, Adam", nb, t_pad, ref=reference("finetune notebook pad 128", s.device)),
        side_row(
            "info: mmfuse end to end: make_loader (2 workers) + Trainer",
            m["mmfuse e2e"],
            "data loading included",
            f"{fmt(m['mmfuse e2e'].per_second / mini.per_second)}x same recipe",
        ),
    ]
    r_min = round_ratios(mm, mini)
    r_plain = round_ratios(mm, plain)
    r_nb = round_ratios(mm, nb)
    res.targets = [
        Target.at_least("finetune: mmfuse samples/s >= 0.95x minimal loop, same recipe", vs_min, 1 - WITHIN, r_min),
        Target.at_least(
            "finetune: mmfuse samples/s >= minimal loop as users write it (fused AdamW, no clip)",
            vs_plain,
            1.0,
            r_plain,
        ),
        Target("finetune: mmfuse faster than notebook loop (pad 128)", vs_nb, 1.0, vs_nb > 1.0, (min(r_nb), max(r_nb))),
    ]
    res.info = {k: {"step_s": v.times, "cpu_share": v.cpu_share} for k, v in m.items()}
    res.info["tokens_per_batch"] = {"dynamic": tokens_per_batch(dyn), "notebook": tokens_per_batch(pad)}
    return res
