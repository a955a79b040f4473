"""Tables, target checks and plots of ``run_sampling.py``'s result files.

    python benchmarks/report_sampling.py      # reads benchmarks/results/sampling/runs/*.json

Writes ``benchmarks/results/sampling/sampling.md`` (settings, tables, targets met or missed, what has not
run yet), ``sampling.json`` (the same numbers) and two PNG plots. A cell is ``mean ± std`` of the test
accuracy (%) over the seeds that finished (``n`` when fewer than 3), with the mean start displacement.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import matplotlib  # noqa: E402
import matplotlib.ticker  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import exp_common  # noqa: E402
import run_sampling  # noqa: E402
from exp_common import Run  # noqa: E402

SEEDS = (0, 1, 2)
OUT = run_sampling.RESULTS
LABELS = {
    ("dense", ""): "dense",
    ("nesc", ""): "nesc, learned starts",
    ("nesc_fixed", ""): "nesc_fixed (random starts, frozen)",
    ("wsnet", ""): "WSNet (as published)",
    ("nesc", "anneal"): "nesc, tent kernel 3 -> 1, starts lr 0.01",
    ("nesc", "extent4"): "nesc, pools 4 cells longer in time",
    ("nesc_fixed", "extent4"): "nesc_fixed, pools 4 cells longer in time",
    ("nesc", "learner"): "nesc, transformation learner",
    ("nesc", "spread"): "nesc, fit rescaled to the init's spread",
    ("nesc", "reuse"): "nesc, reuse=True (input channels fold after freeze)",
    ("nesc", "wide2"): "2x-wide nesc at the dense size",
    ("nesc_fixed", "wide2"): "2x-wide nesc_fixed at the dense size",
}


def cell(results: dict[str, dict], runs: list[Run]) -> dict:
    ok = [results[r.key] for r in runs if r.key in results and results[r.key]["status"] == "ok"]
    failed = [results[r.key] for r in runs if r.key in results and results[r.key]["status"] != "ok"]
    accs = [100 * d["test_acc"] for d in ok]
    moves = [d["history"][-1].get("start_mean_move") for d in ok if d["history"]]
    moves = [m for m in moves if m is not None]
    return {"n": len(ok), "of": len(runs), "accs": accs,
            "mean": statistics.fmean(accs) if accs else None,
            "std": statistics.stdev(accs) if len(accs) > 1 else None,
            "move": statistics.fmean(moves) if moves else None,
            "stored": [d["stored"] for d in ok], "budget": ok[0]["budget"] if ok else None,
            "error": failed[0].get("error") if failed and not ok else None,
            "missing": [r.seed for r in runs if r.key not in results]}


def fmt(c: dict, move: bool = False) -> str:
    if c["error"]:
        return "infeasible"
    if c["mean"] is None:
        return "not run"
    text = f"{c['mean']:.1f} ± {c['std']:.1f}" if c["std"] is not None else f"{c['mean']:.1f}"
    if c["n"] < c["of"]:
        text += f" (n={c['n']})"
    if move and c["move"]:
        text += f" [{c['move']:.2f}]"
    return text


def runs_of(experiment, dataset, model, method, ratio, variant="") -> list[Run]:
    if method == "dense":
        return [Run(experiment, dataset, model, "dense", 1, s).dense() for s in SEEDS]
    return [Run(experiment, dataset, model, method, ratio, s, variant=variant) for s in SEEDS]


def mnist1d_section(results: dict) -> tuple[list[str], dict]:
    lines = ["## MNIST-1D, `cnn1d` (32,618 parameters dense), 10 epochs", "",
             "Test accuracy %, mean ± std over 3 seeds; [mean start displacement in cells after training].", "",
             "| method | " + " | ".join(f"{r}x" for r in run_sampling.RATIOS_1D) + " |",
             "|---|" + "--:|" * len(run_sampling.RATIOS_1D)]
    data = {}
    dense = cell(results, runs_of("mnist1d", "mnist1d", "cnn1d", "dense", 1))
    data["dense"] = dense
    for method, variant in run_sampling.CELLS_1D:
        cells = {r: cell(results, runs_of("mnist1d", "mnist1d", "cnn1d", method, r, variant))
                 for r in run_sampling.RATIOS_1D}
        data[f"{method}/{variant}"] = cells
        lines.append(f"| {LABELS[method, variant]} | " + " | ".join(fmt(c, move=True) for c in cells.values()) + " |")
    lines += ["", f"Dense cnn1d: {fmt(dense)}.", ""]
    wide = {m: cell(results, runs_of("mnist1d", "mnist1d", "cnn1d", m, 1, "wide2")) for m in ("nesc", "nesc_fixed")}
    data["wide2"] = wide
    lines += ["Wide at equal size: cnn1d at width 2 (126,666 parameters dense) compressed to the dense cnn1d's "
              "32,618 parameters (3.9x):", "", "| model | stored | accuracy |", "|---|--:|--:|",
              f"| dense cnn1d | 32,618 | {fmt(dense)} |"]
    for m, c in wide.items():
        stored = f"{statistics.fmean(c['stored']):,.0f}" if c["stored"] else "-"
        lines.append(f"| {LABELS[m, 'wide2']} | {stored} | {fmt(c)} |")
    lines += ["", "Targets:", ""] + _targets_1d(data) + [""]
    return lines, data


def _gap(a: dict, b: dict) -> tuple[float | None, float | None]:
    """(a - b in points, that difference over the larger std)."""
    if a["mean"] is None or b["mean"] is None:
        return None, None
    diff = a["mean"] - b["mean"]
    spread = max(a["std"] or 0.0, b["std"] or 0.0)
    return diff, (diff / spread if spread > 0 else None)


def _targets_1d(data: dict) -> list[str]:
    out = []
    learned = {k: v[8] for k, v in data.items() if isinstance(v, dict) and 8 in v}
    best = max((k for k in learned if k.startswith("nesc/")), key=lambda k: learned[k]["mean"] or -1, default=None)
    fixed, wsnet = learned.get("nesc_fixed/"), learned.get("wsnet/")
    for name in ("nesc/", best) if best and best != "nesc/" else ("nesc/",):
        diff, z = _gap(learned[name], fixed)
        if diff is None:
            out.append(f"- 8x, {name} vs nesc_fixed: not run yet")
            continue
        met = diff >= 1.0 and z is not None and z >= 2
        out.append(f"- 8x, learned beats fixed random starts by >= 1.0 point and >= 2 std ({name}): "
                   f"{diff:+.2f} points, {z if z is None else round(z, 1)} std: {'met' if met else 'NOT met'}")
        diff, _ = _gap(learned[name], wsnet)
        if diff is not None:
            out.append(f"- 8x, learned beats WSNet by >= 2 points ({name}): {diff:+.2f}: {'met' if diff >= 2 else 'NOT met'}")
    diff, z = _gap(data["wide2"]["nesc"], data["dense"])
    if diff is not None:
        out.append(f"- the 2x-wide model at the dense size beats the dense model: {diff:+.2f} points: "
                   f"{'met' if diff > 0 else 'NOT met'}")
    return out


def fmnist_section(results: dict) -> tuple[list[str], dict]:
    lines = ["## Fashion-MNIST, the whole train split (60,000), 5 epochs, all 10,000 test images", "",
             "| model | dense | nesc 4x | nesc_fixed 4x | WSNet 4x | nesc 8x | 2x-wide nesc at the dense size "
             "| nesc 4x, reuse=True | nesc 4x, reuse=\"outputs\" |", "|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
    data = {}
    for model in run_sampling.FMNIST_MODELS:
        dense = cell(results, runs_of("fmnist_full", "fashion_mnist_full", model, "dense", 1))
        cells = {"dense": dense}
        for method, variant, ratio in run_sampling.CELLS_FMNIST:
            cells[f"{method}/{variant}/{ratio}"] = cell(
                results, runs_of("fmnist_full", "fashion_mnist_full", model, method, ratio, variant))
        data[model] = cells
        lines.append(f"| `{model}` | " + " | ".join(fmt(c) for c in cells.values()) + " |")
    lines += ["", "Targets:", ""]
    for model, cells in data.items():
        diff, _ = _gap(cells["nesc//4"], cells["dense"])
        lines.append(f"- {model}, nesc 4x within 0.5 point of dense: "
                     + ("not run yet" if diff is None else f"{diff:+.2f}: {'met' if diff >= -0.5 else 'NOT met'}"))
        diff, _ = _gap(cells["nesc/wide2/1"], cells["dense"])
        lines.append(f"- {model}, 2x-wide at the dense size beats dense: "
                     + ("not run yet" if diff is None else f"{diff:+.2f}: {'met' if diff > 0 else 'NOT met'}"))
        for variant in ("reuse", "reuse_outputs"):  # the reuse issue: <= 1 point below nesc without the option
            diff, _ = _gap(cells[f"nesc/{variant}/4"], cells["nesc//4"])
            lines.append(f"- {model}, nesc 4x {variant} within 1 point of nesc 4x: "
                         + ("not run yet" if diff is None else f"{diff:+.2f}: {'met' if diff >= -1 else 'NOT met'}"))
    return lines + [""], data


def plot_mnist1d(data: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, cells in data.items():
        if not isinstance(cells, dict) or 4 not in cells:
            continue
        method, variant = key.split("/")
        xs = [r for r, c in cells.items() if c["mean"] is not None]
        if xs:
            ax.errorbar(xs, [cells[r]["mean"] for r in xs], yerr=[cells[r]["std"] or 0 for r in xs], capsize=3,
                        marker="o", label=LABELS[method, variant])
    if data["dense"]["mean"] is not None:
        ax.axhline(data["dense"]["mean"], color="k", linestyle="--", label="dense")
    ax.set(xscale="log", xlabel="compression (dense / stored parameters)", ylabel="test accuracy (%)",
           title="MNIST-1D, cnn1d: learned vs fixed sampling")
    ax.set_xticks(list(run_sampling.RATIOS_1D), [f"{r}x" for r in run_sampling.RATIOS_1D])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_fmnist(data: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    labels = ["dense", "nesc 4x", "fixed 4x", "WSNet 4x", "nesc 8x", "wide@dense", "reuse 4x", "outputs 4x"]
    for m, (model, cells) in enumerate(data.items()):
        xs = [i + 0.4 * m for i in range(len(cells))]
        ax.bar(xs, [c["mean"] or 0 for c in cells.values()], width=0.4, yerr=[c["std"] or 0 for c in cells.values()],
               label=model, capsize=2)
    ax.set_xticks([i + 0.2 for i in range(len(labels))], labels)
    means = [c["mean"] for cells in data.values() for c in cells.values() if c["mean"]]
    if means:
        ax.set_ylim(min(means) - 3, max(means) + 1)
    ax.set(ylabel="test accuracy (%)", title="Fashion-MNIST (60,000 train images, 5 epochs)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    run_sampling.use_results_folder()
    results = {p.stem: json.loads(p.read_text()) for p in sorted(exp_common.RUNS.glob("*.json"))}
    settings = exp_common.Settings()
    expected = [r for s in SEEDS for g in run_sampling.GRIDS for r in run_sampling.grid(g, s)]
    missing = [r.key for r in expected if r.key not in results]
    commits = sorted({d.get("commit", "?")[:12] for d in results.values()})
    lines = ["# Learned sampling, WSNet and wide-at-equal-size on real data", "",
             "Produced by `python benchmarks/run_sampling.py` (training, resumable) and "
             "`python benchmarks/report_sampling.py` (this file and the plots).", "",
             f"- settings: {json.dumps(dataclasses.asdict(settings))}; variants: `exp_common.VARIANTS`",
             f"- source revisions: {', '.join(f'`{c}`' for c in commits)}",
             f"- {len(results)} result files; {len(missing)} of {len(expected)} runs not run yet", ""]
    section, data_1d = mnist1d_section(results)
    lines += section
    section, data_fm = fmnist_section(results)
    lines += section
    plot_mnist1d(data_1d, OUT / "mnist1d_sampling.png")
    plot_fmnist(data_fm, OUT / "fmnist_full.png")
    lines += ["![MNIST-1D](mnist1d_sampling.png)", "", "![Fashion-MNIST](fmnist_full.png)", ""]
    if missing:
        lines += ["## Not run yet", ""] + [f"- `{k}`" for k in missing] + [""]
    (OUT / "sampling.md").write_text("\n".join(lines))
    (OUT / "sampling.json").write_text(json.dumps({"mnist1d": data_1d, "fmnist_full": data_fm}, indent=1, default=str))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
