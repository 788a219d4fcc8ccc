"""The data report: what a folder holds and what the split made of it, before any training.

`split` writes it beside its manifests (``report.json`` for machines, ``report.md`` for people)
and prints it; ``python -m cnnlab inspect`` builds the same report for a folder or an archive
without touching ``data/``. The numbers a user compares across runs also go to DVC's metrics.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from statistics import NormalDist
from typing import Any

# `class_weights: auto` weighs the classes once the largest has this many times the smallest's
# training images (cnnlab.training.losses applies it; the report says whether it will).
AUTO_IMBALANCE = 2.0

# image_size: auto. The from-scratch nets read sources at their native size up to 32 px
# (Fashion-MNIST stays 28: upsampling adds cost, not information) and photos at 32 px. Measured on a
# generated photo folder (8 classes, 558 training images, simple_cnn; validation accuracy of
# scratch / regularized): 28 px 59.5% / 70.2%, 32 px 59.5% / 69.4%, 48 px 64.5% / 65.3%, 64 px
# 55.4% / 19.8% (regularized did not train). A zoo net with a flatten head grows with the input
# (simple_cnn: 0.39M parameters at 28 px, 2.2M at 64) and overfits a few hundred images; set a
# number to try larger. The pretrained backbones read 128 px whatever the source: 224 is nominal
# but costs ~3x more on a CPU (Fashion-MNIST, EfficientNet-Lite0: 85% at 128 px). docs/data.md.
SCRATCH_PHOTO_SIZE = 32
BACKBONE_SIZE = 128
KINDS_WITH_SIZE = ("scratch", "feature_extract")

_HIST_EDGES = (32, 64, 128, 256, 512, 1024)
_LIST_LIMIT = 20  # entries of each list shown in the Markdown (the JSON has them all)


def auto_image_size(short_sides: Sequence[int]) -> dict[str, int]:
    """What ``image_size: auto`` means for each kind, given the usable images' shorter sides."""
    median = int(sorted(short_sides)[len(short_sides) // 2]) if short_sides else SCRATCH_PHOTO_SIZE
    return {"scratch": max(8, min(median, SCRATCH_PHOTO_SIZE)), "feature_extract": BACKBONE_SIZE}


def imbalance(counts: dict[str, int]) -> float | None:
    """Largest class over smallest; None when a class has no image (JSON has no infinity)."""
    values = list(counts.values())
    return max(values) / min(values) if values and min(values) else None


def half_width(n: int, accuracy: float, confidence: float = 0.95) -> float:
    """Half-width of the normal-approximation interval of an accuracy measured on ``n`` images."""
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    return z * math.sqrt(accuracy * (1 - accuracy) / n) if n else math.inf


def images_to_separate(accuracy: float, gap: float, *, alpha: float = 0.05, power: float = 0.8) -> int:
    """Test images needed to tell ``accuracy`` from ``accuracy + gap`` (two-sided ``alpha``, ``power``),
    as for two independent test sets: an upper bound for two models scored on the same images,
    where McNemar's test needs fewer the more their errors coincide."""
    z = NormalDist().inv_cdf(1 - alpha / 2) + NormalDist().inv_cdf(power)
    b = accuracy + gap
    return math.ceil(z**2 * (accuracy * (1 - accuracy) + b * (1 - b)) / gap**2)


def test_resolution(n_test: int) -> dict[str, Any]:
    """How finely the test split can rank variants."""
    return {
        "test_images": n_test,
        "half_width_95": {f"{p:.0%}": round(half_width(n_test, p), 4) for p in (0.7, 0.8, 0.9)},
        "images_to_separate_at_85%": {f"{g} point{'s' if g > 1 else ''}": images_to_separate(0.85, g / 100)
                                      for g in (1, 2)},
    }


def size_summary(sizes: Sequence[tuple[int, int]]) -> dict[str, Any]:
    """Widths, heights and a histogram of the shorter side."""
    def stats(values: list[int]) -> dict[str, int]:
        values = sorted(values)
        return {"min": values[0], "median": values[len(values) // 2], "max": values[-1]} if values else {}

    hist: Counter[str] = Counter()
    for w, h in sizes:
        s = min(w, h)
        edge = next((e for e in _HIST_EDGES if s < e), None)
        hist[f"< {edge}" if edge else f">= {_HIST_EDGES[-1]}"] += 1
    order = [f"< {e}" for e in _HIST_EDGES] + [f">= {_HIST_EDGES[-1]}"]
    return {"width": stats([w for w, _ in sizes]), "height": stats([h for _, h in sizes]),
            "short_side": {k: hist[k] for k in order if hist[k]}}


def metrics(report: dict[str, Any]) -> dict[str, Any]:
    """The report's numbers as flat DVC metrics (``dvc metrics diff`` compares them across runs)."""
    counts = report["counts"]
    return {
        "classes": len(report["classes"]),
        "color_mode": report["color_mode"],
        **{f"{s}_images": sum(c.values()) for s, c in counts.items()},
        "quarantined": len(report["quarantined"]),
        "skipped_non_images": len(report["skipped"].get("stray", [])),
        "imbalance_train": round(report["imbalance"]["train"] or 0.0, 3),
        "duplicates_dropped": sum(len(d["dropped"]) for d in report["duplicates"]),
        "leakage_dropped": len(report["leakage"]),
        "conflicting_images": sum(len(c["files"]) for c in report["conflicts"]),
        "near_duplicate_groups": len(report["near_duplicates"]),
        **{f"image_size_auto_{k}": v for k, v in report["image_size_auto"].items()},
        "test_half_width_95_at_90": report["test_resolution"]["half_width_95"]["90%"],
    }


def _listing(items: Sequence[Any], render) -> list[str]:
    lines = [f"- {render(x)}" for x in items[:_LIST_LIMIT]]
    if len(items) > _LIST_LIMIT:
        lines.append(f"- ... and {len(items) - _LIST_LIMIT} more (report.json has them all)")
    return lines or ["- none"]


def _span(stats: dict[str, int]) -> str:
    return f"{stats['min']}-{stats['max']} px (median {stats['median']})" if stats else "-"


def markdown(report: dict[str, Any]) -> str:
    """The report for people: what to look at first, first."""
    counts, classes = report["counts"], report["classes"]
    out = [f"# Data report: {report['source']}", ""]
    total = sum(sum(c.values()) for c in counts.values())
    used = ", ".join(f"{s} {sum(c.values())}" for s, c in counts.items())
    out += [(f"{len(classes)} classes, {total} images used ({used}); colour mode {report['color_mode']}; "
             f"{len(report['quarantined'])} quarantined."), ""]
    out += ["## Images per class", "", "| class | " + " | ".join(counts) + " |",
            "|---|" + "---:|" * len(counts)]
    out += [f"| {c} | " + " | ".join(str(counts[s].get(c, 0)) for s in counts) + " |" for c in classes]
    ratios = ", ".join(f"{s} {r:.2g}" if r else f"{s} - (a class has none)" for s, r in report["imbalance"].items())
    weigh = "will weigh the classes" if (report["imbalance"]["train"] or 0) >= AUTO_IMBALANCE else "leaves them unweighted"
    out += ["", (f"Largest / smallest class: {ratios}. `class_weights: auto` {weigh} "
                 f"(threshold {AUTO_IMBALANCE:g}x on train)."), ""]
    sizes = report["sizes"]
    out += ["## Image sizes and formats", "",
            f"Width {_span(sizes['width'])}, height {_span(sizes['height'])}; shorter side: "
            + ", ".join(f"{k} px: {v}" for k, v in sizes["short_side"].items()) + ".",
            "Formats: " + ", ".join(f"{k} {v}" for k, v in report["formats"].items())
            + f"; {report['rotated']} turned upright from EXIF.",
            "`image_size: auto` resolves to " + ", ".join(f"{k} {v} px" for k, v in report["image_size_auto"].items())
            + " (rule: params.yaml, `scratch.image_size`)."]
    if "stored" in report:  # the split stage's, once it wrote the shards
        kinds = Counter()
        for per_split in report["stored"].values():
            kinds.update(per_split)
        out += ["Stored: " + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items()))
                + " (`original`: the file's own bytes; docs/data.md)."]
    out += ["", "## Duplicates, conflicting labels, leakage", ""]
    out += ["Exact duplicates within a class (kept once):"]
    out += _listing(report["duplicates"], lambda d: f"kept {d['kept']}, dropped {', '.join(d['dropped'])} ({d['split']})")
    out += ["", "Same image under two classes (quarantined, every copy):"]
    out += _listing(report["conflicts"], lambda c: " = ".join(c["files"]))
    out += ["", "Same image in two splits (leakage: kept in the earliest split only):"]
    out += _listing(report["leakage"], lambda x: f"kept {x['kept']} ({x['kept_split']}), dropped {x['dropped']} "
                    f"({x['dropped_split']})")
    out += ["", "Near duplicates (resized or re-encoded copies; reported, not removed):"]
    out += _listing(report["near_duplicates"],
                    lambda g: " ~ ".join(f"{f} ({s})" for f, s in zip(g["files"], g["splits"], strict=True)))
    out += ["", "## Quarantined and skipped", ""]
    out += _listing(report["quarantined"], lambda q: f"{q['file']}: {q['reason']}")
    for kind, paths in report["skipped"].items():
        out += ["", f"Skipped, {kind.replace('_', ' ')}:"] + _listing(paths, str)
    res = report["test_resolution"]
    out += ["", "## What the test split can tell apart", "",
            f"{res['test_images']} test images: a 95% interval is +-"
            + ", ".join(f"{v * 100:.1f} points at {k}" for k, v in res["half_width_95"].items()) + " accuracy.",
            "Telling 85% from 86% takes about {:,} test images, from 87% about {:,} (independent test sets; "
            "McNemar's test on the same images, as `evaluate` runs it, usually needs fewer).".format(
                *res["images_to_separate_at_85%"].values()), ""]
    return "\n".join(out)
