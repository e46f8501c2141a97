"""study.md: the protocol, what was run on what, how long it took, and every number as tables."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path

from .arms import Arm, matched_steps
from .corpus import NEW, ORIGINAL
from .protocol import Protocol
from .report import table

PROTOCOL_NOTES = """\
Fixed before the full run and not changed after it: the model size, the learning-rate grids, the
review stage, the task, the SFT recipe and the merge densities follow the lessons of a first small
attempt (a base that has seen some Spanish, SFT mixed with ordinary text, a review stage, cloze with
listed candidates, learning-rate sweeps instead of single points) and were checked only by `--quick`
smoke runs, whose numbers mean nothing. `--pilot` (`bilingual_study/pilot.py`: validation books,
B and I only) tests whether a design can test the new-language half of the claim before any arm
runs; it compares no arm. The headline rows are each family's middle learning rate; every learning rate is in
the full table and the plot. TIES density 0.2 is the TIES paper's default (k = 20 %); DARE density
0.5 is mergekit's usual keep rate (the CPT delta is far larger than the SFT deltas DARE was designed
for, so a low keep rate would rescale it by 1/density into noise). Numbers are means ± sample
standard deviations over seeds; a difference is called a win or a loss below only when the paired
per-seed difference exceeds twice its standard deviation.
"""

ARM_NOTES = """\
- **B**: the base model, pre-trained here on English (KJV + WEB) with its share of Spanish (RV 1909).
- **I**: B after SFT on the English cloze task mixed with ordinary text: the post-training delta is I − B.
- **dense CPT**: every weight of B trained on Spanish. **+ ParamΔ**: + (I − B) (task arithmetic).
- **dense TIES / DARE**: `pdmoe graft --method ties|dare` of the task vectors (dense CPT − B, I − B).
- **MoE CPT**: B upcycled (every FFN, E experts, top-k), new experts and routers trained on Spanish
  (`pdmoe cpt`). **DeltaMoE**: MoE CPT + (I − B) expanded to the experts (`pdmoe graft`).
- **MoE CPT + review**: then the router-only review stage on English + Spanish with the language-prior
  loss (`pdmoe cpt --stage review`). **DeltaMoE + review**: that model grafted.
- **matched FLOPs**: dense CPT with as many training FLOPs as MoE CPT + review (more steps along the
  same data order), at the middle learning rate of the dense sweep, + ParamΔ.
- task: exact match of the greedy answer / format adherence (the answer is one of the four listed
  words and generation stopped), in %; chance-level exact match with perfect format is 25 %.
- expert 0: share of the routed (token, slot) pairs that go to expert 0 (the original FFN),
  averaged over layers; at most 1/k.
