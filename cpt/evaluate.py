"""Per-language perplexity and routing statistics of a model (``pdmoe eval``, the trainer's eval
and ``pdmoe demo``: one definition everywhere).

Perplexity of a language is exp(mean next-token NLL) over the target tokens of that language: the
language-model loss alone, never the router's load-balancing loss that an MoE's ``loss`` adds, so
an upcycled MoE and its dense model have the same perplexity. Dense models have no routing.
A layer's expert share for a language is the fraction of that language's (token, top-k slot)
routing choices that went to each expert: the numbers that show whether original-language text
still goes to expert 0 (the dense FFN) after CPT and the review stage.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from pdmoe.errors import Option, Problem, UsageError
from pdmoe.hub import resolve_model
from pdmoe.io.atomic import Staged
from pdmoe.io.hf_loading import load_causal_lm, load_tokenizer
from pdmoe.io.model_config import MOE_MODEL_TYPE

from .checkpoints import checkpoint_dtype, load_moe_model, read_model_config
from .data import CorpusSpec, PackedSequences, TokenCache
from .settings import DEFAULT_EVAL_OPTIONS, EvalOptions, sequence_length

if TYPE_CHECKING:
    from transformers import PreTrainedModel

PERPLEXITY_DEFINITION = "exp(mean next-token loss over the predicted tokens); no router loss"


def expert_token_counts(
    router_logits: Sequence[torch.Tensor], langs: torch.Tensor, num_langs: int, top_k: int
) -> torch.Tensor:
    """[layers, languages, experts] counts of (token, slot) routing choices, ``langs`` [B*S] per token."""
    flat_langs = langs.reshape(-1, 1)
    counts = []
    for logits in router_logits:
        num_experts = logits.shape[-1]
        chosen = torch.topk(logits.detach(), top_k, dim=-1).indices  # softmax is monotonic
        keys = (flat_langs * num_experts + chosen).reshape(-1)
        counts.append(torch.bincount(keys, minlength=num_langs * num_experts).reshape(num_langs, num_experts))
    return torch.stack(counts)


def expert_shares(counts: torch.Tensor) -> torch.Tensor:
    """Counts [..., E] -> fractions over experts (0 where a language had no tokens)."""
    counts = counts.double()
    return counts / counts.sum(-1, keepdim=True).clamp_min(1)


def shares_by_language(counts: torch.Tensor, languages: Sequence[str], moe_layers: Sequence[int]) -> dict:
    """{language: {layer: [share per expert]}} of [layers, languages, experts] counts (JSON-ready)."""
    shares = expert_shares(counts.cpu())
    return {
        lang: {
            str(layer): [round(x, 6) for x in shares[row, i].tolist()] for row, layer in enumerate(moe_layers)
        }
        for i, lang in enumerate(languages)
        if counts[:, i].sum() > 0
    }


def spread_indices(num_sequences: int, count: int) -> list[int]:
    """``count`` sequence indices spread evenly over the corpus, so every file (language) is seen
    even when only a few sequences are evaluated; all of them when ``count >= num_sequences``."""
    if count >= num_sequences:
        return list(range(num_sequences))
    return [(i * num_sequences) // count for i in range(count)]


def per_language_nll(
    logits: torch.Tensor, input_ids: torch.Tensor, langs: torch.Tensor, num_langs: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(NLL sum, target count) per language of next-token prediction, by the target token's language."""
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten(), reduction="none")
    target_langs = langs[:, 1:].flatten()
    sums = torch.zeros(num_langs, dtype=torch.float64, device=nll.device).index_add_(
        0, target_langs, nll.double()
    )
    return sums, torch.bincount(target_langs, minlength=num_langs)


def _exp(value: float) -> float:
    try:
        return math.exp(value)
    except OverflowError:
        return math.inf


