"""The study of many specialists: the base, every specialist (fine-tuned from the same base on one group of μ-Bench)
and merged models of all of them, scored in one pass over each split, as one accuracy matrix.

Models (all points of one sweep, :func:`~microbench.studies.forgetting.sweep_split`: each image decoded once):

- ``base``; ``specialist:<name>`` for each specialist;
- each merge of :data:`MERGES` (or any of :data:`microbench.studies.methods.SPECIALIST_MERGES`, plug-ins
  included): ``uniform_soup`` (the specialists' mean; Wortsman et al., 2022), ``task_arithmetic`` (θ_base +
  λ·Σ_i τ_i; Ilharco et al., 2023), ``ties`` (θ_base + λ·TIES(τ_1..τ_n; k); Yadav et al., 2023), ``dare`` (DARE then
  task arithmetic; Yu et al., 2024), ``model_stock`` (Jang et al., 2024); λ from :data:`LAMBDAS` (and TIES' k)
  chosen on val.

λ and k are chosen on val by the mean accuracy over the specialty groups (FusionBench's criterion: the average of the
tasks' accuracies). The matrix (rows: models; columns: each specialty group, ``outside`` = every dataset in no
group, ``all``; coarse, fine and both) gives every cell's accuracy and Δ vs base with a paired, image-clustered 95 %
interval (one :class:`~microbench.metrics.bootstrap.ClusterBootstrap` per split shared by every cell). Scalars:

- each specialist's ``gain`` on its own group (fine-grained, the classification it was trained on) and its
  ``forgetting`` elsewhere (−Δ on every other dataset, both grains);
- each merge's ``normalized accuracy`` per group, acc(merge, group_i) / acc(specialist_i, group_i) (the TIES and
  FusionBench definition), and its mean;
- for each specialist and each merge, Δ(merge − specialist) outside the specialist's group with a paired CI, and
  whether the merge beats the specialist there.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from microbench import distributed
from microbench.metrics.bootstrap import CLUSTERED, ClusterBootstrap
from microbench.results.io import write_figure, write_json, write_text
from microbench.results.report import points
from microbench.studies.forgetting import (
    BASE_POINT,
    ResultCache,
    aligned_correct,
    caption_grain,
    caption_resampler,
    sweep_split,
)
from microbench.studies.methods import SPECIALIST_MERGES, SpecialistsInputs, specialists_merge_paths

#: the task-arithmetic / TIES scales chosen among on val
LAMBDAS = (0.2, 0.4, 0.6, 0.8, 1.0)
#: the merges of every study by default (``microbench.studies.methods.SPECIALIST_MERGES``)
MERGES = ("uniform_soup", "task_arithmetic", "ties")
GRAINS = ("coarse", "fine", "all")


@dataclass
class Specialist:
    """One fine-tune of the base: its name, weights and the datasets it was trained on (its group)."""

    name: str
    state: dict[str, torch.Tensor]
    datasets: Sequence[str]
    source: str = ""


def plan_models(base: dict, specialists: Sequence[Specialist], keys: Callable[[str], bool] | None = None,
                lambdas: Sequence[float] = LAMBDAS, merges: Sequence[str] = MERGES,
                merge_options: Mapping[str, Mapping] | None = None
                ) -> tuple[dict, list[tuple[str, float]], dict[str, list[tuple[str, float]]]]:
    """The sweep's paths (name → (start, end)), its points, and each model family's candidate points: the base,
    every specialist, and each merge of :data:`~microbench.studies.methods.SPECIALIST_MERGES` named in ``merges``
    (none with one specialist, or ``merges=()`` for a chain, whose steps are not independent fine-tunes)."""
    states = [s.state for s in specialists]
    paths: dict = {"wise_ft": (base, states[0])}
    families: dict[str, list[tuple[str, float]]] = {"base": [BASE_POINT]}
    for s in specialists:
        paths[f"specialist:{s.name}"] = (base, s.state)
        families[f"specialist:{s.name}"] = [(f"specialist:{s.name}", 1.0)]
    if len(specialists) > 1:
        inputs = SpecialistsInputs(base, states, keys)
        for name in merges:
            method = SPECIALIST_MERGES[name]
            families[name] = []
            for path in specialists_merge_paths(name, inputs, (merge_options or {}).get(name)):
                if path.label in paths:
                    raise ValueError(f"merge {name}: path label {path.label!r} is taken")
                paths[path.label] = (path.start, path.end)
                families[name] += ([(path.label, float(lam)) for lam in lambdas] if method.scaled
                                   else [(path.label, 1.0)])
    points = list(dict.fromkeys(p for fam in families.values() for p in fam))
    return paths, points, families


def group_masks(base: pd.DataFrame, groups: dict[str, set[str]]) -> dict[str, np.ndarray]:
    """``<group>/<grain>`` masks over the base's caption items: every specialty group, ``outside`` (datasets in no
    group), ``all``; and ``elsewhere:<group>`` (every item outside that group), both grains."""
    cap = base[base["source"] == "captions"]
    ds = cap["dataset"].astype(str).to_numpy()
    grain = caption_grain(cap["question_type"])
    inside = {g: np.isin(ds, sorted(members)) for g, members in groups.items()}
    any_group = np.logical_or.reduce(list(inside.values())) if inside else np.zeros(len(ds), bool)
    sets = {**inside, "outside": ~any_group, "all": np.ones(len(ds), bool)}
    masks = {f"{g}/{gr}": m & (grain == gr if gr != "all" else True) for g, m in sets.items() for gr in GRAINS}
    masks.update({f"elsewhere:{g}/all": ~m for g, m in inside.items()})
    return {k: v for k, v in masks.items() if v.any()}


def _interval(e) -> dict:
    return {"value": e.value, "low": e.low, "high": e.high, "n": e.n, "interval": CLUSTERED,
            "significant": bool(e.low > 0 or e.high < 0)}


def summarize(base: pd.DataFrame, preds: pd.DataFrame, masks: dict, resampler: ClusterBootstrap) -> dict:
    """Accuracy and Δ vs base (paired, image-clustered) of one model on every mask."""
    b, correct = aligned_correct(base[base["source"] == "captions"], preds[preds["source"] == "captions"])
    acc = resampler.estimates(correct, masks)
    delta = resampler.estimates(correct - b["correct"].to_numpy(dtype=float), masks)
    return {k: {"acc": _interval(acc[k]), "delta": _interval(delta[k])} for k in masks if k in acc}


def _correct(base: pd.DataFrame, preds: pd.DataFrame) -> np.ndarray:
    return aligned_correct(base[base["source"] == "captions"], preds[preds["source"] == "captions"])[1]


def run_specialists(backbone, base_state: dict, specialists: Sequence[Specialist], *,
                    make_dm: Callable[[str], object], keys: Callable[[str], bool] | None = None,
                    n_resamples: int = 9999, confidence: float = 0.95, seed: int = 0,
                    device: str | torch.device = "cpu", lambdas: Sequence[float] = LAMBDAS,
                    merges: Sequence[str] = MERGES, merge_options: Mapping[str, Mapping] | None = None,
                    chain: bool = False) -> dict | None:
    """Score every model on val and test in one sweep per split, choose the merges' λ (and TIES' k) on val,
    summarise test as the accuracy matrix with its scalars; returns the study (rank 0; other ranks None).
    ``chain``: the specialists are one sequence (each fine-tuned from the one before, in this order): no merges,
    and the chain's continual-learning scalars (:func:`microbench.studies.continual.chain_scalars`)."""
    if not specialists:
        raise ValueError("a specialists study needs at least one specialist")
    t0 = time.perf_counter()
    names = [s.name for s in specialists]
    if len(set(names)) != len(names):
        raise ValueError(f"specialist names must differ: {names}")
    groups = {s.name: set(s.datasets) for s in specialists}
    paths, points, families = plan_models(base_state, specialists, keys, lambdas, () if chain else merges,
                                          merge_options)
    cache = ResultCache(None)
    splits: dict[str, dict] = {}
    chosen: dict[str, tuple[str, float]] = {}
    for split in ("val", "test"):
        dm = make_dm(split)
        preds, info = sweep_split(backbone, base_state, specialists[0].state, [], dm, keys, cache, device,
                                  paths=paths, points=points, label="specialists study")
        if distributed.rank() != 0:
            continue
        base = preds[BASE_POINT]
        masks = group_masks(base, groups)
        resampler = caption_resampler(base, n_resamples, confidence, seed)
        if split == "val":  # λ (and k) of each merge family: the mean accuracy over the groups
            for fam, cands in families.items():
                if len(cands) == 1:
                    chosen[fam] = cands[0]
                    continue
                score = {p: np.mean([_correct(base, preds[p])[masks[f"{g}/all"]].mean() for g in groups
                                     if f"{g}/all" in masks]) for p in cands}
                chosen[fam] = max(cands, key=lambda p: (score[p], -cands.index(p)))
            splits[split] = {"sweep": info, "selection_scores": {
                fam: {f"{n}@{a:.2f}": float(np.mean([_correct(base, preds[(n, a)])[masks[f"{g}/all"]].mean()
                                                     for g in groups if f"{g}/all" in masks])) for n, a in cands}
                for fam, cands in families.items() if len(cands) > 1}}
            continue
        models = {fam: summarize(base, preds[chosen[fam]], masks, resampler) for fam in families}
        splits[split] = {"sweep": info, "models": models, "items": int((base["source"] == "captions").sum()),
                         "images": len(dm.images())}
        splits[split]["scalars"] = scalars(base, preds, chosen, specialists, masks, resampler, models)
        splits[split]["scalars"]["continual"] = continual(models, [s.name for s in specialists], chain)
    if distributed.rank() != 0:
        return None
    return {"kind": "specialists", "chain": bool(chain), "specialists": [{"name": s.name, "datasets": sorted(s.datasets),
                                                    "source": s.source} for s in specialists],
            "groups": {g: sorted(m) for g, m in groups.items()},
            "chosen": {fam: {"path": p[0], "scale": p[1]} for fam, p in chosen.items()},
            "candidates": {"lambdas": list(lambdas), "merges": [] if chain else list(merges),
                           "merge_options": {k: dict(v or {}) for k, v in (merge_options or {}).items()}},
            "settings": {"n_resamples": n_resamples, "confidence": confidence, "seed": seed,
                         "interval": CLUSTERED},
            "splits": splits, "seconds": round(time.perf_counter() - t0, 2)}


