"""Human-readable text of every run: ``results.md`` of perception (a Table-1-style summary first, then every
breakdown), cognition, localization and linear probes, and the few lines every entry point prints at the end
(:func:`summary`)."""

from __future__ import annotations

import functools
from typing import Any

import pandas as pd


def percent(x: float | None, signed: bool = False, digits: int = 2) -> str:
    """The one percent formatter: a fraction as ``47.57`` (``+1.25`` signed; tables use two decimals), or an em dash
    when there is no value (None or NaN). Prose (a report's sentences, log lines) says percentage points with one
    decimal: :func:`points`."""
    if x is None or x != x:
        return "—"
    return f"{100 * x:+.{digits}f}" if signed else f"{100 * x:.{digits}f}"


#: the percent formatter of prose: percentage points with one decimal (``25.0``, ``+25.0`` signed)
points = functools.partial(percent, digits=1)


def pct(m: dict | None) -> str:
    """``47.57 ± 0.34`` (percent, official half-width CI) or an em dash."""
    if not m or m.get("value") is None or m["value"] != m["value"]:
        return "—"
    ci = m.get("ci")
    if ci is None or ci != ci:
        return percent(m["value"])
    return f"{percent(m['value'])} ± {percent(ci)}"


def clustered_cell(m: dict | None) -> str:
    """``[45.10, 50.02]``: the image-clustered 95 % interval of a metric entry in %, or an em dash."""
    c = (m or {}).get("clustered")
    return "—" if not c or c.get("low") is None else f"[{percent(c['low'])}, {percent(c['high'])}]"


def fmt_value(entry: dict | None) -> str:
    """``47.57`` (percent, no CI) or an em dash."""
    return "—" if not entry or entry.get("value") is None else percent(entry["value"])


def _with_n(m: dict | None) -> str:
    if not m or m.get("value") is None:
        return "n/a"
    return pct(m) + (f" (n={m['n']})" if m.get("n") is not None else "")


