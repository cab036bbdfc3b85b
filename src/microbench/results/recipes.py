"""Fine-tuning recipes side by side: full fine-tuning, LoRA, cross-entropy, LP-FT from the same base on
the same target, each read from its own fit record and forgetting study.

``python -m microbench recipes <multirun folder> [--out DIR]`` (and at the end of ``python src/train.py -m
experiment=compare_recipes recipe=...``) writes ``recipes.md`` / ``recipes.json`` / ``recipes.png``: per recipe the
trainable parameters, checkpoint size, and the target gain and supported loss vs the base (paired image-clustered
95 % CIs from each study) at α = 1 and at the study's chosen α; the plot puts each recipe as a point (and its chosen
α as a second one) on the target-vs-supported trade-off plane with its CIs.
"""

from __future__ import annotations

from pathlib import Path

from microbench.errors import UserError
from microbench.results.io import read_json, write_figure, write_json, write_text
from microbench.results.report import points

KEYS = (("target/fine", "target"), ("supported/all", "supported"))


def _cells(model: dict) -> dict:
    return {short: {k: model[key]["delta"][k] for k in ("value", "low", "high")} | {"acc": model[key]["acc"]["value"]}
            for key, short in KEYS}


def _features(study: dict) -> dict | None:
    """The fine-tune's supported probe Δ and verdict (a study with study.feature_probe=true), else None."""
    v = ((study.get("feature_probe") or {}).get("verdicts") or {}).get("finetuned") or {}
    if not v.get("probe_delta"):
        return None
    return {k: v["probe_delta"][k] for k in ("value", "low", "high")} | {"verdict": v["verdict"]}


def collect(runs: Path) -> tuple[list[dict], list[str]]:
    """One row per fit under ``runs`` with a forgetting study; the lines saying what was left out and why."""
    rows, left = [], []
    for fit_file in sorted(Path(runs).rglob("train_metrics.json")):
        run = fit_file.parent
        fit = read_json(fit_file)
        study_file = run / "forgetting" / "forgetting.json"
        if not study_file.is_file():
            left.append(f"{run}: no forgetting study (train it with forgetting.enabled=true)")
            continue
        study = read_json(study_file)
        cfg = fit.get("config") or {}
        module = cfg.get("module") or {}
        ckpt = fit.get("last_checkpoint")
        test = study["splits"]["test"]["models"]
        rows.append({
            "recipe": cfg.get("recipe_name") or run.name, "run": str(run), "objective": module.get("objective"),
            "adapter": (f"lora r={fit['adapter']['r']}" if fit.get("adapter") else "none"),
            "head_init": (fit.get("head_init") or {}).get("kind"), "lr": module.get("lr"),
            "trainable_parameters": fit.get("trainable_parameters"),
            "checkpoint_bytes": Path(ckpt).stat().st_size if ckpt and Path(ckpt).is_file() else None,
            "base": study["base"]["fingerprint"], "target_datasets": study["target_datasets"],
            "finetuned": _cells(test["finetuned"]), "chosen_alpha": study["selection"]["alpha"],
            "chosen": _cells(study["chosen_test"]), "test_acc": (fit.get("test") or {}).get("test/acc"),
            "features": _features(study)})
    return rows, left


def compare(runs: str | Path, out: str | Path) -> dict:
    """Build, check and write the comparison; one line when the runs are not comparable."""
    rows, left = collect(Path(runs))
    if not rows:
        raise UserError(f"no fine-tune with a forgetting study under {runs}"
                        + (f" ({len(left)} without one)" if left else ""))
    bases = {r["base"] for r in rows}
    if len(bases) > 1:
        raise UserError(f"the recipes start from different bases ({', '.join(sorted(bases))}): compare fine-tunes of "
                        "one base")
    targets = {tuple(r["target_datasets"]) for r in rows}
    if len(targets) > 1:
        raise UserError("the recipes were fine-tuned on different target datasets: compare them on one target")
    names = [r["recipe"] for r in rows]
    if len(set(names)) != len(names):
        raise UserError(f"two runs share a recipe name ({names}): pass one multirun of distinct recipes")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"recipes": rows, "left_out": left, "base": rows[0]["base"], "target_datasets": rows[0]["target_datasets"],
              "interval": "paired image-clustered 95 % bootstrap (each study: the recipe vs the base)"}
    write_json(out / "recipes.json", result)
    write_text(out / "recipes.md", markdown(result))
    plot(result, out / "recipes.png")
    return result