def scalars(base, preds, chosen, specialists, masks, resampler, models) -> dict:
    """Gain and forgetting of each specialist; normalized accuracy of each merge; merge vs specialist outside the
    specialist's group (paired)."""
    out: dict = {"specialists": {}, "merges": {}}
    merges = [f for f in chosen if f not in ("base",) and not f.startswith("specialist:")]
    for s in specialists:
        m = models[f"specialist:{s.name}"]
        out["specialists"][s.name] = {"gain": m.get(f"{s.name}/fine", {}).get("delta"),
                                      "forgetting": _negated(m.get(f"elsewhere:{s.name}/all", {}).get("delta"))}
    for fam in merges:
        mine = _correct(base, preds[chosen[fam]])
        norm, versus = {}, {}
        for s in specialists:
            own = masks.get(f"{s.name}/all")
            spec = _correct(base, preds[(f"specialist:{s.name}", 1.0)])
            if own is not None and spec[own].mean() > 0:
                norm[s.name] = float(mine[own].mean() / spec[own].mean())
            where = masks.get(f"elsewhere:{s.name}/all")
            if where is not None:
                e = resampler.estimates(mine - spec, {"x": where})["x"]
                versus[s.name] = {**_interval(e), "beats": bool(e.low > 0)}
        out["merges"][fam] = {"normalized_accuracy": norm,
                              "mean_normalized_accuracy": float(np.mean(list(norm.values()))) if norm else None,
                              "versus_specialist_elsewhere": versus}
    return out


