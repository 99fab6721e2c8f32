"""Names the reading services show beside ids: site codes and principal names.

Read-only look-ups for the servicers, which run no SQL of their own. A site's code never changes,
so codes are cached for the life of the process; principal names are read each time.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

from sqlalchemy import Engine, select

from teleread.db.engine import reading
from teleread.db.schema import principals, sites


class Directory:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._codes: dict[int, str] = {}
        self._lock = threading.Lock()

    def site_codes(self, site_ids: Iterable[int]) -> dict[int, str]:
        wanted = set(site_ids)
        with self._lock:
            known = {i: self._codes[i] for i in wanted if i in self._codes}
        missing = wanted - set(known)
        if missing:
            with reading(self._engine) as conn:
                found = {
                    r.id: r.code for r in conn.execute(select(sites.c.id, sites.c.code).where(sites.c.id.in_(missing)))
                }
            with self._lock:
                self._codes.update(found)
            known.update(found)
        return known

    def site_code(self, site_id: int) -> str:
        return self.site_codes((site_id,)).get(site_id, "")

    def site_name(self, site_id: int) -> str:
        """The site's name as registered (read each time: a name may be corrected)."""
        with reading(self._engine) as conn:
            return str(conn.execute(select(sites.c.name).where(sites.c.id == site_id)).scalar() or "")

    def principal_names(self, ids: Iterable[int | None]) -> dict[int, str]:
        wanted = {i for i in ids if i}
        if not wanted:
            return {}
        with reading(self._engine) as conn:
            query = select(principals.c.id, principals.c.name).where(principals.c.id.in_(wanted))
            return {r.id: r.name for r in conn.execute(query)}
