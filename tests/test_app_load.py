"""The editor under load (issue 40, part 3), small enough for CI: app.py served on the tiny model,
4 clients x 3 renders through Gradio's client, the malformed calls of bench/bench_editor_load.py,
what the server listens on and which files it serves. The full load is the bench; the functions
are its own. Below them, the regression tests of what the bench found, without a server."""

import re
import time

import pytest
import torch

import app
from bench import bench_editor_load as load
from diffusion.control.prompts import align_tokens
from diffusion.editor import service
from diffusion.errors import UserError
from diffusion.sampling.pipeline import Pipeline


@pytest.fixture(scope="module")
def server(tiny_model):
    pytest.importorskip("gradio")
    with load.serve(tiny_model, threads=1, timeout=180) as server:
        yield server


def test_concurrent_clients_are_all_answered_in_queue_order(server):
    before = load.rss_mb(server.process.pid)
    # 20 steps (the bench's): each render long enough that some requests are submitted more than
    # the bench's order margin apart even on a fast machine, so the order check compares pairs
    figures = load.load_round(server.url, clients=4, renders=3, steps=20, pid=server.process.pid)
    assert figures["error examples"] == []
    assert figures["requests"] == figures["answered"] == 12 and figures["errors"] == 0
    assert figures["download errors"] == 0
    assert figures["queue order kept"] and figures["order pairs checked"] > 0
    assert figures["p95 s"] < 60
    assert figures["rss after MiB"] < before + 200  # 12 renders of a tiny model: no room for a leak


def test_malformed_calls_get_errors_and_the_server_keeps_serving(server):
    result = load.malformed_calls(server)
    wrong = [c for c in result["calls"] if c["outcome"] not in ("error", "error message", "refused")]
    assert wrong == []
    assert [c["call"] for c in result["calls"] if c["app.py traceback"]] == []
    assert all(c["seconds"] < 30 for c in result["calls"]), "a malformed call held the queue"
    assert result["renders afterwards"] and result["server alive"]


def test_the_server_listens_on_loopback_only_and_serves_only_its_own_files(server):
    bound = load.binding(server)
    assert bound["loopback only"], bound["listening"]
    assert not any(bound["reached from other addresses"].values())
    files = load.file_requests(server)
    assert files["all refused"], [path for path, refused in files["refused"].items() if not refused]
    assert files["a download it wrote is served"]


# ---- what the bench found, as unit tests ------------------------------------------------------
@pytest.mark.parametrize(
    "controls, message",
    [
        (dict(steps=float("nan")), "the number of steps must be a finite number, got nan"),
        (dict(guidance=float("inf")), "guidance must be a finite number, got inf"),
        (dict(images=float("nan")), "the number of images must be a finite number, got nan"),
        (dict(seed=float("-inf")), "the seed must be a finite number, got -inf"),
    ],
)
def test_non_finite_controls_are_a_user_error_not_a_traceback(controls, message):
    values = dict(mode="attention", context="fade", seed=0, sampler="euler", steps=20, guidance=3.0, images=1)
    with pytest.raises(UserError) as error:
        service.settings_of(**{**values, **controls})
    assert str(error.value) == message
    with pytest.raises(UserError, match="step of the maps must be a finite number"):
        service.map_step(float("nan"))
    assert service.map_step(3.7) == 3 and service.map_step(-2) == 0


def test_a_seed_past_what_torch_takes_and_a_huge_prompt_are_user_errors(tiny_model):
    editor = service.Editor(Pipeline.from_pretrained(tiny_model, device="cpu"), "model", "no")
    for seed in (2**63, 10**30):
        with pytest.raises(UserError, match="the seed must be between 0 and 2\\*\\*63 - 1"):
            editor.render("a red circle", service.Settings(seed=seed, steps=1))
    settings = service.Settings(seed=service.MAX_SEED - 3, steps=1, num_images=4)
    assert editor.render("a red circle", settings).output.images
    long = "a red circle " * 800
    with pytest.raises(UserError, match="at most 10000 characters, got 10400"):
        editor.render(long, service.Settings(steps=1))
    with pytest.raises(UserError, match="at most 10000 characters"):
        editor.swap("a red circle", long, 0.5, service.Settings(steps=1))


def test_aligning_long_repetitive_prompts_takes_linear_time():
    # difflib on every word of two 500-word prompts took 45 s (two 100 kB ones, hours); only the
    # words up to the text encoder's cut take part now, and they align as the cut prompts do
    def offsets(text: str) -> torch.Tensor:  # start token, the first 14 words, end token
        words = [(m.start(), m.end()) for m in re.finditer(r"\S+", text)][:14]
        return torch.tensor([(0, 0), *words, (0, 0)])

    source, target = "a red circle " * 3000, "a blue circle " * 3000
    start = time.perf_counter()
    mapping = align_tokens(offsets(source), source, offsets(target), target, 16)
    assert time.perf_counter() - start < 2
    cut_source, cut_target = (" ".join(text.split()[:14]) for text in (source, target))
    assert torch.equal(mapping, align_tokens(offsets(cut_source), cut_source, offsets(cut_target), cut_target, 16))
    assert mapping[:15].tolist() == list(range(15))  # word for word: red -> blue keeps its place


def test_the_number_of_kept_sessions_must_be_positive(tiny_model, capsys):
    with pytest.raises(SystemExit) as exit:
        app.main(["--model", str(tiny_model), "--sessions", "0"])
    assert exit.value.code == 2
    assert capsys.readouterr().err == "error: --sessions must be 1 or more, got 0\n"
