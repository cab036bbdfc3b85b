"""The report of a forgetting study: ``forgetting.json`` (the study), ``forgetting.md`` (the tables),
``alpha_sweep.png`` (target vs whole-benchmark accuracy across α, as the paper's Figure 5), ``dataset_deltas.png``,
and what the configured logger receives (scalars; tables and images for W&B)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from microbench.results.io import write_figure, write_json, write_text
from microbench.results.report import percent, points
from microbench.studies.forgetting import LOCALIZATION_KEYS, is_extrapolation
from microbench.studies.sweep import alpha_name

log = logging.getLogger(__name__)


def write_report(study: dict, out_dir: str | Path, logger=None) -> dict:
    """Write the study's files to ``out_dir`` (each atomic) and send it to ``logger``; returns the study."""
    out_dir = Path(out_dir)
    undefined = undefined_numbers(study)
    if undefined:  # never NaN in JSON: undefined, with where and why
        study["undefined"] = {**study.get("undefined", {}), **undefined}
        log.warning("%d number(s) of the study are undefined (forgetting.json -> undefined), e.g. %s", len(undefined),
                    next(iter(undefined)))
    write_json(out_dir / "forgetting.json", study)
    plots = plot_study(study, out_dir)
    write_text(out_dir / "forgetting.md", report_markdown(study))
    if logger is not None:
        log_to_logger(logger, study, plots)
    return study


def undefined_numbers(obj, path: str = "") -> dict[str, str]:
    """Replace every NaN / infinite float of a JSON-like study in place by None; returns {path: reason}."""
    found: dict[str, str] = {}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in list(items):
        sub = f"{path}/{k}" if path else str(k)
        if isinstance(v, float) and not np.isfinite(v):
            obj[k] = None
            found[sub] = "undefined: computed over no items (a group, slice or dataset empty on this split)"
        elif isinstance(v, dict | list):
            found.update(undefined_numbers(v, sub))
    return found


def _interval_name(study: dict) -> str:
    """How the study's intervals were drawn (image-clustered; studies written before clustering: bootstrap)."""
    ft = ((study.get("splits") or {}).get("test") or {}).get("models", {}).get("finetuned", {})
    d = (ft.get("supported/all") or ft.get("all/all") or {}).get("delta") or {}
    return "image-clustered" if "clustered" in str(d.get("interval", "")) else "bootstrap"


def _delta(d: dict | None) -> str:
    if not d:
        return "—"
    star = "*" if d.get("significant") else ""
    return f"{percent(d['value'], True)} [{percent(d['low'], True)}, {percent(d['high'], True)}]{star}"


def _points(d: dict) -> str:
    return (f"{points(d['value'], signed=True)} points (95 % CI {points(d['low'], signed=True)} to "
            f"{points(d['high'], signed=True)})")


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
                     f"({points(base_sup['value'])} %, chance {points(chance)} %): there is little to forget, so "
                     "a loss there cannot show up; use a stronger base.")
    tgt = _change(t["delta"], f"gained {{}} of {what} on its target datasets",
                  f"lost {{}} of {what} on its own target datasets",
                  f"did not change its target datasets' {what} significantly ({{}})")
    tgt += f" ({points(test['base'][target]['acc']['value'])} → {points(t['acc']['value'])} %)"
    sup = _change(s["delta"], "and improved the supported datasets by {}", "and forgot {} on the supported datasets",
                  "and did not change the supported datasets significantly ({})")
    sup += f" ({points(base_sup['value'])} → {points(s['acc']['value'])} %)"
    lines.append(f"**What happened.** On the test split, the fine-tune {tgt}, {sup}.")
    a = study["selection"]["alpha"]
    kept = ch[target]["delta"]["value"]
    lost = s["acc"]["value"] - base_sup["value"]
    back = ch["supported/all"]["acc"]["value"] - s["acc"]["value"]
    primary = study.get("primary_method", "wise_ft")
    rec = (f"Interpolating with the base at **α = {a:.2f}** (chosen on val) " if primary == "wise_ft" else
           f"Merging with **{primary}** at **α = {a:.2f}** (chosen on val) ")
    if gain > 0:
        rec += (f"keeps {points(kept, signed=True)} of the {points(gain, signed=True)}-point target gain "
                f"({100 * kept / gain:.0f} %)")
    else:
        rec += f"changes the target by {points(kept, signed=True)} points"
    if lost < 0:
        rec += (f" and wins back {points(back)} of the {points(-lost)} points lost elsewhere (supported "
                f"{points(ch['supported/all']['acc']['value'])} %).")
    else:
        rec += f" with supported accuracy {points(ch['supported/all']['acc']['value'])} %."
    lines.append(rec)
    verdict = ((study.get("feature_probe") or {}).get("verdicts") or {}).get("finetuned")
    if verdict and verdict.get("probe_delta"):
        lines.append(f"**Features or alignment.** A linear probe on the fine-tune's frozen features changes the "
                     f"supported datasets by {_points(verdict['probe_delta'])} vs the base's probe: "
                     f"**{verdict['verdict']}** (section below).")
    return lines


