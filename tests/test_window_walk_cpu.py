"""The large-window backward's walk (templates/window_walk.cuh), the header itself compiled for the CPU.

Its blocks share a head's windows across mask windows, the all-zero ones as one class; a window walked twice would
double its share of dbias, one never walked would leave its gradients unwritten, and one with the wrong term would be
wrong everywhere. tests/window_walk_host.cpp walks every block of a head as the kernel does and checks each window is
walked exactly once, with its own term.
"""
from __future__ import annotations

import random
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from fwagen.reference import shifted_window_mask

TESTS = Path(__file__).parent
COMPILER = shutil.which("g++") or shutil.which("c++")
pytestmark = pytest.mark.skipif(COMPILER is None, reason="needs a C++ compiler for the host build of the header")
MASKED_FILL_WINDOWS = 2  # templates/window_walk.cuh


@pytest.fixture(scope="module")
def walker(tmp_path_factory):
    binary = tmp_path_factory.mktemp("walk") / "window_walk_host"
    subprocess.run([COMPILER, "-std=c++17", "-O1", f"-I{TESTS.parent / 'templates'}", str(TESTS / "window_walk_host.cpp"),
                    "-o", str(binary)], check=True, capture_output=True)
    return binary


def walk(walker, cases):
    """[(max load, max fills)] of each (windows, mask_windows, blocks, flags or None) case; fails on any FAIL."""
    lines = [" ".join(map(str, (w, nw, blocks, int(flags is not None), *(flags or [0] * nw))))
             for w, nw, blocks, flags in cases]
    result = subprocess.run([str(walker)], input="\n".join(lines) + "\n", capture_output=True, text=True)
    out = result.stdout.splitlines()
    assert result.returncode == 0 and len(out) == len(cases), out[-1:] or result.stderr
    return [tuple(int(x) for x in line.split()[4:]) for line in out]


def swin_flags(window, feature):
    mask = shifted_window_mask(feature, feature, window, window // 2)
    return mask.flatten(1).ne(0).any(1).int().tolist()


def test_every_window_once_with_its_term_over_random_masks(walker):
    rng = random.Random(3)
    cases = []
    for _ in range(400):
        nw, images, blocks = rng.randint(1, 80), rng.randint(1, 60), rng.randint(1, 140)
        density = rng.random()
        cases.append((nw * images, nw, blocks, [int(rng.random() < density) for _ in range(nw)]))
    cases += [(7, 1, 132, None), (3, 1, 1, None), (2048, 1, 33, None), (16, 16, 2, [1] * 16), (16, 16, 2, [0] * 16)]
    assert len(walk(walker, cases)) == len(cases)


@pytest.mark.parametrize("window, feature, windows, blocks", [(12, 96, 2048, 33), (12, 48, 640, 66), (10, 40, 2048, 33),
                                                              (12, 96, 8192, 132)])
def test_swin_masks_balance_like_no_mask(walker, window, feature, windows, blocks):
    # With Swin's shift mask (49 of 64 mask windows all zero at window 12 on a 96 x 96 map), the busiest block's load
    # stays within one masked class's fill of the load without a mask; the layout of one block per (head, mask window)
    # pair had two blocks' loads on some multiprocessors here.
    flags = swin_flags(window, feature)
    nw = len(flags)
    (masked_load, masked_fills), (plain_load, _) = walk(walker, [(windows, nw, blocks, flags),
                                                                  (windows, nw, blocks, None)])
    assert masked_fills <= 2
    assert masked_load <= plain_load + MASKED_FILL_WINDOWS + 1
    assert torch.tensor(flags).sum() < nw  # the case has all-zero mask windows to merge
