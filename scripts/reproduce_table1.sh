#!/usr/bin/env bash
# Reproduce Table 1 of the μ-Bench paper with this project's presets on a real copy of the benchmark, then print the
# paper's numbers beside ours (python -m microbench leaderboard --paper). Needs what the paper needed: the Hub
# weights (downloaded on first use), a GPU for the contrastive models and the local VLMs, an OpenAI key for GPT-4o
# and a served Qwen-VL-Chat; it cannot run offline. Runs that finished (their metrics.json exists) are kept, so the
# script resumes after an interruption; FORCE=1 reruns them. See docs/reproduce.md.
#
#   DATA=data/ubench COGNITION=data/ubench_cognition bash scripts/reproduce_table1.sh            # contrastive + Random
#   bash scripts/reproduce_table1.sh generative       # GPT-4o, PaliGemma, CogVLM, Qwen-VL-Chat
#   bash scripts/reproduce_table1.sh all
#   DRY_RUN=1 bash scripts/reproduce_table1.sh all    # print the commands only
#
# Environment: DATA (default jnirschl/uBench, the pinned Hub revision), COGNITION (the cognition folder in the
# official layout; unset: cognition is skipped, it is not on the Hub), OUT (default out/table1), TRAINER (default
# gpu), QWEN_URL (an OpenAI-compatible server of Qwen/Qwen-VL-Chat, e.g. http://localhost:8000/v1), PY.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${DATA:-jnirschl/uBench}"
COGNITION="${COGNITION:-}"
OUT="${OUT:-out/table1}"
TRAINER="${TRAINER:-gpu}"
PY="${PY:-.venv/bin/python}"
WHAT="${1:-contrastive}"
case "$WHAT" in contrastive|generative|all) ;; *) echo "error: say contrastive, generative or all (got '$WHAT')" >&2; exit 2;; esac

run() {  # run NAME OVERRIDES...: one evaluation into $OUT/NAME
  local name="$1"; shift
  if [ -n "${DRY_RUN:-}" ]; then echo "$PY src/eval.py $* paths.output_dir=$OUT/$name"; return; fi
  if [ -z "${FORCE:-}" ] && [ -f "$OUT/$name/metrics.json" ]; then echo "[table1] $name: finished earlier, kept"; return; fi
  echo "[table1] $name"
  "$PY" src/eval.py "$@" "paths.output_dir=$OUT/$name"
}

both() {  # both NAME OVERRIDES...: perception, and cognition when a cognition folder is given
  local name="$1"; shift
  run "$name" "data.path=$DATA" "$@"
  if [ -n "$COGNITION" ]; then run "$name-cognition" task=cognition "cognition.path=$COGNITION" "$@"; fi
}

if [ "$WHAT" != generative ]; then
  for model in biomedclip align openclip clip plip quiltnet; do
    both "$model" "model=$model" "trainer=$TRAINER"
  done
  both random model=random
  # CONCH (gated weights, its own package): a plug-in backbone, see README "Plug-in backbones"
fi
if [ "$WHAT" != contrastive ]; then
  both gpt4o model=gpt4o                                                     # OPENAI_API_KEY
  both paligemma model=paligemma
  both cogvlm model=cogvlm
  if [ -n "${QWEN_URL:-}" ] || [ -n "${DRY_RUN:-}" ]; then
    both qwen_vl_chat model=qwen_vl_chat "model.base_url=${QWEN_URL:-http://localhost:8000/v1}"
  else
    echo "[table1] qwen_vl_chat skipped: set QWEN_URL to an OpenAI-compatible server of Qwen/Qwen-VL-Chat"
  fi
fi
if [ -n "${DRY_RUN:-}" ]; then
  echo "$PY -m microbench leaderboard $OUT --out $OUT/leaderboard --paper --baseline random"
else
  "$PY" -m microbench leaderboard "$OUT" --out "$OUT/leaderboard" --paper --baseline random
fi
