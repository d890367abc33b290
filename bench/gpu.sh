#!/usr/bin/env bash
# One call on the lent GPU machine (../shared/gpu/README.md): the full-shape benchmark of
# this tree ("after"), then of an older tree in .gpu/base ("before"), same harness, same
# machine. Prepare here first:
#   bash ../shared/gpu/prepare.sh
#   rm -rf .gpu/base && mkdir -p .gpu/base && git archive <base> src | tar -x -C .gpu/base \
#     && git rev-parse <base> > .gpu/base/COMMIT && git rev-parse HEAD > .gpu/COMMIT_AFTER
# then run `bash bench/gpu.sh` there with carry [".gpu"]. Results land in $OUT.
# ONLY=after skips the "before" run. With a py-spy wheel in .gpu/tools/, the server's
# processes are profiled (py-spy raw stacks) during the "after" run's embeddings scenarios.
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
profile() {  # wait for the server and its engine, then sample both for a while
    python3 -m pip install -q --no-index --no-deps --target /tmp/tools .gpu/tools/*.whl || return
    local server engine
    for _ in $(seq 600); do
        server=$(pgrep -f -- "-m fake_openai_server$" | head -1)
        engine=$(pgrep -f -- "fake_openai_server.engine.worker" | head -1)
        [ -n "$server" ] && [ -n "$engine" ] && grep -q "scenario 0" "$OUT/after.log" && break
        sleep 0.5
    done
    [ -n "$server" ] || return
    /tmp/tools/bin/py-spy record -p "$server" -d 40 -r 200 -f raw --nonblocking \
        -o "$OUT/profile-server.txt" > /dev/null 2>&1 &
    /tmp/tools/bin/py-spy record -p "$engine" -d 40 -r 200 -f raw --nonblocking \
        -o "$OUT/profile-engine.txt" > /dev/null 2>&1 &
    wait
}
ls .gpu/tools/*.whl > /dev/null 2>&1 && profile &
run after "${AFTER_SECONDS:-300}"
wait
[ "${ONLY:-}" = after ] && exit 0
reuse=(); [ -d /tmp/hf/hub ] && reuse=(--reuse)
run before "${BEFORE_SECONDS:-240}" "${reuse[@]}" --server-src .gpu/base
