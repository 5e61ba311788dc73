#!/usr/bin/env bash
# The full acceptance matrix (every preset × architecture × exporter, then every precision), from an installed pue.
# Usage: scripts/acceptance.sh [WORKDIR] [--quick] [--no-quantize]
set -euo pipefail
WORKDIR="${1:-acceptance-out}"
shift || true
exec python "$(dirname "$0")/acceptance.py" --workdir "$WORKDIR" "$@"
