"""A reference model server for drills and tests: kserve ModelServer serving a registry model.

`faults` (pure: which request is delayed, failed or stalled) and `inference` (numpy in,
outputs out) are importable without kserve; `server` wires them into kserve.
"""
