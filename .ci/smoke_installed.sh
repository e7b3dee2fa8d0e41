#!/usr/bin/env bash
# Installs unilora_rs the way users do and smoke-tests what got installed, not this
# checkout (README.md, "Install", says the same in prose):
#   1. builds the abi3 wheel (maturin build --release --features abi3) and the sdist
#      (maturin sdist);
#   2. for each: a clean venv, `pip install <file>` (numpy and safetensors with it),
#      then .ci/smoke_installed.py run from an empty folder: the numpy API and
#      `unilora merge / inspect / export-lora` on a tiny checkpoint it writes, with torch
#      not importable, and every torch command stopping with one line that says what to
#      install;
#   3. `pip install 'unilora_rs[train]'` into the same venv (the command that line
#      names) and `smoke_installed.py --train`: `unilora train` on a small CSV with a tiny
#      model it writes, then merge and inspect of the trained adapter.
# Versions are CI's pins (requirements/*.txt as constraints). The dependencies come
# from a wheelhouse ($UNILORA_WHEELHOUSE, default ~/.cache/unilora_rs/wheelhouse),
# filled from PyPI when it lacks one: pip's own cache keeps no downloads where the index
# sends no caching headers, and torch alone is gigabytes. Needs maturin and a Rust
# toolchain (the sdist compiles); run after `make build`, or as `make smoke`.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-python3}
MATURIN=${MATURIN:-$(command -v maturin || echo "$ROOT/.venv/bin/maturin")}
WHEELHOUSE=${UNILORA_WHEELHOUSE:-$HOME/.cache/unilora_rs/wheelhouse}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WHEELHOUSE" "$WORK/dist"
# The sdist's build reuses this checkout's compiled dependencies (only the two crates
# of this workspace compile again, from the unpacked sdist).
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}

step() { printf '\n== %s (%ss)\n' "$1" "$SECONDS"; }

grep -h -v -E '^[[:space:]]*(#|-|$)' requirements/*.txt > "$WORK/constraints.txt"

step "build the abi3 wheel and the sdist"
"$MATURIN" build --release --features abi3 -q -o "$WORK/dist"
"$MATURIN" sdist -o "$WORK/dist" >"$WORK/sdist.log" 2>&1 || { cat "$WORK/sdist.log"; exit 1; }
WHEEL=$(ls "$WORK"/dist/unilora_rs-*-abi3-*.whl)
SDIST=$(ls "$WORK"/dist/unilora_rs-*.tar.gz)
VERSION=$(basename "$WHEEL" | cut -d- -f2)
echo "wheel $(basename "$WHEEL"), sdist $(basename "$SDIST"), version $VERSION"

# pip install from the wheelhouse alone, at CI's pins.
from_wheelhouse() {
    "$1/bin/python" -m pip install -q --disable-pip-version-check --no-index \
        --find-links "$WHEELHOUSE" -c "$WORK/constraints.txt" "${@:2}"
}

# Downloads from PyPI into the wheelhouse what the wheel with the train extra needs, and
# maturin for the sdist's build (files already there are not downloaded again).
fill_wheelhouse() {
    "$1/bin/python" -m pip download -q --disable-pip-version-check -d "$WHEELHOUSE" \
        --find-links "$WHEELHOUSE" -c "$WORK/constraints.txt" "$WHEEL[train]" maturin
    rm -f "$WHEELHOUSE"/unilora_rs-*
}

smoke() {  # smoke NAME FILE
    local venv="$WORK/venv-$1" run="$WORK/run-$1"
    step "$1: clean venv, pip install $(basename "$2")"
    "$PYTHON" -m venv "$venv"
    from_wheelhouse "$venv" "$2" 2>/dev/null || {
        fill_wheelhouse "$venv"
        from_wheelhouse "$venv" "$2"
    }
    mkdir -p "$run/base"
    step "$1: numpy API and the torch-free commands, torch absent"
    (cd "$run/base" && "$venv/bin/python" "$ROOT/.ci/smoke_installed.py" --version "$VERSION")
    step "$1: pip install 'unilora_rs[train]', then unilora train"
    from_wheelhouse "$venv" 'unilora_rs[train]'
    mkdir -p "$run/train"
    (cd "$run/train" && "$venv/bin/python" "$ROOT/.ci/smoke_installed.py" --version "$VERSION" --train)
}

smoke wheel "$WHEEL"
smoke sdist "$SDIST"
step "smoke tests of the installed wheel and sdist passed"
