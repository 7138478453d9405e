# Sourced by the Python suites' run.sh: a virtualenv with exactly the pinned packages
# of a suite, rebuilt when the pins change and reused otherwise (CI stays fast).
#
#   pinned_venv <venv dir> <requirements.txt> <constraints.txt>
pinned_venv() {
  local venv="$1" requirements="$2" constraints="$3"
  local stamp="$venv/.pins"
  if ! cat "$requirements" "$constraints" | cmp -s - "$stamp" 2>/dev/null; then
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$requirements" -c "$constraints"
    cat "$requirements" "$constraints" >"$stamp"
  fi
}
