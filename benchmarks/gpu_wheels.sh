#!/usr/bin/env bash
# Wheels of the requirements a lent GPU machine lacks, made here (where PyPI is reachable) for benchmarks/gpu.sh
# to install there (where nothing can be fetched).
#
#   bash benchmarks/gpu_wheels.sh            # into .whl/ (ignored by git; carry it to the GPU machine)
#   bash benchmarks/gpu_wheels.sh DIR        # into DIR (its *.whl are removed first: two versions of one
#                                            # package in the folder would stop gpu.sh's install)
#
# Then, on the GPU machine, from the repository root:
#   PYTHON=python3 bash benchmarks/gpu.sh --wheels .whl --commit SHA --out DIR
#
# Which ones: the machines' image holds torch, torchvision, numpy, pillow, OpenCV, safetensors, tensorboard,
# tqdm, matplotlib, pytest, timm and transformers (and pyyaml, tabulate, portalocker, cloudpickle,
# typing-extensions) but not omegaconf, webdataset, submitit and fvcore, nor what those four need beyond it
# (braceexpand; iopath, yacs, termcolor). gpu.sh checks every requirement of setup.py before it runs anything
# (benchmarks/check_requirements.py), so a gap shows there by name. xformers is not among them: PyPI's only
# builds are for other torch/CUDA pairs than the machines' (see benchmarks/RESULTS.md).
#
# Each wheel is the version installed in this Python (the one the tests ran with) and must be pure Python
# (*-none-any.whl): a compiled one built here would not fit the GPU machine's Python 3.12. Sdists (fvcore,
# iopath) are built into wheels by pip.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python}
DIR=${1:-.whl}
PACKAGES=(omegaconf webdataset braceexpand submitit fvcore iopath yacs termcolor)

pins=()
for name in "${PACKAGES[@]}"; do
    version=$("$PYTHON" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name" 2>/dev/null) || {
        echo "gpu_wheels.sh: $name is not installed in $PYTHON; install the project first (pip install -e .)" >&2
        exit 1
    }
    pins+=("$name==$version")
done

mkdir -p "$DIR"
rm -f "$DIR"/*.whl
"$PYTHON" -m pip wheel --quiet --no-deps --wheel-dir "$DIR" "${pins[@]}"

status=0
for wheel in "$DIR"/*.whl; do
    case "$wheel" in
        *-none-any.whl) ;;
        *) echo "gpu_wheels.sh: $wheel is not pure Python; it may not load on the GPU machine" >&2; status=1 ;;
    esac
done
count=$(ls "$DIR"/*.whl | wc -l)
if [[ $count -ne ${#PACKAGES[@]} ]]; then
    echo "gpu_wheels.sh: expected ${#PACKAGES[@]} wheels in $DIR, found $count" >&2
    status=1
fi
ls -1 "$DIR"/*.whl
echo "$count wheels, $(du -sh "$DIR" | cut -f1) in $DIR (${pins[*]})"
exit $status
