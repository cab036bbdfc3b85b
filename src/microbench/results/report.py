"""Human-readable ``results.md`` of one run (a Table-1-style summary first, then every breakdown)."""

from __future__ import annotations

from typing import Any


def pct(m: dict | None) -> str:
    """``47.57 ± 0.34`` (percent, official half-width CI) or an em dash."""
    if not m or m.get("value") is None or m["value"] != m["value"]:
        return "—"
    ci = m.get("ci")
    if ci is None or ci != ci:
        return f"{100 * m['value']:.2f}"
    return f"{100 * m['value']:.2f} ± {100 * ci:.2f}"


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
