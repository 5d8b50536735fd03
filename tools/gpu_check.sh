#!/usr/bin/env bash
# The GPU check (`make gpu-check`): on a machine with one CUDA GPU (Transformer Engine installed,
# as in the Dockerfile's image), in under 10 minutes, into one log:
#   1. the machine: nvidia-smi, torch / Transformer Engine / Megatron-Core versions;
#   2. pytest -m gpu tests/gpu: TE spec == local spec, an FP8 step, no host-device sync in a
#      micro-batch, validation decoding of a TE model, fused kernels and DDP settings, recompute;
#   3. salm bench: a 1B-class SALM and BESTOW step (Llama 3.2 1B shape, FastConformer large,
#      8 x 10 s) in bf16 with TFLOP/s and MFU;
#   4. salm bench-decode in bf16 (greedy with and without the KV cache, beam search);
#   5. salm bench-train in bf16 on the same shape: naive padding, bucketing, packing and the
#      Hugging Face baseline, one after another (one model in memory), MFU against the bf16 peak.
# Every part runs even when an earlier one fails; the exit status is 1 if any failed.
#
#   tools/gpu_check.sh [LOG]     (default gpu-check.log; PY=... picks the interpreter)
set -u -o pipefail
LOG=${1:-gpu-check.log}
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
MODEL=(llm.preset=llama3.2-1b encoder.preset=fastconformer-large)
failed=()

part() {  # part NAME SECONDS COMMAND...: run it under a time limit, note a failure
  local name=$1 limit=$2
  shift 2
  echo "== $name ($(date -u +%H:%M:%S), limit ${limit} s): $*"
  local start=$SECONDS
  timeout "$limit" "$@"
  local status=$?
  echo "== $name: exit $status after $((SECONDS - start)) s"
  [ "$status" = 0 ] || failed+=("$name")
}

exec > >(tee "$LOG") 2>&1
part machine 30 bash -c 'nvidia-smi; '"$PY"' -c "
import torch, megatron.core
print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.get_device_name())
print(\"megatron-core\", megatron.core.__version__)
try:
    import transformer_engine
    print(\"transformer-engine\", transformer_engine.__version__)
except ImportError:
    print(\"transformer-engine: not installed (the TE and FP8 tests skip)\")
"'
part gpu-tests 240 "$PY" -m pytest -m gpu tests/gpu -q -rs -p no:cacheprovider
part bench 120 "$PY" -m salm_megatron.cli bench "${MODEL[@]}" --dtype bf16 --batch 8 \
  --seconds 10 --warmup 2 --repeats 5
part bench-decode 90 "$PY" -m salm_megatron.cli bench-decode "${MODEL[@]}" --dtype bf16 \
  --batch 8 --seconds 10 --new-tokens 32 --beam-size 4
part bench-train 120 "$PY" -m salm_megatron.cli bench-train "${MODEL[@]}" --dtype bf16 \
  --samples 64 --batch 8 --sequential
if [ ${#failed[@]} -gt 0 ]; then
  echo "== gpu check: FAILED: ${failed[*]} (log: $LOG)"
  exit 1
fi
echo "== gpu check: all parts passed (log: $LOG)"
