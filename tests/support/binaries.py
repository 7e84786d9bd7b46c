"""Runs this checkout's binaries (trainer, local_cluster, ...) as a user would: tests, benchmarks.

One place says how: the same interpreter, `python -m <module>`, this checkout
importable (PYTHONPATH), TensorFlow's C++ logs quiet, from the repository root.
It lives in the repository (tests/support/) and is never installed, so
REPO_ROOT, two directories up from it, is always this checkout's root.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

REPO_ROOT = str(Path(__file__).resolve().parents[2])  # <root>/tests/support/binaries.py
TRAINER = 'lingvo_gpipe.trainer'
LOCAL_CLUSTER = 'lingvo_gpipe.tools.local_cluster'
STEP_MEMORY = 'lingvo_gpipe.tools.step_memory'


def Env(**extra: str) -> dict[str, str]:
  """The environment a binary under test runs in, plus `extra`."""
  env = dict(os.environ, PYTHONPATH=REPO_ROOT)
  env.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  env.update(extra)
  return env


def Command(module: str, *flags: str) -> list[str]:
  return [sys.executable, '-m', module, *flags]


def Start(module: str, *flags: str, **popen_kwargs) -> subprocess.Popen:
  """Starts `python -m module flags...`; the caller waits for it and stops it."""
  return subprocess.Popen(Command(module, *flags), cwd=REPO_ROOT, env=Env(),
                          **popen_kwargs)


def Run(module: str, *flags: str, timeout: Optional[float] = 300,
        **env: str) -> subprocess.CompletedProcess:
  """Runs `python -m module flags...` to the end (text stdout and stderr kept)."""
  return subprocess.run(Command(module, *flags), cwd=REPO_ROOT, env=Env(**env),
                        capture_output=True, text=True, timeout=timeout,
                        check=False)


def RunPython(code: str, timeout: Optional[float] = 60) -> subprocess.CompletedProcess:
  """Runs `python -c code` as Run runs a binary (text stdout and stderr kept)."""
  return subprocess.run([sys.executable, '-c', code], cwd=REPO_ROOT, env=Env(),
                        capture_output=True, text=True, timeout=timeout,
                        check=False)


def StepMemory(*flags: str, timeout: Optional[float] = 300) -> dict:
  """step_memory's measurement (peak_bytes, ...) of one step, in a process of its own.

  Raises:
    RuntimeError: the tool failed; its stderr's end says why.
  """
  result = Run(STEP_MEMORY, *flags, timeout=timeout)
  if result.returncode:
    raise RuntimeError(f'{STEP_MEMORY} {" ".join(flags)} exited with '
                       f'{result.returncode}:\n{result.stderr[-3000:]}')
  return json.loads(result.stdout.strip().splitlines()[-1])
