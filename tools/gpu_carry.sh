#!/usr/bin/env bash
# The wheels tools/gpu_check.py needs on a lent GPU machine, downloaded into .whl/ (git-ignored) for the device tool's
# `carry`; the one command that installs and runs them there is in docs/performance.md ("On a GPU: tools/gpu_check.py").
#
#     bash tools/gpu_carry.sh        # or: make gpu-carry
#
# The GPU machines (x86-64, Python 3.12, no network) hold torch, cupy, numpy, scipy, grpcio, protobuf, psutil, pyyaml,
# requests, msgpack, aiohttp, safetensors, tensorboard, matplotlib ... (/work/.library/device/KINDS.md) but not these.
# The list is what the check's processes import (traced on the CPU run: the check itself, jobs/prostate.py, the
# simulator's server and site processes, monai.bundle) less what the machines have, and the Requires-Dist of each:
#   monai, pytorch-ignite (MONAI's engines), fire + termcolor (python -m monai.bundle), nibabel (NIfTI),
#   pydicom (find_inputs' DICOM series filter checks its keywords with pydicom's dictionary, NIfTI folders too),
#   nvflare + cryptography, cffi, pycparser, pydantic, pydantic-core, annotated-types, pyhocon (what NVFlare imports),
#   typing-extensions, typing-inspection (pydantic needs >= 4.16 / 0.4.4; the machines' versions are not recorded).
# Left out: SimpleITK (53 MB, over the 64 MiB a call may carry; fedharmony imports it only for DICOM and other
# non-NIfTI inputs) and NVFlare's dashboard and docker requirements (Flask, Flask-JWT-Extended, Flask-SQLAlchemy,
# gunicorn, docker: the simulator does not import them).
# tests/test_gpu_check.py hides every one of these left-out packages from its runs.
# Versions: requirements.txt's pins, and for the rest the versions the venv resolved (pyhocon: 0.3.61, the newest
# wheel; the venv builds 0.3.63 from source).
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(monai==1.6.1 pytorch-ignite==0.5.5 fire==0.7.1 termcolor==3.3.0 nibabel==5.4.2 pydicom==3.0.2
        nvflare==2.9.0 cryptography==51.0.1 cffi==2.1.1 pycparser==3.12 pydantic==2.14.4 pydantic-core==2.50.5
        annotated-types==0.8.0 pyhocon==0.3.61 typing-extensions==4.16.0 typing-inspection==0.4.5)

rm -rf .whl
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"

# what travels: the working tree (tracked and untracked, not ignored) and .whl; the device tool allows 64 MiB
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
wheels=$(du -sb .whl | cut -f1)
ls -1 .whl
awk -v t="$tree" -v w="$wheels" 'BEGIN {
    printf "wheels %.1f MiB + working tree %.1f MiB = %.1f MiB of the 64 MiB a call may carry\n", w / 2^20, t / 2^20, (t + w) / 2^20
    if (t + w > 64 * 2^20) { print "too large for one call"; exit 1 } }'
