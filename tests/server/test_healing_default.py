"""The server's self-healing default: sampled requests heal by default on a model directory that
ships ``e3rl_healing.json`` (with its calibrated score and quantile), greedy ones do not;
``--healing`` replaces that default for all requests; a request's own ``healing`` object
always wins; ``/v1/models`` and the startup log say which default is in force."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
from fastapi.testclient import TestClient

from e3rl.server import cli
from e3rl.server.app import create_app
from e3rl.server.healing_defaults import HealingDefaults, resolve

from .conftest import make_engine, make_settings

ADMIN = {"Authorization": "Bearer adm"}
PROMPT = "The cat sat"
# A calibration whose quantile differs from HealingParams' default (0.95): a record that
# carries 0.9 shows the calibrated options were used.
CALIBRATION = {"score": "mean_nll", "quantile": 0.9, "data": "test",
               "thresholds": {"1.00": 50.0, "0.70": 50.0}}
SAMPLED = "sampled requests (temperature > 0)"
ALL = "all requests"


@pytest.fixture(scope="module")
def calibrated_model(tmp_path_factory, tiny_model):
    """The tiny model with a healing calibration file, as ``e3rl calibrate`` writes it."""
    path = shutil.copytree(tiny_model, tmp_path_factory.mktemp("calibrated") / "model")
    (path / "e3rl_healing.json").write_text(json.dumps(CALIBRATION))
    return path


@pytest.fixture(scope="module")
def calibrated_engine(calibrated_model):
    engine = make_engine(make_settings(calibrated_model))
    yield engine
    engine.shutdown()


def client_for(model, engine, **overrides) -> TestClient:
    return TestClient(create_app(make_settings(model, admin_key="adm", **overrides),
                                 engine=engine))


def complete(client: TestClient, **body) -> tuple[dict, dict]:
    """A completion and its stored trajectory record."""
    r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 6,
                                             "ignore_eos": True, "seed": 1, **body})
    assert r.status_code == 200, r.text
    return r.json(), record(client, r.json()["id"])


def record(client: TestClient, response_id: str) -> dict:
    data = client.get("/v1/trajectories", params={"limit": 10_000}, headers=ADMIN).json()["data"]
    [rec] = [r for r in data if r["id"] == f"{response_id}-0:0"]
    return rec


def healing_card(client: TestClient) -> dict:
    [card] = client.get("/v1/models").json()["data"]
    assert client.get(f"/v1/models/{card['id']}").json()["healing"] == card["healing"]
    return card["healing"]


def heals(body: dict, rec: dict) -> bool:
    """Whether a request healed, as the response and its record say (they must agree)."""
    has_extension = "e3rl" in body["choices"][0]
    assert has_extension == (rec["healing_params"] is not None)
    return has_extension


# -- the decision ----------------------------------------------------------------------
def test_resolve_every_case(calibrated_model, tiny_model):
    calibrated = resolve(None, calibrated_model)
    assert calibrated == HealingDefaults({"enabled": True, "score": "mean_nll",
                                          "quantile": 0.9}, "calibration", sampled_only=True)
    assert calibrated.options_for(1.0)["enabled"] is True
    assert calibrated.options_for(0.0) == {"enabled": False, "score": "mean_nll",
                                           "quantile": 0.9}
    assert calibrated.describe() == {"default": "on", "source": "calibration",
                                     "applies_to": SAMPLED}
    assert resolve(None, tiny_model).describe() == {"default": "off", "source": "none",
                                                    "applies_to": ALL}
    off = resolve({"enabled": False}, calibrated_model)
    assert off.describe() == {"default": "off", "source": "--healing", "applies_to": ALL}
    assert off.options_for(1.0) == {"enabled": False}
    on = resolve({"enabled": True, "kappa": 1.0}, tiny_model)
    assert on.describe() == {"default": "on", "source": "--healing", "applies_to": ALL}
    assert on.options_for(0.0) == {"enabled": True, "kappa": 1.0}
    # Options without "enabled": off by default, as before the calibrated default existed.
    assert resolve({"kappa": 2.0}, calibrated_model).describe()["default"] == "off"


@pytest.mark.parametrize("content", [
    "{not json", json.dumps({**CALIBRATION, "score": "bogus"}),
    json.dumps({**CALIBRATION, "thresholds": {}}), json.dumps([1, 2])])
def test_an_unusable_calibration_leaves_healing_off(tmp_path, content, caplog):
    (tmp_path / "e3rl_healing.json").write_text(content)
    with caplog.at_level(logging.WARNING, logger="e3rl.server.healing_defaults"):
        assert resolve(None, tmp_path).describe()["default"] == "off"
    assert "ignoring" in caplog.text and "e3rl_healing.json" in caplog.text


# -- a calibrated model, no --healing: sampled requests heal, greedy ones do not -------------
def test_calibrated_default_heals_sampled_requests_only(calibrated_model, calibrated_engine,
                                                        caplog):
    with caplog.at_level(logging.INFO, logger="e3rl.server.app"):
        client = client_for(calibrated_model, calibrated_engine)
    assert ("self-healing by default: on for sampled requests (temperature > 0) (source: "
            "calibration)") in caplog.text
    with client:
        assert healing_card(client) == {"default": "on", "source": "calibration",
                                        "applies_to": SAMPLED}
        for temperature in (1.0, 0.7, None):  # None: OpenAI's default, 1
            body, rec = complete(client, **({} if temperature is None
                                            else {"temperature": temperature}))
            assert heals(body, rec), temperature
            params = rec["healing_params"]
            assert (params["score"], params["quantile"]) == ("mean_nll", 0.9)
            assert body["usage"]["computed_tokens"] >= body["usage"]["completion_tokens"]
        body, rec = complete(client, temperature=0)
        assert not heals(body, rec) and "computed_tokens" not in body["usage"]

        # Chat completions follow the same default (seen in the stored record).
        chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        for temperature, expected in ((1.0, True), (0.0, False)):
            r = client.post("/v1/chat/completions", json={**chat, "temperature": temperature})
            assert r.status_code == 200, r.text
            assert (record(client, r.json()["id"])["healing_params"] is not None) == expected


def test_a_requests_own_healing_object_wins_both_ways(calibrated_model, calibrated_engine):
    with client_for(calibrated_model, calibrated_engine) as client:
        body, rec = complete(client, temperature=1.0, healing={"enabled": False})
        assert not heals(body, rec)
        body, rec = complete(client, temperature=0, healing={"enabled": True})
        assert heals(body, rec)
        # A greedy request that opts in still gets the calibrated options.
        assert rec["healing_params"]["quantile"] == 0.9
        body, rec = complete(client, temperature=0, healing={"kappa": 1.5})  # no enabled: on
        assert heals(body, rec) and rec["healing_params"]["kappa"] == 1.5
        body, rec = complete(client, temperature=1.0, healing={"max_erasures": 1})
        assert heals(body, rec) and rec["healing_params"]["max_erasures"] == 1


# -- --healing replaces the default for all requests -------------------------------------
def test_healing_flag_off_turns_the_calibrated_default_off(calibrated_model,
                                                          calibrated_engine):
    with client_for(calibrated_model, calibrated_engine, healing={"enabled": False}) as client:
        assert healing_card(client) == {"default": "off", "source": "--healing",
                                        "applies_to": ALL}
        body, rec = complete(client, temperature=1.0)
        assert not heals(body, rec)
        body, rec = complete(client, temperature=1.0, healing={"enabled": True})
        assert heals(body, rec)


def test_healing_flag_on_applies_to_all_requests(calibrated_model, calibrated_engine):
    with client_for(calibrated_model, calibrated_engine,
                    healing={"enabled": True, "kappa": 3.0}) as client:
        assert healing_card(client) == {"default": "on", "source": "--healing",
                                        "applies_to": ALL}
        for temperature in (0, 1.0):
            body, rec = complete(client, temperature=temperature)
            assert heals(body, rec) and rec["healing_params"]["kappa"] == 3.0
            # The operator's options stand as given (the calibration's quantile is not
            # slipped in).
            assert rec["healing_params"]["quantile"] == 0.95


# -- no calibration file: off ---------------------------------------------------------------
def test_an_uncalibrated_model_does_not_heal_by_default(tiny_model, engine):
    with client_for(tiny_model, engine) as client:
        assert healing_card(client) == {"default": "off", "source": "none", "applies_to": ALL}
        body, rec = complete(client, temperature=1.0)
        assert not heals(body, rec)
        body, rec = complete(client, temperature=1.0, healing={"enabled": True})
        assert heals(body, rec)


# -- the command line ----------------------------------------------------------------------
@pytest.mark.parametrize("args, env, expected", [
    ([], {}, {"default": "on", "source": "calibration", "applies_to": SAMPLED}),
    (["--healing", '{"enabled": false}'], {}, {"default": "off", "source": "--healing",
                                               "applies_to": ALL}),
    ([], {"E3RL_HEALING": '{"enabled": false}'}, {"default": "off", "source": "--healing",
                                                  "applies_to": ALL}),
    (["--healing", '{"enabled": true}'], {}, {"default": "on", "source": "--healing",
                                              "applies_to": ALL}),
])
def test_serve_flags_and_env(monkeypatch, calibrated_model, args, env, expected):
    from e3rl.server import runner

    apps = []
    monkeypatch.setattr(runner, "run_app", lambda app, settings: apps.append(app))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert cli.main(["serve", "--model", str(calibrated_model), *args]) == 0
    assert apps[0].state.settings.healing_defaults().describe() == expected
