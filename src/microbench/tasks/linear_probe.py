"""``python src/train.py task=linear_probe`` (``experiment=linear_probe``): logistic-regression probes on cached
frozen features of every kept source dataset, full data and k-shot, weight decay chosen on val, mean ± std over
seeds. Writes ``linear_probe.json`` (the common record header plus every result), ``linear_probe.csv`` and
``linear_probe.md``.
"""

from __future__ import annotations

import logging
import time

import pandas as pd
from hydra.utils import instantiate
from omegaconf import DictConfig
from tqdm.auto import tqdm

from microbench.models.features import FeatureCache
from microbench.models.finetune import class_text_embeddings
from microbench.models.linear_probe import WEIGHT_DECAYS, dataset_probe_data, row_to_image_index, sweep
from microbench.results.record import RunRecord
from microbench.results.report import points, probe_markdown
from microbench.tasks.records import new_record, run_context, write_run
from microbench.tasks.trainer import build_model, start_run

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> tuple[RunRecord, dict]:
    """Probes on every kept source dataset: full data and k-shot, weight decay on val, mean ± std over seeds."""
    t0, out_dir = start_run(cfg)
    p = cfg.probe
    fast = bool(cfg.trainer.get("fast_dev_run", False))
    backbone = build_model(cfg.model, cfg.get("inference"))
    dm = instantiate(cfg.data, transform=backbone.preprocess, split="all")
    dm.setup()
    feats, _, hit = FeatureCache(p.cache_dir).get(backbone, dm, progress=True)
    row_to_image = row_to_image_index(dm)
    shots = list(p.shots)[:1] if fast else list(p.shots)
    seeds = list(p.seeds)[:1] if fast else list(p.seeds)
    wds = tuple(p.weight_decays) if p.get("weight_decays") else WEIGHT_DECAYS
    wds = wds[:2] if fast else wds
    results, table = {}, []
    names = sorted(dm.rows["dataset"].unique())[:1] if fast else sorted(dm.rows["dataset"].unique())
    bar = tqdm(names, desc="linear probes", unit="dataset", dynamic_ncols=True)
    for i, name in enumerate(bar, 1):
        bar.set_postfix_str(name)
        t_ds = time.perf_counter()
        data, info = dataset_probe_data(dm, feats, name, row_to_image)
        if data is None:
            log.warning("skipping %s: empty split or a single training class %s", name, info["rows"])
            results[name] = {"skipped": info["skipped"]}
            continue
        if p.get("zs_init") and backbone.has_text:
            data.zs_weights = class_text_embeddings(backbone, info["space"].prompts)
        results[name] = {}
        for k in shots:
            r = sweep(data, shots=k, seeds=seeds, weight_decays=wds, zs_init=bool(p.get("zs_init")),
                      zs_scale=float(backbone.logit_scale) if backbone.has_text else 100.0)
            results[name][str(k)] = r
            if k == shots[-1]:
                log.info("linear probe %d/%d %s: %s (%.1f s)", i, len(names), name, ", ".join(
                    f"{s}-shot {points(results[name][str(s)]['acc']['mean'])}" if s != "full" else
                    f"full {points(results[name]['full']['acc']['mean'])}" for s in shots),
                    time.perf_counter() - t_ds)
            table.append({"dataset": name, "shots": str(k), "n_train": r["n_train"], "n_test": r["n_test"],
                          **{f"{m}_mean": r[m]["mean"] for m in ("acc", "balanced_acc", "macro_f1")},
                          **{f"{m}_std": r[m]["stdev"] for m in ("acc", "balanced_acc", "macro_f1")}})
    frame = pd.DataFrame(table)
    first = str(shots[0])
    headline = {f"{first}-shot/{name}" if first != "full" else f"full/{name}": {
        "value": r[first]["acc"]["mean"], "ci": None, "n": r[first]["n_test"]}
        for name, r in results.items() if first in r}
    metrics = {f"probe/{row['dataset']}/{row['shots']}/{m}": {"value": row[f"{m}_mean"], "ci": None,
                                                              "n": row["n_test"], "stdev": row[f"{m}_std"]}
               for row in table for m in ("acc", "balanced_acc", "macro_f1")}
    record = new_record(run_context(cfg, t0, out_dir), task="linear_probe", model=backbone.describe(),
                        data=dm.source.to_dict(), split=dm.split_spec.to_dict(), headline=headline, metrics=metrics,
                        skipped={k: v["skipped"] for k, v in results.items() if "skipped" in v},
                        shots=[str(s) for s in shots], seeds=seeds, weight_decays=list(wds), feature_cache_hit=hit,
                        results=results, seconds=round(time.perf_counter() - t0, 2))
    write_run(out_dir, record, name="linear_probe.json", csvs={"linear_probe.csv": frame} if len(frame) else {},
              texts={"linear_probe.md": probe_markdown(frame, backbone.name)})
    return record, {"backbone": backbone, "datamodule": dm, "features": feats}
