"""The study of many specialists: base, every specialist and their merges, as one accuracy matrix.

    python src/train.py -m experiment=specialist specialty=pathology,fluorescence,electron
    python src/specialists.py runs=logs/specialists/multiruns/<time>
"""

from __future__ import annotations

from microbench.jobs import run_job

if __name__ == "__main__":
    run_job("specialists")
