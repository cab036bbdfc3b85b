"""``python src/specialists.py runs=<folder>``: the specialists of a multirun of ``experiment=specialist`` (or any
list of specialist runs of one base) scored together with their merges, in one pass per split
(:func:`microbench.studies.specialists.run_specialists`), written as ``specialists.json``, ``specialists.md`` and
``specialists_matrix.png`` in ``paths.output_dir``."""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Literal

from omegaconf import DictConfig, OmegaConf, open_dict

from microbench.data.config import make_eval_dm, whole_benchmark_cfg
from microbench.errors import UserError
from microbench.options import checked
from microbench.results.io import read_json
from microbench.results.record import RunRecord
from microbench.studies.forgetting import load_finetuned_state
from microbench.studies.methods import specialists_merges_problems
from microbench.studies.specialists import Specialist, run_specialists, write_specialists_report
from microbench.tasks.forgetting import study_on_every_rank
from microbench.tasks.records import new_record, run_context
from microbench.tasks.trainer import (
    build_model,
    close_loggers,
    container,
    instantiate_loggers,
    start_run,
    trainer_for,
)

log = logging.getLogger(__name__)


def unfinished_jobs(folder: Path) -> list[Path]:
    """Job folders of a fit (``.hydra/config.yaml`` with ``task: finetune``) that have no ``train_metrics.json``."""
    out = []
    for cfg_file in sorted(folder.rglob(".hydra/config.yaml")):
        job = cfg_file.parent.parent
        if (job / "train_metrics.json").exists():
            continue
        try:
            task = OmegaConf.load(cfg_file).get("task")
        except Exception:  # noqa: BLE001 - an unreadable Hydra log is not a job to count
            continue
        if task == "finetune":
            out.append(job)
    return out


def why_unfinished(job: Path) -> str:
    """What a job folder without a record says about itself: the error its ``failed.json`` names, or nothing."""
    failed = job / "failed.json"
    if failed.is_file():
        try:
            return f"failed: {read_json(failed)['error']}"
        except (OSError, ValueError, KeyError):
            pass
    return "no failed.json: still running, or killed"


@checked("")
def find_specialists(runs, checkpoint: Literal["last", "best"] = "last") -> tuple[list[tuple[dict, str]], list[str]]:
    """(fit record, checkpoint) of every specialist under ``runs`` (a folder searched for ``train_metrics.json``,
    or a list of folders / record files); ``checkpoint``: ``last`` (the weights the fit ended with, as the fit's own
    forgetting study scores them) or ``best`` (by val); one line when there is none or one lacks its specialty or
    checkpoint. Also returns the multirun's job folders without a record (failed or running: left out, named)."""
    items = [runs] if isinstance(runs, str) else list(runs or [])
    if not items:
        raise UserError("no specialists: pass runs=<multirun folder of experiment=specialist> (or a list of runs)")
    records, unfinished = [], []
    for item in map(Path, items):
        if not item.exists():
            raise UserError(f"runs: {item} does not exist")
        records += [item] if item.is_file() else sorted(item.rglob("train_metrics.json"))
        unfinished += [] if item.is_file() else unfinished_jobs(item)
    if unfinished:  # a job of the multirun that failed or is still running: counted and named, never silent
        log.warning("specialists study: %d job folder(s) without a train_metrics.json, left out: %s", len(unfinished),
                    "; ".join(f"{job} ({why_unfinished(job)})" for job in unfinished))
    found = []
    for f in records:
        rec = read_json(f)
        if not rec.get("specialty"):
            raise UserError(f"{f} is not a specialist's run (no specialty: train it with experiment=specialist)")
        ckpt = rec.get(f"{checkpoint}_checkpoint") or rec.get("last_checkpoint") or rec.get("best_checkpoint")
        if not ckpt or not Path(ckpt).is_file():
            raise UserError(f"{f}: its checkpoint {ckpt} does not exist (moved or deleted?)")
        found.append((rec, ckpt))
    if not found:
        raise UserError(f"no train_metrics.json of a specialist under {', '.join(map(str, items))}")
    names = [r["specialty"]["name"] for r, _ in found]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UserError(f"runs: {twice[0]} is there {names.count(twice[0])} times (e.g. two seeds): a study compares "
                        "one specialist per group; pass the runs to study as a list, runs=[<run>,<run>]")
    copies = {str((r.get("data") or {}).get("location") or r["config"]["data"].get("path")) for r, _ in found}
    if len(copies) > 1:
        log.warning("specialists study: the specialists were trained on different copies (%s); the study scores %s",
                    ", ".join(sorted(copies)), "data_path if given, else the first's")
    bases = {(r["config"]["model"].get("name"), r["model"].get("fingerprint")) for r, _ in found}
    if len({b[0] for b in bases}) > 1:
        raise UserError(f"the specialists have different base models ({sorted(b[0] for b in bases)}): a study "
                        "merges fine-tunes of one base")
    return found, [str(j) for j in unfinished]


