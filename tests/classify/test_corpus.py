"""Every real provider answer in the corpus gets its expected class and provider code."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from revive.classify import Policy, load_policies

ROOT = Path(__file__).parents[2]
CORPUS = [
    json.loads(line)
    for line in (ROOT / "tests" / "corpus" / "providers.jsonl").read_text("utf-8").splitlines()
    if line.strip()
]


@pytest.fixture(scope="module")
def policies() -> dict[str, Policy]:
    return load_policies(ROOT / "policies")


def test_corpus_is_complete() -> None:
    assert len(CORPUS) == 73
    assert len({case["id"] for case in CORPUS}) == len(CORPUS)


@pytest.mark.parametrize("case", CORPUS, ids=[c["id"] for c in CORPUS])
def test_case(case: dict[str, Any], policies: dict[str, Policy]) -> None:
    policy = policies[case["provider"]]
    verdict = policy.classify(case["phase"], case["status"], case["headers"], case["body"])
    assert verdict.failure_class == case["expected_class"], verdict
    if case["provider_code"] is not None:
        assert (verdict.provider_code or "").lower() == case["provider_code"].lower(), verdict
    assert verdict.rule != "default", "the corpus should be decided by a rule"


@pytest.mark.parametrize("case", CORPUS, ids=[c["id"] for c in CORPUS])
def test_case_as_bytes_with_upper_case_headers(
    case: dict[str, Any], policies: dict[str, Policy]
) -> None:
    """The proxy hands over raw bytes and headers in whatever case the wire had."""
    headers = {k.upper(): v for k, v in case["headers"].items()}
    body = case["body"].encode("utf-8") if case["body"] is not None else None
    verdict = policies[case["provider"]].classify(case["phase"], case["status"], headers, body)
    assert verdict.failure_class == case["expected_class"]