def summary(record) -> list[str]:
    """The lines every entry point prints at the end of a run, for every task: the headline (one line per group
    of metrics: a perception source, a localization head, a fine-tune's test split...), the notes a reader must
    see, then what the run wrote (``record.outputs``, the main results file first)."""
    groups: dict[str, list[str]] = {}
    for name, m in record.headline_metrics().items():
        group, _, short = name.rpartition("/")
        groups.setdefault(group, []).append(f"{short if short != record.task else 'accuracy'} {_with_n(m)}")
    model = (record.model or {}).get("name", "?")
    lines = []
    for group, parts in groups.items():
        label = f"{model} [{group or record.task}]"
        lines += [f"{label} " + " | ".join(parts)] if len(parts) <= 4 else [label, *[f"  {p}" for p in parts]]
    lines += [f"  note: {n}" for n in record.notes]
    lines += [f"{label}: {path}" for label, path in record.outputs.items()]
    return lines


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def results_markdown(record: dict[str, Any]) -> str:
    m = record["metrics"]
    model = record["model"]
    out = [f"# μ-Bench zero-shot perception: {model['name']}", ""]
    out.append(f"Model `{model['name']}` ({model['kind']}, weights `{model['fingerprint']}`) on "
               f"`{record['data']['location']}` ({record['data']['kind']}, {record['data']['num_rows']} rows, "
               f"fingerprint `{record['data']['fingerprint']}`), split `{record['split']['name']}`. Accuracy in % "
               f"± 95 % bootstrap half-width (basic, {record['bootstrap']['n_resamples']} resamples, seed "
               f"{record['bootstrap']['seed']}).")
    out.append("")
    for source in record["sources"]:
        label = "captions (official CLIP protocol)" if source == "captions" else "questions (question + option)"
        out += [f"## Headline, {label}", ""]
        out.append(_table(["Model", "Coarse", "Fine", "Coarse excl. Eulenberg DF/EF", "Fine excl. Eulenberg DF/EF"], [[
            model["name"], pct(m.get(f"{source}/official/coarse")), pct(m.get(f"{source}/official/fine")),
            pct(m.get(f"{source}/official_excl_eulenberg/coarse")),
            pct(m.get(f"{source}/official_excl_eulenberg/fine"))]]))
        out += ["", "Headline: " + ("`_1` caption variants" if source == "captions" else "all questions")
                + ", pooled over the official datasets (see docs/evaluation.md for the protocol).", ""]
        clustered = [(g, m.get(f"{source}/official/{g}") or {}) for g in ("coarse", "fine")]
        if any("clustered" in e for _, e in clustered):
            out += ["The official ± resamples questions as if independent; μ-Bench asks several questions of each "
                    "image, so the image-clustered 95 % interval (images resampled with all their questions, "
                    "`metrics.json` → `clustered`) is the one to compare models by:", "",
                    _table(["headline", "accuracy", "official 95 % (basic, questions)",
                            "image-clustered 95 % (percentile, images)"],
                           [[g, percent(e['value']), f"[{percent(e['low'])}, {percent(e['high'])}]",
                             f"[{percent(e['clustered']['low'])}, {percent(e['clustered']['high'])}]"]
                            for g, e in clustered if "clustered" in e]), ""]
        notes = [g["note"] for g in (record.get("headline_coverage") or {}).get(source, {}).values() if g["note"]]
        if notes:
            out += ["**Headline coverage:**", "", *[f"- {n}" for n in notes], ""]
        rows = []
        for label, name in (("headline: official datasets", "official"),
                            ("headline excl. Eulenberg DF/EF", "official_excl_eulenberg"),
                            ("pathology datasets (official table)", "slice/pathology"),
                            ("H&E datasets (official table)", "slice/he"),
                            ("outside the official set", "slice/non_official"),
                            ("macro over datasets (unweighted)", "macro_dataset"),
                            ("all datasets, both variants pooled", "all"),
                            ("official datasets, both variants pooled", "all_variants/slice/official"),
                            ("pathology, both variants pooled", "all_variants/slice/pathology"),
                            ("H&E, both variants pooled", "all_variants/slice/he")):
            rows.append([label, pct(m.get(f"{source}/{name}/coarse")), pct(m.get(f"{source}/{name}/fine")),
                         str(m.get(f"{source}/{name}/coarse", {}).get("n", 0)),
                         str(m.get(f"{source}/{name}/fine", {}).get("n", 0))])
        out += [f"### Slices ({source})", "", _table(["slice", "coarse", "fine", "n coarse", "n fine"], rows), ""]
        types = sorted({k.rsplit("/", 1)[1] for k in m if k.startswith(f"{source}/all_variants/type/")})
        type_rows = [[t, pct(m.get(f"{source}/official/type/{t}")), str(m.get(f"{source}/official/type/{t}", {})
                      .get("n", 0)), pct(m.get(f"{source}/all_variants/type/{t}")),
                      str(m.get(f"{source}/all_variants/type/{t}", {}).get("n", 0))] for t in types]
        out += [f"### Per question type ({source})", "",
                _table(["type", "official", "n", "all datasets, both variants", "n"], type_rows), ""]
        key_rows = [[k.split("/")[-1], pct(v), str(v["n"])] for k, v in m.items() if k.startswith(f"{source}/key/")]
        if key_rows:
            out += [f"### Per caption key ({source})", "", _table(["key", "accuracy", "n"], key_rows), ""]
        datasets = sorted({k.split("/")[2] for k in m if k.startswith(f"{source}/dataset/")})
        ds_rows = [[d, pct(m.get(f"{source}/dataset/{d}/coarse")), pct(m.get(f"{source}/dataset/{d}/fine")),
                    str(m.get(f"{source}/dataset/{d}/fine", {}).get("n", 0))] for d in datasets]
        out += [f"### Per dataset ({source}, headline variant)", "",
                _table(["dataset", "coarse", "fine", "n fine"], ds_rows), ""]
    dp = record.get("data_problems") or {}
    if dp.get("answer_idx_disagreements") or dp.get("image_id_conflicts"):
        out += ["## Data problems (scored, reported)", ""]
        if dp.get("answer_idx_disagreements"):
            out.append(f"- questions whose `answer_idx` disagrees with `options.index(answer)`: "
                       f"{dp['answer_idx_disagreements']} (scored with the official gold, `options.index(answer)`)")
        if dp.get("image_id_conflicts"):
            c = dp["image_id_conflicts"]
            out.append(f"- image ids shared by rows with different image bytes: {len(c)} (e.g. `{c[0]['image_id']}`, "
                       f"rows {c[0]['rows']}); each row was scored on its own image")
        out.append("")
    sk = record.get("skipped", {})
    out += ["## Not scored", "",
            f"- invalid items (see `metrics.json` → `skipped.problems`): {sk.get('invalid_items', 0)}",
            f"- items whose image failed to decode: {sk.get('items_of_failed_images', 0)} "
            f"({len(sk.get('failed_images', []))} images)", ""]
    return "\n".join(out)


