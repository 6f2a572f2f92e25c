"""How rt-tune reaches a unit: the Transport protocol, SSH, and the in-memory fake for tests."""
