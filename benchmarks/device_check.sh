#!/usr/bin/env bash
# The GPU check on a machine with no network: installs this package's wheel (and transformers', when the one there
# is outside this package's range) from the wheel folder into a private site directory, then runs
# benchmarks/device_check.py with every argument given here. Building the wheel folder: see device_check.py.
#
#   benchmarks/device_check.sh OUT_DIR [device_check.py options]
#   WHEELS=.whl SITE=/tmp/hf_layerskip_site PYTHON=python3 benchmarks/device_check.sh OUT_DIR --device cpu --tiny
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${WHEELS:-.whl}
SITE=${SITE:-/tmp/hf_layerskip_site}
PYTHON=${PYTHON:-python3}
install() { "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$@"; }

install "$WHEELS"/hf_layerskip-*.whl
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
# Exit status 0 when the transformers found satisfies this package's requirement.
transformers_fits() {
    "$PYTHON" - <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, requires, version

from packaging.requirements import Requirement

wanted = next(r for r in map(Requirement, requires("hf_layerskip")) if r.name == "transformers")
try:
    found = version("transformers")
except PackageNotFoundError:
    found = None
print(f"transformers {found or 'absent'}; hf_layerskip asks for {wanted.specifier}")
sys.exit(0 if found and wanted.specifier.contains(found, prereleases=True) else 1)
PY
}
if ! transformers_fits; then
    install "$WHEELS"/transformers-*.whl
    transformers_fits
fi
exec "$PYTHON" benchmarks/device_check.py "$@"
