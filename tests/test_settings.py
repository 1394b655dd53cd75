"""settings.py: bad values stop start-up, and the README documents every knob."""
import os
import re
import subprocess
import sys

import pytest

import settings
from conftest import ROOT


@pytest.mark.parametrize("name, value", [("BATCH_SIZE", "0"), ("BATCH_SIZE", "many"),
                                         ("PORT", "70000"), ("REQUEST_TIMEOUT_S", "-1"),
                                         ("PREPROCESS", "magic"), ("ALLOWED_FORMATS", "JPG"),
                                         ("ALLOWED_FORMATS", " , "),
                                         ("REDIS_URL", "localhost:6379"),
                                         ("REDIS_URL", "redis+cluster://127.0.0.1:٦٣٧٩"),
                                         ("REDIS_URL", "redis+sentinel://127.0.0.1:26379/m/١"),
                                         ("WEB_CONNECTIONS", "500"),
                                         ("DECODE_BUDGET_BYTES", "1000"),
                                         ("MAX_IMAGES_PER_REQUEST", "1001")])
def test_bad_setting_stops_start_up_naming_the_variable(name, value):
    env = {**os.environ, name: value}
    result = subprocess.run([sys.executable, "-c", "import settings"], cwd=ROOT, env=env,
                            capture_output=True, text=True)
    assert result.returncode != 0
    assert f"SettingsError: {name}=" in result.stderr


def test_readme_settings_table_lists_every_setting():
    documented = set(re.findall(r"^\| `([A-Z][A-Z0-9_]*)` \|", (ROOT / "README.md").read_text(),
                                re.M))
    knobs = {name for name, value in vars(settings).items()
             if name.isupper() and isinstance(value, (str, int, float, list))}
    assert knobs == documented
