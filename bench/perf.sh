#!/usr/bin/env bash
# perf_analyzer sweep over the served char-RNN models. Runs in a container that has perf_analyzer on PATH:
# compose service `perf-slim` (bench/Dockerfile.perf, PyPI's perf-analyzer wheel; `make perf-slim`) or `perf`
# (NVIDIA's SDK image, GPU hosts; `make perf`). `make perf-input` writes the input data first.
#
#   MODELS="charrnn_onnx charrnn_python" /bench/perf.sh      # at concurrency 1 2 4 ... 64
#   PERF_MODELS="charrnn_onnx charrnn_python charrnn_gen_onnx charrnn_gen_python" make perf-slim   # on the host
#   MODELS="charrnn_python" CONCURRENCY="1 8" MEASUREMENT_INTERVAL_MS=1000 /bench/perf.sh
#
# Input (`python -m bench.perf_input`): /results/perf_input.json for the per-character models (the prompt request,
# then one request per character, teacher-forced from the test split) and /results/perf_input_gen.json for the
# generation models charrnn_gen_* (K characters per request, with NOISE, TEMPERATURE and TOP_K).
# Sequence mode for every model: one stream of the data per sequence id (START on its first request, END on its
# last), so the server's state is right whichever keeps it: the python models' model.py, or Triton's implicit
# state for the ONNX Runtime backend's charrnn_onnx / charrnn_gen_onnx (STATE_IN/STATE_OUT are not inputs a
# client sends, so their data is the python models' data).
# Output: /results/perf_<model>.csv (one row per concurrency; perf_analyzer's -f columns, times in
# microseconds), and per run /results/perf_<model>_c<N>.csv and .log (perf_analyzer's report, which has the
# server's inference and execution counts).
set -euo pipefail

# The models to measure: compose passes them (PERF_MODELS; its defaults are checked against the table of served
# models, charrnn/repository.py, by tests/test_compose.py).
MODELS=${MODELS:?set MODELS to the served models to measure, e.g. MODELS=charrnn_python}
TRITON_GRPC=${TRITON_GRPC:-triton:8001}      # the compose service; gRPC because --streaming needs it
RESULTS=${RESULTS:-/results}
# Powers of two up to MAX_BATCH_SIZE (64, charrnn/contract.py): one perf_analyzer run per level, because
# --concurrency-range only steps linearly (1:64:8 would skip 64).
CONCURRENCY=${CONCURRENCY:-"1 2 4 8 16 32 64"}
MEASUREMENT_INTERVAL_MS=${MEASUREMENT_INTERVAL_MS:-5000}   # perf_analyzer's default time window
MAX_TRIALS=${MAX_TRIALS:-10}   # windows per level before perf_analyzer gives up on a stable measurement
# Stability is judged on the average latency (perf_analyzer's default); PERCENTILE=95 judges it on p95 instead,
# which on 2 shared cores swung by more than 10% between windows at high concurrency (no stable measurement).
# The CSV reports p50/p90/p95/p99 either way.
PERCENTILE=${PERCENTILE:-}
STABILITY=${STABILITY:-10}     # % within which 3 windows must agree (perf_analyzer's default 10)

if ! command -v perf_analyzer >/dev/null; then
    echo "error: perf_analyzer: not found (run this in the perf-slim or perf compose service)" >&2
    exit 3
fi

# CPU seconds (user + system) of this shell's finished children, from bash's `times` (2nd line). It must run in
# this shell, not in a $(...) subshell, which has children of its own.
TIMES=$(mktemp)
cpu_seconds() {
    awk 'END { split($1, u, /[ms]/); split($2, s, /[ms]/); print u[1] * 60 + u[2] + s[1] * 60 + s[2] }' "$TIMES"
}

input_for() {  # the input data of a model: generation models take K characters per request
    case $1 in
        charrnn_gen_*) echo "$RESULTS/perf_input_gen.json" ;;
        *) echo "$RESULTS/perf_input.json" ;;
    esac
}
for model in $MODELS; do
    input=$(input_for "$model")
    if [[ ! -s $input ]]; then
        echo "error: $input: missing (run \`make perf-input\` on the host)" >&2
        exit 2
    fi
done
echo "perf: models [$MODELS], concurrency [$CONCURRENCY], server $TRITON_GRPC"

failed=()
run=0
for model in $MODELS; do
    input=$(input_for "$model")
    # Sequence length = number of requests in one stream, read from the data itself so the two can never
    # disagree. Variation 0: perf_analyzer otherwise varies lengths by +-20% and loops over the data.
    length=$(python3 -c 'import json, sys; print(len(json.load(open(sys.argv[1]))["data"][0]))' "$input")
    merged="$RESULTS/perf_$model.csv"
    rm -f "$merged"
    for c in $CONCURRENCY; do
        # A disjoint id range per run: sequences of the previous run may still hold their slot on the server until
        # the idle timeout, and reusing their ids gives "previous sequence did not end" / "must specify the START
        # flag" errors (server issues #3103, #2229).
        first=$((run * 1000000 + 1))
        last=$(((run + 1) * 1000000))
        run=$((run + 1))
        out="$RESULTS/perf_${model}_c${c}.csv"
        # Up to two attempts: when no measurement was stable (2 shared cores are noisy), once more with windows
        # twice as long.
        ok=0
        for window in "$MEASUREMENT_INTERVAL_MS" "$((2 * MEASUREMENT_INTERVAL_MS))"; do
            echo "== $model, concurrency $c, sequences of $length requests ($input, ids $first..$last), ${window} ms windows"
            rm -f "$out"
            times > "$TIMES"
            cpu0=$(cpu_seconds)
            t0=$(date +%s.%N)
            # perf_analyzer exits 0 without writing a row when no measurement was stable: check the CSV too.
            if perf_analyzer -m "$model" -u "$TRITON_GRPC" -i grpc --streaming \
                    --input-data "$input" \
                    --sequence-length "$length" --sequence-length-variation 0 \
                    --sequence-id-range "$first:$((last + 1))" \
                    --concurrency-range "$c:$c" \
                    --measurement-interval "$window" --max-trials "$MAX_TRIALS" \
                    ${PERCENTILE:+--percentile="$PERCENTILE"} --stability-percentage "$STABILITY" \
                    -f "$out" 2>&1 | tee "${out%.csv}.log" && [[ $(grep -c . "$out" 2>/dev/null) -ge 2 ]]; then
                ok=1
                break
            fi
            # The retry must not reuse the ids of sequences the failed attempt may have left open.
            first=$((first + 500000))
        done
        if ((ok)); then
            # What perf_analyzer itself cost on this machine (its own CPU, not the server's).
            times > "$TIMES"
            echo "perf_analyzer CPU: $(cpu_seconds) - $cpu0 s over $(date +%s.%N) - $t0 s wall" |
                awk '{ printf "perf_analyzer CPU: %.2f s over %.2f s wall (%.0f%% of one core)\n", $3 - $5, $8 - $10, 100 * ($3 - $5) / ($8 - $10) }' |
                tee -a "${out%.csv}.log"
            # One table per model: the header once, then each run's rows.
            if [[ ! -e $merged ]]; then head -n 1 "$out" > "$merged"; fi
            tail -n +2 "$out" | grep -v '^[[:space:]]*$' >> "$merged"
        else
            failed+=("$model@$c")
        fi
    done
done

if ((${#failed[@]})); then
    echo "perf: FAILED runs: ${failed[*]}" >&2
    exit 1
fi
echo "perf: results in $RESULTS/perf_<model>.csv"
