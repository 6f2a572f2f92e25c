"""Health checks as infrastructure tests: pytest-testinfra modules run against a unit's host or guest.

rt-tune ships checks for what its kept changes promise (orchestrator/checks/shipped/); a profile adds the user's
own (`checks:` in its host or guest section). They run in a pytest process of their own (`runner.py`), whose
plugin (`plugin.py`) gives each test a testinfra `host` connected with rt-tune's SSH settings (`backend.py`),
the target's promise (`promises.py`) and the profile's variables.
"""