def cognition_markdown(record: dict) -> str:
    m = record["metrics"]
    sk = record["skipped"]
    n_q = record["split"]["questions"]
    not_scored = sk["invalid_items"] + sk.get("items_of_failed_images", 0)
    scored = f", {n_q - not_scored} scored" if not_scored else ""
    lines = [f"# μ-Bench cognition: {record['model']['name']}", "",
             f"`{record['data']['location']}` ({record['data']['kind']}, {n_q} questions{scored}), "
             f"prompt: {record['prompt']}. Accuracy % ± 95 % bootstrap half-width "
             f"({record['bootstrap']['n_resamples']} resamples).", "",
             f"**All questions: {pct(m['cognition/all'])}** (n = {m['cognition/all']['n']}; image-clustered 95 % "
             f"{clustered_cell(m['cognition/all'])}: questions on one image resampled together, the interval to "
             "compare models by)", ""]
    if "cognition_strict/all" in m:
        lines += ["Random model: the figure above uses the official rule (correct iff the gold answer is a substring "
                  "of `question + ' ' + drawn option`, so a question that names its answer is always right); "
                  f"strict (the drawn option is the gold one): **{pct(m['cognition_strict/all'])}** "
                  f"(`cognition_strict/*`).", ""]
    breakdowns = dict.fromkeys(k.split("/")[1] for k in m if k.startswith("cognition/") and k.count("/") >= 2)
    for col in breakdowns:  # in the order metrics.cognition.BREAKDOWNS wrote them
        keys = [k for k in m if k.startswith(f"cognition/{col}/")]
        if keys:
            lines += [f"## Per {col}", "", f"| {col} | accuracy | image-clustered 95 % | n |", "|---|---|---|---|"]
            lines += [f"| {k.split('/', 2)[2]} | {pct(m[k])} | {clustered_cell(m[k])} | {m[k]['n']} |"
                      for k in sorted(keys)]
            lines.append("")
    st = record.get("backend_stats") or {}
    if st.get("requests_sent") is not None:
        lines += ["## Backend", "", f"- requests sent: {st.get('requests_sent')}, cache hits: {st.get('cache_hits')}, "
                  f"retries: {st.get('retries')}, timeouts: {st.get('timeouts')}, failed (scored wrong): "
                  f"{st.get('failed')}, HTTP errors: {st.get('http_errors')}", ""]
    lines += ["## Not scored", "", f"- invalid questions: {sk['invalid_items']}"]
    if sk.get("items_of_failed_images"):
        lines.append(f"- questions whose image could not be read: {sk['items_of_failed_images']} "
                     f"({'; '.join(sk['failed_images'][:3])})")
    elif sk.get("failed_images"):
        lines.append(f"- answers lost to an unreadable image (scored wrong): {len(sk['failed_images'])}")
    dups = (record.get("data_problems") or {}).get("duplicate_ids") or {}
    if dups:
        lines.append(f"- question ids used more than once (each question scored on its own): {len(dups)} ids, e.g. "
                     f"{next(iter(dups))!r} × {next(iter(dups.values()))}")
    lines.append("")
    return "\n".join(lines)


