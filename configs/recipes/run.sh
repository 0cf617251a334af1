#!/usr/bin/env bash
# Train one molecule's shipped potentials from scratch: every stage of configs/recipes/MOLECULE/
# in order, then export both files with their test errors into potentials/.
#   bash configs/recipes/run.sh MOLECULE [THREADS]
# Run from the repository root. An interrupted stage resumes (its runs/ folder has last.pt); a
# finished one (final.pt) is skipped. Each stage starts from scratch or from the best weights of
# the stage before it, never from a file in potentials/. A recipe longer than a session keeps each
# finished stage's best weights in resume/MOLECULE/ (commit that folder; runs/ is git-ignored, and a
# new session starts from a fresh clone); the folder is removed once both files are exported.
set -euo pipefail
molecule=${1:?usage: bash configs/recipes/run.sh MOLECULE [THREADS]}
threads=${2:-2}
recipe=configs/recipes/$molecule
[ -d "$recipe" ] || { echo "run.sh: no recipe folder $recipe" >&2; exit 2; }
case $molecule in
  aspirin) stages="fp32 fp32_energy fp32_anneal int8" ;;
  *) stages="fp32 int8" ;;
esac
for stage in $stages; do
  out=runs/recipes/$molecule/$stage
  [ "$stage" = int8 ] || float_out=$out  # the last float stage is the shipped float file
  kept=resume/$molecule/$stage.pt
  if [ -f "$kept" ] && [ ! -f "$out/final.pt" ]; then  # finished in an earlier session
    mkdir -p "$out" && cp "$kept" "$out/best.pt"
  fi
  if [ -f "$out/final.pt" ] || [ -f "$kept" ]; then echo "$out: done" >&2; continue; fi
  again=""; [ -f "$out/last.pt" ] && again="--resume"
  qeq-train "$recipe/$stage.yaml" --threads "$threads" $again
  mkdir -p "resume/$molecule" && cp "$out/best.pt" "$kept"
done
test_file=../shared/rmd17/rmd17_${molecule}_test_01.npz
qeq-export "$float_out/best.pt" "$test_file" -o "potentials/${molecule}_fp32.pt"
qeq-export "runs/recipes/$molecule/int8/best.pt" "$test_file" --int8 -o "potentials/${molecule}_int8.pt"
rm -r "resume/$molecule" && rmdir --ignore-fail-on-non-empty resume
