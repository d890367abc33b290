#!/usr/bin/env bash
# One call on the lent GPU machine (../shared/gpu/README.md): the full-shape benchmark of
# this tree ("after"), then of an older tree in .gpu/base ("before"), same harness, same
# machine. Prepare here first:
#   bash ../shared/gpu/prepare.sh
#   rm -rf .gpu/base && mkdir -p .gpu/base && git archive <base> src | tar -x -C .gpu/base \
#     && git rev-parse <base> > .gpu/base/COMMIT && git rev-parse HEAD > .gpu/COMMIT_AFTER
# then run `bash bench/gpu.sh` there with carry [".gpu"]. Results land in $OUT.
set -u
export PYTHONUNBUFFERED=1
tar xzf .gpu/unidic-lite-*.tar.gz -C /tmp
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .gpu/*.whl || exit 3
export PYTHONPATH=/tmp/site:$(ls -d /tmp/unidic-lite-*):$PWD/src:$PWD
cp .gpu/COMMIT_AFTER COMMIT 2>/dev/null
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
run() {  # tag, seconds, extra arguments
    local tag=$1 limit=$2; shift 2
    timeout "$limit" python3 -m bench.run --shape full --device cuda --hf-home /tmp/hf \
        --tag "$tag" --out "$OUT" "$@" > "$OUT/$tag.log" 2>&1
    echo "== $tag: exit $?"; grep -E "scenario|model alone|ready in|wrote|Error" "$OUT/$tag.log" | tail -25
}
run after "${AFTER_SECONDS:-300}"
reuse=(); [ -d /tmp/hf/hub ] && reuse=(--reuse)
run before "${BEFORE_SECONDS:-240}" "${reuse[@]}" --server-src .gpu/base
