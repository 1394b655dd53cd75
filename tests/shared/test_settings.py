"""settings.py: bad values stop start-up, and docs/settings.md documents every knob."""
import json
import os
import re
import subprocess
import sys

import pytest

import settings
from conftest import ROOT, free_port


@pytest.mark.parametrize("name, value", [("BATCH_SIZE", "0"), ("BATCH_SIZE", "many"),
                                         ("PORT", "70000"), ("REQUEST_TIMEOUT_S", "-1"),
                                         ("PREPROCESS", "magic"), ("ALLOWED_FORMATS", "JPG"),
                                         ("ALLOWED_FORMATS", " , "),
                                         ("REDIS_URL", "localhost:6379"),
                                         ("REDIS_URL", "redis+cluster://127.0.0.1:٦٣٧٩"),
                                         ("REDIS_URL", "redis+sentinel://127.0.0.1:26379/m/١"),
                                         ("DECODE_BUDGET_BYTES", "1000"),
                                         ("MAX_IMAGES_PER_REQUEST", "1001"),
                                         # Values sent in headers: printable Latin-1 only.
                                         ("MODEL_VERSION", "v2\u2013rc"),
                                         ("INSTANCE_NAME", "web\x7f1")])
def test_bad_setting_stops_start_up_naming_the_variable(name, value):
    env = {**os.environ, name: value}
    result = subprocess.run([sys.executable, "-c", "import settings"], cwd=ROOT, env=env,
                            capture_output=True, text=True)
    assert result.returncode != 0
    assert f"SettingsError: {name}=" in result.stderr


def test_the_default_formats_are_pillows_own():
    """ALLOWED_FORMATS is checked against Pillow only when set (see settings.py): its default
    must be formats every Pillow opens."""
    assert set(settings.ALLOWED_FORMATS) <= set(settings.pillow_formats())


def test_the_settings_reference_lists_every_setting_with_its_default():
    """docs/settings.md's table against settings.py: the same names, and each default that the
    table gives as a value (not a description such as `host name`) is the one a process gets."""
    rows = re.findall(r"^\| `([A-Z][A-Z0-9_]*)` \| `([^`]*)` \|", (ROOT / "docs" / "settings.md")
                      .read_text(), re.M)
    knobs = {name for name, value in vars(settings).items()
             if name.isupper() and isinstance(value, (str, int, float, list))}
    assert knobs == {name for name, _ in rows}
    env = {name: value for name, value in os.environ.items() if name not in knobs}
    defaults = json.loads(subprocess.run(
        [sys.executable, "-c", "import json, settings; print(json.dumps({name: getattr(settings, "
         f"name) for name in {sorted(knobs)!r}}}))"], cwd=ROOT, env=env, capture_output=True,
        text=True, check=True).stdout)
    checked = 0
    for name, shown in rows:
        value = defaults[name]
        if isinstance(value, list):
            value = ",".join(value)
        if shown == "(empty)":
            shown = ""
        shown = os.path.expanduser(shown)
        try:
            shown = type(value)(shown.replace("_", "")) if not isinstance(value, str) else shown
        except ValueError:
            continue  # a description of a computed default
        if isinstance(value, str) and " " in shown:
            continue
        assert shown == value, f"{name}: the docs say {shown!r}, settings.py gives {value!r}"
        checked += 1
    assert checked >= len(rows) - 4


def test_a_web_tier_knob_stops_the_web_tier_but_not_a_model_worker_sharing_its_settings():
    env = {**os.environ, "WEB_CONNECTIONS": "500"}  # x 2 processes: not above the queue's 1000
    web = subprocess.run([sys.executable, "-c", "import settings; settings.check_web_tier()"],
                         cwd=ROOT, env=env, capture_output=True, text=True)
    assert web.returncode != 0 and "SettingsError: WEB_CONNECTIONS=500" in web.stderr
    model = subprocess.run([sys.executable, "-c", "import settings"], cwd=ROOT, env=env,
                           capture_output=True, text=True)
    assert model.returncode == 0, model.stderr


def test_no_command_but_the_web_tier_builds_the_app_or_connects_at_import():
    """Importing the entry point (as every command does) builds no Flask app and dials no Redis:
    a Redis Cluster that does not answer yet would hold the import for a minute, then fail."""
    env = {**os.environ, "REDIS_URL": f"redis+cluster://127.0.0.1:{free_port()}"}
    done = subprocess.run([sys.executable, "-c", "import run_keras_server as r; "
                           "assert not hasattr(r, 'app')"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
