#!/usr/bin/env bash
# The first run on a GPU: every check that needs CUDA, in under 10 minutes on one H200.
#
#   profiling/gpu_smoke.sh OUT_DIR            # every step, then the summary
#   profiling/gpu_smoke.sh OUT_DIR STEP...    # only these steps (appended to OUT_DIR)
#
# Steps: env, presets_tiny (every compile preset on the tiny model), real_table
# (qwen3-1.7b at 1 x 4096 tokens: eager, compile_sac, compile_sac_float8, JSON and a
# Chrome trace), pure_bf16 (the pure-bf16 option), torchrun_1rank (the distributed path
# on one rank), fp32_attention (fp32 GQA at 4096 tokens must not use SDPA's math
# kernel; plus the harness in fp32), context_parallel (two context-parallel ranks on the
# one GPU over gloo: the FlexAttention path forward and backward, eager and compile_sac,
# against one process), compile_modes (compile_sac under the torch.compile modes default
# / max-autotune-no-cudagraphs / reduce-overhead, each with the compiled AdamW step),
# tests (the fast tests of the GPU-facing code). The compile presets of every step
# compile the AdamW step too (the summary names the optimizer per config).
# Each step has a time limit; its log, JSON records and exit status go to OUT_DIR, and
# `python -m d9d.profiling.smoke summarize OUT_DIR` prints one summary to paste into the
# README and exits non-zero on any failure (this script exits with its status).
#
# torchao may be missing (float8 rows then say "skipped" and why); a wheel in .whl/ is
# installed into /tmp/site first. A preset this torch cannot run (memory_budget before
# torch 2.13) is a skipped row too.
set -u
cd "$(dirname "$0")/.."
OUT=${1:?usage: profiling/gpu_smoke.sh OUT_DIR [STEP...]}
shift
mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}

if compgen -G ".whl/*.whl" > /dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

ALL_STEPS=(env presets_tiny real_table pure_bf16 torchrun_1rank fp32_attention context_parallel
    compile_modes tests)
STEPS=("$@")
[ ${#STEPS[@]} -eq 0 ] && STEPS=("${ALL_STEPS[@]}")

wanted() {
    local s
    for s in "${STEPS[@]}"; do [ "$s" = "$1" ] && return 0; done
    return 1
}

# step NAME LIMIT_SECONDS JSON_FILE_OR_- COMMAND...: runs COMMAND with a time limit,
# appends "name, exit status, seconds, log, json" to OUT/steps.tsv.
step() {
    local name=$1 limit=$2 json=$3
    shift 3
    wanted "$name" || return 0
    echo "[smoke] $name (limit ${limit}s): $*" >&2
    local start=$SECONDS
    timeout --kill-after=15 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" "$name.log" "$json" \
        >> "$OUT/steps.tsv"
    echo "[smoke] $name: exit status $rc after $((SECONDS - start)) s" >&2
}

MFU=("$PYTHON" profiling/mfu.py)
PRESETS=$(ls compile_configs/*.toml | xargs -n1 basename | sed 's/\.toml$//' | tr '\n' ' ')

step env 60 - "$PYTHON" -c '
import importlib.util, torch, pydantic, d9d
print("torch", torch.__version__, "cuda", torch.version.cuda)
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(i, p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs",
          f"{p.total_memory / 2**30:.0f} GiB")
spec = importlib.util.find_spec("torchao")
print("torchao", "missing" if spec is None else spec.origin)
assert torch.cuda.is_available(), "no CUDA device"
'
# shellcheck disable=SC2086  # the preset names are one word each
step presets_tiny 240 presets_tiny.json "${MFU[@]}" --model tiny --batch-size 2 --seq-len 256 \
    --steps 2 --warmup 1 --config $PRESETS --json "$OUT/presets_tiny.json"
step real_table 300 real_table.json "${MFU[@]}" --model qwen3-1.7b --batch-size 1 \
    --seq-len 4096 --steps 5 --warmup 2 --config eager compile_sac compile_sac_float8 \
    --json "$OUT/real_table.json" --trace "$OUT/trace" --trace-steps 2
step pure_bf16 150 pure_bf16.json "${MFU[@]}" --model qwen3-0.6b --batch-size 1 --seq-len 4096 \
    --steps 3 --warmup 1 --no-mixed-precision --config eager compile_sac \
    --json "$OUT/pure_bf16.json"
step torchrun_1rank 150 torchrun_1rank.json "$PYTHON" -m torch.distributed.run --standalone \
    --nproc-per-node 1 profiling/mfu.py --model tiny --batch-size 2 --seq-len 256 --steps 2 \
    --config eager compile_sac --json "$OUT/torchrun_1rank.json"
step fp32_attention 150 fp32_attention.json bash -c "
    $PYTHON -m d9d.profiling.smoke fp32-attention --seq-len 4096 &&
    $PYTHON profiling/mfu.py --model qwen3-0.6b --num-layers 2 --batch-size 1 --seq-len 4096 \
        --steps 2 --warmup 1 --dtype float32 --no-mixed-precision --config eager \
        --json '$OUT/fp32_attention.json'"
step context_parallel 300 - "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node 2 \
    -m d9d.profiling.smoke context-parallel --seq-len 1024
# compile_sac under each torch.compile mode (presets written to OUT). The shape can be
# changed with SMOKE_MODES_SHAPE (the CPU-side test runs it on the tiny model).
MODES_SHAPE=${SMOKE_MODES_SHAPE:---model qwen3-0.6b --num-layers 4 --batch-size 1 --seq-len 2048}
if wanted compile_modes; then
    for mode in default max-autotune-no-cudagraphs reduce-overhead; do
        printf '# sac_%s: compile_sac under mode %s\n[compile]\nenabled = true\nmode = "%s"\n%s\n' \
            "${mode//-/_}" "$mode" "$mode" \
            '[activation_checkpointing]
mode = "selective"
save_every_other_matmul = true' > "$OUT/sac_${mode//-/_}.toml"
    done
fi
# shellcheck disable=SC2086  # MODES_SHAPE is a list of flags
step compile_modes 420 compile_modes.json "${MFU[@]}" $MODES_SHAPE --steps 3 --warmup 1 \
    --config "$OUT/sac_default.toml" "$OUT/sac_max_autotune_no_cudagraphs.toml" \
    "$OUT/sac_reduce_overhead.toml" --json "$OUT/compile_modes.json"
step tests 300 - "$PYTHON" -m pytest -q -x -p no:cacheprovider \
    tests/module/block/test_sdpa_kernels.py tests/compile/test_float8_filter.py \
    tests/compile/test_optimizer.py tests/compile/test_float8_emulated.py \
    tests/profiling/test_peak.py tests/profiling/test_config_loop.py tests/profiling/test_smoke.py

"$PYTHON" -m d9d.profiling.smoke summarize "$OUT" | tee "$OUT/summary.md"
exit "${PIPESTATUS[0]}"
