"""recipes/vlm/train.py end to end on tiny synthetic chat data, as a user runs it: the shared run's outputs, kill
and resume, the validator at start, truncation, text-only and padded training, the dry run, the align stage and
LoRA; and its config: every preset loads, bad settings fail at start. The shared run and the run a test kills are
fresh processes; the others run the script's main(argv) in this process (tests.helpers.run_recipe_in_process: the
same output and exit status, without a fresh process's imports)."""
import json
import math
import re

import pytest
import torch

from mm.checkpoint import list_checkpoints, load_checkpoint
from mm.config import ConfigError, parse_config
from mm.vlm.auto import steps_for
from tests.helpers import one_torch_thread  # noqa: F401 - a fixture
from tests.helpers import ROOT, kill_after_first_checkpoint, load_recipe, run_recipe_in_process
from tests.vlm_fixtures import trained_vlm, vlm_data  # noqa: F401 - fixtures
from tests.vlm_fixtures import TRAIN_EPOCHS, data_args, vlm_recipe_command

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PRESETS = ROOT / "recipes" / "vlm" / "configs"
STEPS = 10  # the tiny preset checkpoints every 3 steps and keeps the newest 2


def run_here(args, check=True):
    return run_recipe_in_process("vlm", args, check=check)


def step_file(out, step):
    return out / "checkpoints" / f"step_{step:08d}.pt"


def rows(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def train_rows(out) -> list[dict]:
    return [r for r in rows(out) if "loss" in r]


def question(data, line: int = 0) -> list[dict]:
    """The held-out file's line `line` without its answer."""
    return json.loads((data / "heldout.jsonl").read_text().splitlines()[line])["messages"][:-1]


def write_lines(path, lines: list) -> None:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))


def initial_model(out, tmp_path):
    """The model a run of `out` started from, with set_trainable applied: the recipe builds it again from the
    run's config.yaml, as the run did (same seed; the tokenizer trained anew in tmp_path, as the run trained
    its own: training it builds an LM, which draws from the same random numbers)."""
    recipe = load_recipe("vlm")
    cfg = parse_config(recipe.VLMConfig, [f"--config={out / 'config.yaml'}"], PRESETS)
    torch.manual_seed(cfg.seed)
    model, tokenizer = recipe.build_model(cfg, [cfg.train_data], tmp_path / "tokenizer", True)
    assert (tmp_path / "tokenizer" / "tokenizer.json").read_text() == (out / "tokenizer" / "tokenizer.json").read_text()
    recipe.set_trainable(model, cfg)
    return model


def exported_state(out) -> dict:
    from mm.vlm.model import load_vlm

    return load_vlm(out / "export")[0].state_dict()


# ---------------------------------------------------------------- end to end (the shared run)

