"""The report of a forgetting study: ``forgetting.json`` (the study), ``forgetting.md`` (the tables),
``alpha_sweep.png`` (target vs whole-benchmark accuracy across α, as the paper's Figure 5), ``dataset_deltas.png``,
and what the configured logger receives (scalars; tables and images for W&B)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from microbench.results.io import write_json, write_text
from microbench.studies.forgetting import LOCALIZATION_KEYS, is_extrapolation
from microbench.studies.sweep import alpha_name

log = logging.getLogger(__name__)


def write_report(study: dict, out_dir: str | Path, logger=None) -> dict:
    """Write the study's files to ``out_dir`` (each atomic) and send it to ``logger``; returns the study."""
    out_dir = Path(out_dir)
    write_json(out_dir / "forgetting.json", study)
    plots = plot_study(study, out_dir)
    write_text(out_dir / "forgetting.md", report_markdown(study))
    if logger is not None:
        log_to_logger(logger, study, plots)
    return study


def _pct(x: float | None) -> str:
    return "—" if x is None or np.isnan(x) else f"{100 * x:.2f}"


def _delta(d: dict | None) -> str:
    if not d:
        return "—"
    star = "*" if d.get("significant") else ""
    return f"{100 * d['value']:+.2f} [{100 * d['low']:+.2f}, {100 * d['high']:+.2f}]{star}"


def _points(d: dict) -> str:
    return f"{100 * d['value']:+.1f} points (95 % CI {100 * d['low']:+.1f} to {100 * d['high']:+.1f})"


def _change(delta: dict, up: str, down: str, same: str) -> str:
    """``up``/``down``/``same`` (each with a ``{}`` for the points and CI) by the sign and significance of
    ``delta``; a loss is said as a positive number of points (``forgot 13.8 points``)."""
    if not delta["significant"]:
        return same.format(_points(delta))
    return up.format(_points(delta)) if delta["value"] > 0 else down.format(_points(delta)[1:])


def findings(study: dict) -> list[str]:
    """What happened, in words (the top of the report): the fine-tune's change on its target and elsewhere on test,
    and what the chosen α keeps and wins back; a warning when the base knows nothing to forget."""
    test = study["splits"]["test"]["models"]
    ft, ch = test["finetuned"], study.get("chosen_test") or test[alpha_name(study["selection"]["alpha"])]
    target = "target/localization" if "target/localization" in ft and "delta" in ft["target/localization"] and \
        "low" in ft["target/localization"]["delta"] else "target/fine"
    lines = []
    if (study.get("base") or {}).get("initialization") == "random-init":
        lines.append("> **Warning: the base model is random-init** (no pretrained weights): it knows nothing that could "
                     "be forgotten, so this study cannot show forgetting. Use a pretrained or generalist base (the "
                     "demo's `model=tiny_generalist`).")
    if not all(k in m for m in (ft, ch, test["base"]) for k in (target, "supported/all")):
        return lines  # a study without both groups (e.g. every dataset a target): the tables say it all
    t, s = ft[target], ft["supported/all"]
    gain = t["delta"]["value"]
    what = "fine-grained accuracy" if target == "target/fine" else "localization score"
    chance = ((study["splits"]["test"].get("chance") or {}).get("supported"))
    base_sup = test["base"]["supported/all"]["acc"]
    if lines:
        pass  # random-init, said above
    elif chance is not None and chance == chance and base_sup.get("low") is not None and base_sup["low"] <= chance:
        lines.append(f"> **Warning: the base model is at chance on the supported datasets** "
                     f"({100 * base_sup['value']:.1f} %, chance {100 * chance:.1f} %): there is little to forget, so "
                     "a loss there cannot show up; use a stronger base.")
    tgt = _change(t["delta"], f"gained {{}} of {what} on its target datasets",
                  f"lost {{}} of {what} on its own target datasets",
                  f"did not change its target datasets' {what} significantly ({{}})")
    tgt += f" ({100 * test['base'][target]['acc']['value']:.1f} → {100 * t['acc']['value']:.1f} %)"
    sup = _change(s["delta"], "and improved the supported datasets by {}", "and forgot {} on the supported datasets",
                  "and did not change the supported datasets significantly ({})")
    sup += f" ({100 * base_sup['value']:.1f} → {100 * s['acc']['value']:.1f} %)"
    lines.append(f"**What happened.** On the test split, the fine-tune {tgt}, {sup}.")
    a = study["selection"]["alpha"]
    kept = ch[target]["delta"]["value"]
    lost = s["acc"]["value"] - base_sup["value"]
    back = ch["supported/all"]["acc"]["value"] - s["acc"]["value"]
    rec = f"Interpolating with the base at **α = {a:.2f}** (chosen on val) "
    if gain > 0:
        rec += f"keeps {100 * kept:+.1f} of the {100 * gain:+.1f}-point target gain ({100 * kept / gain:.0f} %)"
    else:
        rec += f"changes the target by {100 * kept:+.1f} points"
    if lost < 0:
        rec += (f" and wins back {100 * back:.1f} of the {-100 * lost:.1f} points lost elsewhere (supported "
                f"{100 * ch['supported/all']['acc']['value']:.1f} %).")
    else:
        rec += f" with supported accuracy {100 * ch['supported/all']['acc']['value']:.1f} %."
    lines.append(rec)
    return lines


