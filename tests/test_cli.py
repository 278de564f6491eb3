from __future__ import annotations

import yaml

from tests.conftest import ROOT, run_cli


def test_help_lists_every_command():
    proc = run_cli("--help")
    assert proc.returncode == 0
    for command in ("run", "validate", "inspect", "train-tokenizer", "fetch-demo"):
        assert command in proc.stdout
    run_help = run_cli("run", "--help").stdout
    assert "--ray-address" in run_help and "--output" in run_help


def test_console_script_is_installed():
    import shutil
    import sys
    from pathlib import Path

    script = Path(sys.executable).parent / "jamba-pipeline"
    assert script.exists() or shutil.which("jamba-pipeline")


def test_validate_reports_the_plan(tmp_path):
    (tmp_path / "books").mkdir()
    (tmp_path / "books" / "a.txt").write_text("some text\n")
    cfg = {"sources": [{"name": "b", "kind": "book", "paths": [str(tmp_path / "books")]}]}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    proc = run_cli("validate", str(tmp_path / "c.yaml"))
    assert proc.returncode == 0 and "OK" in proc.stdout
    assert "1 files" in proc.stdout


def test_bad_config_is_one_line_with_exit_2(tmp_path):
    (tmp_path / "c.yaml").write_text("sources:\n  - name: b\n    kind: book\n    paths: [/]\n    colour: red\n")
    proc = run_cli("run", str(tmp_path / "c.yaml"), "--output", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {tmp_path / 'c.yaml'}: sources[0].colour: unknown key"
    assert not (tmp_path / "out").exists()


def test_run_without_output_directory_is_refused(tmp_path):
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"sources": [{"name": "b", "kind": "book", "paths": ["/"]}]}))
    proc = run_cli("run", str(tmp_path / "c.yaml"))
    assert proc.returncode == 2 and "run.output: no output directory" in proc.stderr


def test_inspect_of_a_non_run_is_a_clear_error(tmp_path):
    proc = run_cli("inspect", str(tmp_path))
    assert proc.returncode == 2 and "not a finished pipeline run" in proc.stderr


def test_module_and_package_layout():
    for top in ("pipeline", "model", "train", "configs", "tests", "airflow_dags", "bench", "docs"):
        assert (ROOT / top).exists(), top
