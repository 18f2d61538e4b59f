"""``bench/ab.py`` runs end to end: two revive trees and the baseline, loaded in turns."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


async def test_ab_compares_two_trees_and_ends_with_its_json_line() -> None:
    bench = await asyncio.create_subprocess_exec(
        sys.executable, str(REPO / "bench" / "ab.py"), "--a", str(REPO), "--b", str(REPO),
        "--rounds", "2", "--duration", "0.5", "--connections", "2", "--tool", "aiohttp",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(bench.communicate(), 180)
    finally:
        if bench.returncode is None:
            bench.kill()
            await bench.wait()
    assert bench.returncode == 0, stderr.decode()[-2000:]
    lines = stdout.decode().strip().splitlines()
    assert [line.split(":")[0] for line in lines[:-1]] == ["round 1", "round 2"]
    summary = json.loads(lines[-1])
    assert summary["method"] == "POST" and summary["rounds"] == 2
    for key in ("a_ratio_vs_baseline", "b_ratio_vs_baseline", "b_over_a"):
        assert summary[key] > 0, summary
