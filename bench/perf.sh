#!/usr/bin/env bash
# perf_analyzer sweep over the served char-RNN models. Runs INSIDE the Triton SDK container (compose service `perf`,
# nvcr.io/nvidia/tritonserver:<release>-py3-sdk puts perf_analyzer on PATH); `make perf` generates the input first.
#
#   /bench/perf.sh                         # all models, concurrency 1 2 4 ... 64
#   MODELS="charrnn_onnx" CONCURRENCY="1 8" /bench/perf.sh
#
# Input: /results/perf_input.json from `python -m bench.perf_input` (one stream per sequence: the prompt request,
# then one request per character, teacher-forced from the test split).
# Output: /results/<model>.csv (one row per concurrency; perf_analyzer's -f columns, times in microseconds) and the
# raw per-run files /results/<model>_c<N>.csv.
set -euo pipefail

MODELS=${MODELS:-"charrnn_trt charrnn_onnx charrnn_python"}
TRITON_GRPC=${TRITON_GRPC:-triton:8001}      # the compose service name; gRPC because --streaming needs it
INPUT_DATA=${INPUT_DATA:-/results/perf_input.json}
RESULTS=${RESULTS:-/results}
# Powers of two up to MAX_BATCH_SIZE (64, charrnn/contract.py): one perf_analyzer run per level, because
# --concurrency-range only steps linearly (1:64:8 would skip 64).
CONCURRENCY=${CONCURRENCY:-"1 2 4 8 16 32 64"}
MEASUREMENT_INTERVAL_MS=${MEASUREMENT_INTERVAL_MS:-5000}   # perf_analyzer's default time window
PERCENTILE=${PERCENTILE:-95}   # stability is judged on p95 latency instead of the average

if ! command -v perf_analyzer >/dev/null; then
    echo "error: perf_analyzer: not found (run this inside nvcr.io/nvidia/tritonserver:<release>-py3-sdk)" >&2
    exit 3
fi
if [[ ! -s $INPUT_DATA ]]; then
    echo "error: $INPUT_DATA: missing (run \`make perf\` or \`python -m bench.perf_input\` on the host)" >&2
    exit 2
fi

# Sequence length = number of requests in one stream (prompt + steps), read from the data itself so the two can
# never disagree. Variation 0: perf_analyzer otherwise varies lengths by +-20% and loops over the data.
if [[ -z ${SEQUENCE_LENGTH:-} ]]; then
    SEQUENCE_LENGTH=$(python3 -c 'import json, sys; print(len(json.load(open(sys.argv[1]))["data"][0]))' "$INPUT_DATA")
fi
echo "perf: models [$MODELS], concurrency [$CONCURRENCY], sequences of $SEQUENCE_LENGTH requests, server $TRITON_GRPC"

failed=()
run=0
for model in $MODELS; do
    merged="$RESULTS/$model.csv"
    rm -f "$merged"
    for c in $CONCURRENCY; do
        # A disjoint id range per run: sequences of the previous run may still hold their slot on the server until
        # the idle timeout, and reusing their ids gives "previous sequence did not end" / "must specify the START
        # flag" errors (server issues #3103, #2229).
        first=$((run * 1000000 + 1))
        last=$(((run + 1) * 1000000))
        run=$((run + 1))
        out="$RESULTS/${model}_c${c}.csv"
        echo "== $model, concurrency $c (sequence ids $first..$last)"
        if perf_analyzer -m "$model" -u "$TRITON_GRPC" -i grpc --streaming \
                --input-data "$INPUT_DATA" \
                --sequence-length "$SEQUENCE_LENGTH" --sequence-length-variation 0 \
                --sequence-id-range "$first:$((last + 1))" \
                --concurrency-range "$c:$c" \
                --measurement-interval "$MEASUREMENT_INTERVAL_MS" \
                --percentile="$PERCENTILE" \
                -f "$out"; then
            # One table per model: the header once, then each run's rows.
            if [[ ! -e $merged ]]; then head -n 1 "$out" > "$merged"; fi
            tail -n +2 "$out" | grep -v '^[[:space:]]*$' >> "$merged" || true
        else
            failed+=("$model@$c")
        fi
    done
done

if ((${#failed[@]})); then
    echo "perf: FAILED runs: ${failed[*]}" >&2
    exit 1
fi
echo "perf: results in $RESULTS/<model>.csv"
