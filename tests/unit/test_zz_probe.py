from __future__ import annotations
import pytest
from tasks_app import worker
from tasks_app.errors import PermanentError
from tasks_app.handlers import registry
from tests.unit._helpers import make_task

pytestmark = pytest.mark.django_db

def h(c, p):
    raise PermanentError("bad\x00byte")

def test_probe():
    registry.register("PROBE_ERR", schema={"type": "object"})(h)
    t = make_task(type="PROBE_ERR")
    try:
        print(worker.run(str(t.id), timeout_s=30))
    except BaseException as e:
        print("RAISED", type(e), e)
        raise