def continual(models: dict, names: Sequence[str], chain: bool) -> dict:
    """The continual-learning scalars per grain (fine: the classification the specialists learn; all): a chain's
    (:func:`~microbench.studies.continual.chain_scalars`, rows in chain order), or each merge's read as the step after
    every specialist (:func:`~microbench.studies.continual.merged_as_last`); None with the reason when a group lacks
    items of a grain."""
    from microbench.studies.continual import chain_scalars, merged_as_last

    out: dict = {}
    for grain in ("fine", "all"):
        cells = [f"{g}/{grain}" for g in names]
        missing = [c for c in cells if c not in models["base"]]
        if missing:
            out[grain] = {"value": None, "reason": f"no {grain} items in {', '.join(missing)}"}
            continue
        R = [[models[f"specialist:{r}"][c]["acc"]["value"] for c in cells] for r in names]
        base = [models["base"][c]["acc"]["value"] for c in cells]
        if chain:
            out[grain] = chain_scalars(R, base)
        else:
            out[grain] = {m: merged_as_last(R, [models[m][c]["acc"]["value"] for c in cells])
                          for m in models if m != "base" and not m.startswith("specialist:")}
    return {"kind": "chain" if chain else "merges", "order": list(names), **out}


def _negated(d: dict | None) -> dict | None:
    if not d:
        return None
    return {**d, "value": -d["value"], "low": -d["high"], "high": -d["low"]}


