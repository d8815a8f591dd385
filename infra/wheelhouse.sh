#!/usr/bin/env bash
# Offline wheelhouse for the lent GPU machine (Linux x86_64, CPython 3.12, torch/torchvision
# preinstalled, no package index, reachable only through a 64 MiB "carry" of ignored paths).
#
#   infra/wheelhouse.sh [gpu|full]        (or WHEELHOUSE_TIER=gpu|full; default gpu)
#   make wheelhouse [WHEELHOUSE_TIER=full]
#
# Puts every cp312 manylinux x86_64 wheel of the tier's list (infra/wheelhouse-<tier>.txt) into
# wheelhouse/<tier>/, builds the sdist-only ones (pydensecrf2) with a local Python 3.12, drops
# wheels left over from older pins, refuses torch/torchvision/nvidia-*/triton/cuda-* wheels, and
# prints the sizes. Idempotent: files already there are kept, a built wheel is not rebuilt.
# Install there, offline:
#   python3.12 -m pip install --no-index --find-links wheelhouse/<tier> -r infra/wheelhouse-<tier>.txt
#
# Environment: WHEELHOUSE_TIER, WHEELHOUSE_DIR (default <repo>/wheelhouse), PYTHON312 (a CPython
# 3.12 interpreter; default python3.12 on PATH, else the newest pyenv 3.12).
set -euo pipefail
export LC_ALL=C  # sort/join agree on order

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TIER=${1:-${WHEELHOUSE_TIER:-gpu}}
REQ=$ROOT/infra/wheelhouse-$TIER.txt
DEST=${WHEELHOUSE_DIR:-$ROOT/wheelhouse}/$TIER
CONSTRAINTS=$ROOT/constraints.txt
CARRY_LIMIT_BYTES=$((64 * 1024 * 1024))
# On PyPI as sdists only (no cp312 manylinux wheel): built here.
SDIST_ONLY=(pydensecrf2)
# Preinstalled on the GPU machine; a tier that pulls one of these is wrong.
EXCLUDED='^(torch|torchvision|triton|nvidia_.*|cuda_.*)$'

log() { printf '[wheelhouse %s] %s\n' "$TIER" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
norm() { tr 'A-Z_.' 'a-z--'; }  # PEP 503 name normalisation (applied to a name on stdin)
mib() { awk -v b="$1" 'BEGIN { printf "%.2f", b / 1048576 }'; }

case $TIER in
  gpu) resolve=(--no-deps) ;;  # complete list; numpy/pillow deliberately absent (see the file)
  full) resolve=() ;;
  *) die "unknown tier '$TIER' (gpu or full)" ;;
esac
[[ -f $REQ ]] || die "missing $REQ"

is312() { "$1" -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1; }
if [[ -z ${PYTHON312:-} ]]; then
  # python3.12 on PATH if it runs (a pyenv shim may exist without the version being selected),
  # else the newest pyenv 3.12 directly
  for candidate in "$(command -v python3.12 || true)" \
      $(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12 2>/dev/null | sort -rV); do
    if [[ -n $candidate ]] && is312 "$candidate"; then PYTHON312=$candidate; break; fi
  done
fi
[[ -n ${PYTHON312:-} ]] && is312 "$PYTHON312" \
  || die "no CPython 3.12 found; set PYTHON312=/path/to/python3.12 (pyenv install 3.12)"
log "python: $PYTHON312 ($("$PYTHON312" -c 'import platform; print(platform.python_version())'))"
log "list: ${REQ#"$ROOT"/} -> ${DEST#"$ROOT"/}"
mkdir -p "$DEST"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# name -> version for every "name==version" line of a requirements/constraints file
pins() { sed -E 's/[[:space:]]*#.*//' "$1" | grep -E '^[A-Za-z0-9]' | grep '==' \
  | sed -E 's/\[[^]]*\]//; s/[[:space:]]//g' | awk -F'==' '{print $1, $2}' \
  | while read -r n v; do echo "$(norm <<<"$n") $v"; done; }
pins "$REQ" | sort >"$work/tier.pins"
pins "$CONSTRAINTS" | sort >"$work/constraints.pins"

# The tier's own pins win over constraints.txt (gpu pins a smaller OpenCV); say where they differ.
join "$work/tier.pins" "$work/constraints.pins" | awk '$2 != $3' | while read -r n tv cv; do
  log "note: pins $n==$tv (constraints.txt: $cv)"
