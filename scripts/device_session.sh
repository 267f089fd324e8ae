#!/usr/bin/env bash
# On the GPU machine: build once, then run the stages named in $STAGES
# (default: all), each logging to $OUT/<stage>.log and printing a summary.
#   test     ctest (CPU + GPU + Python), -j4
#   example  build/examples/llama_generate, tokenizer vs Hugging Face tokenizers
#   hf       python/tests/test_hf_gpu.py (generate() through kvcomp.hf)
#   ppl      bench/perplexity.py ($PPL_ARGS), table + plot + json
#   san      compute-sanitizer memcheck, racecheck, synccheck over the GPU tests ($SAN_FILTER)
#   bench    bench_attention ($BENCH_FILTER) + sdpa_anchor.py in the same session, report
set -uo pipefail
OUT=${OUT:-/tmp/kvcomp_out}; mkdir -p "$OUT"
STAGES=${STAGES:-"test example hf ppl"}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/build/python
t0=$(date +%s)
say() { echo "[$(( $(date +%s) - t0 ))s] $*"; }
cmake -B build -G Ninja -DCMAKE_BUILD_TYPE=Release ${CMAKE_ARGS:-} > "$OUT/configure.log" 2>&1 || { tail -30 "$OUT/configure.log"; exit 1; }
cmake --build build ${BUILD_TARGETS:+--target $BUILD_TARGETS} > "$OUT/build.log" 2>&1 || { grep -B2 -A12 -m5 "error" "$OUT/build.log"; exit 1; }
say "built"
for stage in $STAGES; do
  case $stage in
    test)
      ctest --test-dir build --output-on-failure -j4 ${CTEST_ARGS:--E fuzz} > "$OUT/ctest.log" 2>&1; say "ctest rc=$?"
      grep -E "tests passed|Failed|\*\*\*|Not Run|Skipped" "$OUT/ctest.log" | tail -15 ;;
    example)
      ./build/examples/llama_generate ${EXAMPLE_ARGS:-} > "$OUT/example.log" 2>&1; say "llama_generate rc=$?"
      cat "$OUT/example.log" | head -40
      python3 - > "$OUT/tokenizer.log" 2>&1 <<'EOF'
import subprocess
from tokenizers import Tokenizer
tok = Tokenizer.from_file("models/tiny-llama-hd64/tokenizer.json")
texts = ["It was a dark and stormy night, and", "Hello,  world!\n\nThe 1990s weren't \"bad\"; it's 3.14 -- ok?",
         open("examples/data/eval_excerpt.txt").read()[:20000]]
bad = 0
for t in texts:
    ref = tok.encode(t).ids
    got = [int(x) for x in subprocess.run(["build/examples/llama_generate", "--tokenize", t], capture_output=True,
                                          text=True).stdout.split()]
    same = ref == got
    bad += not same
    print(f"{len(ref)} tokens, identical: {same}")
    if not same:
        i = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), min(len(ref), len(got)))
        print("  first difference at", i, ref[i:i + 8], got[i:i + 8])
print("tokenizer mismatches:", bad)
EOF
      say "tokenizer check"; cat "$OUT/tokenizer.log" ;;
    hf)
      python3 -m unittest -v python/tests/test_hf_gpu.py > "$OUT/hf.log" 2>&1; say "hf tests rc=$?"; tail -25 "$OUT/hf.log" ;;
    ppl)
      eval python3 bench/perplexity.py --json "$OUT/ppl.json" --plot "$OUT/perplexity.png" ${PPL_ARGS:-} > "$OUT/ppl.log" 2>&1
      say "perplexity rc=$?"; cat "$OUT/ppl.log" | tail -60 ;;
    san)
      for tool in memcheck racecheck synccheck; do
        compute-sanitizer --tool $tool --error-exitcode 9 build/tests/kvcomp_gpu_tests \
          --gtest_filter="${SAN_FILTER:-*-*LongContext*:SoakGpu.*:*AllocationFailure*}" > "$OUT/sanitizer_$tool.log" 2>&1
        say "sanitizer $tool rc=$?"; grep -E "ERROR SUMMARY|PASSED|FAILED" "$OUT/sanitizer_$tool.log" | tail -3
      done ;;
    bench)
      build/bench/bench_attention --benchmark_filter="${BENCH_FILTER:-.}" --benchmark_out="$OUT/attention.json" \
        --benchmark_out_format=json > "$OUT/bench.log" 2>&1; say "bench_attention rc=$?"
      python3 bench/sdpa_anchor.py --json "$OUT/sdpa.json" > "$OUT/sdpa.log" 2>&1; say "sdpa rc=$?"
      python3 bench/report.py "$OUT/attention.json" "$OUT/sdpa.json" --plot "$OUT/attention.png" > "$OUT/report.md" 2>&1; cat "$OUT/report.md" ;;
  esac
done
say "done"
