"""List changes as the CLI and the console make them: validated, pseudonymised like the events, and audited."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import ValidationError

from models.errors import RiskwatchError
from models.lists import ListAudit, ListChange

Via = Literal["cli", "console"]
Action = Literal["add", "remove", "import"]


def make_change(name: str, kind: str, value: str, counterparty: str | None, note: str | None, by: str,
                via: Via = "cli", pseudonymise_key: str | None = None) -> ListChange:
    """A validated list entry, its ids pseudonymised when the worker pseudonymises (so they match).

    The key defaults to RISKWATCH_PSEUDONYMISE_KEY, the one the workers use.
    """
    try:
        change = ListChange(list=name, kind=kind, value=value, counterparty=counterparty,  # type: ignore[arg-type]
                            note=note or None, by=by, via=via)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        field = ".".join(str(p) for p in err["loc"]) or "entry"
        raise RiskwatchError(f"{field}: {str(err['msg']).removeprefix('Value error, ')}") from None
    p = _pseudonymiser(pseudonymise_key)
    if p is None:
        return change
    return change.model_copy(update={"value": p.pseudonym(change.value),
                                     "counterparty": p.pseudonym(change.counterparty) if change.counterparty else None})


def audit_of(changes: list[ListChange], action: Action, by: str, via: Via, source: str | None = None) -> ListAudit:
    """The one risk.audit record of a change (an import: one record with the count, not one per entry)."""
    first = changes[0]
    one = len(changes) == 1 and action != "import"
    return ListAudit(audit_id=uuid.uuid4().hex[:24], action=action, list=first.list, entry_kind=first.kind,
                     value=first.value if one else None, counterparty=first.counterparty if one else None,
                     note=first.note if one and action == "add" else None, count=len(changes), source=source,
                     by=by, via=via, ts=datetime.now(UTC))


def _pseudonymiser(key: str | None) -> Any:
    from app.security import Pseudonymiser

    if key is None:
        from app.settings import get_settings

        key = get_settings().pseudonymise_key.get_secret_value()
    return Pseudonymiser(key) if key else None


__all__ = ["Action", "Via", "audit_of", "make_change"]
