# Recipes over `python -m pipeline` / `python -m trainer`. `just --list` shows them.
set shell := ["bash", "-euo", "pipefail", "-c"]

python := env_var_or_default("PYTHON", "python")

# list the recipes
default:
    @just --list

# synthetic corpus -> index (later: shard, train, evaluate), all under shards/demo
demo:
    {{python}} -m pipeline synth shards/demo-audio --tracks 8 --seconds 12 --seed 0
    {{python}} -m pipeline index shards/demo-audio --out shards/demo/index.json

# scan an audio tree into shards/<ROOT name>/index.json
index ROOT *ARGS:
    {{python}} -m pipeline index "{{ROOT}}" {{ARGS}}

# run the test suite
test *ARGS:
    {{python}} -m pytest {{ARGS}}

# lint and format check
lint:
    ruff check .
    ruff format --check .

# index benchmark (prints ratios measured side by side)
bench-index *ARGS:
    {{python}} bench/index_bench.py {{ARGS}}