# --- report ---------------------------------------------------------------------------------------------------

def _pp(d: dict | None) -> str:
    if not d or d.get("value") is None:
        return "—"
    low, high = points(d["low"], signed=True), points(d["high"], signed=True)
    return f"{points(d['value'], signed=True)} [{low}, {high}]" + ("*" if d.get("significant") else "")


def report_markdown(study: dict) -> str:
    test = study["splits"]["test"]
    groups = list(study["groups"])
    lines = ["# Specialists study", "", "**What happened.**"]
    for name, s in test["scalars"]["specialists"].items():
        lines.append(f"- The **{name}** specialist changed its own group's fine-grained accuracy by {_pp(s['gain'])} "
                     f"points and every other dataset's by {_pp(_negated(s['forgetting']))} (paired, image-clustered "
                     "95 % CI; * excludes 0).")
    merges = test["scalars"]["merges"]
    for name in test["scalars"]["specialists"]:
        winners = [f"{fam} ({_pp(m['versus_specialist_elsewhere'][name])})" for fam, m in merges.items()
                   if m["versus_specialist_elsewhere"].get(name, {}).get("beats")]
        if merges:
            lines.append(f"- Outside the **{name}** group, " + (
                f"{' and '.join(winners)} beat{'s' if len(winners) == 1 else ''} the {name} specialist (Δ merge − "
                "specialist, paired CI above 0)." if winners else
                f"no merged model beats the {name} specialist significantly."))
    for fam, m in merges.items():
        beats = [n for n, v in m["versus_specialist_elsewhere"].items() if v["beats"]]
        c = study["chosen"][fam]
        lines.append(f"- **{fam}** ({c['path']}, λ = {c['scale']:.2f}, chosen on val): mean normalized accuracy "
                     + ("—" if m["mean_normalized_accuracy"] is None else f"{m['mean_normalized_accuracy']:.2f}")
                     + "; outside their groups it beats " + (", ".join(beats) if beats else "no specialist")
                     + " significantly.")
    cont = test["scalars"].get("continual") or {}
    fine = cont.get("fine") or {}
    if cont.get("kind") == "chain" and fine.get("backward_transfer") is not None:
        lines.append(f"- As one chain ({' → '.join(cont['order'])}), fine-grained: backward transfer "
                     f"{points(fine['backward_transfer'], signed=True)}, average forgetting "
                     f"{points(fine['average_forgetting'])}"
                     f" points (mammoth); ZSCL transfer {points(fine['transfer'])}, avg {points(fine['avg'])}, "
                     f"last {points(fine['last'])} %.")
    elif cont.get("kind") == "merges":
        for m, v in fine.items():
            if isinstance(v, dict) and "backward_transfer" in v:
                lines.append(f"- **{m}** read as the step after every specialist, fine-grained: backward transfer "
                             f"{points(v['backward_transfer'], signed=True)}, average forgetting "
                             f"{points(v['average_forgetting'])} points.")
    left = (study.get("left_out") or {}).get("jobs_without_a_record") or []
    if left:
        why = (study.get("left_out") or {}).get("why") or {}
        lines.append(f"- Left out: {len(left)} job folder(s) of the runs without a train_metrics.json: "
                     + "; ".join(f"{job} ({why[job]})" if job in why else job for job in left) + ".")
    lines += ["", f"Test split: {test['images']} images, {test['items']} caption items; one pass scored "
              f"{test['sweep'].get('models', '?')} models with {test['sweep'].get('decoded_images', '?')} image "
              "decodes in all. Δ vs base in points, paired image-clustered 95 % CI; * = excludes 0.", ""]
    cols = [*groups, "outside", "all"]
    for grain in ("fine", "coarse", "all"):
        lines += [f"## Accuracy matrix ({grain})", "", "| model | " + " | ".join(cols) + " |",
                  "|---|" + "---|" * len(cols)]
        for model, cells in test["models"].items():
            row = []
            for c in cols:
                cell = cells.get(f"{c}/{grain}")
                row.append("—" if cell is None else f"{points(cell['acc']['value'])} ({_pp(cell['delta'])})")
            lines.append(f"| {model} | " + " | ".join(row) + " |")
        lines.append("")
    lines += ["## Groups", "", *[f"- {g}: {', '.join(d)}" for g, d in study["groups"].items()], ""]
    return "\n".join(lines)