@dataclass
class EvalResult:
    """Sums over evaluated tokens; combine processes by summing the tensors."""

    languages: tuple[str, ...]
    moe_layers: list[int]
    nll_sum: torch.Tensor  # [languages] float64
    target_tokens: torch.Tensor  # [languages] int64
    expert_counts: torch.Tensor  # [layers, languages, experts] int64

    def perplexity(self) -> dict[str, float]:
        """exp(mean NLL) per language that had tokens (inf where that overflows a float)."""
        return {
            lang: _exp(self.nll_sum[i].item() / self.target_tokens[i].item())
            for i, lang in enumerate(self.languages)
            if self.target_tokens[i] > 0
        }

    def to_dict(self) -> dict:
        """The numbers as valid JSON: a perplexity that is not finite is null."""
        return {
            "perplexity": {
                lang: value if math.isfinite(value) else None for lang, value in self.perplexity().items()
            },
            "tokens": {lang: int(self.target_tokens[i]) for i, lang in enumerate(self.languages)},
            "expert_share": shares_by_language(self.expert_counts, self.languages, self.moe_layers),
        }

    def table(self) -> str:
        """Perplexity per language, then each layer's expert shares per language (percent)."""
        shares = expert_shares(self.expert_counts) * 100
        ppl = self.perplexity()
        lang_width = max(8, *(len(lang) for lang in self.languages))
        lines = [
            f"{'language':<{lang_width}}  {'tokens':>10}  {'perplexity':>12}   ({PERPLEXITY_DEFINITION})"
        ]
        for i, lang in enumerate(self.languages):
            value = f"{ppl[lang]:12.3f}" if lang in ppl else f"{'-':>12}"
            lines.append(f"{lang:<{lang_width}}  {int(self.target_tokens[i]):>10}  {value}")
        if not self.moe_layers:
            return "\n".join([*lines, "", "(a dense model: no routing)"])
        num_experts = self.expert_counts.shape[-1]
        header = "  ".join(f"{'e' + str(e):>6}" for e in range(num_experts))
        lines += ["", f"{'layer':>5}  {'language':<{lang_width}}  {header}   (% of routed token slots)"]
        present = [i for i, lang in enumerate(self.languages) if self.expert_counts[:, i].sum() > 0]
        for row, layer in enumerate(self.moe_layers):
            for i in present:
                lang = self.languages[i]
                cells = "  ".join(f"{x:6.1f}" for x in shares[row, i].tolist())
                lines.append(f"{layer:>5}  {lang:<{lang_width}}  {cells}")
        return "\n".join(lines)


@torch.no_grad()
def evaluation_sums(
    model: PreTrainedModel,
    sequences: PackedSequences,
    indices: Sequence[int],
    batch_size: int,
    device: torch.device,
) -> EvalResult:
    """Evaluate ``model`` (MoE or dense, unwrapped or wrapped; in eval mode) on the sequences ``indices``."""
    config = getattr(model, "module", model).config
    moe = config.model_type == MOE_MODEL_TYPE
    moe_layers = list(config.moe_layers) if moe else []
    languages = sequences.cache.languages
    num_langs = len(languages)
    nll_sum = torch.zeros(num_langs, dtype=torch.float64, device=device)
    targets = torch.zeros(num_langs, dtype=torch.int64, device=device)
    num_experts = config.num_experts if moe else 0
    counts = torch.zeros(len(moe_layers), num_langs, num_experts, dtype=torch.int64, device=device)
    for start in range(0, len(indices), batch_size):
        input_ids, langs = (t.to(device) for t in sequences.batch(indices[start : start + batch_size]))
        out = model(input_ids=input_ids, **({"output_router_logits": True} if moe else {}))
        batch_nll, batch_targets = per_language_nll(out.logits, input_ids, langs, num_langs)
        nll_sum += batch_nll
        targets += batch_targets
        if moe:
            counts += expert_token_counts(out.router_logits, langs, num_langs, config.num_experts_per_tok)
    return EvalResult(languages, moe_layers, nll_sum, targets, counts)


