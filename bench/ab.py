"""Is change A faster than B? Two revive trees, one host, measured in turns.

On a shared host the speed drifts by tens of percent from one minute to the next, so two
``proxy_overhead.py`` runs made minutes apart cannot tell a 10 % change from the weather. This
bench starts one upstream, the baseline proxy, and ``revive serve`` from two source trees,
then loads baseline, A, B in turn, ``--rounds`` times, and reports per round and the medians:
each target's ratio to the baseline of its own round, and B's rate over A's.

    .venv/bin/python bench/ab.py --b HEAD~1                 # A: this tree, B: a git revision
    .venv/bin/python bench/ab.py --a /path/tree --b /other  # two checked-out trees
    .venv/bin/python bench/ab.py --b HEAD~1 --method GET --rounds 9

A revision is checked out with ``git worktree add --detach`` into a temporary directory and
removed afterwards. The last stdout line is one JSON object. Exit status 0, or 1 when a target
failed to start or answered anything but 2xx.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _load  # noqa: E402  (a sibling helper; bench/ is not a package)
import proxy_overhead as po  # noqa: E402
from _load import LoadSpec  # noqa: E402

TARGETS = ("baseline", "A", "B")


@contextmanager
def source_tree(ref: str, scratch: Path) -> Iterator[Path]:
    """``ref`` as a directory: itself when it is one, else a temporary git worktree of it."""
    if Path(ref).is_dir():
        yield Path(ref).resolve()
        return
    where = scratch / f"tree-{len(list(scratch.iterdir()))}"
    subprocess.run(
        ["git", "-C", str(po.REPO), "worktree", "add", "--detach", "--quiet", str(where), ref],
        check=True,
    )
    try:
        yield where
    finally:
        subprocess.run(
            ["git", "-C", str(po.REPO), "worktree", "remove", "--force", str(where)], check=False
        )


def start_revive(stack: ExitStack, name: str, tree: Path, root: Path, upstream: str) -> po.Server:
    home = root / name
    home.mkdir()
    env = po.revive_env()
    env["PYTHONPATH"] = str(tree / "sidecar")
    config = po.revive_config(home, upstream)
    cmd = [sys.executable, "-m", "revive.cli", "serve", "--config", str(config)]
    server = po.spawn(f"revive-{name}", cmd, home, env)
    stack.callback(server.stop)
    server.ready_from_log(60)
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--a", default=str(po.REPO), help="tree or git revision (default: here)")
    parser.add_argument("--b", required=True, help="tree or git revision to compare with")
    parser.add_argument("--method", choices=("GET", "POST"), default="POST")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--duration", type=float, default=2.5, help="seconds per slice")
    parser.add_argument("--tool", choices=("auto", "wrk", "aiohttp"), default="auto",
                        help="load generator (auto: wrk when installed)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.duration <= 0 or args.connections < 1:
        po.say("--rounds, --duration and --connections must be positive")
        return 2
    tool = args.tool
    if tool == "auto":
        tool = "wrk" if _load.wrk_path() else "aiohttp"
    me = str(Path(po.__file__).resolve())
    rates: dict[str, list[float]] = {t: [] for t in TARGETS}
    failures: list[str] = []
    with ExitStack() as stack:
        root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="revive-ab-")))
        scratch = root / "trees"
        scratch.mkdir()
        trees = {n: stack.enter_context(source_tree(r, scratch)) for n, r in (("A", args.a), ("B", args.b))}
        upstream = po.spawn("upstream", [sys.executable, me, "--role", "upstream"], root)
        stack.callback(upstream.stop)
        upstream.ready_from_log(20)
        baseline = po.spawn(
            "baseline", [sys.executable, me, "--role", "baseline", "--upstream", upstream.url], root
        )
        stack.callback(baseline.stop)
        baseline.ready_from_log(20)
        bases = {"baseline": baseline.url + "/proxy/bench"}
        auth = {"baseline": f"Bearer {po.WORKER_TOKEN}"}
        for name, tree in trees.items():
            server = start_revive(stack, name, tree, root, upstream.url)
            bases[name] = server.url + "/proxy/bench"
            auth[name] = f"Bearer {po.mint_capability(server.url)}"
        path = "/bench/post" if args.method == "POST" else "/bench/get"
        for round_index in range(args.rounds):
            for target in TARGETS:
                spec = LoadSpec(
                    url=bases[target] + path, method=args.method, connections=args.connections,
                    duration_s=args.duration, warmup_s=0.3,
                    headers={"Authorization": auth[target]},
                    body_size=po.POST_BYTES if args.method == "POST" else 0,
                    unique_keys=args.method == "POST",
                )
                result = _load.run(spec, tool)
                if result.non_2xx or result.socket_errors:
                    failures.append(f"{target}: {result.non_2xx} non-2xx, "
                                    f"{result.socket_errors} socket errors")  # fmt: skip
                rates[target].append(result.rps)
            base, a, b = (rates[t][-1] for t in TARGETS)
            print(f"round {round_index + 1}: baseline {base:7.0f}  A {a:7.0f} ({a / base:.3f})"
                  f"  B {b:7.0f} ({b / base:.3f})  B/A {b / a:.3f}", flush=True)  # fmt: skip
    summary = {
        "method": args.method,
        "connections": args.connections,
        "rounds": args.rounds,
        "a_ratio_vs_baseline": round(statistics.median(
            a / base for a, base in zip(rates["A"], rates["baseline"], strict=True)), 3),
        "b_ratio_vs_baseline": round(statistics.median(
            b / base for b, base in zip(rates["B"], rates["baseline"], strict=True)), 3),
        "b_over_a": round(statistics.median(
            b / a for a, b in zip(rates["A"], rates["B"], strict=True)), 3),
    }  # fmt: skip
    print(json.dumps(summary), flush=True)
    for failure in failures:
        po.say(f"FAIL: {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