def report_markdown(study: dict) -> str:
    test = study["splits"]["test"]["models"]
    chosen = study["selection"]["alpha"]
    lines = [
        "# Forgetting study", "", *[x for line in findings(study) for x in (line, "")],
        f"Base `{study['base']['name']}` (`{study['base']['fingerprint']}`) vs fine-tuned "
        f"`{study['finetuned']['path']}`; interpolated towers: {study['towers']}. Target tasks (fine-tuning datasets): "
        f"{', '.join(study['target_datasets']) or '—'}; supported tasks: every other dataset of the copy.",
        f"Accuracy % on the **test** split (caption sets, both variants), Δ vs base in points with a paired 95 % "
        f"bootstrap CI; * = CI excludes 0. Chosen α = **{chosen:.2f}** ({study['selection']['rule']}).", "",
        "| model | target fine | Δ | target coarse | Δ | supported fine | Δ | supported coarse | Δ | all | Δ |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    extrapolated = [a for a in study["alphas"] if is_extrapolation(a)]
    if extrapolated:
        lines[-3:-3] = [f"α outside [0, 1] ({', '.join(f'{a:g}' for a in extrapolated)}) **extrapolate** beyond the "
                        "base (α < 0) or the fine-tuned weights (α > 1), as asked with extrapolate=true; rows marked "
                        "(extrapolation).", ""]
    for name, s in test.items():
        label = name + (" (extrapolation)" if name.startswith("alpha=") and is_extrapolation(
            float(name.split("=")[1])) else "")
        row = [label + (" ← chosen" if name == alpha_name(chosen) else "")]
        for k in ("target/fine", "target/coarse", "supported/fine", "supported/coarse", "all/all"):
            v = s.get(k)
            row += [_pct(v["acc"]["value"]) if v else "—", _delta(v["delta"]) if v else "—"]
        lines.append("| " + " | ".join(row) + " |")
    loc = study["splits"]["test"].get("localization")
    if loc:
        keys = [k for k in LOCALIZATION_KEYS if any(v.get(k) is not None for v in loc.values())]
        lines += ["", "## Localization (test): the fine-tuned head on θ(α)", "",
                  "COCO AP (pycocotools) and the GRIT localization score, in %; α = 0 puts the fine-tuned head on the "
                  "base tower.", "", "| model | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        for name, v in loc.items():
            mark = " ← chosen" if name == alpha_name(chosen) else ""
            lines.append(f"| {name}{mark} | " + " | ".join(_pct(v.get(k)) for k in keys) + " |")
    lines += ["", "![target vs whole benchmark](alpha_sweep.png)", "", "## Per dataset (test): fine-tuned and chosen α vs base", "",
              "| dataset | grain | target | base | fine-tuned | Δ | chosen α | Δ |", "|---|---|---|---|---|---|---|---|"]
    ft = test.get("finetuned", {}).get("datasets", {})
    ch = test.get(alpha_name(chosen), {}).get("datasets", {})
    for key, v in ft.items():
        name, grain = key.rsplit("/", 1)
        c = ch.get(key, {})
        lines.append(f"| {name} | {grain} | {'yes' if v['target'] else ''} | {_pct(v['base_acc'])} | {_pct(v['acc'])} | "
                     f"{_delta(v['delta'])} | {_pct(c.get('acc'))} | {_delta(c.get('delta'))} |")
    lines += ["", "![per-dataset deltas](dataset_deltas.png)", ""]
    return "\n".join(lines)


def plot_study(study: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    test = study["splits"]["test"]["models"]
    sweep = [(float(n.split("=")[1]), s) for n, s in test.items() if n.startswith("alpha=")]
    sweep.sort()
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    xs = [100 * s["target/fine"]["acc"]["value"] for _, s in sweep]
    ys = [100 * s["supported/all"]["acc"]["value"] for _, s in sweep]
    ax.plot(xs, ys, "-o", color="#4C72B0", ms=4, label="WiSE-FT θ(α)")
    for (a, _), x, y in zip(sweep, xs, ys, strict=True):
        ax.annotate(f"{a:.1f}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color="#4C72B0")
    for name, marker, color in (("base", "s", "#55A868"), ("finetuned", "D", "#C44E52")):
        s = test[name]
        ax.scatter([100 * s["target/fine"]["acc"]["value"]], [100 * s["supported/all"]["acc"]["value"]], marker=marker,
                   s=70, color=color, zorder=5, label="base (α=0)" if name == "base" else "fine-tuned (α=1)")
    chosen = test[alpha_name(study["selection"]["alpha"])]
    ax.scatter([100 * chosen["target/fine"]["acc"]["value"]], [100 * chosen["supported/all"]["acc"]["value"]],
               marker="*", s=220, color="#DD8452", zorder=6, label=f"chosen α={study['selection']['alpha']:.2f} (val)")
    ax.set_xlabel("target tasks: fine-grained accuracy (%)")
    ax.set_ylabel("supported tasks (rest of μ-Bench): accuracy (%)")
    ax.set_title("Gain on the target vs forgetting elsewhere, across α (test)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    p1 = out_dir / "alpha_sweep.png"
    fig.savefig(p1)
    plt.close(fig)

    ft = test["finetuned"]["datasets"]
    ch = test[alpha_name(study["selection"]["alpha"])]["datasets"]
    keys = sorted(ft, key=lambda k: (not ft[k]["target"], k))
    fig, ax = plt.subplots(figsize=(7.5, max(3.0, 0.28 * len(keys) + 1)), dpi=120)
    y = np.arange(len(keys))
    for off, src, color, label in ((-0.2, ft, "#C44E52", "fine-tuned"), (0.2, ch, "#DD8452", "chosen α")):
        vals = np.array([100 * src[k]["delta"]["value"] for k in keys])
        lo = vals - np.array([100 * src[k]["delta"]["low"] for k in keys])
        hi = np.array([100 * src[k]["delta"]["high"] for k in keys]) - vals
        ax.barh(y + off, vals, height=0.38, color=color, xerr=[lo, hi], error_kw={"lw": 0.8}, label=label)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(y, [("▶ " if ft[k]["target"] else "") + k.replace("/", " · ") for k in keys], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("Δ accuracy vs base (points, paired 95 % CI); ▶ = target dataset")
    ax.legend(fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    p2 = out_dir / "dataset_deltas.png"
    fig.savefig(p2)
    plt.close(fig)
    return [p1, p2]


#: the groups of the α-sweep table: (column prefix, study key)
SWEEP_GROUPS = (("target_fine", "target/fine"), ("target_coarse", "target/coarse"), ("supported_fine", "supported/fine"),
                ("supported_coarse", "supported/coarse"), ("supported_all", "supported/all"), ("all", "all/all"))


def sweep_table(study: dict, split: str = "test") -> tuple[list[str], list[list]]:
    """One row per α (0 = base, 1 = fine-tuned): accuracy, Δ vs base and its paired 95 % CI for each group."""
    models = study["splits"][split]["models"]
    chosen = study["selection"]["alpha"]
    columns = ["alpha", "model", "chosen"] + [f"{p}_{c}" for p, _ in SWEEP_GROUPS
                                               for c in ("acc", "delta", "delta_low", "delta_high")]
    rows = []
    for a in study["alphas"]:
        m = models[alpha_name(a)]
        row = [float(a), "base" if a == 0 else "fine-tuned" if a == 1 else f"θ({a:.2f})", bool(abs(a - chosen) < 1e-9)]
        for _, key in SWEEP_GROUPS:
            e = m.get(key) or {}
            d = e.get("delta") or {}
            row += [(e.get("acc") or {}).get("value"), d.get("value"), d.get("low"), d.get("high")]
        rows.append(row)
    return columns, rows


def dataset_table(study: dict) -> tuple[list[str], list[list]]:
    """Per dataset and grain on test: base, fine-tuned and chosen-α accuracy, the two Δ with their CIs."""
    test = study["splits"]["test"]["models"]
    ft = test["finetuned"]["datasets"]
    ch = test[alpha_name(study["selection"]["alpha"])]["datasets"]
    columns = ["dataset", "grain", "target", "n", "base_acc", "finetuned_acc", "finetuned_delta", "finetuned_low",
               "finetuned_high", "chosen_acc", "chosen_delta", "chosen_low", "chosen_high"]
    rows = []
    for key, e in ft.items():
        dataset, grain = key.rsplit("/", 1)
        c = ch.get(key, {})
        rows.append([dataset, grain, bool(e["target"]), e["n"], e["base_acc"], e["acc"], e["delta"]["value"],
                     e["delta"]["low"], e["delta"]["high"], c.get("acc"), (c.get("delta") or {}).get("value"),
                     (c.get("delta") or {}).get("low"), (c.get("delta") or {}).get("high")])
    return columns, rows


def summary_values(study: dict) -> dict[str, float]:
    """The study's answer in a few numbers (W&B run summary): the chosen α and, on test, base / fine-tuned / chosen
    accuracy and Δ on the target's fine questions and on the supported datasets."""
    test = study["splits"]["test"]["models"]
    out = {"forgetting/chosen_alpha": float(study["selection"]["alpha"])}
    for who, m in (("base", test["base"]), ("finetuned", test["finetuned"]), ("chosen", study["chosen_test"])):
        for short, key in (("target_fine", "target/fine"), ("supported_all", "supported/all")):
            out[f"forgetting/{who}/{short}"] = m[key]["acc"]["value"]
            if who != "base":
                out[f"forgetting/{who}/{short}_delta"] = m[key]["delta"]["value"]
    return out


def log_to_logger(logger, study: dict, plots: list[Path]) -> None:
    """Scalars for every logger; with W&B also the α sweep and per-dataset tables, the two plots, the answer as
    summary values and the study's settings in the run config."""
    test = study["splits"]["test"]["models"]
    scalars = {f"forgetting/{name}/{k}": v["acc"]["value"] for name, s in test.items() for k, v in s.items()
               if isinstance(v, dict) and "acc" in v}
    scalars["forgetting/chosen_alpha"] = study["selection"]["alpha"]
    logger.log_metrics(scalars)
    if not (hasattr(logger, "log_table") and hasattr(logger, "log_image")):
        return
    columns, rows = sweep_table(study)
    logger.log_table(key="forgetting/alpha_sweep", columns=columns, data=rows)
    columns, rows = dataset_table(study)
    logger.log_table(key="forgetting/datasets", columns=columns, data=rows)
    logger.log_image(key="forgetting/plots", images=[str(p) for p in plots],
                     caption=["target vs supported accuracy across α", "per-dataset Δ vs base"][:len(plots)])
    run = logger.experiment
    for k, v in summary_values(study).items():
        run.summary[k] = v
    run.config.update({"forgetting": {"alphas": study["alphas"], "towers": study["towers"],
                                      "target_datasets": study["target_datasets"],
                                      "selection_rule": study["selection"]["rule"],
                                      "base": study["base"], "finetuned": study["finetuned"]}},
                      allow_val_change=True)