def heatmap_format(path: str | Path) -> str | None:
    """The image format ``path``'s extension names, None when matplotlib (the ``plot`` extra) is not
    installed; a UsageError, before any evaluation, for an extension matplotlib cannot write (it
    would otherwise append ``.png`` to a name without one and write another file than the one named)."""
    try:
        import matplotlib  # noqa: F401  (first: a missing package is an ImportError here)
        from matplotlib.backends.backend_agg import FigureCanvasAgg
    except ImportError:
        return None
    formats = FigureCanvasAgg.get_supported_filetypes()
    extension = Path(path).suffix.lower().removeprefix(".")
    if extension not in formats:
        written = f"{extension!r} files" if extension else "a file without an extension"
        choices = ", ".join(f".{name}" for name in sorted(formats))
        raise UsageError(
            "{plot} {path}: matplotlib cannot write {written}; end the name with one of {choices}",
            problem=Problem.INVALID,
            plot=Option("plot"),
            path=path,
            written=written,
            choices=choices,
        )
    return extension


def save_heatmap(result: EvalResult, path: str | Path) -> bool:
    """Write the expert shares to ``path`` as one heatmap per language (rows: layers, columns:
    experts), in the format its extension names, atomically.

    Returns False, without raising, when matplotlib (the ``plot`` extra) is not installed.
    """
    image_format = heatmap_format(path)
    if image_format is None:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shares = expert_shares(result.expert_counts).numpy()
    num_langs = len(result.languages)
    fig, axes = plt.subplots(
        1,
        num_langs,
        figsize=(2 + 1.2 * shares.shape[-1] * num_langs, 1 + 0.4 * len(result.moe_layers)),
        squeeze=False,
    )
    for i, lang in enumerate(result.languages):
        ax = axes[0, i]
        image = ax.imshow(shares[:, i, :], vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_title(lang)
        ax.set_xlabel("expert")
        ax.set_xticks(range(shares.shape[-1]))
        ax.set_yticks(range(len(result.moe_layers)), [str(layer) for layer in result.moe_layers])
        if i == 0:
            ax.set_ylabel("layer")
    fig.colorbar(image, ax=axes[0].tolist(), label="share of routed token slots")
    with Staged(path) as staged:
        fig.savefig(staged, format=image_format, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True


def evaluate_model(
    model_dir: str | Path, corpus: CorpusSpec, options: EvalOptions = DEFAULT_EVAL_OPTIONS, **changes: Any
) -> EvalResult:
    """``pdmoe eval``: ``options.max_sequences`` packed sequences spread over ``corpus`` (all when
    None), of an MoE or of a dense model (the baseline an MoE is compared with); ``changes``
    replace fields of ``options`` (``evaluate_model(model, corpus, seq_len=128)``).

    Runs on the GPU when there is one, in the checkpoint's dtype there and in float32 on CPU.
    """
    options = replace(options, **changes)
    model_dir = resolve_model(model_dir)
    config = read_model_config(model_dir)
    seq_len = sequence_length(options.seq_len, config.get("max_position_embeddings") or 1024)
    if options.batch_size < 1:
        raise UsageError(
            "{option} must be at least 1, got {batch_size}",
            problem=Problem.INVALID,
            option=Option("batch_size"),
            batch_size=options.batch_size,
        )
    tokens = TokenCache.build(corpus, load_tokenizer(model_dir), options.cache_dir)
    sequences = PackedSequences(tokens, seq_len)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = checkpoint_dtype(config) if device.type == "cuda" else torch.float32
    if config["model_type"] == MOE_MODEL_TYPE:
        model = load_moe_model(model_dir, dtype)
    else:
        model = load_causal_lm(model_dir, dtype=dtype)
    model.to(device).eval()
    count = len(sequences) if options.max_sequences is None else options.max_sequences
    indices = spread_indices(len(sequences), count)
    result = evaluation_sums(model, sequences, indices, options.batch_size, device)
    return EvalResult(
        result.languages,
        result.moe_layers,
        result.nll_sum.cpu(),
        result.target_tokens.cpu(),
        result.expert_counts.cpu(),
    )