def plot_matrix(study: dict, path: Path, grain: str = "all") -> Path | None:
    """Heatmap of Δ vs base (points) of every model on every group, * where the CI excludes 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    test = study["splits"]["test"]
    cols = [*study["groups"], "outside", "all"]
    models = list(test["models"])
    grid = np.full((len(models), len(cols)), np.nan)
    sig = np.zeros_like(grid, dtype=bool)
    for i, m in enumerate(models):
        for j, c in enumerate(cols):
            cell = test["models"][m].get(f"{c}/{grain}")
            if cell:
                grid[i, j] = 100 * cell["delta"]["value"]
                sig[i, j] = cell["delta"]["significant"]
    lim = max(1.0, float(np.nanmax(np.abs(grid)))) if np.isfinite(grid).any() else 1.0
    fig, ax = plt.subplots(figsize=(1.3 * len(cols) + 2.5, 0.5 * len(models) + 1.5))
    im = ax.imshow(grid, cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto")
    for i in range(len(models)):
        for j in range(len(cols)):
            if np.isfinite(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:+.1f}{'*' if sig[i, j] else ''}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(models)), models, fontsize=8)
    ax.set_title(f"Δ accuracy vs base ({grain}, points; * = 95 % CI excludes 0)", fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    write_figure(path, fig)
    return path


def matrix_table(study: dict) -> tuple[list[str], list[list]]:
    """Every cell of the test matrix: model, column, grain, accuracy, Δ vs base with its CI and significance."""
    test = study["splits"]["test"]
    columns = ["model", "column", "grain", "acc", "delta", "delta_low", "delta_high", "significant", "n"]
    rows = []
    for model, cells in test["models"].items():
        for key, cell in cells.items():
            if key.startswith("elsewhere:"):
                continue
            col, grain = key.rsplit("/", 1)
            d = cell["delta"]
            rows.append([model, col, grain, cell["acc"]["value"], d["value"], d["low"], d["high"], d["significant"],
                         d["n"]])
    return columns, rows


def merges_table(study: dict) -> tuple[list[str], list[list]]:
    """Each merge: its chosen path and λ, mean normalized accuracy, the specialists it beats outside their groups,
    and its backward transfer / average forgetting (fine, read as the step after every specialist)."""
    test = study["splits"]["test"]["scalars"]
    fine = (test.get("continual") or {}).get("fine") or {}
    columns = ["merge", "path", "scale", "mean_normalized_accuracy", "beats", "backward_transfer",
               "average_forgetting"]
    rows = []
    for fam, m in test["merges"].items():
        c, cont = study["chosen"][fam], fine.get(fam) if isinstance(fine.get(fam), dict) else {}
        rows.append([fam, c["path"], c["scale"], m["mean_normalized_accuracy"],
                     ", ".join(n for n, v in m["versus_specialist_elsewhere"].items() if v["beats"]),
                     (cont or {}).get("backward_transfer"), (cont or {}).get("average_forgetting")])
    return columns, rows


def log_specialists(logger, study: dict, plot: Path | None) -> None:
    """Scalars for every logger (each specialist's gain and forgetting, each merge's mean normalized accuracy, a
    chain's scalars); with W&B also the matrix and merges tables, the heatmap, summary values and the settings."""
    test = study["splits"]["test"]["scalars"]
    scalars = {}
    for name, s in test["specialists"].items():
        for k in ("gain", "forgetting"):
            if s.get(k):
                scalars[f"specialists/{name}/{k}"] = s[k]["value"]
    for fam, m in test["merges"].items():
        if m["mean_normalized_accuracy"] is not None:
            scalars[f"specialists/{fam}/mean_normalized_accuracy"] = m["mean_normalized_accuracy"]
    fine = (test.get("continual") or {}).get("fine") or {}
    if study.get("chain"):
        scalars.update({f"specialists/chain/{k}": fine[k] for k in ("backward_transfer", "average_forgetting",
                                                                      "transfer", "avg", "last")
                        if fine.get(k) is not None})
    logger.log_metrics(scalars)
    if not (hasattr(logger, "log_table") and hasattr(logger, "log_image")):
        return
    columns, rows = matrix_table(study)
    logger.log_table(key="specialists/matrix", columns=columns, data=rows)
    if test["merges"]:
        columns, rows = merges_table(study)
        logger.log_table(key="specialists/merges", columns=columns, data=rows)
    if plot is not None:
        logger.log_image(key="specialists/matrix_plot", images=[str(plot)],
                         caption=["Δ accuracy vs base per model and group (* = CI excludes 0)"])
    run = logger.experiment
    for k, v in scalars.items():
        run.summary[k] = v
    run.config.update({"specialists": {"groups": study["groups"], "chain": study.get("chain", False),
                                       "chosen": study["chosen"], "candidates": study["candidates"]}},
                      allow_val_change=True)


def write_specialists_report(study: dict, out_dir: str | Path, logger=None) -> dict:
    """``specialists.json``, ``specialists.md`` and ``specialists_matrix.png`` (each atomic); then the logger's."""
    from microbench.studies.report import undefined_numbers

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    undefined = undefined_numbers(study)
    if undefined:
        study["undefined"] = undefined
    write_json(out_dir / "specialists.json", study)
    write_text(out_dir / "specialists.md", report_markdown(study))
    plot = plot_matrix(study, out_dir / "specialists_matrix.png")
    if logger is not None:
        log_specialists(logger, study, plot)
    return study
