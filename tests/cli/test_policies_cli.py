"""``revive policies check`` and ``revive classify`` through the same argparse wiring as main."""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import pytest

from revive.cli import policies as policies_cli

ROOT = Path(__file__).parents[2]
POLICY_DIR = ROOT / "policies"
CORPUS = ROOT / "tests" / "corpus" / "providers.jsonl"


def run(argv: list[str]) -> int:
    """Build the parser the way revive/cli/__main__.py does and dispatch."""
    parser = argparse.ArgumentParser(prog="revive")
    sub = parser.add_subparsers(dest="command", required=True)
    policies_cli.register(sub)
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


def test_check_lists_every_policy(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["policies", "check", "--policy-dir", str(POLICY_DIR)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 15
    names = {line.split(":")[0] for line in out}
    assert {"oauth2", "microsoft", "slack", "shopify"} <= names
    ms = next(line for line in out if line.startswith("microsoft:"))
    assert "api_call rules" in ms and "token_refresh rules" in ms and "1 reconcile" in ms


def test_check_reports_bad_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "oauth2.yaml").write_text((POLICY_DIR / "oauth2.yaml").read_text())
    bad = tmp_path / "acme.yaml"
    bad.write_text("classify:\n  api_call:\n    - {id: r1, when: {body: '('}, class: ok}\n")
    assert run(["policies", "check", "--policy-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"{bad}: classify.api_call[0] (r1): ")
    assert "bad regex" in err


def test_classify_corpus_end_to_end(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["classify", "--policy-dir", str(POLICY_DIR), str(CORPUS)]) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    cases = [json.loads(line) for line in CORPUS.read_text("utf-8").splitlines() if line.strip()]
    assert [o["id"] for o in out] == [c["id"] for c in cases]  # in order, one each
    for got, case in zip(out, cases, strict=True):
        assert set(got) == {"id", "class", "provider_code"}
        assert got["class"] == case["expected_class"], case["id"]
        if case["provider_code"] is not None:
            assert (got["provider_code"] or "").lower() == case["provider_code"].lower(), case["id"]


def test_classify_stdin_malformed_lines_keep_going(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = [
        {"id": "a", "provider": "nobody-knows", "phase": "token_refresh", "status": 400,
         "headers": {}, "body": '{"error":"invalid_grant"}', "extra": 1},
        "this is not json",
        {"id": "b", "provider": "slack", "phase": "sideways", "status": 200, "headers": {}, "body": ""},
        "",
        {"id": "c", "provider": "slack", "phase": "api_call", "status": 200, "headers": {},
         "body": {"ok": False, "error": "token_revoked"}},
    ]
    text = "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(text))
    assert run(["classify", "--policy-dir", str(POLICY_DIR), "-"]) == 1
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert out[0] == {"id": "a", "class": "dead_grant", "provider_code": "invalid_grant"}
    assert out[1]["id"] is None and "line 2" in out[1]["error"]
    assert out[2]["id"] is None and "phase" in out[2]["error"]
    assert out[3] == {"id": "c", "class": "dead_grant", "provider_code": "token_revoked"}
    assert len(out) == 4


def test_classify_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["classify", "--policy-dir", str(POLICY_DIR), str(tmp_path / "nope.jsonl")]) == 1
    assert "nope.jsonl" in capsys.readouterr().err
