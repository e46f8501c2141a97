"""study.md: what was run, on what, how long it took, and every number as tables."""

from __future__ import annotations

from pathlib import Path

from .arms import matched_steps
from .protocol import Protocol
from .report import table

ARM_NOTES = """\
- **B**: the base model, pre-trained here on English (KJV + WEB) with its share of Spanish (RV 1909).
- **I**: B after SFT on the English cloze task mixed with ordinary text: the post-training delta is I − B.
- **dense CPT**: every weight of B trained on Spanish. **+ ParamΔ**: + (I − B) (task arithmetic).
- **dense TIES / DARE**: TIES (trim to the top `ties_density` magnitudes per tensor, elect sign, disjoint mean)
  and DARE (keep `dare_density`, rescale) of the task vectors (dense CPT − B, I − B), added to B.
- **MoE CPT**: B upcycled (every FFN, E experts, top-k), new experts and routers trained on Spanish
  (`pdmoe cpt`). **DeltaMoE**: MoE CPT + (I − B) expanded to the experts (`pdmoe graft`).
- **MoE CPT + review**: then the router-only review stage on English + Spanish with the language-prior
  loss (`pdmoe cpt --stage review`). **DeltaMoE + review**: that model grafted.
- **matched FLOPs**: dense CPT with as many training FLOPs as MoE CPT + review (more steps along the
  same data order), at the middle learning rate of the dense sweep.
- expert 0: share of the routed (token, slot) pairs that go to expert 0 (the original FFN), averaged
  over layers; at most 1/k.
"""


def write_markdown(result: dict, protocol: Protocol, path: Path, plotted: bool) -> None:
    raw = result["protocol"]
    rows = result["rows"]
    tokens = result["data"]["tokens"]
    size = raw["model"]
    lines = [
        f"# pdmoe study: DeltaMoE against its baselines ({raw['name']})",
        "",
        "Command: `python bench/study.py --out DIR"
        + {"quick": " --quick", "pilot": " --pilot"}.get(raw["name"], "")
        + "`",
        "",
        "## Set-up",
        "",
        f"- Model: Llama, hidden {size['hidden']}, {size['layers']} layers, {size['heads']} heads, FFN "
        f"{size['intermediate']}, byte-level BPE vocabulary {size['vocab']} trained on both languages; "
        f"sequences of {raw['seq_len']} tokens, {raw['batch']} per step.",
        f"- B: {raw['base_steps']} steps at lr {raw['base_lr']:g} on {tokens['base_en']:,} English + "
        f"{tokens['base_es']:,} Spanish tokens ({100 * tokens['base_es_share']:.1f} % Spanish).",
        f"- I: {raw['sft_steps']} SFT steps at lr {raw['sft_lr']:g}, {raw['batch'] - raw['sft_text_rows']} rows of "
        f"packed task examples + {raw['sft_text_rows']} rows of B's text per step.",
        f"- CPT: {raw['cpt_steps']} steps ({raw['cpt_steps'] * raw['batch'] * raw['seq_len']:,} tokens) from a "
        f"Spanish pool of {tokens['cpt_es']:,} tokens, same order per seed for every arm; dense lrs "
        f"{', '.join(f'{x:g}' for x in raw['dense_lrs'])}, MoE lrs {', '.join(f'{x:g}' for x in raw['moe_lrs'])}; "
        f"MoE: {raw['num_experts']} experts, top-{raw['top_k']}, load-balancing coefficient {raw['aux_coef']:g} "
        "(Switch form).",
        f"- Review: {raw['review_steps']} router-only steps at lr {raw['review_lr']:g}, language-prior "
        f"coefficient {raw['lpr_coef']:g} (−log p0), {tokens['review']:,} tokens of English + Spanish.",
        f"- Matched-FLOPs dense baseline: {matched_steps(protocol)} steps.",
        f"- TIES density {raw['ties_density']:g}, DARE density {raw['dare_density']:g}.",
        f"- Seeds {', '.join(map(str, raw['seeds']))} (data order, router initialisation, DARE masks); "
        f"held-out: {', '.join(f'{k} {v:,} tokens' for k, v in tokens['heldout'].items())} "
        f"({raw['eval_sequences']} sequences per language evaluated); task: {raw['cloze_items']} items per language.",
        f"- Time: {', '.join(f'{k} {v:.0f} s' for k, v in result['seconds'].items())}.",
        "",
        "## Arms",
        "",
        ARM_NOTES,
        "## All arms, every learning rate (mean ± std over seeds)",
        "",
        table(rows),
        "",
    ]
    if plotted:
        lines += ["![trade-off curves](study.png)", ""]
    path.write_text("\n".join(lines))
