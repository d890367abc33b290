#!/usr/bin/env bash
# One call on the lent GPU machine (../shared/gpu/README.md): the full-shape benchmark of
# this tree, then optionally a second run for comparison (same harness, same machine), then
# the GPU-only tests (last, so that a failing test does not cost the measurements).
# Prepare here first:
#   bash ../shared/gpu/prepare.sh
#   pytest and httpx (and their dependencies) as wheels in .gpu/tools/test/ for TESTS=1
#   for BEFORE=tree: rm -rf .gpu/base && mkdir -p .gpu/base && git archive <base> src \
#     | tar -x -C .gpu/base && git rev-parse <base> > .gpu/base/COMMIT
#   git rev-parse HEAD > .gpu/COMMIT_AFTER
# then run `bash bench/gpu.sh` there with carry [".gpu"]. Results land in $OUT.
#
#   TESTS=1              then run tests/test_cuda_graphs.py (exit 4 if it fails)
#   AFTER_TAG=after      the tag of this tree's run; AFTER_ENV="NAME=VALUE ..." its settings
#   BEFORE=tree          then the tree in .gpu/base, tagged "before"
#   BEFORE=env           then this tree again with BEFORE_ENV's settings, tagged BEFORE_TAG
#   AB_ROUNDS=4          instead of all the above: bench.ab, .gpu/base (A) against this tree
#                        (B), both servers at once, AB_SCENARIOS (default "2") alternating;
#                        with AB_REPLICAS=2, one server of this tree (A) against two (B), the
#                        clients spread over them (scenario 2 only); with AB_B_ENV="NAME=VALUE
#                        ...", this tree on both sides, B with those settings
#   ONLY=after           no second run; SCENARIOS="1 2" limits every run's scenarios,
#                        BEFORE_SCENARIOS the second run's
set -u
export PYTHONUNBUFFERED=1
tar xzf .gpu/unidic-lite-*.tar.gz -C /tmp
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .gpu/*.whl || exit 3
export PYTHONPATH=/tmp/site:$(ls -d /tmp/unidic-lite-*):$PWD/src:$PWD
cp .gpu/COMMIT_AFTER COMMIT 2>/dev/null
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
if [ -n "${AB_ROUNDS:-}" ]; then
    ab=(--server-src .gpu/base)
    [ -n "${AB_REPLICAS:-}" ] && ab=(--b-replicas "$AB_REPLICAS")
    [ -n "${AB_B_ENV:-}" ] && read -ra ab <<< "--b-env $AB_B_ENV"
    timeout "${AB_SECONDS:-300}" python3 -m bench.ab --shape full --device cuda --hf-home /tmp/hf \
        "${ab[@]}" --rounds "$AB_ROUNDS" --scenarios ${AB_SCENARIOS:-2} --out "$OUT" \
        > "$OUT/ab.log" 2>&1
    status=$?
    grep -E "^\[ab|Error|Traceback" "$OUT/ab.log" | tail -20
    echo "== ab: exit $status"
    exit $status
fi
scenarios=(); [ -n "${SCENARIOS:-}" ] && read -ra scenarios <<< "--scenarios $SCENARIOS"
run() {  # tag, seconds, extra arguments
    local tag=$1 limit=$2; shift 2
    timeout "$limit" python3 -m bench.run --shape full --device cuda --hf-home /tmp/hf \
        --tag "$tag" --out "$OUT" "${scenarios[@]}" "$@" > "$OUT/$tag.log" 2>&1
    echo "== $tag: exit $?"
    grep -E "scenario|model alone|ready in|wrote|Error|Traceback" "$OUT/$tag.log" | tail -25
}
env_args=(); [ -n "${AFTER_ENV:-}" ] && read -ra env_args <<< "--server-env $AFTER_ENV"
run "${AFTER_TAG:-after}" "${AFTER_SECONDS:-420}" "${env_args[@]}"
reuse=(); [ -d /tmp/hf/hub ] && reuse=(--reuse)
[ -n "${BEFORE_SCENARIOS:-}" ] && read -ra scenarios <<< "--scenarios $BEFORE_SCENARIOS"
case "${ONLY:-}:${BEFORE:-}" in
    after:* | :) ;;
    *:tree) run before "${BEFORE_SECONDS:-240}" "${reuse[@]}" --server-src .gpu/base ;;
    *:env)
        read -ra env_args <<< "--server-env $BEFORE_ENV"
        run "${BEFORE_TAG:-before}" "${BEFORE_SECONDS:-240}" "${reuse[@]}" "${env_args[@]}"
        ;;
esac
if [ "${TESTS:-}" = 1 ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .gpu/tools/test/*.whl || exit 3
    timeout "${TESTS_SECONDS:-150}" python3 -m pytest -c /dev/null --rootdir . -p no:cacheprovider \
        -p no:hypothesispytest -q -rs tests/test_cuda_graphs.py > "$OUT/tests.log" 2>&1
    status=$?
    tail -30 "$OUT/tests.log"
    echo "== tests: exit $status"
    [ $status = 0 ] || exit 4
fi
