#!/usr/bin/env bash
# On the GPU machine: build, run the whole test suite, then the GPU tests
# under compute-sanitizer (memcheck, racecheck, synccheck). Logs to $OUT.
# Left out of the sanitizer runs: the soaks and long contexts (time) and the
# test that makes cudaMalloc fail on purpose (memcheck reports the API error).
set -uo pipefail
OUT=${OUT:-/tmp/kvcomp_out}; mkdir -p "$OUT"
cmake -B build -G Ninja -DCMAKE_BUILD_TYPE=Release ${CMAKE_ARGS:-} > "$OUT/configure.log" 2>&1 || { tail -30 "$OUT/configure.log"; exit 1; }
cmake --build build 2>&1 | tail -5 > "$OUT/build.log"; grep -q "error" "$OUT/build.log" && { cat "$OUT/build.log"; exit 1; }
ctest --test-dir build --output-on-failure -j4 > "$OUT/ctest.log" 2>&1; echo "ctest rc=$?"; tail -25 "$OUT/ctest.log"
if [ "${SANITIZE:-1}" = 1 ]; then
  for tool in memcheck racecheck synccheck; do
    compute-sanitizer --tool $tool --error-exitcode 9 build/tests/kvcomp_gpu_tests \
      --gtest_filter="${SAN_FILTER:-*-*LongContext*:SoakGpu.*:*AllocationFailure*}" > "$OUT/sanitizer_$tool.log" 2>&1
    echo "sanitizer $tool rc=$?"; grep -E "ERROR SUMMARY|PASSED|FAILED" "$OUT/sanitizer_$tool.log" | tail -3
  done
fi