@pytest.mark.slow
def test_end_to_end_prints_scores_and_writes_results(trained_vlm, vlm_data):
    stdout = (trained_vlm / "stdout.txt").read_text()
    results = json.loads((trained_vlm / "results.json").read_text())
    steps = results["max_steps"]
    match = re.search(r"VQA exact match (\d\.\d{4}) on 20 held-out questions; held-out loss (\d+\.\d{4})", stdout)
    assert match, stdout
    assert (float(match[1]), float(match[2])) == (round(results["vqa_acc"], 4), round(results["eval_loss"], 4))
    assert f"checkpoint: {step_file(trained_vlm, steps)}" in stdout

    assert {"vqa_acc", "vqa_n", "eval_loss", "eval_tokens", "n_epochs", "batch_size", "lr_multiplier",
            "max_steps", "bad_samples", "too_long"} <= results.keys() and "examples" not in results
    assert (results["n_epochs"], results["batch_size"], results["lr_multiplier"]) == (TRAIN_EPOCHS, 1, 2.0)
    assert (results["step"], results["vqa_n"], results["bad_samples"], results["too_long"]) == (steps, 20, 0, 0)
    assert 0 <= results["vqa_acc"] <= 1 and 0 < results["eval_loss"] < 6  # ln(400) = 6.0: it learnt something

    assert {"vlm_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= \
        {p.name for p in (trained_vlm / "export").iterdir()}
    assert [s for s, _ in list_checkpoints(trained_vlm / "checkpoints")] == [120, steps]
    train = train_rows(trained_vlm)
    assert [r["step"] for r in train] == list(range(1, steps + 1))
    assert train[-1]["epoch"] == TRAIN_EPOCHS - 1  # the steps auto counted are the epochs asked for
    assert sum(r["loss"] for r in train[-10:]) < sum(r["loss"] for r in train[:10])
    evals = [r for r in rows(trained_vlm) if "vqa_acc" in r]
    assert [(r["step"], r["vqa_acc"]) for r in evals] == [(steps, results["vqa_acc"])]


@pytest.mark.slow
def test_the_export_loads_answers_and_scores_as_reported(trained_vlm, vlm_data):
    from mm.vlm.evaluate import evaluate_vqa
    from mm.vlm.inference import VisionChat

    chat = VisionChat.from_checkpoint(trained_vlm)
    reply = chat.chat(question(vlm_data), max_new_tokens=8, image_root=str(vlm_data))
    assert isinstance(reply.text, str) and reply.completion_tokens >= 1
    results = json.loads((trained_vlm / "results.json").read_text())
    again = evaluate_vqa(chat, vlm_data / "heldout.jsonl", limit=20)
    assert (again["vqa_acc"], again["vqa_n"]) == (results["vqa_acc"], results["vqa_n"])
    final = load_checkpoint(step_file(trained_vlm, results["max_steps"]))["model"]
    exported = exported_state(trained_vlm)
    for k, v in final.items():
        torch.testing.assert_close(exported[k], v, rtol=0, atol=0, msg=k)


# ---------------------------------------------------------------- kill and resume

@pytest.mark.slow
@pytest.mark.parametrize("num_workers", [0])  # 2 workers: the loader resume is tested in test_shards and the ASR recipe
def test_killed_run_resumes_to_the_same_weights(vlm_data, tmp_path, num_workers):
    """SIGKILL a run after its first checkpoint; --resume=latest ends with the weights, scheduler, loader
    position and per-step losses of an uninterrupted run. The killed run is a real process; the others run here."""
    args = ["--config=tiny", f"--max_steps={STEPS}", f"--num_workers={num_workers}", "--eval_data=none"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    run_here([*data_args(vlm_data, full), *args])
    done = kill_after_first_checkpoint(vlm_recipe_command([*data_args(vlm_data, killed), *args]),
                                       killed / "checkpoints")
    assert done and done[-1] < STEPS, f"the run was not killed mid-way (checkpoints {done})"
    if num_workers == 0:  # an out_dir with checkpoints is not trained over by accident
        refused = run_here([*data_args(vlm_data, killed), *args], check=False)
        assert refused.returncode != 0 and "--resume=latest" in refused.stderr and "Traceback" not in refused.stderr
    resumed = run_here([*data_args(vlm_data, killed), *args, "--resume=latest"])
    assert f"resumed from {step_file(killed, done[-1])} at step {done[-1]}" in resumed.stderr

    a, b = load_checkpoint(step_file(full, STEPS)), load_checkpoint(step_file(killed, STEPS))
    assert a["data"] == b["data"] and a["data"][0]["num_workers"] == max(1, num_workers)
    assert a["scheduler"] == b["scheduler"]
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=1e-6, msg=k)
    steps = {r["step"]: r for r in train_rows(killed)}
    assert sorted(steps) == list(range(1, STEPS + 1)) and len(steps) == len(train_rows(killed))
    for r in train_rows(full):  # the same packs, step by step
        assert steps[r["step"]]["loss"] == pytest.approx(r["loss"], rel=1e-5), r["step"]


# ---------------------------------------------------------------- the data's checks

@pytest.fixture
def bad_file(vlm_data, tmp_path):
    """40 good training lines, then (41) one whose prompt alone is over --max_tokens=64, (42) not JSON, (43)
    no assistant message. Images by absolute path, so the file can live anywhere."""
    good = (vlm_data / "train.jsonl").read_text().replace('"images/', f'"{vlm_data}/images/').splitlines()[:40]
    long_prompt = "Please look very carefully at every part of this picture and then " * 6 + "name the colour."
    long = {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": f"{vlm_data}/images/train/000001.png"}},
        {"type": "text", "text": long_prompt}]}, {"role": "assistant", "content": "red"}]}
    path = tmp_path / "mixed.jsonl"
    write_lines(path, [*good, long, "this is not json", {"messages": [{"role": "user", "content": "hello"}]}])
    return path


