#!/usr/bin/env bash
# The main job: index an archive folder (resumable), run a composed query (image + text) at
# several λ, print the results and write a contact sheet (one row per λ).
#   bash scripts/main.sh [ARCHIVE_FOLDER]
# Model: the registry's default model, or set RSCIR_MODEL=NAME, or RSCIR_ARCH=ARCH with
# RSCIR_CHECKPOINT=FILE (a local open_clip state dict, e.g. RemoteCLIP-ViT-L-14.pt).
# Query: RSCIR_QUERY=image file (default: an image of the archive), RSCIR_TEXT=modifier.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh || exit 1
ARCHIVE="${1:-../shared/data/ucm16/images}"
OUT="${RSCIR_OUT:-runs}"
STORE="${RSCIR_STORE:-$OUT/$(basename "$(dirname "$(realpath "$ARCHIVE")")")-$(basename "$ARCHIVE").rscir}"
model_args=()
[ -n "${RSCIR_MODEL:-}" ] && model_args+=(--model "$RSCIR_MODEL")
[ -n "${RSCIR_ARCH:-}" ] && model_args+=(--arch "$RSCIR_ARCH")
[ -n "${RSCIR_CHECKPOINT:-}" ] && model_args+=(--checkpoint "$RSCIR_CHECKPOINT")
mkdir -p "$OUT"
rscir index "$ARCHIVE" --store "$STORE" "${model_args[@]}"
rscir info "$STORE"
QUERY="${RSCIR_QUERY:-$ARCHIVE/sparseresidential/sparseresidential10.jpg}"
TEXT="${RSCIR_TEXT:-dense residential area with many houses}"
query_args=(--image "$QUERY")
[ -f "$QUERY" ] || query_args=(--item-id 0)
rscir search "$STORE" "${query_args[@]}" --text "$TEXT" --lams 0,0.25,0.5,0.75,1 -k 8 \
  --sheet "$OUT/contact_sheet.png"
echo "contact sheet: $OUT/contact_sheet.png"
