"""dinoscale.cpu_malloc: after keep_freed_memory, repeated large tensors reuse memory instead of faulting."""

import platform
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")

# Twenty 8 MB tensors made and all freed again, round after round, as a step's saved activations are;
# prints whether the setting took effect and the minor page faults of the last 5 rounds.
SCRIPT = """
import resource, torch
from dinoscale.cpu_malloc import keep_freed_memory
applied = keep_freed_memory()
assert keep_freed_memory() is applied  # idempotent
def step():
    saved = [torch.ones(2_000_000) for _ in range(20)]
    del saved
for _ in range(4):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _run(env_value):
    env = {"DINOSCALE_KEEP_MALLOC": env_value, "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}  # this checkout's dinoscale, installed or not
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=120,
                         check=True)
    applied, faults = out.stdout.split()
    return applied == "True", int(faults)


def test_freed_memory_is_reused_without_page_faults():
    # Without the setting, glibc trims the heap after each round in most address-space layouts (ASLR picks
    # one per process; seen: ~39,000 faults per round, ~195,000 over the 5), so three processes are run.
    for _ in range(3):
        applied, faults = _run("1")
        assert applied
        assert faults < 500, faults


def test_environment_variable_turns_it_off():
    applied, _faults = _run("0")
    assert not applied
