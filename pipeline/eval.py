"""``streamvlm eval``: accuracy against visual-token budget for every pruning method, on the held-out set.

Every held-out question goes through ``pipeline.inference.VideoQA`` (``encode`` then ``answer``), the
entry point the service's workers and ``streamvlm ask`` use, once per row of the table:

    none        no pruning (the reference)
    random      seeded random patch selection (seed = question index) at each reduction
    cls         [CLS]-attention pruning (FasterVLM) with each temporal strategy at each reduction
    fastv       FastV inside the LLM, K = --fastv-k, at each FastV ratio R
    cls+fastv   [CLS] pruning with each strategy at the --combined reductions, then FastV at R = --combined-fastv-ratio

``--video h264`` reads every clip the way the service does: written as the 4 s H.264 file the tests,
demo and ``bench service`` use (``pipeline.loopback.write_clip``), opened by the service's
file source and sampled by its rule (T segment centres). The default, ``frames``, feeds the rendered frames.

Answers are greedy; a question counts as right when the stripped answer text equals the expected word.
Rows sharing an encoder configuration share one ``encode`` per clip; questions are answered in batches
of --batch-size rows (each row of a batch keeps its own token count).

Row fields (``--json``): ``kept_tokens`` is the mean number of visual tokens per clip the deep LLM layers
see (after the encoder's selection and, when FastV is on, after FastV's drop before layer K), so that
every method sits on one budget axis; ``encoder_kept_tokens`` is the count after the encoder alone
(per-frame [CLS] tokens included, as the Video-LLaVA span holds them); ``flops_ratio`` is the mean
per-question pruned ÷ unpruned FLOPs over vision, projector, prefill and decode (see pruning/flops.py);
``chance`` is the accuracy of a uniform guess among the answer words of each question's kind.

How far apart two rows are is a question of sampling: ``accuracy_se`` is the binomial standard error
of ``accuracy`` (about 1.8 points at 56% on 750 questions). Every row answers the same questions, so a
row against the unpruned one is a paired comparison: ``vs_unpruned`` holds the mean per-question
difference and its standard error, far smaller than the two rows' own errors combined when the two
mostly agree. ``correct`` lists each question's outcome in held-out order, for any other pair.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pipeline.settings import Settings
from pipeline.synthetic import COLOURS, DIRECTIONS, EVAL_TYPES, HELD_OUT_SIZE, NO_EVENT, QA, SHAPES, Sample
from pipeline.synthetic.language import NUMBER_WORDS
from pruning.config import POSITION_MODES, TEMPORAL_STRATEGIES, PruningConfig
from pruning.flops import prefill_flops

METHODS = ("none", "random", "cls", "fastv", "cls+fastv")
DEFAULT_REDUCTIONS = (0.5, 0.75, 0.9, 0.95)
DEFAULT_FASTV_RATIOS = (0.5, 0.75, 0.9)
DEFAULT_COMBINED_REDUCTIONS = (0.75, 0.9)
VIDEO_INPUTS = ("frames", "h264")
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class EvalUsageError(ValueError):
    """A bad option value; the message names the option."""


@dataclass(frozen=True)
class RowSpec:
    """One row of the table: an encoder configuration plus an optional FastV ratio."""

    method: str
    strategy: str | None
    reduction: float
    fastv_ratio: float
    fastv_k: int
    positions: str = "original"

    @property
    def encoder_method(self) -> str:
        return {"none": "none", "fastv": "none", "random": "random"}.get(self.method, "cls")

    @property
    def encoder_key(self) -> tuple[str, str | None, float]:
        return self.encoder_method, self.strategy, self.reduction

    def config(self, seed: int = 0) -> PruningConfig:
        return PruningConfig(
            encoder_method=self.encoder_method,
            encoder_reduction=self.reduction,
            temporal_strategy=self.strategy or "uniform",
            fastv_k=self.fastv_k,
            fastv_ratio=self.fastv_ratio,
            seed=seed,
            positions=self.positions,
        )

    @property
    def label(self) -> str:
        """Name of the plot line this row belongs to."""
        if self.method == "cls":
            return f"[CLS] {self.strategy}"
        if self.method == "cls+fastv":
            return f"[CLS] {self.strategy} + FastV R={self.fastv_ratio:g}"
        return {"none": "no pruning", "random": "random", "fastv": f"FastV K={self.fastv_k}"}[self.method]


@dataclass
class RowResult:
    spec: RowSpec
    answers: list[str] = field(default_factory=list)  # stripped answer text, per sample
    correct: list[bool] = field(default_factory=list)
    qtypes: list[str] = field(default_factory=list)
    chance: list[float] = field(default_factory=list)
    kept_tokens: list[int] = field(default_factory=list)
    encoder_kept_tokens: list[int] = field(default_factory=list)
    tokens_in: list[int] = field(default_factory=list)
    flops_ratio: list[float] = field(default_factory=list)
    prefill_flops_ratio: list[float] = field(default_factory=list)

    def to_dict(self, reference: list[bool] | None) -> dict[str, Any]:
        n = len(self.correct)
        accuracy = sum(self.correct) / n
        reference_accuracy = sum(reference) / len(reference) if reference else None
        by_type: dict[str, float] = {}
        n_by_type: dict[str, int] = {}
        chance_by_type: dict[str, float] = {}
        for qtype in EVAL_TYPES:
            idx = [i for i, t in enumerate(self.qtypes) if t == qtype]
            if idx:
                by_type[qtype] = sum(self.correct[i] for i in idx) / len(idx)
                n_by_type[qtype] = len(idx)
                chance_by_type[qtype] = sum(self.chance[i] for i in idx) / len(idx)
        return {
            "method": self.spec.method,
            "strategy": self.spec.strategy,
            "reduction": self.spec.reduction,
            "fastv_k": self.spec.fastv_k if self.spec.fastv_ratio > 0 else None,
            "fastv_ratio": self.spec.fastv_ratio,
            "positions": self.spec.positions,
            "n": n,
            "tokens_in": statistics.fmean(self.tokens_in),
            "encoder_kept_tokens": statistics.fmean(self.encoder_kept_tokens),
            "kept_tokens": statistics.fmean(self.kept_tokens),
            "flops_ratio": statistics.fmean(self.flops_ratio),
            "prefill_flops_ratio": statistics.fmean(self.prefill_flops_ratio),
            "accuracy": accuracy,
            "accuracy_se": math.sqrt(accuracy * (1.0 - accuracy) / n),
            "relative_accuracy": accuracy / reference_accuracy if reference_accuracy else None,
            "vs_unpruned": paired_difference(self.correct, reference) if reference else None,
            "correct": list(self.correct),
            "by_type": by_type,
            "n_by_type": n_by_type,
            "chance": statistics.fmean(self.chance),
            "chance_by_type": chance_by_type,
        }


def paired_difference(correct: list[bool], reference: list[bool]) -> dict[str, float]:
    """Mean of correct − reference over the same questions, and its standard error.

    Per question the difference is −1, 0 or +1; its sample variance (n − 1) over n gives the error of
    the mean. Questions both rows get right or both get wrong add nothing but n, which is why a paired
    error is smaller than the unpaired sqrt(se_a² + se_b²).
    """
    if len(correct) != len(reference):
        raise ValueError(f"rows answered different question sets ({len(correct)} vs {len(reference)})")
    diffs = [int(a) - int(b) for a, b in zip(correct, reference, strict=True)]
    spread = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
    return {"difference": statistics.fmean(diffs), "se": spread / math.sqrt(len(diffs))}


def answer_options(qa: QA) -> tuple[str, ...]:
    """The answer words a question of this kind admits (a blind guess picks one of them)."""
    if qa.qtype == "time" and (qa.answer == NO_EVENT or qa.answer in SHAPES):
        return (*SHAPES, NO_EVENT)  # "which shape appears / disappears / changes colour ?"
    for words in (tuple(COLOURS), SHAPES, tuple(DIRECTIONS), NUMBER_WORDS[1:]):
        if qa.answer in words:
            return tuple(words)
    return (qa.answer,)


def build_rows(args: argparse.Namespace) -> list[RowSpec]:
    methods = _unique(args.methods or METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise EvalUsageError(f"--methods: unknown {unknown}; choose from {list(METHODS)}")
    strategies = _unique(args.strategies or TEMPORAL_STRATEGIES)
    bad = [s for s in strategies if s not in TEMPORAL_STRATEGIES]
    if bad:
        raise EvalUsageError(f"--strategies: unknown {bad}; choose from {list(TEMPORAL_STRATEGIES)}")
    for name, values in (("--reductions", args.reductions), ("--fastv-ratios", args.fastv_ratios),
                         ("--combined-reductions", args.combined_reductions),
                         ("--combined-fastv-ratio", [args.combined_fastv_ratio])):
        for v in values:
            if not (isinstance(v, (int, float)) and math.isfinite(v) and 0 < v < 1):
                raise EvalUsageError(f"{name}: every value must be in (0, 1), got {v!r}")
    if not isinstance(args.fastv_k, int) or args.fastv_k < 1:
        raise EvalUsageError(f"--fastv-k must be an int >= 1, got {args.fastv_k!r}")
    k = args.fastv_k
    rows: list[RowSpec] = []
    for method in methods:
        if method == "none":
            rows.append(RowSpec("none", None, 0.0, 0.0, k))
        elif method == "random":
            rows += [RowSpec("random", None, r, 0.0, k) for r in args.reductions]
        elif method == "cls":
            rows += [RowSpec("cls", s, r, 0.0, k) for s in strategies for r in args.reductions]
        elif method == "fastv":
            rows += [RowSpec("fastv", None, 0.0, f, k) for f in args.fastv_ratios]
        else:
            rows += [RowSpec("cls+fastv", s, r, args.combined_fastv_ratio, k)
                     for s in strategies for r in args.combined_reductions]
    rows = [replace(row, positions=args.positions) for row in rows]
    for row in rows:
        row.config()  # PruningConfig validates its own fields
    return rows


def _unique(items) -> list:
    return list(dict.fromkeys(items))


def evaluate(qa_model, samples: list[Sample], rows: list[RowSpec], batch_size: int, max_new_tokens: int,
             progress=None) -> list[RowResult]:
    """Answer every sample under every row; rows with the same encoder configuration share one encode."""
    results = {row: RowResult(row) for row in rows}
    groups: dict[tuple, list[RowSpec]] = defaultdict(list)
    for row in rows:
        groups[row.encoder_key].append(row)
    for group in groups.values():
        encoder = group[0]
        for start in range(0, len(samples), batch_size):
            batch = samples[start:start + batch_size]
            # Random selection draws a different pattern per question, the same one for every method.
            visuals = [qa_model.encode(s.clip.frames, encoder.config(seed=s.index)) for s in batch]
            questions = [s.qa.question for s in batch]
            for row in group:
                if progress is not None:
                    progress.set_postfix_str(row.label + (f" r={row.reduction:g}" if row.reduction else ""),
                                             refresh=False)
                answers = qa_model.answer(visuals, questions, row.config(), max_new_tokens=max_new_tokens,
                                          temperature=0.0)
                res = results[row]
                for sample, ans in zip(batch, answers, strict=True):
                    res.answers.append(ans.text.strip())
                    res.correct.append(res.answers[-1] == sample.qa.answer)
                    res.qtypes.append(sample.qa.qtype)
                    res.chance.append(1.0 / len(answer_options(sample.qa)))
                    res.kept_tokens.append(int(ans.record["fastv_visual_kept"]))
                    res.encoder_kept_tokens.append(ans.visual_tokens_kept)
                    res.tokens_in.append(ans.visual_tokens_in)
                    res.flops_ratio.append(ans.flops_ratio)
                    res.prefill_flops_ratio.append(_prefill_ratio(qa_model, row, ans))
                if progress is not None:
                    progress.update(len(batch))
    return [results[row] for row in rows]


def _prefill_ratio(qa_model, row: RowSpec, ans) -> float:
    """LLM prefill FLOPs pruned ÷ unpruned: the papers' convention (FastV K=2 R=50% ≈ 52% on Video-LLaVA)."""
    shape = qa_model.pruned.llm_shape
    n = ans.record["prompt_tokens_in"]
    n_llm = n - (ans.visual_tokens_in - ans.visual_tokens_kept)  # prompt after the encoder's selection
    k = min(row.fastv_k, shape.num_layers) if row.fastv_ratio > 0 else shape.num_layers
    return prefill_flops(shape, n_llm, ans.record["prompt_tokens_after_fastv"], k) / prefill_flops(shape, n)


