"""Market data beside the readings: DER groups, plans, external series (JEPX prices, weather), settlement.

These are the hub's own data, not readings: they live in the state file (``hub.sqlite3``, ``data.py``) whatever
the readings backend is. ``jepx.py`` and ``weather.py`` read the files and API answers into series, ``plans.py``
checks uploaded plans, ``groups.py`` lets a group stand for its DERs in a query, ``settle.py`` lines actuals
(the extraction's own 30-minute slot computation) up with plans, prices and weather, ``fetch.py`` fetches
weather on a schedule, ``commands.py`` is ``hubd group|plan|series``.
"""
