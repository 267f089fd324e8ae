#!/usr/bin/env bash
# Builds the decoder fuzzer with clang (libFuzzer + ASan + UBSan) and runs it
# for a bounded time. Exit 77 (CTest: skipped) when no clang with libFuzzer.
#   run_fuzz.sh SOURCE_DIR WORK_DIR SECONDS
set -euo pipefail
src=$1 work=$2 secs=${3:-60}
cxx=${KVCOMP_FUZZ_CXX:-clang++}
mkdir -p "$work/corpus"
if ! command -v "$cxx" > /dev/null || ! echo 'extern "C" int LLVMFuzzerTestOneInput(const char*, long) { return 0; }' |
     "$cxx" -x c++ -fsanitize=fuzzer - -o "$work/probe" 2> /dev/null; then
  echo "SKIP: $cxx with libFuzzer not found (set KVCOMP_FUZZ_CXX)"; exit 77
fi
"$cxx" -std=c++17 -O1 -g -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all -ffp-contract=off \
  -I"$src/include" -I"$src" "$src/tests/fuzz/fuzz_decoder.cpp" "$src/src/reference.cpp" "$src/src/codebook.cpp" \
  -o "$work/fuzz_decoder"
# Seeds: one input per mode and shape (and codebook), so every path starts covered.
# Bits 6..7 of the selector: the codebook's low-bit count k.
for sel in 0 1 6 7 8 9 14 15 16 23 24 25 30 31 32 41 47 56 57 63 72 80 88 137 152 153 200 208 222 249; do
  head -c 600 /dev/urandom > "$work/corpus/seed_$sel"
  printf "\\x$(printf %02x "$sel")" | cat - "$work/corpus/seed_$sel" > "$work/corpus/s$sel" && rm "$work/corpus/seed_$sel"
done
"$work/fuzz_decoder" "$work/corpus" -max_total_time="$secs" -max_len=20000 -print_final_stats=1