@pytest.mark.slow
def test_bad_lines_stop_the_run_naming_them_and_the_way_on(bad_file, tmp_path):
    out = tmp_path / "run"
    proc = run_here(["--config=tiny", f"--train_data={bad_file}", "--eval_data=none", f"--out_dir={out}",
                     "--max_tokens=64"], check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "line 42: not_json" in proc.stdout and "line 43: no_assistant" in proc.stdout
    assert f"{bad_file}: 2 bad line(s), listed above" in proc.stderr and "--skip_bad_lines=true" in proc.stderr
    assert not (out / "checkpoints").exists()


@pytest.mark.slow
def test_skipped_bad_lines_and_answerless_truncations_are_counted_not_trained(bad_file, tmp_path):
    """--skip_bad_lines: lines 42-43 are skipped as bad samples; line 41, whose answer truncation to 64 tokens
    cuts off, is dropped as too_long, never trained with an empty loss. Read in file order (no shuffle buffer),
    so the counts are exact: the bad lines come last and the run stops early in the next epoch."""
    out = tmp_path / "run"
    run_here(["--config=tiny", f"--train_data={bad_file}", "--eval_data=none", f"--out_dir={out}",
              "--max_tokens=64", "--skip_bad_lines=true", "--shuffle_buffer=0", "--max_steps=0"])
    results = json.loads((out / "results.json").read_text())
    # 41 examples (line 41 counts: the validator cannot know truncation will leave it no answer), 4 a step; the
    # loader reads ahead into the next epoch, but not 40 lines far
    assert (results["max_steps"], results["bad_samples"], results["too_long"]) == (11, 2, 1)
    assert all(r["loss"] > 0.5 for r in train_rows(out))
    assert (train_rows(out)[-1]["bad_samples"], train_rows(out)[-1]["too_long"]) == (2, 1)


# ---------------------------------------------------------------- other ways to train

@pytest.mark.slow
def test_text_only_chat_trains_the_lm(tmp_path):
    facts = [("What is the capital of France?", "Paris"), ("What colour is the sky?", "blue"),
             ("How many legs has a cat?", "four"), ("What is two plus two?", "four")]
    lines = [{"messages": [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": q},
                           {"role": "assistant", "content": a}]} for q, a in facts * 5]
    write_lines(tmp_path / "text.jsonl", lines)
    out = tmp_path / "run"
    text = tmp_path / "text.jsonl"
    run_here(["--config=tiny", f"--train_data={text}", f"--eval_data={text}", f"--out_dir={out}",
              "--max_steps=6"])
    results = json.loads((out / "results.json").read_text())
    assert (results["step"], results["vqa_n"], results["bad_samples"]) == (6, 20, 0)
    assert train_rows(out)[-1]["loss"] < train_rows(out)[0]["loss"]


@pytest.mark.slow
def test_padded_mode_trains(vlm_data, tmp_path):
    out = tmp_path / "run"
    run_here([*data_args(vlm_data, out), "--config=tiny", "--packing=false", "--max_steps=4",
              "--eval_data=none"])
    assert [r["step"] for r in train_rows(out)] == [1, 2, 3, 4]
    assert json.loads((out / "results.json").read_text())["step"] == 4 and step_file(out, 4).exists()


@pytest.mark.slow
def test_dry_run_prints_tokens_epochs_and_time_and_trains_nothing(vlm_data, tmp_path):
    out = tmp_path / "run"
    proc = run_here([*data_args(vlm_data, out), "--config=tiny", "--dry_run=true", "--n_epochs=auto",
                     "--batch_size=auto", "--lr_multiplier=auto", "--max_steps=0"])
    match = re.search(r"dry run: 60 examples, ([\d,]+) tokens \([\d,]+ in the loss\) x 8 epochs = ([\d,]+) tokens; "
                      r"(\d+) steps of 1 x 256-token packs; ~[\d.]+ s a step here, so ~[\d.]+ min on cpu", proc.stdout)
    assert match, proc.stdout
    tokens, total, steps = (int(g.replace(",", "")) for g in match.groups())
    assert total == 8 * tokens and tokens > 60 * 50
    # a batch of 1 example is shorter than a pack, so a step holds a 256-token pack's worth of examples
    assert steps == steps_for(60, 8, max(1, 1 * 256 / (tokens / 60))) == math.ceil(8 * tokens / 256)
    assert "auto: 8 epochs: 60 examples x 8 epochs is within 100-64,000 (an LM from scratch" in proc.stderr
    assert not (out / "checkpoints").exists() and not (out / "export").exists()
    assert not (out / "metrics.jsonl").exists()


@pytest.mark.slow
def test_align_stage_trains_only_the_projector(vlm_data, tmp_path):
    """Captions, projector only; an evaluation mid-run must not put the frozen tower back in training mode
    (its BatchNorm statistics would move)."""
    out = tmp_path / "run"
    run_here(["--config=tiny", f"--train_data={vlm_data}/align.jsonl", f"--eval_data={vlm_data}/heldout.jsonl",
              f"--out_dir={out}", "--stage=align", "--max_steps=4", "--eval_every=2", "--eval_limit=2"])
    start = initial_model(out, tmp_path)
    assert {n.split(".")[0] for n, p in start.named_parameters() if p.requires_grad} == {"projector"}
    exported, initial = exported_state(out), start.state_dict()
    assert exported.keys() == initial.keys()
    for k, v in initial.items():
        if not k.startswith("projector."):
            torch.testing.assert_close(exported[k], v, rtol=0, atol=0, msg=k)
    assert all(not torch.equal(exported[k], v) for k, v in initial.items() if k.startswith("projector."))



@pytest.mark.parametrize("args, frozen", [
    (["--vision=open_clip:mm-tiny-rn-32"], False),  # from scratch: it has to train
    (["--vision=open_clip:mm-tiny-rn-32", "--vision_weights=w.safetensors"], True),
    (["--vision=clip:runs/clip"], True),  # the CLIP recipe's export
    (["--vision=hf:some/siglip"], True),
    (["--vision=some/export/folder"], True),  # a bare folder: an export or a Hugging Face folder
    (["--vision=clip:runs/clip", "--freeze_vision=false"], False),  # said outright, it wins
    (["--vision=open_clip:mm-tiny-rn-32", "--freeze_vision=true"], True),
])
def test_auto_freezes_a_pretrained_tower_and_trains_one_from_scratch(args, frozen, vlm_data, tmp_path):
    recipe = load_recipe("vlm")
    cfg = parse_config(recipe.VLMConfig, ["--config=tiny", f"--train_data={vlm_data}/train.jsonl", *args], PRESETS)
    assert recipe.vision_frozen(cfg) is frozen
    if cfg.vision.startswith("open_clip") and not cfg.vision_weights:  # built for real: the others need their files
        model, _ = recipe.build_model(cfg, [cfg.train_data], tmp_path / "tokenizer", True)
        recipe.set_trainable(model, cfg)
        assert all(p.requires_grad is not frozen for p in model.vision.parameters())
        assert all(p.requires_grad for p in model.projector.parameters())


@pytest.mark.parametrize("args, static", [([], True), (["--static_image_tokens=false"], False)])
def test_a_tiny_lm_from_scratch_keeps_image_tokens_static_unless_told(args, static, vlm_data, tmp_path):
    recipe = load_recipe("vlm")
    cfg = parse_config(recipe.VLMConfig, ["--config=tiny", f"--train_data={vlm_data}/train.jsonl",
                                          "--vision=open_clip:mm-tiny-rn-32", *args], PRESETS)
    model, _ = recipe.build_model(cfg, [cfg.train_data], tmp_path / "tokenizer", True)
    assert model.static_image_tokens is static


@pytest.mark.slow
@pytest.mark.parametrize("args, static", [([], True), (["--static_image_tokens=false"], False)])
def test_an_init_run_keeps_its_static_image_tokens_unless_told(args, static, trained_vlm, vlm_data, tmp_path):
    recipe = load_recipe("vlm")
    assert json.loads((trained_vlm / "export" / "vlm_config.json").read_text())["static_image_tokens"] is True
    cfg = parse_config(recipe.VLMConfig, ["--config=tiny", f"--train_data={vlm_data}/train.jsonl",
                                          f"--init_from={trained_vlm}", *args], PRESETS)
    model, _ = recipe.build_model(cfg, [cfg.train_data], tmp_path / "tokenizer", True)
    assert model.static_image_tokens is static


def test_auto_freeze_follows_the_clip_default_run_and_what_an_init_run_did(vlm_data, trained_vlm, tmp_path,
                                                                           monkeypatch):
    """--vision=auto: frozen when the CLIP default run's export is there, trained when it is not. --init_from: frozen
    when that run's tower learnt (trained from scratch there: the shared run), trained when an align run left a
    tower from scratch untouched."""
    recipe = load_recipe("vlm")

    def frozen(*args):
        return recipe.vision_frozen(parse_config(recipe.VLMConfig, ["--config=tiny", "--vision=auto", *args], PRESETS))

    monkeypatch.setattr(recipe, "CLIP_DEFAULT_RUN", str(tmp_path / "clip"))
    assert frozen() is False
    (tmp_path / "clip" / "export").mkdir(parents=True)
    (tmp_path / "clip" / "export" / "open_clip_config.json").write_text("{}")
    assert frozen() is True
    assert frozen(f"--init_from={trained_vlm}") is True  # the shared run trained its tower from scratch
    align = tmp_path / "align"
    run_here(["--config=tiny", f"--train_data={vlm_data}/align.jsonl", "--eval_data=none", f"--out_dir={align}",
              "--stage=align", "--max_steps=1"])
    assert frozen(f"--init_from={align}") is False  # its tower never trained: the SFT after it must train it


@pytest.mark.parametrize("source, saved, learnt", [
    ("open_clip", {"vision": "auto", "stage": "align"}, False),  # auto found no CLIP run then: from scratch, untouched
    ("clip", {"vision": "auto", "stage": "align"}, True),  # auto found the CLIP export then
    ("open_clip", {"vision": "auto", "stage": "single", "freeze_vision": "auto"}, True),  # from scratch, trained
    ("open_clip", {"vision": "auto", "stage": "single", "freeze_vision": True}, False),  # from scratch, kept frozen
    ("open_clip", {"vision": "open_clip:x", "vision_weights": "w.pt", "stage": "align"}, True),
])
def test_an_init_runs_tower_is_judged_by_what_that_run_saved(source, saved, learnt, tmp_path, monkeypatch):
    """Not by resolving its --vision=auto again: a CLIP default run made since must not make an untouched tower
    from scratch count as pretrained (and frozen, random, for good)."""
    recipe = load_recipe("vlm")
    monkeypatch.setattr(recipe, "CLIP_DEFAULT_RUN", str(tmp_path / "clip"))
    (tmp_path / "clip" / "export").mkdir(parents=True)
    (tmp_path / "clip" / "export" / "open_clip_config.json").write_text("{}")  # a CLIP default run exists now
    (tmp_path / "init").mkdir()
    (tmp_path / "init" / "vlm_config.json").write_text(json.dumps(
        {"vision": {"source": source}, "extra": {"train_config": saved}}))
    cfg = parse_config(recipe.VLMConfig, ["--config=tiny", "--vision=auto", f"--init_from={tmp_path / 'init'}"],
                       PRESETS)
    assert recipe.init_tower_learnt(cfg.init_from) is learnt
    assert recipe.vision_frozen(cfg) is learnt


@pytest.mark.slow
def test_lora_trains_and_exports_a_merged_model_that_loads(vlm_data, tmp_path):
    from mm.vlm.inference import VisionChat

    out = tmp_path / "run"
    run_here([*data_args(vlm_data, out), "--config=tiny", "--lora=true", "--lora_r=4", "--max_steps=3",
              "--eval_data=none", "--lr=1e-2"])
    start = initial_model(out, tmp_path)
    assert any("lora_" in n for n, p in start.named_parameters() if p.requires_grad)
    assert not any(p.requires_grad for n, p in start.lm.named_parameters() if "lora_" not in n)
    exported = exported_state(out)
    assert not [k for k in exported if "lora" in k]
    initial = {k.replace("base_model.model.", "").replace("base_layer.", ""): v
               for k, v in start.state_dict().items() if "lora_" not in k}
    assert exported.keys() == initial.keys()
    changed = {k for k, v in initial.items() if k.startswith("lm.") and not torch.equal(exported[k], v)}
    assert changed and all(re.search(r"self_attn\.[qkvo]_proj\.weight$", k) for k in changed), changed
    reply = VisionChat.from_checkpoint(out).chat(question(vlm_data), max_new_tokens=4, image_root=str(vlm_data))
    assert isinstance(reply.text, str)


# ---------------------------------------------------------------- config

def test_every_preset_parses():
    import yaml

    recipe = load_recipe("vlm")
    presets = sorted(p.stem for p in PRESETS.glob("*.yaml"))
    assert {"tiny", "smollm2"} <= set(presets)
    for name in presets:
        cfg = parse_config(recipe.VLMConfig, [f"--config={name}"], PRESETS)
        recipe.check_config(cfg)
        for key, value in yaml.safe_load((PRESETS / f"{name}.yaml").read_text()).items():
            assert getattr(cfg, key) == value, (name, key)  # every key applied, with its YAML type


@pytest.mark.parametrize("args, message", [
    (["--bogus=1"], "unknown config key 'bogus'"),
    (["--max_stpes=3"], "Did you mean: max_steps"),
    (["--max_steps=many"], "--max_steps: expected an integer, got 'many'"),
    (["--lora=maybe"], "--lora: expected true/false, got 'maybe'"),
    (["--stage=pretrain"], "--stage=pretrain: accepted values are single, align, sft"),
    (["--n_epochs=0"], "--n_epochs must be auto or >= 1, got 0"),
    (["--batch_size=-2"], "--batch_size must be auto or >= 1, got -2"),
    (["--n_epochs=lots"], "--n_epochs"),
    (["--max_tokens=1024"], "--max_tokens=1024 is over --pack_tokens=512: a sample must fit a pack"),
    (["--ckpt_every=0"], "--ckpt_every must be >= 1, got 0"),
    (["--image_positions=6"], "--image_positions must be 0 (off) or a positive multiple of 4"),
    (["--stage=sft"], "--stage=sft trains on top of an aligned model: give --init_from=<the align run>"),
])
def test_bad_config_is_refused_with_a_message(args, message):
    recipe = load_recipe("vlm")
    with pytest.raises(ConfigError) as e:
        recipe.check_config(parse_config(recipe.VLMConfig, ["--config=tiny", *args], PRESETS))
    assert message in str(e.value)


@pytest.mark.slow
def test_recipe_fails_at_start_on_a_bad_config(tmp_path):
    proc = run_here(["--config=tiny", f"--out_dir={tmp_path / 'run'}", "--max_tokens=4096"], check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "config error: --max_tokens=4096 is over --pack_tokens=512" in proc.stderr
    assert not (tmp_path / "run").exists()
