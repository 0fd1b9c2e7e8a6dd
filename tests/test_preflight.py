"""Before any file or download: the cost of a run, and a one-line stop where it cannot start."""

from types import SimpleNamespace

import pytest
import torch
from conftest import SMOKE, run_cli

from syntagen_st import fit as fit_mod
from syntagen_st.core.config import Config
from syntagen_st.core.hub import HUB_TIMEOUT_S
from syntagen_st.generation import preflight as pf


def _fit(capsys, args):
    code, out, err = run_cli(fit_mod.main, args, capsys)
    return code, SimpleNamespace(out=out, err=err)


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_the_design_card_command_on_a_laptop_stops_before_writing(capsys, tmp_path, no_cuda):
    out = tmp_path / "run"
    code, captured = _fit(capsys, ["--rounds", "3", "--out", str(out)])
    assert code == 2 and not out.exists()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1
    assert "no CUDA device" in lines[0] and "--config configs/smoke.yaml" in lines[0] and "--model.device cpu" in lines[0]
    assert "10,000 images of 512x512 at 50 steps" in lines[0] and "days" in lines[0]


def test_an_unreachable_or_uncached_hub_names_a_local_folder(capsys, tmp_path, monkeypatch, no_cuda):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    out = tmp_path / "run"
    code, captured = _fit(capsys, ["--rounds", "3", "--out", str(out), "--model.device", "cpu"])
    assert code == 2 and not out.exists()
    assert "HF_HUB_OFFLINE" in captured.err and "--model.pretrained PATH" in captured.err
    assert len(captured.err.strip().splitlines()) == 1

    def no_network(*args, **kwargs):
        raise ConnectionRefusedError("no route to the hub")

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", no_network)
    code, captured = _fit(capsys, ["--rounds", "3", "--out", str(out), "--model.device", "cpu"])
    assert code == 2 and not out.exists()
    assert "cannot reach the Hugging Face hub" in captured.err and "--model.pretrained PATH" in captured.err


def test_a_cached_model_on_a_named_cpu_goes_ahead_with_its_cost(monkeypatch, no_cuda):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: "/cache/model_index.json")
    cfg = Config()
    cfg.model.device = "cpu"
    line = pf.preflight(cfg, 10_000)
    assert line.startswith("plan: 10,000 images of 512x512 at 50 steps with stable-diffusion-v1-5/stable-diffusion-v1-5 on cpu")
    assert "days of generation" in line


def test_cost_estimates_scale_with_the_work():
    cpu = pf.Plan(10_000, 512, 512, 50, True, torch.device("cpu"))
    assert cpu.seconds(2) == pytest.approx(10_000 * 50 * pf.CPU_CORE_SECONDS_PER_STEP / 2)
    assert cpu.seconds(4) == pytest.approx(cpu.seconds(2) / 2)
    assert pf.Plan(10_000, 256, 256, 50, True, torch.device("cpu")).seconds(2) == pytest.approx(cpu.seconds(2) / 4)
    assert pf.Plan(10_000, 512, 512, 50, False, torch.device("cpu")).seconds(2) == pytest.approx(cpu.seconds(2) / 2)
    gpu = pf.Plan(10_000, 512, 512, 50, True, torch.device("cuda"))
    assert gpu.seconds(2) == pytest.approx(10_000 * 50 / pf.GPU_STEPS_PER_SECOND)
    assert pf.human_duration(281 * 86400) == "about 281 days"
    assert pf.human_duration(5 * 3600) == "about 5 h"
    assert pf.human_duration(30) == "under a minute"


def test_the_smoke_config_passes_without_a_network(monkeypatch):
    import huggingface_hub

    def no_network(*args, **kwargs):
        raise AssertionError("the tiny model must not touch the hub")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", no_network)
    from syntagen_st.core.cli import load_config_file

    line = pf.preflight(load_config_file(SMOKE), 36)
    assert line == "plan: 36 images of 128x128 at 4 steps with tiny on cpu"


# ---------------------------------------------------------------- the prompt-writing language model

LLM = ["--generate.prompt_source", "llm", "--generate.llm", "some-org/some-llm"]


@pytest.fixture
def llm_not_cached(monkeypatch):
    import huggingface_hub

    looked_up = []

    def lookup(repo, filename, **kwargs):
        looked_up.append((repo, filename))
        return None

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lookup)
    return looked_up


@pytest.mark.parametrize("command", ["fit", "generate", "prompts"])
def test_an_uncached_llm_offline_stops_in_one_line_before_the_run_folder(capsys, tmp_path, monkeypatch, llm_not_cached, command):
    import huggingface_hub

    from syntagen_st import generate as gen_mod
    from syntagen_st.prompts import __main__ as prompts_mod

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    out = tmp_path / "run"
    main, args = {
        "fit": (fit_mod.main, ["--config", SMOKE, "--out", str(out)]),
        "generate": (gen_mod.main, ["--config", SMOKE, "--num-images", "4", "--out", str(out)]),
        "prompts": (prompts_mod.main, ["--config", SMOKE, "--n", "2", "--out", str(out / "prompts.txt")]),
    }[command]
    code, _, err = run_cli(main, [*args, *LLM], capsys, prog=f"syntagen_st.{command}")
    assert code == 2 and not out.exists()
    assert err.strip().splitlines() == [
        f"syntagen_st.{command}: error: the language model some-org/some-llm is not in the local Hugging Face cache "
        "and HF_HUB_OFFLINE is set; pass --generate.llm PATH to use a local model folder"
    ]
    assert ("some-org/some-llm", "config.json") in llm_not_cached


def test_an_unreachable_hub_for_the_llm_is_answered_at_once(capsys, tmp_path, monkeypatch, llm_not_cached):
    import huggingface_hub

    asked = []

    def no_network(self, ref, revision=None, timeout=None, **kwargs):
        asked.append(timeout)
        raise ConnectionRefusedError("no route to the hub\nmore detail")

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", no_network)
    out = tmp_path / "run"
    code, _, err = run_cli(fit_mod.main, ["--config", SMOKE, "--out", str(out), *LLM], capsys)
    assert code == 2 and not out.exists()
    assert err.strip().splitlines() == [
        "syntagen_st.fit: error: cannot reach the Hugging Face hub for the language model some-org/some-llm "
        "(ConnectionRefusedError: no route to the hub); pass --generate.llm PATH to use a local model folder"
    ]
    assert asked == [HUB_TIMEOUT_S]  # one bounded request, no retry loop


def test_a_cached_or_local_llm_passes_without_the_hub(monkeypatch, tmp_path):
    import huggingface_hub

    from syntagen_st.core.cli import load_config_file

    def no_network(*args, **kwargs):
        raise AssertionError("a cached or local language model must not touch the hub")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", no_network)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache",
                        lambda repo, filename, **k: f"/cache/{repo}/{filename}" if repo == "some-org/cached" else None)
    cfg = load_config_file(SMOKE)
    cfg.generate.prompt_source = "llm"
    cfg.generate.llm = "some-org/cached"
    assert pf.preflight(cfg, 36) == "plan: 36 images of 128x128 at 4 steps with tiny on cpu"
    (tmp_path / "llm").mkdir()
    (tmp_path / "llm" / "config.json").write_text("{}")
    cfg.generate.llm = str(tmp_path / "llm")
    assert pf.preflight(cfg, 36) == "plan: 36 images of 128x128 at 4 steps with tiny on cpu"
    cfg.generate.llm = "some-org/not-cached"
    with pytest.raises(pf.UserError):  # the same config with an uncached hub id does ask
        pf.preflight(cfg, 36)
