"""``revive cases list`` as an operator runs it, against a real sidecar holding a real case."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from revive.testing.cli import run_cli
from revive.testing.story import RUN, Story


async def _open_case(story: Story) -> str:
    token = await story.mint()
    await story.provider.fault("kill_grant")
    failed = await story.send_briefing(token)
    assert failed.status == 424, failed.text
    case_id: str = failed.body["case_id"]
    return case_id


async def test_lists_cases_as_a_table_and_as_json(story: Story) -> None:
    case_id = await _open_case(story)
    admin = ("--url", story.sidecar.url, "--admin-token-file", str(story.data_dir / "admin-token"))

    table = await run_cli("cases", "list", *admin)
    assert table.code == 0, table.stderr
    header, row = table.stdout.strip().splitlines()
    assert header.split() == [
        "CASE_ID", "STATE", "RUN_ID", "CONNECTION_ID", "ACTION_KEY", "PROVIDER_CODE", "UPDATED_AT"
    ]
    assert row.split()[:6] == [
        case_id, "open", RUN, "conn_microsoft_ops", "send-briefing", "AADSTS700082"
    ]

    as_json = await run_cli("cases", "list", "--json", "--state", "open", *admin)
    assert [c["case_id"] for c in json.loads(as_json.stdout)["cases"]] == [case_id]
    ready = await run_cli("cases", "list", "--state", "ready", *admin)
    assert (ready.code, ready.stdout.strip()) == (0, "no cases")
    nothing = await run_cli("cases", "list", "--at-risk", *admin)
    assert (nothing.code, nothing.stdout.strip()) == (0, "no connection is at risk")


async def test_refusals_and_unreachable_sidecars_exit_non_zero(
    story: Story, tmp_path: Path
) -> None:
    wrong = tmp_path / "wrong-token"
    await asyncio.to_thread(wrong.write_text, "not-the-admin-token-at-all\n")
    refused = await run_cli("cases", "list", "--url", story.sidecar.url,
                            "--admin-token-file", str(wrong))
    assert refused.code == 1
    assert "401 urn:revive:unauthorized" in refused.stderr
    assert "not-the-admin-token-at-all" not in refused.stderr + refused.stdout

    missing = await run_cli("cases", "list", "--url", story.sidecar.url,
                            "--admin-token-file", str(tmp_path / "absent"))
    assert missing.code == 2 and "cannot read the admin token file" in missing.stderr

    gone = await run_cli("cases", "list", "--url", "http://127.0.0.1:9",
                         "--admin-token-file", str(story.data_dir / "admin-token"))
    assert gone.code == 2 and "cannot reach" in gone.stderr

    both = await run_cli("cases", "list", "--at-risk", "--state", "open",
                         "--url", story.sidecar.url)
    assert both.code == 2
