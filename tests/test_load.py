"""Load, bounded: 8 concurrent users of a launched studio (one merging again and again, one
measuring redundancy statistics again and again, six chatting) for 20 s on a tiny family: no
errors, chats keep streaming while the heavy work runs, and each user's merges land in that
user's own session folder."""

from __future__ import annotations

import sys
from pathlib import Path

from test_studio import launch, tiny, tiny_settings  # noqa: F401  (fixtures)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


def test_eight_users_merge_and_chat_without_errors(tiny_settings):  # noqa: F811
    from load import run_load

    demo, url = launch(tiny_settings)
    try:
        report = run_load(url, users=8, seconds=20, max_new_tokens=8)
    finally:
        demo.close()
    summary = report.summary()
    assert not report.errors, report.errors[:3]
    assert report.merges >= 1 and report.statistics >= 1 and report.chats >= 20, summary
    assert summary["chats_during_heavy_work"] >= 5, "chats stalled while merges and statistics ran"
    assert summary["merge_folders_distinct"]
    sessions = {Path(out).parents[1] for out in report.merge_outputs}
    assert len(sessions) == 1 and all("sessions" in Path(out).parts for out in report.merge_outputs)
