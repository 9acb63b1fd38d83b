"""From airlock's ``[lock]`` slots to our per-group policies.

airlock keeps one number per group, its slots, in its config file. Here a group's slots are the
``slots`` of its policy in etcd, next to its windows, pause, budget and cooldown. Importing writes,
for each group of the file:

- no stored policy: the default policy (always open, no cooldown, failure budget 0) with the
  file's slots;
- a stored policy with other slots (``update=True`` only): the same policy with the file's slots,
  every other field kept;
- a stored policy with the same slots: nothing.

Each write is ``locksmith.policystore.apply_policy``: one transaction with its audit entry, and
a compare on the policy key's revision, so two server replicas importing at the same moment write
once (the loser sees the winner's policy and leaves it).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from locksmith.errors import CorruptValueError
from locksmith.etcd import Etcd
from locksmith.keys import DEFAULT_PREFIX
from locksmith.policy import default_policy
from locksmith.policystore import PolicyConflictError, apply_policy, get_policy

__all__ = ["ImportResult", "import_groups"]


@dataclass(frozen=True)
class ImportResult:
    group: str
    slots: int
    action: str  # created | updated | unchanged | kept (differs, not updated) | conflict | invalid
    previous_slots: int | None
    revision: int
    note: str = ""

    def to_json(self) -> dict[str, object]:
        return {"group": self.group, "slots": self.slots, "action": self.action,
                "previous_slots": self.previous_slots, "revision": self.revision, "note": self.note}


async def import_groups(
    etcd: Etcd, groups: dict[str, int], *, prefix: str = DEFAULT_PREFIX, update: bool = True,
    dry_run: bool = False, source: str = "airlock config", by: str | None = None,
) -> list[ImportResult]:
    out: list[ImportResult] = []
    reason = f"imported from {source}"
    for group, slots in sorted(groups.items()):
        try:
            stored = await get_policy(etcd, group, prefix=prefix)
        except CorruptValueError as exc:
            out.append(ImportResult(group, slots, "invalid", None, 0, f"stored policy is invalid: {exc.problem}"))
            continue
        if stored is not None and stored.policy.slots == slots:
            out.append(ImportResult(group, slots, "unchanged", slots, stored.revision))
            continue
        if stored is not None and not update:
            out.append(ImportResult(group, slots, "kept", stored.policy.slots, stored.revision,
                                    "the stored policy wins; 'locksmithctl fleetlock import-airlock' updates it"))
            continue
        base = stored.policy if stored is not None else default_policy(group)
        policy = replace(base, slots=slots)
        action = "updated" if stored is not None else "created"
        previous = stored.policy.slots if stored is not None else None
        try:
            res = await apply_policy(etcd, policy, prefix=prefix, by=by, reason=reason, dry_run=dry_run,
                                     expect_revision=stored.revision if stored is not None else 0)
        except PolicyConflictError as exc:
            out.append(ImportResult(group, slots, "conflict", previous, exc.actual,
                                    "the policy changed meanwhile (another replica or an operator); nothing written"))
            continue
        out.append(ImportResult(group, slots, action, previous, res.revision, "dry run" if dry_run else ""))
    return out