done
cut -d' ' -f1 "$work/tier.pins" >"$work/tier.names"
while IFS= read -r line; do
  name=$(sed -E 's/[[:space:]]*#.*//; s/[<>=!~; \[].*//' <<<"$line" | norm)
  [[ -n $name ]] && grep -qxF "$name" "$work/tier.names" && continue
  printf '%s\n' "$line"
done <"$CONSTRAINTS" >"$work/constraints.txt"

# 1. sdist-only packages: one cp312 wheel each, built with Python 3.12 (Cython comes from the
#    package's own build requirements, in pip's isolated build environment).
for pkg in "${SDIST_ONLY[@]}"; do
  version=$(awk -v n="$pkg" '$1 == n {print $2}' "$work/tier.pins")
  [[ -n $version ]] || continue  # not in this tier (each tier lists it pinned where it wants it)
  file=${pkg//-/_}
  if compgen -G "$DEST/$file-$version-cp312-cp312-*.whl" >/dev/null; then
    log "$pkg $version: cp312 wheel already built"
  else
    log "$pkg $version: building the cp312 wheel from the sdist (about a minute)"
    "$PYTHON312" -m pip wheel --no-deps --no-binary "$pkg" -w "$DEST" "$pkg==$version" \
      >"$work/build-$pkg.log" 2>&1 || { cat "$work/build-$pkg.log" >&2; die "building $pkg failed"; }
    built=$(compgen -G "$DEST/$file-$version-cp312-cp312-*.whl" | head -n 1) \
      || { cat "$work/build-$pkg.log" >&2; die "$pkg: no cp312 wheel came out of the build"; }
    log "built ${built#"$ROOT"/}"
  fi
done

# 2. everything else as binary wheels for CPython 3.12 on manylinux x86_64 (glibc <= 2.28;
#    manylinux2014 first so the smaller manylinux2014 build wins where both exist). linux_x86_64
#    only matches the wheels built in step 1 (PyPI has none with that tag).
log "downloading (pip download --only-binary=:all: ${resolve[*]:-with dependencies})"
"$PYTHON312" -m pip download "${resolve[@]}" --dest "$DEST" --find-links "$DEST" \
  --only-binary=:all: --implementation cp --python-version 3.12 --abi cp312 \
  --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --platform linux_x86_64 \
  -c "$work/constraints.txt" -r "$REQ" >"$work/download.log" 2>&1 \
  || { cat "$work/download.log" >&2; die "pip download failed"; }
sed -nE 's/^[[:space:]]*(Saved|File was already downloaded) (.*\.whl)$/\2/p' "$work/download.log" \
  | xargs -r -n 1 basename | sort -u >"$work/wanted"
log "$(grep -Ec '^[[:space:]]*Saved ' "$work/download.log" || true) downloaded, $(grep -Ec '^[[:space:]]*File was already downloaded' "$work/download.log" || true) already there"

# 3. drop what this tier no longer wants (older pins), refuse the preinstalled stacks.
for f in "$DEST"/*.whl; do
  base=$(basename "$f")
  if ! grep -qxF "$base" "$work/wanted"; then
    log "removing $base (not in the tier any more)"
    rm -f "$f"
  fi
done
bad=$(cut -d- -f1 "$work/wanted" | norm | tr - _ | grep -E "$EXCLUDED" || true)
[[ -z $bad ]] || die "the tier pulls preinstalled packages: $(tr "\n" " " <<<"$bad") - fix ${REQ#"$ROOT"/}"
find "$DEST" -maxdepth 1 -type f ! -name '*.whl' -delete

# 4. sizes
total=$(find "$DEST" -maxdepth 1 -name '*.whl' -printf '%s\n' | awk '{s += $1} END {print s + 0}')
count=$(wc -l <"$work/wanted")
find "$DEST" -maxdepth 1 -name '*.whl' -printf '%s %f\n' | sort -rn | head -n 8 \
  | while read -r size name; do log "  $(mib "$size") MiB  $name"; done
log "$count wheels, $(mib "$total") MiB ($total bytes) in ${DEST#"$ROOT"/}"
if [[ $TIER == gpu ]]; then
  tree=$({ git -C "$ROOT" ls-files -z 2>/dev/null || true; } | (cd "$ROOT" && xargs -0 -r stat -c %s 2>/dev/null || true) \
    | awk '{s += $1} END {print s + 0}')
  log "with the tracked source tree ($(mib "$tree") MiB): $(mib $((total + tree))) of the 64 MiB carry"
  ((total + tree <= CARRY_LIMIT_BYTES)) || die "does not fit the 64 MiB carry"
fi
log "install offline: python3.12 -m pip install --no-index --find-links ${DEST#"$ROOT"/} -r ${REQ#"$ROOT"/}"