def order_chain(found: list[tuple[dict, str]], chain: bool) -> list[tuple[dict, str]]:
    """The specialists in chain order (``chain=true``: the one that starts from the base first, then each that
    starts from the one before); one line when they are not one chain, or are a chain studied with chain=false."""
    starts = {ckpt: (rec.get("chain") or {}).get("init_from") for rec, ckpt in found}
    if not chain:
        chained = [rec["specialty"]["name"] for rec, ckpt in found if starts[ckpt]]
        if chained:
            raise UserError(f"{', '.join(chained)} started from another specialist (init_from / chain=true): study "
                            "the runs as one chain with chain=true, or pass only fine-tunes of the base")
        return found
    by_start = {}
    for rec, ckpt in found:
        key = str(Path(starts[ckpt]).resolve()) if starts[ckpt] else None
        if key in by_start:
            raise UserError(f"chain=true: {rec['specialty']['name']} and {by_start[key][0]['specialty']['name']} "
                            f"both start from {key or 'the base'}: the runs are not one chain")
        by_start[key] = (rec, ckpt)
    ordered, at = [], [None]
    while any(a in by_start for a in at):
        rec, ckpt = by_start[next(a for a in at if a in by_start)]
        ordered.append((rec, ckpt))
        at = [str(Path(c).resolve()) for c in (rec.get("last_checkpoint"), rec.get("best_checkpoint"), ckpt) if c]
    if len(ordered) != len(found):
        left = sorted({r["specialty"]["name"] for r, _ in found} - {r["specialty"]["name"] for r, _ in ordered})
        raise UserError(f"chain=true: {', '.join(left)} do not continue the chain "
                        f"{' → '.join(r['specialty']['name'] for r, _ in ordered) or '(no run starts from the base)'}")
    return ordered


def merges_problems(cfg: DictConfig) -> tuple[list[str], dict, list[str]]:
    """(``merges``, ``merge_options`` of those merges, every problem): after importing ``plugins`` (modules that
    register merges), unknown merges, repeats, unknown options and refused values, one clause each."""
    import importlib

    problems = []
    for module in list(cfg.get("plugins") or []):
        try:
            importlib.import_module(str(module))
        except ImportError as err:
            problems.append(f"plugins: cannot import {module} ({err}); is its folder on PYTHONPATH?")
    given = cfg.get("merge_options")
    options = OmegaConf.to_container(given, resolve=True) if OmegaConf.is_config(given) else dict(given or {})
    merges = cfg.get("merges")
    merges = [merges] if isinstance(merges, str) else list(merges or [])
    options = {k: v for k, v in options.items() if k in merges}  # the options of merges not run are not read
    if problems:  # a plug-in's merges are unknown until it imports
        return merges, options, problems
    merges, problems = specialists_merges_problems(merges, options)
    return merges, options, problems


def merges_of(cfg: DictConfig) -> tuple[list[str], dict]:
    """``merges`` and ``merge_options``, checked (:func:`merges_problems`): every problem in one line."""
    merges, options, problems = merges_problems(cfg)
    if problems:
        raise UserError("; ".join(problems))
    return merges, options


def run(cfg: DictConfig) -> tuple[RunRecord, dict]:
    t0, out_dir = start_run(cfg)
    merges, options = merges_of(cfg)
    found, left_out = find_specialists(OmegaConf.to_container(cfg.runs, resolve=True) if OmegaConf.is_config(cfg.runs)
                             else cfg.runs, str(cfg.get("checkpoint", "last")))
    chain = bool(cfg.get("chain", False))
    found = order_chain(found, chain)
    first = found[0][0]
    backbone = build_model(OmegaConf.create(first["config"]["model"]), cfg.get("inference"))
    base_state = {k: v.detach().clone() for k, v in backbone.state_dict().items()}
    specialists = []
    for rec, ckpt in found:
        state, _ = load_finetuned_state(ckpt, backbone)
        specialists.append(Specialist(rec["specialty"]["name"], state, rec["specialty"]["datasets"], ckpt))
    data = cfg.data
    with open_dict(data):
        data.path = cfg.get("data_path") or first["config"]["data"]["path"]
    boot = cfg.bootstrap
    study_fn = partial(run_specialists, backbone, base_state, specialists,
                       make_dm=partial(make_eval_dm, whole_benchmark_cfg(data), backbone.preprocess),
                       n_resamples=int(boot.n_resamples), confidence=float(boot.confidence), seed=int(boot.seed),
                       lambdas=[float(x) for x in cfg.lambdas], merges=merges, merge_options=options, chain=chain)
    context = run_context(cfg, t0, out_dir)
    loggers = instantiate_loggers(cfg)
    for lg in loggers:
        lg.log_hyperparams(container(cfg))
    trainer = trainer_for(cfg, logger=False, enable_checkpointing=False, enable_model_summary=False,
                          enable_progress_bar=False)
    study = study_on_every_rank(trainer, study_fn, out_dir, context["run_id"])
    if trainer.is_global_zero:
        if left_out:
            study["left_out"] = {"jobs_without_a_record": left_out,
                                 "why": {job: why_unfinished(Path(job)) for job in left_out}}
        write_specialists_report(study, out_dir, loggers[0] if loggers else None)
    close_loggers(loggers)
    test = study["splits"]["test"]["scalars"]
    headline = {f"{n}/gain on its group": s["gain"] for n, s in test["specialists"].items()}
    fine = test["continual"].get("fine") or {}
    if chain and fine.get("backward_transfer") is not None:
        headline.update({f"chain/{k}": {"value": fine[k], "ci": None, "n": len(found)}
                         for k in ("backward_transfer", "average_forgetting", "transfer", "avg", "last")})
    record = new_record(context, task="specialists", model={"name": backbone.name,
                                                            "fingerprint": backbone.fingerprint()},
                        data={"location": str(data.path)}, split={"name": "test"}, headline=headline, metrics={},
                        specialists=[s["name"] for s in study["specialists"]])
    record.outputs = {"report": f"{(out_dir / 'specialists.md').resolve()} (matrix: specialists_matrix.png)"}
    return record, {"study": study, "backbone": backbone}
