"""A file given as the wrong kind (a secret, /etc/passwd, any YAML of the controller's) is named in the error but
its content is never echoed: neither a whole file that is not a mapping, nor the values of keys rt-tune does not
know. Same class as `include: [/etc/shadow]` (issue #15 item 8), for inventories and playbooks."""

from __future__ import annotations

import subprocess
import sys

import pytest

from orchestrator.config.inventory import load_inventory
from orchestrator.config.playbook import load_measurement_plan, load_rollout_policy
from orchestrator.core.errors import InputError
from tests.conftest import REPO

pytestmark = pytest.mark.unit

SECRET = "hunter2-s3cret"
PASSWD_LIKE = f"root:x:0:0:root:/root:/bin/bash\ntuner:{SECRET}:1000:1000::/home/tuner:/bin/sh\n"
KEYS_LIKE = f"password: {SECRET}\napi_token: tok-{SECRET}\n"
LIST_LIKE = f"- {SECRET}\n- other\n"


@pytest.mark.parametrize("loader", [load_measurement_plan, load_rollout_policy, load_inventory])
@pytest.mark.parametrize("text, shape", [(PASSWD_LIKE, "a text of"), (KEYS_LIKE, "none of its 2 top-level"),
                                         (LIST_LIKE, "a list of 2 items")])
def test_a_file_of_the_wrong_kind_is_named_not_quoted(tmp_path, loader, text, shape):
    f = tmp_path / "given.yaml"
    f.write_text(text)
    with pytest.raises(InputError) as exc:
        loader(f)
    msg = str(exc.value)
    assert str(f) in msg and shape in msg
    assert SECRET not in msg


def test_ab_rounds_and_runs_are_bounded_before_anything_else():
    """--rounds 1000000000 used to build the schedule (minutes of CPU, then memory) before any check."""
    for flag, value in (("--rounds", "1000000000"), ("--runs", "100000")):
        proc = subprocess.run([sys.executable, "-m", "orchestrator", "ab", "a", "b", "--unit", "u", flag, value],
                              capture_output=True, text=True, timeout=60, cwd=REPO)
        assert proc.returncode == 2 and f"Invalid value for '{flag}'" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr + proc.stdout
