"""`exit_now` (pipelines/common/ray_session.py): the entry script's code, with its buffered output."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_exit_now_keeps_the_exit_code_and_the_buffered_output():
    # stdout and stderr are pipes here: block-buffered, lost by a bare os._exit
    script = ("import logging, sys\nfrom pipelines.common.ray_session import exit_now\n"
              "logging.basicConfig(stream=sys.stderr)\nprint('summary line', end='')\n"
              "logging.getLogger('t').warning('logged')\nsys.stderr.write('last words')\nexit_now(3)\n"
              "print('not reached')\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 3
    assert done.stdout == "summary line"
    assert "logged" in done.stderr and done.stderr.endswith("last words")
