"""What the benchmark scripts share: phantom sites on demand and the header every table starts with."""

import os
import platform
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def ensure_phantom_sites(data: Path, cases: int, seed: int = 0) -> Path:
    """Write the 6 phantom prostate sites (drawn with ``seed``) to ``data`` unless a ``sites.json`` is already there."""
    if not (data / "sites.json").is_file():
        subprocess.run([sys.executable, str(REPO / "tools" / "make_phantom_sites.py"), "--out", str(data),
                        "--cases", str(cases), "--seed", str(seed)], check=True, capture_output=True)
    return data


def header(script: str, argv=None) -> list:
    """Machine, versions and the command, as the first lines of a benchmark's output."""
    import monai
    import nvflare
    import torch

    from fedharmony.study.provenance import code_line, made_on

    args = " ".join(argv if argv is not None else sys.argv[1:])
    made = made_on()
    # the CPU's kernels and the code decide the last bits of a result: say which ones made it
    return [f"machine: {platform.machine()}, {os.cpu_count()} CPU cores ({made['cpu']}), "
            f"Python {platform.python_version()}, torch {torch.__version__}, monai {monai.__version__}, "
            f"nvflare {nvflare.__version__}",
            f"code: {code_line(made)}",
            f"command: python tools/{script} {args}".rstrip()]