def report_markdown(study: dict) -> str:
    test = study["splits"]["test"]["models"]
    chosen = study["selection"]["alpha"]
    lines = [
        "# Forgetting study", "", *[x for line in findings(study) for x in (line, "")],
        f"Base `{study['base']['name']}` (`{study['base']['fingerprint']}`) vs fine-tuned "
        f"`{study['finetuned']['path']}`; interpolated towers: {study['towers']}. Target tasks (fine-tuning datasets): "
        f"{', '.join(study['target_datasets']) or '—'}; supported tasks: every other dataset of the copy.",
        *([f"Rows `alpha=…` are the points of **{study['primary_method']}** (the first of study.methods; every "
           "method's points are in the side-by-side section and `forgetting.json` → `methods`)."]
          if study.get("primary_method", "wise_ft") != "wise_ft" else []),
        f"Accuracy % on the **test** split (caption sets, both variants), Δ vs base in points with a paired 95 % "
        f"{_interval_name(study)} CI; * = CI excludes 0. Chosen α = **{chosen:.2f}** ({study['selection']['rule']}).", "",
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
            row += [percent(v["acc"]["value"]) if v else "—", _delta(v["delta"]) if v else "—"]
        lines.append("| " + " | ".join(row) + " |")
    lines += methods_markdown(study)
    loc = study["splits"]["test"].get("localization")
    if loc:
        keys = [k for k in LOCALIZATION_KEYS if any(v.get(k) is not None for v in loc.values())]
        lines += ["", "## Localization (test): the fine-tuned head on θ(α)", "",
                  "COCO AP (pycocotools) and the GRIT localization score, in %; α = 0 puts the fine-tuned head on the "
                  "base tower.", "", "| model | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        for name, v in loc.items():
            mark = " ← chosen" if name == alpha_name(chosen) else ""
            lines.append(f"| {name}{mark} | " + " | ".join(percent(v.get(k)) for k in keys) + " |")
    lines += ["", "![target vs whole benchmark](alpha_sweep.png)", "", "## Per dataset (test): fine-tuned and chosen α vs base", "",
              "| dataset | grain | target | base | fine-tuned | Δ | chosen α | Δ |", "|---|---|---|---|---|---|---|---|"]
    ft = test.get("finetuned", {}).get("datasets", {})
    ch = test.get(alpha_name(chosen), {}).get("datasets", {})
    for key, v in ft.items():
        name, grain = key.rsplit("/", 1)
        c = ch.get(key, {})
        lines.append(f"| {name} | {grain} | {'yes' if v['target'] else ''} | {percent(v['base_acc'])} | {percent(v['acc'])} | "
                     f"{_delta(v['delta'])} | {percent(c.get('acc'))} | {_delta(c.get('delta'))} |")
    lines += ["", "![per-dataset deltas](dataset_deltas.png)", ""]
    lines += axes_markdown(study)
    lines += feature_probe_markdown(study)
    return "\n".join(lines)


def _ci(d: dict | None, scale: float = 100, fmt: str = "+.1f") -> str:
    if not d or d.get("value") is None:
        return "—"
    star = "*" if d.get("significant") else ""
    return f"{scale * d['value']:{fmt}} [{scale * d['low']:{fmt}}, {scale * d['high']:{fmt}}]{star}"


def methods_table(study: dict) -> tuple[list[str], list[list]]:
    """One row per merge method at its α chosen on val, on test: accuracy, Δ vs base and vs the fine-tune with
    paired CIs, the share of the target gain kept and of the supported loss won back, LiNeS' normalized accuracies,
    the curve area with its CI (DARE: the mean over seeds, and the spread of the seeds)."""
    test = study["splits"]["test"]["models"]
    base, ft = test["base"], test["finetuned"]
    gain = (ft.get("target/fine") or {}).get("delta", {}).get("value")
    loss = (ft.get("supported/all") or {}).get("delta", {}).get("value")
    areas = (study.get("areas") or {}).get("areas", {})
    columns = ["method", "alpha", "target_fine_acc", "target_delta", "target_delta_low", "target_delta_high",
               "gain_kept", "supported_acc", "won_back", "won_back_low", "won_back_high", "loss_won_back",
               "target_norm", "control_norm", "area", "area_low", "area_high", "seed_spread_supported"]
    rows = []
    for name, m in (study.get("methods") or {}).items():
        c = m["chosen_test"]
        t, sup = c.get("target/fine") or {}, c.get("supported/all") or {}
        back = (m.get("vs_finetuned") or {}).get("supported/all") or {}
        td = t.get("delta") or {}
        area = areas.get(name) or {}
        spread = ((c.get("seeds") or {}).get("spread") or {}).get("supported/all") or {}
        rows.append([name, m["selection"]["alpha"], (t.get("acc") or {}).get("value"), td.get("value"), td.get("low"),
                     td.get("high"), td["value"] / gain if gain and td.get("value") is not None else None,
                     (sup.get("acc") or {}).get("value"), back.get("value"), back.get("low"), back.get("high"),
                     back["value"] / -loss if loss and loss < 0 and back.get("value") is not None else None,
                     (c.get("normalized") or {}).get("target"), (c.get("normalized") or {}).get("control"),
                     area.get("value"), area.get("low"), area.get("high"), spread.get("std")])
    del base
    return columns, rows


def methods_sweep_table(study: dict, split: str = "test") -> tuple[list[str], list[list]]:
    """One row per method and α: target (fine) and supported accuracy, Δ vs base, normalized accuracies."""
    columns = ["method", "alpha", "chosen", "target_fine_acc", "target_fine_delta", "supported_acc",
               "supported_delta", "target_norm", "control_norm"]
    rows = []
    for name, m in (study.get("methods") or {}).items():
        for a in study["alphas"]:
            e = m["splits"][split].get(alpha_name(a)) or {}
            t, sup, n = e.get("target/fine") or {}, e.get("supported/all") or {}, e.get("normalized") or {}
            rows.append([name, float(a), bool(abs(m["selection"]["alpha"] - a) < 1e-9),
                         (t.get("acc") or {}).get("value"), (t.get("delta") or {}).get("value"),
                         (sup.get("acc") or {}).get("value"), (sup.get("delta") or {}).get("value"),
                         n.get("target"), n.get("control")])
    return columns, rows


def methods_markdown(study: dict) -> list[str]:
    """The methods side by side (one row each at its chosen α), the curve areas' paired tests."""
    methods = study.get("methods") or {}
    if not methods or (len(methods) == 1 and "wise_ft" in methods and not study.get("areas")):
        return []
    _, rows = methods_table(study)
    rule = study["selection"]["rule"]
    out = ["", "## Merge methods side by side (test, each at its α chosen on val)", "",
           f"Each method's α is chosen on val by the same rule ({rule}). Target: fine-grained accuracy on the "
           "fine-tuning datasets; Δ vs base and *won back* (Δ vs the fine-tune on the supported datasets) in points "
           f"with paired {_interval_name(study)} 95 % CIs (* = excludes 0); *kept* = share of the fine-tune's target gain, *won back %* = "
           "share of its supported loss; normalized accuracy as LiNeS (target ÷ fine-tuned, control ÷ base); "
           "*area* = the trade-off curve's area in the base/fine-tune box (0.5 = the straight line between them, "
           "1 = all of the gain and no forgetting), paired image-clustered bootstrap 95 % CI (whole images resampled "
           "with all their questions).", "",
           "| method | α | target fine | Δ vs base | kept | supported | won back | won back % | norm. target | "
           "norm. control | area |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        (name, a, tacc, td, tl, th, kept, sacc, wb, wl, wh, wbp, tn, cn, ar, al, ah, spread) = r
        label = name + (f" (mean of {len(methods[name]['paths'])} seeds, supported SD {points(spread)})"
                        if spread is not None else "")
        out.append(f"| {label} | {a:.2f} | {percent(tacc)} | {_ci({'value': td, 'low': tl, 'high': th})} | "
                   f"{'—' if kept is None else f'{points(kept, digits=0)} %'} | {percent(sacc)} | "
                   f"{_ci({'value': wb, 'low': wl, 'high': wh, 'significant': wb is not None and (wl > 0 or wh < 0)})} "
                   f"| {'—' if wbp is None else f'{points(wbp, digits=0)} %'} | "
                   f"{'—' if tn is None else f'{tn:.3f}'} | "
                   f"{'—' if cn is None else f'{cn:.3f}'} | "
                   f"{'—' if ar is None else f'{ar:.3f} [{al:.3f}, {ah:.3f}]'} |")
    out += ["", "Every method across α (test): normalized target / normalized control accuracy (LiNeS: target ÷ "
            "fine-tuned, control ÷ base; ← = the α chosen on val):", "",
            "| α | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for a in study["alphas"]:
        cells = []
        for m in methods.values():
            n = (m["splits"]["test"].get(alpha_name(a)) or {}).get("normalized") or {}
            mark = " ←" if abs(m["selection"]["alpha"] - a) < 1e-9 else ""
            cells.append("—" if n.get("target") is None or n.get("control") is None
                         else f"{n['target']:.3f} / {n['control']:.3f}{mark}")
        out.append(f"| {a:.2f} | " + " | ".join(cells) + " |")
    areas = study.get("areas") or {}
    if areas.get("undefined"):
        out += ["", f"Curve areas: undefined ({areas['undefined']})."]
    elif areas.get("pairs"):
        out += ["", "Paired comparison of the curve areas (the same bootstrap resamples of the test items for "
                "every method; p: two-sided p-value of ΔAUC = 0 from the same basic bootstrap, so p < 0.05 exactly when "
                "the 95 % CI excludes 0):", "",
                "| methods | Δ area | 95 % CI | p | |", "|---|---|---|---|---|"]
        for key, d in areas["pairs"].items():
            verdict = (f"{d['a'] if d['value'] > 0 else d['b']}'s curve dominates" if d["significant"]
                       else "no significant difference")
            out.append(f"| {key} | {d['value']:+.3f} | [{d['low']:+.3f}, {d['high']:+.3f}] | {d['p']:.3f} | "
                       f"{verdict} |")
    return out


def axes_table(study: dict) -> tuple[list[str], list[list]]:
    """Per metadata axis and value (supported datasets, test): n, base accuracy, and each model's Δ with its CI."""
    columns = ["axis", "value", "n", "base_acc", "model", "acc", "delta", "delta_low", "delta_high"]
    rows = []
    for axis, table in (study.get("axes") or {}).items():
        for value, e in table.items():
            for model, m in e.items():
                if isinstance(m, dict):
                    d = m["delta"]
                    rows.append([axis, value, e["n"], e["base_acc"], model, m["acc"], d["value"], d["low"], d["high"]])
    return columns, rows


def axes_markdown(study: dict) -> list[str]:
    axes = study.get("axes") or {}
    if not axes:
        return []
    primary = study.get("primary_method", "wise_ft")
    chosen = f"{primary} α={study['selection']['alpha']:.2f}"
    out = ["## What was forgotten, by μ-Bench's metadata (supported datasets, test)", "",
           f"Δ vs base in points with paired {_interval_name(study)} 95 % CIs (* = excludes 0), of the fine-tune and of {chosen}; every "
           "method's chosen model is in `forgetting.json` → `axes`.", ""]
    sentences = []
    for axis, table in axes.items():
        out += [f"**{axis}**", "", f"| {axis} | n | base | fine-tuned Δ | {chosen} Δ |", "|---|---|---|---|---|"]
        for value, e in sorted(table.items(), key=lambda kv: kv[1]["finetuned"]["delta"]["value"]):
            out.append(f"| {value} | {e['n']} | {percent(e['base_acc'])} | {_ci(e['finetuned']['delta'])} | "
                       f"{_ci((e.get(chosen) or {}).get('delta'))} |")
        out.append("")
        if axis in ("modality", "submodality", "domain"):
            lost = [(v, e["finetuned"]["delta"]) for v, e in table.items() if e["finetuned"]["delta"]["significant"]
                    and e["finetuned"]["delta"]["value"] < 0]
            if lost:
                lost.sort(key=lambda x: x[1]["value"])
                sentences.append(f"by {axis}, the fine-tune cost " + ", ".join(
                    f"{points(-d['value'])} points on {v}" for v, d in lost[:3]))
    if sentences:
        out[4:4] = ["**In words:** " + "; ".join(sentences) + ".", ""]
    return out


def feature_probe_table(study: dict) -> tuple[list[str], list[list]]:
    """Per dataset (and pooled over the target and the supported datasets): each model's probe accuracy on test and
    its Δ vs the base's probe with the paired CI (study.feature_probe=true)."""
    fp = study.get("feature_probe") or {}
    columns = ["dataset", "target", "n_test", "model", "probe_acc", "delta", "delta_low", "delta_high"]
    rows = []
    entries = [(f"(pooled {g})", g == "target", e) for g, e in (fp.get("pooled") or {}).items()]
    entries += [(name, e["target"], e) for name, e in (fp.get("datasets") or {}).items()]
    for name, target, e in entries:
        for model in fp.get("models", []):
            m = e.get(model) or {}
            d = m.get("delta") or {}
            rows.append([name, target, e.get("n_test"), model, (m.get("acc") or {}).get("value"), d.get("value"),
                         d.get("low"), d.get("high")])
    return columns, rows


def feature_probe_markdown(study: dict) -> list[str]:
    """Features or alignment: the zero-shot Δ on the supported datasets beside the Δ of a linear probe re-fitted on
    each model's frozen image features, the verdict, and the probes per dataset."""
    fp = study.get("feature_probe")
    if not fp:
        return []
    models = fp["models"]
    out = ["", "## Features or alignment? Linear probes on each model's frozen image features (test)", "",
           "Zero-shot accuracy falls when the image features lose what they knew or when the image and text towers "
           "drift apart. A linear probe re-fitted on each model's frozen features (full train split, weight decay "
           "chosen on val, the same rows for every model) tells the two apart: a probe that holds up means the "
           "features are intact and the zero-shot loss is lost alignment (a new head or prompts recover it); a probe "
           "that drops means the features themselves were damaged. Δ vs the base's probe in points with paired "
           f"{fp.get('interval', 'image-clustered')} 95 % CIs; * = CI excludes 0.", "",
           "| model | zero-shot Δ, supported | probe Δ, supported | verdict |", "|---|---|---|---|"]
    for name, v in (fp.get("verdicts") or {}).items():
        out.append(f"| {name} | {_delta(v.get('zero_shot_delta'))} | {_delta(v.get('probe_delta'))} | "
                   f"**{v['verdict']}** |")
    out += ["", "| dataset | target | n test | " + " | ".join(
        f"{m} probe" + (" | Δ" if i else "") for i, m in enumerate(models)) + " |",
        "|---|---|---|" + "---|" * (2 * len(models) - 1)]
    entries = [(f"**pooled {g}**", "yes" if g == "target" else "", e) for g, e in (fp.get("pooled") or {}).items()]
    entries += [(name, "yes" if e["target"] else "", e) for name, e in (fp.get("datasets") or {}).items()]
    for name, target, e in entries:
        cells = []
        for i, m in enumerate(models):
            cells.append(percent(((e.get(m) or {}).get("acc") or {}).get("value")))
            if i:
                cells.append(_delta((e.get(m) or {}).get("delta")))
        out.append(f"| {name} | {target} | {e.get('n_test')} | " + " | ".join(cells) + " |")
    if fp.get("skipped"):
        out += ["", "Not probed (an empty split or a single training class): " + ", ".join(
            f"{k} ({v})" for k, v in fp["skipped"].items()) + "."]
    out.append("")
    return out


def plot_study(study: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    test = study["splits"]["test"]["models"]
    methods = study.get("methods") or {"wise_ft": {"splits": {"test": {n: m for n, m in test.items()
                                                                      if n.startswith("alpha=")}},
                                                   "selection": study["selection"]}}
    areas = (study.get("areas") or {}).get("areas", {})
    fig, ax = plt.subplots(figsize=(7.2, 5.4), dpi=120)
    palette = ["#4C72B0", "#8172B3", "#937860", "#DA8BC3", "#64B5CD", "#CCB974", "#8C8C8C"]
    for i, (name, m) in enumerate(methods.items()):
        color = palette[i % len(palette)]
        sweep = sorted((float(n.split("=")[1]), v) for n, v in m["splits"]["test"].items())
        xs = [100 * v["target/fine"]["acc"]["value"] for _, v in sweep]
        ys = [100 * v["supported/all"]["acc"]["value"] for _, v in sweep]
        area = areas.get(name)
        label = name + (f" (area {area['value']:.2f} [{area['low']:.2f}, {area['high']:.2f}])" if area else "")
        style, marker = ["-", "--", "-.", ":"][i % 4], "osv^PX"[i % 6]  # overlapping curves stay visible
        ax.plot(xs, ys, linestyle=style, marker=marker, color=color, ms=4, lw=1.5, alpha=0.9, label=label)
        if len(methods) == 1:
            for (a, _), x, y in zip(sweep, xs, ys, strict=True):
                ax.annotate(f"{a:.1f}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color=color)
        ch = m["splits"]["test"][alpha_name(m["selection"]["alpha"])]
        ax.scatter([100 * ch["target/fine"]["acc"]["value"]], [100 * ch["supported/all"]["acc"]["value"]],
                   marker="*", s=200, color=color, edgecolor="black", linewidth=0.6, zorder=6)
    for name, marker, color in (("base", "s", "#55A868"), ("finetuned", "D", "#C44E52")):
        s = test[name]
        ax.scatter([100 * s["target/fine"]["acc"]["value"]], [100 * s["supported/all"]["acc"]["value"]], marker=marker,
                   s=70, color=color, zorder=5, label="base (α=0)" if name == "base" else "fine-tuned (α=1)")
    ax.scatter([], [], marker="*", s=120, color="white", edgecolor="black", label="α chosen on val (per method)")
    ax.set_xlabel("target tasks: fine-grained accuracy (%)")
    ax.set_ylabel("supported tasks (rest of μ-Bench): accuracy (%)")
    ax.set_title("Gain on the target vs forgetting elsewhere, across α (test)" if len(methods) == 1 else
                 "Gain on the target vs forgetting elsewhere: each merge method across α (test)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    p1 = write_figure(out_dir / "alpha_sweep.png", fig)

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
    ax.set_xlabel("Δ accuracy vs base (points, paired image-clustered 95 % CI); ▶ = target dataset"
                  if _interval_name(study) != "bootstrap" else "Δ accuracy vs base (points, paired 95 % CI); ▶ = target dataset")
    ax.legend(fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    p2 = write_figure(out_dir / "dataset_deltas.png", fig)
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
        info = (study.get("methods") or {}).get(study.get("primary_method", "wise_ft"), {})
        label = ("base" if a == 0 and info.get("starts_at_base", True) else
                 "fine-tuned" if a == 1 and info.get("ends_at_finetuned", True) else f"θ({a:.2f})")
        row = [float(a), label, bool(abs(a - chosen) < 1e-9)]
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
    fp = study.get("feature_probe") or {}
    for name, v in (fp.get("verdicts") or {}).items():  # the supported probe Δ of the fine-tune and the chosen model
        if v.get("probe_delta"):
            who = "finetuned" if name == "finetuned" else "chosen"
            out[f"forgetting/{who}/probe_supported_delta"] = v["probe_delta"]["value"]
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
    if study.get("methods"):  # the methods side by side, the areas' paired tests, the change by metadata axis
        columns, rows = methods_table(study)
        logger.log_table(key="forgetting/methods", columns=columns, data=rows)
        columns, rows = methods_sweep_table(study)
        logger.log_table(key="forgetting/methods_sweep", columns=columns, data=rows)
        pairs = (study.get("areas") or {}).get("pairs") or {}
        if pairs:
            logger.log_table(key="forgetting/area_tests", columns=["a", "b", "delta_area", "low", "high", "p"],
                             data=[[d["a"], d["b"], d["value"], d["low"], d["high"], d["p"]] for d in pairs.values()])
    if study.get("axes"):
        columns, rows = axes_table(study)
        logger.log_table(key="forgetting/axes", columns=columns, data=rows)
    if study.get("feature_probe"):
        columns, rows = feature_probe_table(study)
        logger.log_table(key="forgetting/feature_probe", columns=columns, data=rows)
    logger.log_image(key="forgetting/plots", images=[str(p) for p in plots],
                     caption=["target vs supported accuracy across α", "per-dataset Δ vs base"][:len(plots)])
    run = logger.experiment
    for k, v in summary_values(study).items():
        run.summary[k] = v
    for name, area in ((study.get("areas") or {}).get("areas") or {}).items():
        run.summary[f"forgetting/{name}/area"] = area["value"]
    for name, m in (study.get("methods") or {}).items():
        run.summary[f"forgetting/{name}/chosen_alpha"] = m["selection"]["alpha"]
    run.config.update({"forgetting": {"alphas": study["alphas"], "towers": study["towers"],
                                      "methods": list(study.get("methods") or ["wise_ft"]),
                                      "target_datasets": study["target_datasets"],
                                      "selection_rule": study["selection"]["rule"],
                                      "base": study["base"], "finetuned": study["finetuned"]}},
                      allow_val_change=True)
