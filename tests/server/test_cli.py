"""``e3rl serve``: flags, environment, the bundled-model default, and a real process."""

from __future__ import annotations

import signal

import httpx
import pytest

from e3rl.server import cli, runner, settings as settings_module

from .conftest import start_serve_process


@pytest.fixture()
def captured(monkeypatch):
    """Run ``e3rl serve`` without serving: capture the app and settings it would serve."""
    calls = []
    monkeypatch.setattr(runner, "run_app", lambda app, settings: calls.append((app, settings)))
    return calls


def test_flags_beat_env_and_env_beats_defaults(monkeypatch, captured, tiny_model):
    monkeypatch.setenv("E3RL_PORT", "9001")
    monkeypatch.setenv("E3RL_MAX_NUM_SEQS", "5")
    monkeypatch.setenv("E3RL_API_KEY", "k")
    assert cli.main(["serve", "--model", str(tiny_model), "--port", "9002",
                     "--served-model-name", "m", "--kv-cache-memory-gb", "0.25"]) == 0
    [(app, s)] = captured
    assert s is app.state.settings
    assert (s.host, s.port) == ("127.0.0.1", 9002)
    assert s.max_num_seqs == 5 and s.api_key.get_secret_value() == "k"
    assert s.model_name == "m" and s.kv_cache_memory_gb == 0.25
    config = s.engine_config()
    assert config.max_num_seqs == 5 and config.served_model_name == "m"
    assert config.num_threads >= 1


def test_store_and_admin_flags(monkeypatch, captured, tiny_model, tmp_path):
    monkeypatch.setenv("E3RL_ADMIN_KEY", "adm")
    assert cli.main(["serve", "--model", str(tiny_model), "--data-dir", str(tmp_path),
                     "--store", "erasures", "--store-retention-rows", "100",
                     "--store-retention-age-s", "3600", "--store-max-rows", "1000",
                     "--store-max-queue", "50",
                     "--store-wait-s", "2", "--store-synchronous", "NORMAL",
                     "--checkpoint-dir", str(tmp_path / "ckpts")]) == 0
    s = captured[0][0].state.settings
    assert s.store_path == tmp_path / "trajectories.sqlite3" and s.store == "erasures"
    assert (s.store_retention_rows, s.store_retention_age_s) == (100, 3600.0)
    assert s.store_max_rows == 1000
    assert (s.store_max_queue, s.store_wait_s, s.store_synchronous) == (50, 2.0, "NORMAL")
    assert s.admin_key.get_secret_value() == "adm" and s.checkpoint_dir == tmp_path / "ckpts"


def test_healing_defaults_from_flag_and_env(monkeypatch, captured, capsys, tiny_model):
    assert cli.main(["serve", "--model", str(tiny_model), "--healing",
                     '{"enabled": true, "kappa": 1.5}']) == 0
    assert captured[-1][0].state.settings.healing == {"enabled": True, "kappa": 1.5}
    monkeypatch.setenv("E3RL_HEALING", '{"enabled": true, "quantile": 0.9}')
    assert cli.main(["serve", "--model", str(tiny_model)]) == 0
    assert captured[-1][0].state.settings.healing == {"enabled": True, "quantile": 0.9}
    with pytest.raises(SystemExit) as info:
        cli.main(["serve", "--model", str(tiny_model), "--healing", '{"kappa": -1}'])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "kappa" in err


def test_bad_store_mode_is_one_clear_line(captured, capsys, tiny_model):
    with pytest.raises(SystemExit) as info:
        cli.main(["serve", "--model", str(tiny_model), "--store", "some"])
    assert info.value.code == 2 and not captured
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("e3rl: error: --store:")


def test_missing_bundled_model_is_one_clear_line(monkeypatch, captured, capsys, tmp_path):
    monkeypatch.delenv("E3RL_MODEL", raising=False)
    monkeypatch.setattr(settings_module, "DEFAULT_MODEL_PATH", tmp_path / "arith-chain")
    with pytest.raises(SystemExit) as info:
        cli.main(["serve"])
    assert info.value.code == 2 and not captured
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bundled model is missing" in err and "--model" in err


def test_default_model_path_is_the_repository_models_folder():
    s = settings_module.Settings(model=None)
    assert s.model_path == settings_module.DEFAULT_MODEL_PATH
    assert s.model_path.parts[-2:] == ("models", "arith-chain")
    assert (s.model_path.parents[1] / "pyproject.toml").is_file()


def test_bad_value_is_one_clear_line(capsys, captured, tiny_model):
    with pytest.raises(SystemExit) as info:
        cli.main(["serve", "--model", str(tiny_model), "--max-num-seqs", "0"])
    assert info.value.code == 2
    assert "--max-num-seqs" in capsys.readouterr().err


def test_help_lists_serve(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "serve" in capsys.readouterr().out


def test_serve_process_end_to_end(tiny_model, tmp_path):
    env = {"E3RL_NUM_KV_BLOCKS": "64", "E3RL_API_KEY": "k", "E3RL_DATA_DIR": str(tmp_path)}
    proc, url = start_serve_process(["--model", str(tiny_model), "--no-access-log"], env=env)
    try:
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 3},
                       headers={"Authorization": "Bearer k"}, timeout=30)
        assert r.status_code == 200 and r.json()["model"] == tiny_model.name
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "Application shutdown complete" in out


def test_prefix_caching_flag_and_env(monkeypatch, captured, tiny_model):
    assert cli.main(["serve", "--model", str(tiny_model)]) == 0
    assert captured[-1][1].engine_config().enable_prefix_caching is False  # the default
    monkeypatch.setenv("E3RL_ENABLE_PREFIX_CACHING", "true")
    assert cli.main(["serve", "--model", str(tiny_model)]) == 0
    assert captured[-1][1].engine_config().enable_prefix_caching is True
    assert cli.main(["serve", "--model", str(tiny_model), "--no-enable-prefix-caching"]) == 0
    assert captured[-1][1].enable_prefix_caching is False
    monkeypatch.delenv("E3RL_ENABLE_PREFIX_CACHING")
    assert cli.main(["serve", "--model", str(tiny_model), "--enable-prefix-caching"]) == 0
    assert captured[-1][1].enable_prefix_caching is True