def _pp(c: dict) -> str:
    low, high = points(c["low"], signed=True), points(c["high"], signed=True)
    return f"{points(c['value'], signed=True)} [{low}, {high}]"


def markdown(result: dict) -> str:
    lines = ["# Fine-tuning recipes", "",
             f"Same base (`{result['base']}`), same target ({', '.join(result['target_datasets'])}); Δ vs the base in "
             "points on the test split with paired image-clustered 95 % CIs: the target's fine-grained accuracy and "
             "every other dataset (supported), at α = 1 (the fine-tune) and at each study's chosen α.", "",
             "| recipe | objective | adapter | head | trainable params | checkpoint | target Δ (α=1) | supported Δ "
             "(α=1) | chosen α | target Δ (chosen) | supported Δ (chosen) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    features = any(r.get("features") for r in result["recipes"])
    if features:  # the studies re-fitted probes on the frozen features: damaged features vs lost alignment
        lines[-2] += " features Δ, probe (α=1) | verdict |"
        lines[-1] += "---|---|"
        lines[2] += (" Features Δ: a linear probe re-fitted on the fine-tune's frozen image features vs the base's, "
                     "on the supported datasets (study.feature_probe=true).")
    for r in result["recipes"]:
        size = f"{r['checkpoint_bytes'] / 1e6:.2f} MB" if r["checkpoint_bytes"] else "—"
        row = (f"| {r['recipe']} | {r['objective']} | {r['adapter']} | {r['head_init'] or '—'} | "
               f"{r['trainable_parameters']:,} | {size} | {_pp(r['finetuned']['target'])} | "
               f"{_pp(r['finetuned']['supported'])} | {r['chosen_alpha']:.2f} | {_pp(r['chosen']['target'])} | "
               f"{_pp(r['chosen']['supported'])} |")
        if features:
            f = r.get("features")
            row += f" {_pp(f)} | {f['verdict']} |" if f else " — | — |"
        lines.append(row)
    best = max(result["recipes"], key=lambda r: r["finetuned"]["target"]["value"])
    least = max(result["recipes"], key=lambda r: r["finetuned"]["supported"]["value"])
    lines += ["", f"Largest target gain at α = 1: **{best['recipe']}** ({_pp(best['finetuned']['target'])}); least "
              f"forgetting elsewhere: **{least['recipe']}** ({_pp(least['finetuned']['supported'])})."]
    lines += [f"Left out: {x}" for x in result["left_out"]]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for i, r in enumerate(result["recipes"]):
        color = f"C{i % 10}"
        pts = []
        for which, marker, fill in (("finetuned", "o", color), ("chosen", "s", "none")):
            s, t = r[which]["supported"], r[which]["target"]
            x, y = 100 * s["value"], 100 * t["value"]
            ax.errorbar(x, y, xerr=[[x - 100 * s["low"]], [100 * s["high"] - x]],
                        yerr=[[y - 100 * t["low"]], [100 * t["high"] - y]], fmt=marker, color=color, mfc=fill,
                        capsize=3, label=f"{r['recipe']} (α=1)" if which == "finetuned" else
                        f"{r['recipe']} (α={r['chosen_alpha']:.2f})")
            pts.append((x, y))
        ax.plot(*zip(*pts, strict=True), color=color, lw=0.8, alpha=0.6)
    ax.axhline(0, color="grey", lw=0.6)
    ax.axvline(0, color="grey", lw=0.6)
    ax.set_xlabel("Δ accuracy on the rest of μ-Bench (points)")
    ax.set_ylabel("Δ fine-grained accuracy on the target (points)")
    ax.set_title("Recipes vs the base (95 % CIs; filled: α = 1, open: chosen α)", fontsize=9)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    write_figure(path, fig)
    return path