"""

COMPARED = (
    (Arm.DELTA_MOE_REVIEW, Arm.DENSE_PARAM_DELTA),
    (Arm.DELTA_MOE, Arm.DENSE_PARAM_DELTA),
    (Arm.DELTA_MOE_REVIEW, Arm.DENSE_TIES),
    (Arm.DELTA_MOE_REVIEW, Arm.DENSE_DARE),
)
METRICS = (
    ("ppl", ORIGINAL, "ppl en", -1),
    ("ppl", NEW, "ppl es", -1),
    ("exact", ORIGINAL, "task en", 1),
    ("exact", NEW, "task es", 1),
)


def paired_differences(records: Sequence[dict], arm: Arm, other: Arm, lrs: Sequence[float]) -> list[dict]:
    """Per learning rate and metric: arm − other over the seeds both have (same seed = same data order)."""
    by_key = {(r["arm"], r["lr"], r["seed"]): r for r in records}
    rows = []
    for lr in lrs:
        seeds = sorted(
            s for (a, rate, s) in by_key if a == arm.value and rate == lr and (other.value, lr, s) in by_key
        )
        if not seeds:
            continue
        row: dict = {"lr": lr, "seeds": seeds}
        for metric, lang, label, better in METRICS:
            diffs = [
                by_key[(arm.value, lr, s)]["eval"][lang][metric]
                - by_key[(other.value, lr, s)]["eval"][lang][metric]
                for s in seeds
            ]
            mean = statistics.fmean(diffs)
            std = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
            win = len(diffs) > 1 and better * mean > 2 * std
            loss = len(diffs) > 1 and -better * mean > 2 * std
            row[label] = {"mean": mean, "std": std, "verdict": "win" if win else "loss" if loss else "tie"}
        rows.append(row)
    return rows


def _difference_table(records: Sequence[dict], lrs: Sequence[float]) -> list[str]:
    lines = []
    for arm, other in COMPARED:
        rows = paired_differences(records, arm, other, lrs)
        if not rows:
            continue
        lines += [f"**{arm.value} − {other.value}** (paired by seed; win/loss: |mean| > 2 std)", ""]
        lines += ["| lr | " + " | ".join(label for _, _, label, _ in METRICS) + " |", "|" + " --- |" * 5]
        for row in rows:
            cells = []
            for metric, _, label, _ in METRICS:
                d = row[label]
                scale = 100 if metric == "exact" else 1
                cells.append(f"{scale * d['mean']:+.2f} ± {scale * d['std']:.2f} ({d['verdict']})")
            lines.append(f"| {row['lr']:g} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _reuse_note(reused: Sequence[str]) -> str:
    """What this invocation took from an earlier one into the same DIR (its times are not above)."""
    if not reused:
        return "."
    return (
        f"; this invocation reused {len(reused)} stages computed by an earlier one into the same DIR "
        f"({', '.join(reused)}), whose times are not counted here."
    )


def write_markdown(result: dict, protocol: Protocol, path: Path, plotted: bool) -> None:
    raw = result["protocol"]
    rows = result["rows"]
    tokens = result["data"]["tokens"]
    size = raw["model"]
    middle = {
        **{
            arm.value: protocol.dense_lrs[len(protocol.dense_lrs) // 2] for arm in Arm if "dense" in arm.value
        },
        **{arm.value: protocol.moe_lrs[len(protocol.moe_lrs) // 2] for arm in Arm if "MoE" in arm.value},
    }
    shared_lrs = [lr for lr in protocol.moe_lrs if lr in protocol.dense_lrs]
    seconds = result["seconds"]
    mode = " --quick" if raw["name"] == "quick" else ""
    lines = [
        f"# pdmoe study: DeltaMoE against its baselines ({raw['name']})",
        "",
        f"Command: `python bench/study.py --out DIR{mode}`. "
        + ("A smoke test on toy sizes: its numbers mean nothing. " if raw["name"] == "quick" else ""),
        "",
        "## Protocol",
        "",
        PROTOCOL_NOTES,
        "## Set-up",
        "",
        f"- Model: Llama, hidden {size['hidden']}, {size['layers']} layers, {size['heads']} heads, FFN "
        f"{size['intermediate']}, byte-level BPE vocabulary {size['vocab']} trained on both languages' "
        f"training books; sequences of {raw['seq_len']} tokens, {raw['batch']} per step, AdamW (0.9, 0.95), "
        "warmup 1 % then cosine to 10 %, clipping 1.0, float32.",
        f"- B: {raw['base_steps']} steps at lr {raw['base_lr']:g} over a corpus of {tokens['base_en']:,} English + "
        f"{tokens['base_es']:,} Spanish tokens ({100 * tokens['base_es_share']:.1f} % Spanish).",
        f"- I: {raw['sft_steps']} SFT steps at lr {raw['sft_lr']:g}, each {raw['batch'] - raw['sft_text_rows']} rows "
        f"of packed task examples (loss on the answers) + {raw['sft_text_rows']} rows of B's text, the two "
        "losses averaged separately and added.",
        f"- CPT: {raw['cpt_steps']} steps ({raw['cpt_steps'] * raw['batch'] * raw['seq_len']:,} tokens) from a "
        f"Spanish pool of {tokens['cpt_es']:,} tokens, the same sequences in the same order per seed for every "
        f"arm; dense lrs {', '.join(f'{x:g}' for x in raw['dense_lrs'])}, MoE lrs "
        f"{', '.join(f'{x:g}' for x in raw['moe_lrs'])}; MoE: {raw['num_experts']} experts, top-{raw['top_k']}, "
        f"load-balancing coefficient {raw['aux_coef']:g} (Switch form: the reference 0.01 in MoE-LPR's form).",
        f"- Review: {raw['review_steps']} router-only steps at lr {raw['review_lr']:g}, language-prior "
        f"coefficient {raw['lpr_coef']:g} on −log p0, on {tokens['review']:,} tokens of English + Spanish.",
        f"- Matched-FLOPs dense baseline: {matched_steps(protocol)} steps (analytic FLOPs, see bilingual_study/flops.py).",
        f"- Seeds {', '.join(map(str, raw['seeds']))} (data order, router initialisation, DARE masks); held-out "
        f"books: {', '.join(f'{k} {v:,} tokens' for k, v in tokens['heldout'].items())}, "
        f"{raw['eval_sequences']} sequences per language evaluated; task: {raw['cloze_items']} items per language.",
        f"- Time: {seconds['total'] / 60:.1f} min wall, {seconds['cpu'] / 60:.1f} CPU-min "
        f"({', '.join(f'{k} {v:.0f} s' for k, v in seconds.items() if k not in ('total', 'cpu'))})"
        + _reuse_note(result["reused"]),
        "",
        "## Headline (each family at its middle learning rate)",
        "",
        table(rows, lrs=middle),
        "",
        "## Paired differences",
        "",
        *_difference_table(result["records"], shared_lrs),
        "## Every arm at every learning rate",
        "",
        table(rows),
        "",
    ]
    if plotted:
        lines += ["![trade-off curves](study.png)", ""]
    lines += ["## Arms and metrics", "", ARM_NOTES]
    path.write_text("\n".join(lines))
