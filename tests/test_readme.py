"""The README documents every setting with its real default, and the commands CI runs."""

from pathlib import Path

from cluster.settings import SETTINGS

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_configuration_table_lists_every_setting_with_its_default():
    for env, flag, default, _ in SETTINGS:
        row = f"| `{env}` | `{flag}` | `{default}` |"
        assert row in README, f"README configuration table lacks or misstates {env}"


def test_ci_runs_the_readme_test_command():
    ci = (Path(__file__).resolve().parent.parent / ".ci" / "run").read_text()
    assert "scripts/test.sh" in README and "scripts/test.sh" in ci
    assert "scripts/up.sh" in README
