# Recipes over `python -m pipeline` / `python -m trainer`. `just --list` shows them.
set shell := ["bash", "-euo", "pipefail", "-c"]
# arguments reach each command as "$@", word for word: a YAML list or a path with spaces in one
# argument stays one argument (text interpolated with {{ARGS}} would be split and brace-expanded)
set positional-arguments

python := env_var_or_default("PYTHON", "python")

# list the recipes
default:
    @just --list

# the whole system on a synthetic corpus: synth -> index -> shard -> verify -> train -> evaluate;
# fails unless the model ends below FLAC and below its own untrained head, and its estimate is at
# least as good as the least-squares filter fitted on the training split (evaluate --gate)
# (one torch thread for fit and evaluate: a tiny model's small ops lose more to two threads
# contending for 2 cores, and to the loader workers, than they gain)
demo:
    rm -rf shards/demo shards/demo-audio runs/tiny
    {{python}} -m pipeline synth shards/demo-audio --tracks 8 --seconds 12 --seed 0
    {{python}} -m pipeline index shards/demo-audio --out shards/demo/index.json --quiet
    {{python}} -m pipeline shard shards/demo/index.json --chunk-frames 16384 --shard-bytes 8MB --quiet
    {{python}} -m pipeline verify shards/demo --against-source --quiet
    OMP_NUM_THREADS=1 {{python}} -m trainer fit --config configs/tiny.yaml --trainer.enable_progress_bar false
    {{python}} -m trainer evaluate --ckpt runs/tiny/checkpoints/last.ckpt --shards shards/demo --split test --generate 8 --no-progress --threads 1 --gate

# scan an audio tree into shards/<ROOT name>/index.json
index ROOT *ARGS:
    {{python}} -m pipeline index "$@"

# shard an index (default: the newest shards/*/index.json), output beside it
shard *ARGS:
    #!/usr/bin/env bash
    set -euo pipefail
    args=("$@")
    if [ ${#args[@]} -eq 0 ] || [[ "${args[0]}" == -* ]]; then
        newest=$(ls -t shards/*/index.json 2>/dev/null | head -n 1 || true)
        [ -n "$newest" ] || { echo "error: no shards/*/index.json; run just index ROOT first" >&2; exit 2; }
        args=("$newest" "${args[@]}")
    fi
    {{python}} -m pipeline shard "${args[@]}"

# check a shard set (add --against-source to compare with the audio)
verify DIR *ARGS:
    {{python}} -m pipeline verify "$@"

# hours, tracks, chunks, shards, bytes and token level histogram of a shard set
stats DIR:
    {{python}} -m pipeline stats "$1"

# train a T5 (LightningCLI): just train [CONFIG] [--section.key value ...]
train *ARGS:
    #!/usr/bin/env bash
    set -euo pipefail
    args=("$@")
    if [ ${#args[@]} -eq 0 ] || [[ "${args[0]}" == -* ]]; then args=(configs/tiny.yaml "${args[@]}"); fi
    {{python}} -m trainer fit --config "${args[0]}" "${args[@]:1}"

# evaluate a checkpoint: just evaluate CKPT SHARDS [--split test] [--generate 8] [--out DIR]
evaluate CKPT SHARDS *ARGS:
    {{python}} -m trainer evaluate --ckpt "$1" --shards "$2" "${@:3}"

# rebuild one channel of a file: just predict IN OUT CKPT [--direction r2l]
predict IN OUT CKPT *ARGS:
    {{python}} -m trainer predict "$1" "$2" --ckpt "$3" "${@:4}"

# run the test suite
test *ARGS:
    {{python}} -m pytest "$@"

# lint and format check
lint:
    ruff check .
    ruff format --check .

# benchmarks (print ratios measured side by side in one run)
bench-index *ARGS:
    {{python}} bench/index_bench.py "$@"

bench-shard *ARGS:
    {{python}} bench/shard_bench.py "$@"

bench-loader *ARGS:
    {{python}} bench/loader_bench.py "$@"

bench-train *ARGS:
    {{python}} bench/train_bench.py "$@"

bench-speed *ARGS:
    {{python}} bench/speed_bench.py "$@"

# loader memory over many epochs: PSS of the main process and each worker (bench/soak_bench.py)
bench-soak *ARGS:
    {{python}} bench/soak_bench.py "$@"

# tokens/s, MFU, data wait and the float64 solve's share per head on a GPU (a CPU smoke without one)
bench-gpu *ARGS:
    {{python}} bench/gpu_bench.py "$@"