def localization_markdown(record: dict, per_image) -> str:
    m = record["metrics"]
    model = record["model"]
    lines = [f"# μ-Bench localization ({record['head']}): {model['name']}", "",
             f"Backbone `{model['name']}` (weights `{model['fingerprint']}`), head `{model['head_fingerprint']}` on "
             f"`{record['data']['location']}` (fingerprint `{record['data']['fingerprint']}`), split "
             f"`{record['split']['name']}`: {record['counts']['images']} images, {record['counts']['ground_truth']} "
             f"objects (max {record['counts']['max_ground_truth_per_image']} per image), classes "
             f"{', '.join(record['data']['class_names'])}.", "",
             f"COCO metrics (pycocotools) at up to {record['counts']['max_dets']} detections per image; GRIT "
             f"localization score (official μ-Bench protocol) on detections with score ≥ "
             f"{record['counts']['grit_score_threshold']}, one question per (image, class present). All in %.", "",
             "Intervals: image-clustered 95 % percentile bootstrap (images resampled with all their objects and "
             "questions; COCO AP re-accumulated per resample).", "",
             "| metric | value | image-clustered 95 % |", "|---|---|---|"]
    for key in ("bbox/AP", "bbox/AP50", "bbox/AP75", "bbox/AR_max", "segm/AP", "segm/AP50", "segm/AP75",
                "segm/AR_max", "grit/macro", "grit/pooled"):
        if f"loc/{key}" in m:
            lines.append(f"| {key} | {fmt_value(m[f'loc/{key}'])} | {clustered_cell(m[f'loc/{key}'])} |")
    classes = record["data"]["class_names"]
    lines += ["", "## Per class (AP)", "", "| class | bbox AP | segm AP |", "|---|---|---|"]
    for c in classes:
        lines.append(f"| {c} | {fmt_value(m.get(f'loc/bbox/per_class/{c}'))} | {fmt_value(m.get(f'loc/segm/per_class/{c}'))} |")
    lines += ["", "## GRIT per dataset and class", "",
              "| dataset | class | GRIT | image-clustered 95 % | images | mean #pred | mean #gt |",
              "|---|---|---|---|---|---|---|"]
    if len(per_image):
        for (d, c), g in per_image.groupby(["dataset", "class"]):
            lines.append(f"| {d} | {c} | {percent(g['grit'].mean())} | {clustered_cell(m.get(f'loc/grit/{d}/{c}'))} "
                         f"| {len(g)} | {g['n_pred'].mean():.1f} | {g['n_gt'].mean():.1f} |")
    sk = record["skipped"]
    lines += ["", "## Not scored", "", f"- images that failed to decode: {len(sk.get('failed_images', []))}",
              *[f"- {k.replace('_', ' ')}: {v}" for k, v in sk.items() if k != "failed_images"], ""]
    return "\n".join(lines)


def probe_markdown(frame: pd.DataFrame, model: str) -> str:
    lines = [f"# Linear probes: {model}", "", "Accuracy % (mean ± std over seeds); weight decay chosen on val.", ""]
    if frame.empty:
        return "\n".join(lines + ["(no dataset could be probed)", ""])
    pivot = frame.assign(cell=[f"{points(m)} ± {points(s)}" for m, s in zip(frame.acc_mean, frame.acc_std,
                                                                               strict=True)])
    shots = list(dict.fromkeys(frame["shots"]))
    lines.append("| dataset | " + " | ".join(f"{s}-shot" if s != "full" else "full" for s in shots) + " |")
    lines.append("|---|" + "---|" * len(shots))
    for name, g in pivot.groupby("dataset"):
        cells = dict(zip(g["shots"], g["cell"], strict=True))
        lines.append(f"| {name} | " + " | ".join(cells.get(s, "—") for s in shots) + " |")
    return "\n".join(lines) + "\n"