def result_rows(results: list[RowResult]) -> list[dict[str, Any]]:
    reference = next((r for r in results if r.spec.method == "none"), None)
    return [r.to_dict(reference.correct if reference else None) for r in results]


def format_table(rows: list[dict[str, Any]]) -> str:
    types = [t for t in EVAL_TYPES if any(t in r["by_type"] for r in rows)]
    head = ["method", "strategy", "reduction", "fastv R", "kept", "enc kept", "FLOPs", "prefill", "acc", "±se",
            "rel", "Δ none", *types, "chance"]
    lines = []
    for r in rows:
        rel = r["relative_accuracy"]
        paired = r["vs_unpruned"]
        lines.append([
            r["method"],
            r["strategy"] or "-",
            f"{100 * r['reduction']:.0f}%" if r["reduction"] else "-",
            f"{100 * r['fastv_ratio']:.0f}%" if r["fastv_ratio"] else "-",
            f"{r['kept_tokens']:.1f}",
            f"{r['encoder_kept_tokens']:.1f}",
            f"{100 * r['flops_ratio']:.1f}%",
            f"{100 * r['prefill_flops_ratio']:.1f}%",
            f"{100 * r['accuracy']:.1f}",
            f"{100 * r['accuracy_se']:.1f}",
            f"{100 * rel:.0f}%" if rel is not None else "-",
            f"{100 * paired['difference']:+.1f}±{100 * paired['se']:.1f}" if paired is not None else "-",
            *[f"{100 * r['by_type'][t]:.1f}" if t in r["by_type"] else "-" for t in types],
            f"{100 * r['chance']:.1f}",
        ])
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(head)]
    out = ["  ".join(h.ljust(w) if i < 2 else h.rjust(w) for i, (h, w) in enumerate(zip(head, widths, strict=True)))]
    out.append("  ".join("-" * w for w in widths))
    for line in lines:
        out.append("  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                             for i, (c, w) in enumerate(zip(line, widths, strict=True))))
    n = rows[0]["n"] if rows else 0
    out.append(f"n = {n} held-out questions; accuracy in %, ±se its standard error; rel = acc / unpruned acc; "
               "Δ none = paired difference from unpruned over the same questions ± its standard error; "
               "chance = uniform guess among the question's answer words.\nkept = visual tokens per clip the deep LLM layers see "
               "(enc kept: after the encoder); FLOPs = pruned/unpruned over vision+projector+prefill+decode; "
               "prefill = the LLM prefill alone (the papers' convention); position ids after encoder pruning: "
               f"{rows[0]['positions'] if rows else '-'}.")
    return "\n".join(out)


def write_plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Accuracy against kept visual tokens, one line per method/strategy; unpruned and chance as references."""
    from matplotlib.figure import Figure  # Figure without pyplot: Agg canvas, no global backend state
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    fig = Figure(figsize=(10, 5.5), dpi=110)
    ax = fig.subplots()
    lines: dict[str, list[dict[str, Any]]] = defaultdict(list)
    reference = None
    for r in rows:
        if r["method"] == "none":
            reference = r
            continue
        lines[_row_label(r)].append(r)
    for label, points in lines.items():
        points = sorted(points, key=lambda p: p["kept_tokens"])
        method = points[0]["method"]
        style = "--" if method in ("random", "fastv") else ":" if method == "cls+fastv" else "-"
        ax.plot([p["kept_tokens"] for p in points], [100 * p["accuracy"] for p in points], style,
                marker="s" if method == "cls+fastv" else "o", label=label)
    if reference is not None:
        ax.axhline(100 * reference["accuracy"], color="black", linewidth=1.2,
                   label=f"no pruning ({reference['kept_tokens']:.0f} tokens)")
    if rows:
        ax.axhline(100 * rows[0]["chance"], color="grey", linestyle=":", linewidth=1, label="chance")
    ax.set_xscale("log")
    if rows:
        lo, hi = min(r["kept_tokens"] for r in rows), max(r["kept_tokens"] for r in rows)
        ax.set_xticks([2 ** i for i in range(1, 16) if lo / 1.5 <= 2 ** i <= hi / 1.2] + [round(hi)])
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_ylim(0, 100)
    ax.set_xlabel("visual tokens per clip seen by the deep LLM layers (mean, log scale)")
    ax.set_ylabel("held-out accuracy (%)")
    n = rows[0]["n"] if rows else 0
    ax.set_title(f"streamvlm eval: accuracy vs visual-token budget (n = {n})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, format="png")


def _row_label(row: dict[str, Any]) -> str:
    spec = RowSpec(row["method"], row["strategy"], row["reduction"], row["fastv_ratio"], row["fastv_k"] or 0)
    return spec.label


def _float_list(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _name_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    fmt = ",".join
    parser.add_argument("--model", metavar="PATH", type=Path, default=None,
                        help="checkpoint folder (default: model.path from the settings, else the bundled demo model)")
    parser.add_argument("--limit", type=int, default=HELD_OUT_SIZE, metavar="N",
                        help=f"evaluate only the first N held-out questions (1..{HELD_OUT_SIZE}, default all)")
    parser.add_argument("--methods", type=_name_list, default=list(METHODS), metavar="LIST",
                        help=f"comma-separated subset of {fmt(METHODS)} (default all)")
    parser.add_argument("--strategies", type=_name_list, default=list(TEMPORAL_STRATEGIES), metavar="LIST",
                        help=f"temporal strategies for cls and cls+fastv (default {fmt(TEMPORAL_STRATEGIES)})")
    parser.add_argument("--reductions", type=_float_list, default=list(DEFAULT_REDUCTIONS), metavar="LIST",
                        help="encoder reductions for random and cls (default %(default)s)")
    parser.add_argument("--fastv-k", type=int, default=2, help="FastV filtering layer K (default 2)")
    parser.add_argument("--fastv-ratios", type=_float_list, default=list(DEFAULT_FASTV_RATIOS), metavar="LIST",
                        help="FastV ratios R for the fastv rows (default %(default)s)")
    parser.add_argument("--combined-reductions", type=_float_list, default=list(DEFAULT_COMBINED_REDUCTIONS),
                        metavar="LIST", help="[CLS] reductions of the cls+fastv rows (default %(default)s)")
    parser.add_argument("--combined-fastv-ratio", type=float, default=0.5,
                        help="FastV ratio R of the cls+fastv rows (default 0.5)")
    parser.add_argument("--positions", choices=POSITION_MODES, default="original",
                        help="position ids after encoder pruning: the untouched ones (original, default) or "
                             "renumbered around the kept tokens (contiguous, FasterVLM's rule)")
    parser.add_argument("--video", choices=VIDEO_INPUTS, default="frames",
                        help="clip input: the rendered frames (default) or each clip written as H.264 and read "
                             "back through the service's file source, as every file and stream reaches the model")
    parser.add_argument("--batch-size", type=int, default=16, help="questions per answer call (default 16)")
    parser.add_argument("--max-new-tokens", type=int, default=8,
                        help="answer length cap (answers are single words; default 8)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", action="store_true",
                        help="print the rows as JSON on stdout (the table then goes to stderr)")
    parser.add_argument("--plot", metavar="FILE.png", type=Path, default=None,
                        help="write a PNG of accuracy against kept tokens")


def _check_options(args: argparse.Namespace) -> None:
    limit = args.limit
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= HELD_OUT_SIZE:
        raise EvalUsageError(f"--limit must be an int in 1..{HELD_OUT_SIZE} (the held-out set's size), got {limit!r}")
    if not isinstance(args.batch_size, int) or args.batch_size < 1:
        raise EvalUsageError(f"--batch-size must be an int >= 1, got {args.batch_size!r}")
    if not isinstance(args.max_new_tokens, int) or args.max_new_tokens < 1:
        raise EvalUsageError(f"--max-new-tokens must be an int >= 1, got {args.max_new_tokens!r}")
    if args.threads is not None and (not isinstance(args.threads, int) or args.threads < 1):
        raise EvalUsageError(f"--threads must be an int >= 1, got {args.threads!r}")
    if args.plot is not None:
        plot = Path(args.plot)
        if plot.suffix.lower() != ".png":
            raise EvalUsageError(f"--plot writes a PNG: give a file name ending in .png, got {str(plot)!r}")
        if not plot.parent.is_dir():
            raise EvalUsageError(f"--plot: folder {str(plot.parent)!r} does not exist")


def through_h264(samples: list[Sample], settings: Settings) -> list[Sample]:
    """The samples with each clip's frames replaced by what the service reads from its H.264 file."""
    from pipeline.loopback import write_clip
    from pipeline.sources import SourcePolicy, open_source, sample_clip

    out = []
    with tempfile.TemporaryDirectory(prefix="streamvlm-eval-") as tmp:
        policy = SourcePolicy.from_settings(settings.sources, settings.sampling, allowed_roots=(Path(tmp).resolve(),))
        for s in samples:
            frames = s.clip.frames  # [T, H, W, 3] uint8
            path = write_clip(Path(tmp) / f"clip{s.index}.mp4", frames)
            with open_source(str(path), policy) as source:
                decoded = sample_clip(source, len(frames)).frames  # [T, H, W, 3] uint8
            out.append(replace(s, clip=replace(s.clip, frames=decoded)))
    return out


def run(args: argparse.Namespace, settings: Settings) -> int:
    def fail(code: int, message: str) -> int:
        print(f"streamvlm eval: {message}", file=sys.stderr)
        return code

    try:
        _check_options(args)
        rows = build_rows(args)
    except (EvalUsageError, ValueError) as exc:
        return fail(EXIT_USAGE, str(exc))
    from pipeline.demo_model import demo_model_path  # imports transformers: after the cheap checks

    model_path = Path(args.model or settings.model.path or demo_model_path())
    if not (model_path / "config.json").is_file():
        return fail(EXIT_FAILED, f"model: {model_path} is not a checkpoint folder (no config.json); "
                                 "give --model PATH or set model.path")

    import torch
    from tqdm import tqdm

    from pipeline.inference import ModelLoadError, VideoQA
    from pipeline.sources import SourceError
    from pipeline.synthetic import held_out_set

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        qa_model = VideoQA.load(model_path, device=settings.model.device, dtype=settings.model.dtype,
                                trust_remote_code=settings.model.trust_remote_code)
    except (ModelLoadError, OSError, ValueError) as exc:
        return fail(EXIT_FAILED, f"model: cannot load {model_path}: {exc}")
    samples = held_out_set(args.limit)
    if args.video == "h264":
        try:
            samples = through_h264(samples, settings)
        except SourceError as exc:
            return fail(EXIT_FAILED, f"--video h264: {exc}")
    try:
        for row in rows:
            row.config().check_against(qa_model.pruned.config, num_frames=len(samples[0].clip.frames))
    except ValueError as exc:
        return fail(EXIT_USAGE, f"pruning settings do not fit the model: {exc}")
    with tqdm(total=len(rows) * len(samples), desc="eval", unit="q", file=sys.stderr, mininterval=1.0,
              dynamic_ncols=True) as progress:
        results = evaluate(qa_model, samples, rows, args.batch_size, args.max_new_tokens, progress)
    table_rows = result_rows(results)
    table = format_table(table_rows)
    if args.json:
        print(table, file=sys.stderr)
        print(json.dumps(table_rows, indent=1))
    else:
        print(table)
    if args.plot is not None:
        write_plot(table_rows, Path(args.plot))
        print(f"plot written to {args.plot}", file=sys.stderr)
    return EXIT_OK


__all__ = ["METHODS", "RowSpec", "add_arguments", "answer_options", "build_rows", "evaluate", "format_table",
           "result_rows", "run", "write_plot"]
