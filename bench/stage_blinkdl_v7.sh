#!/usr/bin/env bash
# Stages BlinkDL's own RWKV-7 training model and its CUDA kernels, the reference bench/rwkv7_speed.py runs beside
# ours: RWKV-v7/train_temp/src/model.py and RWKV-v7/train_temp/cuda/* of a git snapshot of BlinkDL/RWKV-LM, laid out
# as his train.py sees them (src/model.py loads "cuda/..." relative to the working directory) in .blinkdl_v7/ at the
# repository root, with the snapshot's commit in .blinkdl_v7/COMMIT. His code is not this project's: the folder is
# kept out of git (.git/info/exclude) and carried to the GPU machine as it is.
# Usage: bench/stage_blinkdl_v7.sh [MIRROR_GIT_DIR]
#   MIRROR_GIT_DIR: a bare clone of BlinkDL/RWKV-LM (default: the one fetching github:BlinkDL/RWKV-LM leaves)
set -euo pipefail
mirror=${1:-/work/.mirror/BlinkDL+RWKV-LM/repo}
root=$(cd "$(dirname "$0")/.." && pwd)
dest="$root/.blinkdl_v7"
rm -rf "$dest"
mkdir -p "$dest"
mkdir -p "$dest/src" "$dest/cuda"
# one file at a time (git archive reads the whole tree, whose large files a snapshot may lack)
kernels=$(git --git-dir="$mirror" ls-tree --name-only HEAD RWKV-v7/train_temp/cuda/ | sed 's|^RWKV-v7/train_temp/||')
for f in src/model.py $kernels; do
  git --git-dir="$mirror" show "HEAD:RWKV-v7/train_temp/$f" > "$dest/$f"
done
git --git-dir="$mirror" rev-parse HEAD > "$dest/COMMIT"
exclude=$(git -C "$root" rev-parse --git-path info/exclude)
case $exclude in /*) ;; *) exclude="$root/$exclude" ;; esac
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.blinkdl_v7/' "$exclude" 2>/dev/null || echo '/.blinkdl_v7/' >> "$exclude"
echo "staged BlinkDL/RWKV-LM $(cat "$dest/COMMIT") in $dest"
